"""The retriever core, ``Retriever``: ingest, fold-in, nearest users, contexts, catalog. No grpc.

Embedding versions. A published version is an immutable ``_Snapshot`` (version, item rows, fold-in
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

Titles come from an in-process cache filled from the catalog on a miss, so ``get_context`` is one
Redis round trip (the histories of the user and its k neighbours) once titles are cached. Every
UpsertItems increments the catalog's version in Redis (``catalog_version``, in every GetContext and
GetItems answer, so rankers re-read their cached titles); this process's own upserts update the cache,
and another replica's show within ``index.version_poll_s`` (the follower's :meth:`refresh_catalog`
sees the version move and empties the cache).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from exitrank.types import HistoryItem, NeighborContext, UserContext
from retriever_svc.config import IndexConfig
from retriever_svc.embeddings import GCNEmbeddings, fold_in
from retriever_svc.errors import EmbeddingsError, InvalidArgument, ReplyTooLarge, UnknownUser
from retriever_svc.records import (
    CONTEXT_K_RANGE,
    MAX_GET_ITEMS,
    MAX_ENTRY_BYTES,
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
    check_item,
    check_range,
    check_version,
    refusal,
)
from retriever_svc.store import HistoryRow, RedisStore
from retriever_svc.vectors import VectorIndex

log = logging.getLogger(__name__)
_FOLD_CHUNK = 2000
_KEPT_VECTOR_VERSIONS = 2  # older versions whose items stay in memory for pinned rankers


@dataclass(frozen=True)
class _Vectors:
    """One embedding version's items: what fold-in and collaborative soft tokens read."""

    version: str
    item_row: dict[str, int]
    basis: np.ndarray  # (I, d) fold-in basis f
    items: np.ndarray  # (I, d) final item embeddings

    def fold_in(self, item_ids: Iterable[str]) -> np.ndarray | None:
        """e_u = sum_{i in N_u} f_i / sqrt(|N_u|) over the known distinct items (``embeddings.fold_in``)."""
        return fold_in(self.basis, self.item_row, item_ids)

    def item(self, item_id: str) -> np.ndarray | None:
        row = self.item_row.get(item_id)
        return None if row is None else self.items[row]


@dataclass(frozen=True)
class _Snapshot(_Vectors):
    """One published embedding version, as requests see it: its items and its user index."""

    users: VectorIndex = None  # type: ignore[assignment]


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
        self._snapshot: _Snapshot | None = None
        self._lock = asyncio.Lock()  # serialises fold-in writes, remote updates and swaps
        self._touched: set[str] = set()  # users folded in since the version was last confirmed
        self._titles: dict[str, str] = {}
        self.catalog_version = 0  # the catalog's version the title cache matches
        self._kept_vectors: OrderedDict[str, _Vectors] = OrderedDict()  # older versions' items

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

    async def load_embeddings(self, emb: GCNEmbeddings) -> None:
        """Publish a fit from this process: store it in Redis (unless already there), index it,
        fold in the users it lacks, make it current (other replicas follow), swap it in."""
        self._touched = set()  # users touched from now on are re-folded into the new version
        after = await self.store.streams.updates_tail()
        if not await self.store.version_complete(emb.version):
            await self.store.write_version(emb)
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

    async def _build(self, emb: GCNEmbeddings, after: str) -> _Snapshot:
        """Index ``emb`` off the event loop (minutes at a million users); cache it on disk."""
        snap = await asyncio.to_thread(self._snapshot_of, emb)
        if self.config.cache_dir is not None:
            await asyncio.to_thread(snap.users.save, self._cache_path(emb.version),
                                    version=emb.version, after=after)
        return snap

    async def _from_cache(self, version: str) -> tuple[_Snapshot, str] | None:
        path = self._cache_path(version)
        if path is None or not path.with_suffix(".json").is_file():
            return None
        try:
            users, extra = await asyncio.to_thread(VectorIndex.load, path)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("index cache %s unusable (%s): rebuilding", path, exc)
            return None
        if extra.get("version") != version or not await self.store.streams.updates_kept_since(extra["after"]):
            return None
        items = await self.store.load_version(version, with_users=False)
        item_row = {item: row for row, item in enumerate(items.item_ids)}
        return _Snapshot(version=version, item_row=item_row, basis=items.fold_in_basis(), items=items.item,
                         users=users), extra["after"]

    def _cache_path(self, version: str) -> Path | None:
        cache = self.config.cache_dir
        return None if cache is None else Path(cache) / f"{self.store.keys.prefix}-{version}"

    async def _adopt(self, snap: _Snapshot, *, make_current: bool,
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
        # the index's labels and row map are millions of long-lived objects: move them out of
        # the cyclic collector's reach, or each full collection (~30 ms at a million users)
        # stalls every request in flight
        gc.freeze()
        log.info("embedding version %s: %d users (%d folded in, %d replayed), dropped %s",
                 snap.version, len(snap.users), folded, replayed, dropped or "none")

    async def _replay(self, snap: _Snapshot, after: str) -> int:
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

    def _snapshot_of(self, emb: GCNEmbeddings) -> _Snapshot:
        cfg = self.config
        users = VectorIndex(
            emb.user_ids, emb.user, kind=cfg.kind, hnsw_min_users=cfg.hnsw_min_users,
            hnsw_m=cfg.hnsw_m, ef_construction=cfg.ef_construction, ef_search=cfg.ef_search,
        )
        item_row = {item: row for row, item in enumerate(emb.item_ids)}
        return _Snapshot(version=emb.version, item_row=item_row, basis=emb.fold_in_basis(), items=emb.item,
                         users=users)

    async def _fold_in_missing(self, snap: _Snapshot, touched: set[str]) -> int:
        """Fold in users with a history but no vector in ``snap`` (new since the fit; every
        replica finds these itself), and ``touched`` users (their history changed while only
        the old version was kept up to date; announced, as only this replica knows them)."""
        missing = [u for u in await self.store.all_users() if u not in snap.users and u not in touched]
        count = 0
        for users, announce in ((missing, False), (sorted(touched), True)):
            for start in range(0, len(users), _FOLD_CHUNK):
                items = await self.store.user_items(users[start : start + _FOLD_CHUNK])
                count += len(await self._write_fold_ins(snap, items, announce=announce))
        return count

    async def _write_fold_ins(self, snap: _Snapshot, items: dict[str, list[str]], *,
                              announce: bool) -> list[str]:
        """Compute the users' fold-in vectors and store them (Redis, then FAISS); returns the
        users written (a user whose history grew meanwhile is left to whoever grew it)."""
        folded = [(u, v, len(ids)) for u, ids in items.items() if (v := snap.fold_in(ids)) is not None]
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
        """Validate each event; append the valid ones durably to the stream (XADD acknowledged)."""
        valid, errors = [], []
        for offset, event in enumerate(events):
            try:
                valid.append(self.check_event(event))
            except InvalidArgument as exc:
                errors.append(refusal("interaction", first_index + offset, exc))
        await self.store.streams.append_events(valid)
        return IngestResult(len(valid), len(errors), tuple(errors[:MAX_REPORTED_ERRORS]))

    def check_event(self, event: Interaction) -> Interaction:
        """The event if valid now (``records.check_interaction`` against this host's clock), else InvalidArgument."""
        return check_interaction(event, now_ms=int(time.time() * 1000), max_future_s=self.config.max_future_s)

    async def apply_events(self, events: Sequence[Interaction]) -> int:
        """The consumer's step: histories first, then the touched users' fold-in vectors
        (Redis, announced to the other replicas, then FAISS). Returns how many vectors were
        refreshed; idempotent."""
        async with self._lock:
            items = await self.store.apply_events(events)
            self._touched.update(items)
            snap = self._snapshot
            return 0 if snap is None else len(await self._write_fold_ins(snap, items, announce=True))

    # ---- catalog ------------------------------------------------------------------------

    async def upsert_items(self, items: Sequence[CatalogItem], *, first_index: int = 0) -> IngestResult:
        valid, errors = [], []
        for offset, item in enumerate(items):
            try:
                valid.append(check_item(item))
            except InvalidArgument as exc:
                errors.append(refusal("item", first_index + offset, exc))
        if valid:
            version = await self.store.put_items(valid)
            self._note_catalog(version, own=version == self.catalog_version + 1)
            self._remember_titles({item.item_id: item.title for item in valid})
        return IngestResult(len(valid), len(errors), tuple(errors[:MAX_REPORTED_ERRORS]))

    async def refresh_catalog(self) -> int:
        """Reads the catalog's version; a change made elsewhere empties the title cache."""
        self._note_catalog(await self.store.catalog_version())
        return self.catalog_version

    def _note_catalog(self, version: int, *, own: bool = False) -> None:
        if version != self.catalog_version and not own:
            self._titles.clear()  # another replica's upsert: any cached title may be stale
        self.catalog_version = version

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
        if max_reply_bytes is not None:
            await self._check_reply_size(item_ids, vectors, max_reply_bytes)
        found = await self.store.get_items(item_ids)
        items = [item for item in found if item is not None]
        if vectors is not None:
            items = [replace(item, embedding=vectors.item(item.item_id)) for item in items]
        self._remember_titles({item.item_id: item.title for item in items})
        return items, [i for i, item in zip(item_ids, found) if item is None]

    async def _check_reply_size(self, item_ids: Sequence[str], vectors: _Vectors | None, limit: int) -> None:
        per_item = 16 + (5 * vectors.items.shape[1] if vectors is not None else 0)  # framing; 4 B a float + tags
        framing = sum(len(i) + per_item for i in item_ids)
        if framing + len(item_ids) * MAX_ENTRY_BYTES <= limit:
            return  # fits whatever the entries hold: no round trip
        size = framing + sum(await self.store.item_sizes(item_ids))
        if size > limit:
            raise ReplyTooLarge(f"item_ids: the {len(item_ids)} items would make a reply of about {size} bytes, over "
                                f"limits.max_send_bytes={limit}; ask for fewer items per call")

    def _remember_titles(self, titles: dict[str, str]) -> None:
        if len(self._titles) + len(titles) > self.config.title_cache_size:
            self._titles.clear()
        self._titles.update(titles)

    async def _titles_of(self, item_ids: set[str]) -> dict[str, str]:
        misses = [i for i in item_ids if i not in self._titles]
        if misses:  # a second round trip, only until the cache is warm
            found = await self.store.get_items(misses)
            self._remember_titles({i.item_id: i.title for i in found if i is not None})
        return {i: self._titles.get(i, "") for i in item_ids}

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

    async def vectors(self, version: str) -> _Vectors:
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
            cached = _Vectors(version=version, item_row={i: r for r, i in enumerate(emb.item_ids)},
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
        titles = await self._titles_of({item for history in rows for item, _, _ in history})
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
    def _why_no_embedding(snap: _Snapshot | None) -> str:
        if snap is None:
            return "no embedding version is loaded yet (publish a LightGCN fit: serve with --artifacts)"
        return (f"no embedding in version {snap.version}: it is not in the fit and none of its "
                "ingested interactions is with an item the fit knows")


def _history(rows: list[HistoryRow], titles: dict[str, str], vectors: _Vectors | None = None
             ) -> tuple[HistoryItem, ...]:
    return tuple(HistoryItem(item, titles.get(item, ""), rating, ts, vectors.item(item) if vectors else None)
                 for item, ts, rating in rows)
