"""OfflineContexts: serving-equivalent contexts (self never a neighbour, bounded histories, titles)."""

from __future__ import annotations

import asyncio
import json
import uuid

import numpy as np
import pytest

from ranker_svc.collab import COLLAB_HISTORY
from retriever_svc.config import IndexConfig
from retriever_svc.embeddings import GCNEmbeddings
from retriever_svc.index import Retriever
from retriever_svc.records import Interaction
from retriever_svc.store import RedisStore
from trainer.context import OfflineContexts, subsample
from trainer.data.dataset import graph_interactions, load_dataset
from trainer.data.synth import SynthConfig, synth


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth(root, SynthConfig(users=120, items=200, groups=4, seed=0, max_interactions=40))
    groups = {r["user_id"]: r["group"] for r in map(json.loads, (root / "users.jsonl").read_text().splitlines())}
    return load_dataset(root), groups


def _group_embeddings(ds, groups, drop: set[str] = frozenset()) -> GCNEmbeddings:
    """Embeddings whose geometry is the taste group (a one-hot plus small noise)."""
    names = sorted(set(groups.values()))
    users = sorted(u for u in groups if u not in drop)
    rng = np.random.default_rng(0)
    user = np.eye(len(names), dtype=np.float32)[[names.index(groups[u]) for u in users]]
    user = user + 0.05 * rng.standard_normal(user.shape).astype(np.float32)
    items = sorted(ds.titles)
    return GCNEmbeddings(user_ids=users, item_ids=items, user=user,
                         item=rng.standard_normal((len(items), len(names))).astype(np.float32), version="gcn-test")


def test_neighbours_are_similar_users_never_self(data):
    ds, groups = data
    contexts = OfflineContexts(ds, _group_embeddings(ds, groups), k=4, max_history=15)
    examples = contexts.examples("test", retrieval=True)
    assert examples and len(examples) == len(ds.split("test"))
    graph = {(x.user_id, x.item_id, x.timestamp_ms) for x in graph_interactions(ds)}
    for ex in examples:
        ctx = ex.context
        assert len(ctx.neighbors) == 4 and ctx.embedding_version == "gcn-test"
        assert all(n.user_id != ctx.user_id for n in ctx.neighbors)
        assert all(groups[n.user_id] == groups[ctx.user_id] for n in ctx.neighbors)
        scores = [n.score for n in ctx.neighbors]
        assert scores == sorted(scores, reverse=True) and scores[0] <= 1.0 + 1e-5
        for n in ctx.neighbors:
            assert 0 < len(n.history) <= 15
            assert all((n.user_id, h.item_id, h.timestamp_ms) in graph for h in n.history)
            assert [h.timestamp_ms for h in n.history] == sorted(h.timestamp_ms for h in n.history)
            assert all(h.title == ds.titles[h.item_id] for h in n.history)
        assert ex.title == ds.titles[ex.item_id]


def test_histories_are_bounded_and_resolved(data):
    ds, groups = data
    contexts = OfflineContexts(ds, _group_embeddings(ds, groups), k=2, max_history=5)
    for sample, ex in zip(ds.split("train"), contexts.examples("train", retrieval=True)):
        assert [h.item_id for h in ex.context.history] == [e.item_id for e in sample.history][-5:]
        assert all(h.title == ds.titles[h.item_id] for h in ex.context.history)
        assert all(len(n.history) <= 5 for n in ex.context.neighbors) and len(ex.context.neighbors) == 2
        assert ex.label == sample.label and ex.item_id == sample.item_id


def test_no_retrieval_and_users_without_embeddings(data):
    ds, groups = data
    test_users = {s.user_id for s in ds.split("test")}
    contexts = OfflineContexts(ds, _group_embeddings(ds, groups, drop=test_users), k=4)
    assert all(ex.context.neighbors == () for ex in contexts.examples("test", retrieval=True))
    assert all(ex.context.neighbors for ex in contexts.examples("valid", retrieval=True))
    plain = contexts.examples("valid", retrieval=False)
    assert all(ex.context.neighbors == () and ex.context.history for ex in plain)
    assert all(ex.context.neighbors == () for ex in OfflineContexts(ds, None).examples("valid", retrieval=True))


def test_subsample_is_seeded_and_ordered(data):
    ds, _ = data
    train = ds.split("train")
    a, b = subsample(train, 50, seed=1), subsample(train, 50, seed=1)
    assert a == b and len(a) == 50 and a != subsample(train, 50, seed=2)
    positions = [train.index(s) for s in a]
    assert positions == sorted(positions)


def test_uncached_contexts_equal_cached_ones(data):
    ds, groups = data
    gcn = _group_embeddings(ds, groups)
    cached = OfflineContexts(ds, gcn, k=3).examples("valid", retrieval=True)
    fresh = OfflineContexts(ds, gcn, k=3, cache=False)
    assert fresh.examples("valid", retrieval=True) == cached and fresh._neighbors == {}


def _served_user_vectors(redis_url: str, emb: GCNEmbeddings, histories: dict[str, list]) -> dict[str, np.ndarray]:
    """What the retriever's GetContext answers as each user's vector once its events are ingested."""
    async def serve() -> dict[str, np.ndarray]:
        store = RedisStore.from_url(redis_url, prefix=f"foldin-{uuid.uuid4().hex[:8]}", timeout_s=5.0)
        try:
            retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
            await retriever.load_embeddings(emb)
            await retriever.apply_events([Interaction(u, e.item_id, e.rating, e.timestamp_ms)
                                          for u, events in histories.items() for e in events])
            return {u: (await retriever.get_context(u, k=0, max_history=COLLAB_HISTORY, embedding_version=""))
                    .user_embedding for u in histories}
        finally:
            async for key in store.client.scan_iter(match=f"{store.keys.prefix}:*"):
                await store.client.delete(key)
            await store.close()
    return asyncio.run(serve())


def test_training_and_serving_fold_in_the_same_user_vector(data, redis_url):
    """The trainer's examples carry exactly the user vector the retriever serves for the same history:
    one fold-in (retriever_svc.embeddings.fold_in) on both paths, so training and serving cannot drift."""
    ds, groups = data
    emb = _group_embeddings(ds, groups)
    emb.item_foldin = np.random.default_rng(1).standard_normal(emb.item.shape).astype(np.float32)
    offline = OfflineContexts(ds, None, vectors=emb)
    samples = {}
    for sample in ds.split("test"):  # one sample a user, histories of distinct items (Redis keeps one row an item)
        recent = sample.history[-COLLAB_HISTORY:]
        if len(recent) > 1 and len({e.item_id for e in recent}) == len(recent):
            samples.setdefault(sample.user_id, sample)
    assert len(samples) >= 5
    served = _served_user_vectors(redis_url, emb, {u: s.history[-COLLAB_HISTORY:] for u, s in samples.items()})
    for user, sample in samples.items():
        trained = offline.context(sample).user_embedding
        assert trained is not None and served[user] is not None
        assert trained.dtype == served[user].dtype
        np.testing.assert_array_equal(trained, served[user])
