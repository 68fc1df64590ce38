"""The stream consumer: applies ingested interactions to histories and embeddings, at least once.

One consumer group (``redis.group``) reads the ingest stream. For each batch the consumer
1. reads entries (XREADGROUP; they are now pending for this consumer),
2. applies them to histories (idempotent, ``store.py``) and refreshes the touched users' fold-in
   vectors in Redis and FAISS (``Retriever.apply_events``),
3. only then acknowledges them (XACK).

A crash anywhere before 3 leaves the entries pending; the next start under the same consumer name
re-reads its own pending entries (XREADGROUP from 0) and applies them again, which changes nothing
that was already applied; every user of such a redelivered batch is folded in again, since a crash
between the history write and the fold-in leaves a history that re-applying cannot show as changed.
Entries pending longer than ``redis.claim_idle_ms`` (a crashed peer's that did not come back) are
claimed by any replica, at start and while running, and entries every group has acknowledged are
trimmed from the stream every ``TRIM_INTERVAL_S``. Replicas sharing the group never take each
other's in-flight entries, so each event is applied by one replica (give each a distinct
``redis.consumer``).

The loop never stops for good: any failure, in a batch or in the recovery at (re)start, is logged
and retried with exponential backoff (0.1 s doubling to ``MAX_BACKOFF_S``), the batch staying
pending; :attr:`StreamConsumer.failing_since` says since when nothing could be applied (health
turns NOT_SERVING once that lasts, ``readiness.py``). When Redis can write again the backlog drains
by itself.
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
TRIM_INTERVAL_S = 1.0  # how often acknowledged entries are trimmed from the stream
MAX_BACKOFF_S = 5.0


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
        self.failures = 0  # failed iterations (each retried)
        self.failing_since: float | None = None  # time.monotonic() of the first failure in a row
        self.last_error = ""
        super().__init__()

    async def run(self) -> None:
        backoff, started = 0.1, False
        last_claim = last_trim = time.monotonic()
        while not self._stopping.is_set():
            try:
                if not started:
                    await self.store.streams.ensure_group()
                    await self.recover()  # whatever a previous run of this consumer left pending
                    await self.reclaim(min_idle_ms=self.config.claim_idle_ms)
                    started = True
                await self.step()
                now = time.monotonic()
                if now - last_claim > self.config.claim_idle_ms / 1000:
                    await self.reclaim(min_idle_ms=self.config.claim_idle_ms)
                    last_claim = now
                if now - last_trim > TRIM_INTERVAL_S:
                    await self.store.streams.trim_acknowledged()
                    last_trim = now
            except Exception as exc:  # noqa: BLE001 - a failure must never end the loop; entries stay pending
                self._failed(exc, backoff)
                started = False  # once Redis answers again, first redo the batch left pending
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            else:
                backoff, self.failing_since = 0.1, None

    def _failed(self, exc: Exception, backoff: float) -> None:
        first = self.failing_since is None
        self.failures += 1
        self.failing_since = self.failing_since or time.monotonic()
        self.last_error = str(exc) if isinstance(exc, StoreUnavailable) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, StoreUnavailable):
            log.warning("stream consumer: %s; retrying in %.1fs", exc, backoff)
        else:  # a bug: its stack once per run of failures, then one line each
            log.error("stream consumer: batch failed (%s); its entries stay pending, retrying in %.1fs",
                      self.last_error, backoff, exc_info=first)

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
            total += await self._process(entries, redelivered=True)
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
            total += await self._process(entries, redelivered=True)

    async def _process(self, entries: Sequence[StreamEntry], *, redelivered: bool = False) -> int:
        if not entries:
            return 0
        events = [e for entry_id, fields in entries if (e := _valid(entry_id, fields)) is not None]
        if events:
            await self.retriever.apply_events(events, redelivered=redelivered)
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
