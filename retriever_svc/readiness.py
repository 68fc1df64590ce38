"""``Readiness``: whether the retriever should report SERVING, and why not. No grpc (``server.py``
turns the answer into the health status, polling it every ``READINESS_POLL_S``).

SERVING needs both:

1. Something can answer: the in-memory index (NearestUsers, also while Redis is down) or Redis.
   Neither (no embeddings loaded and Redis unreachable): NOT_SERVING at once.
2. Events can be applied: Redis accepts a write (a tiny expiring key, ``RedisStore.probe_write``:
   refused when Redis is out of memory, cannot write its append-only file (a full disk: MISCONF, or
   the embedded server restarted refusing writes, ``exitrank.redis_server``), or is unreachable) and
   the stream consumer is not failing. Once either has lasted ``STALL_S``, NOT_SERVING, so a replica
   whose ingested events would wait (a full disk, ``maxmemory`` reached) leaves the load balancer;
   a shorter blip (a Redis restart) does not take it out of rotation.
"""

from __future__ import annotations

import time
from typing import Protocol

from retriever_svc.errors import StoreUnavailable
from retriever_svc.index import Retriever
from retriever_svc.store import RedisStore

STALL_S = 5.0  # events not applicable this long: NOT_SERVING


class ConsumerState(Protocol):
    """What readiness reads of the stream consumer (``consumer.StreamConsumer``)."""

    failing_since: float | None  # time.monotonic() of the first failure in a row, None while applying
    last_error: str


class Readiness:
    """Args: retriever: the core (its loaded embeddings); store: Redis; consumer: the stream
    consumer, None when none runs; stall_s: how long events may be unappliable while SERVING."""

    def __init__(self, *, retriever: Retriever, store: RedisStore, consumer: ConsumerState | None = None,
                 stall_s: float = STALL_S) -> None:
        self.retriever = retriever
        self.store = store
        self.consumer = consumer
        self.stall_s = stall_s
        self._unwritable_since: float | None = None
        self._unwritable_error = ""

    async def check(self) -> tuple[bool, str]:
        """``(serving, reason)``; the reason says what is wrong (or "ready")."""
        now = time.monotonic()
        try:
            await self.store.probe_write()
            self._unwritable_since = None
        except StoreUnavailable as exc:
            self._unwritable_since = self._unwritable_since or now
            self._unwritable_error = str(exc)
            if not self.retriever.embedding_version and not await self._answers():
                return False, "no embeddings in memory and Redis is unreachable"
        stalls = [(self._unwritable_since, f"Redis refuses writes ({self._unwritable_error})")]
        if self.consumer is not None:
            stalls.append((self.consumer.failing_since, f"the stream consumer fails ({self.consumer.last_error})"))
        for since, why in stalls:
            if since is not None and now - since >= self.stall_s:
                return False, f"ingested events cannot be applied for {now - since:.0f}s: {why}"
        return True, "ready"

    async def _answers(self) -> bool:
        try:
            return await self.store.ping()
        except StoreUnavailable:
            return False
