"""Exit policies of Dynamic Predictive Exiting (paper section 5.3) and depth-aware head learning rates (5.2).

One function, :func:`exit_step`, decides which rows of a batch stop at an exit layer, and one driver,
:func:`run_exits`, walks a batch through the answering layers, records each row's answer where it
settles and drops it from the batch (per-row compaction). Every runtime plugs into the driver as an
:class:`ExitRunner`: the torch layer loop over full prompts or over suffixes of a cached context
(``ranker_svc.model``), the ONNX segments (``ranker_svc.onnx_engine``) and the calibration replay of
precomputed probabilities (:func:`simulate_exits`). So a policy calibrated offline behaves
identically online, whatever the engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import Tensor

from ranker_svc.errors import InvalidArgument

CRITERIA = ("probability_delta", "confidence")
MAX_WINDOW = 16


@dataclass(frozen=True, slots=True)
class ExitPolicy:
    r"""When a row's Yes/No answer counts as settled.

    ``probability_delta`` (the paper's probability-based method). With :math:`P_\ell` the
    probability of "Yes" from the head at exit layer :math:`\ell` and :math:`\ell'` the previous exit
    layer, the discrepancy is

    .. math::  D_\ell = |P_\ell(\text{yes}) - P_{\ell'}(\text{yes})|

    and a row exits at :math:`\ell` when

    .. math::  \bigl|D_\ell - \overline{D^m_{\ell-1}}\bigr| < \tau, \qquad
               \overline{D^m_{\ell-1}} = \tfrac{1}{|W|}\sum_{i \in W} D_i

    where :math:`W` holds the (up to) ``m`` discrepancies before :math:`D_\ell`. Fewer than ``m``
    previous discrepancies: the mean is over those that exist; none (the first two exit layers,
    where :math:`D_\ell` is the first discrepancy or does not exist): the row cannot exit. So the
    earliest possible exit is the third exit layer. Because the softmax is two-way,
    :math:`|\Delta P(\text{yes})| = |\Delta P(\text{no})|`; using "Yes" loses nothing.

    ``confidence``: exit when :math:`\max(P_\ell(\text{yes}), P_\ell(\text{no})) \ge \tau`.

    ``confidence`` (the field, beyond the paper): a row also exits, under either criterion, at an
    exit layer where :math:`\max(P_\ell(\text{yes}), P_\ell(\text{no})) \ge c`. With the delta
    criterion this lets a head that is already sure answer before the window of discrepancies
    exists (the delta test cannot fire before the third exit layer), while rows still in doubt
    wait for the trend to settle. 0 turns it off (the paper's criterion alone).

    Args:
        criterion: ``"probability_delta"`` (default) or ``"confidence"``.
        threshold: :math:`\tau` in (0, 1] (default 0.05).
        window: :math:`m` in 1..16 (default 2).
        min_layer: no exit before this 1-based decoder layer; 0 means no minimum. Discrepancies
            are still recorded below it, so the window is full when exits become allowed.
        disabled: never exit early; every row runs the full depth.
        confidence: :math:`c`, 0 (off) or in (0.5, 1]: also exit where the head is this sure.

    Raises:
        InvalidArgument: naming ``exit_policy.<field>`` when a field is out of range.
    """

    criterion: str = "probability_delta"
    threshold: float = 0.05
    window: int = 2
    min_layer: int = 0
    disabled: bool = False
    confidence: float = 0.0

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise InvalidArgument(
                "exit_policy.criterion", f"must be one of {', '.join(CRITERIA)}, got {self.criterion!r}"
            )
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise InvalidArgument("exit_policy.threshold", f"must be a finite number, got {self.threshold!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise InvalidArgument("exit_policy.threshold", f"must be in (0, 1], got {self.threshold}")
        if not 1 <= self.window <= MAX_WINDOW:
            raise InvalidArgument("exit_policy.window", f"must be in 1..{MAX_WINDOW}, got {self.window}")
        if self.min_layer < 0:
            raise InvalidArgument("exit_policy.min_layer", f"must be >= 0 (0: no minimum), got {self.min_layer}")
        c = self.confidence
        if not (isinstance(c, (int, float)) and math.isfinite(c) and (c == 0 or 0.5 < c <= 1.0)):
            raise InvalidArgument("exit_policy.confidence", f"must be 0 (off) or in (0.5, 1], got {c!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict) -> "ExitPolicy":
        known = {k: row[k] for k in ("criterion", "threshold", "window", "min_layer", "disabled", "confidence")
                 if k in row}
        return cls(**known)


@dataclass(slots=True)
class ExitState:
    """Per-row criterion state, compacted together with the batch.

    Attributes:
        prev_yes: (B,) P(yes) at the previous exit layer, or None before the first exit layer.
        deltas: (B, k) the last k <= m discrepancies D, oldest first (k is the same for all rows,
            since every live row has passed the same exit layers).
    """

    prev_yes: Tensor | None
    deltas: Tensor

    @classmethod
    def initial(cls, batch_size: int, device: torch.device | str = "cpu") -> "ExitState":
        return cls(prev_yes=None, deltas=torch.zeros(batch_size, 0, device=device))

    def select(self, keep: Tensor) -> "ExitState":
        """The state of the rows ``keep`` (an index or boolean tensor over B)."""
        prev = None if self.prev_yes is None else self.prev_yes[keep]
        return ExitState(prev_yes=prev, deltas=self.deltas[keep])


def exit_step(policy: ExitPolicy, state: ExitState, p_yes: Tensor, layer: int) -> tuple[Tensor, ExitState]:
    """Which rows exit at 1-based decoder ``layer`` given their head's P(yes), and the next state.

    Args:
        policy: the exit policy.
        state: the rows' state before this layer.
        p_yes: (B,) float P(yes) of this layer's head.
        layer: the 1-based decoder layer of the head.

    Returns:
        ``(exit_mask (B,) bool, new_state)``; ``new_state`` covers all B rows (the caller compacts).
    """
    p_yes = p_yes.float()
    sure = torch.maximum(p_yes, 1.0 - p_yes)  # (B,) max(P(yes), P(no))
    # (B,) True where the criterion holds
    if policy.criterion == "confidence":
        settled = sure >= policy.threshold
        new_state = state
    else:
        settled, new_state = _delta_step(policy, state, p_yes)
    if policy.confidence:
        settled = settled | (sure >= policy.confidence)
    if policy.disabled or layer < policy.min_layer:
        settled = torch.zeros_like(settled)
    return settled, new_state


def _delta_step(policy: ExitPolicy, state: ExitState, p_yes: Tensor) -> tuple[Tensor, ExitState]:
    if state.prev_yes is None:  # first exit layer: no discrepancy yet
        return torch.zeros_like(p_yes, dtype=torch.bool), ExitState(p_yes, state.deltas)
    d = (p_yes - state.prev_yes).abs()  # (B,) D_l
    if state.deltas.shape[1] == 0:  # no previous D to compare with
        settled = torch.zeros_like(p_yes, dtype=torch.bool)
    else:
        settled = (d - state.deltas.mean(dim=1)).abs() < policy.threshold
    deltas = torch.cat([state.deltas, d[:, None]], dim=1)[:, -policy.window :]  # (B, <=m)
    return settled, ExitState(p_yes, deltas)


class ExitRunner(Protocol):
    """A batch being pushed through the decoder, as :func:`run_exits` drives it."""

    def answer(self, layer: int) -> Tensor:
        """Advances the live rows to 1-based ``layer`` (increasing between calls); (b,) P(yes) of its head."""

    def keep(self, rows: Tensor) -> None:
        """Drops the live rows where the (b,) bool ``rows`` is False (the batch is compacted)."""


def needs_head(policy: ExitPolicy, layer: int) -> bool:
    """Whether the head at ``layer`` must run: the delta criterion needs every P_l for its D's."""
    if policy.disabled:
        return False
    return policy.criterion == "probability_delta" or layer >= policy.min_layer


def run_exits(
    runner: ExitRunner, *, batch_size: int, answer_layers: Sequence[int], policy: ExitPolicy,
    compaction: bool = True,
) -> tuple[Tensor, Tensor]:
    """CTR and exit layer of each row, asking ``runner`` for P(yes) at each answering layer.

    Args:
        runner: the batch (``batch_size`` rows at the start).
        answer_layers: the 1-based exit layers, then the model's depth N (which answers every row left).
        policy: the exit policy.
        compaction: True: settled rows leave the batch at once (per-row exit). False: every row keeps
            running until all rows of the batch have settled (whole-batch exit, the usual baseline);
            the answers are the same, only the work differs.

    Returns:
        ``(ctr (B,) float32, exit_layer (B,) long)`` in the runner's row order.
    """
    depth = answer_layers[-1]
    ctr = torch.zeros(batch_size, dtype=torch.float32)
    exit_layer = torch.full((batch_size,), depth, dtype=torch.long)
    rows = torch.arange(batch_size)  # original index of each live row
    settled_before = torch.zeros(batch_size, dtype=torch.bool)  # whole-batch mode only
    state = ExitState.initial(batch_size)
    for layer in answer_layers[:-1]:
        if not needs_head(policy, layer):
            continue
        p_yes = runner.answer(layer).float().cpu()  # (b,)
        settled, state = exit_step(policy, state, p_yes, layer)
        if not compaction:
            newly = settled & ~settled_before
            ctr[newly], exit_layer[newly] = p_yes[newly], layer
            settled_before |= settled
            if bool(settled_before.all()):
                return ctr, exit_layer
            continue
        if bool(settled.any()):
            ctr[rows[settled]], exit_layer[rows[settled]] = p_yes[settled], layer
            keep = ~settled
            rows, state = rows[keep], state.select(keep)
            if rows.numel() == 0:
                return ctr, exit_layer
            runner.keep(keep)
    p_yes = runner.answer(depth).float().cpu()
    if compaction:
        ctr[rows] = p_yes
    else:
        ctr[~settled_before] = p_yes[~settled_before]
    return ctr, exit_layer


class _Replay:
    """An :class:`ExitRunner` over precomputed (N, E) probabilities (calibration, analysis)."""

    def __init__(self, p_yes: Tensor, answer_layers: Sequence[int]) -> None:
        self.p_yes = p_yes
        self.column = {layer: i for i, layer in enumerate(answer_layers)}
        self.rows = torch.arange(p_yes.shape[0])

    def answer(self, layer: int) -> Tensor:
        return self.p_yes[self.rows, self.column[layer]]

    def keep(self, rows: Tensor) -> None:
        self.rows = self.rows[rows]


def simulate_exits(
    p_yes: Tensor, answer_layers: Sequence[int], policy: ExitPolicy
) -> tuple[Tensor, Tensor]:
    """Replay ``policy`` on precomputed probabilities of every head (calibration, analysis).

    Args:
        p_yes: (N, E) P(yes) of each answering layer's head, shallow to deep; the last column is the
            model's final layer, which answers every row that has not exited before.
        answer_layers: the E 1-based decoder layers of those columns (increasing, last = depth).
        policy: the policy to replay.

    Returns:
        ``(ctr (N,), exit_layer (N,) long)``, equal to what ``ranker_svc.runners.predict`` returns: both
        run :func:`run_exits`.
    """
    n, e = p_yes.shape
    assert e == len(answer_layers), "one column per answering layer"
    return run_exits(_Replay(p_yes.float().cpu(), answer_layers), batch_size=n, answer_layers=answer_layers,
                     policy=policy)


def depth_learning_rates(lambda0: float, beta: float, depths: Sequence[int]) -> list[float]:
    r"""Learning rate of each exit head by its depth (paper section 5.2).

    .. math::  \lambda_n = \lambda_0 \cdot e^{-\beta d_n}

    Shallow heads (small :math:`d_n`, the 1-based decoder layer) get larger steps: their hidden
    states are furthest from the final ones, so their heads have the most to learn.

    Raises:
        InvalidArgument: ``lambda0`` not positive or ``beta`` negative.
    """
    if not lambda0 > 0:
        raise InvalidArgument("lambda0", f"must be > 0, got {lambda0}")
    if not beta >= 0:
        raise InvalidArgument("beta", f"must be >= 0, got {beta}")
    return [lambda0 * math.exp(-beta * d) for d in depths]
