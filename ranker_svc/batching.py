"""Cross-request micro-batching for the ranker core (asyncio, no grpc, no torch).

Concurrent ``Rank`` calls each carry a handful of candidates; the model is far more efficient on one
batch of all of them. :class:`MicroBatcher` collects submissions for at most ``max_wait_s`` after the
oldest one arrived (or until ``max_rows`` candidate rows are queued), then runs them together in a
worker thread, one batch at a time; while a batch runs, the next one fills. Each submission carries
its caller's deadline: one that has passed when its batch is formed is answered
:class:`~ranker_svc.errors.DeadlineExceeded` without model work, and a cancelled caller (a gRPC
client that gave up) is dropped from the batch.

No background task lives longer than the work: a drain task is started by the first submission
and ends when the queue is empty, so the batcher works under any event loop (servers, tests).

The queue has no bound of its own: its callers bound it. The ranker admits at most
``batching.max_pending_requests`` requests, from their retrieval to their scores
(``ranker_svc.ranker.Ranker.rank``), and each admitted request submits one job, so live jobs never
outnumber that; a cancelled caller's job leaves at the next batch, without model work.

    batcher = MicroBatcher(run=scorer.score_jobs, max_wait_s=0.002, max_rows=256)
    decisions = await batcher.submit(job, rows=len(job.suffixes), deadline=time.perf_counter() + 0.5)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ranker_svc.errors import DeadlineExceeded

Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass(eq=False, slots=True)
class _Pending(Generic[Job]):
    job: Job
    rows: int
    deadline: float | None
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class BatchStats:
    """Counters for tests, logs and benchmarks."""

    batches: int = 0
    jobs: int = 0
    rows: int = 0
    expired: int = 0
    cancelled: int = 0
    largest_batch_jobs: int = 0


class MicroBatcher(Generic[Job, Result]):
    """Runs concurrently submitted jobs together.

    Args:
        run: scores a list of jobs in one go (called in a worker thread); returns one result per job,
            or an exception instance for a job that failed on its own.
        max_wait_s: how long the oldest queued job may wait for company (0: only what is queued).
        max_rows: a batch closes once its jobs hold this many rows (a larger single job runs alone).

    ``on_batch(requests=, rows=, seconds=)``, when set, is told of every batch the model ran
    (the ranker's metrics hook).
    """

    def __init__(self, *, run: Callable[[list[Job]], list[Result | BaseException]], max_wait_s: float,
                 max_rows: int) -> None:
        self.run = run
        self.max_wait_s = max_wait_s
        self.max_rows = max_rows
        self.stats = BatchStats()
        self.on_batch: Callable[..., None] | None = None
        self._queue: deque[_Pending[Job]] = deque()
        self._queued_rows = 0
        self._running = 0
        self._drainer: asyncio.Task | None = None
        self._full: asyncio.Event | None = None

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return len(self._queue) + self._running

    async def submit(self, job: Job, *, rows: int, deadline: float | None = None) -> Result:
        """Queues ``job`` (``rows`` candidates) and waits for its result.

        Raises:
            DeadlineExceeded: ``deadline`` (a ``time.perf_counter()`` value) passed before its batch ran.
        """
        loop = asyncio.get_running_loop()
        pending = _Pending(job, rows, deadline, loop.create_future())
        self._queue.append(pending)
        self._queued_rows += rows
        if self._drainer is None or self._drainer.done() or self._drainer.get_loop() is not loop:
            # a fresh context: the drain serves every caller, it must not carry the first one's
            # request id (logs) or trace span
            self._drainer = loop.create_task(self._drain(), context=contextvars.Context())
        elif self._queued_rows >= self.max_rows and self._full is not None:
            self._full.set()
        return await pending.future

    async def _drain(self) -> None:
        """Forms and runs batches until the queue is empty."""
        while self._queue:
            wait = self.max_wait_s - (time.perf_counter() - self._queue[0].queued_at)
            if wait > 0 and self._queued_rows < self.max_rows:
                self._full = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), wait)
                self._full = None
            batch = self._take()
            if batch:
                await self._run(batch)

    def _take(self) -> list[_Pending[Job]]:
        """Up to ``max_rows`` rows of live jobs, oldest first; expired ones are answered at once."""
        batch: list[_Pending[Job]] = []
        rows = 0
        now = time.perf_counter()
        while self._queue and (not batch or rows + self._queue[0].rows <= self.max_rows):
            item = self._queue.popleft()
            self._queued_rows -= item.rows
            if item.future.done():  # the caller was cancelled
                self.stats.cancelled += 1
            elif item.deadline is not None and now >= item.deadline:
                self.stats.expired += 1
                item.future.set_exception(DeadlineExceeded("the deadline passed while waiting for the model"))
            else:
                batch.append(item)
                rows += item.rows
        return batch

    async def _run(self, batch: list[_Pending[Job]]) -> None:
        self._running += len(batch)
        started = time.perf_counter()
        try:
            results: list[Any] = await asyncio.to_thread(self.run, [item.job for item in batch])
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the failure
            results = [exc] * len(batch)
        finally:
            self._running -= len(batch)
        rows = sum(item.rows for item in batch)
        stats = self.stats
        stats.batches += 1
        stats.jobs += len(batch)
        stats.rows += rows
        stats.largest_batch_jobs = max(stats.largest_batch_jobs, len(batch))
        if self.on_batch is not None:
            self.on_batch(requests=len(batch), rows=rows, seconds=time.perf_counter() - started)
        for item, result in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
