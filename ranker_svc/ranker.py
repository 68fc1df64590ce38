"""The ranker core: context -> prompts -> early-exit LLM -> CTR per candidate (no grpc here).

``Ranker.rank`` serves one request: it validates, asks a :class:`ContextSource` for the user's
context and the candidates' titles, renders one prompt per candidate and scores them in a worker
thread. ``Ranker.score_examples`` is the synchronous path offline evaluation uses; both end in
``Ranker.score_texts``, so offline numbers are serving numbers. (Calibration replays the same
``exits.exit_step`` on every head's probabilities; tests check it agrees with this path.)

Seams for later engines (KV-cached shared context, cross-request batching, DeepSpeed/ONNX): the
prompt splits into ``context_text`` (shared per user) + ``target_text`` (per candidate), and all
model work goes through ``score_texts`` -> ``EarlyExitLM.predict(input_ids, attention_mask, policy)``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import unicodedata
from collections.abc import Sequence
from typing import Protocol

import torch

from exitrank.types import ExitDecision, RankExample, RankResult, ScoredItem, UserContext
from ranker_svc.artifact import LoadedRanker
from ranker_svc.config import BatchingConfig
from ranker_svc.errors import ContextUnavailable, DeadlineExceeded, InvalidArgument, Overloaded, UnknownItems
from ranker_svc.exits import ExitPolicy
from ranker_svc.prompt import MAX_NEIGHBORS

log = logging.getLogger(__name__)
MAX_ID_BYTES = 128


class ContextSource(Protocol):
    """Where the ranker gets retrieved context and catalog titles (the retriever, or an in-memory index)."""

    async def get_context(self, user_id: str, k: int, max_history: int) -> UserContext | None:
        """The user's history and its k nearest users' histories; None when unknown or unreachable."""

    async def get_titles(self, item_ids: Sequence[str]) -> dict[str, str]:
        """Titles of the known ids (unknown ids absent); raises ContextUnavailable when unreachable."""


class Ranker:
    """Scores candidates for a user with an early-exit LLM over a retrieval-augmented prompt.

    Args:
        loaded: the artifact (model, tokenizer, prompt, calibrated policy, version).
        context_source: the retriever seam; None: ``rank`` cannot resolve titles (ContextUnavailable),
            ``score_examples``/``score_texts`` work as usual.
        batching: batch size and request limits.
    """

    def __init__(
        self, *, loaded: LoadedRanker, context_source: ContextSource | None = None,
        batching: BatchingConfig | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.prompt = loaded.prompt
        self.policy = loaded.policy
        self.context_source = context_source
        self.batching = batching or BatchingConfig()
        config = self.model.causal_lm.config
        self.max_tokens = int(getattr(config, "max_position_embeddings", 2048))
        self._model_lock = threading.Lock()
        self._pending = 0

    @property
    def model_version(self) -> str:
        return self.loaded.version

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    # --- synchronous scoring (offline eval, calibration, and the serving worker thread) -------------

    def score_examples(
        self, examples: list[RankExample], policy: ExitPolicy | None = None, *, batch_size: int = 32
    ) -> list[ExitDecision]:
        """CTR and exit layer per example, in order; ``policy`` None: the calibrated one."""
        texts = [self.prompt.full_text(ex.context, ex.title) for ex in examples]
        return self.score_texts(texts, policy, batch_size=batch_size)

    def score_texts(
        self, texts: list[str], policy: ExitPolicy | None = None, *, batch_size: int = 32,
        deadline: float | None = None,
    ) -> list[ExitDecision]:
        """Scores rendered prompts, batching rows of similar length (fewer pads), in input order.

        ``deadline`` (a ``time.perf_counter()`` value): refuse if it has passed once the model is ours.
        """
        policy = self.check_policy(policy or self.policy)
        encoded = [encode_prompt(self.tokenizer, t, self.max_tokens) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        out: list[ExitDecision | None] = [None] * len(texts)
        with self._model_lock:
            if deadline is not None and time.perf_counter() >= deadline:
                raise DeadlineExceeded("the deadline passed while waiting for the model")
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                input_ids, mask = pad_right(
                    [encoded[i] for i in chunk], self.tokenizer.pad_token_id or 0, self.model.answer_ids.device
                )
                ctr, layer = self.model.predict(input_ids, mask, policy)
                for row, i in enumerate(chunk):
                    out[i] = ExitDecision(ctr=float(ctr[row]), exit_layer=int(layer[row]))
        return out  # type: ignore[return-value]

    def check_policy(self, policy: ExitPolicy) -> ExitPolicy:
        if policy.min_layer > self.num_layers:
            raise InvalidArgument(
                "exit_policy.min_layer", f"must be <= {self.num_layers} (the model's depth), got {policy.min_layer}"
            )
        return policy

    # --- serving ---------------------------------------------------------------------------------

    async def rank(
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
        lookups = asyncio.gather(self._context(user_id, k), self._titles(candidates))
        try:
            ctx, titles = await asyncio.wait_for(lookups, None if deadline is None else deadline - started)
        except TimeoutError as exc:
            raise DeadlineExceeded("the deadline passed while fetching context and titles") from exc
        missing = [i for i in candidates if i not in titles]
        if missing:
            raise UnknownItems(missing)
        retrieval_used = ctx is not None and bool(ctx.neighbors)
        ctx = ctx or UserContext(user_id=user_id)
        retrieved = time.perf_counter()
        texts = [self.prompt.full_text(ctx, titles[i]) for i in candidates]
        decisions = await self._score_async(texts, policy, deadline)
        done = time.perf_counter()
        return RankResult(
            scores=tuple(ScoredItem(i, d.ctr, d.exit_layer) for i, d in zip(candidates, decisions)),
            model_version=self.model_version,
            retrieval_used=retrieval_used,
            embedding_version=ctx.embedding_version if retrieval_used else "",
            timings_ms={"retrieval": 1e3 * (retrieved - started), "inference": 1e3 * (done - retrieved),
                        "total": 1e3 * (done - started)},
        )

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

    async def _context(self, user_id: str, k: int) -> UserContext | None:
        if self.context_source is None:
            return None
        try:
            return await self.context_source.get_context(user_id, k, self.prompt.config.max_history)
        except Exception:  # noqa: BLE001 - a failing retriever must not fail ranking
            log.warning("context source failed for user %r; ranking without retrieval", user_id, exc_info=True)
            return None

    async def _titles(self, item_ids: list[str]) -> dict[str, str]:
        if self.context_source is None:
            raise ContextUnavailable("no context source configured: candidate titles cannot be resolved")
        try:
            return await self.context_source.get_titles(item_ids)
        except ContextUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - translated at the boundary
            raise ContextUnavailable(f"catalog look-up failed: {exc}") from exc

    async def _score_async(self, texts: list[str], policy: ExitPolicy, deadline: float | None) -> list[ExitDecision]:
        """Runs scoring in a worker thread (the event loop stays free); one request at a time."""
        if self._pending >= self.batching.max_pending_requests:
            raise Overloaded(
                f"{self._pending} requests are already waiting for the model "
                f"(batching.max_pending_requests); retry with backoff"
            )
        self._pending += 1
        try:
            return await asyncio.to_thread(
                self.score_texts, texts, policy, batch_size=self.batching.batch_size, deadline=deadline
            )
        finally:
            self._pending -= 1


def _check_id(field: str, value: str) -> None:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidArgument(field, f"must be at most {MAX_ID_BYTES} bytes of UTF-8")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise InvalidArgument(field, "must not contain control characters")


def encode_prompt(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Token ids of a prompt; over-long ones keep their first token (BOS) and their end (target + cue)."""
    ids = tokenizer(text)["input_ids"]
    if len(ids) > max_tokens:
        ids = ids[:1] + ids[len(ids) - max_tokens + 1 :]
    return ids


def pad_right(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and (B, T) attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)
