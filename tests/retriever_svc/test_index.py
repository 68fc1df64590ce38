"""The Retriever core on a real redis-server: publish, fold-in, versions, contexts, validation."""

from __future__ import annotations

import numpy as np
import pytest

from retriever_svc.config import IndexConfig
from retriever_svc.errors import InvalidArgument, UnknownUser
from retriever_svc.index import Retriever
from retriever_svc.records import CatalogItem, Interaction

pytestmark = pytest.mark.anyio


@pytest.fixture
async def published(store, clustered):
    retriever = Retriever(store=store, config=IndexConfig(kind="exact", keep_versions=2))
    emb, history = clustered()
    await retriever.upsert_items([CatalogItem(i, f"Title of {i}") for i in emb.item_ids])
    await retriever.apply_events([  # histories of the fitted users, before the fit is published
        Interaction(u, i, 4.0, 100 + j) for u, items in history.items() for j, i in enumerate(items)
    ])
    await retriever.load_embeddings(emb)
    return retriever, emb, history


async def test_nearest_users_equal_brute_force(published, brute_force):
    retriever, emb, _ = published
    for user in ("c0u0", "c2u5"):
        answer = await retriever.nearest_users(user, 5)
        query = emb.user[emb.user_ids.index(user)]
        want = brute_force(emb.user_ids, emb.user, query, 5, user)
        # users with the same items tie: compare the scores, and each returned user's own cosine
        np.testing.assert_allclose([s for _, s in answer.neighbors], [s for _, s in want], atol=1e-5)
        exact = dict(brute_force(emb.user_ids, emb.user, query, len(emb.user_ids), user))
        assert all(abs(exact[u] - s) < 1e-5 for u, s in answer.neighbors)
        assert answer.embedding_version == emb.version
        assert all(u[:2] == user[:2] for u, _ in answer.neighbors)


async def test_fold_in_of_a_fitted_user_reproduces_its_embedding(published):
    retriever, emb, history = published
    await retriever.apply_events([Interaction("c0u0", history["c0u0"][0], 5.0, 1)])  # older: no-op
    got = await retriever.store.user_vector("c0u0", emb.version)
    np.testing.assert_allclose(got, emb.user[0], rtol=1e-5, atol=1e-6)


async def test_get_context_histories_titles_and_neighbours(published):
    retriever, emb, history = published
    ctx = await retriever.get_context("c1u2", k=3, max_history=2)
    assert ctx.user_id == "c1u2" and ctx.embedding_version == emb.version
    assert [h.item_id for h in ctx.history] == history["c1u2"][-2:]  # newest 2, oldest first
    assert all(h.title == f"Title of {h.item_id}" and h.rating == 4.0 for h in ctx.history)
    assert len(ctx.neighbors) == 3 and all(n.user_id.startswith("c1") for n in ctx.neighbors)
    assert [n.score for n in ctx.neighbors] == sorted((n.score for n in ctx.neighbors), reverse=True)
    for n in ctx.neighbors:
        assert [h.item_id for h in n.history] == history[n.user_id][-2:]
    alone = await retriever.get_context("c1u2", k=0, max_history=200)
    assert alone.neighbors == () and len(alone.history) == 3


async def test_user_with_history_but_no_embedding(published):
    retriever, _, _ = published
    await retriever.apply_events([Interaction("stranger", "unknown-item", 1.0, 5)])
    ctx = await retriever.get_context("stranger", k=4, max_history=10)
    assert ctx.neighbors == () and ctx.embedding_version == ""
    assert [(h.item_id, h.title) for h in ctx.history] == [("unknown-item", "")]
    with pytest.raises(UnknownUser, match="none of its ingested interactions"):
        await retriever.nearest_users("stranger", 3)
    with pytest.raises(UnknownUser, match="knows nothing|no interactions"):
        await retriever.get_context("ghost", k=1, max_history=1)


async def test_new_version_is_swapped_in_whole_and_refolds_new_users(published, clustered, store):
    retriever, first, _ = published
    await retriever.apply_events([Interaction("late", "c2i1", 1.0, 9), Interaction("late", "c2i3", 1.0, 9)])
    assert (await retriever.nearest_users("late", 1)).embedding_version == first.version
    second, _ = clustered(seed=7)
    await retriever.load_embeddings(second)
    answer = await retriever.nearest_users("late", 3)
    assert answer.embedding_version == second.version == retriever.embedding_version
    assert all(u.startswith("c2") for u, _ in answer.neighbors)
    assert await store.user_vector("late", second.version) is not None
    assert await store.current_version() == second.version
    # a restarted process restores the current version, folded-in users included
    restarted = Retriever(store=store, config=IndexConfig(kind="exact"))
    assert await restarted.restore() == second.version
    again = await restarted.nearest_users("late", 3)
    np.testing.assert_allclose([s for _, s in again.neighbors], [s for _, s in answer.neighbors],
                               atol=1e-6)


async def test_validation_names_the_field_and_stores_nothing(published, store):
    retriever, _, _ = published
    for call, field in [
        (retriever.nearest_users("c0u0", 0), "k"),
        (retriever.nearest_users("", 3), "user_id"),
        (retriever.nearest_users("x" * 129, 3), "user_id"),
        (retriever.get_context("c0u0", 101, 5), "k"),
        (retriever.get_context("c0u0", 1, 0), "max_history"),
        (retriever.get_context("bad\x00id", 1, 5), "user_id"),
        (retriever.get_items(["ok", ""]), "item_ids[1]"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            await call
        assert info.value.field == field
    before = await store.client.xlen(store.keys.stream)
    result = await retriever.ingest([Interaction("a", "i", float("nan"), 1),
                                     Interaction("a", "i", 1.0, -1), Interaction("a", "i", 1.0, 1)])
    assert (result.accepted, result.rejected) == (1, 2)
    assert result.errors == ("interaction 0: rating must be finite, got nan",
                             "interaction 1: timestamp_ms must be in 0..9007199254740992 (ms since the epoch), got -1")
    assert await store.client.xlen(store.keys.stream) == before + 1
    items = await retriever.upsert_items([CatalogItem("z", "")], first_index=4)
    assert items.rejected == 1 and items.errors[0].startswith("item 4: title")
    assert (await retriever.get_items(["z"])) == ([], ["z"])


async def test_get_context_is_one_round_trip_once_titles_are_cached(published, store):
    retriever, emb, _ = published
    await retriever.get_context("c0u1", k=4, max_history=15)  # fills the title cache
    before = store.round_trips
    ctx = await retriever.get_context("c2u2", k=4, max_history=15)
    assert store.round_trips - before == 1 and len(ctx.neighbors) == 4


async def test_index_cache_is_reused_and_replays_later_fold_ins(store, clustered, tmp_path):
    config = IndexConfig(kind="hnsw", cache_dir=tmp_path, hnsw_m=8, ef_construction=20)
    first = Retriever(store=store, config=config, replica="a")
    emb, _ = clustered()
    await first.load_embeddings(emb)
    cached = tmp_path / "xr" / f"{emb.version}.faiss"
    written = cached.stat().st_mtime_ns
    await first.apply_events([Interaction("c0u0", "c2i0", 1.0, 5),  # moves c0u0 towards c2
                              Interaction("c0u0", "c2i1", 1.0, 6)])
    moved = first._snapshot.users.get("c0u0")
    second = Retriever(store=store, config=config, replica="b")
    assert await second.restore() == emb.version
    assert cached.stat().st_mtime_ns == written  # loaded, not rebuilt
    np.testing.assert_allclose(second._snapshot.users.get("c0u0"), moved, atol=1e-6)  # replayed
    assert await second.nearest_users("c0u0", 3) == await first.nearest_users("c0u0", 3)
