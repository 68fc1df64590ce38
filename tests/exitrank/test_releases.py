"""``publish_release`` / ``current_release`` on real files: what a reader of ``ROOT/current`` sees."""

from __future__ import annotations

import os
import threading

import pytest

from exitrank.artifacts import (CURRENT, MANIFEST, RELEASES, ManifestError, current_release, prune_releases,
                                publish_release, read_manifest, verify_manifest, write_manifest)


def _artifact(path, payload: bytes) -> str:
    (path / "ranker").mkdir(parents=True)
    (path / "ranker" / "weights.bin").write_bytes(payload)
    (path / "gcn").mkdir()
    (path / "gcn" / "meta.json").write_text('{"version": "g"}')
    return write_manifest(path, config={}, data_hash="d", metrics={})["version"]


def test_publish_copies_verifies_and_points_current_at_the_release(tmp_path):
    src, root = tmp_path / "build", tmp_path / "artifacts"
    version = _artifact(src, b"a" * 1000)
    assert current_release(root) is None
    assert publish_release(src, root) == version
    link = root / CURRENT
    assert link.is_symlink() and os.readlink(link) == f"{RELEASES}/{version}"  # relative: the tree can move
    assert current_release(root) == (root / RELEASES / version).resolve()
    assert verify_manifest(link)["version"] == version
    (src / "ranker" / "weights.bin").write_bytes(b"changed later")  # the release is a copy, not a view
    verify_manifest(link)
    assert not [p for p in (root / RELEASES).iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_corrupted_source_is_refused_and_current_stays(tmp_path):
    root = tmp_path / "artifacts"
    good = _artifact(tmp_path / "good", b"g" * 100)
    publish_release(tmp_path / "good", root)
    _artifact(tmp_path / "bad", b"b" * 100)
    (tmp_path / "bad" / "ranker" / "weights.bin").write_bytes(b"b" * 50)  # truncated after the manifest
    with pytest.raises(ManifestError, match="weights.bin"):
        publish_release(tmp_path / "bad", root)
    assert read_manifest(root / CURRENT)["version"] == good
    assert sorted(p.name for p in (root / RELEASES).iterdir()) == [good]


def test_republishing_an_old_version_is_a_rollback_and_old_releases_are_pruned(tmp_path):
    root = tmp_path / "artifacts"
    versions = []
    for n in range(4):
        versions.append(_artifact(tmp_path / f"v{n}", bytes([n]) * 64))
        publish_release(tmp_path / f"v{n}", root, keep=2)
    kept = sorted(p.name for p in (root / RELEASES).iterdir())
    assert kept == sorted(versions[2:])  # the newest two
    publish_release(root / RELEASES / versions[2], root, keep=2)  # roll back to a kept release
    assert current_release(root).name == versions[2]
    assert prune_releases(root, keep=1) == [versions[3]]  # never the current one
    assert current_release(root).name == versions[2]


def test_a_reader_never_sees_a_missing_or_mixed_release(tmp_path):
    """Readers resolve ``current`` while releases are published back to back: every read finds a
    complete release whose files match its manifest."""
    root = tmp_path / "artifacts"
    sources = [tmp_path / f"v{n}" for n in range(2)]
    for n, src in enumerate(sources):
        _artifact(src, bytes([n + 1]) * 200_000)
    publish_release(sources[0], root, keep=3)
    stop, reads, errors = threading.Event(), [0], []

    def reader() -> None:
        while not stop.is_set():
            try:
                verify_manifest(current_release(root))
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    for n in range(10):
        publish_release(sources[n % 2], root, keep=3)
    stop.set()
    thread.join()
    assert not errors and reads[0] > 0


def test_a_directory_named_current_is_not_replaced(tmp_path):
    root = tmp_path / "artifacts"
    (root / CURRENT).mkdir(parents=True)
    _artifact(tmp_path / "v", b"x")
    with pytest.raises(ManifestError, match="not a symlink"):
        publish_release(tmp_path / "v", root)
    assert (root / CURRENT).is_dir() and not (root / CURRENT / MANIFEST).exists()
