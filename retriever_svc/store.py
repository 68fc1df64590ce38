"""All of the retriever's Redis I/O (redis-py asyncio), and the key layout.

Keys (``P`` is the configured prefix, default ``xr``). The part in braces is the Redis Cluster hash
tag: every key of one user shares ``{u:<user_id>}`` and so one slot, which lets one Lua script
touch a user's history atomically; ``u:``/``i:`` keep the tag non-empty whatever the id is::

    P:{stream}:events          STREAM  the ingest log: fields u, i, r (rating), t (timestamp_ms)
    P:{updates}:stream         STREAM  replicas' fold-ins: fields v (version), o (origin), u (ids)
    P:{users}:all              SET     every user id with a history
    P:{u:<user_id>}:hist       ZSET    item_id -> timestamp_ms of the user's latest interaction
    P:{u:<user_id>}:rating     HASH    item_id -> rating of that interaction
    P:{u:<user_id>}:emb        HASH    embedding version -> float32 bytes (d,) of the user
    P:{i:<item_id>}            STRING  catalog entry, JSON {"title": str, "attributes": {str: str}}
    P:{catalog}:version        STRING  a counter UpsertItems increments: the catalog's version
    P:{emb}:current            STRING  the published embedding version
    P:{emb}:versions           ZSET    version -> publish time (ms), for keeping the newest few
    P:{emb}:v:<version>        HASH    dim, item_ids (JSON), item and item_foldin (float32 bytes,
                                       (I, d) row-major), meta (JSON), complete ("1" once written)
    P:{emb}:v:<version>:users  SET     users holding a vector of that version

History is idempotent and order-independent: per (user, item) the interaction with the larger
(timestamp_ms, rating) wins, so applying an event twice, or replaying the stream in any order,
leaves the same state. Nothing is pickled: ids are UTF-8, vectors raw float32, the rest JSON.

Every redis-py error becomes ``StoreUnavailable`` here (and in ``stream.py``, the streams the
store holds as ``store.streams``), the one place third-party errors convert. A ``redis+cluster://`` URL addresses a
Redis Cluster (``redis_io.connect``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from redis import exceptions as rexc

from exitrank.observability.tracing import span
from retriever_svc.embeddings import GCNEmbeddings
from retriever_svc.errors import EmbeddingsError
from retriever_svc.records import CatalogItem, Interaction
from retriever_svc.redis_io import Client, connect, guarded, text
from retriever_svc.stream import Streams

# (user, item): keep the event with the larger (timestamp_ms, rating). KEYS: hist, rating.
_APPLY_LUA = """
local cur = redis.call('ZSCORE', KEYS[1], ARGV[1])
local ts, rating = tonumber(ARGV[3]), tonumber(ARGV[2])
if cur then
  cur = tonumber(cur)
  if cur > ts then return 0 end
  if cur == ts and tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '-1e308') >= rating then
    return 0
  end
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# The newest ARGV[1] interactions, oldest first, as ONE JSON string [[items], [ts], [ratings]]:
# one reply element instead of 3 per interaction (redis-py parses replies in Python: 225
# elements for GetContext's 5 x 15 cost more than the rest of the call). KEYS: hist, rating.
_READ_LUA = """
local entries = redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1, 'WITHSCORES')
if #entries == 0 then return '[[],[],[]]' end
local ids, times = {}, {}
for j = 1, #entries, 2 do
  ids[#ids + 1] = entries[j]
  times[#times + 1] = entries[j + 1]
end
local ratings = redis.call('HMGET', KEYS[2], unpack(ids))
for j = 1, #ids do ratings[j] = ratings[j] or '1' end
return cjson.encode({ids, times, ratings})
"""

# A fold-in vector computed from a history of ARGV[3] distinct items is written only while the
# history still has that many (histories only grow), so of two replicas folding in one user
# concurrently the one that saw the larger history wins. KEYS: emb, hist. ARGV: version, vector, n.
_PUT_VECTOR_LUA = """
if redis.call('ZCARD', KEYS[2]) ~= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

HistoryRow = tuple[str, int, float]  # (item_id, timestamp_ms, rating)
_REDIS_SPAN = {"db.system": "redis"}  # attributes of the trace span of each round trip
_CHUNK = 2000


class Keys:
    """Key names of the layout in the module docstring."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}:{{stream}}:events"
        self.updates = f"{prefix}:{{updates}}:stream"
        self.users = f"{prefix}:{{users}}:all"
        self.current = f"{prefix}:{{emb}}:current"
        self.versions = f"{prefix}:{{emb}}:versions"
        self.catalog = f"{prefix}:{{catalog}}:version"

    def hist(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:hist"

    def rating(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:rating"

    def emb(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:emb"

    def item(self, item_id: str) -> str:
        return f"{self.prefix}:{{i:{item_id}}}"

    def version(self, version: str) -> str:
        return f"{self.prefix}:{{emb}}:v:{version}"

    def version_users(self, version: str) -> str:
        return f"{self.prefix}:{{emb}}:v:{version}:users"


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
        self._apply_sha = self._read_sha = self._put_vector_sha = ""
        self.streams = Streams(client=client, events=self.keys.stream, updates=self.keys.updates, group=group,
                               execute=self._execute)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "xr", group: str = "retriever", timeout_s: float = 5.0,
        tls: dict[str, str] | None = None,
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
        self._apply_sha = await self.client.script_load(_APPLY_LUA)
        self._read_sha = await self.client.script_load(_READ_LUA)
        self._put_vector_sha = await self.client.script_load(_PUT_VECTOR_LUA)

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
    async def apply_events(self, events: Sequence[Interaction]) -> dict[str, list[str]]:
        """Apply events to histories (idempotently); returns each touched user's item ids.

        One round trip: the history scripts, the user set update, then the users' item lists.
        """
        users = list(dict.fromkeys(e.user_id for e in events))

        def build(pipe: Any) -> None:
            for e in events:
                keys = (self.keys.hist(e.user_id), self.keys.rating(e.user_id))
                _evalsha(pipe, self._apply_sha, keys, e.item_id, repr(float(e.rating)),
                         str(int(e.timestamp_ms)))
            if users:
                pipe.sadd(self.keys.users, *users)
            for user in users:
                pipe.zrange(self.keys.hist(user), 0, -1)

        if not events:
            return {}
        replies = await self._execute(build)
        lists = replies[len(events) + 1 :]
        return {user: [text(i) for i in items] for user, items in zip(users, lists)}

    @guarded
    async def import_histories(self, histories: Iterable[tuple[str, Sequence[HistoryRow]]]) -> int:
        """Bulk-load histories (a migration or a benchmark; live events go through the stream):
        ZADD/HSET per user, pipelined in chunks; an interaction already stored with a later
        timestamp is overwritten, unlike the stream's idempotent rule. Returns the user count."""
        count, chunk = 0, []
        for user, rows in histories:
            chunk.append((user, rows))
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
    async def user_items(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        """Every item id in each user's history (one round trip)."""

        def build(pipe: Any) -> None:
            for user in user_ids:
                pipe.zrange(self.keys.hist(user), 0, -1)

        replies = await self._execute(build) if user_ids else []
        return {user: [text(i) for i in items] for user, items in zip(user_ids, replies)}

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
        """Writes the entries and increments the catalog's version in one round trip; the new version."""
        def build(pipe: Any) -> None:
            for item in items:
                entry = {"title": item.title, "attributes": dict(item.attributes)}
                pipe.set(self.keys.item(item.item_id), json.dumps(entry, ensure_ascii=False))
            pipe.incr(self.keys.catalog)

        return int((await self._execute(build))[-1]) if items else await self.catalog_version()

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
    async def version_complete(self, version: str) -> bool:
        return await self.client.hget(self.keys.version(version), "complete") == b"1"

    @guarded
    async def write_version(self, emb: GCNEmbeddings) -> None:
        """Store a fit's users and items under ``emb.version``; ``complete`` is written last."""
        meta_key = self.keys.version(emb.version)
        await self.client.delete(meta_key)
        await self.put_user_vectors(emb.version, zip(emb.user_ids, emb.user))
        fields = {
            "dim": str(emb.dim),
            "item_ids": json.dumps(emb.item_ids, ensure_ascii=False),
            "item": emb.item.tobytes(),
            "item_foldin": emb.fold_in_basis().tobytes(),
            "meta": json.dumps(emb.meta, default=str),
        }
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
        """Write (user, vector, history size) fold-ins unless the history grew meanwhile, and
        when ``announce_as`` is set tell the other replicas (``stream.py``); one round trip.
        True where written."""

        def build(pipe: Any) -> None:
            for user, vector, size in folded:
                _evalsha(pipe, self._put_vector_sha, (self.keys.emb(user), self.keys.hist(user)),
                         version, np.asarray(vector, np.float32).tobytes(), size)
            pipe.sadd(self.keys.version_users(version), *(user for user, _, _ in folded))
            if announce_as is not None:
                self.streams.announce_in(pipe, version, [user for user, _, _ in folded], announce_as)

        replies = await self._execute(build) if folded else []
        return [bool(r) for r in replies[: len(folded)]]

    @guarded
    async def user_vectors(self, user_ids: Sequence[str], version: str) -> list[np.ndarray | None]:
        """Each user's vector of ``version`` (None where absent), one round trip."""

        def build(pipe: Any) -> None:
            for user in user_ids:
                pipe.hget(self.keys.emb(user), version)

        replies = await self._execute(build) if user_ids else []
        return [None if raw is None else np.frombuffer(raw, dtype=np.float32) for raw in replies]

    async def publish_version(self, emb: GCNEmbeddings, *, keep: int) -> list[str]:
        """Store ``emb`` (unless already complete) and make it current; replicas follow it."""
        if not await self.version_complete(emb.version):
            await self.write_version(emb)
        return await self.set_current(emb.version, keep=keep)

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
        users = [text(u) async for u in self.client.sscan_iter(
            self.keys.version_users(version), count=1000)]
        for start in range(0, len(users), _CHUNK):
            chunk = users[start : start + _CHUNK]
            await self._execute(lambda pipe, c=chunk: [pipe.hdel(self.keys.emb(u), version) for u in c])
        await self.client.delete(self.keys.version(version), self.keys.version_users(version))
        await self.client.zrem(self.keys.versions, version)


def _evalsha(pipe: Any, sha: str, keys: Sequence[str], *args: Any) -> None:
    """Queue EVALSHA (raw: redis-py blocks the named method in cluster pipelines, though the
    command routes by its keys like any other)."""
    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
