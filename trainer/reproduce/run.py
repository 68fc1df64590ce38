"""``trainer reproduce``: every data set through resumable stages, then one report.

Per data set (``DIR/<name>/``), each a stage of ``StageCache`` (skipped when its inputs are unchanged):

1. ``data``: import ``DATA_ROOT/<source>`` (or synthesise) into the canonical layout.
2. ``gcn``: LightGCN on the training graph, exporting the last-layer users too (Table 3).
3. ``ranker-gcn``: tune + exit heads + calibration with the k=4 GCN neighbours in every prompt.
4. ``ranker-none``: the same without neighbours (the TALLRec-style row of Table 2).
4b. ``gcn-collab`` + ``ranker-collab``: LightGCN on the graph without any sample's target, and the
   k=4 ranker that also reads its vectors as soft tokens (``--collab-tokens full``, beyond the paper).
5. ``baselines``: DeepFM, DIN, GRU4Rec and SASRec on the same training samples.
6. ``measure``: every table and figure's measurements (``experiments``).
7. ``fewshot-<model>-<shots>-s<seed>`` (tallrec-book): TALLRec's few-shot protocol (``fewshot``).

A ranker whose tuning collapsed (``trainer.stats.collapse_reason``: scores all alike, or validation AUC
at chance while the loss fell) is kept here, unlike ``trainer fit``, and the report labels its rows
"collapsed" with the reason, so a failed row reads as failed rather than as a result.

The report (``report.md``, ``report.json``, PNG figures) is written from the stages' results only.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ranker_svc.artifact import COLLAB_LAYOUT
from trainer.reproduce import experiments, fewshot
from trainer.reproduce.plan import TALLREC_TEST, DatasetPlan, plans
from trainer.reproduce.stages import StageCache

K = 4  # the paper's "example number": similar users in the prompt


@dataclass(frozen=True)
class ReproduceConfig:
    """Flags of ``trainer reproduce``."""

    data_root: Path
    out: Path
    quick: bool = False
    datasets: tuple[str, ...] | None = None
    seed: int = 0
    force: bool = False
    progress: bool = True
    bootstrap: int = 1000
    model: str | None = None  # an installed pretrained model as the LLM (plan.PRETRAINED_SIZES)
    few_shot: bool = True  # False: the few-shot table's runs are left out (its stages stay cached)


def _say(message: str) -> None:
    print(f"[reproduce] {message}", file=sys.stderr, flush=True)


def stage_data(plan: DatasetPlan, cfg: ReproduceConfig, out: Path) -> dict:
    from trainer.data.dataset import data_hash, load_dataset

    if plan.importer == "synth":
        from trainer.data.synth import SynthConfig, synth

        synth(out, SynthConfig(users=plan.synth_users, items=plan.synth_items, seed=cfg.seed))
    else:
        from trainer.data.importers import ImportOptions, import_dataset

        import_dataset(plan.importer, cfg.data_root / plan.source, out,
                       ImportOptions(max_users=plan.max_users, seed=cfg.seed))
    dataset = load_dataset(out)
    return {"samples": dataset.split_counts(), "interactions": len(dataset.interactions),
            "data_hash": data_hash(out)}


def stage_gcn(data: Path, plan: DatasetPlan, cfg: ReproduceConfig, out: Path, *, all_targets: bool = False) -> dict:
    from trainer.data.dataset import graph_pairs, load_dataset
    from trainer.gcn import fit_gcn

    emb = fit_gcn(graph_pairs(load_dataset(data), all_targets=all_targets), epochs=plan.gcn_epochs, seed=cfg.seed,
                  progress=cfg.progress, user_variants=("last",))
    emb.save(out)
    return {"version": emb.version, "users": len(emb.user_ids), "items": len(emb.item_ids),
            "seconds": emb.meta["metrics"]["seconds"]}


def stage_ranker(data: Path, gcn_dir: Path, plan: DatasetPlan, cfg: ReproduceConfig, k: int, out: Path,
                 collab: str = "none") -> dict:
    from trainer.pipeline import make_config, run_stages

    shutil.copytree(gcn_dir / "gcn", out / "gcn")
    # a collapsed model is kept and its rows labelled in the report (run.py's docstring), not a crash
    overrides = {"tune": {"epochs": plan.epochs, "max_train": plan.train, "collab": collab, "allow_collapse": True,
                          "lr": plan.lr, "batch_size": plan.batch_size},
                 "heads": {"epochs": plan.heads_epochs, "max_train": plan.train},
                 "calibrate": {"max_valid": plan.valid}}
    fit_cfg = make_config(data, out, preset=plan.preset, base_model=plan.base_model, seed=cfg.seed,
                          overrides=overrides, k=k, max_history=plan.max_history, progress=cfg.progress)
    manifest = run_stages(fit_cfg, ("tune", "fit-heads", "calibrate"))
    metrics = manifest["metrics"]
    return {"version": manifest["version"], "k": k, "collab": collab,
            "tune_seconds": metrics["tune"]["seconds"], "heads_seconds": metrics["fit-heads"]["seconds"],
            "calibrate_seconds": metrics["calibrate"]["seconds"], "valid_auc": metrics["tune"].get("valid_auc"),
            "collapsed": metrics["tune"].get("collapsed"),
            "policy": metrics["calibrate"]["policy"], "calibration_png": str(out / "calibration.png")}


def stage_baselines(data: Path, plan: DatasetPlan, cfg: ReproduceConfig, out: Path) -> dict:
    from trainer.baselines import BASELINES, fit_baseline
    from trainer.context import OfflineContexts
    from trainer.data.dataset import load_dataset

    contexts = OfflineContexts(load_dataset(data), None, k=0, max_history=plan.max_history)
    train = contexts.examples("train", retrieval=False, limit=plan.train, seed=cfg.seed)
    valid = contexts.examples("valid", retrieval=False, limit=plan.valid, seed=cfg.seed)
    test = contexts.examples("test", retrieval=False, limit=plan.test, seed=cfg.seed)
    result = {}
    for name in BASELINES:
        start = time.perf_counter()
        model = fit_baseline(name, train, valid, seed=cfg.seed)
        result[name] = {"ctr": model.predict(test).tolist(), "seconds": time.perf_counter() - start}
    return result


def stage_measure(data: Path, gcn_dir: Path, collab_gcn_dir: Path, ranker_dirs: dict[str, Path], baselines: dict,
                  plan: DatasetPlan, cfg: ReproduceConfig, out: Path) -> dict:
    from ranker_svc.artifact import load_ranker
    from ranker_svc.scoring import Scorer
    from retriever_svc.embeddings import GCNEmbeddings
    from trainer.context import OfflineContexts, subsample
    from trainer.data.dataset import load_dataset
    from trainer.eval import EvalConfig
    from trainer.llm_retriever import LLMRetriever

    dataset = load_dataset(data)
    gcn = GCNEmbeddings.load(gcn_dir)
    rankers = {name: Scorer(loaded=load_ranker(path / "ranker")) for name, path in ranker_dirs.items()}
    samples = subsample(dataset.split("test"), plan.test, cfg.seed)
    eval_cfg = EvalConfig(data=data, artifacts=gcn_dir, report=out, seed=cfg.seed, bootstrap=cfg.bootstrap)
    gcn_contexts = OfflineContexts(dataset, gcn, k=K, max_history=plan.max_history, cache=False)
    histories = gcn_contexts.graph_histories()
    started = time.perf_counter()
    llm = LLMRetriever(rankers["gcn"].model.causal_lm, rankers["gcn"].tokenizer).user_vectors(histories)
    llm_embed_seconds = time.perf_counter() - started
    collab_gcn = GCNEmbeddings.load(collab_gcn_dir)
    contexts = {"none": gcn_contexts, "gcn": gcn_contexts,
                "llm": OfflineContexts(dataset, llm, k=K, max_history=plan.max_history, cache=False),
                "last": OfflineContexts(dataset, gcn.with_users("last"), k=K, max_history=plan.max_history),
                "collab": OfflineContexts(dataset, collab_gcn, k=K, max_history=plan.max_history, cache=False,
                                          vectors=collab_gcn)}
    labels = [s.label for s in samples]
    rows, passes = experiments.config_rows(rankers, contexts, samples, eval_cfg, speed=plan.speed_samples)
    scores = {**{n: np.asarray(b["ctr"]) for n, b in baselines.items()},
              "lightgcn": experiments.lightgcn_scores(gcn, samples)}
    rows.update(experiments.baseline_rows(scores, labels, eval_cfg))
    examples, p_yes = passes[("gcn", "gcn")]
    users = list(dict.fromkeys(s.user_id for s in samples))[: experiments.TIMED_USERS]
    result = {
        "samples": dataset.split_counts(),
        "evaluated": {"samples": len(samples), "positives": int(sum(labels)), "negatives": len(labels) - int(sum(labels))},
        "rows": rows,
        "figure2": {**experiments.retrieval_times(rankers["gcn"], gcn, llm, histories, users),
                    "llm_embed_all_users_seconds": llm_embed_seconds, "graph_users": len(llm.user_ids)},
        "exit_sweeps": experiments.exit_sweeps(rankers["gcn"], examples, p_yes, plan.speed_samples,
                                               eval_cfg.batch_size),
        "neighbours": experiments.neighbour_sweep(
            rankers["gcn"], dataset, gcn, samples[: plan.sweep_samples], plan.speed_samples, eval_cfg, plan.max_history,
            known={K: (examples[: plan.sweep_samples], p_yes[: plan.sweep_samples])}),
        "num_layers": rankers["gcn"].num_layers,
        "exit_layers": list(rankers["gcn"].model.exit_layers),
    }
    result["comparisons"] = {
        "gcn_over_none": experiments.paired(labels, rows["gcn_retriever"]["ctr"], rows["llm_no_retrieval"]["ctr"]),
        "gcn_over_llm_retriever": experiments.paired(labels, rows["gcn_retriever"]["ctr"], rows["llm_retriever"]["ctr"]),
        "average_over_last_layer": experiments.paired(labels, rows["gcn_retriever"]["ctr"], rows["gcn_last_layer"]["ctr"]),
        "exit_over_full": experiments.paired(labels, rows["gcn_earlyexit"]["ctr"], rows["gcn_retriever"]["ctr"]),
        "collab_over_text": experiments.paired(labels, rows["gcn_collab"]["ctr"], rows["gcn_retriever"]["ctr"]),
        "collab_exit_over_full": experiments.paired(labels, rows["gcn_collab_earlyexit"]["ctr"],
                                                    rows["gcn_collab"]["ctr"]),
    }
    return result


def run_dataset(plan: DatasetPlan, cfg: ReproduceConfig, cache: StageCache) -> dict:
    """Every stage of one data set; returns the measurements and the stages' timings."""
    # the few-shot table is no input of the other stages: adding, changing or leaving it out re-runs none of them
    settings = {"plan": {k: v for k, v in plan.to_json().items() if k != "few_shot"}, "seed": cfg.seed}
    data = cache.run(f"{plan.name}/data", {**settings, "root": str(cfg.data_root)},
                     lambda out: stage_data(plan, cfg, out))
    gcn = cache.run(f"{plan.name}/gcn", {**settings, "data": data.fingerprint},
                    lambda out: stage_gcn(data.dir, plan, cfg, out))
    collab_gcn = cache.run(f"{plan.name}/gcn-collab", {**settings, "data": data.fingerprint, "all_targets": True},
                           lambda out: stage_gcn(data.dir, plan, cfg, out, all_targets=True))
    # the soft-token layout is an input of the collab ranker: a new layout retrains it (and re-measures)
    rankers = {name: cache.run(f"{plan.name}/ranker-{name}", {**settings, "gcn": g.fingerprint, "k": k, **extra,
                                                             **({"layout": COLLAB_LAYOUT} if extra else {})},
                               lambda out, k=k, g=g, extra=extra: stage_ranker(data.dir, g.dir, plan, cfg, k, out,
                                                                              **extra))
               for name, k, g, extra in (("gcn", K, gcn, {}), ("none", 0, gcn, {}),
                                         ("collab", K, collab_gcn, {"collab": "full"}))}
    baselines = cache.run(f"{plan.name}/baselines", {**settings, "data": data.fingerprint},
                          lambda out: stage_baselines(data.dir, plan, cfg, out))
    inputs = {**settings, "bootstrap": cfg.bootstrap, "baselines": baselines.fingerprint,
              **{f"ranker-{n}": r.fingerprint for n, r in rankers.items()}}
    measured = cache.run(f"{plan.name}/measure", inputs,
                         lambda out: stage_measure(data.dir, gcn.dir, collab_gcn.dir,
                                                   {n: r.dir for n, r in rankers.items()},
                                                   baselines.result, plan, cfg, out))
    few_runs = run_few_shot(plan, cfg, cache, settings, data)
    stages = [data, gcn, collab_gcn, *rankers.values(), baselines, measured, *few_runs]
    few_shot = None
    if few_runs:
        runs = [r.result for r in few_runs]
        few_shot = {"plan": plan.few_shot.to_json(), "table": fewshot.table(runs, TALLREC_TEST),
                    "runs": [{k: v for k, v in r.items() if k not in ("labels", "ctr")} for r in runs]}
    return {"plan": plan.to_json(), "data": data.result, "gcn": gcn.result, "few_shot": few_shot,
            "rankers": {n: r.result for n, r in rankers.items()},
            "baseline_seconds": {n: b["seconds"] for n, b in baselines.result.items()},
            **measured.result,
            "stage_seconds": {s.name.split("/", 1)[1]: round(s.seconds, 1) for s in stages},
            "stages_reused": [s.name for s in stages if s.reused]}


def run_few_shot(plan: DatasetPlan, cfg: ReproduceConfig, cache: StageCache, settings: dict, data) -> list:
    """The few-shot table's runs (one stage each), or [] when the plan has none."""
    few = plan.few_shot
    if few is None or not cfg.few_shot:
        return []
    return [cache.run(f"{plan.name}/fewshot-{few.model}-{shots}-s{seed}",
                      {**settings, "few_shot": few.to_json(), "data": data.fingerprint, "shots": shots,
                       "seed": seed},
                      lambda out, shots=shots, seed=seed: fewshot.stage_run(data.dir, few, shots, seed, plan.max_history,
                                                                            out))
            for shots in few.shots for seed in few.seeds]


def reproduce(cfg: ReproduceConfig) -> dict:
    """Run every data set's stages and write the report; returns the report object."""
    from trainer.reproduce.report import write_report

    started = time.perf_counter()
    cache = StageCache(cfg.out / "stages", force=cfg.force, log=_say)
    chosen = plans(quick=cfg.quick, names=cfg.datasets, model=cfg.model)
    results = {}
    for plan in chosen:
        if plan.source is not None and not (cfg.data_root / plan.source).is_dir():
            _say(f"{plan.name}: {cfg.data_root / plan.source} is absent, skipped")
            continue
        results[plan.name] = run_dataset(plan, cfg, cache)
    report = {"quick": cfg.quick, "seed": cfg.seed, "model": cfg.model, "datasets": results,
              "wall_seconds": round(time.perf_counter() - started, 1),
              "stage_seconds_total": round(sum(s.seconds for s in cache.ran), 1),
              "stages_reused": sum(s.reused for s in cache.ran), "stages": len(cache.ran)}
    return write_report(report, cfg.out)
