"""Importers from public data set formats to the canonical directory (trainer/data/dataset.py).

One module per source format; each exposes ``run(src, out, options) -> dict`` (a summary of counts)::

    .venv/bin/python -m trainer data import games6k ../shared/data/games6k data/games6k --max-users 2000
    .venv/bin/python -m trainer data import tallrec ../shared/data/tallrec-book data/tallrec
    .venv/bin/python -m trainer data import lightgcn ../shared/data/gowalla data/gowalla
    .venv/bin/python -m trainer data import movielens ~/ml-1m data/ml1m
    .venv/bin/python -m trainer data import bookcrossing ~/BX-CSV-Dump data/bx
    .venv/bin/python -m trainer data import amazon2018 ~/amazon-beauty data/beauty
"""

from __future__ import annotations

import importlib
from pathlib import Path

from trainer.data.importers.common import ImportOptions

FORMATS = ("lightgcn", "games6k", "tallrec", "movielens", "bookcrossing", "amazon2018")

__all__ = ["FORMATS", "ImportOptions", "import_dataset"]


def import_dataset(fmt: str, src: str | Path, out: str | Path, options: ImportOptions | None = None) -> dict:
    """Convert ``src`` (a directory in format ``fmt``) into the canonical data set ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"source directory {src} does not exist")
    module = importlib.import_module(f"trainer.data.importers.{fmt}")
    return module.run(src, out, options or ImportOptions())
