"""The measurements behind each table and figure, for one data set with its trained models.

Everything is measured here, on the data set's test split (a seeded subset of ``plan.test``
samples), and returned as plain JSON for the report:

- Table 2 / Table 4: rows of AUC (with a bootstrap 95% interval), requests/s (including each
  sample's context and neighbour search) and mean exit layer for the no-retrieval model
  (TALLRec-style, trained without neighbours) and the GCN-retrieval model, each at full depth and
  with its calibrated exit policy; the GCN model with an LLM retriever's neighbours instead
  (``trainer.llm_retriever``); the classic baselines' AUCs. One pass per (model, retriever) gives
  every head's P(yes) on all test samples; both rows' answers are that pass replayed through
  ``run_exits`` (``simulate_exits``: the decisions serving makes, tested equal to the served
  path), and each row's requests/s is timed through the serving path (``Scorer.score_examples``
  with its policy) on the first ``plan.speed_samples`` samples. So the AUCs use the whole test set
  without scoring it once per row.
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
from collections import Counter
from collections.abc import Sequence

import numpy as np

from exitrank.types import RankExample, Sample
from trainer.context import OfflineContexts
from trainer.eval import EvalConfig, timed_run
from trainer.stats import auc, auc_with_ci, paired_auc_difference

TAUS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
WINDOWS = (1, 2, 3, 4)
NEIGHBOURS = (0, 1, 2, 4, 8)
TIMED_USERS = 100


def paired(labels: Sequence[int], a: Sequence[float], b: Sequence[float]) -> dict:
    """AUC(a) - AUC(b) in points, its standard error, and whether it exceeds the noise."""
    diff, se = paired_auc_difference(labels, a, b)
    return {"diff_points": 100 * diff, "se_points": 100 * se, "significant": abs(diff) > 1.96 * se}


ROWS = (  # full-depth row, early-exit row (None: not reported), model, retriever
    ("llm_no_retrieval", "llm_no_retrieval+early_exit", "none", "none"),
    ("gcn_retriever", "gcn_earlyexit", "gcn", "gcn"),
    ("llm_retriever", None, "gcn", "llm"),
    ("gcn_last_layer", None, "gcn", "last"),
    ("gcn_collab", "gcn_collab_earlyexit", "collab", "collab"),
)


def head_probabilities(ranker, examples: list[RankExample], batch_size: int):
    """(N, E) P(yes) of every answering layer's head for ``examples`` (one full-depth pass)."""
    from trainer.calibrate import exit_probabilities
    from trainer.tune import encode_examples

    model = ranker.model
    table = model.soft_table()
    ids, _ = encode_examples(examples, ranker.prompt, ranker.tokenizer, max_tokens=ranker.max_tokens,
                             answer_ids=(model.yes_token_id, model.no_token_id), table=table)
    return exit_probabilities(model, ids, ranker.pad_id, batch_size=batch_size,
                              soft=table.tensor() if table is not None else None)


def replay_row(ranker, contexts: OfflineContexts, samples: list[Sample], p_yes, policy, *, name: str,
               retrieval: str, cfg: EvalConfig, speed: int) -> dict:
    """One Table 2/4 row: answers replayed from ``p_yes`` under ``policy``, requests/s timed on ``speed``
    samples through the serving path (context building and neighbour search included)."""
    from ranker_svc.exits import simulate_exits

    labels = [s.label for s in samples]
    ctr, layers = simulate_exits(p_yes, ranker.model.answer_layers, policy)
    timed, neighbors = samples[:speed], retrieval != "none"
    timed_run(ranker, contexts, timed[: cfg.batch_size], retrieval=neighbors, policy=policy,
               batch_size=cfg.batch_size)  # warm-up in this row's shapes, not timed
    _, seconds = timed_run(ranker, contexts, timed, retrieval=neighbors, policy=policy, batch_size=cfg.batch_size)
    auc, ci = auc_with_ci(labels, ctr.tolist(), resamples=cfg.bootstrap, seed=cfg.seed)
    counts = Counter(layers.tolist())
    return {"name": name, "retrieval": retrieval, "early_exit": not policy.disabled, "auc": auc,
            "auc_ci95": [ci[0], ci[1]], "requests_per_s": len(timed) / seconds, "timed_samples": len(timed),
            "mean_exit_layer": float(layers.float().mean()),
            "exit_layer_histogram": {str(k): v for k, v in sorted(counts.items())},
            "policy": policy.to_json(), "ctr": ctr.tolist()}


def config_rows(rankers: dict, contexts: dict, samples: list[Sample], cfg: EvalConfig, *, speed: int) -> tuple[dict, dict]:
    """Table 2 / 4 rows (name -> row with per-sample ``ctr``), and each pass's examples and P(yes)
    keyed by (model, retriever), for the sweeps that reuse them."""
    from ranker_svc.exits import ExitPolicy

    rows, passes = {}, {}
    for full_name, exit_name, model, retriever in ROWS:
        ranker, ctx = rankers[model], contexts[retriever]
        examples = [ctx.example(s, retrieval=retriever != "none") for s in samples]
        p_yes = head_probabilities(ranker, examples, cfg.batch_size)
        passes[(model, retriever)] = (examples, p_yes)
        for name, policy in ((full_name, ExitPolicy(disabled=True)), (exit_name, ranker.policy)):
            if name is not None:
                rows[name] = replay_row(ranker, ctx, samples, p_yes, policy, name=name, retrieval=retriever,
                                        cfg=cfg, speed=speed)
    return rows, passes


def baseline_rows(baselines: dict[str, np.ndarray], labels: Sequence[int], cfg: EvalConfig) -> dict:
    rows = {}
    for name, ctr in baselines.items():
        auc, ci = auc_with_ci(labels, ctr, resamples=cfg.bootstrap, seed=cfg.seed)
        rows[name] = {"name": name, "auc": auc, "auc_ci95": list(ci), "ctr": [float(c) for c in ctr]}
    return rows


def lightgcn_scores(gcn, samples: list[Sample]) -> np.ndarray:
    """The LightGCN fit's own score of each sample, user . item (0 where either is not in the graph):
    the collaborative signal the retriever draws on, with no language model at all."""
    users = {u: i for i, u in enumerate(gcn.user_ids)}
    items = {v: i for i, v in enumerate(gcn.item_ids)}
    return np.array([float(gcn.user[users[s.user_id]] @ gcn.item[items[s.item_id]])
                     if s.user_id in users and s.item_id in items else 0.0 for s in samples])


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


def exit_sweeps(ranker, examples: list[RankExample], p_yes, speed: int, batch_size: int) -> dict:
    """Figures 3 and 4: AUC, mean exit layer (replayed from ``p_yes``, every head's P(yes) on
    ``examples``) and requests/s (timed) per tau and per m."""
    from ranker_svc.exits import ExitPolicy, simulate_exits

    model, labels = ranker.model, [ex.label for ex in examples]

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
                    max_history: int, known: dict[int, tuple] | None = None) -> list[dict]:
    """Figure 5: AUC (with its interval) and requests/s with the calibrated policy, per k; ``known``:
    {k: (examples, P(yes))} passes already made (the Table 2 one at k=4)."""
    from ranker_svc.exits import simulate_exits

    rows, known = [], known or {}
    labels = [s.label for s in samples]
    for k in NEIGHBOURS:
        if k in known:
            examples, p_yes = known[k]
        else:
            contexts = OfflineContexts(dataset, gcn, k=k, max_history=max_history)
            examples = [contexts.example(s, retrieval=k > 0) for s in samples]
            p_yes = head_probabilities(ranker, examples, cfg.batch_size)
        ctr, layers = simulate_exits(p_yes, ranker.model.answer_layers, ranker.policy)
        auc, ci = auc_with_ci(labels, ctr.tolist(), resamples=cfg.bootstrap, seed=cfg.seed)
        rows.append({"k": k, "auc": auc, "auc_ci95": list(ci), "mean_exit_layer": float(layers.float().mean()),
                     "requests_per_s": _requests_per_s(ranker, examples[:speed], ranker.policy, cfg.batch_size)})
    return rows
