"""Evaluation maths and the report format (the end-to-end run is in test_cli.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from trainer.eval import CONFIGS, render_markdown, write_report
from trainer.stats import auc_with_ci


def test_perfect_ranking_gives_one_with_a_degenerate_interval():
    labels = [0, 0, 0, 1, 1, 1, 0, 1]
    scores = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 0.25, 0.75]
    auc, (lo, hi) = auc_with_ci(labels, scores, resamples=200, seed=0)
    assert auc == 1.0 and lo == hi == 1.0


def test_reversed_and_noisy_rankings():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=400)
    scores = labels + rng.normal(0, 1.0, size=400)
    auc, (lo, hi) = auc_with_ci(labels, scores, resamples=300, seed=1)
    assert auc == pytest.approx(roc_auc_score(labels, scores))
    assert lo < auc < hi and 0.6 < lo and hi < 0.95 and hi - lo < 0.15
    assert auc_with_ci(labels, -scores, resamples=50)[0] == pytest.approx(1 - auc)
    # the interval is seeded, and narrows with more data
    assert auc_with_ci(labels, scores, resamples=300, seed=1) == (auc, (lo, hi))
    big = rng.integers(0, 2, size=4000)
    _, (blo, bhi) = auc_with_ci(big, big + rng.normal(0, 1.0, size=4000), resamples=300)
    assert bhi - blo < (hi - lo) / 2


def test_single_class_is_refused():
    with pytest.raises(ValueError, match="both positive and negative"):
        auc_with_ci([1, 1, 1], [0.2, 0.3, 0.4])


def test_report_files(tmp_path):
    rows = [{"name": n, "retrieval": r, "early_exit": e, "auc": 0.5 + j / 10, "auc_ci95": [0.4, 0.9],
             "requests_per_s": 10.0 * (j + 1), "mean_exit_layer": 6.0 - j, "exit_layer_histogram": {"3": 2, "6": 1}}
            for j, (n, r, e) in enumerate(CONFIGS)]
    report = {"dataset": "d", "samples": {"train": 8, "valid": 1, "test": 3}, "seed": 0, "configs": rows,
              "evaluated": {"split": "test", "samples": 3, "positives": 1, "negatives": 2},
              "model_version": "llama-x", "embedding_version": "gcn-y", "num_layers": 6, "exit_layers": [2, 4],
              "k": 4, "batch_size": 32, "machine": {"cores": 2}}
    json_path, md_path = write_report(report, tmp_path / "r")
    assert json.loads(json_path.read_text()) == report
    md = md_path.read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "config" not in line] \
        == [n for n, _, _ in CONFIGS]
    assert "0.8000" in md and "40.0" in md  # the fourth row's numbers, formatted from the report
    assert "| no_retrieval | none | no |" in render_markdown(report)
