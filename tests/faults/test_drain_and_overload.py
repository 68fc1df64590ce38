"""SIGTERM under load drains the calls in flight and refuses new ones with UNAVAILABLE; beyond
``batching.max_pending_requests`` the ranker refuses at once with RESOURCE_EXHAUSTED and its queue
never grows past the bound. Real ``ranker-svc``/``retriever-svc`` processes, real gRPC."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from tests.support.reliability import recording
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_svc.server import start_server
from tests.conftest import await_ready, launch_service
from tests.faults.conftest import BIN, quantile, ranker_config

pytestmark = pytest.mark.anyio
RANK_METHOD = "/exitrank.v1.Ranker/Rank"
STALLED = 4  # calls the server has received but cannot begin: their request message is held back


def _request(stack, n: int, candidates: int) -> ranker_pb2.RankRequest:
    users, items = sorted(stack.histories), sorted(stack.titles)
    return ranker_pb2.RankRequest(user_id=users[n % len(users)], candidate_item_ids=items[:candidates])


async def _timed(call) -> tuple[grpc.StatusCode, float, float, str]:
    """(status, seconds, finish time, details) of one call."""
    started, details = time.monotonic(), ""
    try:
        await call
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details()
    return code, time.monotonic() - started, time.monotonic(), details


def _stalled_rank(channel: grpc.aio.Channel, message: ranker_pb2.RankRequest, release: asyncio.Event):
    """A unary Rank sent as a client stream whose one message waits for ``release``: the server receives
    the call (its headers) at once, but begins it only when the message arrives (grpc.aio reads a unary
    request before it calls the handler), so until then it is received and not begun."""
    async def held():
        await release.wait()
        yield message

    call = channel.stream_unary(RANK_METHOD, request_serializer=ranker_pb2.RankRequest.SerializeToString,
                                response_deserializer=ranker_pb2.RankResponse.FromString)
    return call(held(), timeout=60)


async def _first_refusal(stub, message, timeout_s: float = 20.0) -> int:
    """Ranks ``message`` until one is refused UNAVAILABLE (the drain has begun); how many were sent."""
    deadline, sent = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        code, _, _, _ = await _timed(stub.Rank(message, timeout=5))
        sent += 1
        if code == grpc.StatusCode.UNAVAILABLE:
            return sent
    raise AssertionError(f"no Rank refused within {timeout_s}s of SIGTERM")


async def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(request, tmp_path, stack_artifacts,
                                                                     retriever_process):
    config = tmp_path / "ranker.yaml"
    config.write_text("server: {grace_s: 30}\nbatching: {max_batch_rows: 64}\n")
    log = tmp_path / "ranker.log"
    proc = launch_service([str(BIN / "ranker-svc"), "serve", "--port", "0", "--retriever", retriever_process.address,
                           "--artifacts", str(stack_artifacts.artifacts), "--dtype", "float32", "--num-threads", "1",
                           "--config", str(config)], log)
    address = await asyncio.to_thread(await_ready, proc, "ranker listening on ", log)
    in_flight = 48
    with recording(request.node.nodeid, "SIGTERM drain", area="faults") as row:
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = ranker_pb2_grpc.RankerStub(channel)
                await stub.Rank(_request(stack_artifacts, 0, 24), timeout=30)  # warm: titles cached
                release = asyncio.Event()
                stalled = []
                for n in range(STALLED):  # received, never begun: on this channel before the in-flight ones
                    call = _stalled_rank(channel, _request(stack_artifacts, n, 2), release)
                    await call.wait_for_connection()
                    stalled.append(asyncio.ensure_future(_timed(call)))
                requests = [_request(stack_artifacts, n, 24) for n in range(in_flight)]
                calls = [asyncio.ensure_future(_timed(stub.Rank(r, timeout=60))) for r in requests]
                # the first answer: the server works through the others, queued behind the model (and,
                # HTTP/2 frames being read in order, it has read the stalled calls' headers sent before)
                await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
                signalled = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                probes = await _first_refusal(stub, _request(stack_artifacts, 1, 2))  # the drain has begun
                late = [await _timed(stub.Rank(_request(stack_artifacts, 1, 2), timeout=5)) for _ in range(3)]
                async with grpc.aio.insecure_channel(address) as fresh:  # a new connection
                    late.append(await _timed(ranker_pb2_grpc.RankerStub(fresh).Rank(
                        _request(stack_artifacts, 1, 2), timeout=5)))
                release.set()  # the stalled calls' messages arrive: now they begin, while draining
                not_begun = await asyncio.gather(*stalled)
                drained = await asyncio.gather(*calls)
            exit_status = await asyncio.to_thread(proc.wait, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
        ok = [finished for code, _, finished, _ in drained if code == grpc.StatusCode.OK]
        after_signal = sum(finished > signalled for finished in ok)
        refused = [details for code, _, _, details in drained if code != grpc.StatusCode.OK]
        # begun calls finish; calls gRPC had received but the server had not begun are refused like
        # new ones, UNAVAILABLE (retryable), never CANCELLED: the stalled ones always, and any of the
        # in-flight ones the server had not begun when the drain started
        assert all("shutting down" in details for details in refused), refused
        assert len(not_begun) == STALLED and all(
            code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details for code, _, _, details in not_begun
        ), not_begun
        assert ok and after_signal > 0  # the drain really had work in flight
        assert [code for code, _, _, _ in late] == [grpc.StatusCode.UNAVAILABLE] * 4
        assert exit_status == 0
        row.sent = in_flight + STALLED + probes + len(late)
        row.refused = len(late) + 1 + STALLED + in_flight - len(ok)
        row.measured = (f"ranker-svc process, SIGTERM once the first of {in_flight} concurrent Ranks (24 candidates) "
                        f"was answered: the {len(ok)} the server had begun answered OK ({after_signal} after the "
                        f"signal, the last {max(ok) - signalled:.2f}s after it; grace 30 s), the {len(refused)} it had "
                        f"received but not begun and {STALLED} received calls whose request arrived only during the "
                        f"drain refused UNAVAILABLE 'shutting down' (0 CANCELLED); once a Rank was refused "
                        f"({probes} sent after the signal), 4/4 more (3 on the open channel, 1 on a new one) refused "
                        f"UNAVAILABLE; exit 0")


async def test_overload_is_refused_at_once_and_the_queue_stays_bounded(request, stack_artifacts, retriever_process):
    bound = 4
    running = await start_server(ranker_config(stack_artifacts.artifacts, retriever_process.address, timeout_s=2.0,
                                               max_pending_requests=bound, max_wait_ms=5.0))
    batcher = running.ranker.batcher
    peak, sampling = 0, True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, batcher.pending)
            await asyncio.sleep(0.001)

    with recording(request.node.nodeid, "overload", area="faults") as row:
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = ranker_pb2_grpc.RankerStub(channel)
                await stub.Rank(_request(stack_artifacts, 0, 32), timeout=30)  # warm: titles cached
                sampler = asyncio.ensure_future(sample())
                results = []
                for wave in range(3):  # 64 concurrent calls per wave, 16x the bound
                    results += await asyncio.gather(*(_timed(stub.Rank(_request(stack_artifacts, n, 32), timeout=30))
                                                      for n in range(64)))
                sampling = False
                await sampler
                after = await stub.Rank(_request(stack_artifacts, 1, 4), timeout=30)
        finally:
            await running.stop(None)
        served = [s for code, s, _, _ in results if code == grpc.StatusCode.OK]
        refused = [s for code, s, _, _ in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(served) + len(refused) == len(results) and served and refused
        assert peak <= bound and len(after.scores) == 4
        assert quantile(refused, 0.5) < quantile(served, 0.5) / 2  # refused at once, never queued for the model
        row.sent, row.refused = len(results), len(refused)
        row.measured = (f"in-process ranker, batching.max_pending_requests={bound}: 3 waves of 64 concurrent Ranks "
                        f"(32 candidates): {len(served)} served (p50 {quantile(served, 0.5) * 1e3:.0f} ms), "
                        f"{len(refused)} RESOURCE_EXHAUSTED (p95 {quantile(refused, 0.95) * 1e3:.1f} ms); queue peak "
                        f"{peak} <= {bound} (sampled every ms); a Rank after the load served")
