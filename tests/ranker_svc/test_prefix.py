"""One context pass per request: cached-context suffix scoring equals scoring every full prompt (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ranker_svc.exits import ExitPolicy
from ranker_svc import prefix
from ranker_svc.model import EarlyExitLM, pad_right
from ranker_svc.runners import context_encoder, encode_contexts, predict, predict_suffixes
from ranker_svc.prefix import PREFIX_ATTENTION, SharedKV, prefix_attention, prefix_attention_enabled, spans_of

from .test_model import CONFIGS, NO, VOCAB, YES, make_lm

POLICIES = [
    ExitPolicy(disabled=True),
    ExitPolicy(threshold=0.05, window=1),
    ExitPolicy(criterion="confidence", threshold=0.8),
]


def requests(seed: int, context_lengths: list[int], candidates: list[int], vocab: int = VOCAB, longest: int = 6):
    """Random contexts (longer than the sliding window 8) and suffixes of 1..longest tokens, grouped by request."""
    g = torch.Generator().manual_seed(seed)
    contexts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in context_lengths]
    suffixes, groups = [], []
    for r, n in enumerate(candidates):
        for _ in range(n):
            length = int(torch.randint(1, longest + 1, (1,), generator=g))
            suffixes.append(torch.randint(0, vocab, (length,), generator=g).tolist())
            groups.append(r)
    return contexts, suffixes, groups


@pytest.mark.parametrize("kernel", ["fused", "eager"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_suffixes_over_cached_contexts_equal_full_prompts(arch, kernel, monkeypatch):
    if kernel == "eager":  # the portable path (CUDA and others) next to the fused CPU kernel
        monkeypatch.setattr(prefix, "_FLASH_CPU", None)
    model = EarlyExitLM(causal_lm=make_lm(arch), yes_token_id=YES, no_token_id=NO, exit_layers=[1, 2, 3])
    contexts, suffixes, groups = requests(0, [14, 5, 9], [4, 1, 5])
    ids, mask = pad_right([contexts[r] + s for r, s in zip(groups, suffixes)], 0)
    cache = encode_contexts(model, contexts)
    assert cache.keys[0].shape[0] == len(contexts)  # one K/V per request, not per candidate
    mixed = False
    for policy in POLICIES:
        full_ctr, full_layer = predict(model, ids, mask, policy)
        ctr, layer = predict_suffixes(model, cache, suffixes, groups, policy)
        assert layer.tolist() == full_layer.tolist()
        torch.testing.assert_close(ctr, full_ctr, atol=1e-4, rtol=0)
        mixed |= len(set(layer.tolist())) > 1
    assert mixed, "some policy must exit rows at different layers (compaction inside the suffix batch)"


@pytest.mark.parametrize("kernel", ["fused", "eager"])
def test_suffixes_longer_than_the_sliding_window_see_no_context_at_their_end(kernel, monkeypatch):
    if kernel == "eager":
        monkeypatch.setattr(prefix, "_FLASH_CPU", None)
    model = EarlyExitLM(causal_lm=make_lm("mistral"), yes_token_id=YES, no_token_id=NO, exit_layers=[2])
    contexts, suffixes, groups = requests(4, [10, 6], [3, 3], longest=13)
    assert max(len(s) for s in suffixes) > 8  # window 8: late suffix tokens attend to no context token
    ids, mask = pad_right([contexts[r] + s for r, s in zip(groups, suffixes)], 0)
    full_ctr, _ = predict(model, ids, mask, ExitPolicy(disabled=True))
    ctr, _ = predict_suffixes(model, encode_contexts(model, contexts), suffixes, groups, ExitPolicy(disabled=True))
    torch.testing.assert_close(ctr, full_ctr, atol=1e-4, rtol=0)


def test_whole_batch_mode_and_chunks_agree(loaded):
    model = loaded.model
    contexts, suffixes, groups = requests(1, [30, 12], [6, 7], vocab=len(loaded.tokenizer))
    policy = ExitPolicy(threshold=0.05, window=1)
    cache = encode_contexts(model, contexts)
    a = predict_suffixes(model, cache, suffixes, groups, policy)
    b = predict_suffixes(model, cache, suffixes, groups, policy, compaction=False)
    c_first = predict_suffixes(model, cache, suffixes[:5], groups[:5], policy)
    c_rest = predict_suffixes(model, cache, suffixes[5:], groups[5:], policy)
    assert a[1].tolist() == b[1].tolist() == torch.cat([c_first[1], c_rest[1]]).tolist()
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[0], torch.cat([c_first[0], c_rest[0]]), atol=1e-5, rtol=0)


def test_the_attention_switch_is_scoped_and_plain_tensors_fall_back_to_sdpa():
    causal_lm = make_lm("llama")
    before = causal_lm.config._attn_implementation
    with prefix_attention_enabled(causal_lm.config):
        assert causal_lm.config._attn_implementation == PREFIX_ATTENTION
        ids = torch.randint(0, VOCAB, (2, 9))
        with torch.no_grad():
            switched = causal_lm(ids).logits  # an ordinary forward while the switch is on
    assert causal_lm.config._attn_implementation == before
    with torch.no_grad():
        torch.testing.assert_close(switched, causal_lm(ids).logits)
    with pytest.raises(RuntimeError):
        with prefix_attention_enabled(causal_lm.config):
            raise RuntimeError("boom")
    assert causal_lm.config._attn_implementation == before


def test_prefix_attention_equals_attention_over_the_concatenation():
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(CONFIGS["llama"]()).model.layers[0].self_attn
    n, h, kv, s, c, d = 3, 4, 2, 5, 7, 8
    q = torch.randn(n, h, s, d)
    k_ctx, v_ctx = torch.randn(1, kv, c, d), torch.randn(1, kv, c, d)
    k_suf, v_suf = torch.randn(n, kv, s, d), torch.randn(n, kv, s, d)
    spans = spans_of(torch.zeros(n, dtype=torch.long), [c])
    out, _ = prefix_attention(module, q, SharedKV(k_ctx, k_suf, spans), SharedKV(v_ctx, v_suf, spans), None,
                              scaling=d ** -0.5)
    keys = torch.cat([k_ctx.expand(n, -1, -1, -1), k_suf], dim=2).repeat_interleave(h // kv, dim=1)
    values = torch.cat([v_ctx.expand(n, -1, -1, -1), v_suf], dim=2).repeat_interleave(h // kv, dim=1)
    allowed = torch.arange(c + s)[None, :] <= (c + torch.arange(s))[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_spans_follow_request_groups():
    assert spans_of(torch.tensor([0, 0, 1, 3, 3, 3]), [5, 6, 7, 8]) == ((0, 2, 0, 5), (2, 3, 1, 6), (3, 6, 3, 8))
    with pytest.raises(AssertionError):
        spans_of(torch.tensor([1, 0]), [5, 6])


def test_contexts_are_encoded_only_as_deep_as_some_row_goes():
    model = EarlyExitLM(causal_lm=make_lm("qwen2"), yes_token_id=YES, no_token_id=NO, exit_layers=[1, 2, 3])
    contexts, suffixes, groups = requests(2, [12, 10], [3, 2])
    encoder = context_encoder(model, contexts)
    _, layer = predict_suffixes(model, encoder, suffixes, groups, ExitPolicy(criterion="confidence", threshold=0.5))
    assert layer.tolist() == [1] * 5 and encoder.done == 1 and encoder.kv.keys[1] is None
    # the same encoder goes on when later rows need more depth; the last layer records K/V only
    ctr, layer = predict_suffixes(model, encoder, suffixes, groups, ExitPolicy(disabled=True))
    assert encoder.done == model.num_layers and all(k is not None for k in encoder.kv.keys)
    ids, mask = pad_right([contexts[r] + s for r, s in zip(groups, suffixes)], 0)
    full_ctr, _ = predict(model, ids, mask, ExitPolicy(disabled=True))
    torch.testing.assert_close(ctr, full_ctr, atol=1e-4, rtol=0)
