"""VectorIndex: exact search is brute-force cosine, the query user is excluded, upserts are live."""

from __future__ import annotations

import numpy as np
import pytest

from retriever_svc.vectors import VectorIndex


@pytest.fixture(scope="module")
def users() -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    return [f"u{j}" for j in range(300)], rng.normal(size=(300, 16)).astype(np.float32) * 3


def test_exact_search_equals_brute_force(users, brute_force):
    ids, vectors = users
    index = VectorIndex(ids, vectors, kind="auto")
    assert index.kind == "exact" and len(index) == 300 and "u7" in index and "x" not in index
    for query in ("u0", "u7", "u299"):
        got = index.search(query, 10)
        want = brute_force(ids, vectors, vectors[ids.index(query)], 10, exclude=query)
        assert [u for u, _ in got] == [u for u, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
        assert query not in [u for u, _ in got]
        assert all(-1 - 1e-6 <= s <= 1 + 1e-6 for _, s in got)


def test_search_vector_without_exclude_finds_itself_first(users):
    ids, vectors = users
    index = VectorIndex(ids, vectors, kind="exact")
    (top, score), *_ = index.search_vector(vectors[5] * 10, 3)
    assert top == "u5" and score == pytest.approx(1.0, abs=1e-5)
    assert index.search("u5", 1000)[-1][0] != "u5" and len(index.search("u5", 1000)) == 299


def test_upsert_adds_and_replaces_without_rebuild(users, brute_force):
    ids, vectors = users
    index = VectorIndex(ids, vectors, kind="exact")
    index.upsert("new", vectors[42] * 2 + 0.01)
    assert "new" in index and len(index) == 301
    assert index.search("new", 1)[0][0] == "u42"
    index.upsert("u42", -vectors[42])  # move u42 to the opposite side
    np.testing.assert_allclose(index.get("u42"), -vectors[42] / np.linalg.norm(vectors[42]), atol=1e-6)
    assert index.search("new", 300)[-1][0] == "u42"
    all_ids = ids + ["new"]
    all_vectors = np.vstack([vectors, vectors[42] * 2 + 0.01])
    all_vectors[42] = -vectors[42]
    want = brute_force(all_ids, all_vectors, all_vectors[7], 20, exclude="u7")
    assert [u for u, _ in index.search("u7", 20)] == [u for u, _ in want]


def test_hnsw_recall_and_tombstones(brute_force):
    rng = np.random.default_rng(1)
    ids = [f"u{j}" for j in range(3000)]
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    index = VectorIndex(ids, vectors, kind="auto", hnsw_min_users=1000)
    assert index.kind == "hnsw"
    hits = 0
    for query in ids[:50]:
        want = {u for u, _ in brute_force(ids, vectors, vectors[ids.index(query)], 10, query)}
        hits += len(want & {u for u, _ in index.search(query, 10)})
    assert hits / 500 >= 0.9
    target = vectors[10]
    index.upsert("u20", target)  # the old u20 node becomes a tombstone
    got = index.search("u10", 5)
    assert got[0][0] == "u20" and got[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [u for u, _ in got].count("u20") == 1 and len(index) == 3000
    assert index.rebuild_due() is None
    for round_ in range(4):  # tombstones outnumber live rows: due, but never compacted by an upsert
        for j in range(100, 2200):
            index.upsert(f"u{j}", vectors[j] * (2 + round_) + 0.01 * round_)  # a new vector each time
    assert index.tombstones > len(index) + 1000 and index.rebuild_due() == "compact"
    want = [u for u, _ in brute_force(ids, vectors, vectors[500], 5, "u500")]
    assert len(set(want) & {u for u, _ in index.search("u500", 5)}) >= 4  # tombstones skipped
    compacted = index.rebuilt(*index.rows())
    assert compacted.tombstones == 0 and len(compacted) == 3000 and compacted.rebuild_due() is None
    assert compacted.search("u10", 1)[0][0] == "u20"
    for user in ("u500", "u2100", "u2500"):
        np.testing.assert_allclose(compacted.get(user), index.get(user), atol=1e-6)
    assert [u for u, _ in compacted.search("u500", 5)] == [u for u, _ in index.search("u500", 5)]


def test_an_unchanged_vector_is_no_update_and_auto_grows_into_hnsw(users):
    ids, vectors = users
    hnsw = VectorIndex(ids, vectors, kind="hnsw", hnsw_m=8, ef_construction=20)
    for user, vector in zip(ids, vectors):  # a re-applied event folds in the same vector again
        hnsw.upsert(user, vector)
    assert hnsw.tombstones == 0 and hnsw.rebuild_due() is None
    grown = VectorIndex(ids[:5], vectors[:5], kind="auto", hnsw_min_users=len(ids))
    assert grown.kind == "exact" and grown.rebuild_due() is None
    for user, vector in zip(ids[5:], vectors[5:]):
        grown.upsert(user, vector)
    assert grown.kind == "exact" and grown.rebuild_due() == "hnsw"  # grown past hnsw_min_users: due
    switched = grown.rebuilt(*grown.rows())
    assert switched.kind == "hnsw" and len(switched) == len(ids) and switched.rebuild_due() is None


def test_invalid_construction():
    with pytest.raises(ValueError, match="kind"):
        VectorIndex(["a"], np.ones((1, 4)), kind="ivf")
    with pytest.raises(ValueError, match="shape"):
        VectorIndex(["a", "b"], np.ones((1, 4)))
    with pytest.raises(ValueError, match="distinct"):
        VectorIndex(["a", "a"], np.ones((2, 4)))
    empty = VectorIndex([], np.zeros((0, 4)))
    assert empty.search_vector(np.ones(4), 3) == [] and empty.get("a") is None
    empty.upsert("a", np.ones(4))
    assert empty.search_vector(np.ones(4), 3)[0][0] == "a"
    with pytest.raises(KeyError):
        empty.search("zzz", 1)


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_save_and_load_keep_answers_and_tombstones(users, tmp_path, kind):
    ids, vectors = users
    index = VectorIndex(ids, vectors, kind=kind, hnsw_m=8, ef_construction=20, ef_search=32)
    index.upsert("u3", vectors[4])  # HNSW: a tombstone for the old u3
    index.upsert("late", vectors[5])
    index.save(tmp_path / "idx", version="v9", after="12-0")
    loaded, extra = VectorIndex.load(tmp_path / "idx")
    assert extra == {"version": "v9", "after": "12-0"}
    assert loaded.kind == kind and len(loaded) == len(index) == 301 and "late" in loaded
    for query in ("u0", "u3", "late"):
        assert loaded.search(query, 8) == index.search(query, 8)
    loaded.upsert("u0", vectors[9])  # a loaded index stays updatable
    assert loaded.search("u9", 1)[0] == ("u0", pytest.approx(1.0, abs=1e-5))
    (tmp_path / "idx.faiss").write_bytes(b"not faiss")
    with pytest.raises(RuntimeError):
        VectorIndex.load(tmp_path / "idx")
