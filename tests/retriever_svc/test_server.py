"""The ``retriever-svc`` CLI as a real subprocess with its embedded redis-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exitrank.artifacts import write_manifest
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from tests.retriever_svc.conftest import CLI, start_retriever, stderr_of



def _redis_child(pid: int) -> int:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    (child,) = [int(c) for c in children if "redis-server" in Path(f"/proc/{c}/cmdline").read_text()]
    return child


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    proc.send_signal(sig)
    try:
        assert proc.wait(timeout=30) == 0, stderr_of(proc)
    finally:
        if proc.poll() is None:
            proc.kill()


def _nearest(address: str, user: str, wait_s: float = 30) -> retriever_pb2.NearestUsersResponse:
    with grpc.insecure_channel(address) as channel:
        stub = retriever_pb2_grpc.RetrieverStub(channel)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id=user, k=3))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_serves_stops_cleanly_and_keeps_data(tmp_path, clustered, brute_force):
    emb, _ = clustered()
    emb.save(tmp_path / "artifacts")
    args = ("--artifacts", str(tmp_path / "artifacts"), "--data-dir", str(tmp_path / "data"))
    proc, address = start_retriever(*args)
    redis_pid = _redis_child(proc.pid)
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="exitrank.v1.Retriever"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = retriever_pb2_grpc.RetrieverStub(channel)
        summary = stub.Ingest(iter([common_pb2.Interaction(user_id="late", item_id="c2i0"),
                                    common_pb2.Interaction(user_id="late", item_id="c2i2")]))
        assert summary.accepted == 2
    rows = [emb.item_ids.index("c2i0"), emb.item_ids.index("c2i2")]
    want = [s for _, s in brute_force(emb.user_ids, emb.user, emb.item_foldin[rows].sum(0), 3)]
    deadline = time.monotonic() + 30
    while True:  # both events applied (they may come in two consumer batches)
        answer = _nearest(address, "late")
        if [n.score for n in answer.neighbors] == pytest.approx(want, abs=1e-5):
            break
        assert time.monotonic() < deadline, "the second event was never applied"
        time.sleep(0.05)
    assert answer.embedding_version == emb.version
    assert all(n.user_id.startswith("c2") for n in answer.neighbors)
    _stop(proc)
    assert not Path(f"/proc/{redis_pid}").exists()  # the embedded redis-server is gone

    proc, address = start_retriever(*args)  # same data dir: the AOF kept the ingested user
    try:
        again = _nearest(address, "late")
        assert again.embedding_version == emb.version
        assert [n.score for n in again.neighbors] == pytest.approx(want, abs=1e-5)
    finally:
        _stop(proc, signal.SIGINT)


def _trainer(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_default_data_dir_persists_and_other_clis_reach_it(tmp_path, clustered):
    """Without --data-dir the embedded Redis lives under $XDG_STATE_HOME/exitrank/retriever (said at
    start), keeps the catalog across a restart, refuses a second server on it, and ``trainer publish``
    reaches it by its socket URL alone: the password comes from the 0600 credentials file."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    (tmp_path / "empty").mkdir()  # an artifacts directory without embeddings
    data_dir = tmp_path / "state" / "exitrank" / "retriever" / "redis"
    proc, address = start_retriever("--artifacts", str(tmp_path / "empty"), env=env)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            assert stub.UpsertItems(iter([common_pb2.Item(item_id="c0i0", title="Zero")]), timeout=10).accepted == 1
        assert (data_dir / "credentials").stat().st_mode & 0o777 == 0o600
        password = (data_dir / "credentials").read_text().strip()
        second = subprocess.run([str(CLI), "serve", "--port", "0", "--artifacts", str(tmp_path / "empty")],
                                capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode == 2 and second.stdout == ""
        assert f"{data_dir} is in use by another embedded redis-server" in second.stderr

        emb, _ = clustered()
        emb.save(tmp_path / "fit")
        write_manifest(tmp_path / "fit", config={}, data_hash="test", metrics={})
        socket_url = f"unix://{data_dir / 'redis.sock'}"
        published = _trainer("publish", "--from", str(tmp_path / "fit"), "--artifacts", str(tmp_path / "releases"),
                             "--redis-url", socket_url, env=env)
        assert published.returncode == 0, published.stderr[-2000:]
        assert json.loads(published.stdout.splitlines()[-1])["embedding_version"] == emb.version
        assert _nearest(address, "c0u0").embedding_version == emb.version  # the retriever followed it
        wrong = _trainer("publish", "--from", str(tmp_path / "fit"), "--artifacts", str(tmp_path / "releases"),
                         "--redis-url", f"unix://:wrong@{data_dir / 'redis.sock'}", env=env)
        assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
        assert wrong.stderr.startswith("trainer: error: ") and wrong.stderr.count("\n") == 1
    finally:
        _stop(proc)
    log = stderr_of(proc, tail=100_000)
    assert f"keeps its data in {data_dir} across restarts" in log and f"--redis-url {socket_url}" in log
    assert password not in log

    proc, address = start_retriever("--artifacts", str(tmp_path / "empty"), env=env)  # the same default directory
    try:
        with grpc.insecure_channel(address) as channel:
            items = retriever_pb2_grpc.RetrieverStub(channel).GetItems(
                retriever_pb2.GetItemsRequest(item_ids=["c0i0"]), timeout=10)
        assert [i.title for i in items.items] == ["Zero"]  # the catalog survived the restart
        assert _nearest(address, "c0u0").embedding_version == emb.version  # so did the published embeddings
    finally:
        _stop(proc)
