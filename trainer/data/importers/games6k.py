"""Games-6k (Amazon 2018 Video Games with titles, from a public LLM-ranking benchmark).

Files (tab-separated, one header line each):
``Games-6k.item`` (``item_id:token  title:token_seq``) and ``Games-6k.valid.inter`` /
``Games-6k.test.inter`` (``user_id:token  item_id_list:token_seq  item_id:token``: a chronological
history and the next item; test's history is valid's history plus valid's target). A user's full sequence
is therefore test's history followed by test's target (valid's when test has no row for the user).
There are no timestamps or ratings: timestamps are synthesised one a day in sequence order and the data
is implicit, so CTR negatives are popularity-matched samples (trainer/data/samples.py).

    .venv/bin/python -m trainer data import games6k ../shared/data/games6k data/games6k --max-users 2000
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from trainer.data.dataset import DataFormatError
from trainer.data.importers.common import ImportOptions, finish, keep_users, rule_for, sequence_timestamps
from trainer.data.rows import InteractionRow, Item

ITEM_HEADER = ["item_id:token", "title:token_seq"]
INTER_HEADER = ["user_id:token", "item_id_list:token_seq", "item_id:token"]


def _rows(path: Path, header: list[str]) -> Iterator[tuple[int, list[str]]]:
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().rstrip("\n").split("\t")
        if first != header:
            raise DataFormatError(f"{path}:1: expected the header {chr(9).join(header)!r}, got {first!r}")
        for lineno, line in enumerate(fh, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            cols = line.split("\t")
            if len(cols) != len(header):
                raise DataFormatError(f"{path}:{lineno}: expected {len(header)} tab-separated columns, got {len(cols)}")
            yield lineno, cols


def read_sequences(path: Path) -> dict[str, list[str]]:
    """``{user: history + [target]}`` from an ``.inter`` file."""
    return {user: history.split() + [target] for _, (user, history, target) in _rows(path, INTER_HEADER)}


def _find(src: Path, suffix: str) -> Path | None:
    found = sorted(src.glob(f"*{suffix}"))
    return found[0] if found else None


def run(src: Path, out: Path, options: ImportOptions) -> dict:
    item_file, valid_file, test_file = (_find(src, s) for s in (".item", ".valid.inter", ".test.inter"))
    if item_file is None or (valid_file is None and test_file is None):
        raise FileNotFoundError(f"{src} needs NAME.item and NAME.valid.inter / NAME.test.inter files")
    items = {i: Item(i, title) for _, (i, title) in _rows(item_file, ITEM_HEADER)}
    sequences = read_sequences(valid_file) if valid_file else {}
    if test_file:
        sequences.update(read_sequences(test_file))  # test's sequence extends valid's by one item
    kept = keep_users(sequences, options.max_users, options.seed)
    interactions: list[InteractionRow] = []
    for user in sorted(kept, key=lambda u: (len(u), u)):
        seq = sequences[user]
        for item, ts in zip(seq, sequence_timestamps(len(seq))):
            if item not in items:
                raise DataFormatError(f"user {user!r}: item {item!r} is not in {item_file.name}")
            interactions.append(InteractionRow(user, item, 1.0, ts))
    rule = rule_for(options, implicit=True, threshold=1.0, kind="chronological")
    name = item_file.name.removesuffix(".item")
    return finish(out, name=name, fmt="games6k", items=items, interactions=interactions,
                  rule=rule, options=options)
