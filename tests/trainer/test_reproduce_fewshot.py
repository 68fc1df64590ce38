"""The few-shot table's arithmetic: every run gets enough optimiser steps, and the table's mean,
spread and verdict against TALLRec-7B come from the runs (the runs themselves are in test_reproduce)."""

from __future__ import annotations

import math

import pytest

from trainer.reproduce.fewshot import MIN_STEPS, epochs_for, table
from trainer.reproduce.plan import TALLREC_TEST


@pytest.mark.parametrize("shots", [16, 64, 256, 1000])
def test_every_run_takes_enough_steps(shots):
    epochs = epochs_for(shots, 8)
    assert epochs >= 2 and epochs * math.ceil(shots / 8) >= MIN_STEPS
    assert epochs == 2 or (epochs - 1) * math.ceil(shots / 8) < MIN_STEPS  # no more than needed


def test_table_means_spreads_and_verdicts():
    runs = [{"shots": 16, "test_auc": a, "collapsed": None} for a in (0.58, 0.60, 0.59)]
    runs += [{"shots": 64, "test_auc": a, "collapsed": c} for a, c in ((0.55, None), (0.50, "alike"), (0.61, None))]
    rows = {r["shots"]: r for r in table(runs, TALLREC_TEST)}
    assert rows[16]["auc_mean"] == pytest.approx(59.0) and rows[16]["auc_std"] == pytest.approx(1.0)
    assert rows[16]["beats_tallrec_7b"] is True  # 59.00 > 56.36
    assert rows[64]["beats_tallrec_7b"] is False and rows[64]["collapsed_runs"] == 1  # 55.33 < 60.39
    assert rows[64]["aucs"] == pytest.approx([55.0, 50.0, 61.0])
