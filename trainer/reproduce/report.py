"""The reproduction report: ``report.json`` (every figure), ``report.md`` (tables) and PNG plots.

Every number comes from the measurements (``run.reproduce``); the paper's come from
``plan.PAPER`` and are printed beside ours, never mixed in. Keys follow shared/BENCH_OUTPUT.md:
per data set an object like ``trainer eval``'s ``report.json`` (its four ``configs``) under
``datasets``, and ``table2``, ``table3``, ``table4`` and ``figures`` sections keyed by data set.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.reproduce.markdown import render
from trainer.reproduce.plan import PAPER, TABLE2, TALLREC_TEST

TABLE4 = (("none", "llm_no_retrieval"), ("none+early_exit", "llm_no_retrieval+early_exit"),
          ("gcn", "gcn_retriever"), ("gcn+early_exit", "gcn_earlyexit"))
EVAL_NAMES = {"llm_no_retrieval": "no_retrieval", "llm_no_retrieval+early_exit": "no_retrieval+early_exit",
              "gcn_retriever": "gcn_retrieval", "gcn_earlyexit": "gcn_retrieval+early_exit",
              "gcn_collab": "gcn_retrieval+collab_tokens", "gcn_collab_earlyexit": "gcn_retrieval+collab_tokens+early_exit"}


def _row(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "ctr"}


def sections(name: str, ds: dict) -> dict:
    """table2 / table3 / table4 / figures / goals of one data set, paper numbers beside ours."""
    paper = PAPER.get(ds["plan"]["paper"] or "", {})
    rows = ds["rows"]
    table2 = [{"model": key, "auc": rows[key]["auc"], "auc_ci95": rows[key]["auc_ci95"],
               "paper_auc": paper.get("table2", {}).get(key)} for key, _ in TABLE2 if key in rows]
    table3 = [{"retrieval_layer": layer, "auc": rows[key]["auc"], "auc_ci95": rows[key]["auc_ci95"],
               "paper_auc": paper.get("table3", {}).get(layer)}
              for layer, key in (("mean_1_to_K", "gcn_retriever"), ("last", "gcn_last_layer"))]
    table4 = []
    for key, row_name in TABLE4:
        row, ref = rows[row_name], paper.get("table4", {}).get(key)
        table4.append({"retriever": "gcn" if key.startswith("gcn") else "none", "early_exit": "early_exit" in key,
                       "auc": row["auc"], "auc_ci95": row["auc_ci95"], "requests_per_s": row["requests_per_s"],
                       "mean_exit_layer": row["mean_exit_layer"],
                       "paper_auc": ref[0] if ref else None, "paper_requests_per_s": ref[1] if ref else None})
    full, exit_ = rows["gcn_retriever"], rows["gcn_earlyexit"]
    lift = ds["comparisons"]["gcn_over_none"]
    goals = {
        "gcn_lifts_auc_beyond_noise": lift["diff_points"] > 0 and lift["significant"],
        "early_exit_auc_loss_points": 100 * (full["auc"] - exit_["auc"]),
        "early_exit_speedup": exit_["requests_per_s"] / full["requests_per_s"],
    }
    goals["early_exit_within_0.3_points_at_2x"] = (goals["early_exit_auc_loss_points"] <= 0.3
                                                   and goals["early_exit_speedup"] >= 2.0)
    collab = ds["comparisons"]["collab_over_text"]
    goals["collab_over_text_points"] = collab["diff_points"]
    goals["collab_beats_text_beyond_noise"] = collab["diff_points"] > 0 and collab["significant"]
    c_full, c_exit = rows["gcn_collab"], rows["gcn_collab_earlyexit"]
    goals["collab_early_exit_auc_loss_points"] = 100 * (c_full["auc"] - c_exit["auc"])
    goals["collab_early_exit_speedup"] = c_exit["requests_per_s"] / c_full["requests_per_s"]
    if name == "tallrec-book":
        best = max(r["auc"] for r in table2)
        goals.update(best_auc=best, beats_tallrec_7b_256=100 * best > TALLREC_TEST["tallrec_7b_256"])
    figures = {"figure2": ds["figure2"], "figure3": ds["exit_sweeps"]["threshold"],
               "figure4": ds["exit_sweeps"]["window"], "figure5": ds["neighbours"],
               "full_depth": ds["exit_sweeps"]["full_depth"]}
    return {"table2": table2, "table3": table3, "table4": table4, "figures": figures, "goals": goals}


def dataset_object(name: str, ds: dict, seed: int) -> dict:
    """The ``trainer eval``-shaped object of one data set (shared/BENCH_OUTPUT.md)."""
    configs = [{**_row(ds["rows"][key]), "name": EVAL_NAMES[key]} for key in EVAL_NAMES]
    return {"dataset": name, "samples": ds["samples"], "seed": seed, "configs": configs,
            "evaluated": ds["evaluated"], "plan": ds["plan"], "rankers": ds["rankers"], "gcn": ds["gcn"],
            "comparisons": ds["comparisons"], "stage_seconds": ds["stage_seconds"],
            "stages_reused": ds["stages_reused"], "num_layers": ds["num_layers"], "exit_layers": ds["exit_layers"],
            "baselines": {k: _row(ds["rows"][k]) for k in ("deepfm", "din", "gru4rec", "sasrec", "lightgcn")
                          if k in ds["rows"]},
            "baseline_seconds": ds["baseline_seconds"], "few_shot": ds.get("few_shot")}


def build(report: dict) -> dict:
    out = {**{k: report[k] for k in ("quick", "seed", "wall_seconds", "stage_seconds_total", "stages_reused", "stages")},
           "datasets": {}, "table2": {}, "table3": {}, "table4": {}, "figures": {}, "goals": {}, "few_shot": {}}
    for name, ds in report["datasets"].items():
        out["datasets"][name] = dataset_object(name, ds, report["seed"])
        for key, value in sections(name, ds).items():
            out[key][name] = value
        if ds.get("few_shot"):
            out["few_shot"][name] = ds["few_shot"]
            out["goals"][name]["beats_tallrec_7b_at_every_shot_count"] = all(
                row["beats_tallrec_7b"] for row in ds["few_shot"]["table"] if row["tallrec_7b"] is not None)
    out["tallrec_published"] = TALLREC_TEST
    return out


def write_report(report: dict, out: Path) -> dict:
    """Write report.json, report.md and the figures under ``out``; returns the report.json object."""
    from trainer.reproduce.figures import plot_all

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    built = build(report)
    built["plots"] = plot_all(built, out)
    (out / "report.json").write_text(json.dumps(built, indent=1) + "\n")
    (out / "report.md").write_text(render(built))
    return built
