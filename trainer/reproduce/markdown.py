"""``report.md``: the reproduction's tables, rendered from ``report.json`` only.

It reads the built report object and ``plan``'s row labels, never the builder (``report.py`` calls
``render``), so the report's modules import one way: report -> markdown -> plan.
"""

from __future__ import annotations

from trainer.reproduce.plan import TABLE2, TALLREC_TEST


def _auc(row: dict) -> str:
    lo, hi = row["auc_ci95"]
    return f"{100 * row['auc']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"


def _paper(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _noise(c: dict) -> str:
    verdict = "beyond noise" if c["significant"] else "within noise"
    return f"{c['diff_points']:+.2f} ± {1.96 * c['se_points']:.2f} points ({verdict})"


def _model(plan: dict) -> str:
    if plan.get("base_model"):
        return f"{plan['base_model']} (pretrained, LoRA-tuned at lr {plan.get('lr') or 'default'})"
    return f"{plan['preset']} preset (trained from scratch)"


def dataset_section(name: str, report: dict) -> list[str]:
    ds, t2, t3, t4 = report["datasets"][name], report["table2"][name], report["table3"][name], report["table4"][name]
    figs, goals, plan = report["figures"][name], report["goals"][name], ds["plan"]
    ev = ds["evaluated"]
    labels = dict(TABLE2)
    lines = [f"## {name}", "",
             f"Setup: {_model(plan)} ({ds['num_layers']} layers, exit heads at {ds['exit_layers']}), "
             f"up to {plan['train']} training / {plan['valid']} calibration samples, {ev['samples']} test samples "
             f"({ev['positives']} positive), k=4 similar users, seed {report['seed']}; splits {ds['samples']}; "
             f"requests/s timed on {plan['speed_samples']} samples, Figure 5 on {min(plan['sweep_samples'], ev['samples'])}. "
             f"Stage times (s): {', '.join(f'{k} {v:.0f}' for k, v in ds['stage_seconds'].items())}"
             + (f"; reused: {', '.join(s.split('/')[-1] for s in ds['stages_reused'])}" if ds["stages_reused"] else "")
             + ".", "",
             "**Table 2** (AUC × 100, 95% bootstrap interval)", "",
             "| model | ours | paper |", "|---|---|---|"]
    collapsed = _collapsed_rows(ds.get("rankers", {}))
    lines += [f"| {labels[r['model']]}{' (collapsed)' if r['model'] in collapsed else ''} | {_auc(r)} "
              f"| {_paper(r['paper_auc'])} |" for r in t2]
    if collapsed:
        lines += [""] + [f"Collapsed ({', '.join(rows)}): {reason}." for reason, rows in _by_reason(collapsed).items()]
    lines += ["", "**Table 3** (retrieval layer)", "", "| layer | ours | paper |", "|---|---|---|"]
    lines += [f"| {r['retrieval_layer']} | {_auc(r)} | {_paper(r['paper_auc'])} |" for r in t3]
    lines += ["", "**Table 4** (ablation; requests/s on this machine's CPU, the paper's per A100)", "",
              "| retriever | early exit | AUC (req/s) | mean exit layer | paper AUC (req/s) |", "|---|---|---|---|---|"]
    for r in t4:
        paper = "—" if r["paper_auc"] is None else f"{r['paper_auc']:.2f} ({r['paper_requests_per_s']:.2f})"
        lines.append(f"| {'w/' if r['retriever'] == 'gcn' else 'w/o'} | {'w/' if r['early_exit'] else 'w/o'} "
                     f"| {100 * r['auc']:.2f} ({r['requests_per_s']:.1f}) | {r['mean_exit_layer']:.2f} | {paper} |")
    c = ds["comparisons"]
    f2 = figs["figure2"]
    lines += ["", "Paired differences (DeLong): GCN retrieval over none " + _noise(c["gcn_over_none"])
              + "; GCN over LLM retriever " + _noise(c["gcn_over_llm_retriever"])
              + "; average over last layer " + _noise(c["average_over_last_layer"])
              + "; early exit over full depth " + _noise(c["exit_over_full"])
              + "; collab tokens over text-only retrieval " + _noise(c["collab_over_text"]) + ".", "",
              f"**Figure 2**: retrieval per request, LLM retriever {f2['llm_p50_ms']:.2f} ms against GCN retriever "
              f"{f2['gcn_p50_ms']:.3f} ms (medians over {f2['users']} users): {f2['speedup']:.0f}× faster.", ""]
    plots = report["plots"][name]
    lines += [f"![Figure 2]({plots['figure2']}) ![Figure 3]({plots['figure3']})",
              f"![Figure 4]({plots['figure4']}) ![Figure 5]({plots['figure5']})", ""]
    lines += ["Goals: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in goals.items()) + ".", ""]
    lines += few_shot_section(report["few_shot"].get(name))
    if name == "tallrec-book":
        lines += ["Published on this test file (AUC × 100): " + ", ".join(f"{k} {v:.2f}" for k, v in TALLREC_TEST.items())
                  + ".", ""]
    return lines


def few_shot_section(few: dict | None) -> list[str]:
    """TALLRec's few-shot table: AUC mean ± std over seeds per shot count, TALLRec-7B beside."""
    if not few:
        return []
    plan = few["plan"]
    lines = [f"**Few-shot** (TALLRec's protocol: {plan['model']} tuned on the first N of a seeded subset of the "
             f"training pool, no retrieval; {len(plan['seeds'])} seed(s); AUC × 100 on the same {plan['test']} test "
             "samples)", "", "| samples | ours: mean ± std (per seed) | TALLRec-7B | ours higher |", "|---|---|---|---|"]
    for row in few["table"]:
        seeds = ", ".join(f"{a:.2f}" for a in row["aucs"])
        collapsed = f", {row['collapsed_runs']} collapsed" if row["collapsed_runs"] else ""
        lines.append(f"| {row['shots']} | {row['auc_mean']:.2f} ± {row['auc_std']:.2f} ({seeds}{collapsed}) "
                     f"| {_paper(row['tallrec_7b'])} | {_fmt(row['beats_tallrec_7b']) if row['tallrec_7b'] else '—'} |")
    return lines + [""]


# which Table 2 rows each ranker stage scores (run.py: ranker-gcn, ranker-none, ranker-collab)
ROWS_OF_RANKER = {"gcn": ("llm_retriever", "gcn_retriever", "gcn_earlyexit"), "none": ("llm_no_retrieval",),
                  "collab": ("gcn_collab", "gcn_collab_earlyexit")}


def _collapsed_rows(rankers: dict) -> dict[str, str]:
    """Table 2 row -> why its ranker collapsed, for the rankers whose tuning collapsed."""
    return {row: r["collapsed"] for name, r in rankers.items() if r.get("collapsed")
            for row in ROWS_OF_RANKER.get(name, ())}


def _by_reason(collapsed: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row, reason in collapsed.items():
        out.setdefault(reason, []).append(row)
    return out


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def render(report: dict) -> str:
    mode = "quick (subsets, tiny preset)" if report["quick"] else "full"
    if report.get("model"):
        mode += f", {report['model']} as the LLM"
    lines = ["# exitrank: the paper's experiments, reproduced", "",
             f"Mode: {mode}; seed {report['seed']}; this run {report['wall_seconds']:.0f} s, the stages' own time "
             f"{report['stage_seconds_total']:.0f} s ({report['stages_reused']} of {report['stages']} stages reused "
             "from an earlier run with the same inputs). The paper's numbers are "
             "Vicuna-7B on its own splits (BookCrossing beside tallrec-book, Video Games beside games6k); ours are "
             "models trained on this machine, on these data sets' test splits. An interval is a 95% bootstrap "
             "interval; a paired difference within 1.96 standard errors is called noise. Each LLM row's answers "
             "come from one pass that reads every exit head's P(yes) on all test samples, replayed through the "
             "exit policy exactly as serving decides (`ranker_svc.exits.run_exits`); its requests/s is timed "
             "through the serving path (context and neighbour search included) on the first test samples.", ""]
    for name in report["datasets"]:
        lines += dataset_section(name, report)
    return "\n".join(lines) + "\n"
