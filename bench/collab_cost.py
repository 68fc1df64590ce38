"""The cost per request of collaborative soft tokens (``--collab-tokens full``), for ``make bench-ranker``.

One artifact of the preset's shape is tuned briefly with a ``full`` soft-token prompt (speed does not
depend on how well it learned) on synthetic taste data whose users and items carry random 64-d vectors.
The same model then scores the same examples two ways, side by side in one process:

- ``full_prompt_time_ratio``: 128 full-length prompts in batches of 32 at full depth, with soft tokens
  (projector + the extra slots) over the text-only prompt (``collab="none"``, no slots, no projector);
- ``candidates50_time_ratio``: one user's 50 candidates through the shared-context path, likewise;
- ``soft_tokens_per_prompt``: the slots (one for the user, one per history item of the user and each
  similar user, one for the target); ``extra_tokens_per_prompt`` / ``extra_context_tokens`` /
  ``extra_suffix_tokens``: all the tokens a prompt, the shared context and a candidate suffix gain
  (the slots, the spaces before them, the "User profile:" line);
- ``projector_share_of_rank50``: the projector's time on one request's vectors (context slots and 50
  targets) over the whole 50-candidate request; ``projector_rows_per_request``: how many vectors that is.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import side_by_side
from exitrank.types import RankExample
from ranker_svc.artifact import load_ranker
from ranker_svc.engine import predict_in_batches
from ranker_svc.exits import ExitPolicy
from ranker_svc.model import resolve_dtype
from ranker_svc.prompt import PromptBuilder, encode_examples
from ranker_svc.scoring import ScoreJob, Scorer
from trainer.tune import instruction_tune

DIM = 64


def vector(key: str) -> np.ndarray:
    """A fixed random unit vector per id (the cost does not depend on the values)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def with_vectors(examples: list[RankExample]) -> list[RankExample]:
    """The examples with a vector on the user, every history item (own and neighbours') and the target."""
    def items(history):
        return tuple(dataclasses.replace(h, embedding=vector("i" + h.item_id)) for h in history)

    out = []
    for ex in examples:
        ctx = ex.context
        neighbors = tuple(dataclasses.replace(n, history=items(n.history)) for n in ctx.neighbors)
        ctx = dataclasses.replace(ctx, history=items(ctx.history), neighbors=neighbors,
                                  user_embedding=vector("u" + ctx.user_id), vectors_version="bench")
        out.append(dataclasses.replace(ex, context=ctx, item_embedding=vector("i" + ex.item_id)))
    return out


def measure_collab_cost(preset: str, out: Path, *, examples: Callable[..., list[RankExample]],
                        prompt, seed: int, rounds: int) -> dict:
    """Tunes a ``full`` soft-token artifact of ``preset`` into ``out`` and times it with and without its slots.

    ``examples(n, seed, full=)``: the bench's synthetic taste examples; ``prompt``: its text prompt config.
    """
    collab_prompt = dataclasses.replace(prompt, collab="full")
    instruction_tune(with_vectors(examples(64, seed + 7)), out_dir=out, preset=preset, epochs=1, batch_size=16,
                     seed=seed, progress=False, prompt=collab_prompt, collab_dim=DIM, embedding_version="bench")
    loaded = load_ranker(out / "ranker", dtype=resolve_dtype("auto"))
    ranker, model = Scorer(loaded=loaded), loaded.model
    full_depth = ExitPolicy(disabled=True)
    long = with_vectors(examples(160, seed + 3, full=True))[:128]
    text_prompt = PromptBuilder(config=dataclasses.replace(loaded.prompt.config, collab="none"))

    table = model.soft_table()
    soft_prompts = encode_examples(long, loaded.prompt, loaded.tokenizer, ranker.max_tokens, table)
    soft = table.tensor()
    text_prompts = encode_examples(long, text_prompt, loaded.tokenizer, ranker.max_tokens)
    t_soft, t_text = side_by_side(
        lambda: predict_in_batches(ranker.engine, soft_prompts, full_depth, batch_size=32, soft=soft),
        lambda: predict_in_batches(ranker.engine, text_prompts, full_depth, batch_size=32), rounds=rounds)

    user, candidates = long[100].context, long[:50]
    job = ScoreJob(user, tuple(ex.title for ex in candidates), full_depth,
                   tuple(ex.item_embedding for ex in candidates))
    table50 = model.soft_table()
    context_ids, suffixes = ranker.encode_job(job, table50)
    soft50 = table50.tensor()
    text_ranker = Scorer(loaded=dataclasses.replace(loaded, prompt=text_prompt))
    text_context, text_suffixes = text_ranker.encode_job(dataclasses.replace(job, embeddings=()))
    max_rows = ranker.batching.max_batch_rows
    t50_soft, t50_text = side_by_side(
        lambda: ranker.engine.predict_shared([context_ids], suffixes, [0] * len(suffixes), full_depth,
                                             max_rows=max_rows, soft=soft50),
        lambda: ranker.engine.predict_shared([text_context], text_suffixes, [0] * len(text_suffixes), full_depth,
                                             max_rows=max_rows), rounds=rounds)
    return {
        "full_prompt_time_ratio": t_soft / t_text, "candidates50_time_ratio": t50_soft / t50_text,
        "prompt_tokens_mean_text": statistics.mean(len(p) for p in text_prompts),
        "soft_tokens_per_prompt": statistics.mean(sum(t >= table.vocab_size for t in p) for p in soft_prompts),
        "extra_tokens_per_prompt": statistics.mean(len(a) - len(b) for a, b in zip(soft_prompts, text_prompts)),
        "extra_context_tokens": len(context_ids) - len(text_context),
        "extra_suffix_tokens": statistics.mean(len(a) - len(b) for a, b in zip(suffixes, text_suffixes)),
        "projector_rows_per_request": int(soft50.shape[0]),
        "projector_share_of_rank50": _projector_seconds(model.collab, soft50) / t50_soft,
        "projector_parameters": sum(p.numel() for p in model.collab.parameters()),
    }


def _projector_seconds(projector: torch.nn.Module, soft: torch.Tensor, reps: int = 50) -> float:
    """Median wall time of projecting one request's vectors in the serving dtype."""
    dtype = next(projector.parameters()).dtype
    times = []
    with torch.inference_mode():
        rows = soft.to(dtype)
        for _ in range(reps):
            started = time.perf_counter()
            projector(rows)
            times.append(time.perf_counter() - started)
    return statistics.median(times)
