import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from trainer.stats import auc, delong_auc_variance, paired_auc_difference


def test_hand_computed_auc_and_variance():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    labels, scores = [1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]
    auc, var = delong_auc_variance(labels, scores)
    assert auc == pytest.approx(0.75)
    # V10 = (1, 0.5), V01 = (0.5, 1): var = Var(V10)/2 + Var(V01)/2 = 0.125/2 + 0.125/2
    assert var == pytest.approx(0.125)


def test_ties_count_a_half():
    auc, _ = delong_auc_variance([1, 0, 1, 0], [0.5, 0.5, 0.7, 0.2])
    assert auc == pytest.approx(roc_auc_score([1, 0, 1, 0], [0.5, 0.5, 0.7, 0.2]))


def test_auc_matches_sklearn_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = labels * 0.5 + rng.normal(size=500)
    assert delong_auc_variance(labels, scores)[0] == pytest.approx(roc_auc_score(labels, scores))


def test_identical_scorers_differ_by_zero_with_zero_error():
    rng = np.random.default_rng(1)
    labels, scores = rng.integers(0, 2, 200), rng.random(200)
    assert paired_auc_difference(labels, scores, scores) == (0.0, 0.0)


def test_paired_standard_error_agrees_with_a_bootstrap():
    rng = np.random.default_rng(2)
    n = 2000
    labels = rng.integers(0, 2, n)
    a = labels + rng.normal(size=n)
    b = a + 0.5 * rng.normal(size=n)  # a noisier copy: strongly correlated with a
    diff, se = paired_auc_difference(labels, a, b)
    assert diff == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b))
    boot = []
    for _ in range(300):
        idx = rng.integers(0, n, n)
        boot.append(roc_auc_score(labels[idx], a[idx]) - roc_auc_score(labels[idx], b[idx]))
    assert se == pytest.approx(float(np.std(boot)), rel=0.2)
    # pairing matters: the unpaired error of the difference is much larger
    unpaired = math.sqrt(delong_auc_variance(labels, a)[1] + delong_auc_variance(labels, b)[1])
    assert se < 0.8 * unpaired


def test_refuses_one_class_or_mismatched_lengths():
    with pytest.raises(ValueError, match="both 0 and 1"):
        delong_auc_variance([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        paired_auc_difference([0, 1], [0.1, 0.2], [0.1, 0.2, 0.3])


def test_one_auc_for_every_caller():
    """trainer.stats.auc (tuning, calibration, baselines, benchmarks) is sklearn's AUC, ties a half, and NaN
    on one class; the bootstrap interval's point value and DeLong's are the same number."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = np.round(labels * 0.4 + rng.normal(size=300), 1)  # rounded: many ties
    assert auc(labels.tolist(), scores.tolist()) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auc(labels, scores) == delong_auc_variance(labels, scores)[0]
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="2 scores for 3 labels"):
        auc([0, 1, 1], [0.1, 0.2])


def test_collapse_reason_names_constant_scores_and_chance_after_falling_loss():
    from trainer.stats import collapse_reason

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400).tolist()
    falling, flat = [2.0, 1.8, 1.5, 1.2, 0.9, 0.7, 0.6, 0.5], [0.7] * 8
    assert "alike" in collapse_reason(labels, [0.5] * 400, falling)  # one score for everyone
    assert "alike" in collapse_reason(labels, (0.5 + 1e-6 * rng.random(400)).tolist(), flat)
    noise = rng.random(400).tolist()
    assert "at chance" in collapse_reason(labels, noise, falling)  # memorised, does not carry over
    assert collapse_reason(labels, noise, flat) is None  # loss did not fall: a weak model, not a collapse
    signal = (np.asarray(labels) * 0.4 + rng.random(400)).tolist()
    assert collapse_reason(labels, signal, falling) is None
    few = labels[:40], noise[:40]  # se ~0.09: too few examples to call chance
    assert collapse_reason(*few, falling) is None
