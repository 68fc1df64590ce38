"""Offline evaluation on the test split: AUC with a bootstrap interval, requests/s and exit depth.

Four configurations share one trained artifact (the paper's Table 2/3 rows): ``no_retrieval`` and
``gcn_retrieval`` (the user's history alone, or plus its k=4 GCN-nearest users), each with the full
depth (``ExitPolicy(disabled=True)``) and with the calibrated early-exit policy (``+early_exit``).

An artifact carries its own prompt configuration, and each model is scored the way it serves: with
the neighbours per prompt it asks for (its prompt's ``num_neighbors``, the ``--k`` it was tuned with;
``--k`` here overrides), and a ranker trained with collaborative soft tokens (``trainer fit --collab-tokens``) reads the LightGCN
vectors of the version it is pinned to (its own ``gcn/``, checked), and its rows are named
``no_retrieval+collab_tokens``, ``gcn_retrieval+collab_tokens`` (each also ``+early_exit``).
``--compare DIR`` scores a second artifact on the same samples the same way; its rows are named
``compare/<name>``.

- AUC: ``trainer.stats.auc_with_ci`` of the Yes-probability (paper eq. ``y = e^{s_a}/(e^{s_a}+e^{s_b})``)
  against the 0/1 labels; ``auc_ci95`` is the percentile interval of ``bootstrap`` resamples of the
  evaluated samples (seeded; resamples with one class only are skipped).
- requests/s: one request = one test sample; the clock covers building its context (its own neighbour
  search, no cache) and scoring it, after an untimed warm-up batch in the same configuration.
- mean exit layer and the exit-layer histogram (1-based decoder layers).

The report (``OUT/report.json``, keys as in shared/BENCH_OUTPUT.md, and ``OUT/report.md``) is written only
from measured values.

    .venv/bin/python -m trainer eval --data data/synth --artifacts artifacts --report reports/synth
    .venv/bin/python -m trainer eval --data data/games6k --artifacts artifacts --report r --max-samples 2000
    .venv/bin/python -m trainer eval --data data/synth --artifacts collab --compare text-only --report r
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exitrank.types import ExitDecision, RankExample, Sample
from trainer.context import OfflineContexts, subsample
from trainer.data.dataset import Dataset, load_dataset
from trainer.stats import auc_with_ci

CONFIGS = (  # (name, retrieval, early_exit)
    ("no_retrieval", "none", False),
    ("no_retrieval+early_exit", "none", True),
    ("gcn_retrieval", "gcn", False),
    ("gcn_retrieval+early_exit", "gcn", True),
)


@dataclass(frozen=True)
class EvalConfig:
    """Flags of ``trainer eval``."""

    data: Path
    artifacts: Path
    report: Path
    max_samples: int | None = None  # a seeded random subset of the test split
    seed: int = 0
    batch_size: int = 32
    bootstrap: int = 1000
    k: int | None = None  # neighbours per prompt; None: the artifact's (its prompt's num_neighbors), as it serves
    max_history: int = 15
    split: str = "test"
    compare: Path | None = None  # a second artifact scored on the same samples (rows compare/...)


def timed_run(ranker, contexts: OfflineContexts, samples: list[Sample], *, retrieval: bool, policy,
               batch_size: int) -> tuple[list[ExitDecision], float]:
    """Builds contexts (a neighbour search per sample) and scores them; returns decisions and seconds."""
    start = time.perf_counter()
    examples: list[RankExample] = [contexts.example(s, retrieval=retrieval) for s in samples]
    decisions = ranker.score_examples(examples, policy, batch_size=batch_size)
    return decisions, time.perf_counter() - start


def run_config(ranker, contexts: OfflineContexts, samples: list[Sample], *, name: str, retrieval: str,
               early_exit: bool, cfg: EvalConfig) -> dict:
    """One row of the report."""
    from ranker_svc.exits import ExitPolicy

    policy = ranker.policy if early_exit else ExitPolicy(disabled=True)
    neighbors = retrieval != "none"  # "gcn", or any other retriever behind ``contexts``
    timed_run(ranker, contexts, samples[: cfg.batch_size], retrieval=neighbors, policy=policy,
               batch_size=cfg.batch_size)  # warm-up in this config's shapes, not timed
    decisions, seconds = timed_run(ranker, contexts, samples, retrieval=neighbors, policy=policy,
                                    batch_size=cfg.batch_size)
    auc, ci = auc_with_ci([s.label for s in samples], [d.ctr for d in decisions],
                          resamples=cfg.bootstrap, seed=cfg.seed)
    layers = [d.exit_layer for d in decisions]
    return {
        "name": name,
        "retrieval": retrieval,
        "early_exit": early_exit,
        "auc": auc,
        "auc_ci95": [ci[0], ci[1]],
        "requests_per_s": len(samples) / seconds,
        "mean_exit_layer": float(np.mean(layers)),
        "exit_layer_histogram": {str(k): v for k, v in sorted(Counter(layers).items())},
        "wall_seconds": seconds,
        "policy": policy.to_json(),
        "ctr": [d.ctr for d in decisions],
    }


COLLAB_SUFFIX = "+collab_tokens"


def load_model(artifacts: Path, dataset: Dataset, cfg: EvalConfig):
    """``(scorer, contexts, gcn, manifest)`` for an artifact as it serves: its ranker, its LightGCN
    fit for the neighbours, and the soft tokens' vectors when the ranker reads them (of the version
    it was trained on: ``gcn/`` must hold that version)."""
    from exitrank.artifacts import verify_manifest
    from ranker_svc.artifact import load_ranker
    from ranker_svc.scoring import Scorer
    from retriever_svc.embeddings import GCNEmbeddings

    root = Path(artifacts)
    manifest = verify_manifest(root)
    gcn = GCNEmbeddings.load(root)
    loaded = load_ranker(root / "ranker")
    k = cfg.k if cfg.k is not None else loaded.prompt.config.num_neighbors
    ranker = Scorer(loaded=loaded)
    vectors = None
    if ranker.pinned_version is not None:
        if gcn.version != ranker.pinned_version:
            raise ValueError(f"{root}: the ranker reads soft tokens of embeddings {ranker.pinned_version}, but "
                             f"gcn/ holds {gcn.version}; evaluate the artifact directory it was trained in")
        vectors = gcn
    contexts = OfflineContexts(dataset, gcn, k=k, max_history=cfg.max_history, cache=False, vectors=vectors)
    return ranker, contexts, gcn, manifest


def model_rows(ranker, contexts: OfflineContexts, samples: list[Sample], cfg: EvalConfig, *, prefix: str = "") -> list[dict]:
    """The four configurations of one model; soft-token models' names carry ``+collab_tokens``."""
    suffix = COLLAB_SUFFIX if ranker.pinned_version is not None else ""
    rows = []
    for name, retrieval, early in CONFIGS:
        base, _, exits = name.partition("+")
        label = f"{prefix}{base}{suffix}" + (f"+{exits}" if exits else "")
        rows.append(run_config(ranker, contexts, samples, name=label, retrieval=retrieval, early_exit=early, cfg=cfg))
    return rows


def evaluate(cfg: EvalConfig, *, dataset: Dataset | None = None) -> dict:
    """Scores the four configurations (and ``cfg.compare``'s) and returns the report object (see the
    module docstring)."""
    dataset = dataset or load_dataset(cfg.data)
    ranker, contexts, gcn, manifest = load_model(Path(cfg.artifacts), dataset, cfg)
    samples = subsample(dataset.split(cfg.split), cfg.max_samples, cfg.seed)
    if not samples:
        raise ValueError(f"the {cfg.split!r} split of {cfg.data} is empty: nothing to evaluate")
    rows = model_rows(ranker, contexts, samples, cfg)
    if cfg.compare is not None:
        other, other_contexts, _, _ = load_model(Path(cfg.compare), dataset, cfg)
        rows += model_rows(other, other_contexts, samples, cfg, prefix="compare/")
    for row in rows:
        del row["ctr"]  # per-sample scores: for callers comparing configs, not for the report
    labels = Counter(s.label for s in samples)
    return {
        "dataset": dataset.meta.name,
        "samples": dataset.split_counts(),
        "seed": cfg.seed,
        "configs": rows,
        "evaluated": {"split": cfg.split, "samples": len(samples), "positives": labels[1], "negatives": labels[0]},
        "model_version": ranker.model_version,
        "collab_tokens": ranker.pinned_version is not None,
        "embedding_version": gcn.version,
        "artifacts_version": manifest.get("version", ""),
        "compare": str(cfg.compare) if cfg.compare is not None else None,
        "num_layers": ranker.num_layers,
        "exit_layers": list(ranker.model.exit_layers),
        "k": contexts.k,
        "batch_size": cfg.batch_size,
        "bootstrap": cfg.bootstrap,
        "machine": {"cores": os.cpu_count()},
    }


def render_markdown(report: dict) -> str:
    """A human-readable table of the report (every number comes from ``report``)."""
    ev = report["evaluated"]
    lines = [
        f"# Evaluation: {report['dataset']}",
        "",
        f"{ev['samples']} {ev['split']} samples ({ev['positives']} positive, {ev['negatives']} negative); "
        f"splits {report['samples']}; seed {report['seed']}; model `{report['model_version']}` "
        f"({report['num_layers']} layers, exits at {report['exit_layers']}), embeddings "
        f"`{report['embedding_version']}`, k={report['k']}, batch {report['batch_size']}, "
        f"{report['machine']['cores']} cores.",
        "",
        "| config | retrieval | early exit | AUC | 95% CI | requests/s | mean exit layer | exit layers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["configs"]:
        hist = ", ".join(f"{k}: {v}" for k, v in row["exit_layer_histogram"].items())
        lines.append(
            f"| {row['name']} | {row['retrieval']} | {'yes' if row['early_exit'] else 'no'} | {row['auc']:.4f} "
            f"| [{row['auc_ci95'][0]:.4f}, {row['auc_ci95'][1]:.4f}] | {row['requests_per_s']:.1f} "
            f"| {row['mean_exit_layer']:.2f} | {hist} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return out / "report.json", out / "report.md"


def run(cfg: EvalConfig) -> dict:
    """``trainer eval``: evaluate and write the report."""
    report = evaluate(cfg)
    write_report(report, cfg.report)
    return report
