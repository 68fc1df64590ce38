"""Which embeddings a retriever serves from its ``--artifacts``, and following a release root.

At start (:func:`adopt_artifacts`) a retriever compares ``ARTIFACTS/gcn`` with Redis's current
embedding version. It makes the artifact's version current only when Redis has none, or the
artifact is at least as new: made (:func:`artifact_created`: its ``manifest.json``'s
``created_at``, else the time ``gcn/meta.json`` was written) no earlier than the artifact of the
current version (``RedisStore.version_created``; a version of unknown age counts as older).
Otherwise it serves Redis's current version and says so in its log: a retriever restarted on an
old artifact directory (a pinned release, the first build) never makes stale embeddings current
again, under the release the rankers serve.

A release root (``trainer refit`` / ``trainer publish``: ``ROOT/current -> releases/<version>``)
is the commit point of a publish: the embeddings are stored in Redis first, not current; then
``current`` flips; then Redis's current version is set (``trainer.publishing.publish_pair``). A
retriever started with ``--artifacts ROOT/current`` watches the link (:class:`ReleaseWatch`, at
every ``index.version_poll_s`` of the replica follower), so a publish that crashed between the flip
and the last step is rolled forward within a poll (and by the next ``trainer refit`` or
``trainer publish``, which check the pair first).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from pathlib import Path

from exitrank.artifacts import MANIFEST, ManifestError, verify_manifest
from retriever_svc.embeddings import GCN_DIR, META_FILE, GCNEmbeddings
from retriever_svc.index import Retriever

log = logging.getLogger(__name__)


def artifact_created(artifacts: Path) -> float | None:
    """When ``artifacts`` was made, in Unix seconds: its manifest's ``created_at``, else the
    modification time of ``gcn/meta.json`` (None: neither is readable)."""
    artifacts = Path(artifacts)
    try:
        stamp = json.loads((artifacts / MANIFEST).read_text()).get("created_at")
        when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
        return when.replace(tzinfo=datetime.timezone.utc).timestamp()
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    try:
        return (artifacts / GCN_DIR / META_FILE).stat().st_mtime
    except OSError:
        return None


async def adopt_artifacts(retriever: Retriever, artifacts: Path) -> str:
    """Serve ``artifacts/gcn`` when it is at least as new as Redis's current version (module
    docstring), else Redis's current version (with its fold-ins); returns the version served
    ("" for none).

    Raises:
        ManifestError: ``artifacts/manifest.json`` exists and a ``gcn/`` file does not match it.
    """
    artifacts = Path(artifacts)
    emb = await asyncio.to_thread(read_artifact, artifacts)  # hashing and loading: off the event loop
    if emb is not None:
        created, current = artifact_created(artifacts), await retriever.store.current_version()
        if emb.version != current and (current is None or await newer_than(retriever, created, current)):
            await retriever.load_embeddings(emb, created=created)
            return emb.version
        if emb.version != current:
            log.warning("%s holds embedding version %s, older than Redis's current %s: serving %s "
                        "(publish a newer release to change it)", artifacts, emb.version, current, current)
        if current == retriever.embedding_version:
            return current  # served already
    version = await retriever.restore()
    if version is None:
        log.warning("no embeddings in %s/%s nor in Redis: NearestUsers answers NOT_FOUND "
                    "until a fit is published", artifacts, GCN_DIR)
    return version or ""


def read_artifact(artifacts: Path) -> GCNEmbeddings | None:
    """``artifacts/gcn``, verified against ``artifacts/manifest.json`` when there is one (None: no ``gcn/``).

    Raises:
        ManifestError: a ``gcn/`` file is missing or does not match its hash.
    """
    if (artifacts / MANIFEST).is_file():
        verify_manifest(artifacts, subdir=GCN_DIR)
    return GCNEmbeddings.load(artifacts) if (artifacts / GCN_DIR).is_dir() else None


async def newer_than(retriever: Retriever, created: float | None, current: str) -> bool:
    """Whether an artifact made at ``created`` is at least as new as the one of Redis's ``current``
    version (an artifact of unknown age: never; a current version of unknown age: always)."""
    if created is None:
        return False
    current_created = await retriever.store.version_created(current)
    return current_created is None or created >= current_created


class ReleaseWatch:
    """Follows ``--artifacts`` when it is a link (``ROOT/current``): a new target is adopted by
    :func:`adopt_artifacts`. ``check`` costs one ``readlink`` while the link stands."""

    def __init__(self, *, retriever: Retriever, artifacts: Path) -> None:
        self.retriever = retriever
        self.artifacts = Path(artifacts)
        self.seen: Path | None = self.artifacts.resolve() if self.artifacts.is_symlink() else None

    async def check(self) -> str | None:
        """The version served after the link moved since the last check, else None."""
        if not self.artifacts.is_symlink():
            return None
        target = self.artifacts.resolve()
        if target == self.seen:
            return None
        try:
            version = await adopt_artifacts(self.retriever, self.artifacts)
        except ManifestError as exc:  # a broken release: said once, the version served stays
            log.error("release %s not adopted: %s", target.name, exc)
            version = None
        else:
            log.info("release %s: serving embedding version %s", target.name, version or "(none)")
        self.seen = target  # after: Redis being down (StoreUnavailable) retries at the next poll
        return version
