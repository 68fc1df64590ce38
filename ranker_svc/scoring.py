"""The ranker's synchronous model side: prompts in, CTR and exit layer per candidate out (no asyncio, no grpc).

:class:`Scorer` holds the artifact's model runtime (an :class:`~ranker_svc.engine.Engine`: torch,
DeepSpeed or ONNX) and the lock that lets one caller at a time use it. It has three kinds of caller:

- the serving path: ``ranker_svc.ranker.Ranker`` submits one :class:`ScoreJob` per request to its
  micro-batcher, whose worker thread calls :meth:`Scorer.score_jobs`. There, each request's shared
  context (instruction, similar users, the user's history) is encoded once and every candidate
  runs as a short suffix over its KV cache (``Engine.predict_shared``), with per-row early exits;
- offline evaluation, calibration checks and refits (``trainer``): :meth:`score_examples` and
  :meth:`score_texts` score full prompts;
- benchmarks and tests: :meth:`score_candidates` scores one user's candidates the serving way.

All paths run the same ``ranker_svc.exits.run_exits``, and the shared-context scores equal the
full-prompt ones. Prompts become token ids in ``ranker_svc.prompt`` (``encode_prompt``,
``encode_examples``, ``encode_shared``).

    scorer = Scorer(loaded=load_ranker(path))
    decisions = scorer.score_examples(examples, ExitPolicy(disabled=True), batch_size=32)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from exitrank.types import ExitDecision, RankExample, UserContext
from ranker_svc.artifact import LoadedRanker
from ranker_svc.collab import SoftTable
from ranker_svc.config import BatchingConfig
from ranker_svc.engine import Engine, TorchEngine, full_prompts, predict_in_batches
from ranker_svc.errors import DeadlineExceeded, InvalidArgument
from ranker_svc.exits import ExitPolicy
from ranker_svc.prompt import encode_examples, encode_prompt, encode_shared

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScoreJob:
    """One request's model work: the user's context, the candidates' titles, the exit policy."""

    context: UserContext
    titles: tuple[str, ...]
    policy: ExitPolicy
    embeddings: tuple = ()  # the candidates' LightGCN vectors (soft tokens), or () for text only


class Scorer:
    """Scores prompts with the artifact's early-exit model, one caller at a time.

    Args:
        loaded: the artifact (model, tokenizer, prompt, calibrated policy, version).
        batching: batch sizes (``batch_size`` for full prompts, ``max_batch_rows`` for suffix rows)
            and ``shared_context`` (one context pass per request when the tokenizer allows it).
        engine: the model runtime; default: :class:`~ranker_svc.engine.TorchEngine` over ``loaded.model``.
    """

    def __init__(self, *, loaded: LoadedRanker, batching: BatchingConfig | None = None,
                 engine: Engine | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.prompt = loaded.prompt
        self.policy = loaded.policy
        self.batching = batching or BatchingConfig()
        self.engine: Engine = engine or TorchEngine(model=loaded.model)
        # shared-context scoring needs context + suffix to tokenise exactly as the full prompt
        self.shared_context = self.batching.shared_context and loaded.context_split_ok and self.engine.shares_context
        if self.batching.shared_context and not loaded.context_split_ok:
            log.warning("the tokenizer merges across the context/candidate boundary: scoring full prompts")
        self.max_tokens = int(getattr(self.model.causal_lm.config, "max_position_embeddings", 2048))
        self.pad_id = self.tokenizer.pad_token_id or 0
        # soft tokens read one LightGCN version's vectors: every look-up asks for that version
        self.pinned_version: str | None = loaded.collab["embedding_version"] if loaded.collab else None
        self._model_lock = threading.Lock()

    @property
    def model_version(self) -> str:
        return self.loaded.version

    @property
    def num_layers(self) -> int:
        return self.engine.num_layers

    def check_policy(self, policy: ExitPolicy) -> ExitPolicy:
        """``policy`` if this model can run it; raises InvalidArgument naming ``exit_policy.min_layer``."""
        if policy.min_layer > self.num_layers:
            raise InvalidArgument(
                "exit_policy.min_layer", f"must be <= {self.num_layers} (the model's depth), got {policy.min_layer}"
            )
        return policy

    # --- full prompts (offline evaluation, calibration checks) ------------------------------------

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
        return decisions_of(ctr, layer)

    # --- the serving way: one context pass per request, candidates as suffixes ---------------------

    def score_candidates(self, context: UserContext, titles: Sequence[str],
                         policy: ExitPolicy | None = None) -> list[ExitDecision]:
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
                for i, decisions in zip(members, self._score_group([jobs[i] for i in members], policy)):
                    out[i] = decisions
        return out

    def _score_group(self, jobs: list[ScoreJob], policy: ExitPolicy) -> list[list[ExitDecision]]:
        """Jobs of one policy in one engine call (the model lock held); their decisions, job by job."""
        table = self.model.soft_table()  # one table for the group: virtual ids never collide
        encoded = [self.encode_job(job, table) for job in jobs]
        soft = table.tensor() if table is not None else None
        contexts = [context for context, _ in encoded]
        suffixes = [s for _, job_suffixes in encoded for s in job_suffixes]
        groups = [g for g, (_, job_suffixes) in enumerate(encoded) for _ in job_suffixes]
        if self.shared_context:
            ctr, layer = self.engine.predict_shared(contexts, suffixes, groups, policy,
                                                    max_rows=self.batching.max_batch_rows, soft=soft)
        else:
            ctr, layer = predict_in_batches(self.engine, full_prompts(contexts, suffixes, groups), policy,
                                            batch_size=self.batching.batch_size, pad_id=self.pad_id, soft=soft)
        decisions = decisions_of(ctr, layer)
        out, start = [], 0
        for _, job_suffixes in encoded:
            out.append(decisions[start : start + len(job_suffixes)])
            start += len(job_suffixes)
        return out

    def encode_job(self, job: ScoreJob, table: SoftTable | None = None) -> tuple[list[int], list[list[int]]]:
        """``(context ids, suffix ids per candidate)``; without context sharing, ``([], full prompt ids)``.

        ``table``: soft-token slots are bound to the context's and each candidate's vectors there
        (``ranker_svc.prompt.encode_shared`` / ``encode_examples``).
        """
        targets = job.embeddings if job.embeddings else (None,) * len(job.titles)
        if not self.shared_context:
            examples = [RankExample(job.context, "", t, 0, e) for t, e in zip(job.titles, targets)]
            return [], encode_examples(examples, self.prompt, self.tokenizer, self.max_tokens, table)
        return encode_shared(job.context, job.titles, self.prompt, self.tokenizer, self.max_tokens,
                             targets=targets, table=table)


def decisions_of(ctr: Tensor, layer: Tensor) -> list[ExitDecision]:
    """(n,) CTRs and (n,) exit layers -> one :class:`ExitDecision` per row."""
    return [ExitDecision(ctr=float(c), exit_layer=int(n)) for c, n in zip(ctr.tolist(), layer.tolist())]
