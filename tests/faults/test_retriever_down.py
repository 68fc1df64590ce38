"""The retriever hangs (SIGSTOP), is killed and comes back while the ranker is under load: Rank keeps
answering within its deadline without neighbours, the circuit breaker makes a dead retriever cost no
waiting, uncached titles give a clear UNAVAILABLE, and retrieval comes back by itself."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from tests.support.reliability import recording
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_svc.server import start_server
from tests.faults.conftest import Load, quantile, rank_request, ranker_config

pytestmark = pytest.mark.anyio
TIMEOUT_S = 0.5  # the ranker's per-call retriever timeout


async def _until_retrieval(load: Load, since: float, timeout: float = 15.0) -> float:
    """Seconds from ``since`` until a Rank started after it used retrieval again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = [r.started for r in load.since(since) if r.retrieval_used]
        if used:
            return min(used) - since
        await asyncio.sleep(0.05)
    raise AssertionError("retrieval never came back")


def _phase(load: Load, start: float, end: float) -> dict:
    results = load.since(start, end)
    return {"calls": len(results), "errors": sum(r.code != grpc.StatusCode.OK for r in results),
            "with_retrieval": sum(r.retrieval_used for r in results),
            "p50": quantile([r.seconds for r in results], 0.5), "p95": quantile([r.seconds for r in results], 0.95)}


async def test_rank_survives_a_hung_and_a_dead_retriever_and_recovers(request, stack_artifacts, retriever_process):
    running = await start_server(ranker_config(stack_artifacts.artifacts, retriever_process.address, timeout_s=TIMEOUT_S))
    breaker = running.client.breaker
    uncached = next(i for i in sorted(stack_artifacts.titles) if i.startswith("dull"))  # in no history
    with recording(request.node.nodeid, "retriever down", area="faults") as row:
        try:
            async with Load(f"127.0.0.1:{running.port}", lambda n: rank_request(stack_artifacts, n)) as load:
                warmed = await _until_retrieval(load, 0.0)  # the first retrieval: past the channel's first connect
                await asyncio.sleep(1.5)
                paused = time.monotonic()
                retriever_process.signal(signal.SIGSTOP)  # hung: calls time out
                await asyncio.sleep(3.0)
                resumed = time.monotonic()
                retriever_process.signal(signal.SIGCONT)
                after_resume = await _until_retrieval(load, resumed)
                killed = time.monotonic()
                await asyncio.to_thread(retriever_process.kill)  # dead: connection refused
                await asyncio.sleep(2.0)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await ranker_pb2_grpc.RankerStub(channel).Rank(ranker_pb2.RankRequest(
                            user_id="g0u0", candidate_item_ids=[uncached]), timeout=2)
                restarted = time.monotonic()
                await asyncio.to_thread(retriever_process.start)
                ready = time.monotonic()
                after_restart = await _until_retrieval(load, ready)
                await asyncio.sleep(1.0)
                end = time.monotonic()
            # warm: calls begun more than one retriever timeout before the SIGSTOP (a call begun just before it
            # meets the stopped retriever and rightly falls back; that edge made this test flaky)
            warm, hung = _phase(load, warmed, paused - TIMEOUT_S), _phase(load, paused + 1.0, resumed)
            dead, back = _phase(load, killed + 0.5, restarted), _phase(load, ready + after_restart + 0.3, end)
            assert all(r.code == grpc.StatusCode.OK for r in load.results), {r.details for r in load.results}
            assert warm["with_retrieval"] == warm["calls"] > 0, ("warm", warm)
            assert back["with_retrieval"] == back["calls"] > 0, ("back", back)
            assert hung["with_retrieval"] == 0 and dead["with_retrieval"] == 0 and hung["calls"] and dead["calls"]
            assert hung["p50"] < TIMEOUT_S / 2 and dead["p95"] < TIMEOUT_S  # open: no waiting for the retriever
            assert breaker.opened >= 2 and breaker.skipped > 0
            assert after_resume < 1.0 + 2 * TIMEOUT_S + 1.0  # one cool-down, a probe, slack
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "circuit open" in info.value.details()
            assert "not cached" in info.value.details()
        finally:
            await running.stop(None)
        row.sent, row.refused = len(load.results) + 1, sum(r.code != grpc.StatusCode.OK for r in load.results)
        row.measured = (
            f"4 Rank workers against a real retriever-svc: {len(load.results)} Ranks, 0 errors, every one within its "
            f"2 s deadline; retriever SIGSTOPped 3 s: {hung['calls']} Ranks without neighbours, p50 "
            f"{hung['p50'] * 1e3:.0f} ms / p95 {hung['p95'] * 1e3:.0f} ms (retriever timeout {TIMEOUT_S * 1e3:.0f} ms); "
            f"SIGKILLed: {dead['calls']} Ranks, p95 {dead['p95'] * 1e3:.0f} ms; breaker opened {breaker.opened}x "
            f"(3 failures, 1 s cool-down), {breaker.skipped} retriever calls skipped; an uncached title -> UNAVAILABLE "
            f"'circuit open'; retrieval back {after_resume:.2f}s after SIGCONT and {after_restart:.2f}s after the "
            f"restarted retriever was ready")
