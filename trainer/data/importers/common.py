"""Shared importer pieces: options, user subsampling, synthetic timestamps, writing the directory."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.dataset import write_dataset
from trainer.data.rows import DatasetMeta, InteractionRow, Item
from trainer.data.samples import SampleRule

# Synthetic clocks for sources without timestamps: one interaction a day from 2020-09-13.
EPOCH_MS = 1_600_000_000_000
DAY_MS = 86_400_000


@dataclass(frozen=True)
class ImportOptions:
    """Flags of ``trainer data import``. ``None`` means the format's default."""

    max_users: int | None = None  # keep a seeded random subset of users (for demos and quick runs)
    seed: int = 0
    threshold: float | None = None  # explicit ratings >= threshold are positives
    targets_per_user: int = 5
    negatives_per_positive: int = 1
    sample_kind: str | None = None  # chronological | given | none


def keep_users(users: Iterable[str], max_users: int | None, seed: int) -> set[str]:
    """All users, or a random (seeded) subset of ``max_users`` of them."""
    ordered = sorted(set(users))
    if max_users is None or max_users >= len(ordered):
        return set(ordered)
    pick = np.random.default_rng(seed).choice(len(ordered), size=max_users, replace=False)
    return {ordered[j] for j in pick}


def sequence_timestamps(n: int) -> list[int]:
    """Increasing timestamps for a chronological sequence that has none (one a day)."""
    return [EPOCH_MS + j * DAY_MS for j in range(n)]


def rule_for(options: ImportOptions, *, implicit: bool, threshold: float, kind: str) -> SampleRule:
    return SampleRule(
        kind=options.sample_kind or kind,
        threshold=threshold,
        implicit=implicit,
        targets_per_user=options.targets_per_user,
        negatives_per_positive=options.negatives_per_positive,
        seed=options.seed,
    )


def finish(
    out: Path,
    *,
    name: str,
    fmt: str,
    items: dict[str, Item],
    interactions: list[InteractionRow],
    rule: SampleRule,
    options: ImportOptions,
    **extra_files,
) -> dict:
    """Write the directory (items limited to those referenced) and return a summary."""
    used = {x.item_id for x in interactions}
    for sample in extra_files.get("samples") or ():
        used.add(sample.item_id)
        used.update(e.item_id for e in sample.history)
    used.update(i for _, i in extra_files.get("test_pairs") or ())
    meta = DatasetMeta(
        name=name,
        format=fmt,
        implicit=rule.implicit,
        rating_threshold=rule.threshold,
        sample_rule=rule.to_json(),
        extra={"max_users": options.max_users, "seed": options.seed},
    )
    kept = [items[i] for i in sorted(used, key=_natural)]
    counts = write_dataset(out, items=kept, interactions=interactions, meta=meta, **extra_files)
    return {"out": str(out), "users": len({x.user_id for x in interactions}), **counts}


def _natural(item_id: str) -> tuple[int, int | str]:
    return (0, int(item_id)) if item_id.isdigit() else (1, item_id)
