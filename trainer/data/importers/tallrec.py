"""TALLRec's BookCrossing CTR prompts (``valid.json`` / ``test.json``).

Each file is a JSON list of ``{"instruction", "input", "output"}``; ``input`` has three lines::

    User Preference: "Title" written by Author, "Title" written by Author
    User Unpreference: "Title" written by Author
    Whether the user will like the target book ""Title" written by Author"?

and ``output`` is ``"Yes."`` or ``"No."``. There are no user ids, so each record becomes a pseudo-user
(``v<n>`` for valid.json, ``t<n>`` for test.json). Books get the id ``b`` + the first 16 hex digits of
sha1 of the normalised ``title|author`` (case-folded, whitespace collapsed), so the same book in two records
is one graph node and the GCN joins pseudo-users through shared books. Titles read ``Title by Author``.

A record's history interleaves its preferred (rating 1) and unpreferred (rating 0) books, preferred first,
with synthetic increasing timestamps (the prompt gives no order); its target follows with rating = label.
Every history book and target is an interaction; the data set is explicit with threshold 1, so only
preferred books are graph edges, and targets of valid/test samples are not (dataset.py's graph rule).
``samples.jsonl`` is written as given: valid.json records split 90/10 into train/valid (seeded), test.json
records are the test split. ``--max-users N`` keeps a seeded random N records of EACH file.

    .venv/bin/python -m trainer data import tallrec ../shared/data/tallrec-book data/tallrec
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exitrank.types import Event, Sample
from trainer.data.dataset import DataFormatError
from trainer.data.importers.common import ImportOptions, finish, rule_for, sequence_timestamps
from trainer.data.rows import InteractionRow, Item

PREF = "User Preference: "
UNPREF = "User Unpreference: "
TARGET = re.compile(r'^Whether the user will like the target book "(.*)"\?$')
BOOK = re.compile(r'"(.*?)" written by (.*?)(?=, "|$)')
LABELS = {"Yes.": 1, "No.": 0}


@dataclass(frozen=True)
class Record:
    liked: list[tuple[str, str]]  # (title, author)
    disliked: list[tuple[str, str]]
    target: tuple[str, str]
    label: int


def book_id(title: str, author: str) -> str:
    """Stable id of a book: sha1 of the normalised ``title|author``."""
    key = " ".join(f"{title}|{author}".casefold().split())
    return "b" + hashlib.sha1(key.encode()).hexdigest()[:16]


def parse_record(row: dict, where: str) -> Record:
    """Parse one ``{"instruction", "input", "output"}`` record."""
    if not isinstance(row, dict) or "input" not in row or "output" not in row:
        raise DataFormatError(f"{where}: expected an object with 'input' and 'output'")
    if row["output"] not in LABELS:
        raise DataFormatError(f"{where}: 'output' must be 'Yes.' or 'No.', got {row['output']!r}")
    lines = row["input"].split("\n")
    if len(lines) != 3 or not lines[0].startswith(PREF) or not lines[1].startswith(UNPREF):
        raise DataFormatError(f"{where}: 'input' must be the 3 lines 'User Preference: ...', "
                              f"'User Unpreference: ...', 'Whether the user will like the target book ...'")
    match = TARGET.match(lines[2])
    target = BOOK.findall(match.group(1)) if match else []
    if len(target) != 1:
        raise DataFormatError(f"{where}: cannot read the target book from {lines[2]!r}")
    return Record(
        liked=_books(lines[0][len(PREF):], where),
        disliked=_books(lines[1][len(UNPREF):], where),
        target=target[0],
        label=LABELS[row["output"]],
    )


def _books(text: str, where: str) -> list[tuple[str, str]]:
    books = BOOK.findall(text.strip())
    if text.strip() and len(books) != text.count(" written by "):
        raise DataFormatError(f"{where}: cannot split the book list {text[:120]!r}")
    return books


def read_records(path: Path) -> list[Record]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list):
        raise DataFormatError(f"{path}: expected a JSON list of records")
    return [parse_record(row, f"{path}: record {n}") for n, row in enumerate(rows)]


def _subsample(records: list[Record], max_users: int | None, seed: int) -> list[tuple[int, Record]]:
    indexed = list(enumerate(records))
    if max_users is None or max_users >= len(records):
        return indexed
    keep = np.sort(np.random.default_rng(seed).choice(len(records), size=max_users, replace=False))
    return [indexed[j] for j in keep]


def _interleave(record: Record) -> list[tuple[tuple[str, str], float]]:
    out: list[tuple[tuple[str, str], float]] = []
    for j in range(max(len(record.liked), len(record.disliked))):
        out += [(record.liked[j], 1.0)] if j < len(record.liked) else []
        out += [(record.disliked[j], 0.0)] if j < len(record.disliked) else []
    return out


def run(src: Path, out: Path, options: ImportOptions) -> dict:
    files = {"valid": src / "valid.json", "test": src / "test.json"}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (expected TALLRec's valid.json and test.json)")
    items: dict[str, Item] = {}
    interactions: list[InteractionRow] = []
    samples: list[Sample] = []
    rng = np.random.default_rng(options.seed)
    for prefix, path in files.items():
        records = _subsample(read_records(path), options.max_users, options.seed)
        # valid.json: 90 % train, 10 % valid (seeded); test.json: all test
        valid_mask = rng.permutation(len(records)) < int(round(0.1 * len(records)))
        for (n, record), is_valid in zip(records, valid_mask):
            split = "test" if prefix == "test" else ("valid" if is_valid else "train")
            samples.append(_add_record(f"{prefix[0]}{n}", record, split, items, interactions))
    rule = rule_for(options, implicit=False, threshold=1.0, kind="given")
    return finish(out, name=src.name, fmt="tallrec", items=items, interactions=interactions,
                  rule=rule, options=options, samples=samples)


def _add_record(user: str, record: Record, split: str, items: dict[str, Item],
                interactions: list[InteractionRow]) -> Sample:
    events = _interleave(record) + [(record.target, float(record.label))]
    history: list[Event] = []
    for ((title, author), rating), ts in zip(events, sequence_timestamps(len(events))):
        item_id = book_id(title, author)
        items.setdefault(item_id, Item(item_id, f"{title} by {author}", {"author": author}))
        interactions.append(InteractionRow(user, item_id, rating, ts))
        history.append(Event(item_id, rating, ts))
    target = history.pop()
    return Sample(user_id=user, history=tuple(history), item_id=target.item_id, label=record.label,
                  split=split, timestamp_ms=target.timestamp_ms)
