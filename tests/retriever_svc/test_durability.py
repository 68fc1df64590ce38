"""No acknowledged interaction is lost when the retriever is SIGKILLed or Redis is SIGKILLed and
restarted mid-stream: real ``retriever-svc`` processes, a real redis-server with its AOF. While
Redis is down the retriever answers NearestUsers from memory and stays SERVING; it reports
NOT_SERVING only when it has nothing to answer from (no embeddings and no Redis)."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
import redis

from grpc_health.v1 import health_pb2, health_pb2_grpc

from exitrank.redis_server import EmbeddedRedis
from tests.support.reliability import recording
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from retriever_svc.keys import SEQ_FIELD
from retriever_svc.store import Keys
from tests.retriever_svc.conftest import start_retriever

BATCH = 25
ITEMS = [f"c{c}i{j}" for c in range(3) for j in range(5)]  # the clustered fit's items
SERVING = health_pb2.HealthCheckResponse.SERVING


def _event(n: int) -> tuple[str, str, int, float]:
    """Event n: user d<n // 10>'s (n % 10)-th distinct item, so every (user, item) pair is unique."""
    user = n // 10
    return f"d{user}", ITEMS[(user + n % 10) % len(ITEMS)], n + 1, float(1 + n % 5)


class Ingester(threading.Thread):
    """Streams batches of new interactions (:func:`_event`), up to ``total`` of them (None: until
    stopped); records the ones the server acknowledged."""

    def __init__(self, address: str, *, retry: bool, total: int | None = None, batch: int = BATCH) -> None:
        super().__init__(daemon=True)
        self.address, self.retry, self.total, self.batch = address, retry, total, batch
        self.acked: list[tuple[str, str, int, float]] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            n = 0
            while not self.stop.is_set() and (self.total is None or n < self.total):
                batch = [_event(n + j) for j in range(self.batch)]
                try:
                    summary = stub.Ingest(iter(
                        common_pb2.Interaction(user_id=u, item_id=i, timestamp_ms=t, rating=r)
                        for u, i, t, r in batch), timeout=5)
                except grpc.RpcError:
                    self.failures += 1
                    if not self.retry:
                        return  # the server is gone: what was acked so far is what counts
                    time.sleep(0.05)
                    continue  # the same events again (applying twice changes nothing)
                assert summary.accepted == self.batch
                self.acked += batch
                n += self.batch


class Prober(threading.Thread):
    """Calls NearestUsers and Health.Check back to back; counts answers while ``outage`` is set."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.outage, self.stop = threading.Event(), threading.Event()
        self.answered = self.failed = self.serving = self.not_serving = 0

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                try:
                    answer = stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id="c0u0", k=3), timeout=2)
                    ok = len(answer.neighbors) == 3
                except grpc.RpcError:
                    ok = False
                status = health.Check(health_pb2.HealthCheckRequest(service="exitrank.v1.Retriever"), timeout=2)
                if self.outage.is_set():
                    self.answered, self.failed = self.answered + ok, self.failed + (not ok)
                    self.serving += status.status == SERVING
                    self.not_serving += status.status != SERVING
                time.sleep(0.01)


def _wait_acked(ingester: Ingester, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(ingester.acked) < count:
        assert time.monotonic() < deadline and ingester.is_alive(), "ingest stalled"
        time.sleep(0.01)


def _assert_all_applied(url: str, acked: list[tuple[str, str, int, float]], version: str,
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
        for user, item, ts, _ in acked:
            latest[(user, item)] = max(ts, latest.get((user, item), 0))
        for (user, item), ts in latest.items():
            assert client.zscore(keys.hist(user), item) >= ts, (user, item)
        for user in {u for u, _, _, _ in acked}:
            assert client.hget(keys.emb(user), version) is not None, user
    finally:
        client.close()


def _stored_counts(url: str, users: set[str]) -> tuple[int, int, int, int]:
    """(history entries, rating entries, entries whose timestamp or rating differs from the event's,
    applications) over ``users``, read straight from Redis. Applications are the users' history change
    counters (``SEQ_FIELD``, one increment per event that changed a history): a set cannot hold a
    duplicate, so an event whose effect was applied twice shows here, not in the entry counts."""
    keys = Keys("xr")
    client = redis.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for user in sorted(users):
            pipe.zrange(keys.hist(user), 0, -1, withscores=True)
            pipe.hgetall(keys.rating(user))
        for user in sorted(users):
            pipe.hget(keys.emb(user), SEQ_FIELD)
        replies = pipe.execute()
        applied = sum(int(seq or 0) for seq in replies[2 * len(users):])
        replies = replies[: 2 * len(users)]
    finally:
        client.close()
    expected = {(u, i): (t, r) for u, i, t, r in map(_event, range(10 * len(users)))}
    hist = rating = wrong = 0
    for user, entries, ratings in zip(sorted(users), replies[::2], replies[1::2]):
        hist, rating = hist + len(entries), rating + len(ratings)
        for item, ts in entries:
            want_ts, want_rating = expected.get((user, item.decode()), (None, None))
            wrong += (ts != want_ts) or (float(ratings.get(item, b"nan")) != want_rating)
    return hist, rating, wrong, applied


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
        proc, address = start_retriever(*args)
        ingester = Ingester(address, retry=False)
        ingester.start()
        try:
            _wait_acked(ingester, 20 * BATCH)
            proc.send_signal(signal.SIGKILL)  # mid-stream: no shutdown, entries may be pending
            proc.wait(timeout=10)
            ingester.join(timeout=10)
            assert ingester.failures == 1 and len(ingester.acked) >= 20 * BATCH
            proc, address = start_retriever(*args)  # same consumer name: re-reads what it left pending
            _assert_all_applied(server.url, ingester.acked, emb.version)
            with grpc.insecure_channel(address) as channel:
                stub = retriever_pb2_grpc.RetrieverStub(channel)
                ctx = stub.GetContext(retriever_pb2.ContextRequest(user_id="d7", k=2, max_history=200))
                want = {i for u, i, _, _ in ingester.acked if u == "d7"}
                assert {h.item_id for h in ctx.history} == want
                assert ctx.embedding_version == emb.version and len(ctx.neighbors) == 2
        finally:
            ingester.stop.set()
            proc.kill()
            proc.wait(timeout=10)


def test_redis_restart_while_ingesting_10000_applies_each_acked_event_once(request, tmp_path, artifacts):
    art, emb = artifacts
    total = 10_000
    server = EmbeddedRedis(tmp_path / "redis").start()
    proc, address = start_retriever("--artifacts", str(art), "--redis-url", server.url, "--consumer", "r1")
    ingester, prober = Ingester(address, retry=True, total=total, batch=100), Prober(address)
    with recording(request.node.nodeid, "Redis restart", area="faults") as row:
        try:
            prober.start()
            ingester.start()
            _wait_acked(ingester, total // 4)
            prober.outage.set()
            server.kill()  # SIGKILL: only the fsynced append-only file survives
            failures_before = ingester.failures
            killed = time.monotonic()
            while ingester.failures == failures_before or time.monotonic() < killed + 1.0:  # a 1 s outage, seen
                assert time.monotonic() < killed + 10, "no Ingest failed while Redis was down"
                time.sleep(0.01)
            server = EmbeddedRedis(tmp_path / "redis", password=server.password).start()
            prober.outage.clear()
            ingester.join(timeout=120)  # the service recovered by itself and took the rest
            assert not ingester.is_alive() and len(ingester.acked) == total
            _assert_all_applied(server.url, ingester.acked, emb.version)
            hist, ratings, wrong, applied = _stored_counts(server.url, {u for u, _, _, _ in ingester.acked})
            assert (hist, ratings, wrong) == (total, total, 0)  # each acked event stored, none torn
            assert applied == total  # each applied once: an event re-read after the restart changed nothing
            assert prober.answered > 0 and prober.failed == 0 and prober.not_serving == 0
        finally:
            ingester.stop.set()
            prober.stop.set()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            server.stop()
        row.sent, row.refused = total, ingester.failures
        row.measured = (f"retriever-svc streamed {total:,} distinct interactions through Ingest (batches of 100), "
                        f"Redis SIGKILLed and restarted on its AOF mid-stream: {ingester.failures} Ingest calls failed "
                        f"(UNAVAILABLE) and were resent; afterwards {hist:,} history and {ratings:,} rating entries "
                        f"in Redis = {total:,} acked, 0 lost, {wrong} wrong, {applied:,} applications (each event once); while Redis was down "
                        f"NearestUsers answered {prober.answered}/{prober.answered + prober.failed} from memory and "
                        f"health stayed SERVING ({prober.serving}/{prober.serving + prober.not_serving} checks)")


def test_health_is_not_serving_only_while_nothing_can_answer(request, tmp_path):
    server = EmbeddedRedis(tmp_path / "redis").start()
    (tmp_path / "none").mkdir()  # an artifacts directory without gcn/: no embeddings
    proc, address = start_retriever("--artifacts", str(tmp_path / "none"), "--redis-url", server.url)
    statuses: list[int] = []
    with recording(request.node.nodeid, "Redis restart", area="faults") as row:
        try:
            with grpc.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)

                def status_within(want: int, seconds: float = 10) -> float:
                    started = time.monotonic()
                    while time.monotonic() - started < seconds:
                        statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=2).status)
                        if statuses[-1] == want:
                            return time.monotonic() - started
                        time.sleep(0.05)
                    raise AssertionError(f"health never became {want}: {statuses[-5:]}")

                status_within(SERVING, 0.5)  # Redis up: GetItems/GetContext can answer
                server.kill()
                down_s = status_within(health_pb2.HealthCheckResponse.NOT_SERVING)
                stub = retriever_pb2_grpc.RetrieverStub(channel)
                with pytest.raises(grpc.RpcError) as info:  # it indeed cannot answer
                    stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["c0i0"]), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                server = EmbeddedRedis(tmp_path / "redis", password=server.password).start()
                up_s = status_within(SERVING)
                assert not stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["c0i0"]), timeout=5).items
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            server.stop()
        row.sent, row.refused = len(statuses), statuses.count(health_pb2.HealthCheckResponse.NOT_SERVING)
        row.measured = (f"retriever-svc without embeddings: health NOT_SERVING {down_s:.2f}s after Redis was killed "
                        f"(GetItems UNAVAILABLE meanwhile), SERVING again {up_s:.2f}s after it restarted; "
                        f"{row.refused}/{row.sent} health checks answered NOT_SERVING")
