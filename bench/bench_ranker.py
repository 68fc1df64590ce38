"""``make bench-ranker``: train real tiny and small rankers on synthetic taste data, then time them on CPU.

For each preset the three trainer stages run on synthetic data (``taste_examples``): instruction
tuning (``trainer.tune``), exit heads (``trainer.heads``), calibration in the serving dtype within an
AUC budget of 0.3 points (``trainer.calibrate``). The artifact is then served through the
``Scorer`` (``ranker_svc.scoring``, the serving path's model side) and timed, every ratio measured
side by side in one process (the two arms alternate, medians of several rounds), so load from other
jobs on the machine hits both arms alike:

- ``exit_speedup``: full prompts in batches of 32 (the paper's requests/s setting), calibrated policy
  over full depth; ``auc_full``/``auc_exit``/``auc_loss_points`` on held-out test examples.
- ``compaction_speedup``: batches of 32 with per-row compaction over the same batches exiting only
  once every row of the batch has settled (same answers, checked); 128 prompts, so the ratio is
  not decided by whether one particular batch happens to hold a slow row. Measured with a policy
  whose rows exit at mixed depths (the confidence threshold under which the timed prompts' mean
  exit layer is half the depth, ``bench.common.mixed_depth_policy``, as ``make bench-gpu`` does),
  and as ``compaction_speedup_calibrated`` with the calibrated one, which may exit every row at the
  same few layers (then there is little to compact).
- ``candidates50_over_one``: ranking 50 candidates for one user (one context pass, 50 suffixes)
  over scoring one full prompt (the mean of the same 50 prompts scored one at a time, so naive
  is 50x), at full depth (the context-sharing ratio), and ``candidates50_over_one_calibrated`` with
  the calibrated policy on both sides.
- ``gflops_achieved``: useful model FLOPs (linear layers 2 x params per token and layer, attention
  4 x d x keys, heads) of the calibrated throughput run over its wall time; ``gflops_matmul_peak``:
  a square matmul in the serving dtype on the same threads; ``utilisation`` = achieved / peak.
- ``collab_cost``: what collaborative soft tokens (``--collab-tokens full``) add per request: extra
  tokens, time with over without them on full prompts and on 50 candidates, the projector's share
  (``bench.collab_cost``).

Synthetic taste data: 8 taste groups with their own title words; a user's history and similar users
mostly hold items of the user's group, rated high, others rated low; a third of the titles carry a
"good" adjective (clicked 90%), a third a "bad" one (10%), the rest are clicked 80% when of the user's
group, else 20%. Histories vary in length (1..10 own items, 0..4 similar users), so short prompts
teach the title signal quickly and long ones are realistic; throughput is timed on full-length
contexts (10 own items, 4 similar users with 5 each: ~350 tokens).

    .venv/bin/python bench/bench_ranker.py                     # tiny and small; JSON on the last line
    .venv/bin/python bench/bench_ranker.py --presets tiny --threads 1 --workdir runs/bench-ranker
    .venv/bin/python bench/bench_ranker.py --presets smollm2 --threads 2   # after `trainer models install smollm2-135m`
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.collab_cost import measure_collab_cost  # noqa: E402
from bench.common import mixed_depth_policy, side_by_side  # noqa: E402
from exitrank.types import HistoryItem, NeighborContext, RankExample, UserContext  # noqa: E402
from ranker_svc.artifact import load_ranker  # noqa: E402
from ranker_svc.engine import predict_in_batches  # noqa: E402
from ranker_svc.exits import ExitPolicy  # noqa: E402
from ranker_svc.model import resolve_dtype  # noqa: E402
from ranker_svc.prompt import PromptConfig, encode_prompt  # noqa: E402
from ranker_svc.scoring import ScoreJob, Scorer  # noqa: E402
from trainer.calibrate import calibrate, exit_probabilities  # noqa: E402
from trainer.heads import fit_heads  # noqa: E402
from trainer.models import resolve_base_model  # noqa: E402
from trainer.stats import auc  # noqa: E402
from trainer.tune import instruction_tune  # noqa: E402

THEMES = [
    "dragon castle wizard sword elven quest rune throne crystal knight spell realm",
    "galaxy orbit rocket nebula planet starship comet alien lunar quasar cosmic voyager",
    "murder detective alibi witness heist shadow suspect verdict noir cartel ransom clue",
    "kiss wedding heart summer lovers promise moonlight bride passion letters rose vow",
    "kitchen recipe bread spice garden baking pasta flavor soup harvest feast grill",
    "football marathon champion stadium league goal racing team victory coach season trophy",
    "empire war ancient dynasty revolution pharaoh medieval colony treaty legion crown siege",
    "guitar jazz symphony melody rhythm piano opera chorus blues concert ballad drum",
]
GENERIC = ["Chronicles", "Stories", "Collection", "Guide", "Edition", "Tales", "Journal", "Saga"]
GOOD = ["Golden", "Classic", "Brilliant", "Deluxe"]
BAD = ["Broken", "Bootleg", "Dull", "Faded"]
PROMPT = PromptConfig(rating_style="stars", max_history=10, neighbor_history=5, num_neighbors=4)
VALID_EXAMPLES = 5000  # calibration: AUC differences of 0.3 points need a few thousand examples
TEST_EXAMPLES = 4000  # the test loss of a policy has its own noise: ~0.1 point at this size
# per preset: tuning examples, epochs, learning rate, bf16 autocast; exit-head examples and epochs (stage 2
# only runs forward passes through the frozen backbone, so the tiny heads see more data than the backbone)
PLANS = {
    "tiny": {"train": 1600, "epochs": 4, "lr": 3e-3, "amp": False, "head_train": 4000, "head_epochs": 10},
    # small: bf16 autocast where the CPU multiplies bf16 natively (amp None); forced (True) it ran bf16 through
    # PyTorch's reference GEMM on an AVX2-only CPU (~0.2 GFLOP/s) and its tuning had not ended after 55 minutes
    "small": {"train": 1200, "epochs": 3, "lr": 1e-3, "amp": None, "head_train": 1200, "head_epochs": 10},
    # the pretrained SmolLM2-135M (`trainer models install smollm2-135m`), LoRA, the dtype chosen by the
    # hardware (amp None); fewer examples everywhere: a 30-layer 576-wide model costs ~200x the tiny one
    "smollm2": {"train": 256, "epochs": 2, "lr": 3e-4, "amp": None, "head_train": 600, "head_epochs": 6,
                "base_model": "smollm2-135m", "valid": 1200, "test": 1000, "timed_prompts": 64, "rounds": 3},
}


def taste_examples(n: int, seed: int, *, full: bool = False, items: int = 600) -> list[RankExample]:
    """``n`` examples; ``full``: every user has 10 own items and 4 similar users with 5 each."""
    rng = random.Random(seed)
    catalog_rng = random.Random(1234)  # one catalog for every split
    catalog = []
    for j in range(items):
        group = catalog_rng.randrange(len(THEMES))
        a, b = catalog_rng.sample(THEMES[group].split(), 2)
        quality = catalog_rng.choice((-1, 0, 1))
        adjective = {1: catalog_rng.choice(GOOD) + " ", -1: catalog_rng.choice(BAD) + " ", 0: ""}[quality]
        catalog.append((f"i{j}", f"{adjective}{a.title()} {b.title()} {catalog_rng.choice(GENERIC)}", group, quality))
    by_group = [[c for c in catalog if c[2] == g] for g in range(len(THEMES))]

    def interactions(group: int, k: int) -> tuple[HistoryItem, ...]:
        out = []
        for t in range(k):
            item = rng.choice(by_group[group]) if rng.random() < 0.7 else rng.choice(catalog)
            mean = 4.4 if item[2] == group else 2.2
            out.append(HistoryItem(item[0], item[1], float(min(5, max(1, round(rng.gauss(mean, 0.8))))), t))
        return tuple(out)

    examples = []
    for u in range(n):
        group = rng.randrange(len(THEMES))
        own = 10 if full else rng.randint(1, 10)
        neighbors = 4 if full else rng.randint(0, 4)
        context = UserContext(
            user_id=f"u{seed}-{u}",
            history=interactions(group, own),
            neighbors=tuple(
                NeighborContext(f"v{seed}-{u}-{k}", 0.9 - 0.05 * k,
                                interactions(group if rng.random() < 0.8 else rng.randrange(len(THEMES)),
                                             5 if full else rng.randint(1, 5)))
                for k in range(neighbors)),
        )
        item = rng.choice(by_group[group]) if rng.random() < 0.5 else rng.choice(catalog)
        p = {1: 0.9, -1: 0.1}.get(item[3], 0.8 if item[2] == group else 0.2)
        examples.append(RankExample(context, item[0], item[1], int(rng.random() < p)))
    return examples


# --- timing ------------------------------------------------------------------------------------------


def matmul_gflops(dtype: torch.dtype, size: int = 1024, reps: int = 10) -> float:
    """Best-of-``reps`` GFLOP/s of a (size x size) @ (size x size) matmul in ``dtype``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def useful_flops(config, prompt_lengths: list[int], exit_layers: list[int]) -> float:
    """Model FLOPs of scoring prompts of these lengths to these depths (real tokens only, no padding).

    Per token and layer: 2 x the layer's linear parameters (q, k, v, o, gate, up, down) plus 4 x d x
    (keys attended, causal); the answer heads (2 x H x 2 per head) are negligible and ignored.
    """
    h, inter = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    linear = 2 * (h * heads * d * 2 + h * kv * d * 2 + 3 * h * inter)
    total = 0.0
    for length, layers in zip(prompt_lengths, exit_layers):
        attention = 4 * heads * d * length * (length + 1) / 2  # token t attends t + 1 keys
        total += layers * (linear * length + attention)
    return total


# --- one preset ----------------------------------------------------------------------------------------


def train_preset(preset: str, out: Path, *, seed: int, progress: bool, reuse: bool) -> dict:
    """The three trainer stages on synthetic taste data; returns their metrics and timings.

    ``reuse``: keep a backbone and heads already trained into ``out`` by the same plan (calibration
    always runs again).
    """
    plan = PLANS[preset]
    stamp = out / "plan.json"
    train = taste_examples(plan["train"], seed)
    valid = taste_examples(plan.get("valid", VALID_EXAMPLES), seed + 1)
    summary: dict = {"train_examples": len(train), "tune_epochs": plan["epochs"], "reused": False}
    if reuse and stamp.is_file() and json.loads(stamp.read_text()) == {**plan, "seed": seed}:
        summary.update(json.loads((out / "training.json").read_text()), reused=True)
    else:
        started = time.perf_counter()
        base_model = plan.get("base_model")
        tuned = instruction_tune(train, out_dir=out, preset=preset if base_model is None else "tiny",
                                 base_model=resolve_base_model(base_model) if base_model else None,
                                 epochs=plan["epochs"], lr=plan["lr"], batch_size=8 if base_model else 16, seed=seed,
                                 progress=progress, prompt=PROMPT, amp=plan["amp"])
        tuned_s = time.perf_counter() - started
        head_train = train if plan["head_train"] <= len(train) else taste_examples(plan["head_train"], seed + 5)
        heads = fit_heads(head_train, ranker_dir=out / "ranker", lambda0=3e-3, beta=0.1, epochs=plan["head_epochs"],
                          seed=seed, progress=progress)
        trained = {"tune_seconds": round(tuned_s, 1), "heads_seconds": round(heads["seconds"], 1),
                   "train_loss": tuned["train_loss"], "tune_tflops_achieved": tuned["tflops_achieved"],
                   "tune_loop_seconds": tuned["seconds"], "tune_dtype": tuned["dtype"],
                   "tune_pad_fraction": tuned["pad_fraction"]}
        (out / "training.json").write_text(json.dumps(trained))
        stamp.write_text(json.dumps({**plan, "seed": seed}))
        summary.update(trained)
    started = time.perf_counter()
    calibration = calibrate(valid, ranker_dir=out / "ranker", auc_budget_points=0.3, dtype="auto",
                            plot_path=out / "calibration.png")
    return {**summary, "calibration_seconds": round(time.perf_counter() - started, 1),
            "valid_examples": len(valid), "valid_auc_full": calibration["full_auc"],
            "valid_auc_exit": calibration["auc"], "valid_mean_exit_layer": calibration["mean_exit_layer"],
            "valid_loss_se_points": calibration["loss_se_points"], "margin_sigmas": calibration["margin_sigmas"],
            "calibration_dtype": calibration["dtype"]}


def measure_preset(ranker_dir: Path, *, seed: int, rounds: int, test_examples: int = TEST_EXAMPLES,
                   timed_prompts: int = 128) -> dict:
    """AUCs on test data and the side-by-side speed ratios of the served artifact."""
    loaded = load_ranker(ranker_dir, dtype=resolve_dtype("auto"))
    ranker = Scorer(loaded=loaded)
    model, policy = loaded.model, loaded.policy
    full_depth = ExitPolicy(disabled=True)
    test = taste_examples(test_examples, seed + 2)
    labels = [ex.label for ex in test]
    exit_scores = ranker.score_examples(test, policy, batch_size=32)
    full_scores = ranker.score_examples(test, full_depth, batch_size=32)
    auc_full, auc_exit = auc(labels, [d.ctr for d in full_scores]), auc(labels, [d.ctr for d in exit_scores])

    long = taste_examples(160, seed + 3, full=True)  # realistic full-length contexts for timing
    prompts = [encode_prompt(loaded.tokenizer, loaded.prompt.full_text(ex.context, ex.title), ranker.max_tokens)
               for ex in long[:timed_prompts]]
    exits_run = lambda: predict_in_batches(ranker.engine, prompts, policy, batch_size=32)  # noqa: E731
    full_run = lambda: predict_in_batches(ranker.engine, prompts, full_depth, batch_size=32)  # noqa: E731
    t_exit, t_full = side_by_side(exits_run, full_run, rounds=rounds)
    _, exit_layers = exits_run()

    # batches of 32: per-row compaction vs exiting only once every row of the batch has settled, with
    # the calibrated policy and with one whose rows exit at mixed depths (when the calibrated policy
    # exits every row at one layer, there is nothing to compact and both ways are the same computation)
    mixed = mixed_depth_policy(exit_probabilities(model, prompts, loaded.tokenizer.pad_token_id or 0),
                               model.answer_layers, model.num_layers / 2)
    compaction = {}
    for name, p in (("calibrated", policy), ("mixed_depths", mixed)):
        rows_run = lambda p=p: predict_in_batches(ranker.engine, prompts, p, batch_size=32)  # noqa: E731
        whole_run = lambda p=p: predict_in_batches(ranker.engine, prompts, p, batch_size=32, compaction=False)  # noqa: E731
        layers = rows_run()[1]
        assert layers.tolist() == whole_run()[1].tolist(), "compaction must not change the answers"
        t_rows, t_whole = side_by_side(rows_run, whole_run, rounds=rounds)
        compaction[name] = {"speedup": t_whole / t_rows, "exit_layer_std": float(layers.float().std()),
                            "exit_histogram": {str(int(k)): int(v) for k, v in zip(*layers.unique(return_counts=True))},
                            "mean_exit_layer": float(layers.float().mean()), "policy": p.to_json()}

    user, titles = long[150].context, [ex.title for ex in long[:50]]
    context_ids, suffix_ids = ranker.encode_job(ScoreJob(user, tuple(titles), policy))
    singles = [context_ids + s for s in suffix_ids]  # the same 50 candidates as full prompts
    ratios = {}
    for name, p in (("", full_depth), ("_calibrated", policy)):
        # one full prompt = the mean over the 50 candidates scored one at a time (the naive way)
        t50, t_naive = side_by_side(
            lambda p=p: ranker.engine.predict_shared([context_ids], suffix_ids, [0] * len(suffix_ids), p,
                                                     max_rows=ranker.batching.max_batch_rows),
            lambda p=p: [predict_in_batches(ranker.engine, [one], p, batch_size=1) for one in singles],
            rounds=max(2, rounds // 2))
        ratios[f"candidates50_over_one{name}"] = t50 / (t_naive / len(singles))

    flops = useful_flops(model.causal_lm.config, [len(p) for p in prompts], exit_layers.tolist())
    dtype = model.causal_lm.dtype
    peak = matmul_gflops(dtype)
    achieved = flops / t_exit / 1e9
    return {
        "layers": model.num_layers, "exit_layers": list(model.exit_layers), "policy": policy.to_json(),
        "dtype": str(dtype).removeprefix("torch."),
        "auc_full": auc_full, "auc_exit": auc_exit, "auc_loss_points": 100 * (auc_full - auc_exit),
        "mean_exit_layer": sum(d.exit_layer for d in exit_scores) / len(exit_scores),
        "mean_exit_layer_timed": float(exit_layers.float().mean()),
        "exit_speedup": t_full / t_exit, "requests_per_s_exit": len(prompts) / t_exit,
        "requests_per_s_full": len(prompts) / t_full,
        "compaction_speedup": compaction["mixed_depths"]["speedup"],
        "compaction_speedup_calibrated": compaction["calibrated"]["speedup"], "compaction": compaction,
        **ratios,
        "gflops_achieved": achieved, "gflops_matmul_peak": peak, "utilisation": achieved / peak,
        "prompt_tokens_mean": statistics.mean(len(p) for p in prompts),
        "context_tokens": len(context_ids), "suffix_tokens_mean": statistics.mean(len(s) for s in suffix_ids),
    }


def targets(presets: dict) -> dict:
    """Each of the issue's targets, per preset, and whether this run met it."""
    out = {}
    for name, p in presets.items():
        out[name] = {"exit_speedup>=2.0": p["exit_speedup"] >= 2.0,
                     "auc_loss_points<=0.3": p["auc_loss_points"] <= 0.3,
                     "compaction_speedup>=1.5": p["compaction_speedup"] >= 1.5,
                     "candidates50_over_one<=4": p["candidates50_over_one"] <= 4.0}
        if name == "smollm2":
            out[name]["utilisation>=0.4"] = p["utilisation"] >= 0.4
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "smollm2"], choices=sorted(PLANS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared: 1 is steadier)")
    parser.add_argument("--workdir", type=Path, help="where artifacts go (default: a temporary directory)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per ratio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse models trained into --workdir by the same plan")
    parser.add_argument("--no-collab", action="store_true", help="skip the soft-token cost (bench.collab_cost)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ranker-"))
    started = time.perf_counter()
    presets = {}
    for preset in args.presets:
        out = workdir / preset
        training = train_preset(preset, out, seed=args.seed, progress=args.progress, reuse=args.reuse)
        print(f"{preset}: trained {json.dumps(training)}", file=sys.stderr, flush=True)
        plan = PLANS[preset]
        measured = measure_preset(out / "ranker", seed=args.seed, rounds=plan.get("rounds", args.rounds),
                                  test_examples=plan.get("test", TEST_EXAMPLES),
                                  timed_prompts=plan.get("timed_prompts", 128))
        presets[preset] = {**measured, "training": training,
                           **{k: training[k] for k in ("tune_tflops_achieved", "tune_seconds") if k in training}}
        if not args.no_collab and "base_model" not in plan:  # the soft-token cost is measured on the presets
            presets[preset]["collab_cost"] = measure_collab_cost(
                preset, out / "collab", examples=taste_examples, prompt=PROMPT, seed=args.seed, rounds=args.rounds)
        print(f"{preset}: {json.dumps(presets[preset])}", file=sys.stderr, flush=True)
    result = {"presets": presets, "targets": targets(presets),
              "machine": {"cores": os.cpu_count(), "torch_threads": args.threads,
                          "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__},
              "wall_seconds": round(time.perf_counter() - started, 1), "workdir": str(workdir)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
