"""Amazon reviews 2018 (Ni et al., 2019): a reviews file and a ``meta_`` file, JSON lines, optionally gzip.

Reviews: ``{"reviewerID", "asin", "overall", "unixReviewTime", ...}`` per line; metadata:
``{"asin", "title", ...}`` per line, in a file whose name starts with ``meta_``. Reviews of items without
a title are dropped. Ratings are explicit 1..5; positives are ``rating >= 3`` (the paper's threshold 3;
``--threshold`` overrides). Timestamps are ``unixReviewTime * 1000`` (ties keep file order).

    .venv/bin/python -m trainer data import amazon2018 ~/amazon/beauty data/beauty
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from trainer.data.dataset import DataFormatError
from trainer.data.importers.common import ImportOptions, finish, keep_users, rule_for
from trainer.data.rows import InteractionRow, Item
from trainer.data.samples import DEFAULT_THRESHOLDS


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            yield lineno, row


def _files(src: Path) -> tuple[Path, Path]:
    candidates = sorted(p for p in src.iterdir() if p.name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz")))
    meta = [p for p in candidates if p.name.startswith("meta_")]
    reviews = [p for p in candidates if not p.name.startswith("meta_")]
    if len(meta) != 1 or len(reviews) != 1:
        raise FileNotFoundError(f"{src} must hold one reviews file and one meta_*.json(.gz) file, "
                                f"found reviews={[p.name for p in reviews]} meta={[p.name for p in meta]}")
    return reviews[0], meta[0]


def read_meta(path: Path) -> dict[str, Item]:
    items = {}
    for _, row in _json_lines(path):
        asin, title = str(row.get("asin", "")), row.get("title")
        if asin and isinstance(title, str) and title.strip():
            items[asin] = Item(asin, " ".join(title.split()))
    return items


def read_reviews(path: Path, items: dict[str, Item]) -> list[InteractionRow]:
    out = []
    for lineno, row in _json_lines(path):
        try:
            x = InteractionRow(str(row["reviewerID"]), str(row["asin"]), float(row["overall"]),
                            int(row["unixReviewTime"]) * 1000)
        except (KeyError, TypeError, ValueError):
            raise DataFormatError(
                f"{path}:{lineno}: a review needs reviewerID, asin, overall, unixReviewTime") from None
        if x.item_id in items:
            out.append(x)
    return out


def run(src: Path, out: Path, options: ImportOptions) -> dict:
    reviews_file, meta_file = _files(src)
    items = read_meta(meta_file)
    interactions = read_reviews(reviews_file, items)
    kept = keep_users((x.user_id for x in interactions), options.max_users, options.seed)
    interactions = [x for x in interactions if x.user_id in kept]
    threshold = options.threshold if options.threshold is not None else DEFAULT_THRESHOLDS["amazon2018"]
    rule = rule_for(options, implicit=False, threshold=threshold, kind="chronological")
    name = reviews_file.name.split(".")[0]
    return finish(out, name=name, fmt="amazon2018", items=items, interactions=interactions,
                  rule=rule, options=options)
