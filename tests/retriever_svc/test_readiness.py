"""Readiness and the stream consumer when Redis refuses writes (``maxmemory`` reached), on a real
redis-server: health reasons, a consumer that keeps retrying, and a backlog drained once the limit
is lifted."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from retriever_svc.config import IndexConfig, RedisConfig
from retriever_svc.consumer import StreamConsumer
from retriever_svc.errors import StoreUnavailable
from retriever_svc.index import Retriever
from retriever_svc.readiness import Readiness
from retriever_svc.records import Interaction
from tests.support.reliability import recording

pytestmark = pytest.mark.anyio


async def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_a_failing_consumer_turns_readiness_off_only_after_the_stall_time(store):
    consumer = SimpleNamespace(failing_since=None, last_error="")
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
    patient = Readiness(retriever=retriever, store=store, consumer=consumer, stall_s=5.0)
    assert await patient.check() == (True, "ready")
    consumer.failing_since, consumer.last_error = time.monotonic(), "redis apply_events failed"
    assert await patient.check() == (True, "ready")  # a blip shorter than stall_s: still serving
    consumer.failing_since -= 6
    ready, reason = await patient.check()
    assert not ready and "the stream consumer fails (redis apply_events failed)" in reason


async def test_maxmemory_reached_events_wait_health_off_then_drained_once_lifted(request, store):
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
    consumer = StreamConsumer(retriever=retriever, store=store,
                              config=RedisConfig(consumer="c1", block_ms=20, claim_idle_ms=60_000))
    readiness = Readiness(retriever=retriever, store=store, consumer=consumer, stall_s=0.2)
    await store.streams.ensure_group()
    events = [Interaction(f"u{j % 10}", f"i{j}", 1.0, 1000 + j) for j in range(200)]
    assert (await retriever.ingest(events)).accepted == 200
    limit = (await store.client.config_get("maxmemory"))["maxmemory"]
    with recording(request.node.nodeid, "Redis maxmemory", area="faults") as row:
        await store.client.config_set("maxmemory", "1")  # noeviction: every write is refused (OOM)
        try:
            consumer.start()
            await _wait_for(lambda: consumer.failures >= 3)  # retried with backoff, never stopped
            await readiness.check()  # the probe write is refused: its stall starts now
            await asyncio.sleep(0.25)
            ready, reason = await readiness.check()
            assert not ready and "Redis refuses writes" in reason, reason
            assert await store.client.zcard(store.keys.hist("u0")) == 0 and consumer.applied == 0
            assert sum(await store.streams.stream_backlog()) == 200  # lag + pending: all 200 wait
            with pytest.raises(StoreUnavailable):  # Ingest: UNAVAILABLE, nothing acknowledged
                await retriever.ingest([Interaction("late", "i0", 1.0, 5000)])
            failures = consumer.failures
        finally:
            await store.client.config_set("maxmemory", limit)
        try:
            await _wait_for(lambda: consumer.applied == 200)
        finally:
            await consumer.stop()
        assert consumer.failing_since is None and await readiness.check() == (True, "ready")
        assert await store.streams.stream_backlog() == (0, 0)  # the lag metric's source drained to 0
        assert sum([await store.client.zcard(store.keys.hist(f"u{j}")) for j in range(10)]) == 200
        assert await store.client.zcard(store.keys.hist("late")) == 0  # the refused Ingest stored nothing
        row.sent, row.refused = 200, 0
        row.measured = (f"200 events ingested, then Redis maxmemory=1 (noeviction): the consumer failed {failures} "
                        "times (OOM) and kept retrying with backoff, readiness NOT_SERVING ('Redis refuses writes'), an Ingest UNAVAILABLE; "
                        "limit lifted: all 200 applied (200 history entries), readiness SERVING, nothing lost")
