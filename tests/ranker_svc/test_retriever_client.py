"""RetrieverClient against a real grpc.aio ``exitrank.v1.Retriever`` server on loopback."""

from __future__ import annotations

import time

import pytest

from ranker_svc.config import RetrieverConfig
from ranker_svc.errors import ContextUnavailable
from ranker_svc.retriever_client import CircuitBreaker, RetrieverClient, TitleCache

pytestmark = pytest.mark.anyio


async def test_context_is_converted_and_bounded(retriever, examples):
    _, target = retriever
    client = RetrieverClient(config=RetrieverConfig(target=target))
    try:
        expected = examples[3].context
        ctx = await client.get_context(expected.user_id, 1, 1)
        assert ctx.user_id == expected.user_id and ctx.embedding_version == "emb-1"
        assert ctx.history == expected.history[-1:]  # max_history=1: the most recent only
        assert len(ctx.neighbors) == 1 and ctx.neighbors[0].user_id == expected.neighbors[0].user_id
        assert ctx.neighbors[0].history == expected.neighbors[0].history
        assert ctx.neighbors[0].score == pytest.approx(expected.neighbors[0].score)
        assert await client.get_context("stranger", 4, 10) is None  # NOT_FOUND -> None
    finally:
        await client.close()


async def test_titles_are_fetched_once_and_missing_ids_left_out(retriever, catalog):
    servicer, target = retriever
    client = RetrieverClient(config=RetrieverConfig(target=target))
    try:
        ids = sorted(catalog)[:4]
        calls = servicer.get_items_calls
        titles = await client.get_titles([*ids, "ghost"])
        assert titles == {i: catalog[i] for i in ids}
        assert servicer.get_items_calls == calls + 1
        assert await client.get_titles(ids) == titles
        assert servicer.get_items_calls == calls + 1  # served from the cache
        await client.get_titles(["ghost"])
        assert servicer.get_items_calls == calls + 2  # unknown ids are not cached
    finally:
        await client.close()


async def test_unreachable_retriever(retriever, catalog):
    _, target = retriever
    warm = RetrieverClient(config=RetrieverConfig(target=target))
    cached = sorted(catalog)[:2]
    await warm.get_titles(cached)
    # the same client over a dead channel: context degrades to None, cached titles still serve
    dead = RetrieverClient(config=RetrieverConfig(target="127.0.0.1:1", timeout_s=0.3))
    dead.titles = warm.titles
    await warm.close()
    try:
        assert await dead.get_context("u0", 2, 5) is None
        assert await dead.get_titles(cached) == {i: catalog[i] for i in cached}
        with pytest.raises(ContextUnavailable, match="UNAVAILABLE|DEADLINE_EXCEEDED"):
            await dead.get_titles([sorted(catalog)[5]])
    finally:
        await dead.close()


async def test_slow_retriever_times_out_to_no_context(retriever, examples):
    servicer, target = retriever
    client = RetrieverClient(config=RetrieverConfig(target=target, timeout_s=0.05))
    servicer.delay_s = 0.3
    try:
        assert await client.get_context(examples[0].context.user_id, 2, 5) is None
    finally:
        servicer.delay_s = 0.0
        await client.close()


def test_title_cache_is_a_bounded_lru_whose_titles_last_until_the_catalog_changes():
    cache = TitleCache(capacity=2)
    cache.observe(3)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C")
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C" and len(cache) == 2
    cache.observe(4)  # an UpsertItems somewhere: every title is re-read when the retriever answers
    assert cache.get("a") is None and cache.get("a", stale_ok=True) == "A"  # ... and kept while it cannot
    cache.put("a", "A2")
    assert cache.get("a") == "A2" and cache.get("c") is None
    cache.put("d", "")  # empty titles are never cached
    assert cache.get("d") is None and cache.get("d", stale_ok=True) is None


def test_client_needs_a_target():
    with pytest.raises(ValueError, match="retriever.target"):
        RetrieverClient(config=RetrieverConfig(target=""))


def test_circuit_breaker_opens_skips_probes_once_and_closes():
    now = [0.0]
    breaker = CircuitBreaker(failures=3, cooldown_s=2.0, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.success()  # an answer resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "open" and breaker.opened == 1 and breaker.retry_in() == 2.0
    assert not breaker.allow() and breaker.skipped == 1
    now[0] = 2.0
    assert breaker.allow() and breaker.state == "half_open"  # the probe
    assert not breaker.allow()  # one probe at a time
    breaker.failure()  # the probe failed: open for another cool-down
    assert breaker.state == "open" and not breaker.allow() and breaker.retry_in() == 2.0
    now[0] = 4.5
    assert breaker.allow()
    breaker.release()  # the probe's caller gave up: the next call probes
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.consecutive == 0 and breaker.allow()
    off = CircuitBreaker(failures=0, cooldown_s=1.0, clock=lambda: now[0])
    for _ in range(10):
        off.failure()
    assert off.state == "closed" and off.allow()


async def test_open_breaker_skips_a_dead_retriever_at_once(retriever, catalog):
    _, target = retriever
    warm = RetrieverClient(config=RetrieverConfig(target=target))
    cached = sorted(catalog)[:2]
    await warm.get_titles(cached)
    dead = RetrieverClient(config=RetrieverConfig(target="127.0.0.1:1", timeout_s=0.3, breaker_failures=2,
                                                  breaker_cooldown_s=30.0))
    dead.titles = warm.titles
    await warm.close()
    try:
        for _ in range(2):
            assert await dead.get_context("u0", 2, 5) is None
        assert dead.breaker.state == "open"
        started = time.monotonic()
        assert await dead.get_context("u0", 2, 5) is None
        assert await dead.get_titles(cached) == {i: catalog[i] for i in cached}  # the cache still serves
        with pytest.raises(ContextUnavailable, match="circuit open .* next probe in"):
            await dead.get_titles([sorted(catalog)[5]])
        assert time.monotonic() - started < 0.05 and dead.breaker.skipped == 2
    finally:
        await dead.close()
