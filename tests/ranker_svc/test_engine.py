"""The three engines (torch, DeepSpeed on CPU, ONNX Runtime) score the same requests alike (fp32)."""

from __future__ import annotations

import pytest
import torch

from ranker_svc.engine import TorchEngine, predict_in_batches
from ranker_svc.exits import ExitPolicy
from ranker_svc.onnx_engine import OnnxEngine
from ranker_svc.scoring import Scorer
from ranker_svc.server import build_engine

POLICIES = [ExitPolicy(disabled=True), ExitPolicy(threshold=0.05, window=1),
            ExitPolicy(criterion="confidence", threshold=0.7, min_layer=2)]


@pytest.fixture(scope="module")
def engines(loaded, tmp_path_factory):
    return {
        "torch": build_engine("torch", loaded),
        "deepspeed": build_engine("deepspeed", loaded, device="cpu"),
        "onnx": build_engine("onnx", loaded, onnx_dir=tmp_path_factory.mktemp("onnx")),
    }


def test_the_same_requests_score_alike_through_every_engine(engines, loaded, examples, catalog):
    titles = [catalog[i] for i in sorted(catalog)[:12]]
    requests = [(ex.context, titles[n : n + 6]) for n, ex in enumerate(examples[:3])]
    results = {}
    for name, engine in engines.items():
        ranker = Scorer(loaded=loaded, engine=engine)
        assert ranker.shared_context == engine.shares_context  # onnx scores full prompts
        results[name] = [[ranker.score_candidates(ctx, t, policy) for ctx, t in requests] for policy in POLICIES]
    exits = set()
    for name in ("deepspeed", "onnx"):
        for per_policy_ref, per_policy in zip(results["torch"], results[name]):
            for ref, got in zip(per_policy_ref, per_policy):
                assert [d.exit_layer for d in got] == [d.exit_layer for d in ref], name
                assert [d.ctr for d in got] == pytest.approx([d.ctr for d in ref], abs=1e-4), name
                exits |= {d.exit_layer for d in got}
    assert len(exits) > 1, "the policies must exit rows at several layers"


def test_onnx_segments_stop_early_when_every_row_exits(engines, loaded, examples):
    onnx = engines["onnx"]
    assert isinstance(onnx, OnnxEngine) and onnx.providers[-1] == "CPUExecutionProvider"
    assert len(onnx.sessions) == len(loaded.model.answer_layers)
    prompts = [loaded.tokenizer(loaded.prompt.full_text(ex.context, ex.title))["input_ids"] for ex in examples[:5]]
    runs = {"n": 0}
    for session in onnx.sessions:
        session.run = _counting(session.run, runs)
    everyone_first = ExitPolicy(criterion="confidence", threshold=0.5)  # max(p, 1-p) >= .5 always holds
    _, layer = predict_in_batches(onnx, prompts, everyone_first, batch_size=8)
    assert layer.tolist() == [1] * 5 and runs["n"] == 1  # only the first segment ran
    runs["n"] = 0
    predict_in_batches(onnx, prompts, ExitPolicy(disabled=True), batch_size=8)
    assert runs["n"] == len(onnx.sessions)


def _counting(run, counter):
    def wrapped(*args, **kwargs):
        counter["n"] += 1
        return run(*args, **kwargs)

    return wrapped


def test_deepspeed_wraps_the_same_weights_and_torch_is_the_default(engines, loaded):
    ds = engines["deepspeed"]
    assert isinstance(ds, TorchEngine) and ds.name == "deepspeed"
    assert ds.model.heads is loaded.model.heads
    ids = loaded.tokenizer(["Instruction: probe"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    a = ds.predict(ids, mask, ExitPolicy(disabled=True))
    b = engines["torch"].predict(ids, mask, ExitPolicy(disabled=True))
    torch.testing.assert_close(a[0], b[0])
    assert Scorer(loaded=loaded).engine.name == "torch"
    with pytest.raises(ValueError, match="engine must be one of"):
        build_engine("tensorrt", loaded)


def test_the_onnx_export_cache_is_verified_like_an_artifact(loaded, tmp_path):
    """A cached export is reused only byte for byte: a graph edited in the cache is exported again."""
    from ranker_svc.onnx_engine import STAMP, cached_export, export_segments

    stamp = {"version": loaded.version, "answer_layers": list(loaded.model.answer_layers), "probe": True}
    paths = export_segments(loaded.model, tmp_path, stamp=stamp)
    assert cached_export(tmp_path / STAMP, paths, stamp)
    original = paths[0].read_bytes()
    paths[0].write_bytes(original + b"\x00")  # swapped or corrupted in the cache directory
    assert not cached_export(tmp_path / STAMP, paths, stamp)
    assert not cached_export(tmp_path / STAMP, paths, {**stamp, "probe": False})  # another export's stamp
    again = export_segments(loaded.model, tmp_path, stamp=stamp)
    assert again == paths and paths[0].read_bytes() == original and cached_export(tmp_path / STAMP, paths, stamp)
