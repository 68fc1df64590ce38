"""Hot swap in process: ``ReleaseWatcher`` + ``ReloadingRanker`` over real tiny models and real releases.

Requests queued in the old model's batcher finish there; requests after the swap go to the new one;
every result names the model that scored it; broken releases are refused and the old model serves on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from exitrank.artifacts import CURRENT, RELEASES, publish_release, write_manifest
from ranker_svc.artifact import load_ranker, read_meta, save_ranker, stamp_version, write_meta
from ranker_svc.config import BatchingConfig
from ranker_svc.exits import ExitPolicy
from ranker_svc.prompt import PromptConfig
from ranker_svc.ranker import Ranker
from ranker_svc.reload import ReleaseWatcher, ReloadingRanker, read_release
from trainer.lm import build_model

pytestmark = pytest.mark.anyio
USERS = [f"u{j}" for j in range(8)]


def build_variant(ranker_dir: Path, out: Path, *, seed: int) -> str:
    """Another random tiny Llama with ``ranker_dir``'s tokenizer, saved as ``out/ranker``; its version."""
    tokenizer = AutoTokenizer.from_pretrained(ranker_dir)
    causal_lm = build_model(tokenizer, preset="tiny", arch="llama", seed=seed)
    with torch.no_grad():
        causal_lm.lm_head.weight.mul_(40.0)
    meta = read_meta(ranker_dir)
    return save_ranker(out / "ranker", causal_lm=causal_lm, tokenizer=tokenizer,
                       prompt=PromptConfig.from_json(meta["prompt"]), exit_layers=meta["exit_layers"],
                       policy=ExitPolicy.from_json(meta["policy"]))["version"]


def as_release(ranker_dir: Path, out: Path) -> Path:
    """``out/ranker`` (a copy of ``ranker_dir`` unless it is there already) plus ``out/manifest.json``."""
    if Path(ranker_dir) != out / "ranker":
        shutil.copytree(ranker_dir, out / "ranker")
    write_manifest(out, config={}, data_hash="test", metrics={})
    return out


@pytest.fixture(scope="module")
def releases(tmp_path_factory, tiny_ranker_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    a = as_release(tiny_ranker_dir, root / "a")
    build_variant(tiny_ranker_dir, root / "b", seed=1)
    return {"a": a, "b": as_release(root / "b" / "ranker", root / "b")}


def make_core(path: Path, source, *, max_wait_ms: float = 0.0) -> Ranker:
    batching = BatchingConfig(max_wait_ms=max_wait_ms)
    return Ranker(loaded=load_ranker(Path(path) / "ranker"), context_source=source, batching=batching)


def watcher_for(root: Path, source, **kwargs) -> tuple[ReloadingRanker, ReleaseWatcher]:
    artifacts = root / CURRENT
    release = read_release(artifacts)
    core = ReloadingRanker(make_core(release.path, source, **kwargs))
    watcher = ReleaseWatcher(core=core, artifacts_dir=artifacts, release=release,
                             build=lambda path: make_core(path, source, **kwargs), interval_s=1.0)
    return core, watcher


async def rank(core, catalog, user: str):
    return await core.rank(user_id=user, candidate_item_ids=sorted(catalog)[:3])


async def test_queued_requests_finish_on_the_old_model_new_ones_use_the_new(
        tmp_path, releases, memory_source_factory, catalog):
    root = tmp_path / "artifacts"
    publish_release(releases["a"], root)
    core, watcher = watcher_for(root, memory_source_factory(), max_wait_ms=300)  # requests wait to share a batch
    old_version = core.model_version
    queued = [asyncio.ensure_future(rank(core, catalog, u)) for u in USERS]
    await asyncio.sleep(0.05)  # queued in the old batcher, not yet scored
    old_batcher = core.batcher
    publish_release(releases["b"], root)
    new_version = await watcher.check()
    assert new_version and new_version != old_version and core.model_version == new_version
    after = [asyncio.ensure_future(rank(core, catalog, u)) for u in USERS]
    before_results, after_results = await asyncio.gather(*queued), await asyncio.gather(*after)
    assert {r.model_version for r in before_results} == {old_version}
    assert {r.model_version for r in after_results} == {new_version}
    assert old_batcher.stats.jobs == len(USERS) and core.batcher.stats.jobs == len(USERS)  # one model per batch
    assert old_batcher.stats.batches == 1  # the queued requests stayed together on the old model
    expected = await rank(make_core(releases["b"], memory_source_factory()), catalog, USERS[0])
    assert [s.ctr for s in after_results[0].scores] == pytest.approx([s.ctr for s in expected.scores], abs=1e-5)
    assert await watcher.check() is None and watcher.stats.reloads == 1  # nothing new: no reload


def _hash_mismatch(release: Path) -> None:
    (release / "ranker" / "model.safetensors").write_bytes(b"\0" * 64)  # the manifest keeps the old hash


def _truncated_weights(release: Path) -> None:
    path = release / "ranker" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    write_manifest(release, config={}, data_hash="test", metrics={})  # hashes match: only loading can tell


def _answer_not_a_single_token(release: Path) -> None:
    meta = read_meta(release / "ranker")
    meta["prompt"]["answer_yes"] = "Absolutely certainly"
    write_meta(release / "ranker", meta)
    stamp_version(release / "ranker")
    write_manifest(release, config={}, data_hash="test", metrics={})


def _manifest_not_json(release: Path) -> None:
    (release / "manifest.json").write_text('{"version": "x", "files": {')


@pytest.mark.parametrize("corrupt, reason", [
    (_hash_mismatch, "does not match the manifest"),
    (_truncated_weights, "cannot load the model"),
    (_answer_not_a_single_token, "not a single token"),
    (_manifest_not_json, "not valid JSON"),
])
async def test_a_broken_release_is_refused_and_the_old_model_serves_on(
        tmp_path, releases, memory_source_factory, catalog, caplog, corrupt, reason):
    root = tmp_path / "artifacts"
    publish_release(releases["a"], root)
    core, watcher = watcher_for(root, memory_source_factory())
    serving = core.model_version
    broken = root / RELEASES / "broken"
    shutil.copytree(releases["b"], broken)
    corrupt(broken)
    (root / "next").symlink_to(f"{RELEASES}/broken")  # a publisher that skipped verification
    (root / "next").replace(root / CURRENT)
    with caplog.at_level(logging.ERROR, logger="ranker_svc.reload"):
        assert await watcher.check() is None
        assert await watcher.check() is None  # the same release is not retried (nor logged) again
    assert watcher.stats.refused == 1 and watcher.stats.reloads == 0
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusals) == 1 and "refusing new release" in refusals[0] and serving in refusals[0]
    assert reason in watcher.stats.last_refusal
    assert (await rank(core, catalog, "u0")).model_version == serving
    publish_release(releases["b"], root)  # a good release after the broken one is taken
    assert await watcher.check() == read_meta(releases["b"] / "ranker")["version"]


async def test_a_plain_directory_reloads_on_a_new_manifest_version(tmp_path, releases, memory_source_factory,
                                                                    catalog):
    plain = tmp_path / "artifacts"
    shutil.copytree(releases["a"], plain)
    release = read_release(plain)
    core = ReloadingRanker(make_core(plain, memory_source_factory()))
    watcher = ReleaseWatcher(core=core, artifacts_dir=plain, release=release,
                             build=lambda path: make_core(path, memory_source_factory()), interval_s=1.0)
    assert await watcher.check() is None
    shutil.rmtree(plain / "ranker")
    shutil.copytree(releases["b"] / "ranker", plain / "ranker")  # a trainer rewriting the directory ...
    write_manifest(plain, config={}, data_hash="test", metrics={})  # ... and its manifest last
    assert await watcher.check() == read_meta(releases["b"] / "ranker")["version"]
    assert (await rank(core, catalog, "u1")).model_version == core.model_version


async def test_a_release_with_the_same_ranker_files_is_adopted_without_loading(
        tmp_path, releases, memory_source_factory):
    root = tmp_path / "artifacts"
    publish_release(releases["a"], root)
    core, watcher = watcher_for(root, memory_source_factory())
    first = core.current
    refit = tmp_path / "gcn-only"
    shutil.copytree(releases["a"], refit)
    (refit / "gcn").mkdir()
    (refit / "gcn" / "meta.json").write_text(json.dumps({"version": "new embeddings"}))
    write_manifest(refit, config={}, data_hash="new data", metrics={})
    publish_release(refit, root)
    assert await watcher.check() is None
    assert watcher.stats.adopted == 1 and watcher.stats.reloads == 0 and core.current is first
    assert watcher.serving.path == (root / CURRENT).resolve()


async def test_the_watcher_polls_by_itself(tmp_path, releases, memory_source_factory):
    root = tmp_path / "artifacts"
    publish_release(releases["a"], root)
    core, _ = watcher_for(root, memory_source_factory())
    watcher = ReleaseWatcher(core=core, artifacts_dir=root / CURRENT, release=read_release(root / CURRENT),
                             build=lambda path: make_core(path, memory_source_factory()), interval_s=0.05)
    watcher.start()
    try:
        publish_release(releases["b"], root)
        for _ in range(200):
            if watcher.stats.reloads:
                break
            await asyncio.sleep(0.05)
        assert core.model_version == read_meta(releases["b"] / "ranker")["version"]
        assert read_meta(releases["a"] / "ranker")["version"] != core.model_version
    finally:
        await watcher.stop()
