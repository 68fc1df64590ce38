"""Plain dataclasses that the client takes and returns, and their conversion to and from protobuf.

Ranking answers reuse the project's shared types (``exitrank.types.RankResult``, ``ScoredItem``,
``UserContext``), so a feed server written against the client reads like the services' own code.
Field meanings and limits are those of ``protos/exitrank/v1/*.proto``; the server validates them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from exitrank.types import HistoryItem, NeighborContext, RankResult, ScoredItem, UserContext
from exitrank.v1 import common_pb2, ranker_pb2, retriever_pb2

CRITERIA = {
    "probability_delta": ranker_pb2.EXIT_CRITERION_PROBABILITY_DELTA,
    "confidence": ranker_pb2.EXIT_CRITERION_CONFIDENCE,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitPolicy:
    """Per-request early-exit settings; None keeps the model's calibrated value.

    Args:
        criterion: ``"probability_delta"`` (the paper's test) or ``"confidence"``.
        threshold: tau in (0, 1].
        window: previous discrepancies averaged (probability_delta), 1..16.
        min_layer: no exit before this decoder layer (1-based).
        disabled: True runs every candidate through the full depth; False exits early even where
            calibration chose the full depth; None: False when another field is set, else calibrated.
        confidence: also exit where max(P(yes), P(no)) >= this, in (0.5, 1]; 0 turns it off.
    """

    criterion: str | None = None
    threshold: float | None = None
    window: int | None = None
    min_layer: int | None = None
    disabled: bool | None = None
    confidence: float | None = None

    def __post_init__(self) -> None:
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)} or None, got {self.criterion!r}")


@dataclass(frozen=True, slots=True)
class Interaction:
    """One user-item event to ingest; ``timestamp_ms`` None means now (stamped when it is sent).

    The client's own type: the retriever validates it as ``retriever_svc.records.Interaction``, which
    always has a time, and the client never imports the services."""

    user_id: str
    item_id: str
    rating: float = 1.0
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Item:
    """A catalog entry: the title the ranker's prompts show, and free-form attributes."""

    item_id: str
    title: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IngestSummary:
    """Messages stored and refused by one or more Ingest/UpsertItems streams (``+`` sums them)."""

    accepted: int = 0
    rejected: int = 0
    errors: tuple[str, ...] = ()

    def __add__(self, other: IngestSummary) -> IngestSummary:
        return IngestSummary(self.accepted + other.accepted, self.rejected + other.rejected,
                             self.errors + other.errors)


@dataclass(frozen=True, slots=True)
class Neighbor:
    user_id: str
    score: float  # cosine similarity in [-1, 1]


@dataclass(frozen=True, slots=True)
class NearestUsers:
    """Similar users, best first, and the embedding version that found them."""

    neighbors: tuple[Neighbor, ...]
    embedding_version: str


@dataclass(frozen=True, slots=True)
class ItemsResult:
    """Catalog look-up: the items found (request order) and the ids the catalog lacks."""

    items: tuple[Item, ...]
    missing_item_ids: tuple[str, ...]


# ---- to protobuf ---------------------------------------------------------------------------------

def rank_request(user_id: str, items: list[str], num_neighbors: int,
                 exit_policy: ExitPolicy | None) -> ranker_pb2.RankRequest:
    request = ranker_pb2.RankRequest(user_id=user_id, candidate_item_ids=items, num_neighbors=num_neighbors)
    if exit_policy is not None:
        p = exit_policy  # None leaves a field unset (proto3 optional): the server keeps the calibrated value
        request.exit_policy.CopyFrom(ranker_pb2.ExitPolicy(
            threshold=p.threshold or 0.0, window=p.window or 0, min_layer=p.min_layer or 0,
            disabled=p.disabled, criterion=CRITERIA.get(p.criterion or "", 0), confidence=p.confidence))
    return request


def interaction_pb(event: Interaction) -> common_pb2.Interaction:
    stamp = int(time.time() * 1000) if event.timestamp_ms is None else event.timestamp_ms
    return common_pb2.Interaction(user_id=event.user_id, item_id=event.item_id, rating=event.rating,
                                  timestamp_ms=stamp)


def item_pb(item: Item) -> common_pb2.Item:
    return common_pb2.Item(item_id=item.item_id, title=item.title, attributes=dict(item.attributes))


# ---- from protobuf -------------------------------------------------------------------------------

def rank_result(reply: ranker_pb2.RankResponse) -> RankResult:
    return RankResult(
        scores=tuple(ScoredItem(s.item_id, float(s.ctr), int(s.exit_layer)) for s in reply.scores),
        model_version=reply.model_version, retrieval_used=reply.retrieval_used,
        embedding_version=reply.embedding_version,
    )


def ingest_summary(reply: retriever_pb2.IngestSummary) -> IngestSummary:
    return IngestSummary(int(reply.accepted), int(reply.rejected), tuple(reply.errors))


def nearest_users(reply: retriever_pb2.NearestUsersResponse) -> NearestUsers:
    return NearestUsers(tuple(Neighbor(n.user_id, float(n.score)) for n in reply.neighbors),
                        reply.embedding_version)


def user_context(reply: retriever_pb2.UserContext) -> UserContext:
    return UserContext(
        user_id=reply.user_id, history=_history(reply.history),
        neighbors=tuple(NeighborContext(n.user_id, float(n.score), _history(n.history)) for n in reply.neighbors),
        embedding_version=reply.embedding_version,
    )


def items_result(reply: retriever_pb2.GetItemsResponse) -> ItemsResult:
    return ItemsResult(tuple(Item(i.item_id, i.title, dict(i.attributes)) for i in reply.items),
                       tuple(reply.missing_item_ids))


def _history(items) -> tuple[HistoryItem, ...]:
    return tuple(HistoryItem(h.item_id, h.title, float(h.rating), int(h.timestamp_ms)) for h in items)
