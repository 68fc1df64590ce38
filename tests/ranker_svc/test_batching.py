"""MicroBatcher: concurrent jobs share a run, row limits, deadlines, cancellation, per-job errors (overload is
refused by the ranker's admission before the batcher: ``test_ranker.py``)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ranker_svc.batching import MicroBatcher
from ranker_svc.errors import DeadlineExceeded

pytestmark = pytest.mark.anyio


class Scorer:
    """A real run function: squares numbers, records each batch, optionally slow or failing on 13."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.threads: set[str] = set()

    def __call__(self, jobs: list[int]) -> list[int | BaseException]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(jobs))
        time.sleep(self.delay_s)
        return [ValueError("unlucky") if j == 13 else j * j for j in jobs]


def batcher(scorer: Scorer, **kwargs) -> MicroBatcher:
    settings = {"max_wait_s": 0.05, "max_rows": 100, **kwargs}
    return MicroBatcher(run=scorer, **settings)


async def test_concurrent_jobs_run_together_and_get_their_own_results():
    scorer = Scorer()
    b = batcher(scorer)
    results = await asyncio.gather(*(b.submit(j, rows=3) for j in range(5)))
    assert results == [0, 1, 4, 9, 16]
    assert scorer.batches == [[0, 1, 2, 3, 4]] and b.stats.batches == 1 and b.stats.rows == 15
    assert threading.main_thread().name not in scorer.threads  # the model work leaves the event loop


async def test_a_full_batch_closes_early_and_the_rest_follows():
    scorer = Scorer()
    b = batcher(scorer, max_wait_s=5.0, max_rows=10)
    started = time.perf_counter()
    results = await asyncio.gather(*(b.submit(j, rows=5) for j in range(4)))
    assert time.perf_counter() - started < 4.0  # did not sit out the 5 s wait: 10 rows close a batch
    assert results == [j * j for j in range(4)]
    assert scorer.batches == [[0, 1], [2, 3]]


async def test_jobs_arriving_while_a_batch_runs_form_the_next_batch():
    scorer = Scorer(delay_s=0.2)
    b = batcher(scorer, max_wait_s=0.0)
    first = asyncio.ensure_future(b.submit(1, rows=1))
    await asyncio.sleep(0.05)  # batch [1] is running now
    later = await asyncio.gather(*(b.submit(j, rows=1) for j in (2, 3, 4)))
    assert await first == 1 and later == [4, 9, 16]
    assert scorer.batches == [[1], [2, 3, 4]]


async def test_expired_and_cancelled_jobs_do_no_model_work():
    scorer = Scorer()
    b = batcher(scorer, max_wait_s=0.1)
    expired = asyncio.ensure_future(b.submit(7, rows=1, deadline=time.perf_counter() + 0.01))
    cancelled = asyncio.ensure_future(b.submit(8, rows=1))
    live = asyncio.ensure_future(b.submit(9, rows=1, deadline=time.perf_counter() + 30))
    await asyncio.sleep(0.02)
    cancelled.cancel()
    with pytest.raises(DeadlineExceeded):
        await expired
    assert await live == 81
    assert scorer.batches == [[9]] and b.stats.expired == 1 and b.stats.cancelled == 1


async def test_per_job_failures():
    scorer = Scorer(delay_s=0.1)
    b = batcher(scorer)
    results = await asyncio.gather(b.submit(13, rows=1), b.submit(2, rows=1), b.submit(3, rows=1),
                                   return_exceptions=True)
    assert isinstance(results[0], ValueError) and results[1] == 4 and results[2] == 9
    assert b.pending == 0
    assert await b.submit(5, rows=1) == 25  # the batcher keeps working after failures


async def test_a_failing_run_fails_every_job_of_its_batch():
    def broken(jobs):
        raise RuntimeError("model crashed")

    b = MicroBatcher(run=broken, max_wait_s=0.01, max_rows=10)
    results = await asyncio.gather(b.submit(1, rows=1), b.submit(2, rows=1), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
