"""RedisStore against a real redis-server: idempotent histories, catalog, versions, the stream."""

from __future__ import annotations

import numpy as np
import pytest

from retriever_svc.errors import StoreUnavailable
from retriever_svc.records import CatalogItem, Interaction
from retriever_svc.store import RedisStore

pytestmark = pytest.mark.anyio

EVENTS = [
    Interaction("alice", "book-1", 4.0, 1_000),
    Interaction("alice", "book-2", 5.0, 2_000),
    Interaction("bob", "book-1", 3.0, 1_500),
    Interaction("alice", "book-1", 2.0, 500),  # older than the first: must not win
    Interaction("bob", "book-3", 1.0, 1_500),
    Interaction("bob", "book-3", 2.5, 1_500),  # same time, higher rating: wins
]


async def _state(store: RedisStore, users: list[str]) -> dict:
    out = {}
    for user in users:
        hist = await store.client.zrange(store.keys.hist(user), 0, -1, withscores=True)
        ratings = await store.client.hgetall(store.keys.rating(user))
        out[user] = (hist, ratings)
    return out


async def test_apply_is_idempotent_and_order_independent(store: RedisStore, redis_url: str):
    touched = await store.apply_events(EVENTS)
    # 5 of the 6 events change a history (alice's older book-1 does not): each counted once
    assert touched == {"alice": (["book-1", "book-2"], 2), "bob": (["book-1", "book-3"], 3)}
    once = await _state(store, ["alice", "bob"])
    assert await store.apply_events(EVENTS) == {}  # every event a second time: nothing changed, no user
    assert await _state(store, ["alice", "bob"]) == once
    assert await store.user_items(["alice", "bob"]) == touched  # the change counts did not move
    other = RedisStore.from_url(redis_url, prefix="reversed")
    try:
        await other.apply_events(EVENTS[::-1])
        assert await _state(other, ["alice", "bob"]) == once
    finally:
        await other.close()
    assert set(await store.all_users()) == {"alice", "bob"}


async def test_histories_newest_last_with_ratings(store: RedisStore):
    await store.apply_events(EVENTS)
    alice, bob, nobody = await store.histories(["alice", "bob", "nobody"], max_history=5)
    assert alice == [("book-1", 1_000, 4.0), ("book-2", 2_000, 5.0)]
    assert bob == [("book-1", 1_500, 3.0), ("book-3", 1_500, 2.5)]
    assert nobody == []
    (latest,) = await store.histories(["alice"], max_history=1)
    assert latest == [("book-2", 2_000, 5.0)]


async def test_ids_with_braces_colons_and_unicode(store: RedisStore):
    odd = Interaction("}{u:1}", "ít{em}:x", 1.0, 7)
    assert await store.apply_events([odd]) == {"}{u:1}": (["ít{em}:x"], 1)}
    assert await store.histories(["}{u:1}"], 3) == [[("ít{em}:x", 7, 1.0)]]


async def test_scripts_reload_after_script_flush(store: RedisStore):
    await store.apply_events(EVENTS[:1])
    await store.client.script_flush()
    await store.apply_events(EVENTS[1:2])
    assert len((await store.histories(["alice"], 10))[0]) == 2


async def test_catalog_round_trip_is_json(store: RedisStore):
    items = [CatalogItem("b1", "Dune — Frank Herbert", {"genre": "sf", "year": "1965"}),
             CatalogItem("b2", "Emma", {})]
    await store.put_items(items)
    got = await store.get_items(["b2", "missing", "b1"])
    assert got == [items[1], None, items[0]]
    raw = await store.client.get(store.keys.item("b1"))
    assert raw.startswith(b"{") and "Dune" in raw.decode()


async def test_versions_round_trip_and_old_ones_are_dropped(store: RedisStore, clustered):
    first, _ = clustered(seed=1)
    await store.write_version(first)
    assert await store.version_complete(first.version)
    assert await store.set_current(first.version, keep=2) == []
    loaded = await store.load_version(first.version)
    order = [loaded.user_ids.index(u) for u in first.user_ids]
    np.testing.assert_array_equal(loaded.user[order], first.user)
    np.testing.assert_array_equal(loaded.item_foldin, first.item_foldin)
    assert loaded.item_ids == first.item_ids
    versions = [first]
    for seed in (2, 3):
        emb, _ = clustered(seed=seed)
        await store.write_version(emb)
        dropped = await store.set_current(emb.version, keep=2)
        versions.append(emb)
    assert dropped == [first.version]
    assert await store.current_version() == versions[-1].version
    assert not await store.version_complete(first.version)
    user = first.user_ids[0]
    assert await store.user_vector(user, first.version) is None
    np.testing.assert_array_equal(
        await store.user_vector(user, versions[-1].version), versions[-1].user[0])


async def test_stream_append_read_ack(store: RedisStore):
    await store.streams.ensure_group()
    await store.streams.ensure_group()  # idempotent
    ids = await store.streams.append_events(EVENTS[:3])
    assert len(ids) == 3 and await store.client.xlen(store.keys.stream) == 3
    entries = await store.streams.read_events("c1", count=10, block_ms=10)
    assert [entry_id for entry_id, _ in entries] == ids
    assert await store.streams.pending_count() == 3
    assert await store.streams.ack(ids[:2]) == 2
    assert await store.streams.pending_count() == 1
    assert await store.streams.trim_acknowledged() == 2  # the pending one stays
    assert await store.client.xlen(store.keys.stream) == 1


async def test_unreachable_redis_is_store_unavailable(tmp_path):
    dead = RedisStore.from_url(f"unix://{tmp_path}/no.sock", timeout_s=0.5)
    try:
        with pytest.raises(StoreUnavailable, match="ping"):
            await dead.ping()
        with pytest.raises(StoreUnavailable):
            await dead.streams.append_events(EVENTS[:1])
    finally:
        await dead.close()


async def test_import_histories_and_updates_stream(store: RedisStore):
    rows = [("carol", [("book-1", 10, 5.0), ("book-2", 20, 1.0)]), ("dave", []),
            ("erin", [("book-3", 5, 2.0)])]
    assert await store.import_histories(iter(rows)) == 3
    carol, dave, erin = await store.histories(["carol", "dave", "erin"], max_history=10)
    assert carol == [("book-1", 10, 5.0), ("book-2", 20, 1.0)] and dave == []
    assert erin == [("book-3", 5, 2.0)] and set(await store.all_users()) == {"carol", "erin"}
    start = await store.streams.updates_tail()  # nothing announced yet: Redis's clock less a margin
    assert start.endswith("-0") and int(start[:-2]) > 1e12 and await store.streams.updates_kept_since(start)
    await store.client.zadd(store.keys.versions, {"v1": 1})  # a kept version (fold-ins into others are undone)
    vectors = [("carol", np.ones(4, np.float32), 0), ("erin", np.zeros(4, np.float32), 7)]
    written = await store.put_fold_ins("v1", vectors, announce_as="replica-a")
    assert written == [True, False]  # erin's history is at change 0 (imported), not 7: not written
    (entry_id, version, origin, users), = await store.streams.read_updates(start, count=10, block_ms=None)
    assert (version, origin, users) == ("v1", "replica-a", ["carol", "erin"])
    assert await store.streams.updates_tail() == entry_id
    assert await store.streams.read_updates(entry_id, count=10, block_ms=None) == []
    got = await store.user_vectors(["carol", "erin"], "v1")
    np.testing.assert_array_equal(got[0], np.ones(4))
    assert got[1] is None
    assert await store.streams.updates_kept_since(entry_id)
    assert not await store.streams.updates_kept_since("0-0")  # older than the retention: maybe trimmed
