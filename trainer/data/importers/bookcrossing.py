"""Book-Crossing (Ziegler et al., 2005): ``BX-Book-Ratings.csv`` + ``BX-Books.csv``.

Both files are ``;``-separated, latin-1, every field double-quoted, with a header line
(``"User-ID";"ISBN";"Book-Rating"`` and ``"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";
"Publisher";...``); the original dump escapes some quotes with a backslash. Ratings are 1..10 explicit
and 0 for an implicit "interaction without rating": 0 rows are dropped, as are ratings of books missing
from BX-Books.csv (no title for the prompt). Positives are ``rating >= 5`` (the paper; ``--threshold``).
There are no timestamps: a user's ratings get synthetic increasing timestamps in file order.

    .venv/bin/python -m trainer data import bookcrossing ~/BX-CSV-Dump data/bx --targets-per-user 1
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from trainer.data.dataset import DataFormatError
from trainer.data.importers.common import ImportOptions, finish, keep_users, rule_for, sequence_timestamps
from trainer.data.rows import InteractionRow, Item
from trainer.data.samples import DEFAULT_THRESHOLDS


def _read(path: Path, header: list[str]) -> list[tuple[int, list[str]]]:
    with open(path, encoding="latin-1", newline="") as fh:
        reader = csv.reader(fh, delimiter=";", quotechar='"', escapechar="\\")
        first = next(reader, [])
        if first[: len(header)] != header:
            raise DataFormatError(f"{path}:1: expected a header starting {header}, got {first[:len(header)]}")
        return [(reader.line_num, row) for row in reader if row]


def read_books(path: Path) -> dict[str, Item]:
    items = {}
    for lineno, row in _read(path, ["ISBN", "Book-Title", "Book-Author"]):
        if len(row) < 3:
            raise DataFormatError(f"{path}:{lineno}: expected ISBN;Book-Title;Book-Author;...")
        isbn, title, author = row[0].strip(), row[1].strip(), row[2].strip()
        attrs = {"author": author}
        if len(row) > 4:
            attrs |= {"year": row[3].strip(), "publisher": row[4].strip()}
        items[isbn] = Item(isbn, f"{title} by {author}" if author else title, attrs)
    return items


def read_ratings(path: Path, books: dict[str, Item]) -> dict[str, list[tuple[str, float]]]:
    by_user: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for lineno, row in _read(path, ["User-ID", "ISBN", "Book-Rating"]):
        try:
            user, isbn, rating = row[0].strip(), row[1].strip(), float(row[2])
        except (IndexError, ValueError):
            raise DataFormatError(f"{path}:{lineno}: expected \"User-ID\";\"ISBN\";\"Book-Rating\"") from None
        if rating > 0 and isbn in books:
            by_user[user].append((isbn, rating))
    return by_user


def run(src: Path, out: Path, options: ImportOptions) -> dict:
    books_file, ratings_file = src / "BX-Books.csv", src / "BX-Book-Ratings.csv"
    for path in (books_file, ratings_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (expected BX-Books.csv and BX-Book-Ratings.csv)")
    books = read_books(books_file)
    by_user = read_ratings(ratings_file, books)
    kept = keep_users(by_user, options.max_users, options.seed)
    interactions = [
        InteractionRow(user, isbn, rating, ts)
        for user in sorted(kept, key=lambda u: (len(u), u))
        for (isbn, rating), ts in zip(by_user[user], sequence_timestamps(len(by_user[user])))
    ]
    threshold = options.threshold if options.threshold is not None else DEFAULT_THRESHOLDS["bookcrossing"]
    rule = rule_for(options, implicit=False, threshold=threshold, kind="chronological")
    return finish(out, name=src.name, fmt="bookcrossing", items=books, interactions=interactions,
                  rule=rule, options=options)
