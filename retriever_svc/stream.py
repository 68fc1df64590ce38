"""The two Redis Streams of the retriever: ``Streams``, which ``RedisStore`` holds as ``store.streams``
(keys in ``store.py``'s layout).

- ``P:{stream}:events``, the ingest log, read by one consumer group: each entry goes to one
  replica, stays pending until that replica acknowledges it after its writes, and is re-claimed
  by the same consumer name after a crash (XREADGROUP from 0) or by any replica once it has been
  pending longer than ``claim_idle_ms`` (XAUTOCLAIM).
- ``P:{updates}:stream``, "these users' vectors of version V changed", appended by the replica
  that applied an event and read (plain XREAD, no group) by every replica, so each replica's
  FAISS index learns the others' fold-ins. Entries older than ``UPDATES_RETENTION_MS`` are
  trimmed, so an index cached less than that long ago can replay every later announcement.

``Streams`` knows only its two keys, the consumer group and how to send a pipeline (the store's, so
its round trips are counted and traced with the rest); the store calls it, never the other way round
(its fold-in pipelines queue the announcement with :meth:`Streams.announce_in`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis import exceptions as rexc

from retriever_svc.records import Interaction
from retriever_svc.redis_io import guarded, stream_id, text

StreamEntry = tuple[str, dict[bytes, bytes]]
Update = tuple[str, str, str, list[str]]  # (entry id, version, origin consumer, user ids)
UPDATES_RETENTION_MS = 6 * 3600 * 1000
BACKLOG_COUNT_CAP = 10_000  # stream lag counted entry by entry (Redis < 7) stops here
_MARGIN_MS = 1000
Execute = Callable[[Callable[[Any], None]], Awaitable[list[Any]]]  # build a pipeline, send it: its replies


class Streams:
    """The ingest stream and the updates stream of one store.

    Args:
        client: the store's redis-py asyncio client.
        events: the ingest stream's key (``P:{stream}:events``).
        updates: the updates stream's key (``P:{updates}:stream``).
        group: the ingest stream's consumer group.
        execute: sends one pipeline in one round trip (``RedisStore``'s).
    """

    def __init__(self, *, client: Any, events: str, updates: str, group: str, execute: Execute) -> None:
        self.client = client
        self.events = events
        self.updates = updates
        self.group = group
        self._execute = execute

    # ---- the ingest stream --------------------------------------------------------------

    @guarded
    async def append_events(self, events: Sequence[Interaction]) -> list[str]:
        """XADD each event; returns the stream ids once Redis acknowledged every write."""

        def build(pipe: Any) -> None:
            for e in events:
                fields = {"u": e.user_id, "i": e.item_id, "r": repr(float(e.rating)),
                          "t": str(int(e.timestamp_ms))}
                pipe.xadd(self.events, fields)

        return [text(entry_id) for entry_id in await self._execute(build)] if events else []

    @guarded
    async def ensure_group(self) -> None:
        """Create the consumer group (reading from the stream's start) unless it exists."""
        try:
            await self.client.xgroup_create(self.events, self.group, id="0", mkstream=True)
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @guarded
    async def read_events(self, consumer: str, *, count: int, block_ms: int) -> list[StreamEntry]:
        """New entries for ``consumer`` (they stay pending until :meth:`ack`)."""
        reply = await self.client.xreadgroup(
            self.group, consumer, {self.events: ">"}, count=count, block=block_ms
        )
        return [(text(i), f) for _, entries in _stream_items(reply) for i, f in entries]

    @guarded
    async def own_pending(self, consumer: str, *, count: int) -> list[StreamEntry]:
        """Entries delivered to ``consumer`` earlier and never acknowledged (its crash's leftovers).

        Entries trimmed from the stream while pending are acknowledged and dropped.
        """
        reply = await self.client.xreadgroup(
            self.group, consumer, {self.events: "0"}, count=count
        )
        entries = [(text(i), f) for _, batch in _stream_items(reply) for i, f in batch]
        vanished = [i for i, fields in entries if not fields]
        if vanished:
            await self.client.xack(self.events, self.group, *vanished)
        return [(i, fields) for i, fields in entries if fields]

    @guarded
    async def claim_pending(self, consumer: str, *, min_idle_ms: int, count: int) -> list[StreamEntry]:
        """Take over entries pending longer than ``min_idle_ms`` (a crashed peer's), oldest first.

        Entries trimmed from the stream while pending are acknowledged and dropped.
        """
        claimed: list[StreamEntry] = []
        start = "0-0"
        while True:
            reply = await self.client.xautoclaim(
                self.events, self.group, consumer, min_idle_ms, start_id=start, count=count
            )
            start = text(reply[0])
            vanished = []
            for entry in reply[1]:
                if entry is None:
                    continue
                entry_id, fields = entry
                if fields is None:  # trimmed while pending (Redis 6.2 answers nil fields)
                    vanished.append(entry_id)
                else:
                    claimed.append((text(entry_id), fields))
            if vanished:
                await self.client.xack(self.events, self.group, *vanished)
            if start == "0-0" or len(claimed) >= count:
                return claimed

    @guarded
    async def ack(self, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        return int(await self.client.xack(self.events, self.group, *entry_ids))

    @guarded
    async def pending_count(self) -> int:
        summary = await self.client.xpending(self.events, self.group)
        return int(summary["pending"])

    @guarded
    async def stream_backlog(self, *, cap: int = BACKLOG_COUNT_CAP) -> tuple[int, int]:
        """``(lag, pending)`` of the group: entries not yet delivered to any of its consumers, and
        entries delivered but not yet acknowledged (applied). Redis 7 answers the lag itself
        (XINFO GROUPS); before that, or when it cannot tell, the entries after the group's last
        delivered id are counted, at most ``cap`` of them."""
        try:
            groups = await self.client.xinfo_groups(self.events)
        except rexc.ResponseError:  # no stream yet: nothing was ingested
            return 0, 0
        info = next((g for g in groups if text(g["name"]) == self.group), None)
        if info is None:  # no consumer has started: everything is lag
            return int(await self.client.xlen(self.events)), 0
        lag = info.get("lag")
        if lag is None:
            last = text(info["last-delivered-id"])
            lag = len(await self.client.xrange(self.events, min=f"({last}", max="+", count=cap))
        return int(lag), int(info["pending"])

    @guarded
    async def trim_acknowledged(self) -> int:
        """Drop stream entries every group has read and acknowledged; returns how many."""
        groups = await self.client.xinfo_groups(self.events)
        bounds: list[tuple[int, int]] = []
        for g in groups:
            pending = await self.client.xpending(self.events, g["name"])
            if pending["pending"]:
                bounds.append(stream_id(pending["min"]))
            else:
                last = stream_id(g["last-delivered-id"])
                bounds.append((last[0], last[1] + 1))  # everything read was acknowledged
        if not bounds:
            return 0
        low = min(bounds)
        return int(await self.client.xtrim(self.events, minid=f"{low[0]}-{low[1]}",
                                             approximate=False))

    # ---- the updates stream -------------------------------------------------------------

    def announce_in(self, pipe: Any, version: str, users: Sequence[str], origin: str) -> None:
        """Queue on ``pipe``: tell the other replicas that these users' vectors changed."""
        fields = {"v": version, "o": origin, "u": "\n".join(users)}  # ids hold no control chars
        oldest = int(time.time() * 1000) - UPDATES_RETENTION_MS
        pipe.xadd(self.updates, fields, minid=f"{oldest}-0", approximate=True)

    @guarded
    async def updates_tail(self) -> str:
        """An id to read after to see only announcements made from now on: the newest one's, or
        (none yet) Redis's clock less a margin (replaying a few more is harmless)."""
        newest = await self.client.xrevrange(self.updates, count=1)
        if newest:
            return text(newest[0][0])
        return f"{max(await self._redis_ms() - _MARGIN_MS, 0)}-0"

    @guarded
    async def updates_kept_since(self, after: str) -> bool:
        """True when no announcement newer than ``after`` can have been trimmed (so replaying
        from ``after`` sees them all): ``after`` is younger than the retention."""
        return stream_id(after)[0] > await self._redis_ms() - UPDATES_RETENTION_MS + _MARGIN_MS

    async def _redis_ms(self) -> int:
        seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    @guarded
    async def read_updates(self, after: str, *, count: int, block_ms: int | None) -> list[Update]:
        """Updates newer than ``after``, waiting up to ``block_ms`` for one (None: no wait)."""
        reply = await self.client.xread({self.updates: after}, count=count, block=block_ms)
        out: list[Update] = []
        for _, entries in _stream_items(reply):
            for entry_id, f in entries:
                users = text(f.get(b"u", b"")).split("\n") if f.get(b"u") else []
                out.append((text(entry_id), text(f.get(b"v", b"")), text(f.get(b"o", b"")), users))
        return out


def _stream_items(reply: Any) -> list[tuple[Any, list[tuple[Any, dict[bytes, bytes]]]]]:
    """XREAD(GROUP)'s reply as [(stream, entries)] under RESP2 (list) or RESP3 (dict)."""
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
