"""All of the retriever's Redis I/O (redis-py asyncio), and the key layout.

Keys (``P`` is the configured prefix, default ``xr``). The part in braces is the Redis Cluster hash
tag: every key of one user shares ``{u:<user_id>}`` and so one slot, which lets one Lua script
touch a user's history atomically; ``u:``/``i:`` keep the tag non-empty whatever the id is::

    P:{stream}:events          STREAM  the ingest log: fields u, i, r (rating), t (timestamp_ms)
    P:{users}:all              SET     every user id with a history
    P:{u:<user_id>}:hist       ZSET    item_id -> timestamp_ms of the user's latest interaction
    P:{u:<user_id>}:rating     HASH    item_id -> rating of that interaction
    P:{u:<user_id>}:emb        HASH    embedding version -> float32 bytes (d,) of the user
    P:{i:<item_id>}            STRING  catalog entry, JSON {"title": str, "attributes": {str: str}}
    P:{emb}:current            STRING  the published embedding version
    P:{emb}:versions           ZSET    version -> publish time (ms), for keeping the newest few
    P:{emb}:v:<version>        HASH    dim, item_ids (JSON), item and item_foldin (float32 bytes,
                                       (I, d) row-major), meta (JSON), complete ("1" once written)
    P:{emb}:v:<version>:users  SET     users holding a vector of that version

History is idempotent and order-independent: per (user, item) the interaction with the larger
(timestamp_ms, rating) wins, so applying an event twice, or replaying the stream in any order,
leaves the same state. Nothing is pickled: ids are UTF-8, vectors raw float32, the rest JSON.

Every redis-py error becomes ``StoreUnavailable`` here, the one place third-party errors convert.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis import exceptions as rexc

from retriever_svc.embeddings import GCNEmbeddings
from retriever_svc.errors import EmbeddingsError, StoreUnavailable
from retriever_svc.records import CatalogItem, Interaction

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

# The newest ARGV[1] interactions, oldest first, flattened (item, ts, rating, ...). KEYS: hist, rating.
_READ_LUA = """
local entries = redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1, 'WITHSCORES')
if #entries == 0 then return {} end
local ids = {}
for j = 1, #entries, 2 do ids[#ids + 1] = entries[j] end
local ratings = redis.call('HMGET', KEYS[2], unpack(ids))
local out = {}
for j = 1, #ids do
  out[#out + 1] = ids[j]
  out[#out + 1] = entries[2 * j]
  out[#out + 1] = ratings[j] or '1'
end
return out
"""

HistoryRow = tuple[str, int, float]  # (item_id, timestamp_ms, rating)
StreamEntry = tuple[str, dict[bytes, bytes]]
_CHUNK = 2000
T = TypeVar("T")


def _guarded(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Convert redis-py (and socket) errors of ``method`` into ``StoreUnavailable``."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await method(*args, **kwargs)
        except (rexc.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis {method.__name__} failed: {exc}") from exc

    return wrapper


class Keys:
    """Key names of the layout in the module docstring."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}:{{stream}}:events"
        self.users = f"{prefix}:{{users}}:all"
        self.current = f"{prefix}:{{emb}}:current"
        self.versions = f"{prefix}:{{emb}}:versions"

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
    """Histories, catalog, embedding versions and the ingest stream in one Redis.

    Args:
        client: a redis-py asyncio client created with ``decode_responses=False``.
        prefix: key prefix (default ``xr``).
        group: the stream's consumer group (default ``retriever``).
    """

    def __init__(self, *, client: aioredis.Redis, prefix: str = "xr", group: str = "retriever"):
        self.client = client
        self.keys = Keys(prefix)
        self.group = group
        self._apply_sha = self._read_sha = ""

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "xr", group: str = "retriever", timeout_s: float = 5.0
    ) -> RedisStore:
        client = aioredis.Redis.from_url(
            url, decode_responses=False, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        return cls(client=client, prefix=prefix, group=group)

    async def close(self) -> None:
        await self.client.aclose()

    @_guarded
    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def _load_scripts(self) -> None:
        self._apply_sha = await self.client.script_load(_APPLY_LUA)
        self._read_sha = await self.client.script_load(_READ_LUA)

    async def _execute(self, build: Callable[[Any], None]) -> list[Any]:
        """Run one pipeline (one round trip); reload scripts and retry once after NOSCRIPT."""
        if not self._apply_sha:
            await self._load_scripts()
        for attempt in (0, 1):
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            try:
                return await pipe.execute()
            except rexc.NoScriptError:
                if attempt:
                    raise
                await self._load_scripts()  # Redis restarted or SCRIPT FLUSH
        raise AssertionError("unreachable")

    # ---- ingest stream ------------------------------------------------------------------

    @_guarded
    async def append_events(self, events: Sequence[Interaction]) -> list[str]:
        """XADD each event; returns the stream ids once Redis acknowledged every write."""

        def build(pipe: Any) -> None:
            for e in events:
                fields = {"u": e.user_id, "i": e.item_id, "r": repr(float(e.rating)),
                          "t": str(int(e.timestamp_ms))}
                pipe.xadd(self.keys.stream, fields)

        return [_text(entry_id) for entry_id in await self._execute(build)] if events else []

    @_guarded
    async def ensure_group(self) -> None:
        """Create the consumer group (reading from the stream's start) unless it exists."""
        try:
            await self.client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @_guarded
    async def read_events(self, consumer: str, *, count: int, block_ms: int) -> list[StreamEntry]:
        """New entries for ``consumer`` (they stay pending until :meth:`ack`)."""
        reply = await self.client.xreadgroup(
            self.group, consumer, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        return [(_text(i), f) for _, entries in _stream_items(reply) for i, f in entries]

    @_guarded
    async def claim_pending(self, consumer: str, *, min_idle_ms: int, count: int) -> list[StreamEntry]:
        """Take over entries pending longer than ``min_idle_ms`` (a crashed reader's), oldest first.

        Entries trimmed from the stream while pending are acknowledged and dropped.
        """
        claimed: list[StreamEntry] = []
        start = "0-0"
        while True:
            reply = await self.client.xautoclaim(
                self.keys.stream, self.group, consumer, min_idle_ms, start_id=start, count=count
            )
            start = _text(reply[0])
            vanished = []
            for entry in reply[1]:
                if entry is None:
                    continue
                entry_id, fields = entry
                if fields is None:  # trimmed while pending (Redis 6.2 answers nil fields)
                    vanished.append(entry_id)
                else:
                    claimed.append((_text(entry_id), fields))
            if vanished:
                await self.client.xack(self.keys.stream, self.group, *vanished)
            if start == "0-0" or len(claimed) >= count:
                return claimed

    @_guarded
    async def ack(self, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        return int(await self.client.xack(self.keys.stream, self.group, *entry_ids))

    @_guarded
    async def pending_count(self) -> int:
        summary = await self.client.xpending(self.keys.stream, self.group)
        return int(summary["pending"])

    @_guarded
    async def trim_acknowledged(self) -> int:
        """Drop stream entries every group has read and acknowledged; returns how many."""
        groups = await self.client.xinfo_groups(self.keys.stream)
        bounds: list[tuple[int, int]] = []
        for g in groups:
            pending = await self.client.xpending(self.keys.stream, g["name"])
            if pending["pending"]:
                bounds.append(_stream_id(pending["min"]))
            else:
                last = _stream_id(g["last-delivered-id"])
                bounds.append((last[0], last[1] + 1))  # everything read was acknowledged
        if not bounds:
            return 0
        low = min(bounds)
        return int(await self.client.xtrim(self.keys.stream, minid=f"{low[0]}-{low[1]}",
                                             approximate=False))

    # ---- histories ----------------------------------------------------------------------

    @_guarded
    async def apply_events(self, events: Sequence[Interaction]) -> dict[str, list[str]]:
        """Apply events to histories (idempotently); returns each touched user's item ids.

        One round trip: the history scripts, the user set update, then the users' item lists.
        """
        users = list(dict.fromkeys(e.user_id for e in events))

        def build(pipe: Any) -> None:
            for e in events:
                keys = (self.keys.hist(e.user_id), self.keys.rating(e.user_id))
                pipe.evalsha(self._apply_sha, 2, *keys, e.item_id, repr(float(e.rating)),
                             str(int(e.timestamp_ms)))
            if users:
                pipe.sadd(self.keys.users, *users)
            for user in users:
                pipe.zrange(self.keys.hist(user), 0, -1)

        if not events:
            return {}
        replies = await self._execute(build)
        lists = replies[len(events) + 1 :]
        return {user: [_text(i) for i in items] for user, items in zip(users, lists)}

    @_guarded
    async def user_items(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        """Every item id in each user's history (one round trip)."""

        def build(pipe: Any) -> None:
            for user in user_ids:
                pipe.zrange(self.keys.hist(user), 0, -1)

        replies = await self._execute(build) if user_ids else []
        return {user: [_text(i) for i in items] for user, items in zip(user_ids, replies)}

    @_guarded
    async def histories(self, user_ids: Sequence[str], max_history: int) -> list[list[HistoryRow]]:
        """The newest ``max_history`` interactions of each user, oldest first (one round trip)."""

        def build(pipe: Any) -> None:
            for user in user_ids:
                keys = (self.keys.hist(user), self.keys.rating(user))
                pipe.evalsha(self._read_sha, 2, *keys, max_history)

        replies = await self._execute(build) if user_ids else []
        return [
            [(_text(flat[j]), int(float(flat[j + 1])), float(flat[j + 2]))
             for j in range(0, len(flat), 3)]
            for flat in replies
        ]

    @_guarded
    async def all_users(self) -> list[str]:
        return [_text(u) async for u in self.client.sscan_iter(self.keys.users, count=1000)]

    # ---- catalog ------------------------------------------------------------------------

    @_guarded
    async def put_items(self, items: Sequence[CatalogItem]) -> None:
        def build(pipe: Any) -> None:
            for item in items:
                entry = {"title": item.title, "attributes": dict(item.attributes)}
                pipe.set(self.keys.item(item.item_id), json.dumps(entry, ensure_ascii=False))

        if items:
            await self._execute(build)

    @_guarded
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

    @_guarded
    async def current_version(self) -> str | None:
        raw = await self.client.get(self.keys.current)
        return None if raw is None else _text(raw)

    @_guarded
    async def version_complete(self, version: str) -> bool:
        return await self.client.hget(self.keys.version(version), "complete") == b"1"

    @_guarded
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

    @_guarded
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

    @_guarded
    async def load_version(self, version: str) -> GCNEmbeddings:
        """A stored version: its items, fold-in basis and every user vector written under it."""
        fields = await self.client.hgetall(self.keys.version(version))
        if fields.get(b"complete") != b"1":
            raise EmbeddingsError(f"embedding version {version!r} is not completely stored")
        dim = int(fields[b"dim"])
        item_ids = json.loads(fields[b"item_ids"])
        users = [_text(u) async for u in self.client.sscan_iter(
            self.keys.version_users(version), count=1000)]
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

    @_guarded
    async def user_vector(self, user_id: str, version: str) -> np.ndarray | None:
        raw = await self.client.hget(self.keys.emb(user_id), version)
        return None if raw is None else np.frombuffer(raw, dtype=np.float32)

    @_guarded
    async def set_current(self, version: str, *, keep: int) -> list[str]:
        """Point readers at ``version``; drop all but the newest ``keep`` versions (returned)."""
        await self.client.zadd(self.keys.versions, {version: time.time() * 1000})
        await self.client.set(self.keys.current, version)
        stale = await self.client.zrevrange(self.keys.versions, keep, -1)
        dropped = [_text(v) for v in stale if _text(v) != version]
        for old in dropped:
            await self._drop_version(old)
        return dropped

    async def _drop_version(self, version: str) -> None:
        users = [_text(u) async for u in self.client.sscan_iter(
            self.keys.version_users(version), count=1000)]
        for start in range(0, len(users), _CHUNK):
            chunk = users[start : start + _CHUNK]
            await self._execute(lambda pipe, c=chunk: [pipe.hdel(self.keys.emb(u), version) for u in c])
        await self.client.delete(self.keys.version(version), self.keys.version_users(version))
        await self.client.zrem(self.keys.versions, version)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _stream_id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


def _stream_items(reply: Any) -> list[tuple[Any, list[tuple[Any, dict[bytes, bytes]]]]]:
    """XREADGROUP's reply as [(stream, entries)] under RESP2 (list) or RESP3 (dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(name, entries[0] if entries and isinstance(entries[0], list) else entries)
                for name, entries in reply.items()]
    return [(name, entries) for name, entries in reply]


def decode_event(fields: dict[bytes, bytes]) -> Interaction | None:
    """A stream entry's fields as an ``Interaction``, or None when malformed."""
    try:
        return Interaction(
            user_id=fields[b"u"].decode("utf-8"),
            item_id=fields[b"i"].decode("utf-8"),
            rating=float(fields[b"r"]),
            timestamp_ms=int(fields[b"t"]),
        )
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
