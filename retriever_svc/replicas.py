"""``ReplicaFollower``: keeps one replica's in-process index in step with Redis and its peers.

Replicas share Redis and one stream consumer group; each keeps its own FAISS index. Two things
change under a replica without its own consumer seeing them, and this loop follows both:

1. Fold-ins applied by a peer: the peer announces "users U of version V changed" on the updates
   stream (``stream.py``) after writing their vectors; this loop reads every announcement
   (XREAD, blocking up to ``redis.block_ms``), skips its own, and copies the vectors from Redis
   into its index (``Retriever.apply_remote_updates``).
2. A new embedding version published elsewhere (``trainer.publishing.publish_gcn`` or another replica):
   every ``index.version_poll_s`` seconds it compares Redis's current version with its own and
   adopts a new one (``Retriever.follow_current``): indexed off the event loop, then swapped in
   atomically. Announcements made while adopting are read afterwards and applied to the new
   version, so none is lost in the swap. At the same poll it reads the catalog's version
   (``Retriever.refresh_catalog``): a peer's UpsertItems empties this replica's title cache.
3. A release root's ``current`` link moved (``--artifacts ROOT/current``; ``releases.ReleaseWatch``),
   checked at the same poll: its embeddings are made current unless older, which rolls a publish
   that crashed after the flip forward.
"""

from __future__ import annotations

import logging
import time

from retriever_svc.background import BackgroundLoop
from retriever_svc.config import IndexConfig, RedisConfig
from retriever_svc.errors import EmbeddingsError, StoreUnavailable
from retriever_svc.index import Retriever
from retriever_svc.releases import ReleaseWatch
from retriever_svc.store import RedisStore

log = logging.getLogger(__name__)


class ReplicaFollower(BackgroundLoop):
    """Runs the follow loop as an asyncio task until :meth:`stop`.

    Args:
        retriever: this replica's core (its ``replica`` name marks its own announcements).
        store: the Redis access layer.
        redis: the ``redis`` section (``block_ms``, ``read_count``).
        index: the ``index`` section (``version_poll_s``).
        release: the watch of ``--artifacts`` (a link moved: ``releases.py``; None: nothing to follow).
    """

    task_name = "retriever-replica-follower"

    def __init__(self, *, retriever: Retriever, store: RedisStore, redis: RedisConfig,
                 index: IndexConfig, release: ReleaseWatch | None = None) -> None:
        self.retriever = retriever
        self.release = release
        self.store = store
        self.redis = redis
        self.index = index
        self.remote_updates = 0  # users copied from peers' fold-ins
        super().__init__()

    async def run(self) -> None:
        after: str | None = None
        next_poll, backoff = 0.0, 0.1
        while not self._stopping.is_set():
            try:
                if after is None:
                    after = await self.store.streams.updates_tail()  # earlier ones are in Redis already
                if time.monotonic() >= next_poll:
                    if self.release is not None:
                        await self.release.check()
                    await self.retriever.follow_current()
                    await self.retriever.refresh_catalog()
                    next_poll = time.monotonic() + self.index.version_poll_s
                after = await self.step(after)
                backoff = 0.1
            except (StoreUnavailable, EmbeddingsError) as exc:
                log.warning("replica follower: %s; retrying in %.1fs", exc, backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug must not end the loop silently
                log.exception("replica follower failed; retrying")
                await self._sleep(1.0)

    async def step(self, after: str) -> str:
        """Apply peers' announcements newer than ``after``; returns the last id read."""
        block_ms = max(1, min(self.redis.block_ms, int(self.index.version_poll_s * 1000)))
        updates = await self.store.streams.read_updates(after, count=self.redis.read_count,
                                                        block_ms=block_ms)
        for entry_id, version, origin, users in updates:
            if origin != self.retriever.replica:
                self.remote_updates += await self.retriever.apply_remote_updates(version, users)
            after = entry_id
        return after
