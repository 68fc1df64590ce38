r"""AUC, its bootstrap interval, and the uncertainty of AUC differences by DeLong's method: the one place
the trainer, calibration, the reproduction and the benchmarks compute an AUC.

DeLong, DeLong and Clarke-Pearson (1988), *Comparing the areas under two or more correlated
receiver operating characteristic curves: a nonparametric approach*, Biometrics 44(3). With m
positives :math:`x_i` and n negatives :math:`y_j`, :math:`\psi(x, y) = [x > y] + \tfrac12[x = y]`:

.. math::  \hat A = \frac{1}{mn}\sum_{i,j}\psi(x_i, y_j), \quad
           V_{10}(x_i) = \frac1n\sum_j \psi(x_i, y_j), \quad V_{01}(y_j) = \frac1m\sum_i \psi(x_i, y_j)

and for two scorers r, s on the same examples

.. math::  \mathrm{Cov}(\hat A_r, \hat A_s) = \frac{S_{10}^{rs}}{m} + \frac{S_{01}^{rs}}{n}

where :math:`S_{10}` and :math:`S_{01}` are the sample covariances of the :math:`V_{10}` and
:math:`V_{01}` components across positives and negatives. So
:math:`\mathrm{Var}(\hat A_r - \hat A_s) = \mathrm{Var}_r + \mathrm{Var}_s - 2\,\mathrm{Cov}_{rs}`:
two exit policies that mostly agree on the same validation set have a small variance of their
difference, which is what calibration needs to know. The components come from mid-ranks
(Sun and Xu, 2014, *Fast implementation of DeLong's algorithm*, IEEE SPL 21(11)), O(N log N).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata


def _components(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the DeLong components V10 (one per positive) and V01 (one per negative)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    m, n = len(pos), len(neg)
    both = rankdata(np.concatenate([pos, neg]))  # mid-ranks: ties count a half
    within_pos, within_neg = rankdata(pos), rankdata(neg)
    v10 = (both[:m] - within_pos) / n  # negatives below each positive
    v01 = 1.0 - (both[m:] - within_neg) / m  # positives above each negative
    return float(v10.mean()), v10, v01


def _check(labels: Sequence[int], *score_sets: Sequence[float]) -> np.ndarray:
    y = np.asarray(labels)
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError("labels must hold both 0 and 1")
    for scores in score_sets:
        if len(scores) != len(y):
            raise ValueError(f"{len(scores)} scores for {len(y)} labels")
    return y


def auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC (a tie counts a half), NaN when the labels hold only one class."""
    y = np.asarray(labels)
    if len(scores) != len(y):
        raise ValueError(f"{len(scores)} scores for {len(y)} labels")
    if set(np.unique(y).tolist()) != {0, 1}:
        return float("nan")
    return _components(y, np.asarray(scores, dtype=np.float64))[0]


def auc_with_ci(labels: Sequence[int], scores: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """ROC AUC and its bootstrap percentile interval (seeded; resamples with one class only are skipped).

    Raises:
        ValueError: the labels hold a single class (AUC is undefined).
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError("AUC needs both positive and negative labels in the evaluated samples")
    value = auc(y, s)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(y), size=len(y))
        if y[idx].min() != y[idx].max():
            draws.append(auc(y[idx], s[idx]))
    if not draws:
        return value, (value, value)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return value, (float(lo), float(hi))


def delong_auc_variance(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """(AUC, its DeLong variance)."""
    y = _check(labels, scores)
    auc, v10, v01 = _components(y, np.asarray(scores, dtype=np.float64))
    return auc, float(np.var(v10, ddof=1) / len(v10) + np.var(v01, ddof=1) / len(v01))


def paired_auc_difference(labels: Sequence[int], a: Sequence[float], b: Sequence[float]
                          ) -> tuple[float, float]:
    """(AUC(a) - AUC(b), the standard error of that difference), both scored on ``labels``."""
    y = _check(labels, a, b)
    auc_a, a10, a01 = _components(y, np.asarray(a, dtype=np.float64))
    auc_b, b10, b01 = _components(y, np.asarray(b, dtype=np.float64))
    var = np.var(a10 - b10, ddof=1) / len(a10) + np.var(a01 - b01, ddof=1) / len(a01)
    return auc_a - auc_b, math.sqrt(max(float(var), 0.0))


CONSTANT_SPREAD = 1e-4  # scores this close together are one score (a float32 CTR prints alike to 4 places)
CHANCE_SIGMAS = 2.0  # an AUC within this many DeLong standard errors of 0.5 is at chance
# the chance test needs a validation set that can tell: se 0.05 is ~120 balanced examples, where an AUC
# of 0.6 already stands 2 errors above chance; on fewer, only constant scores are judged
CHANCE_MAX_SE = 0.05


def collapse_reason(labels: Sequence[int], scores: Sequence[float], step_losses: Sequence[float]) -> str | None:
    """Why a tuned model is a failed training run, or None: the rule of "no collapsed models".

    A model whose validation scores are all alike (spread under ``CONSTANT_SPREAD``) ranks nothing;
    one whose validation AUC is at chance (within ``CHANCE_SIGMAS`` DeLong standard errors of 0.5,
    judged only when that error is at most ``CHANCE_MAX_SE``) while its training loss fell (the last
    quarter of the steps below the first) learned something that does not carry to unseen users.
    """
    s = np.asarray(scores, dtype=np.float64)
    spread = float(s.max() - s.min()) if len(s) else 0.0
    if spread < CONSTANT_SPREAD:
        return (f"the model scores every validation example alike (spread {spread:.2e} over {len(s)} examples): "
                "it learned the label prior only")
    if len(set(labels)) < 2 or len(step_losses) < 4:
        return None
    value, variance = delong_auc_variance(labels, s)
    quarter = len(step_losses) // 4
    first, last = float(np.mean(step_losses[:quarter])), float(np.mean(step_losses[-quarter:]))
    se = math.sqrt(variance)
    if last < first and se <= CHANCE_MAX_SE and abs(value - 0.5) < CHANCE_SIGMAS * se:
        return (f"validation AUC {value:.3f} is at chance (within {CHANCE_SIGMAS:g} standard errors of 0.5, "
                f"se {se:.3f}, {len(s)} examples) while the training loss fell "
                f"{first:.4f} -> {last:.4f}")
    return None
