"""``Catalog``: the retriever's catalog (entries in Redis, titles cached in process). No grpc.

Titles come from an in-process cache filled from the catalog on a miss, so ``get_context`` is one
Redis round trip once titles are cached; the cache holds at most ``index.title_cache_size`` titles
(it is emptied when a batch would pass that). Every UpsertItems increments the catalog's version in
Redis (:attr:`Catalog.version`, in every GetContext and GetItems answer, so rankers re-read their
cached titles); this process's own upserts update the cache, and another replica's show within
``index.version_poll_s`` (the follower's :meth:`Catalog.refresh` sees the version move and empties
the cache).

Bounded: at most ``index.max_items`` catalog ids (``P:{catalog}:items``). An upsert of an id the
catalog holds always passes; a new id beyond the bound is refused in the summary's ``rejected``
("item N: item_id the catalog holds its maximum of M items ..."), so a client that invents ids
cannot grow Redis without end. Each entry is bounded by ``records.check_item``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from retriever_svc.config import IndexConfig
from retriever_svc.errors import InvalidArgument, ReplyTooLarge
from retriever_svc.records import MAX_ENTRY_BYTES, MAX_REPORTED_ERRORS, CatalogItem, IngestResult, check_item, refusal
from retriever_svc.snapshot import ItemVectors
from retriever_svc.store import RedisStore


class Catalog:
    """Args: store: the Redis access layer; config: the ``index`` section (``title_cache_size``,
    ``max_items``)."""

    def __init__(self, *, store: RedisStore, config: IndexConfig) -> None:
        self.store = store
        self.config = config
        self.version = 0  # the catalog's version the title cache matches
        self._titles: dict[str, str] = {}

    async def upsert(self, items: Sequence[CatalogItem], *, first_index: int = 0) -> IngestResult:
        """Validate items and store the valid ones; a new id beyond ``index.max_items`` is refused."""
        valid: list[tuple[int, CatalogItem]] = []
        errors: list[tuple[int, str]] = []
        for offset, item in enumerate(items):
            try:
                valid.append((offset, check_item(item)))
            except InvalidArgument as exc:
                errors.append((offset, refusal("item", first_index + offset, exc)))
        admitted = await self._admitted({item.item_id for _, item in valid})
        limit = self.config.max_items
        for offset, item in valid:
            if item.item_id not in admitted:
                errors.append((offset, f"item {first_index + offset}: item_id the catalog holds its maximum of "
                                       f"{limit} items (index.max_items); new items are refused"))
        stored = [item for _, item in valid if item.item_id in admitted]
        if stored:
            version = await self.store.put_items(stored)
            self._note(version, own=version == self.version + 1)
            self.remember({item.item_id: item.title for item in stored})
        reasons = tuple(reason for _, reason in sorted(errors)[:MAX_REPORTED_ERRORS])
        return IngestResult(len(stored), len(errors), reasons)

    async def _admitted(self, ids: set[str]) -> set[str]:
        """The ids the bound admits: every id the catalog holds, new ones while there is room."""
        if not ids or not self.config.max_items:
            return ids
        ordered = sorted(ids)
        admitted, _ = await self.store.admit(self.store.keys.catalog_items, ordered, self.config.max_items)
        return {i for i, ok in zip(ordered, admitted) if ok}

    async def refresh(self) -> int:
        """Reads the catalog's version; a change made elsewhere empties the title cache."""
        self._note(await self.store.catalog_version())
        return self.version

    def _note(self, version: int, *, own: bool = False) -> None:
        if version != self.version and not own:
            self._titles.clear()  # another replica's upsert: any cached title may be stale
        self.version = version

    async def get(self, item_ids: Sequence[str], *, vectors: ItemVectors | None = None,
                  max_reply_bytes: int | None = None) -> tuple[list[CatalogItem], list[str]]:
        """(found items in request order, missing ids), each item with its vector of ``vectors``;
        ReplyTooLarge before any entry is read when the stored sizes exceed ``max_reply_bytes``."""
        if max_reply_bytes is not None:
            await self._check_reply_size(item_ids, vectors, max_reply_bytes)
        found = await self.store.get_items(item_ids)
        items = [item for item in found if item is not None]
        if vectors is not None:
            items = [replace(item, embedding=vectors.item(item.item_id)) for item in items]
        self.remember({item.item_id: item.title for item in items})
        return items, [i for i, item in zip(item_ids, found) if item is None]

    async def _check_reply_size(self, item_ids: Sequence[str], vectors: ItemVectors | None, limit: int) -> None:
        per_item = 16 + (5 * vectors.items.shape[1] if vectors is not None else 0)  # framing; 4 B a float + tags
        framing = sum(len(i) + per_item for i in item_ids)
        if framing + len(item_ids) * MAX_ENTRY_BYTES <= limit:
            return  # fits whatever the entries hold: no round trip
        size = framing + sum(await self.store.item_sizes(item_ids))
        if size > limit:
            raise ReplyTooLarge(f"item_ids: the {len(item_ids)} items would make a reply of about {size} bytes, over "
                                f"limits.max_send_bytes={limit}; ask for fewer items per call")

    def remember(self, titles: dict[str, str]) -> None:
        if len(self._titles) + len(titles) > self.config.title_cache_size:
            self._titles.clear()
        self._titles.update(titles)

    async def titles_of(self, item_ids: set[str]) -> dict[str, str]:
        """Each id's title ("" for an id the catalog lacks: the ranker shows no text for it)."""
        misses = [i for i in item_ids if i not in self._titles]
        if misses:  # a second round trip, only until the cache is warm
            found = await self.store.get_items(misses)
            self.remember({i.item_id: i.title for i in found if i is not None})
        return {i: self._titles.get(i, "") for i in item_ids}
