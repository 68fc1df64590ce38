"""Stage 1 -> 2 -> 3 (instruction tuning, exit heads, calibration) on synthetic title-driven examples."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exitrank.types import HistoryItem, NeighborContext, RankExample, UserContext
from ranker_svc.artifact import HEADS_FILE, META_FILE, load_ranker
from ranker_svc.exits import ExitPolicy, simulate_exits
from ranker_svc.scoring import Scorer
from trainer.calibrate import calibrate, choose, exit_probabilities, PolicyPoint
from trainer.heads import fit_heads
from trainer.stats import auc
from trainer.errors import TrainingFailed
from trainer.tune import encode_examples, instruction_tune

POSITIVE = ("sunny", "golden", "bright", "happy")
NEGATIVE = ("gloomy", "rusty", "dull", "broken")
NOUNS = ("garden", "river", "castle", "story", "journey", "forest", "city", "song")


def synth(n: int, seed: int, noise: float = 0.1) -> list[RankExample]:
    """Label 1 when the target title's adjective is positive, flipped with probability ``noise``."""
    rng = random.Random(seed)
    items = [(f"i-{a}-{b}", f"The {a} {b}") for a in POSITIVE + NEGATIVE for b in NOUNS]

    def history(k: int) -> tuple[HistoryItem, ...]:
        return tuple(HistoryItem(i, t, float(rng.randint(1, 5)), j) for j, (i, t) in enumerate(rng.sample(items, k)))

    out = []
    for u in range(n):
        ctx = UserContext(user_id=f"u{u}", history=history(2),
                          neighbors=tuple(NeighborContext(f"v{u}-{j}", 0.9, history(2)) for j in range(2)))
        item_id, title = rng.choice(items)
        label = int(title.split()[1] in POSITIVE) ^ int(rng.random() < noise)
        out.append(RankExample(context=ctx, item_id=item_id, title=title, label=label))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[list[RankExample], list[RankExample]]:
    examples = synth(240, seed=0)
    return examples[:160], examples[160:]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, data):
    """Runs the three stages once; returns (out_dir, tune metrics, heads metrics, calibration summary)."""
    train, valid = data
    out = tmp_path_factory.mktemp("artifacts")
    tuned = instruction_tune(train, out_dir=out, valid=valid, epochs=12, batch_size=16, progress=False)
    meta_after_tune = json.loads((out / "ranker" / META_FILE).read_text())
    heads = fit_heads(train, ranker_dir=out / "ranker", lambda0=1e-2, beta=0.1, epochs=8, progress=False)
    summary = calibrate(valid, ranker_dir=out / "ranker", plot_path=out / "curve.png", dtype="float32")
    return out, tuned, meta_after_tune, heads, summary


def test_instruction_tuning_learns_the_title_signal(pipeline):
    _, tuned, meta, _, _ = pipeline
    assert tuned["valid_auc"] > 0.75, tuned
    assert tuned["epoch_losses"][-1] < tuned["epoch_losses"][0]
    assert not tuned["lora"]
    assert meta["policy"]["disabled"] and not meta["heads_trained"]  # no early exit before calibration
    assert meta["exit_layers"] == [1, 2, 3, 4, 5]


def test_heads_train_with_depth_aware_rates(pipeline):
    out, _, _, heads, _ = pipeline
    rates = heads["learning_rates"]
    for layer, lr in rates.items():
        assert lr == pytest.approx(1e-2 * math.exp(-0.1 * int(layer)))
    for losses in heads["epoch_losses"].values():
        assert losses[-1] < losses[0]
    stored = load_file(str(out / "ranker" / HEADS_FILE))
    assert set(stored) == {f"{layer}.{part}.weight" for layer in range(1, 6) for part in ("norm", "proj")}
    assert stored["1.proj.weight"].shape[0] == 2  # trained over the vocabulary, stored as the answer rows
    assert heads["head_vocab"] == "full"
    assert json.loads((out / "ranker" / META_FILE).read_text())["heads_trained"]


def test_calibration_stores_a_policy_within_budget_and_plots(pipeline):
    out, _, _, _, summary = pipeline
    meta = json.loads((out / "ranker" / META_FILE).read_text())
    assert meta["policy"] == summary["policy"] and meta["version"] == summary["version"]
    assert summary["auc"] >= summary["full_auc"] - 0.003 - 1e-12
    assert summary["mean_exit_layer"] <= 6
    # the chosen point is the shallowest among all replayed policies whose loss plus its margin (margin_sigmas
    # standard errors) is within the budget: a shallower one within the budget on its loss alone may not qualify
    margin = summary["margin_sigmas"]
    loss_with_margin = summary["full_auc"] - summary["auc"] + margin * summary["loss_se_points"] / 100
    assert margin > 0 and loss_with_margin <= 0.003 + 1e-12
    within = [p for p in summary["curve"] if p["policy"]["disabled"]
              or summary["full_auc"] - p["auc"] + margin * p["loss_se"] <= 0.003 + 1e-12]
    assert summary["mean_exit_layer"] == min(p["mean_exit_layer"] for p in within)
    png = Path(summary["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_serving_path_matches_the_calibration_simulation(pipeline, data):
    out, _, _, _, summary = pipeline
    _, valid = data
    loaded = load_ranker(out / "ranker")
    assert loaded.policy == ExitPolicy.from_json(summary["policy"])
    ids, _ = encode_examples(valid, loaded.prompt, loaded.tokenizer, max_tokens=1024,
                             answer_ids=(loaded.model.yes_token_id, loaded.model.no_token_id))
    p_yes = exit_probabilities(loaded.model, ids, loaded.tokenizer.pad_token_id)
    ranker = Scorer(loaded=loaded)
    for policy in (loaded.policy, ExitPolicy(threshold=0.02, window=1), ExitPolicy(threshold=0.05, window=3),
                   ExitPolicy(criterion="confidence", threshold=0.9, min_layer=2)):
        sim_ctr, sim_layer = simulate_exits(p_yes, loaded.model.answer_layers, policy)
        served = ranker.score_examples(valid, policy, batch_size=7)
        assert [d.exit_layer for d in served] == sim_layer.tolist()
        assert [d.ctr for d in served] == pytest.approx(sim_ctr.tolist(), abs=1e-5)
    served = ranker.score_examples(valid)  # the stored policy
    labels = [ex.label for ex in valid]
    # scores agree to 1e-5, but rows with near-equal scores (same title) may swap order: AUC within 2e-3
    assert auc(labels, [d.ctr for d in served]) == pytest.approx(summary["auc"], abs=2e-3)
    assert sum(d.exit_layer for d in served) / len(served) == pytest.approx(summary["mean_exit_layer"])


def test_a_reloaded_artifact_scores_the_same(pipeline, data, tmp_path):
    out, _, _, _, _ = pipeline
    _, valid = data
    copy = tmp_path / "ranker"
    shutil.copytree(out / "ranker", copy)
    a = Scorer(loaded=load_ranker(out / "ranker")).score_examples(valid[:20])
    b = Scorer(loaded=load_ranker(copy)).score_examples(valid[:20])
    assert [d.exit_layer for d in a] == [d.exit_layer for d in b]
    assert [d.ctr for d in a] == pytest.approx([d.ctr for d in b], abs=1e-6)


def test_choose_prefers_shallow_policies_within_budget():
    full = PolicyPoint(ExitPolicy(disabled=True), 0.80, 6.0)
    shallow_bad = PolicyPoint(ExitPolicy(threshold=0.5), 0.70, 3.0)
    mid_ok = PolicyPoint(ExitPolicy(threshold=0.1), 0.798, 4.0)
    assert choose([full, shallow_bad, mid_ok], 0.80, 0.003) is mid_ok
    assert choose([full, shallow_bad], 0.80, 0.003) is full


def test_choose_keeps_a_margin_of_standard_errors():
    full = PolicyPoint(ExitPolicy(disabled=True), 0.80, 6.0)
    shaky = PolicyPoint(ExitPolicy(threshold=0.2), 0.798, 3.0, loss_se=0.002)  # 0.2 + 0.2 > 0.3
    steady = PolicyPoint(ExitPolicy(threshold=0.1), 0.798, 4.0, loss_se=0.0005)  # 0.2 + 0.05
    assert choose([full, shaky, steady], 0.80, 0.003) is shaky  # no margin: the loss alone
    assert choose([full, shaky, steady], 0.80, 0.003, margin_sigmas=1.0) is steady
    assert choose([full, shaky], 0.80, 0.003, margin_sigmas=1.0) is full


def test_lora_and_base_model_paths(pipeline, data, tmp_path):
    out, _, _, _, _ = pipeline
    train, valid = data
    # fine-tune the stage-1 checkpoint as a local base model, with LoRA adapters merged on save
    metrics = instruction_tune(train[:32], out_dir=tmp_path, valid=valid[:40], base_model=out / "ranker",
                               lora=True, epochs=1, progress=False)
    assert metrics["lora"] and 0.0 <= metrics["valid_auc"] <= 1.0
    weights = load_file(str(tmp_path / "ranker" / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    assert Scorer(loaded=load_ranker(tmp_path / "ranker")).score_examples(valid[:4])


def test_qwen2_stage_one_writes_a_loadable_artifact(data, tmp_path):
    train, _ = data
    metrics = instruction_tune(train[:24], out_dir=tmp_path, arch="qwen2", epochs=1, progress=False, amp=True)
    loaded = load_ranker(tmp_path / "ranker")
    assert loaded.meta["arch"] == "qwen2" and metrics["train_examples"] == 24 and math.isfinite(metrics["train_loss"])
    assert loaded.model.causal_lm.dtype is torch.float32  # autocast trains float32 weights
    decisions = Scorer(loaded=loaded).score_examples(train[:3])
    assert all(0.0 < d.ctr < 1.0 and d.exit_layer == 6 for d in decisions)


def test_answer_row_heads_and_calibration_in_the_serving_dtype(pipeline, data, tmp_path):
    out, _, _, _, _ = pipeline
    train, valid = data
    ranker_dir = tmp_path / "ranker"
    shutil.copytree(out / "ranker", ranker_dir)
    heads = fit_heads(train, ranker_dir=ranker_dir, lambda0=1e-2, beta=0.1, epochs=4, progress=False,
                      full_vocab=False, exit_layers=[2, 4])
    assert heads["head_vocab"] == "answer" and heads["exit_layers"] == [2, 4]
    for losses in heads["epoch_losses"].values():
        assert losses[-1] < losses[0]
    summary = calibrate(valid, ranker_dir=ranker_dir, dtype="bfloat16")
    meta = json.loads((ranker_dir / META_FILE).read_text())
    assert summary["dtype"] == meta["policy_dtype"] == "bfloat16"
    loaded = load_ranker(ranker_dir)  # serves in the calibration dtype by default
    assert loaded.model.causal_lm.dtype is torch.bfloat16 and loaded.model.exit_layers == (2, 4)
    decisions = Scorer(loaded=loaded).score_examples(valid)
    assert auc([ex.label for ex in valid], [d.ctr for d in decisions]) > 0.7


def test_confidence_policies_are_swept_with_a_minimum_layer():
    from trainer.calibrate import candidate_policies

    policies = candidate_policies(5, [1, 2, 3, 4, 5])
    confidence = {(p.threshold, p.min_layer) for p in policies if p.criterion == "confidence"}
    assert {(0.55, 0), (0.55, 2), (0.9, 5)} <= confidence and (0.55, 1) not in confidence
    assert sum(p.disabled for p in policies) == 1
    assert {p.window for p in policies if p.criterion == "probability_delta"} == {1, 2, 3}
    hybrid = {(p.confidence, p.min_layer) for p in policies if p.criterion == "probability_delta" and p.confidence}
    assert {(0.9, 0), (0.999, 2)} <= hybrid and not any(m > 2 for _, m in hybrid)


def test_a_collapsed_model_fails_and_leaves_no_artifact(data, tmp_path):
    """Prompts that carry no signal (every example the same text, labels half and half): the model can
    only learn the prior, scores everything alike, and the run fails without writing ranker/."""
    train, valid = data
    same = train[0]
    flat_train = [RankExample(same.context, same.item_id, same.title, n % 2) for n in range(32)]
    flat_valid = [RankExample(same.context, same.item_id, same.title, n % 2) for n in range(40)]
    with pytest.raises(TrainingFailed, match="alike"):
        instruction_tune(flat_train, out_dir=tmp_path, valid=flat_valid, epochs=1, progress=False)
    assert not (tmp_path / "ranker").exists() and not (tmp_path / ".ranker-staging").exists()


def test_keep_best_epoch_writes_the_epoch_validation_chose(data, tmp_path):
    train, valid = data
    metrics = instruction_tune(train, out_dir=tmp_path, valid=valid, epochs=6, batch_size=16, progress=False,
                               keep_best_epoch=True, allow_collapse=True)
    aucs = metrics["epoch_valid_aucs"]
    assert sorted(aucs, key=int) == ["2", "4", "6"]  # every ceil(6 / 4) = 2 epochs, and the last
    assert aucs[str(metrics["best_epoch"])] == max(aucs.values())
    # the written artifact, scored through the serving path, is the chosen epoch's model
    assert metrics["valid_auc"] == pytest.approx(aucs[str(metrics["best_epoch"])], abs=0.01)
