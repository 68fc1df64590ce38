"""EarlyExitLM on small real Llama, Qwen2 and Mistral configs (fp32, exactness)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from ranker_svc.exits import ExitPolicy, simulate_exits
from ranker_svc.model import EarlyExitLM, ExitHead, default_exit_layers, resolve_dtype
from ranker_svc.runners import predict

VOCAB, YES, NO = 500, 7, 11
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    # two full-attention then two sliding-window layers (window 8 < sequence length): per-layer masks
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=2),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8),
}


def make_lm(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # spread the random Yes/No probabilities
    return model


def right_padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_manual_layer_loop_reproduces_the_model(arch):
    causal_lm = make_lm(arch)
    model = EarlyExitLM(causal_lm=causal_lm, yes_token_id=YES, no_token_id=NO, exit_layers=[1, 2, 3])
    lengths = [20, 13, 5]
    ids, mask = right_padded_batch(lengths)
    states = model.exit_hidden_states(ids, mask)  # (B, 4, H)
    logits = model.forward_all_exits(ids, mask)  # (B, 4, 2)
    for row, n in enumerate(lengths):
        with torch.no_grad():
            out = causal_lm(ids[row : row + 1, :n], output_hidden_states=True)
        for col, layer in enumerate((1, 2, 3)):
            torch.testing.assert_close(states[row, col], out.hidden_states[layer][0, -1], atol=1e-5, rtol=1e-5)
        # transformers' last hidden state is after the final norm
        torch.testing.assert_close(causal_lm.base_model.norm(states[row, 3]), out.hidden_states[4][0, -1],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[row, 3], out.logits[0, -1, [YES, NO]], atol=1e-4, rtol=1e-5)


def test_answer_rows_equal_the_full_vocabulary_bidimensional_softmax():
    causal_lm = make_lm("llama")
    head = ExitHead.from_final(causal_lm)
    with torch.no_grad():
        head.proj.weight.add_(torch.randn_like(head.proj.weight))  # a head that differs from the final one
        hidden = torch.randn(6, 32)
        full = head(hidden)  # (6, V)
        two = head.answer_logits(hidden, torch.tensor([YES, NO]))  # (6, 2)
    torch.testing.assert_close(two, full[:, [YES, NO]])
    expected = full.softmax(-1)[:, YES] / (full.softmax(-1)[:, YES] + full.softmax(-1)[:, NO])
    torch.testing.assert_close(two.softmax(-1)[:, 0], expected, atol=1e-6, rtol=1e-5)


def test_heads_start_as_copies_of_the_final_head():
    causal_lm = make_lm("llama")
    model = EarlyExitLM(causal_lm=causal_lm, yes_token_id=YES, no_token_id=NO)
    head = model.heads["2"]
    torch.testing.assert_close(head.proj.weight, causal_lm.lm_head.weight)
    assert head.proj.weight.data_ptr() != causal_lm.lm_head.weight.data_ptr()  # a copy, trained separately


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_per_row_exit_in_a_batch_equals_each_row_alone(arch):
    model = EarlyExitLM(causal_lm=make_lm(arch), yes_token_id=YES, no_token_id=NO, exit_layers=[1, 2, 3])
    lengths = [18, 7, 12, 3, 15, 9, 11, 16]
    ids, mask = right_padded_batch(lengths, seed=3)
    p_yes = model.forward_all_exits(ids, mask).detach().softmax(-1)[..., 0]  # (B, 4)
    # tau at the median settling gap of the third head: about half the rows exit there, the rest go on
    d2, d3 = (p_yes[:, 1] - p_yes[:, 0]).abs(), (p_yes[:, 2] - p_yes[:, 1]).abs()
    policy = ExitPolicy(threshold=float((d3 - d2).abs().median()) + 1e-6, window=1)
    ctr, layer = predict(model, ids, mask, policy)
    assert 3 in layer.tolist() and 4 in layer.tolist(), "the batch must mix exits and full-depth rows"
    sim_ctr, sim_layer = simulate_exits(p_yes, model.answer_layers, policy)
    assert layer.tolist() == sim_layer.tolist()
    torch.testing.assert_close(ctr, sim_ctr, atol=1e-5, rtol=1e-5)
    for row, n in enumerate(lengths):
        alone_ctr, alone_layer = predict(model, ids[row : row + 1, :n], mask[row : row + 1, :n], policy)
        assert int(alone_layer[0]) == int(layer[row])
        assert float(alone_ctr[0]) == pytest.approx(float(ctr[row]), abs=1e-5)


def test_disabled_policy_answers_with_the_final_layer():
    causal_lm = make_lm("mistral")
    model = EarlyExitLM(causal_lm=causal_lm, yes_token_id=YES, no_token_id=NO)
    ids, mask = right_padded_batch([10, 4, 7])
    ctr, layer = predict(model, ids, mask, ExitPolicy(disabled=True))
    assert layer.tolist() == [4, 4, 4]
    final = model.forward_all_exits(ids, mask).softmax(-1)[:, -1, 0]
    torch.testing.assert_close(ctr, final)
    assert bool(((ctr > 0) & (ctr < 1)).all())


def test_bfloat16_scores_close_to_float32():
    causal_lm = make_lm("llama")
    model = EarlyExitLM(causal_lm=causal_lm, yes_token_id=YES, no_token_id=NO)
    ids, mask = right_padded_batch([12, 6])
    ctr32, _ = predict(model, ids, mask, ExitPolicy(disabled=True))
    model.to(torch.bfloat16)
    ctr16, layer = predict(model, ids, mask, ExitPolicy(disabled=True))
    assert ctr16.dtype == torch.float32 and layer.tolist() == [4, 4]
    torch.testing.assert_close(ctr16, ctr32, atol=0.08, rtol=0)


def test_exit_losses_train_only_the_heads_with_depth_aware_rates():
    causal_lm = make_lm("llama")
    model = EarlyExitLM(causal_lm=causal_lm, yes_token_id=YES, no_token_id=NO, exit_layers=[1, 3])
    causal_lm.requires_grad_(False)
    ids, mask = right_padded_batch([9, 5])
    states = model.exit_hidden_states(ids, mask)
    losses = model.exit_losses(states, torch.tensor([YES, NO]))
    assert losses.shape == (2,) and bool((losses > 0).all())
    losses.sum().backward()
    assert model.heads["1"].proj.weight.grad is not None
    assert causal_lm.lm_head.weight.grad is None
    optimizer = model.configure_head_optimizer(lambda0=1e-2, beta=0.5)
    assert [g["layer"] for g in optimizer.param_groups] == [1, 3]
    assert optimizer.param_groups[0]["lr"] > optimizer.param_groups[1]["lr"]


def test_default_exit_layers_match_the_paper_spacing():
    assert default_exit_layers(32) == [5, 10, 15, 20, 25, 30]
    assert default_exit_layers(6) == [1, 2, 3, 4, 5]
    assert default_exit_layers(4) == [1, 2, 3]


def test_invalid_inputs_are_refused():
    causal_lm = make_lm("llama")
    with pytest.raises(ValueError, match="exit_layers"):
        EarlyExitLM(causal_lm=causal_lm, yes_token_id=YES, no_token_id=NO, exit_layers=[4])
    with pytest.raises(ValueError, match="differ"):
        EarlyExitLM(causal_lm=causal_lm, yes_token_id=YES, no_token_id=YES)
    model = EarlyExitLM(causal_lm=causal_lm, yes_token_id=YES, no_token_id=NO)
    ids, mask = right_padded_batch([6, 6])
    mask[1, :2] = 0  # left padding
    with pytest.raises(ValueError, match="right"):
        predict(model, ids, mask, ExitPolicy())
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8")


def test_answer_row_heads_equal_full_heads_and_train_on_the_bidimensional_softmax():
    causal_lm = make_lm("qwen2")
    full = ExitHead.from_final(causal_lm)
    with torch.no_grad():
        full.proj.weight.add_(torch.randn_like(full.proj.weight))
    rows = full.answer_rows([YES, NO])
    direct = ExitHead.from_final(causal_lm, rows=[YES, NO])
    assert rows.proj.weight.shape == (2, 32) and direct.vocab_rows.tolist() == [YES, NO]
    hidden = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(rows.answer_logits(hidden, torch.tensor([YES, NO])), full(hidden)[:, [YES, NO]])
        torch.testing.assert_close(direct(hidden), causal_lm.lm_head(causal_lm.model.norm(hidden))[:, [YES, NO]])
    targets = torch.tensor([YES, NO, NO, YES, YES])
    two_way = torch.nn.functional.cross_entropy(full(hidden)[:, [YES, NO]], torch.tensor([0, 1, 1, 0, 0]))
    torch.testing.assert_close(rows.loss(hidden, targets), two_way)
    assert full.loss(hidden, targets).item() > two_way.item()  # the full softmax also spends mass elsewhere
    with pytest.raises(ValueError, match="answer ids"):
        EarlyExitLM(causal_lm=causal_lm, yes_token_id=NO, no_token_id=YES, exit_layers=[1],
                    heads=torch.nn.ModuleDict({"1": rows}))


def test_whole_batch_exit_gives_the_per_row_answers():
    model = EarlyExitLM(causal_lm=make_lm("llama"), yes_token_id=YES, no_token_id=NO, exit_layers=[1, 2, 3])
    ids, mask = right_padded_batch([14, 6, 9, 11, 3], seed=5)
    policy = ExitPolicy(criterion="confidence", threshold=0.8)
    per_row = predict(model, ids, mask, policy)
    whole = predict(model, ids, mask, policy, compaction=False)
    assert per_row[1].tolist() == whole[1].tolist() and len(set(per_row[1].tolist())) > 1
    torch.testing.assert_close(per_row[0], whole[0], atol=1e-5, rtol=0)
