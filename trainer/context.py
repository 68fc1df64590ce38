"""Offline user contexts: what the retriever's GetContext would answer, built from a data set in memory.

Training and offline evaluation must see the prompts serving sees, so ``OfflineContexts`` mirrors
GetContext (retriever_svc) for a CTR sample:

- the user's own history = the sample's history (the up to ``max_history`` interactions before the
  target, oldest first), titles resolved;
- neighbours = the ``k`` nearest users by cosine similarity of the GCN user embeddings (paper section 4,
  ``v* = argmax_v cos(e_u, e_v)``, self excluded), through the same ``VectorIndex`` the retriever uses;
- each neighbour's history = its most recent ``max_history`` interactions of the LightGCN graph
  (``trainer.data.graph_interactions``: no valid/test targets, positives only for explicit data), oldest
  first, titles resolved. Neighbour histories are not cut at the sample's time (serving returns the
  current state of the store, and the embeddings are trained on the whole graph too).

A user without an embedding (not in the graph) gets no neighbours. ``retrieval=False`` gives the
"no retrieval" prompt: the user's own history only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from exitrank.types import Event, HistoryItem, NeighborContext, RankExample, Sample, UserContext
from ranker_svc.collab import COLLAB_HISTORY
from retriever_svc.embeddings import fold_in
from trainer.data.dataset import Dataset, graph_interactions
from trainer.data.rows import InteractionRow

if TYPE_CHECKING:
    from retriever_svc.embeddings import GCNEmbeddings


class OfflineContexts:
    """Builds ``UserContext`` / ``RankExample`` rows for a data set's samples.

    Args:
        dataset: the loaded data set (its samples and graph interactions).
        gcn: user/item embeddings from ``trainer.gcn.fit_gcn`` (or any object with ``user_ids``,
            ``user`` and ``version``, e.g. ``trainer.llm_retriever.UserVectors``); None means no
            neighbours for anyone.
        k: neighbours per user (4 in the paper's GCN-earlyexit).
        max_history: history length of the user and of each neighbour (15 in the paper).
        cache: remember each user's neighbours (training); False searches for every sample, as
            serving does for every request (timed evaluation).
        vectors: LightGCN user/item vectors for collaborative soft tokens: when given, contexts
            carry ``user_embedding``, history items and examples their items' vectors (None for
            ids the fit lacks), as the retriever's GetContext does for such rankers. The user's
            vector is the fold-in of the sample's own history (the items before its target,
            ``retriever_svc.embeddings.fold_in``, as serving), not the fitted row: the graph holds training
            targets, so a fitted user vector would already know the answer of its training samples.
    """

    def __init__(self, dataset: Dataset, gcn: "GCNEmbeddings | None", *, k: int = 4, max_history: int = 15,
                 cache: bool = True, vectors: "GCNEmbeddings | None" = None) -> None:
        if k < 0 or max_history < 1:
            raise ValueError("OfflineContexts needs k >= 0 and max_history >= 1")
        self.dataset = dataset
        self.gcn = gcn
        self.k = k
        self.max_history = max_history
        self.cache = cache
        self._recent = self._recent_graph_histories(graph_interactions(dataset), max_history)
        self._index = None
        if gcn is not None and len(gcn.user_ids) > 1:
            from retriever_svc.vectors import VectorIndex

            self._index = VectorIndex(list(gcn.user_ids), gcn.user)
        self._known = set(gcn.user_ids) if gcn is not None else set()
        self._neighbors: dict[str, tuple[NeighborContext, ...]] = {}
        self.vectors = vectors
        self._item_row = {i: r for r, i in enumerate(vectors.item_ids)} if vectors is not None else {}

    def user_vector(self, events: Sequence[Event]):
        """The fold-in of these interactions' known distinct items (d,), or None: the retriever's
        own ``fold_in``, so training sees the vector serving computes."""
        if self.vectors is None:
            return None
        return fold_in(self.vectors.fold_in_basis(), self._item_row, (e.item_id for e in events))

    def item_vector(self, item_id: str):
        """The item's soft-token vector (d,), or None."""
        row = self._item_row.get(item_id)
        return None if row is None else self.vectors.item[row]

    @staticmethod
    def _recent_graph_histories(graph: Sequence[InteractionRow], n: int) -> dict[str, tuple[InteractionRow, ...]]:
        by_user: dict[str, list[InteractionRow]] = defaultdict(list)
        for x in graph:
            by_user[x.user_id].append(x)
        return {u: tuple(sorted(xs, key=lambda x: x.timestamp_ms)[-n:]) for u, xs in by_user.items()}

    def _item(self, item_id: str, rating: float, timestamp_ms: int) -> HistoryItem:
        return HistoryItem(item_id, self.dataset.title(item_id), rating, timestamp_ms, self.item_vector(item_id))

    def graph_histories(self) -> dict[str, tuple[HistoryItem, ...]]:
        """Every graph user's recent interactions (what its neighbours' prompts show), with titles."""
        return {u: tuple(self._item(x.item_id, x.rating, x.timestamp_ms) for x in xs)
                for u, xs in self._recent.items()}

    def history(self, events: Sequence[Event]) -> tuple[HistoryItem, ...]:
        """The last ``max_history`` events, oldest first, with titles."""
        return tuple(self._item(e.item_id, e.rating, e.timestamp_ms) for e in events[-self.max_history:])

    def neighbors(self, user_id: str) -> tuple[NeighborContext, ...]:
        """The user's ``k`` nearest users (never itself) with their recent graph interactions."""
        if self._index is None or self.k == 0 or user_id not in self._known:
            return ()
        cached = self._neighbors.get(user_id)
        if cached is not None:
            return cached
        found = [(v, s) for v, s in self._index.search(user_id, self.k) if v != user_id]
        neighbors = tuple(
            NeighborContext(v, float(score), tuple(self._item(x.item_id, x.rating, x.timestamp_ms)
                                                   for x in self._recent.get(v, ())))
            for v, score in found
        )
        if self.cache:
            self._neighbors[user_id] = neighbors
        return neighbors

    def context(self, sample: Sample, *, retrieval: bool = True) -> UserContext:
        """The ``UserContext`` GetContext would return for the sample's user at the sample's time."""
        return UserContext(
            user_id=sample.user_id,
            history=self.history(sample.history),
            neighbors=self.neighbors(sample.user_id) if retrieval else (),
            embedding_version=self.gcn.version if (retrieval and self.gcn is not None) else "",
            user_embedding=self.user_vector(sample.history[-COLLAB_HISTORY:]),
        )

    def example(self, sample: Sample, *, retrieval: bool) -> RankExample:
        return RankExample(self.context(sample, retrieval=retrieval), sample.item_id,
                           self.dataset.title(sample.item_id), sample.label, self.item_vector(sample.item_id))

    def examples(self, split: str, *, retrieval: bool, limit: int | None = None, seed: int = 0) -> list[RankExample]:
        """``RankExample`` rows for one split, in data set order; ``limit`` keeps a seeded random subset."""
        samples = subsample(self.dataset.split(split), limit, seed)
        return [self.example(s, retrieval=retrieval) for s in samples]


def subsample(samples: Sequence[Sample], limit: int | None, seed: int) -> list[Sample]:
    """At most ``limit`` samples, a seeded random subset in the original order (all when None)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=limit, replace=False))
    return [samples[j] for j in keep]
