"""Issue 13's hostile mix against real processes: while three clients flood ``ranker-svc`` with ~4 MiB
``Rank`` requests that are valid protobuf but for one string of invalid UTF-8, one client calls ``Rank``
five times and another opens ``RankStream`` s of 300 requests whose deadline passes mid-stream. On the
main of that issue the ranker died with SIGSEGV (no traceback): the telemetry interceptor's ``finally``
read ``context.peer()`` of a stream whose generator grpc had left open past the call's end
(``exitrank.server_streams``). Now it survives every round, stays SERVING and answers a well-formed
``Rank`` afterwards; ``faulthandler`` is on, so a native crash would leave the Python stacks in its log.

Issue 17's flood: while three clients send those requests without pause, health checks with a 0.5 s
deadline and a fourth client's ``Rank`` keep answering. The guard admits a call before parsing it,
and refuses a malformed request larger than ``exitrank.wire.MAX_WALK_BYTES`` after protobuf's C
parser, without the Python walk that names the field (seconds of the event loop per 4 MiB request:
on the issue's main, 25 of 25 such health checks failed).

And that ``faulthandler`` is on in both services: a fatal signal leaves every thread's Python stack
in the service's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.reliability import recording
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from tests.conftest import await_ready, launch_service, stop_service
from tests.faults.conftest import BIN, quantile, rank_request

pytestmark = pytest.mark.anyio

FLOODERS = 3
STREAM_ROUNDS = 4  # main of issue 13 died in the first or second round in every try here
STREAM_REQUESTS = 300
STREAM_CANDIDATES = 24  # responses of ~0.5 KB: a few fill the slow reader's flow-control window
STREAM_DEADLINE_S = 10.0  # passes mid-stream: the flood keeps the ranker's event loop busy
# the stream client's HTTP/2 window: small, so the server's writes wait for a reader that never comes
SLOW_READER = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
RANK_METHOD = "/exitrank.v1.Ranker/Rank"
FLOOD_S = 8.0  # how long health checks and the fourth client's Ranks run under the flood
HEALTH_DEADLINE_S = 0.5


def malformed_rank(size: int = 4_000_000) -> bytes:
    """~``size`` bytes of a valid ``RankRequest`` (8-byte candidate ids) followed by a ``user_id``
    whose bytes are not UTF-8: protobuf refuses it, the guard names the field after a full walk."""
    ids = [f"i{j:07d}" for j in range(size // 10)]
    return ranker_pb2.RankRequest(user_id="u", candidate_item_ids=ids).SerializeToString() + b"\x0a\x02\xff\xfe"


def start_ranker(tmp_path, retriever_address: str, artifacts) -> tuple[object, str, object]:
    log = tmp_path / "ranker.log"
    proc = launch_service([str(BIN / "ranker-svc"), "serve", "--port", "0", "--retriever", retriever_address,
                           "--artifacts", str(artifacts), "--dtype", "float32", "--num-threads", "1"], log)
    return proc, await_ready(proc, "ranker listening on ", log), log


async def flood(address: str, payload: bytes, stop: asyncio.Event, codes: list) -> None:
    """Malformed requests back to back until ``stop``; each call's status lands in ``codes``."""
    options = [("grpc.max_send_message_length", 8 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary(RANK_METHOD, request_serializer=bytes, response_deserializer=bytes)
        while not stop.is_set():
            try:
                await call(payload, timeout=60)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                if exc.code() == grpc.StatusCode.UNAVAILABLE:  # the server is gone: nothing more to learn
                    return


async def stream_round(stub, stack) -> tuple[int, grpc.StatusCode]:
    """(responses read, final status) of one RankStream of STREAM_REQUESTS requests whose client
    reads nothing until the deadline has passed: the server's writes wait on flow control, its
    response generator suspended at ``yield`` when the deadline ends the call (the crash's state)."""
    async def requests():
        for n in range(STREAM_REQUESTS):
            yield rank_request(stack, n, candidates=STREAM_CANDIDATES)

    received = 0
    try:
        call = stub.RankStream(requests(), timeout=STREAM_DEADLINE_S)
        await call.wait_for_connection()
        with contextlib.suppress(asyncio.TimeoutError):  # a slow reader: the call's own deadline ends it
            await asyncio.wait_for(call.code(), STREAM_DEADLINE_S + 5)
        async for _ in call:
            received += 1
        return received, grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return received, exc.code()


async def five_ranks(stub, stack) -> list[grpc.StatusCode]:
    codes = []
    for n in range(5):
        try:
            await stub.Rank(rank_request(stack, n), timeout=60)
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
    return codes


async def test_malformed_flood_beside_streams_and_ranks_leaves_the_ranker_serving(
        request, tmp_path, stack_artifacts, retriever_process):
    proc, address, log = await asyncio.to_thread(start_ranker, tmp_path, retriever_process.address,
                                                 stack_artifacts.artifacts)
    payload = malformed_rank()
    stop, flood_codes = asyncio.Event(), []
    with recording(request.node.nodeid, "malformed flood + RankStream + Rank", area="faults") as row:
        try:
            async with grpc.aio.insecure_channel(address, options=SLOW_READER) as channel:
                stub = ranker_pb2_grpc.RankerStub(channel)
                floods = [asyncio.ensure_future(flood(address, payload, stop, flood_codes)) for _ in range(FLOODERS)]
                ranks = asyncio.ensure_future(five_ranks(stub, stack_artifacts))
                rounds = []
                for number in range(STREAM_ROUNDS):
                    rounds.append(await stream_round(stub, stack_artifacts))
                    assert proc.poll() is None, (f"ranker-svc died (status {proc.returncode}) in stream round "
                                                 f"{number}; its log ends: {log.read_text()[-4000:]}")
                rank_codes = await ranks
                stop.set()
                await asyncio.gather(*floods)
                assert proc.poll() is None, f"ranker-svc died: {log.read_text()[-4000:]}"
                health = health_pb2_grpc.HealthStub(channel)
                status = (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)).status
                after = await stub.Rank(rank_request(stack_artifacts, 1), timeout=30)
        finally:
            code = stop_service(proc)
        assert flood_codes and set(flood_codes) == {grpc.StatusCode.INVALID_ARGUMENT}, set(flood_codes)
        ended_by_deadline = sum(c == grpc.StatusCode.DEADLINE_EXCEEDED for _, c in rounds)
        assert ended_by_deadline > 0, rounds  # the race needs streams cut off mid-way
        assert all(c in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED) for _, c in rounds), rounds
        assert all(c in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED) for c in rank_codes), rank_codes
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert len(after.scores) == len(rank_request(stack_artifacts, 1).candidate_item_ids)
        assert code == 0
        row.sent = len(flood_codes) + len(rank_codes) + sum(n for n, _ in rounds) + 1
        row.refused = len(flood_codes)
        row.measured = (f"{len(flood_codes)} malformed ~4 MiB Ranks from {FLOODERS} clients, all INVALID_ARGUMENT, "
                        f"beside {STREAM_ROUNDS} RankStreams ({ended_by_deadline} cut by their {STREAM_DEADLINE_S} s "
                        f"deadline) and 5 Ranks ({rank_codes.count(grpc.StatusCode.OK)} OK): ranker alive, SERVING, "
                        "a well-formed Rank answered after; exit 0 on SIGTERM")


async def test_health_checks_and_a_fourth_clients_ranks_answer_during_a_malformed_flood(
        request, tmp_path, stack_artifacts, retriever_process):
    proc, address, log = await asyncio.to_thread(start_ranker, tmp_path, retriever_process.address,
                                                 stack_artifacts.artifacts)
    payload = malformed_rank()
    stop, flood_codes = asyncio.Event(), []
    health_s: list[float] = []
    health_failed: list[str] = []
    ranks: list[tuple[grpc.StatusCode, float]] = []

    async def check_health(stub, until: float) -> None:
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service="exitrank.v1.Ranker"),
                                         timeout=HEALTH_DEADLINE_S)
                health_s.append(time.perf_counter() - started)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    health_failed.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.aio.AioRpcError as exc:
                health_failed.append(exc.code().name)
            await asyncio.sleep(0.1)

    async def rank_all_along(stub, until: float) -> None:
        n = 0
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                await stub.Rank(rank_request(stack_artifacts, n), timeout=10)
                ranks.append((grpc.StatusCode.OK, time.perf_counter() - started))
            except grpc.aio.AioRpcError as exc:
                ranks.append((exc.code(), time.perf_counter() - started))
            n += 1

    with recording(request.node.nodeid, "malformed flood", area="faults") as row:
        try:
            async with grpc.aio.insecure_channel(address) as health_channel, \
                    grpc.aio.insecure_channel(address) as rank_channel:
                ranker = ranker_pb2_grpc.RankerStub(rank_channel)
                await ranker.Rank(rank_request(stack_artifacts, 0), timeout=60)  # warm: titles cached
                floods = [asyncio.ensure_future(flood(address, payload, stop, flood_codes)) for _ in range(FLOODERS)]
                while len(flood_codes) < FLOODERS:  # every flooder has been answered: the flood is on
                    await asyncio.sleep(0.01)
                before = len(flood_codes)
                until = time.monotonic() + FLOOD_S
                await asyncio.gather(check_health(health_pb2_grpc.HealthStub(health_channel), until),
                                     rank_all_along(ranker, until))
                during = len(flood_codes) - before
                stop.set()
                await asyncio.gather(*floods)
        finally:
            code = stop_service(proc)
        assert set(flood_codes) == {grpc.StatusCode.INVALID_ARGUMENT}, set(flood_codes)
        assert during >= FLOODERS * FLOOD_S, during  # the flood went on all along (>= one a second each)
        assert health_s and not health_failed, (health_failed, len(health_s))
        assert ranks and all(c == grpc.StatusCode.OK for c, _ in ranks), ranks
        assert code == 0
        rank_s = [s for _, s in ranks]
        row.sent = len(flood_codes) + len(health_s) + len(ranks)
        row.refused = len(flood_codes)
        row.measured = (f"ranker-svc process, {FLOODERS} clients sending malformed ~4 MiB Ranks without pause "
                        f"({during} in {FLOOD_S:g} s, all INVALID_ARGUMENT): {len(health_s)}/{len(health_s)} health "
                        f"checks with a {HEALTH_DEADLINE_S} s deadline SERVING (p50 {quantile(health_s, 0.5) * 1e3:.0f} "
                        f"ms, max {max(health_s) * 1e3:.0f} ms); a fourth client's {len(ranks)} Ranks all OK (p50 "
                        f"{quantile(rank_s, 0.5) * 1e3:.0f} ms, max {max(rank_s) * 1e3:.0f} ms); issue 17's main: 25/25 "
                        "health checks failed")


@pytest.mark.parametrize("service", ["retriever", "ranker"])
def test_a_fatal_signal_leaves_every_threads_python_stack_in_the_log(service, tmp_path, stack_artifacts,
                                                                      retriever_process):
    log = tmp_path / f"{service}.log"
    if service == "retriever":
        argv = [str(BIN / "retriever-svc"), "serve", "--port", "0", "--artifacts", str(stack_artifacts.artifacts),
                "--data-dir", str(tmp_path / "crash-data")]  # not retriever_process's data dir
    else:
        argv = [str(BIN / "ranker-svc"), "serve", "--port", "0", "--retriever", retriever_process.address,
                "--artifacts", str(stack_artifacts.artifacts), "--dtype", "float32", "--num-threads", "1"]
    proc = launch_service(argv, log)
    await_ready(proc, f"{service} listening on ", log)
    children = [int(c) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                for c in (task / "children").read_text().split()]  # the retriever's redis-server
    proc.send_signal(signal.SIGSEGV)  # what a native fault raises in the process
    try:
        assert proc.wait(30) == -signal.SIGSEGV
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text, text[-2000:]
    assert f"{service}_svc/server.py" in text and "in main" in text, text[-3000:]
