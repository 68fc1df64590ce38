"""What one embedding version is in memory (``ItemVectors``, ``Snapshot``) and on disk (``IndexCache``).

A published version is an immutable ``Snapshot``: its items, fold-in basis and user ``VectorIndex``;
``Retriever`` (``index.py``) swaps whole snapshots. ``IndexCache`` keeps built indexes under
``index.cache_dir/<prefix>/<version>.faiss`` (and ``.json``: labels, settings, the updates-stream id
it is current to), so a restart or another replica on this machine skips the build; the files of
versions Redis no longer keeps are deleted (:meth:`IndexCache.prune`), so the cache holds at most
``index.keep_versions`` (+ 1 staged) indexes. No Redis I/O here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retriever_svc.embeddings import fold_in
from retriever_svc.vectors import VectorIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemVectors:
    """One embedding version's items: what fold-in and collaborative soft tokens read."""

    version: str
    item_row: dict[str, int]
    basis: np.ndarray  # (I, d) fold-in basis f
    items: np.ndarray  # (I, d) final item embeddings

    def fold_in(self, item_ids: Iterable[str]) -> np.ndarray | None:
        """e_u = sum_{i in N_u} f_i / sqrt(|N_u|) over the known distinct items (``embeddings.fold_in``)."""
        return fold_in(self.basis, self.item_row, item_ids)

    def item(self, item_id: str) -> np.ndarray | None:
        row = self.item_row.get(item_id)
        return None if row is None else self.items[row]


@dataclass(frozen=True)
class Snapshot(ItemVectors):
    """One published embedding version, as requests see it: its items and its user index."""

    users: VectorIndex = None  # type: ignore[assignment]


class IndexCache:
    """Args: directory: ``index.cache_dir``; prefix: the store's key prefix (one subdirectory each)."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = Path(directory) / prefix

    def path(self, version: str) -> Path:
        """``<version>.index``, whose ``.faiss``/``.json`` siblings hold it (versions may hold dots)."""
        return self.directory / f"{version}.index"

    def save(self, users: VectorIndex, version: str, after: str) -> None:
        users.save(self.path(version), version=version, after=after)

    def load(self, version: str) -> tuple[VectorIndex, dict[str, Any]] | None:
        """The cached index of ``version`` and its saved extras, None when absent or unusable."""
        path = self.path(version)
        if not path.with_suffix(".json").is_file():
            return None
        try:
            users, extra = VectorIndex.load(path)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("index cache %s unusable (%s): rebuilding", path, exc)
            return None
        return (users, extra) if extra.get("version") == version else None

    def prune(self, kept: Iterable[str]) -> list[str]:
        """Delete the files of every version not in ``kept``; returns those versions."""
        keep = set(kept)
        dropped = []
        for meta in self.directory.glob("*.json") if self.directory.is_dir() else ():
            version = meta.stem
            if version in keep:
                continue
            for path in (meta, meta.with_suffix(".faiss")):
                path.unlink(missing_ok=True)
            dropped.append(version)
        return dropped
