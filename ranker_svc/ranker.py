"""The ranker core's request path: admit -> validate -> retrieve -> submit -> result (asyncio, no grpc).

``Ranker.rank`` serves one request. It admits it (at most ``batching.max_pending_requests`` in
progress), validates every field, asks a :class:`ContextSource` for the user's context and the
candidates' titles (and, for soft tokens, their vectors), and submits a
:class:`~ranker_svc.scoring.ScoreJob` to the :class:`~ranker_svc.batching.MicroBatcher`, which
scores concurrent requests together in a worker thread through the
:class:`~ranker_svc.scoring.Scorer` (the synchronous model side, which the trainer and the
benchmarks use directly).

Deadlines: one absolute deadline travels through the request, a ``time.perf_counter()`` value
(None: no deadline), from the servicer through :meth:`Ranker.rank` to the batcher. Each retriever
call is given the time left when it starts (:func:`time_left`), and the retrieval as a whole ends
at the deadline; the batcher refuses a job whose deadline passed before its batch ran.

Observability without transport: ``rank`` opens the ``ranker.retrieval`` and ``ranker.score``
trace spans (no-ops unless tracing is on) and reports each served request and each model batch
to a :class:`RankObserver` when one is attached (``exitrank.observability.metrics.RankerMetrics``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from exitrank.limits import MAX_NEIGHBORS, id_problem
from exitrank.observability.tracing import span
from exitrank.types import ExitDecision, RankResult, ScoredItem, UserContext
from ranker_svc.artifact import LoadedRanker
from ranker_svc.batching import MicroBatcher
from ranker_svc.collab import COLLAB_HISTORY
from ranker_svc.config import BatchingConfig
from ranker_svc.engine import Engine
from ranker_svc.errors import (
    ContextUnavailable,
    DeadlineExceeded,
    EmbeddingVersionUnavailable,
    InvalidArgument,
    Overloaded,
    UnknownItems,
)
from ranker_svc.exits import ExitPolicy
from ranker_svc.scoring import ScoreJob, Scorer

log = logging.getLogger(__name__)


class ContextSource(Protocol):
    """Where the ranker gets retrieved context, catalog titles and item vectors (the retriever's
    client ``ranker_svc.retriever_client.RetrieverClient``, or an in-memory index).

    ``timeout_s``: the caller's remaining time for this call (None: the source's own timeout).
    ``embedding_version``: the LightGCN version whose vectors a ranker with soft tokens reads
    (None for a text-only ranker); contexts and items then carry that version's vectors, and a
    source that cannot serve it raises ``EmbeddingVersionUnavailable``.
    """

    async def get_context(self, user_id: str, k: int, max_history: int, *, timeout_s: float | None = None,
                          embedding_version: str | None = None) -> UserContext | None:
        """The user's history and its k nearest users' histories; None when unknown or unreachable."""

    async def get_titles(self, item_ids: Sequence[str], *, timeout_s: float | None = None,
                         embedding_version: str | None = None) -> dict[str, str]:
        """Titles of the known ids (unknown ids absent); raises ContextUnavailable when unreachable."""

    async def get_item_vectors(self, item_ids: Sequence[str], *, embedding_version: str,
                               timeout_s: float | None = None) -> dict[str, np.ndarray | None]:
        """The items' vectors of ``embedding_version`` (None for an item the version lacks); called
        only by rankers with soft tokens, after ``get_titles`` with the same version."""


class RankObserver(Protocol):
    """Told of the ranker's work (metrics); called on the event loop, must not block."""

    def observe_rank(self, result: RankResult) -> None:
        """A request was served: its scores (exit layers), retrieval use and timings."""

    def observe_batch(self, *, requests: int, rows: int, seconds: float) -> None:
        """The model ran one batch of ``requests`` requests, ``rows`` candidate rows."""


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (a ``time.perf_counter()`` value), at least 0; None: no deadline."""
    return None if deadline is None else max(0.0, deadline - time.perf_counter())


def check_id(field: str, value: str) -> None:
    """Raises InvalidArgument naming ``field`` unless ``value`` is a valid id (``exitrank.limits``)."""
    problem = id_problem(value)
    if problem is not None:
        raise InvalidArgument(field, problem)


class Ranker:
    """Scores candidates for a user with an early-exit LLM over a retrieval-augmented prompt.

    Args:
        loaded: the artifact (model, tokenizer, prompt, calibrated policy, version).
        context_source: the retriever seam; None: ``rank`` cannot resolve titles (ContextUnavailable).
        batching: batch sizes, cross-request batching and request limits.
        engine: the model runtime; default: :class:`~ranker_svc.engine.TorchEngine` over ``loaded.model``.

    ``scorer`` is the synchronous model side the batcher runs (:class:`~ranker_svc.scoring.Scorer`).
    """

    def __init__(
        self, *, loaded: LoadedRanker, context_source: ContextSource | None = None,
        batching: BatchingConfig | None = None, engine: Engine | None = None,
    ) -> None:
        self.batching = batching or BatchingConfig()
        self.scorer = Scorer(loaded=loaded, batching=self.batching, engine=engine)
        self.prompt_config = loaded.prompt.config
        self.context_source = context_source
        self.batcher: MicroBatcher[ScoreJob, list[ExitDecision]] = MicroBatcher(
            run=self.scorer.score_jobs, max_wait_s=self.batching.max_wait_ms / 1e3,
            max_rows=self.batching.max_batch_rows,
        )
        self.observer: RankObserver | None = None
        self._in_progress = 0  # rank() calls admitted, from their retrieval to their scores
        self._by_client: dict[str, int] = {}  # of those, each client's (clients with none are dropped)

    def attach_observer(self, observer: RankObserver | None) -> None:
        """Report served requests and model batches to ``observer`` (None: stop reporting)."""
        self.observer = observer
        self.batcher.on_batch = None if observer is None else observer.observe_batch

    def in_progress(self, client: str | None = None) -> int:
        """Requests admitted and not yet answered: all of them, or ``client``'s."""
        return self._in_progress if client is None else self._by_client.get(client, 0)

    @property
    def policy(self) -> ExitPolicy:
        """The calibrated exit policy (what a request without one gets)."""
        return self.scorer.policy

    @property
    def model_version(self) -> str:
        return self.scorer.model_version

    @property
    def num_layers(self) -> int:
        return self.scorer.num_layers

    @property
    def pinned_version(self) -> str | None:
        """The embedding version the soft tokens read (None: a text-only model)."""
        return self.scorer.pinned_version

    async def rank(
        self, *, user_id: str, candidate_item_ids: Sequence[str], num_neighbors: int = 0,
        policy: ExitPolicy | None = None, deadline: float | None = None, client: str | None = None,
    ) -> RankResult:
        """Scores every candidate for ``user_id``, in request order.

        At most ``batching.max_pending_requests`` requests are in progress at once, from their
        retrieval to their scores; more raise ``Overloaded`` at once, before any retriever or model
        work (waiting retrievals would otherwise pile up unbounded, and the batcher's queue is
        bounded by this admission alone). One ``client`` (the caller's identity; None: an in-process
        caller, not counted) holds at most ``batching.client_share`` of them, so one client's
        RankStreams or bursts cannot shut the others out.

        Args:
            num_neighbors: similar users in the prompt, 0..16; 0: the artifact's default.
            policy: None: the calibrated policy.
            deadline: the caller's deadline, a ``time.perf_counter()`` value (None: none); work that
                cannot start in time is refused.

        Raises:
            InvalidArgument: a field out of range (named). UnknownItems: candidates not in the
            catalog. ContextUnavailable: titles cannot be resolved. Overloaded, DeadlineExceeded.
        """
        if self._in_progress >= self.batching.max_pending_requests:
            raise Overloaded(f"{self._in_progress} requests are already in progress "
                             "(batching.max_pending_requests); retry with backoff")
        held = 0 if client is None else self._by_client.get(client, 0)
        if client is not None and held >= self.batching.client_share:
            raise Overloaded(f"this client already has {held} requests in progress, its share of the ranker "
                             "(batching.max_pending_per_client); retry with backoff")
        self._in_progress += 1
        if client is not None:
            self._by_client[client] = held + 1
        try:
            return await self._rank(user_id, candidate_item_ids, num_neighbors, policy, deadline)
        finally:
            self._in_progress -= 1
            if client is not None:
                left = self._by_client[client] - 1
                if left:
                    self._by_client[client] = left
                else:
                    del self._by_client[client]

    async def _rank(self, user_id: str, candidate_item_ids: Sequence[str], num_neighbors: int,
                    policy: ExitPolicy | None, deadline: float | None) -> RankResult:
        started = time.perf_counter()
        candidates = self._validate(user_id, candidate_item_ids, num_neighbors)
        policy = self.scorer.check_policy(policy or self.policy)
        k = num_neighbors or self.prompt_config.num_neighbors
        with span("ranker.retrieval", attributes={"ranker.num_neighbors": k}):
            ctx, titles, vectors = await self._retrieve(user_id, candidates, k, deadline)
        missing = [i for i in candidates if i not in titles]
        if missing:
            raise UnknownItems(missing)
        retrieval_used = ctx is not None and bool(ctx.neighbors)
        ctx = ctx or UserContext(user_id=user_id)
        retrieved = time.perf_counter()
        job = ScoreJob(ctx, tuple(titles[i] for i in candidates), policy,
                       tuple(vectors.get(i) for i in candidates) if vectors else ())
        with span("ranker.score", attributes={"ranker.candidates": len(candidates)}):
            decisions = await self.batcher.submit(job, rows=len(candidates), deadline=deadline)
        done = time.perf_counter()
        result = RankResult(
            scores=tuple(ScoredItem(i, d.ctr, d.exit_layer) for i, d in zip(candidates, decisions)),
            model_version=self.model_version,
            retrieval_used=retrieval_used,
            embedding_version=ctx.embedding_version if retrieval_used else "",
            timings_ms={"retrieval": 1e3 * (retrieved - started), "inference": 1e3 * (done - retrieved),
                        "total": 1e3 * (done - started)},
        )
        if self.observer is not None:
            self.observer.observe_rank(result)
        return result

    def _validate(self, user_id: str, candidates: Sequence[str], num_neighbors: int) -> list[str]:
        check_id("user_id", user_id)
        if not candidates:
            raise InvalidArgument("candidate_item_ids", "must hold at least one item id")
        limit = self.batching.max_candidates
        if len(candidates) > limit:
            raise InvalidArgument("candidate_item_ids", f"at most {limit} items per request, got {len(candidates)}")
        seen: set[str] = set()
        for index, item_id in enumerate(candidates):
            check_id(f"candidate_item_ids[{index}]", item_id)
            if item_id in seen:
                raise InvalidArgument(f"candidate_item_ids[{index}]", f"duplicate item id {item_id!r}")
            seen.add(item_id)
        if not 0 <= num_neighbors <= MAX_NEIGHBORS:
            raise InvalidArgument("num_neighbors", f"must be in 0..{MAX_NEIGHBORS} (0: default), got {num_neighbors}")
        return list(candidates)

    # --- retrieval: each call gets the time left when it starts; the whole ends at the deadline ----

    async def _retrieve(self, user_id: str, candidates: list[str], k: int, deadline: float | None
                        ) -> tuple[UserContext | None, dict[str, str], dict | None]:
        """``(context or None, titles of the known candidates, candidate vectors or None)``."""
        async def lookups() -> tuple[UserContext | None, dict[str, str], dict | None]:
            ctx, titles = await asyncio.gather(self._context(user_id, k, deadline), self._titles(candidates, deadline))
            vectors = await self._item_vectors(candidates, deadline)  # cached by the titles' look-up
            return ctx, titles, vectors

        try:
            return await asyncio.wait_for(lookups(), time_left(deadline))
        except TimeoutError as exc:
            raise DeadlineExceeded("the deadline passed while fetching context and titles") from exc

    async def _context(self, user_id: str, k: int, deadline: float | None) -> UserContext | None:
        if self.context_source is None:
            return None
        history = self.prompt_config.max_history if self.pinned_version is None else \
            max(self.prompt_config.max_history, COLLAB_HISTORY)  # the user's fold-in window
        try:
            return await self.context_source.get_context(user_id, k, history, timeout_s=time_left(deadline),
                                                         embedding_version=self.pinned_version)
        except EmbeddingVersionUnavailable:
            raise  # soft tokens of another version would be read as noise: refuse, never guess
        except Exception:  # noqa: BLE001 - a failing retriever must not fail ranking
            log.warning("context source failed for user %r; ranking without retrieval", user_id, exc_info=True)
            return None

    async def _titles(self, item_ids: list[str], deadline: float | None) -> dict[str, str]:
        if self.context_source is None:
            raise ContextUnavailable("no context source configured: candidate titles cannot be resolved")
        try:
            return await self.context_source.get_titles(item_ids, timeout_s=time_left(deadline),
                                                        embedding_version=self.pinned_version)
        except ContextUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - translated at the boundary; its text is for the log only
            log.warning("catalog look-up of %d candidates failed", len(item_ids), exc_info=True)
            raise ContextUnavailable("the catalog look-up of the candidates failed; retry later") from exc

    async def _item_vectors(self, item_ids: list[str], deadline: float | None) -> dict | None:
        """The candidates' vectors of the pinned version (soft tokens), or None for text-only models."""
        if self.pinned_version is None or self.context_source is None:
            return None
        return await self.context_source.get_item_vectors(item_ids, embedding_version=self.pinned_version,
                                                          timeout_s=time_left(deadline))
