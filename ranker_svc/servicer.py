"""``RankerServicer``: the thin grpc.aio adapter of ``exitrank.v1.Ranker`` over the core ``Ranker``.

Each RPC converts the request, awaits one core call and converts the result. Errors of
``ranker_svc.errors`` become statuses in :func:`status_of`, the one mapping point. The caller's
deadline travels into the core as one absolute ``time.perf_counter()`` value: it bounds the
retriever calls (each gets the time left as its gRPC deadline) and the wait for a batch, and work
whose deadline has passed is refused. ``RankStream`` keeps up to
``STREAM_WINDOW`` requests in flight, so they share batches, and answers in request order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import grpc

from exitrank.security import caller_var
from exitrank.types import RankResult
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_svc import errors
from ranker_svc.exits import ExitPolicy

log = logging.getLogger(__name__)

_CRITERIA = {
    ranker_pb2.EXIT_CRITERION_PROBABILITY_DELTA: "probability_delta",
    ranker_pb2.EXIT_CRITERION_CONFIDENCE: "confidence",
}
_STATUS = (  # most specific first
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.UnknownItems, grpc.StatusCode.NOT_FOUND),
    (errors.EmbeddingVersionUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RetrieverOverloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),  # never UNAVAILABLE, which SDKs retry
    (errors.ContextUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),
)
_CTR_MIN, _CTR_MAX = 1e-7, 0.99999994  # float32 stays strictly inside (0, 1)
STREAM_WINDOW = 8  # RankStream requests in flight at once


class RankerCore(Protocol):
    """What the servicer needs from the core (``ranker_svc.ranker.Ranker``)."""

    policy: ExitPolicy

    async def rank(
        self, *, user_id: str, candidate_item_ids: Sequence[str], num_neighbors: int = 0,
        policy: ExitPolicy | None = None, deadline: float | None = None, client: str | None = None,
    ) -> RankResult:
        """Scores the candidates for the user by ``deadline`` (a ``time.perf_counter()`` value, None:
        none) within ``client``'s share of the queue; raises ``ranker_svc.errors`` errors."""


def status_of(exc: errors.RankerError) -> grpc.StatusCode:
    """The gRPC status of a ranker error (the single mapping point)."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def policy_from_proto(request: ranker_pb2.RankRequest, calibrated: ExitPolicy) -> ExitPolicy | None:
    """The request's policy over the calibrated one; None without a policy.

    A field that is set overrides the calibrated value (zero numbers and the unspecified criterion
    are "not set"; ``disabled`` and ``confidence`` have presence, so false and 0 are values). A policy
    that sets how to exit but not ``disabled`` asks for exits: ``disabled`` becomes false, also where
    calibration chose the full depth (``disabled=true``), which would otherwise ignore every field.
    """
    if not request.HasField("exit_policy"):
        return None
    p = request.exit_policy
    changes: dict = {}
    if p.threshold != 0.0:
        changes["threshold"] = float(p.threshold)
    if p.window != 0:
        changes["window"] = p.window
    if p.min_layer != 0:
        changes["min_layer"] = p.min_layer
    if p.HasField("confidence"):  # proto3 optional: 0 is a value (off), absence keeps the calibrated one
        changes["confidence"] = float(p.confidence)
    if p.criterion != ranker_pb2.EXIT_CRITERION_UNSPECIFIED:
        if p.criterion not in _CRITERIA:
            raise errors.InvalidArgument("exit_policy.criterion", f"unknown criterion value {p.criterion}")
        changes["criterion"] = _CRITERIA[p.criterion]
    if p.HasField("disabled"):
        changes["disabled"] = bool(p.disabled)
    elif changes:
        changes["disabled"] = False
    return dataclasses.replace(calibrated, **changes)


def response_from_result(result: RankResult) -> ranker_pb2.RankResponse:
    return ranker_pb2.RankResponse(
        scores=[
            ranker_pb2.ItemScore(item_id=s.item_id, ctr=min(max(s.ctr, _CTR_MIN), _CTR_MAX), exit_layer=s.exit_layer)
            for s in result.scores
        ],
        model_version=result.model_version,
        retrieval_used=result.retrieval_used,
        embedding_version=result.embedding_version,
    )


class RankerServicer(ranker_pb2_grpc.RankerServicer):
    """Translates ``exitrank.v1.Ranker`` calls to :class:`RankerCore` calls."""

    def __init__(self, *, core: RankerCore) -> None:
        self._core = core

    async def Rank(self, request: ranker_pb2.RankRequest, context: grpc.aio.ServicerContext) -> ranker_pb2.RankResponse:
        try:
            result = await self._score(request, context)
        except Exception as exc:  # noqa: BLE001 - translated in _abort
            await _abort(context, exc)
        return response_from_result(result)

    async def RankStream(
        self, request_iterator: AsyncIterator[ranker_pb2.RankRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ranker_pb2.RankResponse]:
        """Responses in request order; the first failing request ends the stream with its status."""
        window: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.ensure_future(self._score(request, context))
                task.add_done_callback(_observed)  # a stream ended early leaves answers nobody reads
                await window.put(task)
            await window.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await window.get()) is not None:
                try:
                    result = await task
                except Exception as exc:  # noqa: BLE001 - translated in _abort
                    await _abort(context, exc)
                yield response_from_result(result)
            await reader  # surfaces a failing request stream
        finally:
            reader.cancel()
            while not window.empty():
                if (task := window.get_nowait()) is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _score(self, request: ranker_pb2.RankRequest, context: grpc.aio.ServicerContext) -> RankResult:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise errors.DeadlineExceeded("the call's deadline had passed before work started")
        deadline = None if remaining is None else time.perf_counter() + remaining
        return await self._core.rank(
            user_id=request.user_id,
            candidate_item_ids=list(request.candidate_item_ids),
            num_neighbors=request.num_neighbors,
            policy=policy_from_proto(request, self._core.policy),
            deadline=deadline,
            client=caller_var.get(),  # set by the server's guard (exitrank.grpc_security)
        )


def _observed(task: asyncio.Task) -> None:
    """Marks a RankStream request's outcome as seen: the stream reads it, or has already ended
    with an earlier request's status (asyncio would log it as "never retrieved")."""
    if not task.cancelled():
        task.exception()


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Ends the call with the status of ``exc``; unexpected errors are logged, never leaked."""
    if isinstance(exc, errors.RankerError):
        await context.abort(status_of(exc), str(exc))
    log.error("Rank failed", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error while ranking; see the ranker's log")
