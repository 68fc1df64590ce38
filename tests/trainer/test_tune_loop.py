"""The tuning loop's pieces that need no training run: the best-epoch copy and its restore."""

from __future__ import annotations

import torch
from torch import nn

from trainer.tune_loop import BestEpoch


def test_best_epoch_puts_back_the_best_weights_and_only_the_trainable_ones():
    torch.manual_seed(0)
    model, frozen = nn.Linear(4, 2), nn.Linear(4, 2)
    frozen.requires_grad_(False)
    best = BestEpoch(model, None, frozen)
    assert best.update(1, 0.60)
    first = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert best.update(2, 0.70)  # better: copied again
    second = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.mul_(-1.0)
        frozen.weight.add_(5.0)
    assert not best.update(3, 0.65)  # worse: not copied
    moved_frozen = frozen.weight.detach().clone()
    best.restore()
    assert torch.equal(model.weight, second) and not torch.equal(model.weight, first)
    assert torch.equal(frozen.weight, moved_frozen)  # not trainable: never copied, never restored
    assert (best.epoch, best.auc, best.aucs) == (2, 0.70, {1: 0.60, 2: 0.70, 3: 0.65})


def test_restore_without_a_recorded_epoch_changes_nothing():
    model = nn.Linear(3, 1)
    before = model.weight.detach().clone()
    BestEpoch(model).restore()
    assert torch.equal(model.weight, before)
