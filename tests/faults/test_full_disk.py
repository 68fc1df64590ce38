"""A full disk under a real ``retriever-svc`` and its embedded redis-server (issue 17, Operations);
then the two mechanisms it rests on alone: the embedded server restarted refusing writes
(``exitrank.redis_server``), and a Redis's MISCONF refusal as ``StoreRefusesWrites``
(``retriever_svc.redis_io.guarded``).

The disk is real: a 32 MiB tmpfs mounted on the data directory (skipped where this process may not
mount, e.g. without root) and filled with a file until ``write`` answers ENOSPC; space returns when
the file is deleted. Asserted through the public API only: Ingest answers UNAVAILABLE with a message
naming no internals, health turns NOT_SERVING, reads keep answering, and once space returns health
is SERVING again, Ingest accepts, and every event acknowledged before, during and after is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exitrank.redis_server import EmbeddedRedis
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from retriever_svc.errors import StoreRefusesWrites
from retriever_svc.store import RedisStore
from tests.conftest import await_ready, launch_service, stop_service
from tests.faults.conftest import BIN
from tests.support.reliability import recording

DISK_MB = 32
DEADLINE_S = 60.0  # bound of every wait below (NOT_SERVING needs readiness.STALL_S = 5 s of refusals)
USERS = 10
# what a client must never read: Redis's replies, the data directory, Python names
INTERNALS = ("MISCONF", "NOREPLICAS", "OOM", "AOF", "append", "redis.", ".py", "Error", "Traceback", "/")


@pytest.fixture
def small_disk(tmp_path):
    """A mounted 32 MiB tmpfs (a disk that can really fill); unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Writes ``disk/filler`` until the filesystem answers ENOSPC, down to its last bytes."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        for chunk in (1 << 20, 4096, 64):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * chunk)
    return filler


def ingest(stub, events: list[tuple[str, str, int]]) -> int:
    """Ingest ``(user, item, timestamp_ms)`` events; the number acknowledged (raises grpc.RpcError)."""
    messages = [common_pb2.Interaction(user_id=u, item_id=i, rating=4.0, timestamp_ms=t) for u, i, t in events]
    return stub.Ingest(iter(messages), timeout=30).accepted


def history(stub, user: str) -> set[tuple[str, int]]:
    """``(item, timestamp_ms)`` of every interaction the retriever holds for ``user``."""
    try:
        context = stub.GetContext(retriever_pb2.ContextRequest(user_id=user, k=0, max_history=200), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return set()
        raise
    return {(h.item_id, h.timestamp_ms) for h in context.history}


def health_status(health) -> int:
    return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def wait_for(condition, what, timeout_s: float = DEADLINE_S) -> float:
    """Polls ``condition`` every 50 ms until true; the seconds it took (fails after ``timeout_s``,
    saying ``what``: a string, or a callable giving one then)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start >= timeout_s:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what() if callable(what) else what}")
        time.sleep(0.05)
    return time.monotonic() - start


def missing(stub, acknowledged: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The acknowledged events the retriever's histories do not hold (yet)."""
    held = {user: history(stub, user) for user in {user for user, _, _ in acknowledged}}
    return [(user, item, ts) for user, item, ts in acknowledged if (item, ts) not in held[user]]


def test_a_full_disk_refuses_ingest_turns_health_off_and_recovers_losing_nothing(
        request, stack_artifacts, small_disk, tmp_path):
    log = tmp_path / "retriever.log"  # off the small disk: the service's own log must not fill up
    proc = launch_service([str(BIN / "retriever-svc"), "serve", "--port", "0", "--artifacts",
                           str(stack_artifacts.artifacts), "--data-dir", str(small_disk / "data")], log)
    try:
        address = await_ready(proc, "retriever listening on ", log)
        stack_artifacts.seed(address)
        with grpc.insecure_channel(address) as channel, recording(request.node.nodeid, "full disk",
                                                                 area="faults") as row:
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            items = sorted(stack_artifacts.titles)
            seeded_user = next(iter(stack_artifacts.histories))
            before = [(f"d{j % USERS}", items[j % len(items)], 10_000 + j) for j in range(100)]
            # without the fault nothing is refused: acknowledged, applied, SERVING
            assert ingest(stub, before) == len(before)
            wait_for(lambda: not missing(stub, before), "the events before the fault to be applied")
            assert health_status(health) == health_pb2.HealthCheckResponse.SERVING

            filler = fill(small_disk)
            filled_at = time.monotonic()
            # Ingest until refused: events that still fit in the last block are acknowledged, and kept
            during: list[tuple[str, str, int]] = []
            refusal = None
            while refusal is None:
                assert time.monotonic() - filled_at < DEADLINE_S, "Ingest was never refused on a full disk"
                event = ("late", items[len(during) % len(items)], 20_000 + len(during))
                try:
                    assert ingest(stub, [event]) == 1
                    during.append(event)
                except grpc.RpcError as exc:
                    refusal = exc
            first_refusal_s = time.monotonic() - filled_at
            assert refusal.code() == grpc.StatusCode.UNAVAILABLE, (refusal.code(), refusal.details())
            messages = {refusal.details()}
            refused = 1
            while health_status(health) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() - filled_at < DEADLINE_S, "health never turned NOT_SERVING"
                with pytest.raises(grpc.RpcError) as again:
                    ingest(stub, [("refused", items[0], 30_000 + refused)])
                assert again.value.code() == grpc.StatusCode.UNAVAILABLE
                messages.add(again.value.details())
                refused += 1
                time.sleep(0.2)
            not_serving_s = time.monotonic() - filled_at
            assert not [(word, m) for m in messages for word in INTERNALS if word in m], messages
            # reads go on from the restarted, write-refusing Redis and the in-memory index
            neighbours = stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id=seeded_user, k=3), timeout=10)
            assert len(neighbours.neighbors) == 3
            assert not missing(stub, before)
            assert "the disk is full" in log.read_text()  # the operator reads why

            filler.unlink()
            freed_at = time.monotonic()
            recovered_s = wait_for(lambda: health_status(health) == health_pb2.HealthCheckResponse.SERVING,
                                   "health SERVING once space returned")
            after = [(f"a{j % USERS}", items[j % len(items)], 40_000 + j) for j in range(50)]  # histories keep one entry per item: new users
            assert ingest(stub, after) == len(after)
            acknowledged = before + during + after
            applied_s = wait_for(lambda: not missing(stub, acknowledged),
                                 lambda: f"every acknowledged event applied, missing: {missing(stub, acknowledged)}")
            assert history(stub, "refused") == set()  # a refused Ingest stored nothing
            assert history(stub, "late") == {(item, ts) for _, item, ts in during}
            row.sent, row.refused = len(acknowledged) + refused, refused
            row.measured = (
                f"retriever-svc process, its redis-server's {DISK_MB} MiB tmpfs filled (ENOSPC): first Ingest "
                f"UNAVAILABLE {first_refusal_s:.1f} s after the fill ({len(during)} events fitted in the last "
                f"block, acknowledged and kept), {refused} Ingests UNAVAILABLE (messages: {' | '.join(sorted(messages))}), health "
                f"NOT_SERVING {not_serving_s:.1f} s after the fill, NearestUsers and GetContext answered; space "
                f"freed: SERVING after {recovered_s:.1f} s, {len(after)} more events accepted, all "
                f"{len(acknowledged)} acknowledged events in the histories {recovered_s + applied_s:.1f} s after "
                "the space returned, the refused ones nowhere")
    finally:
        stop_service(proc)
        print(log.read_text()[-6000:])  # shown when the test fails


def test_embedded_redis_restarts_refusing_writes_on_a_full_disk_and_takes_them_once_space_returns(small_disk):
    import redis

    server = EmbeddedRedis(small_disk / "r").start().supervise()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        for j in range(50):
            client.xadd("s", {"j": j})
        filler = fill(small_disk)
        acknowledged = 50
        with pytest.raises(redis.RedisError):  # appendfsync always: the write that cannot be appended kills it
            while True:
                client.xadd("s", {"pad": "x" * 4096})
                acknowledged += 1
        wait_for(lambda: server.restarts >= 1 and server.refusing_writes and server.running, "a read-only restart")
        assert client.xlen("s") == acknowledged  # reads answer, every acknowledged entry is back
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            client.xadd("s", {"late": 1})
        pid = server.pid
        filler.unlink()
        wait_for(lambda: not server.refusing_writes, "writes accepted again")
        client.xadd("s", {"after": 1})
        assert client.xlen("s") == acknowledged + 1 and server.pid == pid  # taken without another restart
    finally:
        server.stop()


@pytest.mark.anyio
async def test_a_redis_that_cannot_write_its_aof_misconf_is_a_refused_write_naming_nothing_internal(small_disk):
    """An external Redis (``appendfsync everysec``) on a full disk answers MISCONF: StoreRefusesWrites."""
    server = EmbeddedRedis(small_disk / "r", appendfsync="everysec").start()
    store = RedisStore.from_url(server.url, prefix="x")
    try:
        await store.probe_write()
        filler = fill(small_disk)
        deadline = time.monotonic() + DEADLINE_S
        with pytest.raises(StoreRefusesWrites) as refused:
            while time.monotonic() < deadline:  # until the disk's last block is used up
                await store.probe_write()
        assert "MISCONF" in str(refused.value)  # the detail, for the log
        assert not [word for word in INTERNALS if word in refused.value.public_message()]
        filler.unlink()
        deadline = time.monotonic() + DEADLINE_S
        while True:  # Redis retries its AOF write each second and takes writes again once it succeeds
            try:
                await store.probe_write()
                break
            except StoreRefusesWrites:
                assert time.monotonic() < deadline, "Redis never took writes again"
                await asyncio.sleep(0.1)
    finally:
        await store.close()
        server.stop()
