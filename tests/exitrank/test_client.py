"""``exitrank.client`` against real ``retriever-svc`` and ``ranker-svc`` processes (the ``live_stack`` fixture).

Retries are exercised against real sockets: a port nobody listens on, and a real gRPC health server
that only starts after the client's first attempts have failed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from exitrank.client import (
    DeadlineExceeded,
    ExitPolicy,
    Interaction,
    InvalidRequest,
    Item,
    NotFound,
    RankerClient,
    RankResult,
    RetrieverClient,
    RetryPolicy,
    ScoredItem,
    Unavailable,
)
from exitrank.client.aio import AsyncRankerClient, AsyncRetrieverClient

DEPTH = 6  # decoder layers of the tiny preset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)
    return value


def test_rank_returns_typed_scores_in_request_order(live_stack):
    items = sorted(live_stack.titles)[:5]
    with RankerClient(live_stack.ranker, timeout=30) as ranker:
        assert ranker.health() == "SERVING"
        result = ranker.rank("g0u0", items)
        again = ranker.rank("g0u0", items, exit_policy=ExitPolicy(disabled=True), num_neighbors=2)
        sure = ranker.rank("g0u0", items, exit_policy=ExitPolicy(criterion="probability_delta", confidence=0.51))
    assert isinstance(result, RankResult) and all(isinstance(s, ScoredItem) for s in result.scores)
    assert [s.item_id for s in result.scores] == items
    assert all(0.0 < s.ctr < 1.0 and 1 <= s.exit_layer <= DEPTH for s in result.scores)
    assert result.retrieval_used and result.embedding_version == "stack-1" and result.model_version
    assert len({round(s.ctr, 6) for s in result.scores}) > 1  # a real model, not constants
    assert [s.exit_layer for s in again.scores] == [DEPTH] * len(items)  # no early exit when disabled
    assert {s.exit_layer for s in sure.scores} == {1}  # a confidence exit of 0.51 always holds at the first head


def test_refusals_raise_typed_errors_after_one_attempt(live_stack):
    with RankerClient(live_stack.ranker, timeout=30, retries=5) as ranker:
        with pytest.raises(InvalidRequest) as empty:
            ranker.rank("g0u0", [])
        with pytest.raises(NotFound) as unknown:
            ranker.rank("g0u0", ["sunny-garden", "no-such-item"])
        with pytest.raises(InvalidRequest, match="threshold|exit_policy"):
            ranker.rank("g0u0", ["sunny-garden"], exit_policy=ExitPolicy(threshold=7.0))
        with pytest.raises(TypeError):
            ranker.rank("g0u0", "sunny-garden")
    assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT and empty.value.attempts == 1
    assert "candidate_item_ids" in empty.value.message and empty.value.method == "exitrank.v1.Ranker/Rank"
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND and unknown.value.attempts == 1
    assert "no-such-item" in unknown.value.message


def test_every_call_has_a_deadline(live_stack):
    with RankerClient(live_stack.ranker, timeout=1e-4, retries=3) as ranker:
        with pytest.raises(DeadlineExceeded) as info:
            ranker.rank("g0u0", sorted(live_stack.titles)[:20])
        assert info.value.attempts == 1  # DEADLINE_EXCEEDED is never retried
        # a per-call timeout replaces the client's default
        assert len(ranker.rank("g0u0", ["sunny-garden"], timeout=30).scores) == 1


def test_unavailable_is_retried_with_backoff_within_the_deadline():
    target = f"127.0.0.1:{_free_port()}"  # nothing listens there
    policy = RetryPolicy(retries=4, initial_backoff_s=0.02, max_backoff_s=0.05)
    with RankerClient(target, timeout=5, retry_policy=policy) as ranker:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            ranker.rank("u", ["i"])
        assert info.value.attempts == 5 and info.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2
    slow = RetryPolicy(retries=50, initial_backoff_s=0.2, max_backoff_s=0.2)
    with RetrieverClient(target, timeout=0.5, retry_policy=slow) as retriever:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            retriever.nearest_users("u", 3)
        assert time.monotonic() - started < 0.75  # no retry starts that would outlast the 0.5 s deadline
        assert 2 <= info.value.attempts < 50


def test_retries_reach_a_server_that_comes_up_late():
    port = _free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("exitrank.v1.Ranker", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    starter = threading.Timer(0.4, server.start)
    policy = RetryPolicy(retries=100, initial_backoff_s=0.05, max_backoff_s=0.1)
    try:
        with RankerClient(f"127.0.0.1:{port}", timeout=10, retry_policy=policy) as ranker:
            started = time.monotonic()
            starter.start()
            assert ranker.health() == "SERVING"
            assert time.monotonic() - started >= 0.35  # it only answered once the server was up
    finally:
        starter.cancel()
        server.stop(None)


def test_tls_credentials_are_used_for_the_channel(live_stack):
    # the services speak plaintext: a TLS handshake against them cannot succeed
    with RankerClient(live_stack.ranker, timeout=2, retries=1,
                      credentials=grpc.ssl_channel_credentials()) as ranker:
        with pytest.raises(Unavailable):
            ranker.rank("g0u0", ["sunny-garden"])


def test_retriever_ingest_items_context_and_neighbours(live_stack):
    nouns = ("river", "castle", "story")
    events = (Interaction("fresh-user", f"golden-{n}", 4.0, 5000 + k) for k, n in enumerate(nouns))
    with RetrieverClient(live_stack.retriever, timeout=10) as retriever:
        summary = retriever.ingest(events, batch_size=2)  # two client streams
        assert (summary.accepted, summary.rejected) == (3, 0)
        bad = retriever.ingest([Interaction("fresh-user", "", 1.0)])
        assert bad.rejected == 1 and "item_id" in bad.errors[0]
        context = _wait_for(lambda: (c := retriever.get_context("fresh-user", k=3)) and len(c.history) == 3 and c)
        assert [h.item_id for h in context.history] == ["golden-river", "golden-castle", "golden-story"]
        assert context.history[0].title == "The golden river" and context.history[0].rating == 4.0
        near = retriever.nearest_users("fresh-user", 3)
        assert near.embedding_version == "stack-1" and len(near.neighbors) == 3
        assert all(n.user_id.startswith("g1") for n in near.neighbors)  # golden is group 1
        assert near.neighbors[0].score >= near.neighbors[-1].score
        with pytest.raises(NotFound):
            retriever.nearest_users("nobody-at-all", 3)
        stored = retriever.upsert_items([Item("new-item", "A new item", {"brand": "acme"})])
        assert stored.accepted == 1
        found = retriever.get_items(["new-item", "missing-item"])
        assert found.items[0].attributes == {"brand": "acme"} and found.missing_item_ids == ("missing-item",)


def test_async_clients_match_the_sync_ones(live_stack):
    items = sorted(live_stack.titles)[4:8]
    with RankerClient(live_stack.ranker, timeout=30) as ranker:
        want = ranker.rank("g2u1", items)

    async def events():
        for n in ("garden", "river"):
            yield Interaction("async-user", f"bright-{n}", 1.0, 7000)

    async def run():
        async with AsyncRankerClient(live_stack.ranker, timeout=30) as ranker:
            got = await ranker.rank("g2u1", items)
            with pytest.raises(InvalidRequest):
                await ranker.rank("g2u1", [])
        async with AsyncRetrieverClient(live_stack.retriever, timeout=10) as retriever:
            summary = await retriever.ingest(events(), batch_size=1)
            assert await retriever.health() == "SERVING"
        return got, summary

    got, summary = asyncio.run(run())
    assert [s.item_id for s in got.scores] == items
    assert [s.ctr for s in got.scores] == pytest.approx([s.ctr for s in want.scores], abs=1e-4)
    assert summary.accepted == 2


def test_retry_policy_only_retries_unavailable():
    import random

    policy = RetryPolicy(retries=2, initial_backoff_s=0.1, max_backoff_s=0.3, rng=random.Random(0))
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND):
        assert policy.next_delay(code, 1, 10.0) is None
    delays = [policy.next_delay(grpc.StatusCode.UNAVAILABLE, a, 10.0) for a in (1, 2)]
    assert 0 <= delays[0] <= 0.1 and 0 <= delays[1] <= 0.2
    assert policy.next_delay(grpc.StatusCode.UNAVAILABLE, 3, 10.0) is None  # retries used up
    assert policy.next_delay(grpc.StatusCode.UNAVAILABLE, 1, 0.0) is None  # the deadline has passed
    assert [policy.backoff_cap(k) for k in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError, match="initial_backoff_s"):
        RetryPolicy(initial_backoff_s=3, max_backoff_s=1)
    with pytest.raises(ValueError, match="timeout"):
        RankerClient("127.0.0.1:1", timeout=0)


def test_shell_front_end_probes_and_ranks(live_stack):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "exitrank.client", *args], capture_output=True, text=True,
                              timeout=60)

    serving = run("health", live_stack.retriever, "--service", "exitrank.v1.Retriever")
    assert serving.returncode == 0 and serving.stdout.strip() == "SERVING"
    assert run("health", live_stack.ranker, "--service", "no.such.Service").returncode == 1
    down = run("health", f"127.0.0.1:{_free_port()}", "--timeout", "0.5")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
    ranked = run("rank", live_stack.ranker, "--user", "g1u0", "--items", "golden-river,dull-story,sunny-castle")
    assert ranked.returncode == 0, ranked.stderr
    ctrs = [s["ctr"] for s in json.loads(ranked.stdout)["scores"]]
    assert len(ctrs) == 3 and ctrs == sorted(ctrs, reverse=True)
