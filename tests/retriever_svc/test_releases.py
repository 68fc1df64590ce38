"""Which embeddings a retriever serves from its artifacts (``retriever_svc.releases``), on a real
redis-server: an older artifact never becomes current again, a newer one does, a moved release link
is followed (rolling a publish that stopped after its flip forward)."""

from __future__ import annotations

import json
import os
import time

import pytest

from exitrank.artifacts import MANIFEST, write_manifest
from retriever_svc.config import IndexConfig
from retriever_svc.index import Retriever
from retriever_svc.releases import ReleaseWatch, adopt_artifacts, artifact_created

pytestmark = pytest.mark.anyio


def _artifact(emb, path, *, age_s: float = 0.0, manifest: bool = False):
    """``path/gcn`` holding ``emb``, made ``age_s`` seconds ago (its manifest's stamp, else meta.json's mtime)."""
    emb.save(path)
    made = time.time() - age_s
    if manifest:
        write_manifest(path, config={}, data_hash="test", metrics={})
        stamped = json.loads((path / MANIFEST).read_text())
        stamped["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(made))
        (path / MANIFEST).write_text(json.dumps(stamped))
    else:
        os.utime(path / "gcn" / "meta.json", (made, made))
    return path


def _retriever(store) -> Retriever:
    return Retriever(store=store, config=IndexConfig(kind="exact", keep_versions=1))


@pytest.mark.parametrize("manifest", [False, True], ids=["meta-mtime", "manifest"])
async def test_a_restart_on_an_older_artifact_keeps_the_newer_version_current(store, clustered, tmp_path, manifest):
    old = _artifact(clustered(seed=0)[0], tmp_path / "old", age_s=3600, manifest=manifest)
    new_emb = clustered(seed=1)[0]
    new = _artifact(new_emb, tmp_path / "new", manifest=manifest)
    assert artifact_created(old) < artifact_created(new)
    first = _retriever(store)
    assert await adopt_artifacts(first, old) == "test-0"  # Redis had none
    assert await adopt_artifacts(first, new) == "test-1"  # newer: current, the old one dropped (keep 1)
    assert not await store.version_complete("test-0")
    restarted = _retriever(store)  # a restart on the old directory, whose version Redis no longer holds
    assert await adopt_artifacts(restarted, old) == "test-1"
    assert await store.current_version() == "test-1" and restarted.embedding_version == "test-1"
    assert not await store.version_complete("test-0")  # not written back either
    assert await store.version_created("test-1") == pytest.approx(artifact_created(new), abs=1e-3)


async def test_an_artifact_of_unknown_age_never_replaces_a_current_version(store, clustered, tmp_path):
    current = _artifact(clustered(seed=0)[0], tmp_path / "current")
    retriever = _retriever(store)
    await adopt_artifacts(retriever, current)
    bare = tmp_path / "bare"
    clustered(seed=1)[0].save(bare)
    assert artifact_created(bare) is not None  # a bare directory is dated by its meta.json
    os.utime(bare / "gcn" / "meta.json", (0, 0))  # ... here, the epoch: older than anything published
    assert await adopt_artifacts(_retriever(store), bare) == "test-0"


async def test_a_moved_release_link_is_followed_and_rolls_a_stopped_publish_forward(store, clustered, tmp_path):
    releases = tmp_path / "releases"
    one = _artifact(clustered(seed=0)[0], releases / "one", age_s=60, manifest=True)
    two_emb = clustered(seed=1)[0]
    two = _artifact(two_emb, releases / "two", manifest=True)
    link = tmp_path / "current"
    link.symlink_to("releases/one")
    retriever = _retriever(store)
    assert await adopt_artifacts(retriever, link) == "test-0"
    watch = ReleaseWatch(retriever=retriever, artifacts=link)
    assert await watch.check() is None  # the link has not moved
    # a publish that stopped after its flip: version two stored but not current, the link moved
    await store.write_version(two_emb, created=artifact_created(two))
    assert await store.current_version() == "test-0"
    tmp = tmp_path / "current.tmp"
    tmp.symlink_to("releases/two")
    tmp.replace(link)
    assert await watch.check() == "test-1"
    assert await store.current_version() == "test-1" and retriever.embedding_version == "test-1"
    # the link moved back without a publish (an older release): Redis's newer version stays
    tmp.symlink_to("releases/one")
    tmp.replace(link)
    assert await watch.check() == "test-1" and await store.current_version() == "test-1"
    assert one.is_dir()
