"""Exit policies of Dynamic Predictive Exiting (paper section 5.3) and depth-aware head learning rates (5.2).

One function, :func:`exit_step`, decides which rows of a batch stop at an exit layer. Serving
(``EarlyExitLM.predict``) calls it layer by layer on a compacting batch; calibration calls it through
:func:`simulate_exits` on probabilities computed once for every head. Both run the same code, so a
policy calibrated offline behaves identically online.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

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

    Args:
        criterion: ``"probability_delta"`` (default) or ``"confidence"``.
        threshold: :math:`\tau` in (0, 1] (default 0.05).
        window: :math:`m` in 1..16 (default 2).
        min_layer: no exit before this 1-based decoder layer; 0 means no minimum. Discrepancies
            are still recorded below it, so the window is full when exits become allowed.
        disabled: never exit early; every row runs the full depth.

    Raises:
        InvalidArgument: naming ``exit_policy.<field>`` when a field is out of range.
    """

    criterion: str = "probability_delta"
    threshold: float = 0.05
    window: int = 2
    min_layer: int = 0
    disabled: bool = False

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

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict) -> "ExitPolicy":
        known = {k: row[k] for k in ("criterion", "threshold", "window", "min_layer", "disabled") if k in row}
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
    # (B,) True where the criterion holds
    if policy.criterion == "confidence":
        settled = torch.maximum(p_yes, 1.0 - p_yes) >= policy.threshold
        new_state = state
    else:
        settled, new_state = _delta_step(policy, state, p_yes)
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
        ``(ctr (N,), exit_layer (N,) long)``, equal to what ``EarlyExitLM.predict`` returns.
    """
    n, e = p_yes.shape
    assert e == len(answer_layers), "one column per answering layer"
    ctr = p_yes[:, -1].float().clone()
    exit_layer = torch.full((n,), answer_layers[-1], dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    state = ExitState.initial(n)
    for col, layer in enumerate(answer_layers[:-1]):
        settled, state = exit_step(policy, state, p_yes[:, col], layer)
        newly = settled & alive
        ctr[newly] = p_yes[newly, col].float()
        exit_layer[newly] = layer
        alive &= ~settled
    return ctr, exit_layer


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
