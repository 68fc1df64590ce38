"""The frozen-backbone few-shot diagnosis: the head is chosen on validation only, and the like-share rule."""

from __future__ import annotations

import numpy as np

from bench.fewshot_frozen import like_share, probe_row
from exitrank.types import HistoryItem, RankExample, UserContext


def split(n: int, rng: np.random.Generator, signal_layer: int, layers: int = 4, width: int = 16) -> dict:
    labels = rng.integers(0, 2, n)
    feats = rng.normal(size=(n, layers, width)).astype(np.float32)
    feats[:, signal_layer, 0] += 1.5 * (2 * labels - 1)  # one layer carries the label
    return {"feats": feats, "labels": labels}


def test_the_head_is_chosen_on_validation_and_measured_once_on_test():
    rng = np.random.default_rng(0)
    train, valid, test = split(64, rng, 2), split(200, rng, 2), split(200, rng, 2)
    row = probe_row(train, valid, test, list(range(64)), layers=[0, 1, 2, 3])
    assert row["layer"] == 3 and row["valid_auc"] > 0.8 and row["test_auc"] > 0.8  # 1-based: the signal's layer
    # only the rows named train the head: the first 8 alone do worse on validation than all 64
    few = probe_row(train, valid, test, list(range(8)), layers=[0, 1, 2, 3])
    assert few["valid_auc"] < row["valid_auc"]


def test_like_share_counts_the_liked_books_in_the_prompt():
    def example(ratings):
        history = tuple(HistoryItem(item_id=f"i{j}", title=f"t{j}", rating=r) for j, r in enumerate(ratings))
        return RankExample(context=UserContext(user_id="u", history=history), item_id="x", title="x", label=1)

    shares = like_share([example([1.0, 1.0, 0.0, 0.0]), example([1.0]), example([])])
    assert shares.tolist() == [0.5, 1.0, 0.5]  # no history: no evidence either way
