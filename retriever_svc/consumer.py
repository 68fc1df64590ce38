"""The stream consumer: applies ingested interactions to histories and embeddings, at least once.

One consumer group (``redis.group``) reads the ingest stream. For each batch the consumer
1. reads entries (XREADGROUP; they are now pending for this consumer),
2. applies them to histories (idempotent, ``store.py``) and refreshes the touched users' fold-in
   vectors in Redis and FAISS (``Retriever.apply_events``),
3. only then acknowledges them (XACK).

A crash anywhere before 3 leaves the entries pending; the next start under the same consumer name
re-reads its own pending entries (XREADGROUP from 0) and applies them again, which changes nothing
that was already applied. Entries pending longer than ``redis.claim_idle_ms`` (a crashed peer's
that did not come back) are claimed by any replica, at start and while running, and entries every
group has acknowledged are trimmed from the stream. Replicas sharing the group never take each
other's in-flight entries, so each event is applied by one replica (give each a distinct
``redis.consumer``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from retriever_svc.background import BackgroundLoop
from retriever_svc.config import RedisConfig
from retriever_svc.errors import InvalidArgument, StoreUnavailable
from retriever_svc.index import Retriever
from retriever_svc.records import Interaction, check_interaction
from retriever_svc.store import RedisStore
from retriever_svc.stream import StreamEntry, decode_event

log = logging.getLogger(__name__)


class StreamConsumer(BackgroundLoop):
    """Runs the consumer loop as an asyncio task until :meth:`stop`.

    Args:
        retriever: the core whose ``apply_events`` updates histories and embeddings.
        store: the Redis access layer holding the stream.
        config: the ``redis`` section (group, consumer name, batch size, timings).
    """

    task_name = "retriever-stream-consumer"

    def __init__(self, *, retriever: Retriever, store: RedisStore, config: RedisConfig) -> None:
        self.retriever = retriever
        self.store = store
        self.config = config
        self.applied = 0  # entries acknowledged by this process
        super().__init__()

    async def run(self) -> None:
        backoff, started, last_claim = 0.1, False, time.monotonic()
        while not self._stopping.is_set():
            try:
                if not started:
                    await self.store.streams.ensure_group()
                    await self.recover()  # whatever a previous run of this consumer left pending
                    await self.reclaim(min_idle_ms=self.config.claim_idle_ms)
                    started = True
                await self.step()
                if time.monotonic() - last_claim > self.config.claim_idle_ms / 1000:
                    await self.reclaim(min_idle_ms=self.config.claim_idle_ms)
                    await self.store.streams.trim_acknowledged()
                    last_claim = time.monotonic()
                backoff = 0.1
            except StoreUnavailable as exc:
                log.warning("stream consumer: %s; retrying in %.1fs", exc, backoff)
                started = False  # once Redis is back, first redo the batch left pending
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug must not end the loop silently; entries stay pending
                log.exception("stream consumer: batch failed; its entries stay pending")
                await self._sleep(1.0)

    async def step(self) -> int:
        """Read one batch (waiting up to ``block_ms``), apply it, acknowledge it; returns its size."""
        entries = await self.store.streams.read_events(
            self.config.consumer, count=self.config.read_count, block_ms=self.config.block_ms
        )
        return await self._process(entries)

    async def recover(self) -> int:
        """Apply and acknowledge this consumer's own pending entries; returns how many."""
        total = 0
        while entries := await self.store.streams.own_pending(self.config.consumer,
                                                              count=self.config.read_count):
            total += await self._process(entries)
        return total

    async def reclaim(self, *, min_idle_ms: int) -> int:
        """Claim, apply and acknowledge entries pending at least ``min_idle_ms``; returns how many."""
        total = 0
        while True:
            entries = await self.store.streams.claim_pending(
                self.config.consumer, min_idle_ms=min_idle_ms, count=self.config.read_count
            )
            if not entries:
                return total
            total += await self._process(entries)

    async def _process(self, entries: Sequence[StreamEntry]) -> int:
        if not entries:
            return 0
        events = [e for entry_id, fields in entries if (e := _valid(entry_id, fields)) is not None]
        if events:
            await self.retriever.apply_events(events)
        await self.store.streams.ack([entry_id for entry_id, _ in entries])  # only after the writes
        self.applied += len(entries)
        return len(entries)



def _valid(entry_id: str, fields: dict[bytes, bytes]) -> Interaction | None:
    """The entry's event, or None (logged, then acknowledged) when no retry could make it valid."""
    event = decode_event(fields)
    try:
        return check_interaction(event) if event is not None else None
    except InvalidArgument as exc:
        log.warning("dropping stream entry %s: %s", entry_id, exc)
        return None
    finally:
        if event is None:
            log.warning("dropping malformed stream entry %s: %r", entry_id, fields)
