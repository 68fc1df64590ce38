"""The thin grpc.aio adapter of ``exitrank.v1.Retriever`` over the core (``RetrieverCore``).

Each RPC converts the proto, awaits one core call, converts the answer back. Errors become gRPC
statuses in one place, ``_status_of``: InvalidArgument -> INVALID_ARGUMENT, UnknownUser ->
NOT_FOUND, StoreUnavailable -> UNAVAILABLE, EmbeddingsError -> FAILED_PRECONDITION, anything
unexpected -> INTERNAL (logged). Client streams (Ingest, UpsertItems) never abort for a bad
message: it is counted in ``rejected`` with its reason, and the valid ones are stored.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from exitrank.types import HistoryItem, UserContext
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from retriever_svc.errors import (
    EmbeddingsError,
    InvalidArgument,
    RetrievalError,
    StoreUnavailable,
    UnknownUser,
)
from retriever_svc.records import CatalogItem, IngestResult, Interaction, Neighbors

log = logging.getLogger(__name__)
M = TypeVar("M")
R = TypeVar("R")


class RetrieverCore(Protocol):
    """What the servicer needs of the core (``retriever_svc.index.Retriever``)."""

    catalog_version: int  # the catalog's version (UpsertItems increments it), sent with titles

    async def ingest(self, events: Sequence[Interaction], *, first_index: int = 0) -> IngestResult:
        """Validate events and append the valid ones durably to the stream."""

    async def upsert_items(self, items: Sequence[CatalogItem], *, first_index: int = 0) -> IngestResult:
        """Validate items and store the valid ones in the catalog."""

    async def nearest_users(self, user_id: str, k: int) -> Neighbors:
        """The k most similar users by cosine of their embeddings."""

    async def get_context(self, user_id: str, k: int, max_history: int, *,
                          embedding_version: str | None = None) -> UserContext:
        """The user's recent history and its k nearest users' histories."""

    async def get_items(self, item_ids: Sequence[str], *, embedding_version: str | None = None
                        ) -> tuple[list[CatalogItem], list[str]]:
        """Catalog entries found (request order) and the ids missing."""

    def vectors_version(self, requested: str) -> str:
        """The embedding version that answers a request for ``requested`` ("" = the current)."""


def _status_of(exc: Exception) -> grpc.StatusCode:
    """The one mapping from the core's errors to gRPC status codes."""
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, UnknownUser):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, EmbeddingsError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def _aborts_on_error(rpc: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    @functools.wraps(rpc)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await rpc(self, request, context)
        except grpc.aio.AbortError:
            raise
        except RetrievalError as exc:
            await context.abort(_status_of(exc), str(exc))
        except Exception:  # a bug: say so, never crash the server
            log.exception("%s failed", rpc.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc.__name__}")
        raise AssertionError("unreachable: abort raises")

    return wrapper


class RetrieverServicer(retriever_pb2_grpc.RetrieverServicer):
    """Args: core: the retriever core; batch: stream messages handed to the core per call."""

    def __init__(self, *, core: RetrieverCore, batch: int = 512) -> None:
        self._core = core
        self._batch = batch

    @_aborts_on_error
    async def Ingest(self, request_iterator: AsyncIterator[common_pb2.Interaction], context):
        result = await self._drain(request_iterator, _interaction, self._core.ingest)
        return _summary(result)

    @_aborts_on_error
    async def UpsertItems(self, request_iterator: AsyncIterator[common_pb2.Item], context):
        result = await self._drain(request_iterator, _catalog_item, self._core.upsert_items)
        return _summary(result)

    @_aborts_on_error
    async def NearestUsers(self, request: retriever_pb2.NearestUsersRequest, context):
        answer = await self._core.nearest_users(request.user_id, request.k)
        return retriever_pb2.NearestUsersResponse(
            neighbors=[retriever_pb2.Neighbor(user_id=u, score=s) for u, s in answer.neighbors],
            embedding_version=answer.embedding_version,
        )

    @_aborts_on_error
    async def GetContext(self, request: retriever_pb2.ContextRequest, context):
        version = request.embedding_version if request.with_embeddings else None
        answer = await self._core.get_context(request.user_id, request.k, request.max_history,
                                              embedding_version=version)
        return retriever_pb2.UserContext(
            user_embedding=_floats(answer.user_embedding), vectors_version=answer.vectors_version,
            user_id=answer.user_id,
            history=_history(answer.history),
            neighbors=[
                retriever_pb2.NeighborContext(
                    user_id=n.user_id, score=n.score, history=_history(n.history)
                )
                for n in answer.neighbors
            ],
            embedding_version=answer.embedding_version,
            catalog_version=self._core.catalog_version,
        )

    @_aborts_on_error
    async def GetItems(self, request: retriever_pb2.GetItemsRequest, context):
        version = request.embedding_version if request.with_embeddings else None
        found, missing = await self._core.get_items(list(request.item_ids), embedding_version=version)
        return retriever_pb2.GetItemsResponse(
            items=[
                common_pb2.Item(item_id=i.item_id, title=i.title, attributes=i.attributes,
                                embedding=_floats(i.embedding))
                for i in found
            ],
            missing_item_ids=missing,
            vectors_version=self._core.vectors_version(version) if version is not None else "",
            catalog_version=self._core.catalog_version,
        )

    async def _drain(
        self,
        messages: AsyncIterator[M],
        convert: Callable[[M], Any],
        store: Callable[..., Awaitable[IngestResult]],
    ) -> IngestResult:
        """Hand a client stream to the core in batches; sum the results."""
        total, batch, index = IngestResult(), [], 0
        async for message in messages:
            batch.append(convert(message))
            if len(batch) >= self._batch:
                total += await store(batch, first_index=index)
                index, batch = index + len(batch), []
        if batch:
            total += await store(batch, first_index=index)
        return total


def _interaction(m: common_pb2.Interaction) -> Interaction:
    return Interaction(m.user_id, m.item_id, float(m.rating), int(m.timestamp_ms))


def _catalog_item(m: common_pb2.Item) -> CatalogItem:
    return CatalogItem(m.item_id, m.title, dict(m.attributes))


def _summary(result: IngestResult) -> retriever_pb2.IngestSummary:
    return retriever_pb2.IngestSummary(
        accepted=result.accepted, rejected=result.rejected, errors=list(result.errors)
    )


def _history(items: Sequence[HistoryItem]) -> list[common_pb2.HistoryItem]:
    return [
        common_pb2.HistoryItem(
            item_id=h.item_id, title=h.title, rating=h.rating, timestamp_ms=h.timestamp_ms,
            embedding=_floats(h.embedding),
        )
        for h in items
    ]


def _floats(vector) -> list[float]:
    """A vector as a repeated float field (empty for None)."""
    return [] if vector is None else vector.tolist()
