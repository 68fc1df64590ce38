"""The canonical data set: validation errors name file and line, round trips, hashing, the graph rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exitrank.types import Event, Sample
from trainer.data.dataset import (
    DataFormatError,
    data_hash,
    graph_interactions,
    graph_pairs,
    load_dataset,
    write_dataset,
)
from trainer.data.rows import DatasetMeta, InteractionRow, Item
from trainer.data.samples import SampleRule


def _write(root: Path, name: str, rows: list) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _small(root: Path) -> None:
    _write(root, "items.jsonl", [{"item_id": "a", "title": "Alpha"}, {"item_id": "b", "title": "Beta"}])
    _write(root, "interactions.jsonl", [{"user_id": "u", "item_id": "a", "rating": 5, "timestamp_ms": 1}])


def test_load_roundtrip_and_defaults(tmp_path):
    items = [Item("a", "Alpha", {"genre": "x"}), Item("b", "Beta")]
    inter = [InteractionRow("u1", "a", 5.0, 10), InteractionRow("u1", "b", 2.0, 20)]
    meta = DatasetMeta(name="t", implicit=False, rating_threshold=4.0)
    counts = write_dataset(tmp_path / "d", items=items, interactions=inter, meta=meta)
    assert counts == {"items.jsonl": 2, "interactions.jsonl": 2}
    ds = load_dataset(tmp_path / "d")
    assert ds.titles == {"a": "Alpha", "b": "Beta"}
    assert ds.attributes == {"a": {"genre": "x"}}
    assert ds.interactions == inter
    assert ds.meta.name == "t" and ds.title("zzz") == "item zzz"


@pytest.mark.parametrize(
    ("name", "row", "message"),
    [
        ("interactions.jsonl", {"user_id": "u", "item_id": "a", "rating": "x", "timestamp_ms": 1},
         "'rating' must be a number"),
        ("interactions.jsonl", {"user_id": "u", "item_id": "a", "rating": 1}, "missing field 'timestamp_ms'"),
        ("interactions.jsonl", {"user_id": "u", "item_id": "nope", "rating": 1, "timestamp_ms": 1},
         "'nope' is not in items.jsonl"),
        ("interactions.jsonl", "{not json", "not valid JSON"),
        ("items.jsonl", {"item_id": "c"}, "'title' must be a string"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, name, row, message):
    _small(tmp_path)
    with open(tmp_path / name, "a") as fh:
        fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    line = 2 if name == "interactions.jsonl" else 3
    with pytest.raises(DataFormatError, match=rf"{name}:{line}: .*{message}"):
        load_dataset(tmp_path)


def test_bad_sample_split_is_refused(tmp_path):
    _small(tmp_path)
    row = Sample("u", (Event("a", 5.0, 1),), "b", 1, "train").to_json() | {"split": "dev"}
    _write(tmp_path, "samples.jsonl", [row])
    with pytest.raises(DataFormatError, match=r"samples.jsonl:1: field 'split'"):
        _ = load_dataset(tmp_path).samples


def test_missing_directory_says_how_to_create_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer data import"):
        load_dataset(tmp_path / "nothing")


def test_data_hash_tracks_content(tmp_path):
    _small(tmp_path)
    before = data_hash(tmp_path)
    assert before == data_hash(tmp_path) and len(before) == 64
    with open(tmp_path / "interactions.jsonl", "a") as fh:
        fh.write(json.dumps({"user_id": "v", "item_id": "b", "rating": 1, "timestamp_ms": 2}) + "\n")
    assert data_hash(tmp_path) != before


def test_graph_excludes_valid_and_test_targets_and_explicit_negatives(tmp_path):
    items = [Item(str(i), f"t{i}") for i in range(6)]
    inter = [InteractionRow(u, str(i), 5.0 if i != 2 else 1.0, i) for u in ("a", "b", "c") for i in range(6)]
    samples = [
        Sample("a", (), "5", 1, "train"),
        Sample("b", (), "5", 1, "valid"),
        Sample("c", (), "4", 1, "test"),
        Sample("c", (), "3", 0, "test"),
    ]
    rule = SampleRule(kind="given", threshold=4.0)
    meta = DatasetMeta(implicit=False, rating_threshold=4.0, sample_rule=rule.to_json())
    write_dataset(tmp_path, items=items, interactions=inter, meta=meta, samples=samples)
    ds = load_dataset(tmp_path)
    pairs = set(graph_pairs(ds))
    assert ("a", "5") in pairs  # a train target stays in the graph
    assert ("b", "5") not in pairs and ("c", "4") not in pairs and ("c", "3") not in pairs
    assert not any(i == "2" for _, i in pairs)  # rating 1 < threshold 4: not an edge
    assert all(x.rating >= 4.0 for x in graph_interactions(ds))
    assert len(pairs) == 3 * 5 - 3
