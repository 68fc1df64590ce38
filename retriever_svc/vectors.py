"""``VectorIndex``: cosine nearest neighbours of users over FAISS. No I/O; the trainer uses it offline.

Cosine similarity (the paper's section 4), sim(u, v) = e_u . e_v / (|e_u| |e_v|), is the inner
product of L2-normalised vectors, so vectors are normalised on the way in and FAISS searches by
inner product:

- ``exact``: ``IndexFlatIP`` inside an ``IndexIDMap2``; results equal a brute-force scan. An
  update overwrites the stored row in place (a flat index has no structure to repair).
- ``hnsw``: ``IndexHNSWFlat`` (inner-product metric) inside an ``IndexIDMap2``, for user counts
  where a scan is too slow. HNSW cannot delete, so an update adds a new row and leaves the old
  one as a tombstone that searches skip (an update to the vector the user already has is no update).
- ``auto`` (default): ``hnsw`` from ``hnsw_min_users`` users on, else ``exact``.

An index never rebuilds itself inside :meth:`VectorIndex.upsert` (the event loop calls it). It says
when a rebuild is due (:meth:`VectorIndex.rebuild_due`: an ``auto`` index built exact that has grown
to ``hnsw_min_users``, or an HNSW index whose tombstones outnumber its live rows by 1,000),
and the caller builds the replacement off the loop: :meth:`VectorIndex.rows` copies the live vectors,
:meth:`VectorIndex.rebuilt` indexes them (in a worker thread), and the upserts made meanwhile,
journaled (:meth:`VectorIndex.start_journal`), are replayed into it before it is swapped in
(``Retriever.rebuild_index``).

FAISS labels are our row numbers; ``_labels[row]`` is the user id (None for a tombstone).
:meth:`VectorIndex.save` / :meth:`VectorIndex.load` keep an index on disk (FAISS's own format plus
the labels as JSON; nothing pickled), so a restarting replica skips a minutes-long HNSW build.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

INDEX_KINDS = ("auto", "exact", "hnsw")


@contextlib.contextmanager
def _all_cores(enabled: bool) -> Iterator[None]:
    """Bulk builds use every core even where searches run single-threaded (see server.py)."""
    before = faiss.omp_get_max_threads()
    if enabled:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero). (n, d) float32, C-contiguous."""
    matrix = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


class VectorIndex:
    """Users' embeddings searchable by cosine similarity, updatable one user at a time.

    Args:
        ids: distinct user ids, row order of ``vectors``.
        vectors: (n, d) embeddings (any scale; they are L2-normalised).
        kind: ``auto`` (default), ``exact`` or ``hnsw``.
        hnsw_min_users: ``auto`` picks HNSW from this many users on (default 200,000).
        hnsw_m: HNSW graph degree M (default 32).
        ef_construction: HNSW build beam (default 80).
        ef_search: HNSW search beam (default 128; raised to k when k is larger).

    Raises:
        ValueError: ids and vectors disagree, ids repeat, or ``kind`` is unknown.
    """

    def __init__(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        *,
        kind: str = "auto",
        hnsw_min_users: int = 200_000,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise ValueError(f"vectors must have shape ({len(ids)}, d), got {vectors.shape}")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be distinct")
        self.dim = int(vectors.shape[1])
        self.auto_min = hnsw_min_users if kind == "auto" else None  # exact until this many users
        if kind == "auto":
            kind = "hnsw" if len(ids) >= hnsw_min_users else "exact"
        self.kind = kind
        self._hnsw = (hnsw_m, ef_construction, ef_search)
        self._journal: list[tuple[str, np.ndarray]] | None = None
        self._build(list(ids), l2_normalize(vectors) if len(ids) else vectors)

    def _build(self, ids: list[str], unit: np.ndarray) -> None:
        if self.kind == "hnsw":
            m, ef_construction, ef_search = self._hnsw
            base = faiss.IndexHNSWFlat(self.dim, m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = ef_construction
            base.hnsw.efSearch = ef_search
        else:
            base = faiss.IndexFlatIP(self.dim)
        self._base = base  # the IDMap does not own it: keep it alive
        self._index = faiss.IndexIDMap2(base)
        self._labels: list[str | None] = list(ids)
        self._row: dict[str, int] = {user: row for row, user in enumerate(ids)}
        if ids:
            with _all_cores(len(ids) >= 10_000):
                self._index.add_with_ids(unit, np.arange(len(ids), dtype=np.int64))

    def save(self, path: Path, **extra: Any) -> None:
        """Write ``path.faiss`` and ``path.json`` (labels, settings, ``extra``), each atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".faiss.tmp")
        faiss.write_index(self._index, str(tmp))
        os.replace(tmp, path.with_suffix(".faiss"))
        meta = {"kind": self.kind, "dim": self.dim, "hnsw": list(self._hnsw), "auto_min": self.auto_min,
                "labels": self._labels, **extra}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: Path) -> tuple[VectorIndex, dict[str, Any]]:
        """An index written by :meth:`save`, and the ``extra`` it was saved with.

        Raises:
            FileNotFoundError: no such index; ValueError: the two files disagree.
        """
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        index = faiss.read_index(str(path.with_suffix(".faiss")))
        labels = meta.pop("labels")
        if index.ntotal != len(labels) or index.d != meta["dim"]:
            raise ValueError(f"{path}: the FAISS file and its labels disagree")
        self = cls.__new__(cls)
        self.dim, self.kind = int(meta.pop("dim")), meta.pop("kind")
        self._hnsw = tuple(meta.pop("hnsw"))
        self.auto_min = meta.pop("auto_min", None)
        self._journal = None
        self._index = index  # read_index gives the IndexIDMap2, owning its base
        self._base = faiss.downcast_index(self._index.index)
        self._labels = labels
        self._row = {user: row for row, user in enumerate(labels) if user is not None}
        return self, meta

    @property
    def ef_search(self) -> int:
        """HNSW's search beam (raised to the number of results fetched when that is larger)."""
        return self._hnsw[2]

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"ef_search must be >= 1, got {value}")
        self._hnsw = (*self._hnsw[:2], int(value))

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._row

    @property
    def ids(self) -> list[str]:
        return list(self._row)

    def get(self, user_id: str) -> np.ndarray | None:
        """The user's L2-normalised vector (d,), or None when absent."""
        row = self._row.get(user_id)
        return None if row is None else self._index.reconstruct(row)

    def search(self, user_id: str, k: int) -> list[tuple[str, float]]:
        """The k users most similar to ``user_id`` (never itself), best first, with cosines.

        Raises:
            KeyError: ``user_id`` is not in the index.
        """
        row = self._row.get(user_id)
        if row is None:
            raise KeyError(user_id)
        unit = self._index.reconstruct(row).reshape(1, -1)  # stored normalised: (1, d)
        return self._search_unit(unit, k, user_id)

    def search_vector(
        self, vector: np.ndarray, k: int, exclude: str | None = None
    ) -> list[tuple[str, float]]:
        """The k users most similar to ``vector`` (d,), best first; ``exclude`` is left out."""
        query = l2_normalize(np.asarray(vector, dtype=np.float32).reshape(1, -1))  # (1, d)
        return self._search_unit(query, k, exclude)

    def _search_unit(self, query: np.ndarray, k: int, exclude: str | None
                     ) -> list[tuple[str, float]]:
        if k <= 0 or not self._row:
            return []
        labels = self._labels
        fetch = k + (exclude is not None)
        while True:
            fetch = min(fetch, len(labels))
            if self.kind == "hnsw":
                self._base.hnsw.efSearch = max(self._hnsw[2], fetch)
            scores, rows = self._index.search(query, fetch)  # (1, fetch) each
            found = [(labels[row], score) for row, score in zip(rows[0].tolist(), scores[0].tolist())
                     if row >= 0 and labels[row] is not None and labels[row] != exclude]
            if len(found) >= k or fetch >= len(labels):
                return found[:k]
            fetch *= 2  # tombstones took places: look further

    def upsert(self, user_id: str, vector: np.ndarray) -> None:
        """Add a user or replace its vector, without rebuilding the index (nothing changes when the
        user already has this vector: no HNSW tombstone for a re-applied event)."""
        unit = l2_normalize(np.asarray(vector, dtype=np.float32).reshape(1, -1))  # (1, d)
        if unit.shape[1] != self.dim:
            raise ValueError(f"vector has dim {unit.shape[1]}, index has {self.dim}")
        row = self._row.get(user_id)
        if row is not None and np.array_equal(self._index.reconstruct(row), unit[0]):
            return
        if self._journal is not None:
            self._journal.append((user_id, unit[0]))
        if row is not None and self.kind == "exact":
            stored = faiss.rev_swig_ptr(self._base.get_xb(), self._base.ntotal * self.dim)
            stored.reshape(-1, self.dim)[row] = unit[0]  # flat: label == storage position
            return
        if row is not None:
            self._labels[row] = None  # HNSW: tombstone the old node, insert a new one
        new_row = len(self._labels)
        self._labels.append(user_id)
        self._row[user_id] = new_row
        self._index.add_with_ids(unit, np.array([new_row], dtype=np.int64))

    @property
    def tombstones(self) -> int:
        return len(self._labels) - len(self._row)

    def rebuild_due(self) -> str | None:
        """``"hnsw"`` (an ``auto`` index built exact has ``hnsw_min_users`` users), ``"compact"``
        (tombstones outnumber live rows by 1,000), or None."""
        if self.kind == "exact" and self.auto_min is not None and len(self._row) >= self.auto_min:
            return "hnsw"
        if self.kind == "hnsw" and len(self._labels) > 2 * len(self._row) + 1000:
            return "compact"
        return None

    def rows(self) -> tuple[list[str], np.ndarray]:
        """The live users and their stored (unit) vectors, (n, d): a copy, safe to index elsewhere."""
        ids = list(self._row)
        if not ids:
            return ids, np.zeros((0, self.dim), np.float32)
        return ids, self._index.reconstruct_batch(np.fromiter((self._row[u] for u in ids), np.int64, len(ids)))

    def rebuilt(self, ids: Sequence[str], unit: np.ndarray) -> VectorIndex:
        """A new index of these users (``rows``' output), without tombstones, HNSW once due; run it in
        a worker thread (minutes of FAISS at a million users)."""
        kind = "hnsw" if self.rebuild_due() == "hnsw" else self.kind
        m, ef_construction, ef_search = self._hnsw
        fresh = VectorIndex(ids, unit, kind=kind, hnsw_m=m, ef_construction=ef_construction, ef_search=ef_search)
        fresh.auto_min = self.auto_min
        return fresh

    def start_journal(self) -> None:
        """Record every upsert from now on (the ones a rebuild in progress must replay)."""
        self._journal = []

    def take_journal(self) -> list[tuple[str, np.ndarray]]:
        """The upserts recorded since :meth:`start_journal`; recording stops."""
        journal, self._journal = self._journal or [], None
        return journal
