"""Hot swap of the ranker's model: a newly published artifact is served without a restart (no grpc).

The release contract (``exitrank.artifacts.publish_release``): ``--artifacts PATH`` may be a
symlink ``ROOT/current -> releases/<version>`` that a publisher swaps atomically once a complete,
verified release directory is in place; or a plain directory whose ``manifest.json`` (written last
by the trainer) changes version. Either way the ranker notices it the same way:

1. :class:`ReleaseWatcher` polls, every ``model.reload_interval_s`` seconds on the event loop, what
   ``PATH`` resolves to and its manifest's identity (``stat``: inode, size, mtime; the file is read
   only when these change), in a worker thread. Nothing happens per request.
2. A new release is loaded off the serving path, in a worker thread: the manifest's ``ranker/``
   hashes are verified, then the artifact loads as at start (``ranker_svc.server.build_ranker``:
   Yes/No single tokens, heads against exit layers, ...) into a complete new
   :class:`~ranker_svc.ranker.Ranker` with its own engine and micro-batcher. A release whose
   ``ranker/`` files are byte-identical to the serving one's (a refit that changed only the
   LightGCN embeddings) is adopted without loading anything.
3. :class:`ReloadingRanker` (the servicer's core) swaps its reference to the new ``Ranker`` in one
   assignment on the event loop. ``rank`` reads the reference once per request, in the same event
   loop step in which the servicer reads the calibrated policy, so a request is validated, batched
   and scored by one model, and its ``model_version`` names that model. Requests already in the
   old ``Ranker``'s batcher finish there; batches never mix models, since each ``Ranker`` has its
   own batcher. The old model is freed once its batcher is idle.

A release that fails any check (a file missing or not matching its hash, a truncated
safetensors file, answers that are not single tokens, a manifest that is not JSON) is refused with
one ERROR log line naming the release and the reason; the old model keeps serving, and the same
release is not retried until what ``PATH`` points at changes again.

    core = ReloadingRanker(ranker)
    watcher = ReleaseWatcher(core=core, artifacts_dir=Path("artifacts/current"), release=release,
                             build=lambda path: build_ranker(config_for(path), context_source=source)[0],
                             interval_s=2.0)
    watcher.start()  # on the serving event loop; ``await watcher.stop()`` at shutdown
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from exitrank.artifacts import MANIFEST, ManifestError, read_manifest, verify_manifest
from exitrank.types import RankResult
from ranker_svc.batching import MicroBatcher
from ranker_svc.exits import ExitPolicy
from ranker_svc.ranker import RankObserver, Ranker

log = logging.getLogger(__name__)
RANKER_PREFIX = "ranker/"
_IDLE_WAIT_S = 60.0  # how long a replaced model may take to finish its in-flight batches


@dataclass(frozen=True, slots=True)
class Release:
    """What an artifacts path points at: the resolved directory, its manifest's identity and version,
    and the hashes of its ``ranker/`` files (what the model depends on)."""

    path: Path
    stamp: tuple[int, int, int] | None  # (inode, size, mtime_ns) of manifest.json; None: no manifest
    version: str | None
    ranker_files: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.path} (manifest {self.version or 'absent'})"


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path / MANIFEST)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_release(artifacts_dir: Path, *, previous: Release | None = None) -> Release:
    """The release ``artifacts_dir`` resolves to (a symlink is followed once, here).

    ``previous``: when path and manifest stamp are unchanged it is returned as is (no read).

    Raises:
        ManifestError: the manifest exists but is not valid JSON.
    """
    path = Path(artifacts_dir).resolve()
    stamp = _stamp(path)
    if previous is not None and previous.path == path and previous.stamp == stamp:
        return previous
    if stamp is None:
        return Release(path=path, stamp=None, version=None)
    manifest = read_manifest(path)
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    ranker = tuple(sorted((k, str(v)) for k, v in files.items() if k.startswith(RANKER_PREFIX)))
    return Release(path=path, stamp=stamp, version=str(manifest.get("version") or ""), ranker_files=ranker)


class ReloadingRanker:
    """The servicer's core (``ranker_svc.servicer.RankerCore``): the current :class:`Ranker`,
    replaced whole by :meth:`swap`.

    Each property reads the current ranker at the time of the call; a caller that needs several
    values of one model consistently (its scorer's engine and model, say) reads :attr:`current`
    once.
    """

    def __init__(self, ranker: Ranker) -> None:
        self._current = ranker
        self._observer: RankObserver | None = None

    @property
    def current(self) -> Ranker:
        return self._current

    @property
    def policy(self) -> ExitPolicy:
        """The current model's calibrated exit policy."""
        return self._current.policy

    @property
    def model_version(self) -> str:
        return self._current.model_version

    @property
    def pinned_version(self) -> str | None:
        """The embedding version the current model's soft tokens read (None: text only)."""
        return self._current.pinned_version

    @property
    def num_layers(self) -> int:
        return self._current.num_layers

    def in_progress(self, client: str | None = None) -> int:
        """``Ranker.in_progress`` of the current model."""
        return self._current.in_progress(client)

    @property
    def batcher(self) -> MicroBatcher:
        """The current model's micro-batcher (a replaced model's finishes its own queue)."""
        return self._current.batcher

    async def rank(
        self, *, user_id: str, candidate_item_ids: Sequence[str], num_neighbors: int = 0,
        policy: ExitPolicy | None = None, deadline: float | None = None, client: str | None = None,
    ) -> RankResult:
        """``Ranker.rank`` on the model current when the call starts (read once, here)."""
        return await self._current.rank(user_id=user_id, candidate_item_ids=candidate_item_ids,
                                        num_neighbors=num_neighbors, policy=policy, deadline=deadline,
                                        client=client)

    def attach_observer(self, observer: RankObserver | None) -> None:
        """Report to ``observer`` from this model and every model swapped in later."""
        self._observer = observer
        self._current.attach_observer(observer)

    def swap(self, ranker: Ranker) -> Ranker:
        """Serve ``ranker`` from the next request on; returns the replaced one (still finishing
        its in-flight batches). Call on the serving event loop."""
        ranker.attach_observer(self._observer)
        old, self._current = self._current, ranker
        return old


@dataclass(slots=True)
class ReloadStats:
    """What the watcher did, for logs and tests."""

    polls: int = 0
    reloads: int = 0
    adopted: int = 0  # new releases with the serving ranker files: nothing to load
    refused: int = 0
    last_refusal: str = ""


class ReleaseWatcher:
    """Polls ``artifacts_dir`` and swaps in the model of each new release (module docstring).

    Args:
        core: the handle requests go through.
        artifacts_dir: the configured ``--artifacts`` path (a symlink is re-resolved on every poll).
        release: what was loaded at start (read before loading, so a publish during start-up is seen).
        build: loads a release directory into a complete ``Ranker`` (runs in a worker thread).
        interval_s: seconds between polls (> 0).
    """

    def __init__(self, *, core: ReloadingRanker, artifacts_dir: Path, release: Release,
                 build: Callable[[Path], Ranker], interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"model.reload_interval_s must be > 0 to watch for releases, got {interval_s}")
        self.core = core
        self.artifacts_dir = Path(artifacts_dir)
        self.serving = release  # the release whose ranker files serve now
        self.build = build
        self.interval_s = interval_s
        self.stats = ReloadStats()
        self._seen = release  # the last release looked at (served, adopted or refused)
        self._bad_stamp: tuple | None = None  # an unreadable manifest already reported
        self._task: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task] = set()

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name="ranker-release-watcher")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._retired):
            task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # a bug must not end the watch silently
                log.exception("release watcher failed; the current model keeps serving")

    async def check(self) -> str | None:
        """One poll: swap in a new release's model if there is one; returns its model version."""
        self.stats.polls += 1
        try:
            release = await asyncio.to_thread(read_release, self.artifacts_dir, previous=self._seen)
        except (ManifestError, OSError) as exc:
            stamp = await asyncio.to_thread(_stamp, Path(self.artifacts_dir).resolve())
            if stamp != self._bad_stamp:
                self._bad_stamp = stamp
                self._refuse(f"{self.artifacts_dir}: {exc}")
            return None
        if release == self._seen:
            return None
        self._seen = release
        if release.ranker_files and release.ranker_files == self.serving.ranker_files:
            self.serving = release
            self.stats.adopted += 1
            log.info("release %s: ranker files unchanged, model %s keeps serving", release.name,
                     self.core.model_version)
            return None
        return await self._load(release)

    async def _load(self, release: Release) -> str | None:
        started = time.perf_counter()
        try:
            ranker = await asyncio.to_thread(self._build_verified, release)
        except _Superseded:
            log.info("release %s was replaced while its model loaded; loading the newer one next", release.name)
            self._seen = self.serving
            return None
        except Exception as exc:  # noqa: BLE001 - whatever breaks a load refuses the release, never the service
            self._refuse(f"{release.name}: {type(exc).__name__}: {exc}")
            return None
        old = self.core.swap(ranker)
        self.serving = release
        self.stats.reloads += 1
        log.info("release %s: model %s now serving (was %s), loaded in %.1fs off the serving path",
                 release.name, ranker.model_version, old.model_version, time.perf_counter() - started)
        task = asyncio.create_task(_retire(old))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        return ranker.model_version

    def _build_verified(self, release: Release) -> Ranker:
        """Verify and load ``release`` (worker thread); refuses one that changed while loading."""
        if release.stamp is not None:
            verify_manifest(release.path, subdir=RANKER_PREFIX.rstrip("/"))
        ranker = self.build(release.path)
        if read_release(self.artifacts_dir, previous=release) != release:
            raise _Superseded(release.name)
        return ranker

    def _refuse(self, reason: str) -> None:
        self.stats.refused += 1
        self.stats.last_refusal = reason
        log.error("refusing new release %s; model %s keeps serving", reason, self.core.model_version)


class _Superseded(Exception):
    """What the artifacts path points at changed while a release loaded."""


async def _retire(old: Ranker) -> None:
    """Frees a replaced model once its batcher is idle (its batcher and the ranker reference each
    other, so only the cyclic collector reclaims them: one collection per release)."""
    deadline = time.monotonic() + _IDLE_WAIT_S
    while old.batcher.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    del old
    gc.collect()
