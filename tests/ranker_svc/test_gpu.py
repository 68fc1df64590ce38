"""The ranker's device paths, on a real tiny Llama: the same requests score alike on the device and
on the CPU (full prompts and the shared-context path, every policy), DeepSpeed agrees there too,
and bf16 stays close to fp32. Each test runs on the CPU everywhere and on CUDA where there is a
device (the GPU-only skip the project allows), so the checks a GPU runs are exercised in CI too."""

from __future__ import annotations

import pytest
import torch

from ranker_svc.artifact import load_ranker
from ranker_svc.engine import predict_in_batches
from ranker_svc.exits import ExitPolicy
from ranker_svc.scoring import ScoreJob, Scorer
from ranker_svc.server import build_engine

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
POLICIES = [ExitPolicy(disabled=True), ExitPolicy(threshold=0.05, window=1),
            ExitPolicy(criterion="confidence", threshold=0.7, min_layer=2)]


def _ranker(ranker_dir, engine: str, device: str, dtype=torch.float32) -> Scorer:
    loaded = load_ranker(ranker_dir, dtype=dtype)  # a copy of its own: engines move the model in place
    return Scorer(loaded=loaded, engine=build_engine(engine, loaded, device=device))


@pytest.fixture(scope="module")
def requests(examples, catalog):
    titles = [catalog[i] for i in sorted(catalog)[:16]]
    return [(ex.context, titles[n : n + 8]) for n, ex in enumerate(examples[:4])]


def _scores(ranker: Scorer, requests, policy: ExitPolicy):
    return [ranker.score_candidates(context, titles, policy) for context, titles in requests]


@pytest.mark.parametrize("device", DEVICES)
def test_device_scores_equal_the_cpu_ones(tiny_ranker_dir, requests, device):
    cpu, on_device = _ranker(tiny_ranker_dir, "torch", "cpu"), _ranker(tiny_ranker_dir, "torch", device)
    assert on_device.model.device.type == device
    exits = set()
    for policy in POLICIES:
        for ref, got in zip(_scores(cpu, requests, policy), _scores(on_device, requests, policy)):
            assert [d.exit_layer for d in got] == [d.exit_layer for d in ref]
            assert [d.ctr for d in got] == pytest.approx([d.ctr for d in ref], abs=1e-4)
            exits |= {d.exit_layer for d in got}
    assert len(exits) > 1, "the policies must exit rows at several layers"


@pytest.mark.parametrize("device", DEVICES)
def test_shared_context_equals_full_prompts_on_the_device(tiny_ranker_dir, requests, device):
    ranker = _ranker(tiny_ranker_dir, "torch", device)
    for context, titles in requests:
        context_ids, suffix_ids = ranker.encode_job(ScoreJob(context, tuple(titles), POLICIES[0]))
        for policy in POLICIES:
            shared, shared_layers = ranker.engine.predict_shared([context_ids], suffix_ids, [0] * len(suffix_ids),
                                                                 policy, max_rows=256)
            full, full_layers = predict_in_batches(ranker.engine, [context_ids + s for s in suffix_ids], policy,
                                                   batch_size=8, compaction=False)
            assert shared_layers.tolist() == full_layers.tolist()
            assert shared.tolist() == pytest.approx(full.tolist(), abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_deepspeed_and_bf16_on_the_device(tiny_ranker_dir, requests, device):
    torch_fp32 = _ranker(tiny_ranker_dir, "torch", device)
    deepspeed = _ranker(tiny_ranker_dir, "deepspeed", device)
    bf16 = _ranker(tiny_ranker_dir, "torch", device, torch.bfloat16)
    assert deepspeed.engine.name == "deepspeed" and bf16.model.causal_lm.dtype is torch.bfloat16
    full = POLICIES[0]
    for ref, ds, half in zip(_scores(torch_fp32, requests, full), _scores(deepspeed, requests, full),
                             _scores(bf16, requests, full)):
        assert [d.ctr for d in ds] == pytest.approx([d.ctr for d in ref], abs=1e-4)
        assert [d.ctr for d in half] == pytest.approx([d.ctr for d in ref], abs=0.02)
