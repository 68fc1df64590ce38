"""``BackgroundLoop``: a service loop run as one asyncio task, stopped between iterations.

The stream consumer (``consumer.py``), the replica follower (``replicas.py``) and the index
maintainer (``maintenance.py``) are such loops: ``run`` repeats until :meth:`BackgroundLoop.stop` sets the stopping event, and waits with
:meth:`BackgroundLoop._sleep`, which returns early on a stop.
"""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundLoop:
    """Subclasses implement ``run`` (looping while ``not self._stopping.is_set()``) and name the task."""

    task_name = "retriever-background"

    def __init__(self) -> None:
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        raise NotImplementedError

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=self.task_name)
        return self._task

    async def stop(self) -> None:
        """Finish the iteration in hand, then return (a blocked read ends within its block time)."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less when :meth:`stop` is called meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
