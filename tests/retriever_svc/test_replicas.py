"""Replicas on one Redis: one consumer group applies each event once, every replica learns the
others' fold-ins, and a version published by the trainer is swapped in atomically under load."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from retriever_svc.config import IndexConfig, RedisConfig
from retriever_svc.consumer import StreamConsumer
from retriever_svc.index import Retriever
from retriever_svc.records import Interaction
from retriever_svc.replicas import ReplicaFollower
from retriever_svc.store import RedisStore
from trainer.publishing import publish_gcn

pytestmark = pytest.mark.anyio
INDEX = IndexConfig(kind="exact", version_poll_s=0.05)


class Replica:
    """One replica's real parts: store, core, consumer and follower."""

    def __init__(self, url: str, prefix: str, name: str) -> None:
        self.store = RedisStore.from_url(url, prefix=prefix, timeout_s=2.0)
        self.core = Retriever(store=self.store, config=INDEX, replica=name)
        redis_config = RedisConfig(consumer=name, block_ms=20, read_count=7)
        self.consumer = StreamConsumer(retriever=self.core, store=self.store, config=redis_config)
        self.follower = ReplicaFollower(retriever=self.core, store=self.store, redis=redis_config,
                                        index=INDEX)

    def start(self) -> None:
        self.consumer.start()
        self.follower.start()

    async def close(self) -> None:
        await self.consumer.stop()
        await self.follower.stop()
        await self.store.close()


async def _until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def replicas(redis_url, unique_prefix, clustered):
    prefix = unique_prefix("rep")
    a, b = Replica(redis_url, prefix, "a"), Replica(redis_url, prefix, "b")
    emb, _ = clustered()
    await a.core.load_embeddings(emb)
    assert await b.core.restore() == emb.version
    await a.store.streams.ensure_group()
    yield a, b, emb
    await a.close()
    await b.close()


async def test_each_event_applied_once_and_replicas_learn_each_others_fold_ins(replicas):
    a, b, emb = replicas
    events = [Interaction(f"new{u}", f"c{u % 3}i{j}", 1.0, 100 * u + j)
              for u in range(30) for j in range(3)]
    a.start()
    b.start()
    for chunk in range(0, len(events), 9):  # in bursts, so both consumers get some
        await a.core.ingest(events[chunk : chunk + 9])
        await asyncio.sleep(0.03)

    async def settled() -> bool:
        done = await a.store.streams.pending_count() == 0 and a.consumer.applied + b.consumer.applied == 90
        return done and all(f"new{u}" in r.core._snapshot.users for u in range(30) for r in (a, b))

    await _until(settled)
    assert a.consumer.applied > 0 and b.consumer.applied > 0  # shared, each entry applied once
    assert a.follower.remote_updates > 0 and b.follower.remote_updates > 0
    for u in range(30):
        stored = await a.store.user_vector(f"new{u}", emb.version)
        rows = [emb.item_ids.index(f"c{u % 3}i{j}") for j in range(3)]
        np.testing.assert_allclose(stored, emb.item_foldin[rows].sum(0) / np.sqrt(3), rtol=1e-6)
        answers = [await r.core.nearest_users(f"new{u}", 5) for r in (a, b)]
        # the same index content: equal scores (users with equal items tie in any order)
        np.testing.assert_allclose([s for _, s in answers[0].neighbors],
                                   [s for _, s in answers[1].neighbors], atol=1e-6)
        assert all(n.startswith(f"c{u % 3}") or n.startswith("new") for n, _ in answers[0].neighbors)


async def test_concurrent_fold_ins_of_one_user_keep_the_larger_history(replicas):
    a, b, emb = replicas
    # b read the user's history before a's event landed, then writes late: it must not win
    await a.core.apply_events([Interaction("race", "c0i0", 1.0, 1)])
    stale = (await b.store.user_items(["race"]))["race"]
    await a.core.apply_events([Interaction("race", "c0i1", 1.0, 2)])
    snap = b.core._snapshot
    written = await b.store.put_fold_ins(emb.version, [("race", snap.fold_in(stale.items), stale.seq)])
    assert written == [False]
    rows = [emb.item_ids.index("c0i0"), emb.item_ids.index("c0i1")]
    np.testing.assert_allclose(await a.store.user_vector("race", emb.version),
                               emb.item_foldin[rows].sum(0) / np.sqrt(2), rtol=1e-6)


async def test_published_version_is_swapped_in_whole_under_load(replicas, clustered, brute_force,
                                                                 redis_url):
    a, b, first = replicas
    second, _ = clustered(seed=7)  # same user ids, other vectors
    by_version = {e.version: e for e in (first, second)}
    a.start()
    b.start()
    answers: list = []
    stop = asyncio.Event()

    async def load(replica: Replica, user: str) -> None:
        while not stop.is_set():
            answers.append((user, await replica.core.nearest_users(user, 4)))
            ctx = await replica.core.get_context(user, k=4, max_history=3)
            answers.append((user, ctx))
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(load(r, u)) for r in (a, b) for u in ("c0u0", "c1u3", "c2u5")]
    await asyncio.sleep(0.1)
    version = await asyncio.to_thread(publish_gcn, second, redis_url=redis_url,
                                      prefix=a.store.keys.prefix)
    assert version == second.version
    await _until(lambda: _both_on(a, b, second.version))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*tasks)
    seen = {answer.embedding_version for _, answer in answers}
    assert seen == {first.version, second.version}
    for user, answer in answers:  # every answer is entirely one version's
        emb = by_version[answer.embedding_version]
        want = brute_force(emb.user_ids, emb.user, emb.user[emb.user_ids.index(user)], 4, user)
        got = [(n.user_id, n.score) for n in answer.neighbors] if hasattr(answer, "history") \
            else list(answer.neighbors)
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
    assert await a.store.current_version() == second.version


async def _both_on(a: Replica, b: Replica, version: str) -> bool:
    return a.core.embedding_version == version == b.core.embedding_version


async def test_fold_ins_made_just_before_a_new_version_reach_every_replica(replicas, clustered,
                                                                          redis_url):
    a, b, _ = replicas
    second, _ = clustered(seed=7)
    # b folds a new interaction of c0u0 (its first in Redis) into the current version only...
    await b.core.apply_events([Interaction("c0u0", "c2i4", 1.0, 10**9)])
    # ...then the trainer publishes a fit that knew nothing of it
    await asyncio.to_thread(publish_gcn, second, redis_url=redis_url, prefix=a.store.keys.prefix)
    tail = await a.store.streams.updates_tail()
    assert await a.core.follow_current() and await b.core.follow_current()
    assert a.core.embedding_version == b.core.embedding_version == second.version
    fresh = second.item_foldin[second.item_ids.index("c2i4")]  # its Redis history: one item
    assert not np.allclose(second.user[second.user_ids.index("c0u0")], fresh)  # the fit's differs
    # b re-folded its user into the new version and announced it; a copies it from Redis
    await a.follower.step(tail)
    np.testing.assert_allclose(await a.store.user_vector("c0u0", second.version), fresh, rtol=1e-5)
    for replica in (a, b):
        got = replica.core._snapshot.users.get("c0u0")
        np.testing.assert_allclose(got, fresh / np.linalg.norm(fresh), atol=1e-6)
