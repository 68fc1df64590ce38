"""The artifact manifest: what a refit produced, from which data, and a hash of every file.

``ARTIFACTS/manifest.json`` holds the version (a short hash over all file hashes, so identical
artifacts get identical versions), the creation time, the training data's hash, the configuration,
the metrics and ``files: {relative path: sha256}``. Services verify it before loading, so a corrupted
or truncated artifact directory is refused with a message that names the file.

    write_manifest(out, config={...}, data_hash=data_hash(data_dir), metrics={...})
    verify_manifest(out)   # raises ManifestError naming the first bad file
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class ManifestError(RuntimeError):
    """The artifact directory does not match its manifest (missing, truncated or altered files)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` except the manifest, keyed by relative path."""
    root = Path(root)
    return {
        path.relative_to(root).as_posix(): file_sha256(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not path.name.startswith(".")
    }


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
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{artifacts_dir / MANIFEST} lists no files")
    for rel, expected in files.items():
        if subdir is not None and not rel.startswith(subdir.rstrip("/") + "/"):
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
