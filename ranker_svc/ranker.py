"""The ranker core: context -> prompts -> early-exit LLM -> CTR per candidate (no grpc here).

``Ranker.rank`` serves one request: it validates, asks a :class:`ContextSource` for the user's
context and the candidates' titles (within the caller's deadline), and submits a :class:`ScoreJob`
to the :class:`~ranker_svc.batching.MicroBatcher`, which scores concurrent requests together in a
worker thread (``Ranker.score_jobs``). There, each request's shared context (instruction, similar
users, the user's history) is encoded once and every candidate runs as a short suffix over its KV
cache (``Engine.predict_shared``), with per-row early exits. The model runs through an
:class:`~ranker_svc.engine.Engine` (torch, DeepSpeed or ONNX), so the core does not care which.

``Ranker.score_examples``/``score_texts`` score full prompts (offline evaluation, calibration
checks); ``score_candidates`` scores one user's candidates the serving way. All paths run the same
``ranker_svc.exits.run_exits``, and the shared-context scores equal the full-prompt ones.

Observability without transport: ``rank`` opens the ``ranker.retrieval`` and ``ranker.score``
trace spans (no-ops unless tracing is on) and reports each served request and each model batch
to a :class:`RankObserver` when one is attached (``exitrank.observability.metrics.RankerMetrics``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from exitrank.observability.tracing import span
from exitrank.types import ExitDecision, RankExample, RankResult, ScoredItem, UserContext
from ranker_svc.artifact import LoadedRanker
from ranker_svc.batching import MicroBatcher
from ranker_svc.collab import COLLAB_HISTORY, SoftTable
from ranker_svc.config import BatchingConfig
from ranker_svc.engine import Engine, TorchEngine, full_prompts, predict_in_batches
from ranker_svc.errors import (
    ContextUnavailable,
    DeadlineExceeded,
    EmbeddingVersionUnavailable,
    InvalidArgument,
    Overloaded,
    UnknownItems,
)
from ranker_svc.exits import ExitPolicy
from ranker_svc.model import pad_right
from ranker_svc.prompt import MAX_NEIGHBORS

log = logging.getLogger(__name__)
MAX_ID_BYTES = 128
__all__ = ["ContextSource", "RankObserver", "Ranker", "ScoreJob", "encode_examples", "encode_prompt", "pad_right"]


class ContextSource(Protocol):
    """Where the ranker gets retrieved context and catalog titles (the retriever, or an in-memory index)."""

    async def get_context(self, user_id: str, k: int, max_history: int, *,
                          timeout_s: float | None = None) -> UserContext | None:
        """The user's history and its k nearest users' histories; None when unknown or unreachable.

        ``timeout_s``: the caller's remaining deadline (None: the source's own timeout).
        """

    async def get_titles(self, item_ids: Sequence[str], *, timeout_s: float | None = None) -> dict[str, str]:
        """Titles of the known ids (unknown ids absent); raises ContextUnavailable when unreachable.

        For a ranker with soft tokens both calls also take ``embedding_version`` (the contexts then
        carry that version's vectors), and ``get_item_vectors(item_ids, embedding_version=,
        timeout_s=)`` gives the candidates' vectors; see ``ranker_svc.retriever_client``."""


class RankObserver(Protocol):
    """Told of the ranker's work (metrics); called on the event loop, must not block."""

    def observe_rank(self, result: RankResult) -> None:
        """A request was served: its scores (exit layers), retrieval use and timings."""

    def observe_batch(self, *, requests: int, rows: int, seconds: float) -> None:
        """The model ran one batch of ``requests`` requests, ``rows`` candidate rows."""


@dataclass(frozen=True, slots=True)
class ScoreJob:
    """One request's model work: the user's context, the candidates' titles, the exit policy."""

    context: UserContext
    titles: tuple[str, ...]
    policy: ExitPolicy
    embeddings: tuple = ()  # the candidates' LightGCN vectors (soft tokens), or () for text only


class Ranker:
    """Scores candidates for a user with an early-exit LLM over a retrieval-augmented prompt.

    Args:
        loaded: the artifact (model, tokenizer, prompt, calibrated policy, version).
        context_source: the retriever seam; None: ``rank`` cannot resolve titles (ContextUnavailable),
            ``score_examples``/``score_texts``/``score_candidates`` work as usual.
        batching: batch sizes, cross-request batching and request limits.
        engine: the model runtime; default: :class:`~ranker_svc.engine.TorchEngine` over ``loaded.model``.
    """

    def __init__(
        self, *, loaded: LoadedRanker, context_source: ContextSource | None = None,
        batching: BatchingConfig | None = None, engine: Engine | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.prompt = loaded.prompt
        self.policy = loaded.policy
        self.context_source = context_source
        self.batching = batching or BatchingConfig()
        self.engine: Engine = engine or TorchEngine(model=loaded.model)
        # shared-context scoring needs context + suffix to tokenise exactly as the full prompt
        self.shared_context = self.batching.shared_context and loaded.context_split_ok and self.engine.shares_context
        if self.batching.shared_context and not loaded.context_split_ok:
            log.warning("the tokenizer merges across the context/candidate boundary: scoring full prompts")
        config = self.model.causal_lm.config
        self.max_tokens = int(getattr(config, "max_position_embeddings", 2048))
        self.pad_id = self.tokenizer.pad_token_id or 0
        # soft tokens read one LightGCN version's vectors: every look-up asks for that version
        self.pinned_version: str | None = loaded.collab["embedding_version"] if loaded.collab else None
        self._model_lock = threading.Lock()
        self.batcher: MicroBatcher[ScoreJob, list[ExitDecision]] = MicroBatcher(
            run=self.score_jobs, max_wait_s=self.batching.max_wait_ms / 1e3, max_rows=self.batching.max_batch_rows,
            max_pending=self.batching.max_pending_requests,
        )
        self.observer: RankObserver | None = None
        self._in_progress = 0  # rank() calls admitted, from their retrieval to their scores

    def attach_observer(self, observer: RankObserver | None) -> None:
        """Report served requests and model batches to ``observer`` (None: stop reporting)."""
        self.observer = observer
        self.batcher.on_batch = None if observer is None else observer.observe_batch

    @property
    def model_version(self) -> str:
        return self.loaded.version

    @property
    def num_layers(self) -> int:
        return self.engine.num_layers

    # --- synchronous scoring (offline eval, calibration, and the serving worker thread) -------------

    def score_examples(
        self, examples: list[RankExample], policy: ExitPolicy | None = None, *, batch_size: int = 32
    ) -> list[ExitDecision]:
        """CTR and exit layer per example, in order; ``policy`` None: the calibrated one."""
        table = self.model.soft_table()
        encoded = encode_examples(examples, self.prompt, self.tokenizer, self.max_tokens, table)
        return self._score_encoded(encoded, policy, batch_size, None, table)

    def score_texts(
        self, texts: list[str], policy: ExitPolicy | None = None, *, batch_size: int = 32,
        deadline: float | None = None,
    ) -> list[ExitDecision]:
        """Scores rendered prompts, batching rows of similar length (fewer pads), in input order.

        Text-only models (soft tokens need vectors: use :meth:`score_examples`). ``deadline`` (a
        ``time.perf_counter()`` value): refuse if it has passed once the model is ours.
        """
        encoded = [encode_prompt(self.tokenizer, t, self.max_tokens) for t in texts]
        return self._score_encoded(encoded, policy, batch_size, deadline, None)

    def _score_encoded(self, encoded: list[list[int]], policy: ExitPolicy | None, batch_size: int,
                       deadline: float | None, table: SoftTable | None) -> list[ExitDecision]:
        policy = self.check_policy(policy or self.policy)
        if not encoded:
            return []
        soft = table.tensor() if table is not None else None
        with self._model_lock:
            if deadline is not None and time.perf_counter() >= deadline:
                raise DeadlineExceeded("the deadline passed while waiting for the model")
            ctr, layer = predict_in_batches(self.engine, encoded, policy, batch_size=batch_size, pad_id=self.pad_id,
                                            soft=soft)
        return _decisions(ctr, layer)

    def score_candidates(self, context: UserContext, titles: Sequence[str], policy: ExitPolicy | None = None) -> list[ExitDecision]:
        """Scores one user's candidates the serving way (one context pass, suffixes), in order."""
        result = self.score_jobs([ScoreJob(context, tuple(titles), self.check_policy(policy or self.policy))])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def score_jobs(self, jobs: list[ScoreJob]) -> list[list[ExitDecision] | BaseException]:
        """Scores several requests together (the batcher's worker); one result per job, in order.

        Jobs with the same policy share one engine call: their contexts are encoded in one pass and
        all their candidates run as one batch of suffix rows (``batching.max_batch_rows`` at a time).
        """
        by_policy: dict[ExitPolicy, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            by_policy[job.policy].append(i)
        out: list[list[ExitDecision] | BaseException] = [[] for _ in jobs]
        with self._model_lock:
            for policy, members in by_policy.items():
                table = self.model.soft_table()  # one table for the group: virtual ids never collide
                encoded = [self.encode_job(jobs[i], table) for i in members]
                soft = table.tensor() if table is not None else None
                contexts = [context for context, _ in encoded]
                suffixes = [s for _, job_suffixes in encoded for s in job_suffixes]
                groups = [g for g, (_, job_suffixes) in enumerate(encoded) for _ in job_suffixes]
                if self.shared_context:
                    ctr, layer = self.engine.predict_shared(contexts, suffixes, groups, policy,
                                                            max_rows=self.batching.max_batch_rows, soft=soft)
                else:
                    ctr, layer = predict_in_batches(self.engine, full_prompts(contexts, suffixes, groups), policy,
                                                    batch_size=self.batching.batch_size, pad_id=self.pad_id,
                                                    soft=soft)
                decisions = _decisions(ctr, layer)
                start = 0
                for i, (_, job_suffixes) in zip(members, encoded):
                    out[i] = decisions[start : start + len(job_suffixes)]
                    start += len(job_suffixes)
        return out

    def encode_job(self, job: ScoreJob, table: SoftTable | None = None) -> tuple[list[int], list[list[int]]]:
        """``(context ids, suffix ids per candidate)``; without context sharing, ``([], full prompt ids)``.

        A context too long for ``max_position_embeddings`` with the longest suffix keeps its first
        token (BOS) and its end (the user's own history and the question), like :func:`encode_prompt`.
        ``table``: soft-token slots are bound to the context's and each candidate's vectors there.
        """
        targets = self._target_vectors(job)
        if not self.shared_context:
            examples = [RankExample(job.context, "", t, 0, e) for t, e in zip(job.titles, targets)]
            return [], encode_examples(examples, self.prompt, self.tokenizer, self.max_tokens, table)
        context = self.tokenizer(self.prompt.context_text(job.context))["input_ids"]
        suffixes = self.tokenizer([self.prompt.target_text(t) for t in job.titles], add_special_tokens=False)["input_ids"]
        budget = self.max_tokens - max(len(s) for s in suffixes)
        if len(context) > budget:
            context = context[:1] + context[len(context) - budget + 1 :]
        if table is not None:
            context = table.bind(context, self.prompt.context_vectors(job.context))
            user = [job.context.user_embedding]  # the target's slot also reads user * item
            suffixes = [table.bind(s, self.prompt.target_vectors(e), user) for s, e in zip(suffixes, targets)]
        return context, suffixes

    @staticmethod
    def _target_vectors(job: ScoreJob) -> tuple:
        return job.embeddings if job.embeddings else (None,) * len(job.titles)

    def check_policy(self, policy: ExitPolicy) -> ExitPolicy:
        if policy.min_layer > self.num_layers:
            raise InvalidArgument(
                "exit_policy.min_layer", f"must be <= {self.num_layers} (the model's depth), got {policy.min_layer}"
            )
        return policy

    # --- serving ---------------------------------------------------------------------------------

    async def rank(self, **request) -> RankResult:
        """:meth:`_rank` under admission: at most ``batching.max_pending_requests`` requests are in
        progress at once, from their retrieval to their scores; more raise ``Overloaded`` at once,
        before any retriever or model work (waiting retrievals would otherwise pile up unbounded)."""
        if self._in_progress >= self.batching.max_pending_requests:
            raise Overloaded(f"{self._in_progress} requests are already in progress "
                             "(batching.max_pending_requests); retry with backoff")
        self._in_progress += 1
        try:
            return await self._rank(**request)
        finally:
            self._in_progress -= 1

    async def _rank(
        self, *, user_id: str, candidate_item_ids: Sequence[str], num_neighbors: int = 0,
        policy: ExitPolicy | None = None, timeout_s: float | None = None,
    ) -> RankResult:
        """Scores every candidate for ``user_id``, in request order.

        Args:
            num_neighbors: similar users in the prompt, 0..16; 0: the artifact's default.
            policy: None: the calibrated policy.
            timeout_s: the caller's remaining deadline; work that cannot start in time is refused.

        Raises:
            InvalidArgument: a field out of range (named). UnknownItems: candidates not in the
            catalog. ContextUnavailable: titles cannot be resolved. Overloaded, DeadlineExceeded.
        """
        started = time.perf_counter()
        deadline = None if timeout_s is None else started + timeout_s
        candidates = self._validate(user_id, candidate_item_ids, num_neighbors)
        policy = self.check_policy(policy or self.policy)
        k = num_neighbors or self.prompt.config.num_neighbors
        with span("ranker.retrieval", attributes={"ranker.num_neighbors": k}):
            lookups = asyncio.gather(self._context(user_id, k, timeout_s), self._titles(candidates, timeout_s))
            try:
                ctx, titles = await asyncio.wait_for(lookups, None if deadline is None else deadline - started)
                vectors = await self._item_vectors(candidates, timeout_s)  # cached by the titles' look-up
            except TimeoutError as exc:
                raise DeadlineExceeded("the deadline passed while fetching context and titles") from exc
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
        _check_id("user_id", user_id)
        if not candidates:
            raise InvalidArgument("candidate_item_ids", "must hold at least one item id")
        limit = self.batching.max_candidates
        if len(candidates) > limit:
            raise InvalidArgument("candidate_item_ids", f"at most {limit} items per request, got {len(candidates)}")
        seen: set[str] = set()
        for index, item_id in enumerate(candidates):
            _check_id(f"candidate_item_ids[{index}]", item_id)
            if item_id in seen:
                raise InvalidArgument(f"candidate_item_ids[{index}]", f"duplicate item id {item_id!r}")
            seen.add(item_id)
        if not 0 <= num_neighbors <= MAX_NEIGHBORS:
            raise InvalidArgument("num_neighbors", f"must be in 0..{MAX_NEIGHBORS} (0: default), got {num_neighbors}")
        return list(candidates)

    async def _context(self, user_id: str, k: int, timeout_s: float | None) -> UserContext | None:
        if self.context_source is None:
            return None
        pin = {} if self.pinned_version is None else {"embedding_version": self.pinned_version}
        history = self.prompt.config.max_history if self.pinned_version is None else \
            max(self.prompt.config.max_history, COLLAB_HISTORY)  # the user's fold-in window
        try:
            return await self.context_source.get_context(user_id, k, history, timeout_s=timeout_s, **pin)
        except EmbeddingVersionUnavailable:
            raise  # soft tokens of another version would be read as noise: refuse, never guess
        except Exception:  # noqa: BLE001 - a failing retriever must not fail ranking
            log.warning("context source failed for user %r; ranking without retrieval", user_id, exc_info=True)
            return None

    async def _titles(self, item_ids: list[str], timeout_s: float | None) -> dict[str, str]:
        if self.context_source is None:
            raise ContextUnavailable("no context source configured: candidate titles cannot be resolved")
        pin = {} if self.pinned_version is None else {"embedding_version": self.pinned_version}
        try:
            return await self.context_source.get_titles(item_ids, timeout_s=timeout_s, **pin)
        except ContextUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - translated at the boundary
            raise ContextUnavailable(f"catalog look-up failed: {exc}") from exc


    async def _item_vectors(self, item_ids: list[str], timeout_s: float | None) -> dict | None:
        """The candidates' vectors of the pinned version (soft tokens), or None for text-only models."""
        if self.pinned_version is None or self.context_source is None:
            return None
        return await self.context_source.get_item_vectors(item_ids, embedding_version=self.pinned_version,
                                                          timeout_s=timeout_s)


def _check_id(field: str, value: str) -> None:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidArgument(field, f"must be at most {MAX_ID_BYTES} bytes of UTF-8")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise InvalidArgument(field, "must not contain control characters")


def encode_examples(examples: Sequence[RankExample], prompt, tokenizer, max_tokens: int,
                    table: SoftTable | None = None) -> list[list[int]]:
    """Each example's full prompt as token ids; with ``table``, its soft-token slots bound to the
    context's vectors and the target's (``RankExample.item_embedding``)."""
    out = []
    for ex in examples:
        ids = encode_prompt(tokenizer, prompt.full_text(ex.context, ex.title), max_tokens)
        if table is not None:
            context, target = prompt.context_vectors(ex.context), prompt.target_vectors(ex.item_embedding)
            partners = [None] * len(context) + [ex.context.user_embedding] * len(target)
            ids = table.bind(ids, context + target, partners)
        out.append(ids)
    return out


def encode_prompt(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Token ids of a prompt; over-long ones keep their first token (BOS) and their end (target + cue)."""
    ids = tokenizer(text)["input_ids"]
    if len(ids) > max_tokens:
        ids = ids[:1] + ids[len(ids) - max_tokens + 1 :]
    return ids


def _decisions(ctr, layer) -> list[ExitDecision]:
    return [ExitDecision(ctr=float(c), exit_layer=int(n)) for c, n in zip(ctr.tolist(), layer.tolist())]
