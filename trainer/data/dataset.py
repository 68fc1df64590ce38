"""The canonical data set directory: reading, validating, writing and hashing it.

Layout (docs/architecture.md)::

    DIR/items.jsonl          {"item_id": str, "title": str, "attributes": {str: str}?}
    DIR/interactions.jsonl   {"user_id": str, "item_id": str, "rating": float, "timestamp_ms": int}
    DIR/samples.jsonl        optional: exitrank.types.Sample.to_json() rows (a given, published split)
    DIR/dataset.json         optional: {"name", "format", "implicit", "rating_threshold", "sample_rule": {...}}
    DIR/test_pairs.jsonl     optional: {"user_id", "item_id"} held-out pairs for ranking evaluation

The rows' types (``Item``, ``InteractionRow``, ``DatasetMeta``) are in ``trainer.data.rows``.
``dataset.json`` records how the importer built the directory. Its ``sample_rule`` says how CTR samples
are made when ``samples.jsonl`` is absent (``trainer.data.samples.SampleRule``): the rule is applied
deterministically at load time, so the directory stays small and ``data_hash`` still covers the split.

Graph rule (``graph_interactions`` / ``graph_pairs``): the LightGCN training graph holds every
interaction EXCEPT the targets of valid/test samples (a (user, item) pair that is the target of a valid or
test sample is dropped, repeats included), and for explicit data only positive interactions, i.e.
``rating >= rating_threshold``, are edges. Implicit data (all ratings 1) keeps every interaction.

    >>> ds = load_dataset("data/games6k")
    >>> pairs = graph_pairs(ds)        # [(user_id, item_id), ...] for trainer.gcn.fit_gcn
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exitrank.types import Sample
from trainer.data.rows import DatasetMeta, InteractionRow, Item
from trainer.data.samples import SampleRule, build_samples

ITEMS = "items.jsonl"
INTERACTIONS = "interactions.jsonl"
SAMPLES = "samples.jsonl"
META = "dataset.json"
TEST_PAIRS = "test_pairs.jsonl"
HASHED_FILES = (META, ITEMS, INTERACTIONS, SAMPLES, TEST_PAIRS)
SPLITS = ("train", "valid", "test")


class DataFormatError(ValueError):
    """A data set file is malformed; the message names the file, the line and the field to fix."""


@dataclass
class Dataset:
    """A loaded data set. ``samples`` are read from samples.jsonl or built by the sample rule on first use."""

    root: Path
    meta: DatasetMeta
    titles: dict[str, str]
    attributes: dict[str, dict[str, str]]
    interactions: list[InteractionRow]
    _samples: list[Sample] | None = None

    @property
    def samples(self) -> list[Sample]:
        if self._samples is None:
            rule = SampleRule.from_meta(self.meta)
            self._samples = build_samples(self.interactions, rule) if rule.kind == "chronological" else []
        return self._samples

    def split(self, name: str) -> list[Sample]:
        """The samples of one split ("train" | "valid" | "test")."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [s for s in self.samples if s.split == name]

    def title(self, item_id: str) -> str:
        """The item's title; items without one get the synthetic title ``item <id>``."""
        return self.titles.get(item_id) or f"item {item_id}"

    def split_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(SPLITS, 0)
        for s in self.samples:
            counts[s.split] += 1
        return counts


# --------------------------------------------------------------------------------------------- reading


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each non-blank line; a bad line raises naming file and line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _field(row: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in row:
        raise DataFormatError(f"{where}: missing field {key!r}")
    value = row[key]
    if kind is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) != "":
            return str(value)
        raise DataFormatError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise DataFormatError(f"{where}: field {key!r} must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DataFormatError(f"{where}: field {key!r} must be an integer, got {value!r}")
    raise TypeError(kind)


def read_items(path: Path) -> Iterator[Item]:
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        title = row.get("title")
        if not isinstance(title, str):
            raise DataFormatError(f"{where}: field 'title' must be a string, got {title!r}")
        attrs = row.get("attributes") or {}
        if not isinstance(attrs, dict):
            raise DataFormatError(f"{where}: field 'attributes' must be an object, got {attrs!r}")
        yield Item(_field(row, "item_id", str, where), title, {str(k): str(v) for k, v in attrs.items()})


def read_interactions(path: Path, known_items: dict[str, str] | None = None) -> Iterator[InteractionRow]:
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        item_id = _field(row, "item_id", str, where)
        if known_items is not None and item_id not in known_items:
            raise DataFormatError(f"{where}: item_id {item_id!r} is not in {ITEMS}; add it there")
        yield InteractionRow(
            _field(row, "user_id", str, where),
            item_id,
            _field(row, "rating", float, where),
            _field(row, "timestamp_ms", int, where),
        )


def read_samples(path: Path, known_items: dict[str, str] | None = None) -> Iterator[Sample]:
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            sample = Sample.from_json(row)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(f"{where}: not a Sample row ({exc!r}); see exitrank.types.Sample") from None
        if sample.split not in SPLITS:
            raise DataFormatError(f"{where}: field 'split' must be one of {SPLITS}, got {sample.split!r}")
        if sample.label not in (0, 1):
            raise DataFormatError(f"{where}: field 'label' must be 0 or 1, got {sample.label!r}")
        if known_items is not None:
            for item_id in (sample.item_id, *(e.item_id for e in sample.history)):
                if item_id not in known_items:
                    raise DataFormatError(f"{where}: item_id {item_id!r} is not in {ITEMS}; add it there")
        yield sample


def read_meta(root: Path) -> DatasetMeta | None:
    path = root / META
    if not path.exists():
        return None
    try:
        return DatasetMeta.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataFormatError(f"{path}: not a dataset.json object ({exc})") from None


def load_dataset(path: str | Path) -> Dataset:
    """Read and validate a canonical data set directory (rows are streamed, errors name file:line).

    Without ``dataset.json`` the data is implicit when every rating is 1, and samples come from the
    default ``SampleRule`` (threshold 4 for explicit data) unless ``samples.jsonl`` is present.
    """
    root = Path(path)
    for name in (ITEMS, INTERACTIONS):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} is missing: is {root} a data set directory? "
                                    f"(create one with `trainer data import` or `trainer data synth`)")
    titles: dict[str, str] = {}
    attributes: dict[str, dict[str, str]] = {}
    for item in read_items(root / ITEMS):
        titles[item.item_id] = item.title
        if item.attributes:
            attributes[item.item_id] = item.attributes
    interactions = list(read_interactions(root / INTERACTIONS, titles))
    meta = read_meta(root)
    if meta is None:
        implicit = bool(interactions) and all(x.rating == 1.0 for x in interactions)
        meta = DatasetMeta(name=root.name, implicit=implicit, rating_threshold=1.0 if implicit else 4.0)
    samples = list(read_samples(root / SAMPLES, titles)) if (root / SAMPLES).is_file() else None
    return Dataset(root, meta, titles, attributes, interactions, samples)


def read_test_pairs(root: str | Path) -> list[tuple[str, str]]:
    """The held-out ``(user_id, item_id)`` pairs of ``test_pairs.jsonl`` (empty when absent)."""
    path = Path(root) / TEST_PAIRS
    if not path.is_file():
        return []
    return [(_field(r, "user_id", str, f"{path}:{n}"), _field(r, "item_id", str, f"{path}:{n}"))
            for n, r in iter_jsonl(path)]


# --------------------------------------------------------------------------------------------- graph


def graph_interactions(dataset: Dataset, *, all_targets: bool = False) -> list[InteractionRow]:
    """The LightGCN graph's interactions (module docstring: no valid/test targets, positives only).

    ``all_targets``: leave out the training samples' targets too, so that no sample's answer is
    in the graph. Rankers that read the embeddings themselves (collaborative soft tokens) need
    this: a training target inside the graph pulls the item's vector toward the user's, and the
    model would learn an agreement that test samples never show."""
    held_out = {(s.user_id, s.item_id) for s in dataset.samples if all_targets or s.split != "train"}
    threshold = None if dataset.meta.implicit else dataset.meta.rating_threshold
    return [
        x for x in dataset.interactions
        if (x.user_id, x.item_id) not in held_out and (threshold is None or x.rating >= threshold)
    ]


def graph_pairs(dataset: Dataset, *, all_targets: bool = False) -> list[tuple[str, str]]:
    """``(user_id, item_id)`` edges of the LightGCN training graph, deduplicated, in file order."""
    seen: dict[tuple[str, str], None] = {}
    for x in graph_interactions(dataset, all_targets=all_targets):
        seen.setdefault((x.user_id, x.item_id), None)
    return list(seen)


# --------------------------------------------------------------------------------------------- writing


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line; returns the row count."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
            fh.write("\n")
            n += 1
    return n


def write_dataset(
    out: str | Path,
    *,
    items: Iterable[Item],
    interactions: Iterable[InteractionRow],
    meta: DatasetMeta,
    samples: Iterable[Sample] | None = None,
    test_pairs: Iterable[tuple[str, str]] | None = None,
) -> dict[str, int]:
    """Write a canonical data set directory; returns row counts per file."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for stale in (SAMPLES, TEST_PAIRS):
        (root / stale).unlink(missing_ok=True)
    counts = {
        ITEMS: write_jsonl(root / ITEMS, (_item_row(i) for i in items)),
        INTERACTIONS: write_jsonl(root / INTERACTIONS, (x._asdict() for x in interactions)),
    }
    if samples is not None:
        counts[SAMPLES] = write_jsonl(root / SAMPLES, (s.to_json() for s in samples))
    if test_pairs is not None:
        counts[TEST_PAIRS] = write_jsonl(root / TEST_PAIRS, ({"user_id": u, "item_id": i} for u, i in test_pairs))
    (root / META).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return counts


def _item_row(item: Item) -> dict[str, Any]:
    row: dict[str, Any] = {"item_id": item.item_id, "title": item.title}
    if item.attributes:
        row["attributes"] = item.attributes
    return row


def data_hash(path: str | Path) -> str:
    """sha256 over the data set's files (name and bytes of each present file, in a fixed order)."""
    root = Path(path)
    digest = hashlib.sha256()
    for name in HASHED_FILES:
        file = root / name
        if not file.is_file():
            continue
        digest.update(name.encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
