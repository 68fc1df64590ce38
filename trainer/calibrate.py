r"""Stage 3: pick the exit policy (paper section 5.3) on validation data and store it in the artifact.

Every head's P(yes) is computed once per validation example; each candidate policy (the paper's
probability-delta criterion over thresholds :math:`\tau` and windows :math:`m`, and the confidence
criterion over thresholds and minimum layers) is then replayed with ``ranker_svc.exits.simulate_exits``, the same
``exit_step`` serving runs. The chosen policy has the lowest mean exit layer among those whose AUC
is at most ``auc_budget_points`` AUC points (1 point = 0.01) below the full-depth model; the full
model itself (exits disabled) is always a candidate. Beyond the paper, the delta policies are also
swept with a confidence exit beside them (``ExitPolicy.confidence``): a head that is already sure
answers before the delta test can fire (never before the third exit layer). The AUC-versus-mean-depth curve goes to a PNG.

The budget must hold on data calibration never saw, and the validation AUC of the best of a
hundred policies flatters it (the winner's curse). So a policy qualifies only when its loss plus
``margin_sigmas`` standard errors stays within the budget,

.. math::  (\mathrm{AUC}_{full} - \mathrm{AUC}_\pi) + z \cdot \mathrm{se}(\mathrm{AUC}_{full} - \mathrm{AUC}_\pi) \le b

with the standard error of the paired difference by DeLong's method (``trainer.stats``): policies
that agree with the full model on most rows have a small one, so the margin costs little depth.

Calibration runs in the dtype the model will serve in (``dtype``, default ``auto`` like
``ranker-svc``: bfloat16 on CPUs with AMX/AVX512-BF16 and on CUDA): exit decisions hinge on small
differences between heads' probabilities, which bfloat16 shifts. The dtype is stored with the
policy (``policy_dtype``) and ``load_ranker`` serves in it by default.

    .venv/bin/python -m trainer calibrate --data data/synth --out artifacts --auc-budget 0.3
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from exitrank.types import RankExample
from ranker_svc.artifact import load_ranker, read_meta, stamp_version, write_meta
from ranker_svc.exits import MAX_WINDOW, ExitPolicy, simulate_exits
from ranker_svc.model import EarlyExitLM, resolve_dtype
from trainer.heads import exit_states
from trainer.stats import auc, paired_auc_difference
from trainer.tune import encode_examples

DELTA_THRESHOLDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
CONFIDENCE_THRESHOLDS = (0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
# the delta criterion with a confidence exit beside it (``ExitPolicy.confidence``): only high values, a head
# that sure answering before the delta window exists
HYBRID_CONFIDENCES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@dataclass(frozen=True, slots=True)
class PolicyPoint:
    """One replayed policy: its AUC, mean exit layer and the standard error of its AUC loss
    against the full model (paired, same validation set)."""

    policy: ExitPolicy
    auc: float
    mean_exit_layer: float
    loss_se: float = 0.0

    def to_json(self) -> dict:
        return {"policy": self.policy.to_json(), "auc": self.auc, "mean_exit_layer": self.mean_exit_layer,
                "loss_se": self.loss_se}


def exit_probabilities(model: EarlyExitLM, ids: list[list[int]], pad_id: int, *, batch_size: int = 32,
                       soft: torch.Tensor | None = None) -> torch.Tensor:
    """(N, E) P(yes) of every answering layer's head (bidimensional softmax), rows in input order."""
    states = exit_states(model, ids, pad_id, batch_size=batch_size, soft=soft)  # (N, E, H)
    with torch.no_grad():
        return model.answer_logits_from_states(states).float().softmax(-1)[..., 0]


def candidate_policies(num_exit_layers: int, exit_layers: Sequence[int] | None = None) -> list[ExitPolicy]:
    """Delta over (tau, m) with m up to the discrepancies that can precede the last head; confidence
    over tau and, given ``exit_layers``, a minimum layer (no minimum, or each exit layer but the first:
    the shallowest heads are the least reliable, and a confident but wrong head 1 would otherwise
    decide); and the delta ones again with a confidence exit beside them (``HYBRID_CONFIDENCES``, from
    the first or the second exit layer on)."""
    max_window = max(1, min(MAX_WINDOW, num_exit_layers - 2))
    delta = [ExitPolicy(criterion="probability_delta", threshold=t, window=m)
             for t in DELTA_THRESHOLDS for m in range(1, max_window + 1)]
    layers = list(exit_layers or [])
    minimums = [0, *layers[1:]]
    confidence = [ExitPolicy(criterion="confidence", threshold=t, min_layer=m)
                  for t in CONFIDENCE_THRESHOLDS for m in minimums]
    hybrid = [replace(d, confidence=c, min_layer=m)
              for d in delta for c in HYBRID_CONFIDENCES for m in [0, *layers[1:2]]]
    return [ExitPolicy(disabled=True), *delta, *confidence, *hybrid]


def sweep(p_yes: torch.Tensor, labels: list[int], answer_layers: tuple[int, ...], policies: list[ExitPolicy]) -> list[PolicyPoint]:
    """Replay each policy on the (N, E) head probabilities: AUC, mean depth, loss standard error."""
    full = p_yes[:, -1].double().numpy()
    points = []
    for policy in policies:
        ctr, layers = simulate_exits(p_yes, answer_layers, policy)
        _, se = paired_auc_difference(labels, full, ctr.double().numpy())
        points.append(PolicyPoint(policy, auc(labels, ctr.tolist()), float(layers.float().mean()), se))
    return points


def choose(points: list[PolicyPoint], full_auc: float, budget: float, margin_sigmas: float = 0.0) -> PolicyPoint:
    """Lowest mean depth whose loss + ``margin_sigmas`` standard errors is within ``budget`` (ties:
    higher AUC); the full model always qualifies."""
    eligible = [p for p in points
                if p.policy.disabled or full_auc - p.auc + margin_sigmas * p.loss_se <= budget + 1e-12]
    return min(eligible, key=lambda p: (p.mean_exit_layer, -p.auc))


def calibrate(
    valid: list[RankExample],
    *,
    ranker_dir: Path,
    auc_budget_points: float = 0.3,
    margin_sigmas: float = 1.0,
    plot_path: Path | None = None,
    batch_size: int = 32,
    dtype: str = "auto",
    log=None,
) -> dict:
    """Sweeps policies on ``valid`` in the serving ``dtype``; stores the chosen one in ``exitrank.json``.

    ``margin_sigmas``: standard errors of the AUC loss that must fit in the budget beside the loss
    itself (0: the validation loss alone decides). ``log(message)``: a line once the heads have
    scored the examples and one once the sweep has chosen (None: silent).
    """
    started = time.perf_counter()
    labels = [ex.label for ex in valid]
    if len(set(labels)) != 2:
        raise ValueError("valid must hold both labels to compute AUC")
    torch_dtype = resolve_dtype(dtype)
    loaded = load_ranker(ranker_dir, dtype=torch_dtype)
    model = loaded.model
    max_tokens = int(getattr(model.causal_lm.config, "max_position_embeddings", 2048))
    table = model.soft_table()
    ids, _ = encode_examples(valid, loaded.prompt, loaded.tokenizer, max_tokens=max_tokens,
                             answer_ids=(model.yes_token_id, model.no_token_id), table=table)
    p_yes = exit_probabilities(model, ids, loaded.tokenizer.pad_token_id or 0, batch_size=batch_size,
                               soft=table.tensor() if table is not None else None)
    full_auc = auc(labels, p_yes[:, -1].tolist())
    if log is not None:
        log(f"calibrate: {len(valid)} valid examples scored at every exit head in {time.perf_counter() - started:.1f}s, "
            f"full-depth AUC {full_auc:.4f}")
    points = sweep(p_yes, labels, model.answer_layers, candidate_policies(len(model.exit_layers), model.exit_layers))
    best = choose(points, full_auc, auc_budget_points / 100.0, margin_sigmas)
    if log is not None:
        log(f"calibrate: {len(points)} policies replayed; chosen {best.policy} (AUC {best.auc:.4f}, "
            f"mean exit layer {best.mean_exit_layer:.2f} of {model.num_layers})")
    summary = {
        "policy": best.policy.to_json(),
        "full_auc": full_auc,
        "auc": best.auc,
        "mean_exit_layer": best.mean_exit_layer,
        "num_layers": model.num_layers,
        "layer_saving": 1.0 - best.mean_exit_layer / model.num_layers,
        "auc_budget_points": auc_budget_points,
        "margin_sigmas": margin_sigmas,
        "loss_se_points": 100 * best.loss_se,
        "head_auc": {str(layer): auc(labels, p_yes[:, i].tolist()) for i, layer in enumerate(model.answer_layers)},
        "valid_examples": len(valid),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "curve": [p.to_json() for p in points],
    }
    if plot_path is not None:
        plot_curve(points, best, full_auc, auc_budget_points / 100.0, model.num_layers, Path(plot_path))
        summary["plot"] = str(plot_path)
    meta = read_meta(ranker_dir)
    meta["policy"] = best.policy.to_json()
    meta["policy_dtype"] = summary["dtype"]
    meta.setdefault("metrics", {})["calibration"] = {k: v for k, v in summary.items() if k != "curve"}
    write_meta(ranker_dir, meta)
    summary["version"] = stamp_version(ranker_dir)["version"]
    return summary


def plot_curve(points: list[PolicyPoint], best: PolicyPoint, full_auc: float, budget: float, depth: int, path: Path) -> None:
    """AUC versus mean exit layer of every replayed policy, the budget line and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, marker, member in (
        ("probability delta", "o", lambda q: q.criterion == "probability_delta" and not q.confidence),
        ("confidence", "^", lambda q: q.criterion == "confidence"),
        ("delta + confidence exit", "x", lambda q: q.criterion == "probability_delta" and q.confidence),
    ):
        chosen = [p for p in points if member(p.policy) and not p.policy.disabled]
        ax.scatter([p.mean_exit_layer for p in chosen], [p.auc for p in chosen], marker=marker, alpha=0.5, label=label)
    ax.axhline(full_auc - budget, color="grey", linestyle="--", label="AUC budget")
    ax.scatter([depth], [full_auc], color="black", marker="s", label="full model")
    ax.scatter([best.mean_exit_layer], [best.auc], color="red", marker="*", s=200, label="chosen")
    ax.set_xlabel("mean exit layer")
    ax.set_ylabel("validation AUC")
    ax.set_title("Dynamic predictive exiting: AUC vs depth")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
