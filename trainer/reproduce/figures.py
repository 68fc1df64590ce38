"""PNG plots of the reproduction (matplotlib, Agg): the paper's Figures 2-5 per data set."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def auc_and_speed(points: list[dict], x: str, *, title: str, xlabel: str, path: Path, log_x: bool = False) -> None:
    """AUC (left axis) and requests/s (right axis) against ``x``, the paper's Figures 3-5 layout."""
    plt = _plt()
    fig, left = plt.subplots(figsize=(6, 3.6), dpi=100)
    xs = [p[x] for p in points]
    left.plot(xs, [100 * p["auc"] for p in points], "o-", color="tab:blue", label="AUC")
    left.set_xlabel(xlabel)
    left.set_ylabel("AUC (points)", color="tab:blue")
    if log_x:
        left.set_xscale("log")
    right = left.twinx()
    right.plot(xs, [p["requests_per_s"] for p in points], "s--", color="tab:red", label="requests/s")
    right.set_ylabel("requests/s", color="tab:red")
    left.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def retrieval_bars(fig2: dict, *, title: str, path: Path) -> None:
    """Figure 2: per-request retrieval time of the two retrievers (log scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.4), dpi=100)
    ax.bar(["LLM retriever", "GCN retriever"], [fig2["llm_p50_ms"], fig2["gcn_p50_ms"]],
           color=["tab:orange", "tab:green"])
    ax.set_yscale("log")
    ax.set_ylabel("median ms per lookup")
    ax.set_title(f"{title}: {fig2['speedup']:.0f}x faster")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_all(report: dict, out: Path) -> dict[str, dict[str, str]]:
    """Every figure of every data set under ``out/figures``; returns {data set: {figure: path}}."""
    folder = Path(out) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, str]] = {}
    for name, figs in report["figures"].items():
        paths = {key: folder / f"{name}-{key}.png" for key in ("figure2", "figure3", "figure4", "figure5")}
        retrieval_bars(figs["figure2"], title=name, path=paths["figure2"])
        auc_and_speed(figs["figure3"], "threshold", title=f"{name}: threshold tau (m=2)", xlabel="tau",
                      path=paths["figure3"], log_x=True)
        auc_and_speed(figs["figure4"], "window", title=f"{name}: window m (tau=0.05)", xlabel="m",
                      path=paths["figure4"])
        auc_and_speed(figs["figure5"], "k", title=f"{name}: retrieved similar users", xlabel="k",
                      path=paths["figure5"])
        written[name] = {key: str(path.relative_to(out)) for key, path in paths.items()}
    return written
