"""The measurements behind each table and figure, for one data set with its trained models.

Everything is measured here, on the data set's test split (a seeded subset of ``plan.test``
samples), and returned as plain JSON for the report:

- Table 2 / Table 4: ``trainer.eval.run_config`` rows (AUC with a bootstrap 95% interval,
  requests/s including each sample's context and neighbour search, mean exit layer) for the
  no-retrieval model (TALLRec-style, trained without neighbours) and the GCN-retrieval model,
  each at full depth and with its calibrated exit policy; the GCN model with an LLM retriever's
  neighbours instead (``trainer.llm_retriever``); the classic baselines' AUCs.
- Table 3: the GCN model with neighbours from the same fit's last layer instead of its average.
- Figure 2: per-request retrieval time, LLM retriever (a decoder pass over the user's history,
  then the search) against the GCN retriever (the search over stored vectors).
- Figures 3-4: the probability-delta criterion over thresholds tau (window 2) and windows m
  (tau 0.05): AUC and mean exit layer from every head's P(yes) on the test samples replayed through
  ``simulate_exits`` (the decisions serving makes), requests/s timed on ``plan.speed_samples``.
- Figure 5: the number of retrieved similar users k: AUC and requests/s with the calibrated policy.

Differences between configurations are paired (the same samples), with DeLong's standard error
(``trainer.stats``): a difference within 1.96 standard errors is reported as noise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from exitrank.types import RankExample, Sample
from trainer.context import OfflineContexts
from trainer.eval import EvalConfig, auc_with_ci, run_config
from trainer.stats import paired_auc_difference

TAUS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
WINDOWS = (1, 2, 3, 4)
NEIGHBOURS = (0, 1, 2, 4, 8)
TIMED_USERS = 100


def paired(labels: Sequence[int], a: Sequence[float], b: Sequence[float]) -> dict:
    """AUC(a) - AUC(b) in points, its standard error, and whether it exceeds the noise."""
    diff, se = paired_auc_difference(labels, a, b)
    return {"diff_points": 100 * diff, "se_points": 100 * se, "significant": abs(diff) > 1.96 * se}


def config_rows(rankers: dict, contexts: dict, samples: list[Sample], cfg: EvalConfig) -> dict:
    """Table 2 / 4 rows: name -> run_config row (with per-sample ``ctr``)."""
    specs = (  # name, model, retriever, early exit
        ("llm_no_retrieval", "none", "none", False), ("llm_no_retrieval+early_exit", "none", "none", True),
        ("gcn_retriever", "gcn", "gcn", False), ("gcn_earlyexit", "gcn", "gcn", True),
        ("llm_retriever", "gcn", "llm", False), ("gcn_last_layer", "gcn", "last", False),
        ("gcn_collab", "collab", "collab", False), ("gcn_collab_earlyexit", "collab", "collab", True),
    )
    return {name: run_config(rankers[model], contexts[retriever], samples, name=name, retrieval=retriever,
                             early_exit=early, cfg=cfg)
            for name, model, retriever, early in specs}


def baseline_rows(baselines: dict[str, np.ndarray], labels: Sequence[int], cfg: EvalConfig) -> dict:
    rows = {}
    for name, ctr in baselines.items():
        auc, ci = auc_with_ci(labels, ctr, resamples=cfg.bootstrap, seed=cfg.seed)
        rows[name] = {"name": name, "auc": auc, "auc_ci95": list(ci), "ctr": [float(c) for c in ctr]}
    return rows


def retrieval_times(ranker, gcn, llm, histories: dict, users: Sequence[str], k: int = 4) -> dict:
    """Figure 2: milliseconds per similar-user lookup, each retriever as it serves a request."""
    import torch

    from retriever_svc.vectors import VectorIndex
    from trainer.llm_retriever import LLMRetriever, history_prompt

    gcn_index, llm_index = VectorIndex(gcn.user_ids, gcn.user), VectorIndex(llm.user_ids, llm.user)
    embedder = LLMRetriever(ranker.model.causal_lm, ranker.tokenizer)
    users = [u for u in users if u in gcn_index and u in llm_index and histories.get(u)]
    gcn_ms, llm_ms = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per request, as a serving replica would give it
    try:
        for user in users:
            start = time.perf_counter()
            gcn_index.search(user, k)
            gcn_ms.append(1e3 * (time.perf_counter() - start))
            start = time.perf_counter()
            vector = embedder.embed([history_prompt(histories[user])])[0]
            llm_index.search_vector(vector, k, exclude=user)
            llm_ms.append(1e3 * (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    gcn_p50, llm_p50 = float(np.median(gcn_ms)), float(np.median(llm_ms))
    return {"users": len(users), "gcn_p50_ms": gcn_p50, "llm_p50_ms": llm_p50,
            "gcn_mean_ms": float(np.mean(gcn_ms)), "llm_mean_ms": float(np.mean(llm_ms)),
            "speedup": llm_p50 / gcn_p50}


def _requests_per_s(ranker, examples: list[RankExample], policy, batch_size: int) -> float:
    ranker.score_examples(examples[:batch_size], policy, batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    ranker.score_examples(examples, policy, batch_size=batch_size)
    return len(examples) / (time.perf_counter() - start)


def exit_sweeps(ranker, examples: list[RankExample], speed: int, batch_size: int) -> dict:
    """Figures 3 and 4: AUC, mean exit layer (replayed) and requests/s (timed) per tau and per m."""
    from ranker_svc.exits import ExitPolicy, simulate_exits
    from trainer.calibrate import exit_probabilities
    from trainer.tune import auc, encode_examples

    model, labels = ranker.model, [ex.label for ex in examples]
    table = model.soft_table()
    ids, _ = encode_examples(examples, ranker.prompt, ranker.tokenizer, max_tokens=ranker.max_tokens,
                             answer_ids=(model.yes_token_id, model.no_token_id), table=table)
    p_yes = exit_probabilities(model, ids, ranker.pad_id, batch_size=batch_size,
                               soft=table.tensor() if table is not None else None)

    def point(policy: ExitPolicy, **label) -> dict:
        ctr, layers = simulate_exits(p_yes, model.answer_layers, policy)
        return {**label, "auc": auc(labels, ctr.tolist()), "mean_exit_layer": float(layers.float().mean()),
                "requests_per_s": _requests_per_s(ranker, examples[:speed], policy, batch_size)}

    full = point(ExitPolicy(disabled=True), threshold=None, window=None)
    return {
        "full_depth": full,
        "threshold": [point(ExitPolicy(threshold=t, window=2), threshold=t, window=2) for t in TAUS],
        "window": [point(ExitPolicy(threshold=0.05, window=m), threshold=0.05, window=m) for m in WINDOWS],
        "num_layers": model.num_layers,
    }


def neighbour_sweep(ranker, dataset, gcn, samples: list[Sample], speed: int, cfg: EvalConfig,
                    max_history: int) -> list[dict]:
    """Figure 5: AUC (with its interval) and requests/s with the calibrated policy, per k."""
    rows = []
    for k in NEIGHBOURS:
        contexts = OfflineContexts(dataset, gcn, k=k, max_history=max_history)
        examples = [contexts.example(s, retrieval=k > 0) for s in samples]
        decisions = ranker.score_examples(examples, batch_size=cfg.batch_size)
        auc, ci = auc_with_ci([s.label for s in samples], [d.ctr for d in decisions],
                              resamples=cfg.bootstrap, seed=cfg.seed)
        rows.append({"k": k, "auc": auc, "auc_ci95": list(ci),
                     "mean_exit_layer": float(np.mean([d.exit_layer for d in decisions])),
                     "requests_per_s": _requests_per_s(ranker, examples[:speed], ranker.policy, cfg.batch_size)})
    return rows
