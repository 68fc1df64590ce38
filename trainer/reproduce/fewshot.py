"""TALLRec's few-shot protocol on the tallrec-book test file: the model tuned on 16 / 64 / 256 training
samples (a seeded subset of the training pool, three seeds each), scored on the same test samples.

TALLRec (Bao et al., RecSys 2023, Table 2) tunes LLaMA-7B with LoRA on 16 / 64 / 256 samples and reports
56.36 / 60.39 / 64.38 AUC on this file (``plan.TALLREC_TEST``). Its prompt is the user's own liked and
disliked books and the target, no retrieval: here k=0 (``OfflineContexts(..., k=0)``), the model the
plan names (``FewShotPlan.model``: an installed pretrained model, or a preset trained from scratch in
``--quick``), LoRA for the pretrained one. Small sample counts get more epochs, so every run takes at
least ``MIN_STEPS`` optimiser steps (16 samples in batches of 8 would otherwise be 4 steps). A few
samples over many epochs are memorised, so the weights kept are those of the epoch with the best
validation AUC (``instruction_tune(keep_best_epoch=True)``): chosen on validation, never on the test file.

Each run is a stage of its own (resumable); the tuned weights are deleted once its test scores are
kept (nine 135M-parameter checkpoints would take 5 GB). A collapsed run is kept and labelled.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TALLREC_SHOTS = (16, 64, 256)
MIN_STEPS = 32


@dataclass(frozen=True)
class FewShotPlan:
    """What the few-shot table runs: ``model`` is an installed model's name (``trainer models``) or a
    preset (``tiny``/``small``) trained from scratch."""

    model: str = "smollm2-135m"
    shots: tuple[int, ...] = TALLREC_SHOTS
    seeds: tuple[int, ...] = (0, 1, 2)
    valid: int = 200
    test: int = 600
    batch_size: int = 8
    # LoRA's 3e-4 barely moved SmolLM2 in 32-64 steps; chosen on validation AUC (seed 0; 200 validation
    # samples, bench/README): 1e-3. None: instruction_tune's default (3e-4 with LoRA, the preset's otherwise)
    lr: float | None = 1e-3

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def epochs_for(shots: int, batch_size: int) -> int:
    """At least 2 epochs and at least ``MIN_STEPS`` optimiser steps."""
    return max(2, math.ceil(MIN_STEPS / math.ceil(shots / batch_size)))


def stage_run(data: Path, plan: FewShotPlan, shots: int, seed: int, max_history: int, out: Path) -> dict:
    """Tune on ``shots`` samples (seed ``seed``), score the test subset, drop the weights."""
    from trainer.context import OfflineContexts
    from trainer.data.dataset import load_dataset
    from trainer.models import resolve_base_model
    from trainer.stats import auc
    from trainer.tune import evaluate_scores, instruction_tune

    contexts = OfflineContexts(load_dataset(data), None, k=0, max_history=max_history)
    train = contexts.examples("train", retrieval=False, limit=shots, seed=seed)
    valid = contexts.examples("valid", retrieval=False, limit=plan.valid, seed=0)
    test = contexts.examples("test", retrieval=False, limit=plan.test, seed=0)  # one subset for every run
    preset = plan.model if plan.model in ("tiny", "small") else None
    epochs = epochs_for(shots, plan.batch_size)
    metrics = instruction_tune(train, out_dir=out, valid=valid, preset=preset or "tiny", epochs=epochs,
                               base_model=None if preset else resolve_base_model(plan.model), lr=plan.lr,
                               batch_size=plan.batch_size, seed=seed, progress=False, allow_collapse=True,
                               keep_best_epoch=True)
    labels, scores = evaluate_scores(out / "ranker", test, batch_size=16)
    shutil.rmtree(out / "ranker")
    return {"shots": shots, "seed": seed, "epochs": epochs, "test_auc": auc(labels, scores),
            "valid_auc": metrics.get("valid_auc"), "best_epoch": metrics.get("best_epoch"),
            "epoch_valid_aucs": metrics.get("epoch_valid_aucs"), "collapsed": metrics.get("collapsed"),
            "tune_seconds": metrics["seconds"], "tflops_achieved": metrics["tflops_achieved"],
            "dtype": metrics["dtype"], "labels": labels, "ctr": scores}


def table(runs: list[dict], published: dict[str, float]) -> list[dict]:
    """One row per shot count: mean and spread over seeds, TALLRec-7B's number beside it."""
    rows = []
    for shots in sorted({r["shots"] for r in runs}):
        aucs = [100 * r["test_auc"] for r in runs if r["shots"] == shots]
        ref = published.get(f"tallrec_7b_{shots}")
        mean = float(np.mean(aucs))
        rows.append({"shots": shots, "auc_mean": mean, "auc_std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
                     "aucs": aucs, "seeds": len(aucs), "tallrec_7b": ref,
                     "beats_tallrec_7b": None if ref is None else mean > ref,
                     "collapsed_runs": sum(1 for r in runs if r["shots"] == shots and r["collapsed"])})
    return rows
