"""The artifact manifest: what a refit produced, from which data, and a hash of every file.

``ARTIFACTS/manifest.json`` holds the version (a short hash over all file hashes, so identical
artifacts get identical versions), the creation time, the training data's hash, the configuration,
the metrics and ``files: {relative path: sha256}``. Services verify it before loading, so a corrupted
or truncated artifact directory is refused with a message that names the file. A manifest is data
from disk, so :func:`verify_manifest` also refuses one whose ``version`` is not the hash of its
``files`` (a version such as ``../x`` would name a path outside ``releases/``), a listed path that is
absolute or climbs out (``..``), and a regular file in the verified tree that the manifest does not
list (hidden files, a publisher's temporaries, excepted): what is loaded is exactly what was hashed.

    write_manifest(out, config={...}, data_hash=data_hash(data_dir), metrics={...})
    verify_manifest(out)   # raises ManifestError naming the first bad file

Releases (how a new artifact reaches running services without a restart)::

    ROOT/releases/<version>/       one complete artifact directory per published version (immutable)
    ROOT/current -> releases/<version>   a relative symlink: what services serve (--artifacts ROOT/current)

:func:`publish_release` is the only writer: it copies the new artifact into ``releases/`` under a
hidden temporary name (``manifest.json`` copied last), verifies the copy against its manifest,
renames it to its version, then swaps ``current`` in one atomic step (``os.symlink`` to a temporary
name, ``os.replace`` over the link). A reader resolves ``current`` once and reads only that
directory, so it sees the old release or the new one, never a mix. Publishing a version that is
already in ``releases/`` only moves ``current`` (a rollback). The newest ``keep`` releases stay.

    version = publish_release("build/artifacts", "artifacts")   # ranker-svc --artifacts artifacts/current
    current_release("artifacts")                                # artifacts/releases/<version>
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

MANIFEST = "manifest.json"
RELEASES = "releases"
CURRENT = "current"
STALE_TEMP_S = 24 * 3600  # hidden temporaries older than this are a crashed publisher's leftovers
_CHUNK = 1 << 20


class ManifestError(RuntimeError):
    """The artifact directory does not match its manifest (missing, truncated or altered files)."""


def require_artifacts_dir(path: str | os.PathLike, *, flag: str = "--artifacts") -> Path:
    """``path`` when it is a directory (a ``current`` link to one included).

    Raises:
        ManifestError: it does not exist or is not a directory; the message names the path and
            the command that makes one, so a service refuses to start instead of serving nothing.
    """
    path = Path(path)
    if path.is_dir():
        return path
    what = "is not a directory" if path.exists() else "does not exist"
    if path.is_symlink():
        what = f"is a link to {os.readlink(path)}, which does not exist"
    raise ManifestError(f"{flag} {path} {what}: train one with `trainer fit --data DATA --out {path}` "
                        "(or publish one with `trainer publish --from DIR --artifacts ROOT` and pass ROOT/current)")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_paths(root: Path, subdir: str | None = None) -> list[str]:
    """Relative paths of the regular files a manifest covers (under ``subdir`` when given): all but
    the manifest itself and hidden names."""
    root = Path(root)
    top = root / subdir if subdir else root
    return [path.relative_to(root).as_posix() for path in sorted(top.rglob("*"))
            if path.is_file() and path.name != MANIFEST and not path.name.startswith(".")]


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` except the manifest, keyed by relative path."""
    return {rel: file_sha256(Path(root) / rel) for rel in hash_paths(root)}


def _checked_files(manifest: dict, where: Path) -> dict[str, str]:
    """The manifest's ``files`` after the checks of the module docstring (version, paths)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{where} lists no files")
    for rel in files:
        parts = Path(rel).parts
        if not isinstance(rel, str) or not parts or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
            raise ManifestError(f"{where} lists {rel!r}: manifest paths are relative and stay inside the directory")
    if manifest.get("version") != version_of(files):
        raise ManifestError(f"{where}: its version is not the hash of its files (edited by hand?); re-run "
                            "`trainer fit` to write a manifest")
    return files


def version_of(files: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return digest[:12]


def write_manifest(
    artifacts_dir: Path, *, config: dict, data_hash: str, metrics: dict
) -> dict:
    """Hash every file under ``artifacts_dir`` and write ``manifest.json``; returns the manifest."""
    artifacts_dir = Path(artifacts_dir)
    files = hash_files(artifacts_dir)
    manifest = {
        "version": version_of(files),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_hash": data_hash,
        "config": config,
        "metrics": metrics,
        "files": files,
    }
    tmp = artifacts_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(artifacts_dir / MANIFEST)  # atomic: readers see the old or the new manifest
    return manifest


def read_manifest(artifacts_dir: Path) -> dict:
    path = Path(artifacts_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} is missing: run `trainer fit` to produce the artifacts")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}): re-run `trainer fit`") from exc


def verify_manifest(artifacts_dir: Path, *, subdir: str | None = None) -> dict:
    """Check the listed files' hashes (only those under ``subdir`` when given); return the manifest."""
    artifacts_dir = Path(artifacts_dir)
    manifest = read_manifest(artifacts_dir)
    files = _checked_files(manifest, artifacts_dir / MANIFEST)
    prefix = subdir.rstrip("/") + "/" if subdir is not None else ""
    unlisted = sorted(set(hash_paths(artifacts_dir, subdir)) - set(files))
    if unlisted:
        raise ManifestError(f"artifact file {artifacts_dir / unlisted[0]} is not in the manifest: the directory was "
                            "edited after it was written; re-run `trainer fit` (or publish a clean copy)")
    for rel, expected in files.items():
        if not rel.startswith(prefix):
            continue
        path = artifacts_dir / rel
        if not path.is_file():
            raise ManifestError(f"artifact file {path} listed in the manifest is missing")
        actual = file_sha256(path)
        if actual != expected:
            raise ManifestError(
                f"artifact file {path} does not match the manifest (sha256 {actual[:12]}…, "
                f"expected {expected[:12]}…): the directory is corrupted or was edited; re-run `trainer fit`"
            )
    return manifest


# ------------------------------------------------------------------------------------ releases


def current_release(root: Path) -> Path | None:
    """The release ``ROOT/current`` points at, resolved (None when there is none yet)."""
    link = Path(root) / CURRENT
    if not link.exists():
        return None
    return link.resolve()


def publish_release(src_dir: Path, root: Path, *, keep: int = 3) -> str:
    """Publish the artifact directory ``src_dir`` as ``ROOT/releases/<version>`` and point
    ``ROOT/current`` at it (module docstring); returns the version.

    ``src_dir`` is copied, unless it is a hidden directory inside ``ROOT/releases`` (a refit's
    staging directory), which is moved. ``keep``: releases kept, the current one included.

    Raises:
        ManifestError: ``src_dir`` (or its copy) does not match its manifest: nothing is published.
    """
    root, src = Path(root), Path(src_dir)
    version = verify_manifest(src)["version"]
    releases = root / RELEASES
    releases.mkdir(parents=True, exist_ok=True)
    final = releases / version
    if final.is_dir():
        verify_manifest(final)  # a rollback, or an identical refit: only ``current`` moves
        if src.resolve().parent == releases.resolve() and src.name.startswith("."):
            shutil.rmtree(src)
    else:
        staged = _stage(src, releases)
        try:
            verify_manifest(staged)  # the copy, byte for byte as services will read it
            _fsync_tree(staged)
            os.rename(staged, final)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    _point_current(root, version)
    prune_releases(root, keep=keep)
    return version


def prune_releases(root: Path, *, keep: int = 3) -> list[str]:
    """Keep the current release and the newest others up to ``keep`` in all; delete the rest and
    stale hidden temporaries. Returns the versions deleted."""
    releases = Path(root) / RELEASES
    if not releases.is_dir():
        return []
    current = current_release(root)
    now = time.time()
    for temp in releases.glob(".*"):
        if temp.is_dir() and now - temp.stat().st_mtime > STALE_TEMP_S:
            shutil.rmtree(temp, ignore_errors=True)
    done = sorted((p for p in releases.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: (p.resolve() == current, p.stat().st_mtime), reverse=True)  # current first
    dropped = done[max(keep, 1):]
    for path in dropped:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in dropped]


def _stage(src: Path, releases: Path) -> Path:
    """``src`` under a hidden name in ``releases`` (moved when it is staged there already, else
    copied with the manifest last, so a half-copied directory never has one)."""
    if src.resolve().parent == releases.resolve() and src.name.startswith("."):
        return src
    staged = Path(tempfile.mkdtemp(prefix=".incoming-", dir=releases))
    staged.chmod(0o755)  # mkdtemp's 0700 would hide the release from services running as another user
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir():
            (staged / rel).mkdir(parents=True, exist_ok=True)
        elif path.is_file() and rel.as_posix() != MANIFEST:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, staged / rel)
    shutil.copy2(src / MANIFEST, staged / MANIFEST)
    return staged


def _point_current(root: Path, version: str) -> None:
    """``ROOT/current -> releases/<version>`` in one atomic rename (readers never see no link)."""
    link = root / CURRENT
    if link.exists() and not link.is_symlink():
        raise ManifestError(f"{link} is a directory, not a symlink: move it away (or publish into another root)")
    tmp = root / f".{CURRENT}-{uuid.uuid4().hex[:8]}"
    os.symlink(f"{RELEASES}/{version}", tmp)
    os.replace(tmp, link)
    _fsync_dir(root)


def _fsync_tree(root: Path) -> None:
    """Flush the files and directories of a staged release, so a crash after the rename cannot
    leave a release whose name says complete but whose bytes never reached the disk."""
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
