"""Plain data types shared by the services and the trainer (no grpc, no torch).

A ``Sample`` is one CTR example as written to ``samples.jsonl``; a ``UserContext`` is what the
retriever's ``GetContext`` answers and what the ranker's prompt is built from, whether it came
over gRPC (serving) or from an in-memory index (training and offline evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class HistoryItem:
    """One past interaction of a user, with the item's title resolved."""

    item_id: str
    title: str
    rating: float
    timestamp_ms: int = 0
    # the item's LightGCN vector (d,) when the ranker reads collaborative soft tokens, else None
    embedding: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class NeighborContext:
    """A similar user, its cosine score, and its recent interactions (oldest first)."""

    user_id: str
    score: float
    history: tuple[HistoryItem, ...] = ()


@dataclass(frozen=True, slots=True)
class UserContext:
    """The prompt's retrieved part: the user's own history and its nearest users' histories."""

    user_id: str
    history: tuple[HistoryItem, ...] = ()
    neighbors: tuple[NeighborContext, ...] = ()
    embedding_version: str = ""
    # the user's LightGCN vector (d,) when the ranker reads collaborative soft tokens, else None
    user_embedding: Any = field(default=None, compare=False, repr=False)
    vectors_version: str = ""  # the embedding version of the vectors ("" when none were asked for)


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a sample's history in ``samples.jsonl``."""

    item_id: str
    rating: float
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Sample:
    """One CTR example: a user's history before the target, the target item and its 0/1 label."""

    user_id: str
    history: tuple[Event, ...]
    item_id: str
    label: int
    split: str  # "train" | "valid" | "test"
    timestamp_ms: int = 0

    @classmethod
    def from_json(cls, row: dict) -> "Sample":
        history = tuple(
            Event(str(e["item_id"]), float(e.get("rating", 1.0)), int(e.get("timestamp_ms", 0)))
            for e in row.get("history", ())
        )
        return cls(
            user_id=str(row["user_id"]),
            history=history,
            item_id=str(row["item_id"]),
            label=int(row["label"]),
            split=str(row["split"]),
            timestamp_ms=int(row.get("timestamp_ms", 0)),
        )

    def to_json(self) -> dict:
        return {
            "user_id": self.user_id,
            "history": [
                {"item_id": e.item_id, "rating": e.rating, "timestamp_ms": e.timestamp_ms}
                for e in self.history
            ],
            "item_id": self.item_id,
            "label": self.label,
            "split": self.split,
            "timestamp_ms": self.timestamp_ms,
        }


@dataclass(frozen=True, slots=True)
class ExitDecision:
    """Where one candidate stopped and what it answered."""

    ctr: float
    exit_layer: int  # 1-based decoder layer whose head answered


@dataclass(frozen=True, slots=True)
class ScoredItem:
    item_id: str
    ctr: float
    exit_layer: int


@dataclass(frozen=True, slots=True)
class RankResult:
    """The ranker core's answer for one request."""

    scores: tuple[ScoredItem, ...]
    model_version: str
    retrieval_used: bool
    embedding_version: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RankExample:
    """One training/evaluation row for the ranker: retrieved context, target title, 0/1 label."""

    context: UserContext
    item_id: str
    title: str
    label: int
    item_embedding: Any = field(default=None, compare=False, repr=False)  # the target's vector (d,)
