"""The retriever benchmark's data: a million synthetic users shaped like real LightGCN users.

A short LightGCN fit of gowalla gives the item fold-in basis; each synthetic user's history is 10 items
of one real gowalla user and 5 of another, and its embedding is the fold-in of that history (the
service's rule, ``retriever_svc.embeddings.fold_in``, here batched over 100k users at a time). Needs
../shared/data/gowalla (``EXITRANK_DATA``); titles are games6k's when present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("EXITRANK_DATA", "../shared/data"))
GOWALLA, GAMES = DATA / "gowalla", DATA / "games6k" / "Games-6k.item"


def titles(count: int) -> list[str]:
    """Realistic item titles (games6k's, reused cyclically); "Item j" without that file."""
    if not GAMES.is_file():
        return [f"Item {j}" for j in range(count)]
    lines = GAMES.read_text(encoding="utf-8").splitlines()[1:]
    names = [line.split("\t", 1)[1].strip()[:200] or "Untitled" for line in lines if "\t" in line]
    return [names[j % len(names)] for j in range(count)]


@dataclass
class Synthetic:
    user_ids: list[str]
    vectors: np.ndarray  # (U, d) fold-in embeddings
    history: np.ndarray  # (U, 15) item rows, oldest first
    distinct: np.ndarray  # (U, 15) bool: first occurrence of the item in the row
    item_ids: list[str]
    basis: np.ndarray  # (I, d) item fold-in basis
    source: str
    titles: list[str]

    def items_of(self, user: int) -> list[str]:
        return [self.item_ids[i] for i in self.history[user][self.distinct[user]]]


# ---------------------------------------------------------------------------------------- data


def gowalla_basis(dim: int, epochs: int) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Fold-in basis of a short LightGCN fit of gowalla, its users' item rows, its item ids."""
    import torch  # noqa: PLC0415 - only for this step

    from trainer.gcn import fit_gcn, read_user_lines  # noqa: PLC0415

    torch.set_num_threads(2)
    pairs = read_user_lines(GOWALLA / "train.txt")
    emb = fit_gcn(pairs, dim=dim, epochs=epochs, progress=False)
    row = {item: r for r, item in enumerate(emb.item_ids)}
    by_user: dict[str, list[int]] = {}
    for user, item in pairs:
        by_user.setdefault(user, []).append(row[item])
    return emb.item_foldin, [np.array(v) for v in by_user.values()], emb.item_ids


def synthesize(n: int, dim: int, seed: int, fit_epochs: int) -> Synthetic:
    """``n`` users: 10 items of one real user and 5 of another, embedded by fold-in."""
    if not (GOWALLA / "train.txt").is_file():
        raise SystemExit(f"bench_retriever needs {GOWALLA}/train.txt (set EXITRANK_DATA to the "
                         "shared data folder): its users shape the synthetic ones")
    basis, real, item_ids = gowalla_basis(dim, fit_epochs)
    source = f"gowalla fold-in basis ({fit_epochs}-epoch LightGCN fit), gowalla histories"
    rng = np.random.default_rng(seed)
    lengths = np.array([len(r) for r in real])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(real)
    history = np.empty((n, 15), np.int32)
    distinct = np.empty((n, 15), bool)
    vectors = np.empty((n, dim), np.float32)
    for begin in range(0, n, 100_000):
        size = min(100_000, n - begin)
        picks = []
        for count in (10, 5):  # positions inside a random real user's item list
            user = rng.integers(0, len(real), size)[:, None]
            picks.append(offsets[user] + (rng.random((size, count)) * lengths[user]).astype(int))
        rows = flat[np.concatenate(picks, 1)]  # (size, 15)
        order = np.argsort(rows, axis=1, kind="stable")
        ordered = np.take_along_axis(rows, order, 1)
        first = np.ones_like(ordered, bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        keep = np.empty_like(first)
        np.put_along_axis(keep, order, first, 1)
        history[begin : begin + size], distinct[begin : begin + size] = rows, keep
        summed = (basis[rows] * keep[:, :, None]).sum(1)  # (size, d)
        vectors[begin : begin + size] = summed / np.sqrt(keep.sum(1, keepdims=True))
    return Synthetic([f"u{j}" for j in range(n)], vectors, history, distinct, list(item_ids),
                     np.ascontiguousarray(basis, np.float32), source, titles(len(item_ids)))
