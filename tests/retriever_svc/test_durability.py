"""No acknowledged interaction is lost when the retriever is SIGKILLed or Redis is SIGKILLed and
restarted mid-stream: real ``retriever-svc`` processes, a real redis-server with its AOF."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis

from exitrank.redis_server import EmbeddedRedis
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from retriever_svc.store import Keys

CLI = Path(sys.executable).with_name("retriever-svc")
BATCH = 25


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(CLI), "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=60)
    if not lines or not lines[0].startswith("retriever listening on "):
        proc.kill()
        pytest.fail(f"retriever-svc did not start: {lines}")
    return proc, lines[0].split()[-1]


class Ingester(threading.Thread):
    """Streams batches of new interactions; records the ones the server acknowledged."""

    def __init__(self, address: str, *, retry: bool) -> None:
        super().__init__(daemon=True)
        self.address, self.retry = address, retry
        self.acked: list[tuple[str, str, int]] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            n = 0
            while not self.stop.is_set():
                batch = [(f"d{(n + j) % 40}", f"c{(n + j) % 3}i{(n + j) % 5}", n + j + 1)
                         for j in range(BATCH)]
                try:
                    summary = stub.Ingest(iter(
                        common_pb2.Interaction(user_id=u, item_id=i, timestamp_ms=t)
                        for u, i, t in batch), timeout=5)
                except grpc.RpcError:
                    self.failures += 1
                    if not self.retry:
                        return  # the server is gone: what was acked so far is what counts
                    time.sleep(0.05)
                    continue  # the same events again (applying twice changes nothing)
                assert summary.accepted == BATCH
                self.acked += batch
                n += BATCH


def _wait_acked(ingester: Ingester, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(ingester.acked) < count:
        assert time.monotonic() < deadline and ingester.is_alive(), "ingest stalled"
        time.sleep(0.01)


def _assert_all_applied(url: str, acked: list[tuple[str, str, int]], version: str,
                        timeout: float = 60) -> None:
    """Every acknowledged event is in its user's history, and every user has a fresh vector."""
    keys = Keys("xr")
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while not _drained(client, keys):
            assert time.monotonic() < deadline, "the stream was not drained"
            time.sleep(0.1)
        latest: dict[tuple[str, str], int] = {}
        for user, item, ts in acked:
            latest[(user, item)] = max(ts, latest.get((user, item), 0))
        for (user, item), ts in latest.items():
            assert client.zscore(keys.hist(user), item) >= ts, (user, item)
        for user in {u for u, _, _ in acked}:
            assert client.hget(keys.emb(user), version) is not None, user
    finally:
        client.close()


def _drained(client: redis.Redis, keys: Keys) -> bool:
    """Every entry delivered to the group and acknowledged (Redis 6.2 has no group lag)."""
    (group,) = client.xinfo_groups(keys.stream)
    last = client.xinfo_stream(keys.stream)["last-generated-id"]
    return group["pending"] == 0 and group["last-delivered-id"] == last


@pytest.fixture
def artifacts(tmp_path, clustered):
    emb, _ = clustered()
    emb.save(tmp_path / "artifacts")
    return tmp_path / "artifacts", emb


def test_killed_retriever_loses_no_acknowledged_interaction(tmp_path, artifacts):
    art, emb = artifacts
    with EmbeddedRedis(tmp_path / "redis") as server:
        args = ("--artifacts", str(art), "--redis-url", server.url, "--consumer", "r1")
        proc, address = _start(*args)
        ingester = Ingester(address, retry=False)
        ingester.start()
        try:
            _wait_acked(ingester, 20 * BATCH)
            proc.send_signal(signal.SIGKILL)  # mid-stream: no shutdown, entries may be pending
            proc.wait(timeout=10)
            ingester.join(timeout=10)
            assert ingester.failures == 1 and len(ingester.acked) >= 20 * BATCH
            proc, address = _start(*args)  # same consumer name: re-reads what it left pending
            _assert_all_applied(server.url, ingester.acked, emb.version)
            with grpc.insecure_channel(address) as channel:
                stub = retriever_pb2_grpc.RetrieverStub(channel)
                ctx = stub.GetContext(retriever_pb2.ContextRequest(user_id="d7", k=2, max_history=200))
                want = {i for u, i, _ in ingester.acked if u == "d7"}
                assert {h.item_id for h in ctx.history} == want
                assert ctx.embedding_version == emb.version and len(ctx.neighbors) == 2
        finally:
            ingester.stop.set()
            proc.kill()
            proc.wait(timeout=10)


def test_redis_restart_mid_stream_loses_no_acknowledged_interaction(tmp_path, artifacts):
    art, emb = artifacts
    server = EmbeddedRedis(tmp_path / "redis").start()
    proc, address = _start("--artifacts", str(art), "--redis-url", server.url, "--consumer", "r1")
    ingester = Ingester(address, retry=True)
    ingester.start()
    try:
        _wait_acked(ingester, 10 * BATCH)
        server.kill()  # SIGKILL: only the fsynced append-only file survives
        time.sleep(0.3)
        server = EmbeddedRedis(tmp_path / "redis", password=server.password).start()
        acked_at_restart = len(ingester.acked)
        _wait_acked(ingester, acked_at_restart + 10 * BATCH)  # the service recovered by itself
        ingester.stop.set()
        ingester.join(timeout=10)
        assert ingester.failures >= 1
        _assert_all_applied(server.url, ingester.acked, emb.version)
        with grpc.insecure_channel(address) as channel:  # the same process answers throughout
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            answer = stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id="d3", k=3))
            assert answer.embedding_version == emb.version and len(answer.neighbors) == 3
    finally:
        ingester.stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        server.stop()
