"""The exit criteria on hand-made probability sequences, and the depth-aware learning rates."""

from __future__ import annotations

import math

import pytest
import torch

from ranker_svc.errors import InvalidArgument
from ranker_svc.exits import ExitPolicy, ExitState, depth_learning_rates, exit_step, run_exits, simulate_exits

LAYERS = (1, 2, 3, 4, 5, 6)  # five exit heads + the final layer
# P(yes) per answering layer; D = .2, .1, .05, .01, .04
RISING = [0.5, 0.7, 0.8, 0.85, 0.86, 0.9]


def run(p: list[float], policy: ExitPolicy) -> tuple[float, int]:
    ctr, layer = simulate_exits(torch.tensor([p]), LAYERS, policy)
    return float(ctr[0]), int(layer[0])


def test_delta_window_one_exits_when_discrepancy_matches_the_previous_one():
    # layer 3: |.1 - .2| = .1 >= .06; layer 4: |.05 - .1| = .05 < .06 -> exit with P_4
    assert run(RISING, ExitPolicy(threshold=0.06, window=1)) == (pytest.approx(0.85), 4)


def test_delta_window_two_averages_previous_discrepancies():
    # layer 4: |.05 - mean(.2,.1)| = .1; layer 5: |.01 - mean(.1,.05)| = .065 -> no exit, final answers
    assert run(RISING, ExitPolicy(threshold=0.06, window=2)) == (pytest.approx(0.9), 6)
    # with tau .07, layer 5 qualifies
    assert run(RISING, ExitPolicy(threshold=0.07, window=2)) == (pytest.approx(0.86), 5)


def test_delta_partial_window_uses_the_discrepancies_that_exist():
    # m=3 at layer 3: only D_2=.2 precedes, |.1 - .2| = .1 < .11 -> exit
    assert run(RISING, ExitPolicy(threshold=0.11, window=3)) == (pytest.approx(0.8), 3)


def test_delta_never_exits_before_two_discrepancies():
    # tau = 1 accepts any discrepancy, yet the first two exit layers cannot exit
    assert run(RISING, ExitPolicy(threshold=1.0, window=1)) == (pytest.approx(0.8), 3)


def test_min_layer_delays_exit_but_keeps_the_window_filled():
    assert run(RISING, ExitPolicy(threshold=1.0, window=1, min_layer=5)) == (pytest.approx(0.86), 5)
    # min_layer beyond the last head: the final layer answers
    assert run(RISING, ExitPolicy(threshold=1.0, window=1, min_layer=6)) == (pytest.approx(0.9), 6)


def test_disabled_runs_to_the_last_layer():
    assert run(RISING, ExitPolicy(threshold=1.0, window=1, disabled=True)) == (pytest.approx(0.9), 6)
    assert run([0.999] * 6, ExitPolicy(criterion="confidence", threshold=0.5, disabled=True))[1] == 6


def test_confidence_uses_the_larger_of_yes_and_no():
    policy = ExitPolicy(criterion="confidence", threshold=0.9)
    assert run([0.6, 0.95, 0.99, 0.99, 0.99, 0.99], policy) == (pytest.approx(0.95), 2)
    assert run([0.5, 0.3, 0.05, 0.5, 0.5, 0.5], policy) == (pytest.approx(0.05), 3)
    assert run([0.5] * 6, policy) == (pytest.approx(0.5), 6)
    assert run([0.95] * 6, ExitPolicy(criterion="confidence", threshold=0.9, min_layer=4))[1] == 4


def test_confidence_exit_beside_the_delta_criterion():
    sure, unsure = [0.97, 0.98, 0.6, 0.9, 0.9, 0.9], RISING
    delta = ExitPolicy(threshold=0.06, window=1)
    # the paper's criterion alone: the sure row still waits for two discrepancies
    assert run(sure, delta)[1] >= 3
    both = ExitPolicy(threshold=0.06, window=1, confidence=0.95)
    assert run(sure, both) == (pytest.approx(0.97), 1)  # sure at the first head: answers there
    assert run(unsure, both) == run(unsure, delta) == (pytest.approx(0.85), 4)  # never sure: delta decides
    assert run([0.5, 0.04, 0.5, 0.5, 0.5, 0.5], both) == (pytest.approx(0.04), 2)  # sure of "No" counts too
    assert run(sure, ExitPolicy(threshold=0.06, window=1, confidence=0.95, min_layer=2))[1] == 2
    # in a batch, rows settle by whichever test fires first, each on its own
    ctr, layer = simulate_exits(torch.tensor([sure, unsure]), LAYERS, both)
    assert layer.tolist() == [1, 4] and ctr.tolist() == pytest.approx([0.97, 0.85])


def test_rows_are_independent_and_vectorised():
    rows = [RISING, [0.5] * 6, [0.1, 0.9, 0.1, 0.9, 0.1, 0.9], [0.2, 0.25, 0.3, 0.35, 0.4, 0.45]]
    for policy in (ExitPolicy(threshold=0.06, window=1), ExitPolicy(threshold=0.02, window=2),
                   ExitPolicy(criterion="confidence", threshold=0.85)):
        ctr, layer = simulate_exits(torch.tensor(rows), LAYERS, policy)
        for i, row in enumerate(rows):
            assert (float(ctr[i]), int(layer[i])) == pytest.approx(run(row, policy))
    # constant probabilities: D = 0 twice -> exit at the third head
    assert run([0.5] * 6, ExitPolicy(threshold=0.01, window=2))[1] == 3
    # oscillating: D = .8 always -> |D - mean| = 0 -> also settled at the third head (the trend holds)
    assert run([0.1, 0.9, 0.1, 0.9, 0.1, 0.9], ExitPolicy(threshold=0.01, window=2))[1] == 3


def test_state_compaction_follows_the_rows():
    policy = ExitPolicy(threshold=0.05, window=2)
    state = ExitState.initial(3)
    _, state = exit_step(policy, state, torch.tensor([0.1, 0.5, 0.9]), 1)
    _, state = exit_step(policy, state, torch.tensor([0.2, 0.5, 0.6]), 2)
    kept = state.select(torch.tensor([True, False, True]))
    assert kept.prev_yes.tolist() == pytest.approx([0.2, 0.6])
    assert kept.deltas[:, -1].tolist() == pytest.approx([0.1, 0.3])
    settled, after = exit_step(policy, kept, torch.tensor([0.3, 0.5]), 3)
    assert settled.tolist() == [True, False]  # row 0: |.1 - .1| = 0; row 2: |.1 - .3| = .2
    assert after.deltas.shape == (2, 2)


def test_window_keeps_only_m_discrepancies():
    policy = ExitPolicy(threshold=0.5, window=2)
    state = ExitState.initial(1)
    for layer, p in enumerate([0.1, 0.2, 0.4, 0.8, 0.9], start=1):
        _, state = exit_step(policy, state, torch.tensor([p]), layer)
    assert state.deltas.shape == (1, 2)
    assert state.deltas[0].tolist() == pytest.approx([0.4, 0.1])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"criterion": "entropy"}, "exit_policy.criterion"),
        ({"threshold": 0.0}, "exit_policy.threshold"),
        ({"threshold": 1.5}, "exit_policy.threshold"),
        ({"threshold": float("nan")}, "exit_policy.threshold"),
        ({"window": 0}, "exit_policy.window"),
        ({"window": 17}, "exit_policy.window"),
        ({"min_layer": -1}, "exit_policy.min_layer"),
        ({"confidence": 0.5}, "exit_policy.confidence"),
        ({"confidence": -0.1}, "exit_policy.confidence"),
        ({"confidence": 1.01}, "exit_policy.confidence"),
        ({"confidence": float("nan")}, "exit_policy.confidence"),
    ],
)
def test_policy_validation_names_the_field(kwargs, field):
    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")) as info:
        ExitPolicy(**kwargs)
    assert info.value.field == field


def test_policy_json_round_trip():
    policy = ExitPolicy(criterion="confidence", threshold=0.8, window=3, min_layer=2)
    assert ExitPolicy.from_json(policy.to_json()) == policy
    hybrid = ExitPolicy(threshold=0.05, window=2, confidence=0.97)
    assert ExitPolicy.from_json(hybrid.to_json()) == hybrid
    assert ExitPolicy.from_json({"threshold": 0.05}).confidence == 0.0  # policies stored before the field


def test_depth_learning_rates_follow_the_exponential_decay():
    rates = depth_learning_rates(1e-3, 0.1, [5, 10, 15])
    assert rates == pytest.approx([1e-3 * math.exp(-0.5), 1e-3 * math.exp(-1.0), 1e-3 * math.exp(-1.5)])
    assert rates[0] > rates[1] > rates[2]  # shallower heads learn faster
    assert depth_learning_rates(2e-3, 0.0, [1, 7]) == pytest.approx([2e-3, 2e-3])
    with pytest.raises(InvalidArgument, match="lambda0"):
        depth_learning_rates(0.0, 0.1, [1])
    with pytest.raises(InvalidArgument, match="beta"):
        depth_learning_rates(1e-3, -0.1, [1])


class CountingRunner:
    """A real ExitRunner over a fixed (B, E) probability table that counts the row-layers it runs."""

    def __init__(self, p_yes: torch.Tensor) -> None:
        self.p_yes = p_yes
        self.rows = torch.arange(p_yes.shape[0])
        self.done = 0
        self.row_layers = 0  # rows x layers pushed through "the model"
        self.calls: list[int] = []

    def answer(self, layer: int) -> torch.Tensor:
        self.row_layers += len(self.rows) * (layer - self.done)
        self.done = layer
        self.calls.append(layer)
        return self.p_yes[self.rows, LAYERS.index(layer)]

    def keep(self, rows: torch.Tensor) -> None:
        self.rows = self.rows[rows]


def test_per_row_compaction_and_whole_batch_exit_answer_alike_but_work_differently():
    # rows 0-2 settle at the third head (D = .1, .1), row 3 never does (D = 0, .2, 0, .25)
    flat = [0.5, 0.6, 0.7, 0.8, 0.9, 0.9]
    swing = [0.5, 0.5, 0.7, 0.7, 0.95, 0.95]
    table = torch.tensor([flat, flat, flat, swing])
    policy = ExitPolicy(threshold=0.05, window=1)
    per_row, whole = CountingRunner(table), CountingRunner(table)
    a = run_exits(per_row, batch_size=4, answer_layers=LAYERS, policy=policy)
    b = run_exits(whole, batch_size=4, answer_layers=LAYERS, policy=policy, compaction=False)
    assert a[1].tolist() == b[1].tolist() == [3, 3, 3, 6]
    torch.testing.assert_close(a[0], b[0])
    assert per_row.row_layers == 4 * 3 + 1 * 3  # three rows leave at layer 3
    assert whole.row_layers == 4 * 6  # one unsettled row keeps the whole batch to the end
    # a batch where every row settles stops early in both modes
    done = CountingRunner(table[:3])
    run_exits(done, batch_size=3, answer_layers=LAYERS, policy=policy, compaction=False)
    assert done.row_layers == 3 * 3 and done.calls[-1] == 3


def test_heads_are_only_asked_for_where_the_policy_needs_them():
    table = torch.tensor([RISING])
    confidence = CountingRunner(table)
    run_exits(confidence, batch_size=1, answer_layers=LAYERS, policy=ExitPolicy(criterion="confidence", threshold=0.99,
                                                                                min_layer=4))
    assert confidence.calls == [4, 5, 6]  # below min_layer a confidence head cannot matter
    disabled = CountingRunner(table)
    run_exits(disabled, batch_size=1, answer_layers=LAYERS, policy=ExitPolicy(disabled=True))
    assert disabled.calls == [6]
    delta = CountingRunner(table)
    run_exits(delta, batch_size=1, answer_layers=LAYERS, policy=ExitPolicy(threshold=0.01, min_layer=5))
    assert delta.calls == [1, 2, 3, 4, 5, 6]  # the delta criterion needs every P_l for its D's
