"""Issue 13's hostile mix against real processes: while three clients flood ``ranker-svc`` with ~4 MiB
``Rank`` requests that are valid protobuf but for one string of invalid UTF-8, one client calls ``Rank``
five times and another opens ``RankStream`` s of 300 requests whose deadline passes mid-stream. On the
main of that issue the ranker died with SIGSEGV (no traceback): the telemetry interceptor's ``finally``
read ``context.peer()`` of a stream whose generator grpc had left open past the call's end
(``exitrank.server_streams``). Now it survives every round, stays SERVING and answers a well-formed
``Rank`` afterwards; ``faulthandler`` is on, so a native crash would leave the Python stacks in its log.

And that ``faulthandler`` is on in both services: a fatal signal leaves every thread's Python stack
in the service's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.reliability import recording
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from tests.conftest import await_ready, launch_service, stop_service
from tests.faults.conftest import BIN, rank_request

pytestmark = pytest.mark.anyio

FLOODERS = 3
STREAM_ROUNDS = 4  # main of issue 13 died in the first or second round in every try here
STREAM_REQUESTS = 300
STREAM_CANDIDATES = 24  # responses of ~0.5 KB: a few fill the slow reader's flow-control window
STREAM_DEADLINE_S = 10.0  # passes mid-stream: the flood keeps the ranker's event loop busy
# the stream client's HTTP/2 window: small, so the server's writes wait for a reader that never comes
SLOW_READER = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
RANK_METHOD = "/exitrank.v1.Ranker/Rank"


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


@pytest.mark.parametrize("service", ["retriever", "ranker"])
def test_a_fatal_signal_leaves_every_threads_python_stack_in_the_log(service, tmp_path, stack_artifacts,
                                                                      retriever_process):
    log = tmp_path / f"{service}.log"
    if service == "retriever":
        argv = [str(BIN / "retriever-svc"), "serve", "--port", "0", "--artifacts", str(stack_artifacts.artifacts),
                "--data-dir", str(tmp_path / "data")]
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
