"""All of the retriever's Redis I/O (redis-py asyncio), the key layout, and the bound of every key.

Keys (``P`` is the configured prefix, default ``xr``; names in ``keys.py``). The part in braces is
the Redis Cluster hash tag: every key of one user shares ``{u:<user_id>}`` and so one slot, which
lets one Lua script touch a user's history atomically; ``u:``/``i:`` keep the tag non-empty whatever
the id is. Each key, its bound and what enforces it (``index.*``: ``IndexConfig``; a bound of 0 is
none)::

    P:{stream}:events          STREAM  the ingest log: fields u, i, r (rating), t (timestamp_ms). At most
                                       index.max_stream_backlog entries (default 1,000,000): Ingest
                                       answers RESOURCE_EXHAUSTED, storing nothing, while XLEN plus the
                                       call's batch would pass it (concurrent calls may each pass the
                                       check: one server.ingest_batch each beyond); entries every group
                                       acknowledged are trimmed (XTRIM MINID) every second by the consumer
    P:{updates}:stream         STREAM  replicas' fold-ins: fields v (version), o (origin), u (user ids);
                                       one entry per applied batch, trimmed by age (XADD MINID ~, the
                                       last 6 hours: ``stream.UPDATES_RETENTION_MS``), not by count: its
                                       size follows the ingest rate
    P:{users}:all              SET     every user id admitted by Ingest: at most index.max_users (default
                                       10,000,000; ``ADMIT_LUA`` on the set: a new user's events beyond
                                       are refused in ``rejected``). ``import_histories`` (a migration)
                                       adds its users unchecked
    P:{u:<user_id>}:hist       ZSET    item_id -> timestamp_ms of the user's latest interaction with it:
                                       the newest index.history_per_user items (default 500; the oldest
                                       evicted, ties by item id, with their ratings, by ``APPLY_LUA``);
                                       one per admitted user
    P:{u:<user_id>}:rating     HASH    item_id -> rating of that interaction: the same items
    P:{u:<user_id>}:emb        HASH    embedding version -> float32 bytes (d,) of the user, for kept
                                       versions only (a dropped version's field is deleted, also one a
                                       lagging replica folds in afterwards: ``put_fold_ins``), and
                                       ":seq" (``SEQ_FIELD``), the count of the history's changes, which
                                       a fold-in must still match to be written
    P:{i:<item_id>}            STRING  catalog entry, JSON {"title": str, "attributes": {str: str}}: at
                                       most index.max_items ids (default 10,000,000; UpsertItems refuses
                                       new ids beyond), each at most records.MAX_ENTRY_BYTES (a title of
                                       512 characters, 32 attributes: keys of 128, values of 1,024)
    P:{catalog}:items          SET     every catalog id: what index.max_items counts (``ADMIT_LUA``)
    P:{catalog}:version        STRING  a counter UpsertItems increments: the catalog's version
    P:{emb}:current            STRING  the published embedding version
    P:{emb}:versions           ZSET    version -> time (ms) written or last made current: after each
                                       publish the newest ``keep`` (index.keep_versions, default 2; the
                                       trainer's publish_gcn its keep_versions), the one published among
                                       them; one being written joins at its first write, and one whose
                                       publish crashed stays until newer ones push it out
    P:{emb}:v:<version>        HASH    dim, item_ids (JSON), item and item_foldin (float32 bytes,
                                       (I, d) row-major), meta (JSON), created (Unix s of its artifact,
                                       when known), complete ("1" once written): one per version in
                                       ``versions``, deleted with it
    P:{emb}:v:<version>:users  SET     users holding a vector of that version, deleted with it
    P:{probe}:write            STRING  the readiness probe's write (``readiness.py``), expiring after 60 s

Measured (redis-server 6.2, RELIABILITY.md): a history of 500 items (12-byte ids) takes ~52 KB in the
ZSET and ~9.6 KB in the HASH (~125 B an item); a user's emb hash with 2 versions of d = 64, ~0.9 KB;
an item of a short title, ~125 B. So Redis holds about max_users x (history_per_user x 125 B + (keep
+ 1) x (4 d + 200 B)) plus max_items x (entry + ~150 B) plus keep x 8 I d B of item tables plus the
backlog and the updates stream. Size ``maxmemory`` above that, with ``maxmemory-policy noeviction``
(Redis's default): an evicting policy would silently drop histories and unapplied stream entries. At
the limit Redis refuses writes (OOM): Ingest and UpsertItems answer UNAVAILABLE (nothing acknowledged
is lost: the refused write was never acknowledged), the consumer retries with backoff, health turns
NOT_SERVING after ``readiness.STALL_S``, reads keep answering; once the limit is raised or memory
freed the consumer drains the backlog and health is SERVING again (``tests/.../test_readiness.py``).

History is idempotent and order-independent: per (user, item) the interaction with the larger
(timestamp_ms, rating) wins, and a full history keeps the newest items by (timestamp_ms, item id),
so applying an event twice, or replaying the stream in any order, leaves the same state; an event
that changes nothing is not counted, and its user is not folded in again (but a redelivered batch's
are: ``every_user``). Nothing is pickled: ids are UTF-8, vectors raw float32, the rest JSON.

Every redis-py error becomes ``StoreUnavailable`` here (and in ``stream.py``, the streams the store holds
as ``store.streams``), the one place third-party errors convert. ``redis+cluster://``: a Redis Cluster.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
from redis import exceptions as rexc

from exitrank.observability.tracing import span
from retriever_svc.embeddings import GCNEmbeddings
from retriever_svc.errors import EmbeddingsError
from retriever_svc.keys import ADMIT_LUA, APPLY_LUA, HISTORY_PER_USER, PUT_VECTOR_LUA, READ_LUA, SEQ_FIELD, Keys
from retriever_svc.records import CatalogItem, Interaction
from retriever_svc.redis_io import Client, connect, guarded, text
from retriever_svc.stream import Streams

HistoryRow = tuple[str, int, float]  # (item_id, timestamp_ms, rating)


class HistoryState(NamedTuple):
    """A user's history as fold-in reads it: its item ids, and how many times it has changed
    (``SEQ_FIELD``; a fold-in is written only while the count is still the one it read)."""

    items: list[str]
    seq: int


_REDIS_SPAN = {"db.system": "redis"}  # attributes of the trace span of each round trip
_CHUNK = 2000


class RedisStore:
    """Histories, catalog, embedding versions, and the streams (``streams``, ``stream.py``) in one Redis.

    Args:
        client: a redis-py asyncio client (or cluster client) with ``decode_responses=False``.
        prefix: key prefix (default ``xr``).
        group: the stream's consumer group (default ``retriever``).

    ``round_trips`` counts pipelines sent (each is one round trip to each node it touches).
    """

    def __init__(self, *, client: Client, prefix: str = "xr", group: str = "retriever"):
        self.client = client
        self.keys = Keys(prefix)
        self.group = group
        self.round_trips = 0
        self._apply_sha = self._read_sha = self._put_vector_sha = self._admit_sha = ""
        self.streams = Streams(client=client, events=self.keys.stream, updates=self.keys.updates, group=group,
                               execute=self._execute)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "xr", group: str = "retriever", timeout_s: float = 5.0, tls: dict | None = None,
    ) -> RedisStore:
        """A store on ``url``; ``redis+cluster://`` URLs give a Redis Cluster client; ``tls``:
        ``redis_io.tls_options`` for ``rediss://``."""
        return cls(client=connect(url, timeout_s=timeout_s, tls=tls), prefix=prefix, group=group)

    async def close(self) -> None:
        await self.client.aclose()

    @guarded
    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def _load_scripts(self) -> None:
        self._admit_sha = await self.client.script_load(ADMIT_LUA)
        self._apply_sha = await self.client.script_load(APPLY_LUA)
        self._read_sha = await self.client.script_load(READ_LUA)
        self._put_vector_sha = await self.client.script_load(PUT_VECTOR_LUA)

    async def _execute(self, build: Callable[[Any], None]) -> list[Any]:
        """Run one pipeline (one round trip); reload scripts and retry once after NOSCRIPT."""
        if not self._apply_sha:
            await self._load_scripts()
        for attempt in (0, 1):
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            self.round_trips += 1
            try:
                with span("redis.pipeline", kind="client", attributes=_REDIS_SPAN) as current:
                    if current is not None:
                        current.set_attribute("db.operation.batch.size", len(pipe))
                    return await pipe.execute()
            except rexc.NoScriptError:
                if attempt:
                    raise
                await self._load_scripts()  # Redis restarted or SCRIPT FLUSH
        raise AssertionError("unreachable")

    # ---- histories ----------------------------------------------------------------------

    @guarded
    async def apply_events(self, events: Sequence[Interaction], *, history_cap: int = HISTORY_PER_USER,
                           every_user: bool = False) -> dict[str, HistoryState]:
        """Apply events to histories (idempotently; each keeps its newest ``history_cap`` items);
        returns the users whose history changed (``every_user``: every user of the batch, whose
        first delivery may have died before its fold-in), each with its item ids and change count.

        One round trip: the history scripts, the user set update, then the users' states.
        """
        users = list(dict.fromkeys(e.user_id for e in events))

        def build(pipe: Any) -> None:
            for e in events:
                keys = (self.keys.hist(e.user_id), self.keys.rating(e.user_id), self.keys.emb(e.user_id))
                _evalsha(pipe, self._apply_sha, keys, e.item_id, repr(float(e.rating)),
                         str(int(e.timestamp_ms)), history_cap, SEQ_FIELD)
            if users:
                pipe.sadd(self.keys.users, *users)
            self._queue_states(pipe, users)

        if not events:
            return {}
        replies = await self._execute(build)
        changed = {e.user_id for e, applied in zip(events, replies) if applied}
        states = self._states(users, replies[len(events) + 1 :])
        return {user: state for user, state in states.items() if every_user or user in changed}

    def _queue_states(self, pipe: Any, users: Sequence[str]) -> None:
        for user in users:
            pipe.zrange(self.keys.hist(user), 0, -1)
            pipe.hget(self.keys.emb(user), SEQ_FIELD)

    @staticmethod
    def _states(users: Sequence[str], replies: Sequence[Any]) -> dict[str, HistoryState]:
        return {user: HistoryState([text(i) for i in items], int(seq or 0))
                for user, items, seq in zip(users, replies[::2], replies[1::2])}

    @guarded
    async def import_histories(self, histories: Iterable[tuple[str, Sequence[HistoryRow]]], *,
                               history_cap: int = HISTORY_PER_USER) -> int:
        """Bulk-load histories (a migration or a benchmark; live events go through the stream):
        each user's newest ``history_cap`` rows, ZADD/HSET per user, pipelined in chunks; an
        interaction already stored with a later timestamp is overwritten, unlike the stream's
        idempotent rule (and a stored history is not trimmed). Returns the user count."""
        count, chunk = 0, []
        for user, rows in histories:
            chunk.append((user, sorted(rows, key=lambda row: (row[1], row[0]))[-history_cap:]))
            if len(chunk) >= _CHUNK:
                count += await self._import_chunk(chunk)
                chunk = []
        return count + (await self._import_chunk(chunk) if chunk else 0)

    async def _import_chunk(self, chunk: list[tuple[str, Sequence[HistoryRow]]]) -> int:
        def build(pipe: Any) -> None:
            for user, rows in chunk:
                if rows:
                    pipe.zadd(self.keys.hist(user), {item: ts for item, ts, _ in rows})
                    pipe.hset(self.keys.rating(user),
                              mapping={item: repr(float(r)) for item, _, r in rows})
            users = [user for user, rows in chunk if rows]
            if users:
                pipe.sadd(self.keys.users, *users)

        await self._execute(build)
        return len(chunk)

    @guarded
    async def user_items(self, user_ids: Sequence[str]) -> dict[str, HistoryState]:
        """Every item id in each user's history, and its change count (one round trip)."""
        replies = await self._execute(lambda pipe: self._queue_states(pipe, user_ids)) if user_ids else []
        return self._states(user_ids, replies)

    @guarded
    async def histories(self, user_ids: Sequence[str], max_history: int) -> list[list[HistoryRow]]:
        """The newest ``max_history`` interactions of each user, oldest first (one round trip)."""

        def build(pipe: Any) -> None:
            for user in user_ids:
                keys = (self.keys.hist(user), self.keys.rating(user))
                _evalsha(pipe, self._read_sha, keys, max_history)

        replies = await self._execute(build) if user_ids else []
        return [
            [(item, int(float(ts)), float(rating)) for item, ts, rating in zip(*json.loads(raw))]
            for raw in replies
        ]

    @guarded
    async def all_users(self) -> list[str]:
        return [text(u) async for u in self.client.sscan_iter(self.keys.users, count=1000)]

    # ---- catalog ------------------------------------------------------------------------

    @guarded
    async def put_items(self, items: Sequence[CatalogItem]) -> int:
        """Writes the entries (each id joins the catalog's id set first) and increments the
        catalog's version, in one round trip; the new version."""
        def build(pipe: Any) -> None:
            pipe.sadd(self.keys.catalog_items, *(item.item_id for item in items))
            for item in items:
                entry = {"title": item.title, "attributes": dict(item.attributes)}
                pipe.set(self.keys.item(item.item_id), json.dumps(entry, ensure_ascii=False))
            pipe.incr(self.keys.catalog)

        return int((await self._execute(build))[-1]) if items else await self.catalog_version()

    @guarded
    async def admit(self, members: str, ids: Sequence[str], limit: int, *, with_stream: bool = False
                    ) -> tuple[list[bool], int]:
        """``([admitted?] per id, ingest stream length)``: ids of the bounded set ``members``
        (``keys.users`` or ``keys.catalog_items``) stay or join while it holds fewer than ``limit``
        (atomically: one script on the set's slot); the stream's length only ``with_stream``."""
        def build(pipe: Any) -> None:
            if with_stream:
                pipe.xlen(self.keys.stream)
            if ids:
                _evalsha(pipe, self._admit_sha, (members,), limit, *ids)

        replies = await self._execute(build) if ids or with_stream else []
        flags = [bool(flag) for flag in replies[-1]] if ids else []
        return flags, int(replies[0]) if with_stream else 0

    @guarded
    async def probe_write(self) -> None:
        """One tiny write that expires (a readiness probe): refused while Redis is out of memory
        (``maxmemory``, ``noeviction``) or cannot write its append-only file."""
        await self.client.set(self.keys.probe, str(time.time()), px=60_000)

    @guarded
    async def catalog_version(self) -> int:
        """The catalog's version (0: never upserted)."""
        return int(await self.client.get(self.keys.catalog) or 0)

    @guarded
    async def item_sizes(self, item_ids: Sequence[str]) -> list[int]:
        """Bytes of each stored catalog entry's JSON (0 for unknown ids): one round trip of STRLEN,
        so a reply's size is known before any entry is read."""

        def build(pipe: Any) -> None:
            for item_id in item_ids:
                pipe.strlen(self.keys.item(item_id))

        return [int(n) for n in await self._execute(build)] if item_ids else []

    @guarded
    async def get_items(self, item_ids: Sequence[str]) -> list[CatalogItem | None]:
        """Catalog entries in request order, None for unknown ids (one round trip)."""

        def build(pipe: Any) -> None:
            for item_id in item_ids:
                pipe.get(self.keys.item(item_id))

        replies = await self._execute(build) if item_ids else []
        items: list[CatalogItem | None] = []
        for item_id, raw in zip(item_ids, replies):
            if raw is None:
                items.append(None)
                continue
            entry = json.loads(raw)
            items.append(CatalogItem(item_id, entry["title"], dict(entry.get("attributes", {}))))
        return items

    # ---- embedding versions -------------------------------------------------------------

    @guarded
    async def current_version(self) -> str | None:
        raw = await self.client.get(self.keys.current)
        return None if raw is None else text(raw)

    @guarded
    async def published_at(self, version: str) -> float | None:
        """When ``version`` was made current (Unix seconds; None if it is not kept)."""
        score = await self.client.zscore(self.keys.versions, version)
        return None if score is None else float(score) / 1000

    @guarded
    async def kept_versions(self) -> list[str]:
        """Every version Redis keeps (the current one, older ones, one staged by a refit)."""
        return [text(v) for v in await self.client.zrange(self.keys.versions, 0, -1)]

    @guarded
    async def version_complete(self, version: str) -> bool:
        return await self.client.hget(self.keys.version(version), "complete") == b"1"

    @guarded
    async def version_created(self, version: str) -> float | None:
        """When ``version``'s artifact was made (Unix seconds; None: not recorded)."""
        raw = await self.client.hget(self.keys.version(version), "created")
        return None if raw is None else float(raw)

    @guarded
    async def write_version(self, emb: GCNEmbeddings, *, created: float | None = None) -> None:
        """Store a fit's users and items under ``emb.version``, without making it current;
        ``complete`` is written last. The version joins ``versions`` at once: fold-ins into it are
        made before it is current (``Retriever.load_embeddings``) and ``put_fold_ins`` undoes those
        into a version not in ``versions``; and the newest-``keep`` rule drops it in time if it is
        never made current (a publish that crashed). ``created``: when its artifact was made (Unix
        seconds), which orders releases (``releases.py``)."""
        meta_key = self.keys.version(emb.version)
        await self.client.delete(meta_key)
        await self.client.zadd(self.keys.versions, {emb.version: time.time() * 1000}, nx=True)
        await self.put_user_vectors(emb.version, zip(emb.user_ids, emb.user))
        fields = {
            "dim": str(emb.dim),
            "item_ids": json.dumps(emb.item_ids, ensure_ascii=False),
            "item": emb.item.tobytes(),
            "item_foldin": emb.fold_in_basis().tobytes(),
            "meta": json.dumps(emb.meta, default=str),
        } | ({} if created is None else {"created": repr(float(created))})
        await self.client.hset(meta_key, mapping=fields)
        await self.client.hset(meta_key, "complete", "1")

    @guarded
    async def put_user_vectors(self, version: str, vectors: Iterable[tuple[str, np.ndarray]]) -> None:
        """HSET each user's float32 vector under ``version`` (pipelined in chunks)."""
        batch: list[tuple[str, np.ndarray]] = []
        for pair in vectors:
            batch.append(pair)
            if len(batch) >= _CHUNK:
                await self._put_vectors(version, batch)
                batch = []
        if batch:
            await self._put_vectors(version, batch)

    async def _put_vectors(self, version: str, batch: list[tuple[str, np.ndarray]]) -> None:
        def build(pipe: Any) -> None:
            for user, vector in batch:
                pipe.hset(self.keys.emb(user), version, np.asarray(vector, np.float32).tobytes())
            pipe.sadd(self.keys.version_users(version), *(user for user, _ in batch))

        await self._execute(build)

    @guarded
    async def load_version(self, version: str, *, with_users: bool = True) -> GCNEmbeddings:
        """A stored version: its items, fold-in basis and every user vector written under it
        (none with ``with_users=False``, when the users come from an index cache)."""
        fields = await self.client.hgetall(self.keys.version(version))
        if fields.get(b"complete") != b"1":
            raise EmbeddingsError(f"embedding version {version!r} is not completely stored")
        dim = int(fields[b"dim"])
        item_ids = json.loads(fields[b"item_ids"])
        users = [text(u) async for u in self.client.sscan_iter(
            self.keys.version_users(version), count=1000)] if with_users else []
        vectors: list[np.ndarray] = []
        kept: list[str] = []
        for start in range(0, len(users), _CHUNK):
            chunk = users[start : start + _CHUNK]
            raws = await self._execute(
                lambda pipe, c=chunk: [pipe.hget(self.keys.emb(u), version) for u in c]
            )
            for user, raw in zip(chunk, raws):
                if raw is not None:
                    kept.append(user)
                    vectors.append(np.frombuffer(raw, dtype=np.float32))
        return GCNEmbeddings(
            user_ids=kept,
            item_ids=item_ids,
            user=np.stack(vectors) if vectors else np.zeros((0, dim), np.float32),
            item=np.frombuffer(fields[b"item"], np.float32).reshape(len(item_ids), dim),
            item_foldin=np.frombuffer(fields[b"item_foldin"], np.float32).reshape(-1, dim),
            version=version,
            meta=json.loads(fields.get(b"meta", b"{}")),
        )

    @guarded
    async def user_vector(self, user_id: str, version: str) -> np.ndarray | None:
        raw = await self.client.hget(self.keys.emb(user_id), version)
        return None if raw is None else np.frombuffer(raw, dtype=np.float32)

    @guarded
    async def put_fold_ins(self, version: str, folded: Sequence[tuple[str, np.ndarray, int]],
                           *, announce_as: str | None = None) -> list[bool]:
        """Write (user, vector, history change count) fold-ins unless the history changed
        meanwhile, and when ``announce_as`` is set tell the other replicas (``stream.py``); True
        where written. A version dropped meanwhile (a replica still serving it) keeps nothing:
        the writes are undone, so no vector of a dropped version outlives it."""

        def build(pipe: Any) -> None:
            for user, vector, seq in folded:
                _evalsha(pipe, self._put_vector_sha, (self.keys.emb(user),), version,
                         np.asarray(vector, np.float32).tobytes(), seq, SEQ_FIELD)
            pipe.sadd(self.keys.version_users(version), *(user for user, _, _ in folded))
            if announce_as is not None:
                self.streams.announce_in(pipe, version, [user for user, _, _ in folded], announce_as)

        if not folded:
            return []
        replies = await self._execute(build)
        # after the writes, in a round trip of its own (a cluster pipeline does not order nodes):
        # _drop_version takes the version out of ``versions`` before it scans its users
        if await self.client.zscore(self.keys.versions, version) is None:
            await self._execute(lambda pipe: [pipe.hdel(self.keys.emb(u), version) for u, _, _ in folded]
                                + [pipe.delete(self.keys.version_users(version))])
        return [bool(r) for r in replies[: len(folded)]]

    @guarded
    async def user_vectors(self, user_ids: Sequence[str], version: str) -> list[np.ndarray | None]:
        """Each user's vector of ``version`` (None where absent), one round trip."""

        def build(pipe: Any) -> None:
            for user in user_ids:
                pipe.hget(self.keys.emb(user), version)

        replies = await self._execute(build) if user_ids else []
        return [None if raw is None else np.frombuffer(raw, dtype=np.float32) for raw in replies]

    @guarded
    async def set_current(self, version: str, *, keep: int) -> list[str]:
        """Point readers at ``version``; drop all but the newest ``keep`` versions (returned)."""
        await self.client.zadd(self.keys.versions, {version: time.time() * 1000})
        await self.client.set(self.keys.current, version)
        stale = await self.client.zrevrange(self.keys.versions, keep, -1)
        dropped = [text(v) for v in stale if text(v) != version]
        for old in dropped:
            await self._drop_version(old)
        return dropped

    async def _drop_version(self, version: str) -> None:
        """Out of ``versions`` first: a fold-in written after this sees it gone and undoes itself
        (``put_fold_ins``), one written before is among the users scanned here."""
        await self.client.zrem(self.keys.versions, version)
        users = [text(u) async for u in self.client.sscan_iter(
            self.keys.version_users(version), count=1000)]
        for start in range(0, len(users), _CHUNK):
            chunk = users[start : start + _CHUNK]
            await self._execute(lambda pipe, c=chunk: [pipe.hdel(self.keys.emb(u), version) for u in c])
        await self.client.delete(self.keys.version(version), self.keys.version_users(version))


def _evalsha(pipe: Any, sha: str, keys: Sequence[str], *args: Any) -> None:
    """Queue EVALSHA (raw: redis-py blocks the named method in cluster pipelines, though the
    command routes by its keys like any other)."""
    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
