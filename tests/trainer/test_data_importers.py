"""Each importer on a small hand-written file in the real format; data-marked runs on ../shared/data."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from exitrank.types import Sample
from trainer.data.dataset import DataFormatError, graph_pairs, load_dataset, read_test_pairs
from trainer.data.importers import ImportOptions, import_dataset
from trainer.data.importers.tallrec import book_id


def _write(path: Path, text: str, encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))


def test_lightgcn(tmp_path):
    _write(tmp_path / "src/train.txt", "0 0 1 2\n1 2 3\n2 \n3 4 0 1\n")
    _write(tmp_path / "src/test.txt", "0 3\n1 0 4\n")
    summary = import_dataset("lightgcn", tmp_path / "src", tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert summary["interactions.jsonl"] == 8 and ds.meta.implicit
    assert ds.titles["4"] == "item 4"
    assert read_test_pairs(tmp_path / "out") == [("0", "3"), ("1", "0"), ("1", "4")]
    assert ds.samples == [] and len(graph_pairs(ds)) == 8  # a ranking benchmark: the whole train graph
    times = [x.timestamp_ms for x in ds.interactions if x.user_id == "0"]
    assert times == sorted(times)


GAMES_ITEM = "item_id:token\ttitle:token_seq\n" + "".join(f"{i}\tGame number {i}\n" for i in range(12))
GAMES_VALID = "user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 1 2 3\t4\n1\t5 6 7\t8\n2\t9 10 11\t0\n"
GAMES_TEST = "user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 1 2 3 4\t5\n1\t5 6 7 8\t9\n2\t9 10 11 0\t1\n"


def test_games6k(tmp_path):
    src = tmp_path / "src"
    _write(src / "Games-6k.item", GAMES_ITEM)
    _write(src / "Games-6k.valid.inter", GAMES_VALID)
    _write(src / "Games-6k.test.inter", GAMES_TEST)
    import_dataset("games6k", src, tmp_path / "out", ImportOptions(seed=1))
    ds = load_dataset(tmp_path / "out")
    seq = sorted((x for x in ds.interactions if x.user_id == "0"), key=lambda x: x.timestamp_ms)
    assert [x.item_id for x in seq] == ["0", "1", "2", "3", "4", "5"]
    assert len({x.timestamp_ms for x in seq}) == 6
    assert ds.meta.implicit and ds.titles["3"] == "Game number 3"
    pos = [s for s in ds.samples if s.label == 1]
    neg = [s for s in ds.samples if s.label == 0]
    assert len(pos) == 3 + 2 + 2  # positions >= 3 of sequences of length 6, 5, 5
    mine = {u: {x.item_id for x in ds.interactions if x.user_id == u} for u in "012"}
    assert neg and all(s.item_id not in mine[s.user_id] for s in neg)


def test_games6k_bad_header(tmp_path):
    _write(tmp_path / "src/G.item", "id\ttitle\n0\tx\n")
    _write(tmp_path / "src/G.valid.inter", GAMES_VALID)
    with pytest.raises(DataFormatError, match=r"G.item:1: expected the header"):
        import_dataset("games6k", tmp_path / "src", tmp_path / "out")


INSTR = ("Given the user's preference and unpreference, identify whether the user will like the target book "
         'by answering "Yes." or "No.".')


def _tallrec_record(liked, disliked, target, label):
    fmt = lambda books: ", ".join(f'"{t}" written by {a}' for t, a in books)  # noqa: E731
    text = (f"User Preference: {fmt(liked)}\nUser Unpreference: {fmt(disliked)}\n"
            f'Whether the user will like the target book "{fmt([target])}"?')
    return {"instruction": INSTR, "input": text, "output": "Yes." if label else "No."}


def test_tallrec(tmp_path):
    dune = ("God Emperor of Dune (Dune Chronicles, Book 4)", "Frank Herbert")
    valid = [_tallrec_record([dune, ("I, Claudius", "Robert Graves")], [("Rising Sun", "MICHAEL CRICHTON")],
                             ("Friday", "Robert Heinlein"), 1) for _ in range(10)]
    test = [_tallrec_record([], [("'Quoted' 'Title'", "A. N. Author"), ("Rising Sun", "Michael Crichton")],
                            ("GOD EMPEROR OF DUNE (Dune Chronicles, Book 4)", "Frank  Herbert"), 0)]
    _write(tmp_path / "src/valid.json", json.dumps(valid))
    _write(tmp_path / "src/test.json", json.dumps(test))
    import_dataset("tallrec", tmp_path / "src", tmp_path / "out", ImportOptions(seed=0))
    ds = load_dataset(tmp_path / "out")
    assert Counter(s.split for s in ds.samples) == {"train": 9, "valid": 1, "test": 1}
    t = ds.split("test")[0]
    assert t.label == 0 and t.user_id == "t0"
    assert t.item_id == book_id(*dune)  # normalised title: the same node as the valid records' book
    assert ds.title(book_id("Rising Sun", "MICHAEL CRICHTON")).startswith("Rising Sun by")
    assert [e.rating for e in ds.split("train")[0].history] == [1.0, 0.0, 1.0]  # interleaved, liked first
    assert ds.title(book_id("I, Claudius", "Robert Graves")) == "I, Claudius by Robert Graves"
    pairs = set(graph_pairs(ds))
    assert ("t0", t.item_id) not in pairs  # a test target is never an edge
    assert not any(u == "t0" for u, _ in pairs)  # its history holds only dislikes (rating 0 < 1)
    train_user = ds.split("train")[0].user_id
    assert (train_user, book_id("Friday", "Robert Heinlein")) in pairs  # a liked train target is an edge
    assert (train_user, book_id("Rising Sun", "MICHAEL CRICHTON")) not in pairs  # a dislike is not


def test_tallrec_bad_output(tmp_path):
    bad = _tallrec_record([], [("A", "B")], ("C", "D"), 1) | {"output": "Maybe."}
    _write(tmp_path / "src/valid.json", json.dumps([bad]))
    _write(tmp_path / "src/test.json", "[]")
    with pytest.raises(DataFormatError, match=r"valid.json: record 0: 'output' must be"):
        import_dataset("tallrec", tmp_path / "src", tmp_path / "out")


def _ratings_log(sep: str) -> str:
    rows = [(u, i, (u * 7 + i) % 5 + 1, 1000 + 10 * i) for u in (1, 2, 3) for i in range(1, 7)]
    return "".join(sep.join(map(str, r)) + "\n" for r in rows)


def test_movielens_100k(tmp_path):
    src = tmp_path / "src"
    flags = lambda j: "|".join("1" if k == j else "0" for k in range(19))  # noqa: E731
    _write(src / "u.item", "".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|{flags(i)}\n" for i in range(1, 7)),
           "latin-1")
    _write(src / "u.data", _ratings_log("\t"))
    import_dataset("movielens", src, tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert ds.titles["2"] == "Movie 2 (1995)" and ds.attributes["2"]["genres"] == "Adventure"
    assert ds.meta.rating_threshold == 4.0 and not ds.meta.implicit
    assert ds.interactions[0].timestamp_ms == 1_010_000
    assert all(s.label == int(next(x.rating for x in ds.interactions if x.user_id == s.user_id
                                   and x.item_id == s.item_id) >= 4) for s in ds.samples)


def test_movielens_1m_with_given_samples(tmp_path):
    src = tmp_path / "src"
    _write(src / "movies.dat", "".join(f"{i}::Film {i} (2000)::Drama|Comedy\n" for i in range(1, 7)), "latin-1")
    _write(src / "ratings.dat", _ratings_log("::"))
    given = [Sample("1", (), "3", 1, "test").to_json(), Sample("2", (), "4", 0, "train").to_json()]
    _write(src / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in given))
    import_dataset("movielens", src, tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert [s.to_json() for s in ds.samples] == given  # the published split, exactly
    assert ds.attributes["1"]["genres"] == "Drama|Comedy"


def test_bookcrossing(tmp_path):
    src = tmp_path / "src"
    books = ('"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S"\n'
             '"001";"Clara Callan";"Richard Bruce Wright";"2001";"HarperFlamingo";"http://x"\n'
             '"002";"A \\"quoted\\" title; with semicolon";"Ann Author";"1999";"Pub";"http://y"\n'
             '"003";"Décor";"Émile";"2000";"P";"http://z"\n')
    ratings = '"User-ID";"ISBN";"Book-Rating"\n' + "".join(
        f'"{u}";"{b}";"{r}"\n' for u, b, r in
        [(7, "001", 8), (7, "002", 0), (7, "003", 3), (7, "999", 9), (7, "002", 5), (8, "001", 4), (8, "003", 6)])
    _write(src / "BX-Books.csv", books, "latin-1")
    _write(src / "BX-Book-Ratings.csv", ratings, "latin-1")
    import_dataset("bookcrossing", src, tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert ds.titles["002"] == 'A "quoted" title; with semicolon by Ann Author'
    assert ds.titles["003"] == "Décor by Émile"
    seven = [(x.item_id, x.rating) for x in sorted(ds.interactions, key=lambda x: x.timestamp_ms) if x.user_id == "7"]
    assert seven == [("001", 8.0), ("003", 3.0), ("002", 5.0)]  # 0-ratings and unknown ISBNs dropped
    assert ds.meta.rating_threshold == 5.0
    assert set(graph_pairs(ds)) == {("7", "001"), ("7", "002"), ("8", "003")}


def test_amazon2018(tmp_path):
    src = tmp_path / "src"
    reviews = [{"reviewerID": u, "asin": a, "overall": r, "unixReviewTime": t}
               for u, a, r, t in [("A", "x1", 5.0, 30), ("A", "x2", 2.0, 10), ("A", "x9", 4.0, 20),
                                  ("B", "x1", 3.0, 5)]]
    _write(src / "Beauty.json", "".join(json.dumps(r) + "\n" for r in reviews))
    meta = [{"asin": "x1", "title": "Soap  Bar"}, {"asin": "x2", "title": "Shampoo"}, {"asin": "x9", "title": ""}]
    (src / "meta_Beauty.json.gz").write_bytes(gzip.compress("".join(json.dumps(m) + "\n" for m in meta).encode()))
    import_dataset("amazon2018", src, tmp_path / "out", ImportOptions(threshold=3.0))
    ds = load_dataset(tmp_path / "out")
    assert ds.titles == {"x1": "Soap Bar", "x2": "Shampoo"}  # untitled items dropped
    assert sorted((x.user_id, x.item_id, x.timestamp_ms) for x in ds.interactions) == [
        ("A", "x1", 30_000), ("A", "x2", 10_000), ("B", "x1", 5_000)]
    assert set(graph_pairs(ds)) == {("A", "x1"), ("B", "x1")}  # rating >= 3


def test_unknown_format_and_missing_source(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        import_dataset("csv", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="train.txt"):
        import_dataset("lightgcn", tmp_path, tmp_path / "out")


@pytest.mark.data
def test_games6k_real_subsample(shared_data, tmp_path):
    summary = import_dataset("games6k", shared_data / "games6k", tmp_path / "g", ImportOptions(max_users=300))
    ds = load_dataset(tmp_path / "g")
    assert summary["users"] == 300 == len({x.user_id for x in ds.interactions})
    counts = Counter(s.label for s in ds.samples)
    assert counts[0] == counts[1] > 0  # one popularity-matched negative per positive
    users = Counter(split for _, split in {(s.user_id, s.split) for s in ds.samples})
    assert users == {"train": 240, "valid": 30, "test": 30}
    assert all(ds.titles[s.item_id] for s in ds.samples)


@pytest.mark.data
def test_tallrec_real(shared_data, tmp_path):
    import_dataset("tallrec", shared_data / "tallrec-book", tmp_path / "t")
    ds = load_dataset(tmp_path / "t")
    test = Counter(s.label for s in ds.split("test"))
    assert test == {1: 1054, 0: 1373}
    assert len(ds.split("train")) + len(ds.split("valid")) == 2427
    assert len(ds.split("valid")) == 243
    assert all(3 <= len(s.history) <= 10 for s in ds.samples)
    # shared books join pseudo-users: some train users share a liked book with a test user
    pairs = graph_pairs(ds)
    readers = Counter(i for _, i in pairs)
    assert sum(1 for n in readers.values() if n > 1) > 500
