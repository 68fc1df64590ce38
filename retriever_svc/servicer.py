"""The thin grpc.aio adapter of ``exitrank.v1.Retriever`` over the core (``RetrieverCore``).

Each RPC converts the proto, awaits one core call, converts the answer back. Errors become gRPC
statuses in one place, ``_status_of``: InvalidArgument -> INVALID_ARGUMENT, UnknownUser ->
NOT_FOUND, StoreUnavailable -> UNAVAILABLE, EmbeddingsError -> FAILED_PRECONDITION, ReplyTooLarge and
BacklogFull -> RESOURCE_EXHAUSTED, anything unexpected -> INTERNAL (logged). The message is the error's
``public_message``: Redis's and Python's own texts go to the log, never to the caller. Client streams
(Ingest, UpsertItems) never abort for a bad message: each message is checked as it arrives, a bad one
counted in ``rejected`` with its reason and dropped at once (never buffered), and the valid ones are
stored in batches of ``batch``.
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
    BacklogFull,
    EmbeddingsError,
    InvalidArgument,
    ReplyTooLarge,
    RetrievalError,
    StoreUnavailable,
    UnknownUser,
)
from retriever_svc.records import CatalogItem, IngestResult, Interaction, Neighbors, check_item, refusal

log = logging.getLogger(__name__)
M = TypeVar("M")
R = TypeVar("R")


class RetrieverCore(Protocol):
    """What the servicer needs of the core (``retriever_svc.index.Retriever``)."""

    catalog_version: int  # the catalog's version (UpsertItems increments it), sent with titles

    async def ingest(self, events: Sequence[Interaction], *, first_index: int = 0) -> IngestResult:
        """Validate events and append the valid ones durably to the stream."""

    def check_event(self, event: Interaction) -> Interaction:
        """The event if valid now, else InvalidArgument naming the field."""

    async def upsert_items(self, items: Sequence[CatalogItem], *, first_index: int = 0) -> IngestResult:
        """Validate items and store the valid ones in the catalog."""

    async def nearest_users(self, user_id: str, k: int) -> Neighbors:
        """The k most similar users by cosine of their embeddings."""

    async def get_context(self, user_id: str, k: int, max_history: int, *,
                          embedding_version: str | None = None) -> UserContext:
        """The user's recent history and its k nearest users' histories."""

    async def get_items(self, item_ids: Sequence[str], *, embedding_version: str | None = None,
                        max_reply_bytes: int | None = None) -> tuple[list[CatalogItem], list[str]]:
        """Catalog entries found (request order) and the ids missing; ReplyTooLarge, before
        reading them, when their stored sizes exceed ``max_reply_bytes``."""

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
    if isinstance(exc, (ReplyTooLarge, BacklogFull)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


def _aborts_on_error(rpc: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    @functools.wraps(rpc)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await rpc(self, request, context)
        except grpc.aio.AbortError:
            raise
        except RetrievalError as exc:
            if isinstance(exc, StoreUnavailable):
                log.warning("%s: %s", rpc.__name__, exc)  # the detail, for operators only
            await context.abort(_status_of(exc), exc.public_message())
        except Exception:  # a bug: say so, never crash the server
            log.exception("%s failed", rpc.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc.__name__}")
        raise AssertionError("unreachable: abort raises")

    return wrapper


class RetrieverServicer(retriever_pb2_grpc.RetrieverServicer):
    """Args: core: the retriever core; batch: stream messages handed to the core per call;
    max_reply_bytes: the server's reply limit (``limits.max_send_bytes``), checked before GetItems reads."""

    def __init__(self, *, core: RetrieverCore, batch: int = 512, max_reply_bytes: int | None = None) -> None:
        self._core = core
        self._batch = batch
        self._max_reply_bytes = max_reply_bytes

    @_aborts_on_error
    async def Ingest(self, request_iterator: AsyncIterator[common_pb2.Interaction], context):
        result = await self._drain(request_iterator, _interaction, self._core.check_event, self._core.ingest,
                                   "interaction")
        return _summary(result)

    @_aborts_on_error
    async def UpsertItems(self, request_iterator: AsyncIterator[common_pb2.Item], context):
        result = await self._drain(request_iterator, _catalog_item, check_item, self._core.upsert_items, "item")
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
        found, missing = await self._core.get_items(list(request.item_ids), embedding_version=version,
                                                    max_reply_bytes=self._max_reply_bytes)
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
        check: Callable[[Any], Any],
        store: Callable[..., Awaitable[IngestResult]],
        kind: str,
    ) -> IngestResult:
        """Hand a client stream to the core in batches of valid records, each checked as it arrives
        (a bad one is counted and dropped, so a batch never holds more than ``batch`` valid, bounded
        records); sum the results."""
        total, batch, index, first = IngestResult(), [], 0, 0
        async for message in messages:
            try:
                record = check(convert(message))
            except InvalidArgument as exc:
                total += IngestResult(0, 1, (refusal(kind, index, exc),))
            else:
                first = index if not batch else first
                batch.append(record)
            index += 1
            if len(batch) >= self._batch:
                total += await store(batch, first_index=first)
                batch = []
        if batch:
            total += await store(batch, first_index=first)
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
