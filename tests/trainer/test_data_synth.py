"""The synthetic generator: real taste signal (same-group users overlap more), reproducible."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np

from trainer.data.dataset import data_hash, graph_pairs, load_dataset
from trainer.data.synth import SynthConfig, synth


def _groups(root):
    return {r["user_id"]: r["group"] for r in map(json.loads, (root / "users.jsonl").read_text().splitlines())}


def test_same_group_users_share_more_items(tmp_path):
    synth(tmp_path, SynthConfig(users=240, items=400, groups=6, seed=1))
    ds = load_dataset(tmp_path)
    groups = _groups(tmp_path)
    items = {}
    for u, i in graph_pairs(ds):
        items.setdefault(u, set()).add(i)
    same, diff = [], []
    for a, b in combinations(sorted(items)[:120], 2):
        jacc = len(items[a] & items[b]) / len(items[a] | items[b])
        (same if groups[a] == groups[b] else diff).append(jacc)
    assert np.mean(same) > 3 * np.mean(diff)


def test_ratings_titles_and_labels_carry_the_group(tmp_path):
    synth(tmp_path, SynthConfig(users=200, items=300, groups=5, seed=2))
    ds = load_dataset(tmp_path)
    groups = _groups(tmp_path)
    assert all(1.0 <= x.rating <= 5.0 and x.rating.is_integer() for x in ds.interactions)
    assert len(set(ds.titles.values())) == len(ds.titles)  # distinct titles
    in_group = [s.label for s in ds.samples if ds.attributes[s.item_id]["genre"] == groups[s.user_id]]
    out_group = [s.label for s in ds.samples if ds.attributes[s.item_id]["genre"] != groups[s.user_id]]
    assert np.mean(in_group) > 0.6 > 0.3 > np.mean(out_group)
    for u in list(groups)[:20]:  # timestamps increase per user
        times = [x.timestamp_ms for x in ds.interactions if x.user_id == u]
        assert times == sorted(times) and len(set(times)) == len(times)
    assert set(ds.split_counts()) == {"train", "valid", "test"} and ds.split_counts()["test"] > 0


def test_seed_reproduces(tmp_path):
    synth(tmp_path / "a", SynthConfig(users=50, items=80, seed=3))
    synth(tmp_path / "b", SynthConfig(users=50, items=80, seed=3))
    synth(tmp_path / "c", SynthConfig(users=50, items=80, seed=4))
    assert data_hash(tmp_path / "a") == data_hash(tmp_path / "b") != data_hash(tmp_path / "c")
