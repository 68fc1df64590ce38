"""LightGCN benchmark split (gowalla, yelp2018, amazon-book): ``train.txt`` / ``test.txt``.

Each line is ``user item item ...`` (ids already remapped to integers; a user may have no items).
``train.txt`` becomes ``interactions.jsonl`` (implicit, rating 1, synthetic one-a-day timestamps in line
order), ``test.txt`` becomes ``test_pairs.jsonl`` for full-ranking evaluation (recall@20 / ndcg@20).
Items have no text: titles are the synthetic ``item <id>``. The sample rule defaults to "none" (this is a
ranking benchmark, so the whole of train.txt is the graph); ``--sample-rule chronological`` overrides it.

    .venv/bin/python -m trainer data import lightgcn ../shared/data/gowalla data/gowalla
"""

from __future__ import annotations

from pathlib import Path

from trainer.data.dataset import DataFormatError
from trainer.data.importers.common import ImportOptions, finish, keep_users, rule_for, sequence_timestamps
from trainer.data.rows import InteractionRow, Item


def read_adjacency(path: Path) -> dict[str, list[str]]:
    """``{user: [item, ...]}`` from a ``user item item ...`` file."""
    users: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if not all(p.isdigit() for p in parts):
                raise DataFormatError(f"{path}:{lineno}: expected integer ids 'user item item ...'")
            users.setdefault(parts[0], []).extend(parts[1:])
    return users


def run(src: Path, out: Path, options: ImportOptions) -> dict:
    for name in ("train.txt", "test.txt"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} is missing (expected LightGCN's train.txt and test.txt)")
    train, test = read_adjacency(src / "train.txt"), read_adjacency(src / "test.txt")
    kept = keep_users(train, options.max_users, options.seed)
    interactions = [
        InteractionRow(user, item, 1.0, ts)
        for user in sorted(kept, key=int)
        for item, ts in zip(train[user], sequence_timestamps(len(train[user])))
    ]
    test_pairs = [(u, i) for u in sorted(kept & test.keys(), key=int) for i in test[u]]
    ids = {x.item_id for x in interactions} | {i for _, i in test_pairs}
    items = {i: Item(i, f"item {i}") for i in ids}
    rule = rule_for(options, implicit=True, threshold=1.0, kind="none")
    return finish(out, name=src.name, fmt="lightgcn", items=items, interactions=interactions,
                  rule=rule, options=options, test_pairs=test_pairs)
