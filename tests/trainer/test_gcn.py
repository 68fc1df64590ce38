"""trainer.gcn: evaluate_ranking on a hand-computed case; fit_gcn separates clustered users."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainer.gcn import evaluate_ranking, fit_gcn


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny graphs: threads only add barrier waits on a shared box
    yield
    torch.set_num_threads(before)


def test_evaluate_ranking_hand_computed():
    user = np.array([[1.0], [-1.0], [0.5]])  # user 2 has no test items: not averaged
    item = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]])
    train = [(0, 0), (1, 4), (2, 1)]
    test = [(0, 2), (0, 4), (1, 3)]
    got = evaluate_ranking(user, item, train, test, k=2)
    # user 0 ranks 1, 2 (0 masked): hit at rank 1 of 2 relevant -> recall 1/2,
    #   ndcg = (1/log2 3) / (1 + 1/log2 3); user 1 ranks 3, 2 (4 masked): hit at rank 0 -> 1, 1
    ndcg0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert got == pytest.approx({"recall@2": (0.5 + 1.0) / 2, "ndcg@2": (ndcg0 + 1.0) / 2})
    perfect = evaluate_ranking(user, item, train, [(0, 1), (0, 2)], k=2)
    assert perfect == pytest.approx({"recall@2": 1.0, "ndcg@2": 1.0})


def _clustered_pairs(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for c in range(3):
        for u in range(15):
            items = rng.choice(20, 9, replace=False)
            train += [(f"c{c}u{u}", f"c{c}i{i}") for i in items[:8]]
            held_out.append((f"c{c}u{u}", f"c{c}i{items[8]}"))
    return train, held_out


def test_fit_gcn_puts_same_cluster_users_nearer():
    train, held_out = _clustered_pairs()
    emb = fit_gcn(train + train[:10], dim=16, epochs=25, batch_size=128, lr=0.01, seed=3,
                  progress=False, eval_pairs=held_out, eval_every=5, k=20)
    assert len(emb.user_ids) == 45 and len(emb.item_ids) == 60
    assert emb.user.shape == (45, 16) and emb.item.shape == (60, 16) and emb.item_foldin.shape == (60, 16)
    assert emb.meta["interactions"] == len(train)  # duplicates ignored
    assert emb.meta["layers"] == 3 and emb.meta["layer_combination"] == "mean_1_to_K"
    unit = emb.user / np.linalg.norm(emb.user, axis=1, keepdims=True)
    cosine = unit @ unit.T
    cluster = np.array([u[:2] for u in emb.user_ids])
    same = cluster[:, None] == cluster[None, :]
    np.fill_diagonal(same, False)
    other = cluster[:, None] != cluster[None, :]
    for row in range(45):  # every user's nearest users are from its own cluster
        assert cosine[row][same[row]].min() > cosine[row][other[row]].max()
    # held-out items of the user's own cluster rank high (random would give about 20/52)
    assert emb.meta["metrics"]["recall@20"] > 0.7
    assert [r["epoch"] for r in emb.meta["curve"] if "recall@20" in r] == [5, 10, 15, 20, 25]
    # the fold-in basis reproduces a fitted user (mean_1_to_K)
    row = {item: r for r, item in enumerate(emb.item_ids)}
    items = sorted({row[i] for u, i in train if u == emb.user_ids[0]})
    np.testing.assert_allclose(emb.item_foldin[items].sum(0) / np.sqrt(len(items)), emb.user[0],
                               rtol=1e-4, atol=1e-6)


def test_fit_gcn_is_deterministic_per_seed():
    train, _ = _clustered_pairs(seed=1)
    a = fit_gcn(train, dim=8, epochs=2, batch_size=64, seed=5, progress=False)
    b = fit_gcn(train, dim=8, epochs=2, batch_size=64, seed=5, progress=False)
    c = fit_gcn(train, dim=8, epochs=2, batch_size=64, seed=6, progress=False)
    assert a.version == b.version != c.version
    with pytest.raises(ValueError, match="at least one"):
        fit_gcn([], progress=False)


def test_fit_gcn_time_budget_stops_early_and_evaluates_every_combination():
    train, held_out = _clustered_pairs(seed=2)
    emb = fit_gcn(train, dim=8, epochs=10_000, lr=0.05, time_budget_s=0.5, progress=False,
                  eval_pairs=held_out, eval_every=0)
    assert 1 <= emb.meta["epochs"] < 10_000 and emb.meta["time_budget_s"] == 0.5
    assert set(emb.meta["by_layer_combination"]) == {"mean_1_to_K", "mean_0_to_K", "last"}
    assert emb.meta["metrics"]["recall@20"] == emb.meta["by_layer_combination"]["mean_1_to_K"]["recall@20"]


def test_user_variants_are_the_same_fit_read_out_otherwise(tmp_path):
    from retriever_svc.embeddings import GCNEmbeddings
    from retriever_svc.errors import EmbeddingsError

    train, _ = _clustered_pairs(seed=3)
    emb = fit_gcn(train, dim=8, epochs=3, batch_size=64, seed=1, progress=False,
                  user_variants=("last", "mean_0_to_K", "mean_1_to_K"))
    # the fit's own combination read out again is its users; the others differ
    np.testing.assert_allclose(emb.user_variants.pop("mean_1_to_K"), emb.user, rtol=1e-5, atol=1e-6)
    assert not np.allclose(emb.user_variants["last"], emb.user)
    same = fit_gcn(train, dim=8, epochs=3, batch_size=64, seed=1, progress=False)
    np.testing.assert_array_equal(same.user, emb.user)  # asking for variants changes nothing else
    emb.save(tmp_path)
    loaded = GCNEmbeddings.load(tmp_path)
    assert sorted(loaded.user_variants) == ["last", "mean_0_to_K"]
    last = loaded.with_users("last")
    np.testing.assert_array_equal(last.user, emb.user_variants["last"])
    assert last.layer_combination == "last" and last.version != emb.version and last.item is loaded.item
    assert loaded.with_users("mean_1_to_K") is loaded
    with pytest.raises(EmbeddingsError, match="exported: none"):
        same.with_users("mean_0_to_K")


def test_bench_gcn_quality_quick_on_a_tiny_graph(tmp_path, capsys):
    from bench.bench_gcn_quality import main

    train, held_out = _clustered_pairs(seed=4)
    for name, pairs in (("train.txt", train), ("test.txt", held_out)):
        by_user: dict[str, list[str]] = {}
        for user, item in pairs:
            by_user.setdefault(user, []).append(item)
        (tmp_path / name).write_text("".join(f"{u} {' '.join(i)}\n" for u, i in by_user.items()))
    result = main(["--data", str(tmp_path), "--quick", "--threads", "1", "--dim", "8"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(json.dumps(result))
    assert result["dataset"] == tmp_path.name and result["layer_combination"] == "mean_0_to_K"
    assert [row["epoch"] for row in result["curve"]] == [1, 2, 3] and result["epochs"] == 3
    assert set(result["by_layer_combination"]) == {"mean_1_to_K", "mean_0_to_K", "last"}
    assert result["recall@20"] == result["by_layer_combination"]["mean_0_to_K"]["recall@20"]
    assert 0 < result["recall@20"] <= 1 and result["met_target"] in (True, False)
