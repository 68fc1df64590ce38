"""MovieLens ml-100k (``u.data`` + ``u.item``) and ml-1m (``ratings.dat`` + ``movies.dat``).

ml-100k: ``u.data`` is tab-separated ``user item rating unix_seconds``; ``u.item`` is ``|``-separated,
latin-1, ``id|title|release|video_release|url|19 genre flags``. ml-1m: ``ratings.dat`` is
``user::item::rating::unix_seconds``; ``movies.dat`` is ``id::title::Genre|Genre`` (latin-1).
Ratings are explicit 1..5; positives are ``rating >= 4`` (``--threshold``). Genres go to attributes.

If SRC holds a ``samples.jsonl`` (Sample rows), it is copied as given (sample rule "given"), which
reproduces a published split exactly; otherwise the chronological rule builds samples at load time.

    .venv/bin/python -m trainer data import movielens ~/ml-1m data/ml1m
"""

from __future__ import annotations

from pathlib import Path

from trainer.data.dataset import DataFormatError, read_samples
from trainer.data.importers.common import ImportOptions, finish, keep_users, rule_for
from trainer.data.rows import InteractionRow, Item
from trainer.data.samples import DEFAULT_THRESHOLDS

GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
               "Sci-Fi", "Thriller", "War", "Western"]


def _lines(path: Path, encoding: str) -> list[tuple[int, str]]:
    with open(path, encoding=encoding) as fh:
        return [(n, line.rstrip("\n")) for n, line in enumerate(fh, start=1) if line.strip()]


def _ratings(path: Path, sep: str) -> list[InteractionRow]:
    out = []
    for lineno, line in _lines(path, "latin-1"):
        cols = line.split(sep)
        try:
            user, item, rating, seconds = cols[0], cols[1], float(cols[2]), int(cols[3])
        except (IndexError, ValueError):
            raise DataFormatError(f"{path}:{lineno}: expected 'user{sep}item{sep}rating{sep}timestamp'") from None
        out.append(InteractionRow(user, item, rating, seconds * 1000))
    return out


def _items_100k(path: Path) -> dict[str, Item]:
    items = {}
    for lineno, line in _lines(path, "latin-1"):
        cols = line.split("|")
        if len(cols) < 5:
            raise DataFormatError(f"{path}:{lineno}: expected 'id|title|release|video|url|genre flags'")
        genres = [g for g, flag in zip(GENRES_100K, cols[5:]) if flag == "1"]
        items[cols[0]] = Item(cols[0], cols[1], {"genres": "|".join(genres)} if genres else {})
    return items


def _items_1m(path: Path) -> dict[str, Item]:
    items = {}
    for lineno, line in _lines(path, "latin-1"):
        cols = line.split("::")
        if len(cols) != 3:
            raise DataFormatError(f"{path}:{lineno}: expected 'id::title::genres'")
        items[cols[0]] = Item(cols[0], cols[1], {"genres": cols[2]})
    return items


def run(src: Path, out: Path, options: ImportOptions) -> dict:
    if (src / "u.data").is_file() and (src / "u.item").is_file():
        items, interactions = _items_100k(src / "u.item"), _ratings(src / "u.data", "\t")
    elif (src / "ratings.dat").is_file() and (src / "movies.dat").is_file():
        items, interactions = _items_1m(src / "movies.dat"), _ratings(src / "ratings.dat", "::")
    else:
        raise FileNotFoundError(f"{src} holds neither ml-100k (u.data, u.item) nor ml-1m (ratings.dat, movies.dat)")
    for x in interactions:
        if x.item_id not in items:
            raise DataFormatError(f"{src}: rating of user {x.user_id} names unknown movie {x.item_id}")
    threshold = options.threshold if options.threshold is not None else DEFAULT_THRESHOLDS["movielens"]
    given = src / "samples.jsonl"
    if given.is_file():
        samples = list(read_samples(given, {i: it.title for i, it in items.items()}))
        rule = rule_for(options, implicit=False, threshold=threshold, kind="given")
        return finish(out, name=src.name, fmt="movielens", items=items, interactions=interactions,
                      rule=rule, options=options, samples=samples)
    kept = keep_users((x.user_id for x in interactions), options.max_users, options.seed)
    interactions = [x for x in interactions if x.user_id in kept]
    rule = rule_for(options, implicit=False, threshold=threshold, kind="chronological")
    return finish(out, name=src.name, fmt="movielens", items=items, interactions=interactions,
                  rule=rule, options=options)
