"""``IndexMaintainer``: rebuilds the served FAISS index when it is due, off the event loop.

An ``auto`` index that was built exact (fewer than ``index.hnsw_min_users`` users) and has grown
past that becomes HNSW online; an HNSW index whose tombstones (rows replaced by newer fold-ins)
outnumber its live rows is rebuilt without them (``VectorIndex.rebuild_due``). The build runs in
a worker thread (``Retriever.rebuild_index``): requests keep searching the old index, fold-ins made
meanwhile are replayed into the new one, and the swap is one assignment.

Replicas share one stream, so they grow at the same pace and would all rebuild at the same moment,
each slowing its searches (HNSW construction takes the cores) at once. So once a rebuild is due
each replica waits a random delay, drawn independently in ``[0, index.rebuild_jitter_s)``, before
it starts: their rebuilds spread over that window.
"""

from __future__ import annotations

import logging
import random

from retriever_svc.background import BackgroundLoop
from retriever_svc.config import IndexConfig
from retriever_svc.index import Retriever

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often the loop asks whether a rebuild is due


class IndexMaintainer(BackgroundLoop):
    """Args: retriever: the core whose index is kept in shape; config: the ``index`` section
    (``rebuild_jitter_s``); rng: the delay's source (default: seeded from the OS, so every replica
    draws its own)."""

    task_name = "retriever-index-maintainer"

    def __init__(self, *, retriever: Retriever, config: IndexConfig, rng: random.Random | None = None) -> None:
        self.retriever = retriever
        self.config = config
        self.rng = rng or random.Random()  # noqa: S311 - spreading work, not a secret
        self.rebuilds: list[tuple[str, float]] = []  # (what, the delay waited) per rebuild done
        super().__init__()

    def delay(self) -> float:
        """The wait before a due rebuild starts: uniform in ``[0, rebuild_jitter_s)``."""
        return self.rng.uniform(0.0, self.config.rebuild_jitter_s)

    async def run(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            due = self.retriever.rebuild_due()
            if due is None:
                await self._sleep(POLL_S)
                continue
            wait = self.delay()
            log.info("index rebuild (%s) due: starting in %.1fs (jitter, so replicas do not all rebuild at once)",
                     due, wait)
            await self._sleep(wait)
            if self._stopping.is_set():
                return
            try:
                done = await self.retriever.rebuild_index()
            except Exception:  # noqa: BLE001 - a failed build leaves the old index serving; try again later
                log.exception("index rebuild failed; the old index keeps serving, retrying in %.0fs", backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            backoff = 1.0
            if done is not None:
                self.rebuilds.append((done, wait))
