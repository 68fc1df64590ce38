"""Training the classic CTR baselines on the ranker's own examples, and scoring with them.

One recipe for all four models: binary cross-entropy on the click logit, Adam, shuffled mini-batches,
and early stopping on the validation AUC (``trainer.stats.auc``): after each epoch the valid split is
scored, the best epoch's weights are kept, and training stops after ``patience`` epochs without a
better AUC. Without a usable valid split (absent, or one class only) every epoch runs and the last is
kept.

Unseen ids: the feature space is built from the training examples, so new users and items map to the
out-of-vocabulary index. During training each id is replaced by that index with probability
``id_dropout`` so the OOV rows learn what an average unknown user or item looks like (with a split by
user, every test user is unknown).

Everything is deterministic given ``seed`` (a forked torch RNG: the caller's global RNG state is left
as it was). Typical use, from the evaluation::

    from trainer.baselines import BASELINES, fit_baseline

    for name in BASELINES:
        model = fit_baseline(name, train_examples, valid_examples, seed=0)
        ctr = model.predict(test_examples)       # (N,) click probabilities
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from exitrank.types import RankExample
from trainer.baselines.deepfm import DeepFM
from trainer.baselines.din import DIN
from trainer.baselines.features import OOV, PAD, Batch, FeatureSpace
from trainer.baselines.gru4rec import GRU4Rec
from trainer.baselines.sasrec import SASRec
from trainer.stats import auc

BASELINES: dict[str, type[nn.Module]] = {"deepfm": DeepFM, "din": DIN, "gru4rec": GRU4Rec, "sasrec": SASRec}


@dataclass(frozen=True)
class FitConfig:
    """The training settings of one baseline (``fit_baseline``'s keyword arguments)."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    embedding_dim: int = 16
    max_history: int = 15
    patience: int = 3  # valid AUC can sit still for an epoch or two before the sequence models take off
    id_dropout: float = 0.05
    titles: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("fit_baseline needs epochs >= 1, batch_size >= 1 and patience >= 1")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")


@dataclass
class Baseline:
    """A fitted baseline: its model, feature space and training record."""

    name: str
    model: nn.Module
    space: FeatureSpace
    config: FitConfig
    seed: int
    best_epoch: int = 0
    valid_auc: float = math.nan
    epochs: list[dict[str, float]] = field(default_factory=list)  # per epoch: train_loss, valid_auc
    seconds: float = 0.0

    def predict(self, examples: Sequence[RankExample], *, batch_size: int = 4096) -> np.ndarray:
        """(N,) click probabilities of ``examples``, float64, in their order."""
        return predict_batch(self.model, self.space.encode(examples), batch_size=batch_size)

    def metrics(self) -> dict:
        """A JSON-able summary for reports."""
        return {"name": self.name, "seed": self.seed, "best_epoch": self.best_epoch, "valid_auc": self.valid_auc,
                "epochs": self.epochs, "seconds": self.seconds, "config": asdict(self.config),
                "num_parameters": sum(p.numel() for p in self.model.parameters())}


def predict_batch(model: nn.Module, batch: Batch, *, batch_size: int = 4096) -> np.ndarray:
    """(B,) sigmoid of the model's logits, in eval mode, without gradients."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(batch)))
            out.append(torch.sigmoid(model(batch.take(rows))).double())
    return torch.cat(out).numpy() if out else np.zeros(0)


def drop_ids(batch: Batch, p: float, generator: torch.Generator) -> Batch:
    """The batch with each user, target and history id replaced by OOV with probability ``p``."""
    if p == 0.0:
        return batch

    def drop(ids: torch.Tensor) -> torch.Tensor:
        hit = (torch.rand(ids.shape, generator=generator) < p) & (ids != PAD)
        return torch.where(hit, torch.full_like(ids, OOV), ids)

    return Batch(drop(batch.user), drop(batch.item), drop(batch.history), batch.rating,
                 batch.item_words, batch.history_words)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, labels: torch.Tensor, *,
                config: FitConfig, generator: torch.Generator) -> float:
    """One shuffled pass of BCE-with-logits steps; returns the mean loss."""
    model.train()
    order = torch.randperm(len(batch), generator=generator)
    losses = []
    for start in range(0, len(order), config.batch_size):
        rows = order[start : start + config.batch_size]
        logits = model(drop_ids(batch.take(rows), config.id_dropout, generator))  # (b,)
        loss = F.binary_cross_entropy_with_logits(logits, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def fit_baseline(
    name: str,
    train: Sequence[RankExample],
    valid: Sequence[RankExample] | None = None,
    *,
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    embedding_dim: int = 16,
    max_history: int = 15,
    patience: int = 3,
    id_dropout: float = 0.05,
    titles: bool = False,
    progress: bool = False,
) -> Baseline:
    """Trains the baseline ``name`` (a key of ``BASELINES``) on ``train``, early-stopped on ``valid``.

    Args:
        titles: add each item's title as a bag of words (off: the paper's classic models use ids).
        progress: a progress bar over the epochs.

    Raises:
        ValueError: ``name`` is not a baseline, ``train`` is empty, or a setting is out of range.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    if not train:
        raise ValueError("fit_baseline needs at least one training example")
    config = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       embedding_dim=embedding_dim, max_history=max_history, patience=patience,
                       id_dropout=id_dropout, titles=titles)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        baseline = _fit(name, train, valid or [], config, seed, progress)
    baseline.seconds = time.perf_counter() - started
    return baseline


def _fit(name: str, train: Sequence[RankExample], valid: Sequence[RankExample], config: FitConfig, seed: int,
         progress: bool) -> Baseline:

    space = FeatureSpace.fit(train, max_history=config.max_history, titles=config.titles)
    model = BASELINES[name](space=space, dim=config.embedding_dim)
    baseline = Baseline(name, model, space, config, seed)
    train_batch, labels = space.encode(train), torch.tensor([ex.label for ex in train], dtype=torch.float32)
    valid_batch, valid_labels = space.encode(valid), [ex.label for ex in valid]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    best_state, since_best = None, 0
    bar = tqdm(range(1, config.epochs + 1), desc=f"baseline {name}", disable=not progress)
    for epoch in bar:
        loss = train_epoch(model, optimizer, train_batch, labels, config=config, generator=generator)
        valid_auc = auc(valid_labels, predict_batch(model, valid_batch).tolist()) if valid else math.nan
        baseline.epochs.append({"epoch": epoch, "train_loss": loss, "valid_auc": valid_auc})
        bar.set_postfix(loss=f"{loss:.4f}", valid_auc=f"{valid_auc:.4f}")
        if math.isnan(valid_auc):
            continue  # nothing to stop on: keep training, keep the last epoch
        if best_state is None or valid_auc > baseline.valid_auc:
            best_state, since_best = copy.deepcopy(model.state_dict()), 0
            baseline.best_epoch, baseline.valid_auc = epoch, valid_auc
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        baseline.best_epoch = len(baseline.epochs)
    model.eval()
    return baseline
