"""CTR samples from an interaction log, following the paper's section 6 (BookCrossing / Amazon).

The exact rule (``SampleRule``, applied by ``build_samples``):

1. Group interactions by user and sort each user's by ``timestamp_ms`` (ties keep file order).
2. A user's interaction at position ``i`` (0-based) may be a target only when ``i >= min_history``
   (3: "we filtered out samples that had fewer than three past interactions"); users with no such
   position produce no samples. Of the eligible positions, the LAST ``targets_per_user`` become targets
   (default 5; 0 means every eligible position, the paper's Amazon setting; 1 is close to its
   BookCrossing setting, one target per user).
3. A target's history is the up to ``max_history`` (15) interactions right before it, oldest first,
   with their ratings and timestamps.
4. Labels. Explicit data: ``label = 1 if rating >= threshold else 0`` (BookCrossing 5, Amazon 3,
   MovieLens 4). Implicit data (every rating 1): the target is a positive, and for each positive
   ``negatives_per_positive`` (default 1) negatives are drawn with the same history and timestamp, from
   the item popularity distribution (probability proportional to the item's interaction count in the whole
   log), excluding every item the user ever interacted with and without repeats within a user. Sampling
   negatives by popularity keeps a popularity-only predictor at AUC 0.5, so the model must use the user.
5. Split BY USER: the users that have samples are sorted, shuffled with ``seed`` and cut 8:1:1
   (``round(0.8 n)`` train, ``round(0.1 n)`` valid, the rest test); every sample of a user shares its split.

Everything is deterministic given the interactions and the rule (numpy ``default_rng(seed)``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from exitrank.types import Event, Sample
from trainer.data.rows import DatasetMeta, InteractionRow

# The paper's binarisation thresholds (section 6), and MovieLens' usual one.
DEFAULT_THRESHOLDS = {"bookcrossing": 5.0, "amazon2018": 3.0, "movielens": 4.0}


@dataclass(frozen=True)
class SampleRule:
    """How samples are built; stored as ``dataset.json["sample_rule"]``.

    Args:
        kind: "chronological" (this module's rule), "given" (samples.jsonl) or "none" (no CTR samples,
            e.g. a pure ranking benchmark such as LightGCN's gowalla split).
        threshold: explicit ratings ``>= threshold`` are positives.
        implicit: all ratings are 1; negatives are sampled.
        targets_per_user: last K eligible interactions per user become targets (0 = all).
        max_history: history length cap (15 in the paper).
        min_history: minimum prior interactions for a target (3 in the paper).
        negatives_per_positive: sampled negatives per positive (implicit data only).
        split: train/valid/test fractions of users (8:1:1).
        seed: shuffling and negative-sampling seed.
    """

    kind: str = "chronological"
    threshold: float = 4.0
    implicit: bool = False
    targets_per_user: int = 5
    max_history: int = 15
    min_history: int = 3
    negatives_per_positive: int = 1
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("chronological", "given", "none"):
            raise ValueError(f"sample_rule.kind must be chronological|given|none, got {self.kind!r}")
        if self.targets_per_user < 0 or self.max_history < 1 or self.min_history < 0:
            raise ValueError("sample_rule: targets_per_user >= 0, max_history >= 1, min_history >= 0")
        if len(self.split) != 3 or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"sample_rule.split must be 3 fractions summing to 1, got {self.split}")

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["split"] = list(self.split)
        return row

    @classmethod
    def from_meta(cls, meta: DatasetMeta) -> "SampleRule":
        """The rule of a data set; without one, the default rule with the data set's threshold."""
        row = dict(meta.sample_rule or {})
        row.setdefault("threshold", meta.rating_threshold)
        row.setdefault("implicit", meta.implicit)
        if "split" in row:
            row["split"] = tuple(row["split"])
        return cls(**row)


def split_users(users: Sequence[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Assign each user to train/valid/test: sorted, shuffled with ``seed``, cut by ``fractions``."""
    ordered = sorted(users)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_train = int(round(fractions[0] * len(ordered)))
    n_valid = int(round(fractions[1] * len(ordered)))
    names = ["train"] * n_train + ["valid"] * n_valid + ["test"] * (len(ordered) - n_train - n_valid)
    return {ordered[j]: names[rank] for rank, j in enumerate(perm)}


class PopularitySampler:
    """Draws items with probability proportional to popularity, excluding a given set (no repeats)."""

    def __init__(self, popularity: Counter[str], *, rng: np.random.Generator) -> None:
        self.items = np.array(sorted(popularity))
        counts = np.array([popularity[i] for i in self.items], dtype=np.float64)
        self.p = counts / counts.sum()
        self.cdf = np.cumsum(self.p)
        self.cdf[-1] = 1.0
        self.rng = rng

    def draw(self, n: int, exclude: set[str]) -> list[str]:
        """``n`` distinct items not in ``exclude`` (fewer only when too few items remain)."""
        out: list[str] = []
        chosen: set[str] = set()
        for _ in range(20):  # rejection sampling keeps the conditional distribution exact
            need = n - len(out)
            if need <= 0:
                break
            drawn = np.searchsorted(self.cdf, self.rng.random(2 * need + 8), side="right")
            for item in self.items[np.minimum(drawn, len(self.items) - 1)].tolist():
                if item not in exclude and item not in chosen:
                    out.append(item)
                    chosen.add(item)
                    if len(out) == n:
                        break
        if len(out) < n:  # the user covers most of the mass: draw from what is left, by popularity
            rest = [j for j, i in enumerate(self.items) if i not in exclude and i not in chosen]
            if rest:
                p = self.p[rest] / self.p[rest].sum()
                k = min(n - len(out), len(rest))
                out += [str(self.items[j]) for j in self.rng.choice(rest, size=k, replace=False, p=p)]
        return out


def build_samples(interactions: Sequence[InteractionRow], rule: SampleRule) -> list[Sample]:
    """Apply the module's rule; returns samples grouped by user (sorted ids), chronological per user."""
    by_user: dict[str, list[InteractionRow]] = defaultdict(list)
    for x in interactions:
        by_user[x.user_id].append(x)
    for events in by_user.values():
        events.sort(key=lambda x: x.timestamp_ms)  # stable: ties keep file order
    targets = {u: _target_positions(len(ev), rule) for u, ev in by_user.items()}
    users = sorted(u for u, pos in targets.items() if pos)
    split_of = split_users(users, rule.split, rule.seed)
    sampler = None
    if rule.implicit and rule.negatives_per_positive > 0:
        sampler = PopularitySampler(Counter(x.item_id for x in interactions),
                                    rng=np.random.default_rng(rule.seed + 1))
    samples: list[Sample] = []
    for user in users:
        events = by_user[user]
        negatives: list[str] = []
        if sampler is not None:
            negatives = sampler.draw(len(targets[user]) * rule.negatives_per_positive,
                                     {x.item_id for x in events})
        for n, i in enumerate(targets[user]):
            history = tuple(Event(x.item_id, x.rating, x.timestamp_ms)
                            for x in events[max(0, i - rule.max_history):i])
            target = events[i]
            label = 1 if rule.implicit else int(target.rating >= rule.threshold)
            common = dict(user_id=user, history=history, split=split_of[user], timestamp_ms=target.timestamp_ms)
            samples.append(Sample(item_id=target.item_id, label=label, **common))
            per = rule.negatives_per_positive
            for neg in negatives[n * per:(n + 1) * per]:
                samples.append(Sample(item_id=neg, label=0, **common))
    return samples


def _target_positions(n_events: int, rule: SampleRule) -> list[int]:
    eligible = list(range(rule.min_history, n_events))
    return eligible[-rule.targets_per_user:] if rule.targets_per_user else eligible
