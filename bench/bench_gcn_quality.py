"""LightGCN quality on the LightGCN benchmark split (gowalla), against the published numbers.

    make bench-gcn-quality           # = the line below (45-minute budget, 2 threads)
    .venv/bin/python -m bench.bench_gcn_quality --data ../shared/data/gowalla
    .venv/bin/python -m bench.bench_gcn_quality --data ../shared/data/gowalla --quick   # smoke run

Model: LightGCN (torch_geometric), 3 layers, 64 dimensions, BPR; full ranking over every item not
in the user's training set (``trainer.gcn.evaluate_ranking``). The fit trains the published
configuration, LightGCN's own layer combination (mean over layers 0..K); the other two
combinations (the paper's mean over 1..K, the last layer alone: the paper's Table 3 question) are
read out of the same fit's layer outputs (``by_layer_combination``, ``"source": "same_fit"``), or
trained separately with ``--train-each``. The recipe (``trainer.gcn``): one propagation of the
whole graph per step, every training edge per step with uniform negatives, Adam with a cosine
learning-rate decay over the time budget. Prints progress to stderr, the JSON result last
(shared/BENCH_OUTPUT.md).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.common import emit, machine, say
from trainer.gcn import fit_gcn, read_user_lines
from trainer.gcn_model import LAYER_COMBINATIONS

PUBLISHED = {"recall@20": 0.1824, "ndcg@20": 0.1547}  # LightGCN reference, 3 layers (README)
TARGET = {"recall@20": 0.180, "ndcg@20": 0.152}
HEADLINE = "mean_0_to_K"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_gcn_quality",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gowalla"),
                        help="folder with train.txt and test.txt (user item item ... lines)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few epochs")
    parser.add_argument("--time-budget-min", type=float, default=40.0,
                        help="training wall-clock budget; the lr decays over it (default 40)")
    parser.add_argument("--epochs", type=int, default=100_000, help="cap on epochs")
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=1,
                        help="1: uniform negatives; m > 1: the best-scored of m (hard negatives)")
    parser.add_argument("--weighting", choices=("user", "edge"), default="user",
                        help="user: each user weighs the same (LightGCN's reference samplers)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=100, help="epochs between evaluations")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--train-each", action="store_true",
                        help="train one model per layer combination (3x the time)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train = read_user_lines(args.data / "train.txt")
    test = read_user_lines(args.data / "test.txt")
    say(f"{args.data.name}: {len(train)} train, {len(test)} test interactions")
    budget = None if args.quick else args.time_budget_min * 60
    epochs, every = (3, 1) if args.quick else (args.epochs, args.eval_every)
    combos = LAYER_COMBINATIONS if args.train_each else (HEADLINE,)
    fits = {}
    for combination in combos:
        say(f"training {combination} ({'quick' if args.quick else f'{budget} s budget'})")
        fits[combination] = fit_gcn(
            train, layers=args.layers, dim=args.dim, epochs=epochs, lr=args.lr,
            negatives=args.negatives, candidates=args.candidates, weighting=args.weighting,
            weight_decay=args.weight_decay,
            layer_combination=combination, time_budget_s=budget, seed=args.seed,
            eval_pairs=test, eval_every=every, progress=False,
            on_epoch=lambda row: say(str(row)) if "recall@20" in row else None)
    main_fit = fits[HEADLINE]
    metrics = main_fit.meta["metrics"]
    if args.train_each:
        by_combination = {c: fit.meta["by_layer_combination"][c] for c, fit in fits.items()}
        source = "trained_each"
    else:
        by_combination = main_fit.meta["by_layer_combination"]
        source = "same_fit"
    result = {
        "dataset": args.data.name, "layers": args.layers, "dim": args.dim,
        "layer_combination": HEADLINE,
        "recall@20": round(metrics["recall@20"], 5), "ndcg@20": round(metrics["ndcg@20"], 5),
        "epochs": main_fit.meta["epochs"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_seconds": metrics["seconds"],
        "curve": [{"epoch": r["epoch"], "seconds": r["seconds"],
                   "recall@20": round(r["recall@20"], 5), "ndcg@20": round(r["ndcg@20"], 5)}
                  for r in main_fit.meta["curve"] if "recall@20" in r],
        "by_layer_combination": {
            c: {k: round(v, 5) for k, v in m.items()} for c, m in by_combination.items()},
        "by_layer_combination_source": source,
        "published": PUBLISHED, "target": TARGET,
        "met_target": all(metrics[k] >= v for k, v in TARGET.items()),
        "recipe": {k: main_fit.meta[k] for k in (
            "lr", "negatives", "candidates", "weighting", "weight_decay", "batch_size",
            "final_lr_ratio", "time_budget_s")},
        "threads": args.threads, "quick": args.quick, "machine": machine(),
    }
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    result = run(build_parser().parse_args(argv))
    emit(result)
    return result


if __name__ == "__main__":
    main()
