r"""Shared-context attention: a request's context is encoded once, every candidate runs as a short suffix.

The prompt is ``context + suffix`` (``ranker_svc.prompt``: instruction, similar users and the user's
history first, the candidate last). Under a causal mask the context's keys and values at every layer
do not depend on what follows, so for one user and n candidates

.. math::  \mathrm{Attn}(q_j, [K_{ctx}; K_{suf}], [V_{ctx}; V_{suf}])

is exact with :math:`K_{ctx}, V_{ctx}` computed once. Cost: one context pass of C tokens plus n
suffixes of S tokens, instead of n prompts of C + S tokens.

Two duck-typed caches plug into transformers' attention modules through their
``past_key_values.update(key, value, layer_idx)`` call (Llama, Qwen2 and Mistral all make it):

- :class:`ContextRecorder` (context pass) records each layer's post-RoPE keys and values.
- :class:`SuffixCache` (suffix pass) hands each layer a :class:`SharedKV` pair: that layer's context
  K/V for all requests of the batch, plus the suffix rows' own K/V.

:func:`prefix_attention` is registered as a transformers ``AttentionInterface`` and consumes those
pairs. The context K/V are broadcast, never copied per row: for each request, its candidates' query
rows are folded into one matrix and multiplied against the request's (kv_heads, C, d) context keys
once. Plain tensors (any other call that happens while the switch is on) go to the stock SDPA
function, so the switch (:func:`prefix_attention_enabled`) is safe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

PREFIX_ATTENTION = "exitrank_prefix"
# the fused CPU kernel that also returns the softmax's log-sum-exp (private in torch; eager fallback)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# (first_row, stop_row, context_index, context_length): the suffix rows of one request
Span = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class SharedKV:
    """One layer's keys (or values) for a suffix batch: the requests' contexts and the rows' own."""

    context: Tensor  # (R, kv_heads, C_max, d)
    suffix: Tensor  # (b, kv_heads, S, d)
    spans: tuple[Span, ...]


@dataclass(slots=True)
class ContextKV:
    """Post-RoPE keys and values of R right-padded contexts at every layer, and each context's length."""

    keys: list[Tensor]  # per layer (R, kv_heads, C_max, d)
    values: list[Tensor]
    lengths: list[int]


class KVRecorded(Exception):
    """Raised by :class:`ContextRecorder` at its ``stop_after`` layer: the rest of that layer is not needed."""


class ContextRecorder:
    """A cache for the context pass: records each layer's K/V and lets attention run as usual.

    At the last layer only the context's keys and values are needed (its output feeds nothing), so
    with ``stop_after`` set to that layer the recorder raises :class:`KVRecorded` right after the
    K/V projections and skips the layer's attention and MLP, whatever the architecture.
    """

    def __init__(self, num_layers: int, *, stop_after: int | None = None) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.stop_after = stop_after

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        if layer_idx == self.stop_after:
            raise KVRecorded
        return key_states, value_states


class SuffixCache:
    """A cache for the suffix pass: pairs each layer's suffix K/V with the cached context K/V."""

    def __init__(self, context: ContextKV, spans: tuple[Span, ...]) -> None:
        self.context = context
        self.spans = spans

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[SharedKV, SharedKV]:
        return (SharedKV(self.context.keys[layer_idx], key_states, self.spans),
                SharedKV(self.context.values[layer_idx], value_states, self.spans))


def spans_of(groups: Tensor, lengths: Sequence[int]) -> tuple[Span, ...]:
    """Row ranges of each context in ``groups`` ((b,) nondecreasing context index per suffix row)."""
    assert bool((groups[1:] >= groups[:-1]).all()), "suffix rows must be grouped by context"
    values, counts = torch.unique_consecutive(groups, return_counts=True)
    spans, start = [], 0
    for r, n in zip(values.tolist(), counts.tolist()):
        spans.append((start, start + n, r, int(lengths[r])))
        start += n
    return tuple(spans)


def _allowed(context_len: int, suffix_len: int, window: int | None, device: torch.device) -> Tensor:
    """(S, C + S) bool: suffix token j sits at position C + j and sees positions <= its own (and
    within ``window`` when the layer slides, as transformers' ``sliding_window_overlay``)."""
    query = context_len + torch.arange(suffix_len, device=device)[:, None]  # (S, 1)
    key = torch.arange(context_len + suffix_len, device=device)[None, :]  # (1, C + S)
    allowed = key <= query
    if window:
        allowed &= key > query - window
    return allowed


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """(L, K) bool -> (1, 1, L, K) additive mask (0 where allowed, -inf elsewhere) in ``dtype``."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))[None, None]


def _request_attention_fused(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_suf: Tensor, v_suf: Tensor,
                             window: int | None) -> Tensor:
    r""":func:`_request_attention` with PyTorch's fused CPU flash-attention kernel, in two parts.

    The context part folds every row's queries into one long query sequence against the request's
    single (kv, C, d) key/value matrices (no per-row copy, no GQA repeat); the own part is causal
    attention within each suffix. The kernel returns each part's log-sum-exp, so the two softmaxes
    merge exactly:

    .. math::  o = w\,o_{ctx} + (1 - w)\,o_{own}, \qquad w = \sigma(\mathrm{lse}_{ctx} - \mathrm{lse}_{own})
    """
    n, h, s, d = q.shape
    kv, c = k_ctx.shape[0], k_ctx.shape[1]
    g = h // kv
    q_fold = q.view(n, kv, g, s, d).transpose(0, 1).reshape(1, kv, n * g * s, d)  # (1, kv, n*g*S, d)
    mask_ctx = sees_none = None
    if window and window < c + s:
        allowed = _allowed(c, s, window, q.device)[:, :c]  # (S, C)
        mask_ctx = _additive(allowed.repeat(n * g, 1), q.dtype)  # (1, 1, n*g*S, C)
        sees_none = ~allowed.any(dim=1)  # (S,) late suffix tokens whose window holds no context token
    out_c, lse_c = _FLASH_CPU(q_fold, k_ctx[None], v_ctx[None], attn_mask=mask_ctx, scale=1.0)
    out_c = out_c.view(kv, n, g, s, d).transpose(0, 1).reshape(n, h, s, d)
    lse_c = lse_c.view(kv, n, g, s).transpose(0, 1).reshape(n, h, s)
    if sees_none is not None and bool(sees_none.any()):  # the kernel answers 0 there: the part weighs nothing
        lse_c = lse_c.masked_fill(sees_none, float("-inf"))
    k_own, v_own = k_suf.repeat_interleave(g, dim=1), v_suf.repeat_interleave(g, dim=1)  # (n, h, S, d)
    if window and window < s:
        out_o, lse_o = _FLASH_CPU(q, k_own, v_own, attn_mask=_additive(_allowed(0, s, window, q.device), q.dtype),
                                  scale=1.0)
    else:
        out_o, lse_o = _FLASH_CPU(q, k_own, v_own, is_causal=True, scale=1.0)
    w = torch.sigmoid(lse_c - lse_o)[..., None]  # (n, h, S, 1) share of the softmax mass on the context
    out = (out_c.float() * w + out_o.float() * (1.0 - w)).to(q.dtype)  # (n, h, S, d)
    return out.transpose(1, 2)  # (n, S, h, d)


def _request_attention(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_suf: Tensor, v_suf: Tensor,
                       window: int | None) -> Tensor:
    """Attention of one request's suffix rows over [its context; their own suffix] (any device).

    Args:
        q: (n, h, S, d) queries of the request's n rows, already scaled.
        k_ctx, v_ctx: (kv, C, d) the request's context keys/values (shared by its n rows).
        k_suf, v_suf: (n, kv, S, d) the rows' own keys/values.

    Returns:
        (n, S, h, d), the layout transformers' attention modules expect from an attention function.
    """
    n, h, s, d = q.shape
    kv, c = k_ctx.shape[0], k_ctx.shape[1]
    g = h // kv  # query heads per key/value head (GQA)
    q = q.view(n, kv, g, s, d).transpose(0, 1)  # (kv, n, g, S, d)
    # context part: all n*g*S query rows of a kv head against the one shared (C, d) key matrix
    scores_ctx = torch.matmul(q.reshape(kv, n * g * s, d), k_ctx.transpose(1, 2)).view(kv, n, g, s, c)
    k_own = k_suf.transpose(0, 1)[:, :, None]  # (kv, n, 1, S, d)
    scores_own = torch.matmul(q, k_own.transpose(-1, -2))  # (kv, n, g, S, S)
    scores = torch.cat([scores_ctx, scores_own], dim=-1)  # (kv, n, g, S, C + S)
    scores = scores.masked_fill(~_allowed(c, s, window, q.device), float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)  # fp32 softmax, as transformers' eager path
    out = torch.matmul(probs[..., :c].reshape(kv, n * g * s, c), v_ctx).view(kv, n, g, s, d)
    out = out + torch.matmul(probs[..., c:], v_suf.transpose(0, 1)[:, :, None])  # (kv, n, g, S, d)
    return out.permute(1, 3, 0, 2, 4).reshape(n, s, h, d)


def prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[Tensor, None]:
    """The registered attention function: :class:`SharedKV` keys -> prefix attention, else SDPA.

    ``query`` is (b, h, S, d) for the suffix rows (RoPE applied at their true positions C_r + j);
    ``attention_mask`` is ignored on the shared path (the causal and sliding-window structure is
    rebuilt per request from the context length and the layer's ``sliding_window``).
    """
    if not isinstance(key, SharedKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    q = query * scale  # (b, h, S, d)
    attend = _request_attention_fused if (_FLASH_CPU is not None and q.device.type == "cpu") else _request_attention
    outs = [
        attend(q[a:z], key.context[r, :, :c], value.context[r, :, :c], key.suffix[a:z], value.suffix[a:z], window)
        for a, z, r, c in key.spans
    ]
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0], None  # (b, S, h, d)


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
_switch_lock = threading.RLock()


@contextmanager
def prefix_attention_enabled(config) -> Iterator[None]:
    """Routes the model's attention through :func:`prefix_attention` for the duration of the block."""
    with _switch_lock:
        before = config._attn_implementation
        config._attn_implementation = PREFIX_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = before
