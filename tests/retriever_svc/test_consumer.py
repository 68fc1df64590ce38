"""StreamConsumer on a real redis-server: ack only after the writes, crash re-claim, idempotence."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from exitrank.redis_server import EmbeddedRedis
from retriever_svc.config import IndexConfig, RedisConfig
from retriever_svc.consumer import StreamConsumer
from retriever_svc.errors import StoreUnavailable
from retriever_svc.index import Retriever
from retriever_svc.records import Interaction
from retriever_svc.store import RedisStore

pytestmark = pytest.mark.anyio
CONFIG = RedisConfig(consumer="c-test", block_ms=50, claim_idle_ms=60_000)
NEW = [Interaction("newbie", "c1i0", 1.0, 10), Interaction("newbie", "c1i2", 1.0, 20),
       Interaction("newbie", "brand-new-item", 1.0, 30)]


async def _published(store: RedisStore, clustered) -> tuple[Retriever, object]:
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
    emb, _ = clustered()
    await retriever.load_embeddings(emb)
    await store.streams.ensure_group()
    return retriever, emb


async def _user_state(store: RedisStore, user: str, version: str) -> tuple:
    hist = await store.client.zrange(store.keys.hist(user), 0, -1, withscores=True)
    return hist, await store.client.hgetall(store.keys.rating(user)), await store.user_vector(user, version)


async def test_step_writes_history_and_embedding_then_acks(store, clustered):
    retriever, emb = await _published(store, clustered)
    await store.streams.append_events(NEW)
    consumer = StreamConsumer(retriever=retriever, store=store, config=CONFIG)
    assert await consumer.step() == 3
    assert await store.streams.pending_count() == 0
    assert await store.histories(["newbie"], 10) == [[("c1i0", 10, 1.0), ("c1i2", 20, 1.0),
                                                     ("brand-new-item", 30, 1.0)]]
    vector = await store.user_vector("newbie", emb.version)
    rows = [emb.item_ids.index("c1i0"), emb.item_ids.index("c1i2")]  # the unknown item is skipped
    np.testing.assert_allclose(vector, emb.item_foldin[rows].sum(0) / np.sqrt(2), rtol=1e-6)
    neighbors = (await retriever.nearest_users("newbie", 3)).neighbors
    assert all(user.startswith("c1") for user, _ in neighbors)


async def test_crash_between_read_and_ack_is_reclaimed(store, clustered):
    retriever, emb = await _published(store, clustered)
    await store.streams.append_events(NEW)
    crashed = await store.streams.read_events(CONFIG.consumer, count=10, block_ms=10)  # never acked
    assert len(crashed) == 3 and await store.streams.pending_count() == 3
    # the crashed reader had applied the first event before dying: applying again changes nothing
    await retriever.apply_events(NEW[:1])
    consumer = StreamConsumer(retriever=retriever, store=store, config=CONFIG)
    task = consumer.start()  # restarted under its name: re-reads its own pending entries
    for _ in range(100):
        if await store.streams.pending_count() == 0:
            break
        await asyncio.sleep(0.05)
    await consumer.stop()
    assert task.done() and consumer.applied == 3 and await store.streams.pending_count() == 0
    state = await _user_state(store, "newbie", emb.version)
    assert len(state[0]) == 3 and state[2] is not None
    await retriever.apply_events(NEW)  # a duplicate delivery of the whole batch
    after = await _user_state(store, "newbie", emb.version)
    assert after[:2] == state[:2]
    np.testing.assert_array_equal(after[2], state[2])


async def test_crash_between_history_and_fold_in_is_folded_in_on_recovery(store, clustered):
    retriever, emb = await _published(store, clustered)
    await store.streams.append_events(NEW)
    assert len(await store.streams.read_events(CONFIG.consumer, count=10, block_ms=10)) == 3
    await store.apply_events(NEW)  # the first delivery wrote the histories, then died before the fold-in
    assert await store.user_vector("newbie", emb.version) is None
    consumer = StreamConsumer(retriever=retriever, store=store, config=CONFIG)
    assert await consumer.recover() == 3 and await store.streams.pending_count() == 0
    rows = [emb.item_ids.index("c1i0"), emb.item_ids.index("c1i2")]
    np.testing.assert_allclose(await store.user_vector("newbie", emb.version),
                               emb.item_foldin[rows].sum(0) / np.sqrt(2), rtol=1e-6)
    neighbors = (await retriever.nearest_users("newbie", 3)).neighbors  # and in the FAISS index
    assert all(user.startswith("c1") for user, _ in neighbors)


async def test_peers_in_flight_entries_are_left_until_idle(store, clustered):
    retriever, _ = await _published(store, clustered)
    await store.streams.append_events(NEW)
    assert len(await store.streams.read_events("peer", count=10, block_ms=10)) == 3  # a live peer's
    patient = StreamConsumer(retriever=retriever, store=store, config=CONFIG)
    assert await patient.recover() == 0 and await patient.reclaim(min_idle_ms=60_000) == 0
    assert await store.streams.pending_count() == 3  # not taken: the peer may still be applying them
    await asyncio.sleep(0.06)
    eager = StreamConsumer(retriever=retriever, store=store,
                           config=RedisConfig(consumer="c-other", block_ms=50, claim_idle_ms=50))
    task = eager.start()  # at start it claims entries idle longer than claim_idle_ms
    for _ in range(100):
        if await store.streams.pending_count() == 0:
            break
        await asyncio.sleep(0.02)
    await eager.stop()
    assert task.done() and eager.applied == 3 and await store.streams.pending_count() == 0


async def test_malformed_entries_are_acked_and_dropped(store, clustered):
    retriever, _ = await _published(store, clustered)
    await store.client.xadd(store.keys.stream, {"u": "x"})  # no item
    await store.client.xadd(store.keys.stream, {"u": "x", "i": "y", "r": "nan", "t": "1"})
    await store.streams.append_events(NEW[:1])
    consumer = StreamConsumer(retriever=retriever, store=store, config=CONFIG)
    assert await consumer.step() == 3
    assert await store.streams.pending_count() == 0
    assert await store.all_users() == ["newbie"]


async def test_redis_crash_mid_batch_loses_nothing(tmp_path, clustered):
    server = EmbeddedRedis(tmp_path / "r").start()
    store = RedisStore.from_url(server.url, timeout_s=1.0)
    try:
        retriever, emb = await _published(store, clustered)
        await store.streams.append_events(NEW)
        entries = await store.streams.read_events("c-test", count=10, block_ms=10)
        server.kill()  # SIGKILL: only the fsynced AOF survives
        with pytest.raises(StoreUnavailable):
            await retriever.apply_events([e for e in NEW])
        server = EmbeddedRedis(tmp_path / "r", password=server.password).start()
        assert len(entries) == 3 and await store.streams.pending_count() == 3  # nothing was acked
        consumer = StreamConsumer(retriever=retriever, store=store, config=CONFIG)
        assert await consumer.reclaim(min_idle_ms=0) == 3
        assert await store.streams.pending_count() == 0
        assert await store.user_vector("newbie", emb.version) is not None
    finally:
        await store.close()
        server.stop()
