"""The retriever core, ``Retriever``: ingest, fold-in, nearest users, contexts, catalog. No grpc.

Embedding versions. A published version is an immutable ``Snapshot`` (version, item rows, fold-in
basis, user ``VectorIndex``); requests read ``self._snapshot`` once and use only that object, and
the next snapshot is built completely before one assignment swaps it in, so no request sees a mix
and every answer names the version that produced it. A version published anywhere (this
process's ``load_embeddings``, the trainer's ``publish_gcn``) becomes Redis's ``current``, which
every replica's follower (``replicas.py``) adopts: the index is built off the event loop, or read
from the index cache (``index.cache_dir``) and brought up to date by replaying the fold-ins
announced since it was written; then, under the lock, the users the fit lacks and those whose
history changed meanwhile are folded in, and the snapshot is swapped in.

Replicas. Fold-ins are written to Redis only if the user's history still has the size they were
computed from (two replicas folding one user concurrently: the larger history wins), announced
on the updates stream in the same round trip, and copied from Redis by the other replicas.

Fold-in (how a user's embedding follows its interactions between refits). LightGCN's propagation
gives user u at layer k >= 1, with the item layers e_i^(k-1) of the fit held fixed,

    e_u^(k) = sum_{i in N_u} e_i^(k-1) / sqrt(|N_u| |N_i|)

so the combined embedding sum_{k>=1} alpha_k e_u^(k) = sum_{i in N_u} f_i / sqrt(|N_u|), with the
fit's per-item basis f_i = sum_{k>=1} alpha_k e_i^(k-1) / sqrt(|N_i|) (``item_foldin``), computed by
``retriever_svc.embeddings.fold_in``, which the trainer's offline contexts call too. For the
paper's ``mean_1_to_K`` (alpha_0 = 0) this is exactly the embedding the fit gives a user with the
same items, so folded-in and fitted users are comparable by cosine; for ``mean_0_to_K`` it lacks
the user's own free layer-0 term, which only a refit can learn. N_u is the user's distinct items
that the version knows (items new since the fit have no embedding and are skipped until the next
refit); a user none of whose items are known has no embedding. One (I, d) basis and a sum of
|N_u| rows per user: cheap enough to refresh every touched user on every stream batch.

Only a change is folded in: an event that changes nothing (re-applied, superseded, or older than a
full history) leaves its user's vector and its place in the index alone, so a replayed stream adds no
HNSW tombstone. Bounds (``store.py`` has every key's): Ingest refuses a batch while the stream holds
``index.max_stream_backlog`` events (``BacklogFull``), and events of new users beyond
``index.max_users``; the index grows by a user's vector and id per user, and is rebuilt off the event
loop (:meth:`Retriever.rebuild_index`, run by ``maintenance.py``): exact to HNSW once it outgrows
``hnsw_min_users``, an HNSW index without its tombstones. Titles and the catalog: ``catalog.py``
(``get_context`` is one Redis round trip once titles are cached).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from exitrank.types import HistoryItem, NeighborContext, UserContext
from retriever_svc.catalog import Catalog
from retriever_svc.config import IndexConfig
from retriever_svc.embeddings import GCNEmbeddings
from retriever_svc.errors import BacklogFull, EmbeddingsError, InvalidArgument, UnknownUser
from retriever_svc.records import (
    CONTEXT_K_RANGE,
    MAX_GET_ITEMS,
    MAX_HISTORY_RANGE,
    MAX_REPORTED_ERRORS,
    NEAREST_K_RANGE,
    CatalogItem,
    IngestResult,
    Interaction,
    Neighbors,
    check_id,
    check_ids,
    check_interaction,
    check_range,
    check_version,
    refusal,
)
from retriever_svc.snapshot import IndexCache, ItemVectors, Snapshot
from retriever_svc.store import HistoryRow, HistoryState, RedisStore
from retriever_svc.vectors import VectorIndex

log = logging.getLogger(__name__)
_FOLD_CHUNK = 2000
_KEPT_VECTOR_VERSIONS = 2  # older versions whose items stay in memory for pinned rankers


class Retriever:
    """Histories and catalog in Redis, LightGCN user vectors in FAISS, answers similar users.

    Args:
        store: the Redis access layer.
        config: the ``index`` section of ``RetrieverConfig``.
        replica: this process's name among replicas (its stream consumer name): fold-ins it
            announces carry it, so it skips its own announcements.
    """

    def __init__(self, *, store: RedisStore, config: IndexConfig, replica: str = "") -> None:
        self.store = store
        self.config = config
        self.replica = replica
        self._snapshot: Snapshot | None = None
        self._lock = asyncio.Lock()  # serialises fold-in writes, remote updates and swaps
        self._touched: set[str] = set()  # users folded in since the version was last confirmed
        self.catalog = Catalog(store=store, config=config)
        self._cache = None if config.cache_dir is None else IndexCache(config.cache_dir, store.keys.prefix)
        self._kept_vectors: OrderedDict[str, ItemVectors] = OrderedDict()  # older versions' items

    @property
    def embedding_version(self) -> str:
        """The published version ("" before any)."""
        return self._snapshot.version if self._snapshot else ""

    @property
    def user_index(self) -> VectorIndex | None:
        """The published version's user index, what NearestUsers searches (None before any version).
        Read it once and keep that object: a newer version swaps in another index."""
        return self._snapshot.users if self._snapshot else None

    async def stats(self) -> dict[str, float | str | None]:
        """What ``/metrics`` shows of the core (``exitrank.observability.metrics``): index size,
        the served version and its age, the ingest stream's lag and pending entries, Redis
        round trips. Two Redis round trips; read when scraped, never on the request path."""
        snap = self._snapshot
        lag, pending = await self.store.streams.stream_backlog()
        published = await self.store.published_at(snap.version) if snap is not None else None
        return {
            "index_users": len(snap.users) if snap is not None else 0,
            "embedding_version": snap.version if snap is not None else "",
            "embedding_version_age_seconds": None if published is None else max(0.0, time.time() - published),
            "stream_lag": lag,
            "stream_pending": pending,
            "redis_round_trips": self.store.round_trips,
        }

    # ---- embedding versions -------------------------------------------------------------

    async def load_embeddings(self, emb: GCNEmbeddings, *, created: float | None = None) -> None:
        """Publish a fit from this process: store it in Redis (unless already there; ``created``:
        when its artifact was made), index it, fold in the users it lacks, make it current (other
        replicas follow), swap it in."""
        self._touched = set()  # users touched from now on are re-folded into the new version
        after = await self.store.streams.updates_tail()
        if not await self.store.version_complete(emb.version):
            await self.store.write_version(emb, created=created)
        await self._adopt(await self._build(emb, after), make_current=True)

    async def restore(self) -> str | None:
        """Load the version ``current`` names in Redis (a restart without artifacts)."""
        version = await self.store.current_version()
        if version is None:
            return None
        await self._adopt_stored(version)
        return version

    async def follow_current(self) -> bool:
        """Adopt the version Redis names current when another process published it; True when
        this swapped versions. Called every ``index.version_poll_s`` by the replica follower."""
        seen, self._touched = self._touched, set()
        version = await self.store.current_version()
        if version is None or version == self.embedding_version:
            return False  # what was folded in until now went to the current version
        self._touched |= seen  # folded into our old version only: redo them in the new one
        await self._adopt_stored(version)
        return True

    async def _adopt_stored(self, version: str) -> None:
        """Adopt a version stored in Redis: from the index cache when it is still valid (then
        the fold-ins announced since it was written are replayed), else by indexing it."""
        cached = await self._from_cache(version)
        if cached is not None:
            snap, after = cached
            await self._adopt(snap, make_current=False, replay_after=after)
            return
        after = await self.store.streams.updates_tail()  # read before the vectors: replay is idempotent
        emb = await self.store.load_version(version)
        await self._adopt(await self._build(emb, after), make_current=False)

    async def _build(self, emb: GCNEmbeddings, after: str) -> Snapshot:
        """Index ``emb`` off the event loop (minutes at a million users); cache it on disk."""
        snap = await asyncio.to_thread(self._snapshot_of, emb)
        if self._cache is not None:
            await asyncio.to_thread(self._cache.save, snap.users, emb.version, after)
        return snap

    async def _from_cache(self, version: str) -> tuple[Snapshot, str] | None:
        cached = None if self._cache is None else await asyncio.to_thread(self._cache.load, version)
        if cached is None or not await self.store.streams.updates_kept_since(cached[1]["after"]):
            return None
        items = await self.store.load_version(version, with_users=False)
        item_row = {item: row for row, item in enumerate(items.item_ids)}
        return Snapshot(version=version, item_row=item_row, basis=items.fold_in_basis(), items=items.item,
                        users=cached[0]), cached[1]["after"]

    async def _adopt(self, snap: Snapshot, *, make_current: bool,
                     replay_after: str | None = None) -> None:
        """Under the lock: replay announcements since a cached index was written, fold in the
        version's missing users and those touched meanwhile, then swap (one assignment)."""
        async with self._lock:
            replayed = await self._replay(snap, replay_after) if replay_after else 0
            touched, self._touched = self._touched, set()
            folded = await self._fold_in_missing(snap, touched)
            dropped = (await self.store.set_current(snap.version, keep=self.config.keep_versions)
                       if make_current else [])
            self._snapshot = snap
        if self._cache is not None:  # the indexes of versions no longer kept
            await asyncio.to_thread(self._cache.prune, await self.store.kept_versions())
        # the index's labels and row map are millions of long-lived objects: move them out of
        # the cyclic collector's reach, or each full collection (~30 ms at a million users)
        # stalls every request in flight
        gc.freeze()
        log.info("embedding version %s: %d users (%d folded in, %d replayed), dropped %s",
                 snap.version, len(snap.users), folded, replayed, dropped or "none")

    async def _replay(self, snap: Snapshot, after: str) -> int:
        count = 0
        while updates := await self.store.streams.read_updates(after, count=1000, block_ms=None):
            users = list(dict.fromkeys(u for _, v, _, batch in updates if v == snap.version
                                       for u in batch))
            for user, vector in zip(users, await self.store.user_vectors(users, snap.version)):
                if vector is not None:
                    snap.users.upsert(user, vector)
                    count += 1
            after = updates[-1][0]
        return count

    def _snapshot_of(self, emb: GCNEmbeddings) -> Snapshot:
        cfg = self.config
        users = VectorIndex(
            emb.user_ids, emb.user, kind=cfg.kind, hnsw_min_users=cfg.hnsw_min_users,
            hnsw_m=cfg.hnsw_m, ef_construction=cfg.ef_construction, ef_search=cfg.ef_search,
        )
        item_row = {item: row for row, item in enumerate(emb.item_ids)}
        return Snapshot(version=emb.version, item_row=item_row, basis=emb.fold_in_basis(), items=emb.item,
                         users=users)

    def rebuild_due(self) -> str | None:
        """Whether the served index should be rebuilt (``VectorIndex.rebuild_due``): "hnsw", "compact", None."""
        snap = self._snapshot
        return None if snap is None else snap.users.rebuild_due()

    async def rebuild_index(self) -> str | None:
        """Rebuild the served index off the event loop when due (exact to HNSW, or HNSW without its
        tombstones); returns what was done. Searches go on against the old index meanwhile, and the
        fold-ins made meanwhile are journaled and replayed into the new one before the swap."""
        snap = self._snapshot
        if snap is None or (due := snap.users.rebuild_due()) is None:
            return None
        async with self._lock:  # no upsert while the rows are copied (searches only read)
            ids, unit = await asyncio.to_thread(snap.users.rows)
            snap.users.start_journal()
        started = time.perf_counter()
        try:
            rebuilt = await asyncio.to_thread(snap.users.rebuilt, ids, unit)
        except BaseException:
            snap.users.take_journal()
            raise
        async with self._lock:
            journal = snap.users.take_journal()
            if self._snapshot is not snap:
                return None  # another version was adopted meanwhile: it has its own index
            for user, vector in journal:
                rebuilt.upsert(user, vector)
            self._snapshot = replace(snap, users=rebuilt)
        gc.freeze()
        log.info("index of %s rebuilt (%s): %s, %d users, %d tombstones dropped, %d fold-ins replayed, %.1fs off "
                 "the event loop", snap.version, due, rebuilt.kind, len(rebuilt), snap.users.tombstones, len(journal),
                 time.perf_counter() - started)
        return due

    async def _fold_in_missing(self, snap: Snapshot, touched: set[str]) -> int:
        """Fold in users with a history but no vector in ``snap`` (new since the fit; every
        replica finds these itself), and ``touched`` users (their history changed while only
        the old version was kept up to date; announced, as only this replica knows them)."""
        missing = [u for u in await self.store.all_users() if u not in snap.users and u not in touched]
        count = 0
        for users, announce in ((missing, False), (sorted(touched), True)):
            for start in range(0, len(users), _FOLD_CHUNK):
                states = await self.store.user_items(users[start : start + _FOLD_CHUNK])
                count += len(await self._write_fold_ins(snap, states, announce=announce))
        return count

    async def _write_fold_ins(self, snap: Snapshot, states: dict[str, HistoryState], *,
                              announce: bool) -> list[str]:
        """Compute the users' fold-in vectors and store them (Redis, then FAISS); returns the
        users written (a user whose history changed meanwhile is left to whoever changed it)."""
        folded = [(u, v, st.seq) for u, st in states.items() if (v := snap.fold_in(st.items)) is not None]
        written = await self.store.put_fold_ins(
            snap.version, folded, announce_as=self.replica if announce else None)
        done = []
        for (user, vector, _), ok in zip(folded, written):
            if ok:
                snap.users.upsert(user, vector)
                done.append(user)
        return done

    async def apply_remote_updates(self, version: str, user_ids: Sequence[str]) -> int:
        """Another replica folded these users into ``version``: copy their vectors from Redis
        into this replica's index. Returns how many were updated."""
        async with self._lock:  # ordered with our own fold-ins of the same users
            snap = self._snapshot
            if snap is None or snap.version != version or not user_ids:
                return 0
            vectors = await self.store.user_vectors(user_ids, version)
            count = 0
            for user, vector in zip(user_ids, vectors):
                if vector is not None and vector.shape[0] == snap.users.dim:
                    snap.users.upsert(user, vector)
                    count += 1
            return count

    # ---- the stream ---------------------------------------------------------------------

    async def ingest(self, events: Sequence[Interaction], *, first_index: int = 0) -> IngestResult:
        """Validate each event; append the valid ones the bounds admit durably to the stream (XADD
        acknowledged). BacklogFull, storing nothing, while the stream holds ``max_stream_backlog``."""
        valid: list[tuple[int, Interaction]] = []
        errors: list[tuple[int, str]] = []
        for offset, event in enumerate(events):
            try:
                valid.append((offset, self.check_event(event)))
            except InvalidArgument as exc:
                errors.append((offset, refusal("interaction", first_index + offset, exc)))
        admitted = await self._admitted_users({e.user_id for _, e in valid}, len(valid))
        for offset, event in valid:
            if event.user_id not in admitted:
                errors.append((offset, f"interaction {first_index + offset}: user_id the retriever holds its "
                                       f"maximum of {self.config.max_users} users (index.max_users); events of "
                                       "new users are refused"))
        stored = [event for _, event in valid if event.user_id in admitted]
        await self.store.streams.append_events(stored)
        reasons = tuple(reason for _, reason in sorted(errors)[:MAX_REPORTED_ERRORS])
        return IngestResult(len(stored), len(errors), reasons)

    async def _admitted_users(self, users: set[str], events: int) -> set[str]:
        """The users whose events the bounds admit (one round trip; none while both are off)."""
        cfg = self.config
        if not users or not (cfg.max_users or cfg.max_stream_backlog):
            return users
        ordered = sorted(users) if cfg.max_users else []
        admitted, backlog = await self.store.admit(self.store.keys.users, ordered, cfg.max_users,
                                                   with_stream=bool(cfg.max_stream_backlog))
        if cfg.max_stream_backlog and backlog + events > cfg.max_stream_backlog:
            raise BacklogFull(f"the ingest backlog holds {backlog} events, its bound is {cfg.max_stream_backlog} "
                              "(index.max_stream_backlog): the stream consumers are behind; retry with backoff")
        return {u for u, ok in zip(ordered, admitted) if ok} if cfg.max_users else users

    def check_event(self, event: Interaction) -> Interaction:
        """The event if valid now (``records.check_interaction`` against this host's clock), else InvalidArgument."""
        return check_interaction(event, now_ms=int(time.time() * 1000), max_future_s=self.config.max_future_s)

    async def apply_events(self, events: Sequence[Interaction], *, redelivered: bool = False) -> int:
        """The consumer's step: histories first, then the fold-in vectors of the users whose history
        changed (Redis, announced to the other replicas, then FAISS). Returns how many vectors were
        refreshed; idempotent (an event applied again changes nothing and refreshes no vector).

        ``redelivered``: the events were delivered before and never acknowledged, so a crash may
        have fallen between the history write and the fold-in; every user of the batch is folded
        in again (the history alone cannot tell, since re-applying it changes nothing)."""
        async with self._lock:
            states = await self.store.apply_events(events, history_cap=self.config.history_per_user,
                                                   every_user=redelivered)
            self._touched.update(states)
            snap = self._snapshot
            return 0 if snap is None else len(await self._write_fold_ins(snap, states, announce=True))

    # ---- catalog (``catalog.py``) ----------------------------------------------------------

    @property
    def catalog_version(self) -> int:
        """The catalog's version the title cache matches (sent with every context and item list)."""
        return self.catalog.version

    async def upsert_items(self, items: Sequence[CatalogItem], *, first_index: int = 0) -> IngestResult:
        return await self.catalog.upsert(items, first_index=first_index)

    async def refresh_catalog(self) -> int:
        """Reads the catalog's version; a change made elsewhere empties the title cache."""
        return await self.catalog.refresh()

    async def get_items(self, item_ids: Sequence[str], *, embedding_version: str | None = None,
                        max_reply_bytes: int | None = None) -> tuple[list[CatalogItem], list[str]]:
        """(found items in request order, missing ids); with ``embedding_version`` ("" for the
        current one) each item carries its vector of that version (None when the fit lacks it).
        ``max_reply_bytes``: ReplyTooLarge, before any entry is read, when the stored entries'
        sizes say the answer would be larger (one STRLEN round trip)."""
        check_ids("item_ids", item_ids, MAX_GET_ITEMS)
        if embedding_version is not None:
            check_version("embedding_version", embedding_version)
        vectors = None if embedding_version is None else await self.vectors(embedding_version)
        return await self.catalog.get(item_ids, vectors=vectors, max_reply_bytes=max_reply_bytes)

    # ---- queries ------------------------------------------------------------------------

    async def nearest_users(self, user_id: str, k: int) -> Neighbors:
        """The k most similar users by cosine (never ``user_id`` itself), best first."""
        check_id("user_id", user_id)
        check_range("k", k, NEAREST_K_RANGE)
        snap = self._snapshot
        if snap is None or user_id not in snap.users:
            raise UnknownUser(user_id, self._why_no_embedding(snap))
        return Neighbors(tuple(snap.users.search(user_id, k)), snap.version)

    def vectors_version(self, requested: str) -> str:
        """The version whose vectors answer a request for ``requested`` ("" = the current)."""
        return requested or self.embedding_version

    async def vectors(self, version: str) -> ItemVectors:
        """The items of embedding ``version`` ("" or the current one: the published snapshot's;
        an older one still kept in Redis: read once, then cached for the next few calls).

        A ranker trained on an older version keeps reading that version's vectors until its
        retrained successor is published, so a refit never feeds it another space's vectors.

        Raises:
            EmbeddingsError: the version is not (completely) stored any more.
        """
        snap = self._snapshot
        if snap is not None and version in ("", snap.version):
            return snap
        if not version:
            raise EmbeddingsError("no embedding version is loaded yet (publish a LightGCN fit)")
        cached = self._kept_vectors.get(version)
        if cached is None:
            try:
                emb = await self.store.load_version(version, with_users=False)
            except (EmbeddingsError, KeyError) as exc:
                raise EmbeddingsError(f"embedding version {version!r} is not kept by this retriever (it serves "
                                      f"{snap.version if snap else 'none'}; it keeps the newest "
                                      f"{self.config.keep_versions} published, index.keep_versions)") from exc
            cached = ItemVectors(version=version, item_row={i: r for r, i in enumerate(emb.item_ids)},
                              basis=emb.fold_in_basis(), items=emb.item)
            self._kept_vectors[version] = cached
            while len(self._kept_vectors) > _KEPT_VECTOR_VERSIONS:
                self._kept_vectors.popitem(last=False)
        self._kept_vectors.move_to_end(version)
        return cached

    async def get_context(self, user_id: str, k: int, max_history: int, *,
                          embedding_version: str | None = None) -> UserContext:
        """The user's newest ``max_history`` interactions and its k nearest users' (one round
        trip to Redis for all histories).

        ``embedding_version`` ("" for the current one): the context also carries the vectors of
        that version for collaborative soft tokens: each history item's, and the user's, folded
        in from the returned history (the rule of a user's embedding between refits, over the
        interactions the prompt shows).
        """
        check_id("user_id", user_id)
        check_range("k", k, CONTEXT_K_RANGE)
        check_range("max_history", max_history, MAX_HISTORY_RANGE)
        if embedding_version is not None:
            check_version("embedding_version", embedding_version)
        vectors = None if embedding_version is None else await self.vectors(embedding_version)
        snap = self._snapshot
        embedded = snap is not None and user_id in snap.users
        neighbors = snap.users.search(user_id, k) if embedded and k else []
        rows = await self.store.histories([user_id] + [n for n, _ in neighbors], max_history)
        if not rows[0] and not embedded:
            raise UnknownUser(user_id, "no interactions were ingested for it and it has no embedding")
        titles = await self.catalog.titles_of({item for history in rows for item, _, _ in history})
        return UserContext(
            user_id=user_id,
            history=_history(rows[0], titles, vectors),
            neighbors=tuple(
                NeighborContext(n, score, _history(h, titles, vectors))
                for (n, score), h in zip(neighbors, rows[1:])
            ),
            embedding_version=snap.version if embedded else "",
            user_embedding=vectors.fold_in(item for item, _, _ in rows[0]) if vectors else None,
            vectors_version=vectors.version if vectors else "",
        )

    @staticmethod
    def _why_no_embedding(snap: Snapshot | None) -> str:
        if snap is None:
            return "no embedding version is loaded yet (publish a LightGCN fit: serve with --artifacts)"
        return (f"no embedding in version {snap.version}: it is not in the fit and none of its "
                "ingested interactions is with an item the fit knows")


def _history(rows: list[HistoryRow], titles: dict[str, str], vectors: ItemVectors | None = None
             ) -> tuple[HistoryItem, ...]:
    return tuple(HistoryItem(item, titles.get(item, ""), rating, ts, vectors.item(item) if vectors else None)
                 for item, ts, rating in rows)
