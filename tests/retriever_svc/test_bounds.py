"""Every store of the retriever has a bound, and each test drives past it on a real redis-server.

Histories keep their newest ``history_per_user`` items; the users' set, the catalog and the ingest
stream refuse what is beyond ``max_users``, ``max_items`` and ``max_stream_backlog``; attribute maps are
bounded per item; vectors of a dropped embedding version leave no key behind, not even when a lagging
replica folds users into that version after it was dropped; the index cache keeps only the kept
versions; an event applied again re-folds nobody and adds no HNSW tombstone; the index is rebuilt
(exact to HNSW, HNSW compaction) in a worker thread while the event loop keeps serving, and replicas
start their rebuilds at independent random delays.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from retriever_svc.config import IndexConfig, RedisConfig
from retriever_svc.consumer import StreamConsumer
from retriever_svc.embeddings import GCNEmbeddings
from retriever_svc.errors import BacklogFull, InvalidArgument
from retriever_svc.index import Retriever
from retriever_svc.maintenance import IndexMaintainer
from retriever_svc.records import MAX_ATTRIBUTES, CatalogItem, Interaction, check_item
from retriever_svc.store import RedisStore
from tests.support.reliability import recording

pytestmark = pytest.mark.anyio


async def _keys(store: RedisStore, pattern: str) -> list[bytes]:
    return [k async for k in store.client.scan_iter(match=f"{store.keys.prefix}:{pattern}", count=1000)]


async def test_histories_users_catalog_and_stream_refuse_what_is_beyond_their_bound(request, store):
    config = IndexConfig(kind="exact", history_per_user=5, max_users=3, max_items=4, max_stream_backlog=50)
    retriever = Retriever(store=store, config=config, replica="r1")
    with recording(request.node.nodeid, "bounded state", area="faults") as row:
        # histories: 12 events of one user, the newest 5 kept with their ratings, each change counted once
        events = [Interaction("h", f"item{j}", float(1 + j % 5), 1000 + j) for j in range(12)]
        changed = await store.apply_events(events, history_cap=5)
        assert changed["h"].items == [f"item{j}" for j in range(7, 12)] and changed["h"].seq == 12
        assert await store.client.hlen(store.keys.rating("h")) == 5
        assert await store.apply_events(events, history_cap=5) == {}  # re-applied, evicted ones included
        assert (await store.user_items(["h"]))["h"].seq == 12
        assert await store.apply_events([Interaction("h", "ancient", 1.0, 1)], history_cap=5) == {}

        # users: 5 new users in one call, 3 admitted (the bound), the others' events refused by name
        await store.client.delete(store.keys.users)
        five = [Interaction(f"u{j}", "i0", 1.0, 10 + j) for j in range(5)]
        result = await retriever.ingest(five)
        assert (result.accepted, result.rejected) == (3, 2)
        assert all("index.max_users" in reason for reason in result.errors)
        again = await retriever.ingest([Interaction("u0", "i1", 1.0, 20), Interaction("u9", "i1", 1.0, 20)])
        assert (again.accepted, again.rejected) == (1, 1) and await store.client.scard(store.keys.users) == 3

        # catalog: 6 new ids, 4 stored; a known id is always upserted again; new ones stay refused
        items = [CatalogItem(f"c{j}", f"Title {j}") for j in range(6)]
        stored = await retriever.upsert_items(items)
        assert (stored.accepted, stored.rejected) == (4, 2) and "index.max_items" in stored.errors[0]
        retitled = await retriever.upsert_items([CatalogItem("c0", "New title"), CatalogItem("c9", "Nine")])
        assert (retitled.accepted, retitled.rejected) == (1, 1)
        assert len(await _keys(store, "{i:*}")) == 4 and await store.client.scard(store.keys.catalog_items) == 4
        # attribute maps: bounded per item by the contract
        with pytest.raises(InvalidArgument, match="attributes"):
            check_item(CatalogItem("c0", "t", {f"k{j}": "v" for j in range(MAX_ATTRIBUTES + 1)}))
        with pytest.raises(InvalidArgument, match="attributes"):
            check_item(CatalogItem("c0", "t", {"k": "v" * 1025}))

        # the ingest stream: 4 events are in it (no consumer ran); 50 is the bound
        backlog = await store.client.xlen(store.keys.stream)
        assert backlog == 4
        with pytest.raises(BacklogFull, match="max_stream_backlog"):
            await retriever.ingest([Interaction("u0", f"x{j}", 1.0, 30 + j) for j in range(47)])
        assert await store.client.xlen(store.keys.stream) == backlog  # nothing of the refused call stored
        consumer = StreamConsumer(retriever=retriever, store=store,
                                  config=RedisConfig(consumer="c1", block_ms=20, claim_idle_ms=60_000))
        await store.streams.ensure_group()
        assert await consumer.step() == backlog
        assert await store.streams.trim_acknowledged() == backlog and await store.client.xlen(store.keys.stream) == 0
        after = await retriever.ingest([Interaction("u0", f"x{j}", 1.0, 30 + j) for j in range(47)])
        assert after.accepted == 47  # room again once applied and trimmed
        row.sent = len(events) + 5 + 2 + 6 + 2 + 47 + 47
        row.refused = 2 + 1 + 2 + 1 + 47
        row.measured = ("history_per_user=5: 12 events kept the newest 5 (ratings too), 12 changes counted, the 12 "
                        "applied again and an older one changed nothing; max_users=3: events of 2 of 5 new users, "
                        "then of a 6th, refused by name (set holds 3); max_items=4: 2 of 6 new ids and a later new "
                        "one refused, a known id retitled (4 entries in Redis); 33 attributes or a 1,025-character "
                        f"value refused; max_stream_backlog=50: with {backlog} unapplied, 47 more RESOURCE_EXHAUSTED "
                        "(nothing stored); applied and trimmed (XLEN 0), the same 47 accepted")


def _embeddings(users: int, version: str, *, dim: int = 8, seed: int = 0) -> GCNEmbeddings:
    rng = np.random.default_rng(seed)
    items = [f"i{j}" for j in range(20)]
    basis = rng.normal(size=(len(items), dim)).astype(np.float32)
    return GCNEmbeddings(user_ids=[f"u{j}" for j in range(users)], item_ids=items,
                         user=rng.normal(size=(users, dim)).astype(np.float32), item=basis, item_foldin=basis,
                         version=version, meta={"layers": 2, "layer_combination": "mean_1_to_K"})


async def test_a_dropped_version_leaves_no_key_even_when_a_lagging_replica_folds_into_it(
        request, store, redis_url, tmp_path):
    config = IndexConfig(kind="exact", keep_versions=1, cache_dir=tmp_path)
    first = Retriever(store=store, config=config, replica="a")
    await first.load_embeddings(_embeddings(30, "v1"))
    lagging = RedisStore.from_url(redis_url, prefix="xr")
    late = Retriever(store=lagging, config=config, replica="b")
    with recording(request.node.nodeid, "bounded state", area="faults") as row:
        try:
            assert await late.restore() == "v1"
            await first.load_embeddings(_embeddings(30, "v2", seed=1))  # keep_versions=1: v1 dropped
            assert await store.kept_versions() == ["v2"]
            # b still serves v1 and applies events: its fold-ins into v1 must not outlive v1
            events = [Interaction(f"new{j}", f"i{j % 20}", 1.0, 5) for j in range(40)]
            assert await late.apply_events(events) == 40  # written, then undone: v1 is gone
            await first.apply_events([Interaction("u1", "i3", 1.0, 9)])
        finally:
            await lagging.close()
        leaked = [k for k in await _keys(store, "{emb}:v:v1*")]
        users = await _keys(store, "{u:*}:emb")
        fields = [f for k in users for f in await store.client.hkeys(k)]
        assert leaked == [] and b"v1" not in fields and fields.count(b"v2") >= 30
        cached = sorted(p.name for p in (tmp_path / "xr").iterdir())
        assert cached == ["v2.faiss", "v2.json"]  # v1's index deleted with the version
        row.sent, row.refused = 40, 40
        row.measured = (f"keep_versions=1, v2 published while replica b still served v1: b's 40 fold-ins into v1 "
                        f"written and undone; afterwards 0 keys of v1, 0 of {len(users)} users' emb hashes with a v1 "
                        "vector, the index cache holds v2 only")


async def test_an_event_applied_again_refolds_nobody_and_adds_no_tombstone(request, store):
    retriever = Retriever(store=store, config=IndexConfig(kind="hnsw", hnsw_m=8, ef_construction=20))
    await retriever.load_embeddings(_embeddings(50, "v1"))
    events = [Interaction(f"u{j}", f"i{(j + k) % 20}", 1.0, 100 + k) for j in range(20) for k in range(3)]
    with recording(request.node.nodeid, "bounded state", area="faults") as row:
        assert await retriever.apply_events(events) == 20
        index = retriever.user_index
        tombstones, seqs = index.tombstones, await store.user_items([f"u{j}" for j in range(20)])
        trips = store.round_trips
        for _ in range(3):  # a replayed stream: the same events, in another order
            assert await retriever.apply_events(events[::-1]) == 0
        assert store.round_trips - trips == 3  # the history scripts only: no fold-in written
        assert retriever.user_index.tombstones == tombstones
        assert await store.user_items([f"u{j}" for j in range(20)]) == seqs
        row.sent, row.refused = 3 * len(events), 0
        row.measured = (f"{len(events)} events applied 3 times more (reversed): 0 users re-folded, 0 fold-in "
                        f"round trips, HNSW tombstones stay {tombstones}, every user's change count unchanged")


async def _loop_gaps(stop: asyncio.Event) -> float:
    """The longest the event loop went without running this task (a 5 ms ticker)."""
    worst, last = 0.0, time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.005)
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    return worst


async def test_the_index_turns_hnsw_online_off_the_event_loop(request, store):
    users = 20_000
    config = IndexConfig(kind="auto", hnsw_min_users=users + 10, hnsw_m=16, ef_construction=40)
    retriever = Retriever(store=store, config=config, replica="r1")
    await retriever.load_embeddings(_embeddings(users, "v1", dim=32))
    assert retriever.user_index.kind == "exact" and retriever.rebuild_due() is None
    grow = [Interaction(f"n{j}", f"i{j % 20}", 1.0, 5) for j in range(10)]
    await retriever.apply_events(grow)
    assert retriever.rebuild_due() == "hnsw"
    with recording(request.node.nodeid, "index rebuild", area="faults") as row:
        stop = asyncio.Event()
        ticker = asyncio.create_task(_loop_gaps(stop))
        searches = 0

        async def search_meanwhile() -> None:
            nonlocal searches
            while not stop.is_set():
                assert len((await retriever.nearest_users("u7", 5)).neighbors) == 5
                searches += 1
                await asyncio.sleep(0.01)

        async def fold_in_meanwhile() -> None:
            await asyncio.sleep(0.05)
            await retriever.apply_events([Interaction(f"late{j}", f"i{j % 20}", 1.0, 6) for j in range(5)])

        searcher, late = asyncio.create_task(search_meanwhile()), asyncio.create_task(fold_in_meanwhile())
        started = time.perf_counter()
        assert await retriever.rebuild_index() == "hnsw"
        seconds = time.perf_counter() - started
        await late
        stop.set()
        worst = await ticker
        await searcher
        index = retriever.user_index
        assert index.kind == "hnsw" and len(index) == users + 15 and all(f"late{j}" in index for j in range(5))
        assert retriever.rebuild_due() is None
        assert worst < max(0.25, seconds / 4), (worst, seconds)  # the build never held the loop
        assert searches > 0
        row.sent, row.refused = searches, 0
        row.measured = (f"{users + 10:,} users grew past hnsw_min_users: exact -> HNSW rebuilt in {seconds:.2f} s in a "
                        f"worker thread; the event loop's longest pause meanwhile {1000 * worst:.0f} ms, {searches} "
                        "NearestUsers answered from the old index, 5 fold-ins made during the build replayed into "
                        "the new one")


async def test_replicas_start_a_due_rebuild_at_independent_random_delays(request, store, redis_url):
    config = IndexConfig(kind="hnsw", hnsw_m=8, ef_construction=20, rebuild_jitter_s=1.5)
    replicas = []
    with recording(request.node.nodeid, "index rebuild", area="faults") as row:
        try:
            for name in ("a", "b", "c"):
                replica_store = store if name == "a" else RedisStore.from_url(redis_url, prefix="xr")
                core = Retriever(store=replica_store, config=config, replica=name)
                if name == "a":
                    await core.load_embeddings(_embeddings(200, "v1"))
                else:
                    await core.restore()
                replicas.append((core, IndexMaintainer(retriever=core, config=config)))
            a = replicas[0][0]
            for round_ in range(7):  # every user re-folded 7 times: the tombstones make compaction due
                moved = [Interaction(f"u{j}", f"i{(j + round_) % 20}", 1.0, 10 + round_) for j in range(200)]
                await a.apply_events(moved)
                for core, _ in replicas[1:]:  # what each replica's follower does with a's announcement
                    await core.apply_remote_updates("v1", [e.user_id for e in moved])
            assert all(core.rebuild_due() == "compact" for core, _ in replicas)
            for _, maintainer in replicas:
                maintainer.start()
            deadline = time.monotonic() + 30
            while not all(maintainer.rebuilds for _, maintainer in replicas):
                assert time.monotonic() < deadline, "a replica never rebuilt its index"
                await asyncio.sleep(0.05)
        finally:
            for core, maintainer in replicas:
                await maintainer.stop()
                if core.store is not store:
                    await core.store.close()
        delays = sorted(maintainer.rebuilds[0][1] for _, maintainer in replicas)
        assert all(0 <= d < 1.5 for d in delays) and len(set(delays)) == 3
        assert all(core.user_index.tombstones == 0 for core, _ in replicas)
        row.sent, row.refused = 3, 0
        row.measured = ("3 replicas with HNSW compaction due at once (rebuild_jitter_s=1.5): they started after "
                        f"{', '.join(f'{d:.2f}' for d in delays)} s, each compacted to 0 tombstones")


async def test_redis_stops_growing_once_every_bound_is_reached(request, store):
    """Ever-new users and items at a fixed rate: once the bounds are reached the key count stays put and
    Redis's memory, the updates stream aside (kept by age, 6 hours: it grows with the rate), stays flat."""
    config = IndexConfig(kind="exact", history_per_user=10, max_users=100, max_items=200, max_stream_backlog=5000,
                         keep_versions=1)
    retriever = Retriever(store=store, config=config, replica="r1")
    await retriever.load_embeddings(_embeddings(50, "v1"))
    consumer = StreamConsumer(retriever=retriever, store=store,
                              config=RedisConfig(consumer="c1", block_ms=20, claim_idle_ms=60_000))
    await store.streams.ensure_group()
    sent = refused = 0
    samples: list[tuple[int, int, int]] = []  # per round: (keys, used_memory less the updates stream, updates stream)
    with recording(request.node.nodeid, "bounded state", area="faults") as row:
        for round_ in range(6):
            for _ in range(6):  # 3,000 events a round of 150 user ids, 4 in 5 with an item never seen before
                events = [Interaction(f"g{n % 150:04d}", f"i{n % 20}" if n % 5 == 0 else f"n{n:08d}", 1.0,
                                      1_000_000 + n) for n in range(sent, sent + 500)]
                result = await retriever.ingest(events)
                sent, refused = sent + len(events), refused + result.rejected
                while await consumer.step():
                    pass
                await store.streams.trim_acknowledged()
            upserted = await retriever.upsert_items([CatalogItem(f"c{round_ * 100 + j:08d}", f"Title {j:04d}")
                                                     for j in range(100)])
            sent, refused = sent + 100, refused + upserted.rejected
            updates = await store.client.memory_usage(store.keys.updates, samples=0)
            used = (await store.client.info("memory"))["used_memory"]
            samples.append((await store.client.dbsize(), used - updates, updates))
        keys = {s[0] for s in samples[1:]}
        assert len(keys) == 1, samples  # from the second round on: no key more
        assert await store.client.xlen(store.keys.stream) == 0
        assert await store.client.scard(store.keys.users) == 100 and await store.client.scard(store.keys.catalog_items) == 200
        zcards = [await store.client.zcard(store.keys.hist(f"g{j:04d}")) for j in range(150)]
        assert max(zcards) == 10 and zcards.count(0) == 50
        flat, last = samples[2][1], samples[-1][1]
        assert last <= flat * 1.01, samples  # 12,000 more events and 400 more items: under 1% more memory
        row.sent, row.refused = sent, refused
        row.measured = (f"{sent:,} events and upserts of ever-new users (150 ids) and items, bounds history_per_user=10, "
                        f"max_users=100, max_items=200: {samples[1][0]} keys from round 2 of 6 on, unchanged; used_memory "
                        f"less the updates stream {samples[2][1]:,} B after round 3, {last:,} B after round 6 "
                        f"({100 * (last - flat) / flat:+.2f}%); the updates stream (kept 6 hours) "
                        f"{samples[0][2]:,} -> {samples[-1][2]:,} B; {refused:,} refused (users and items past the bound)")
