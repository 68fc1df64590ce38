"""Publishing a release: its ranker files and its LightGCN embeddings as one pair.

The rankers follow ``ROOT/current`` (``exitrank.artifacts``); the retrievers follow Redis's current
embedding version. :func:`publish_pair` changes both in an order that a crash cannot turn into a
mix that stays:

1. the release's embeddings are stored in Redis, not current (:func:`publish_gcn` with
   ``make_current=False``): a crash here leaves both services on the old pair, and the stored
   version inert (dropped by a later publish's newest-``keep`` rule);
2. ``ROOT/current`` flips to the release (``exitrank.artifacts.publish_release``, one atomic
   rename): the commit point;
3. Redis's current version is set to the release's.

A crash between 2 and 3 is rolled forward by whoever looks next: a retriever started with
``--artifacts ROOT/current`` within a poll (``retriever_svc.releases.ReleaseWatch``), and the next
``trainer refit`` or ``trainer publish``, which first make Redis's current version the current
release's (:func:`roll_forward`). Until then the rankers serve the new release with the old
neighbours for at most that long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from exitrank.artifacts import current_release, publish_release, verify_manifest
from retriever_svc.embeddings import GCN_DIR, GCNEmbeddings
from retriever_svc.releases import artifact_created

T = TypeVar("T")


def release_embeddings(release: Path) -> GCNEmbeddings | None:
    """The LightGCN embeddings a release carries (None: it has none)."""
    return GCNEmbeddings.load(release) if (Path(release) / GCN_DIR).is_dir() else None


def publish_pair(src: Path, root: Path, *, redis_url: str | None, prefix: str = "xr", keep_releases: int = 3,
                 keep_versions: int = 2) -> dict:
    """``src`` as the current release and its embeddings as Redis's current version, in the order of
    the module docstring. Returns ``{"release", "embedding_version"}`` (the latter None without
    embeddings or ``redis_url``)."""
    emb = release_embeddings(src) if redis_url else None
    created = artifact_created(src)  # before the flip: a staging directory is moved by it
    if emb is not None:
        publish_gcn(emb, redis_url=redis_url, prefix=prefix, created=created, make_current=False)
    release = publish_release(src, root, keep=keep_releases)
    if emb is not None:
        publish_gcn(emb, redis_url=redis_url, prefix=prefix, keep_versions=keep_versions, created=created)
    return {"release": release, "embedding_version": emb.version if emb is not None else None}


def roll_forward(root: Path, *, redis_url: str, prefix: str = "xr", keep_versions: int = 2) -> str | None:
    """Make Redis's current embedding version the current release's when a publish stopped between
    its flip and its last step; returns the version made current (None: the pair was whole)."""
    release = current_release(root)
    emb = release_embeddings(release) if release is not None else None
    if emb is None or current_gcn_version(redis_url=redis_url, prefix=prefix) == emb.version:
        return None
    verify_manifest(release)
    return publish_gcn(emb, redis_url=redis_url, prefix=prefix, keep_versions=keep_versions,
                       created=artifact_created(release))


def publish(src: Path, root: Path, *, redis_url: str | None = None, prefix: str = "xr", keep: int = 3) -> dict:
    """``trainer publish``: ``src`` (verified) as the current release, copied and linked, and its
    embeddings as Redis's current version when ``redis_url`` is given (a first release, a rollback)."""
    verify_manifest(src)
    pair = publish_pair(src, root, redis_url=redis_url, prefix=prefix, keep_releases=keep)
    return {**pair, "current": str(current_release(root))}


def publish_gcn(emb: GCNEmbeddings, *, redis_url: str, prefix: str = "xr", keep_versions: int = 2,
                created: float | None = None, make_current: bool = True) -> str:
    """Store a fit as an embedding version in the retriever's Redis (unless stored already) and
    make it current; returns the version.

    Running retrievers poll the current version (``index.version_poll_s``) and swap to it
    atomically, folding in users the fit lacks. ``created``: when its artifact was made (Unix
    seconds; retrievers never make an older artifact current again: ``retriever_svc.releases``).
    ``make_current=False`` only stores it (a release's first step: ``trainer.publishing.publish_pair``).
    A ``redis+cluster://`` URL addresses a Redis Cluster.
    """

    async def publish(store) -> str:
        if not await store.version_complete(emb.version):
            await store.write_version(emb, created=created)
        if make_current:
            await store.set_current(emb.version, keep=keep_versions)
        return emb.version

    return on_store(redis_url, prefix, publish)


def current_gcn_version(*, redis_url: str, prefix: str = "xr") -> str | None:
    """Redis's current embedding version (None: none published)."""
    return on_store(redis_url, prefix, lambda store: store.current_version())


def on_store(redis_url: str, prefix: str, work: Callable[[Any], Awaitable[T]]) -> T:
    """``await work(store)`` on a ``RedisStore`` of ``redis_url`` opened for it and closed after."""
    from retriever_svc.store import RedisStore  # noqa: PLC0415 - redis only when publishing

    async def run() -> T:
        store = RedisStore.from_url(redis_url, prefix=prefix)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())
