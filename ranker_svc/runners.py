"""The serving entry points of ``EarlyExitLM`` (``ranker_svc.model``): batches stepped through the layers.

The model owns the weights and one step of the layer loop (its public layer-stepping API); this
module drives that API, so imports flow one way (runners -> model):

- :func:`predict`: CTR and exit layer of each right-padded full prompt.
- :func:`context_encoder` / :func:`encode_contexts` + :func:`predict_suffixes`: the shared
  contexts of a batch of requests encoded once, their candidates run as suffixes over that cache.

Each walks its batch through :func:`ranker_svc.exits.run_exits` with one of these:

- ``ContextEncoder``: the shared contexts of a batch of requests, advanced through the decoder only
  as deep as some candidate row goes (one pass in total), recording each layer's keys and values.
- ``PromptRunner``: an :class:`~ranker_svc.exits.ExitRunner` over right-padded full prompts.
- ``SuffixRunner``: an :class:`~ranker_svc.exits.ExitRunner` over candidate suffixes attending to
  their context's cached K/V (``ranker_svc.prefix``).

Both runners compact their batch when rows exit (``keep``): hidden states, lengths, positions and
rotary tables are indexed down to the rows still running.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ranker_svc.exits import ExitPolicy, run_exits
from ranker_svc.model import EarlyExitLM, pad_right, right_padded_lengths
from ranker_svc.prefix import (
    ContextKV,
    ContextRecorder,
    KVRecorded,
    SuffixCache,
    prefix_attention_enabled,
    spans_of,
)


@torch.inference_mode()
def predict(model: EarlyExitLM, input_ids: Tensor, attention_mask: Tensor, policy: ExitPolicy, *,
            compaction: bool = True, soft: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CTR and exit layer of each right-padded prompt, exiting rows as soon as ``policy`` says they settled.

    Args:
        input_ids: (B, T) right-padded token ids.
        attention_mask: (B, T) 1 for real tokens.
        policy: the exit policy (``disabled``: every row runs all N layers).
        compaction: False: rows keep running until the whole batch has settled (same answers).
        soft: (n, d) vectors of the prompts' virtual ids (collaborative soft tokens), or None.

    Returns:
        ``(ctr (B,) float32 in (0, 1), exit_layer (B,) long, 1-based)``, on the CPU.
    """
    runner = PromptRunner(model, input_ids, attention_mask, soft)
    return run_exits(runner, batch_size=input_ids.shape[0], answer_layers=model.answer_layers, policy=policy,
                     compaction=compaction)


def context_encoder(model: EarlyExitLM, contexts: Sequence[Sequence[int]],
                    soft: Tensor | None = None) -> "ContextEncoder":
    """R contexts (token ids, BOS first), to be advanced through the layers as deep as needed."""
    return ContextEncoder(model, contexts, soft)


@torch.inference_mode()
def encode_contexts(model: EarlyExitLM, contexts: Sequence[Sequence[int]], soft: Tensor | None = None) -> ContextKV:
    """Runs R contexts through all N layers once; their K/V at every layer."""
    return context_encoder(model, contexts, soft).advance(model.num_layers)


@torch.inference_mode()
def predict_suffixes(
    model: EarlyExitLM, context: "ContextKV | ContextEncoder", suffixes: Sequence[Sequence[int]],
    groups: Sequence[int], policy: ExitPolicy, *, compaction: bool = True, soft: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """CTR and exit layer of each prompt ``context[groups[i]] + suffixes[i]``, contexts from the cache.

    Args:
        context: the R contexts, encoded (:func:`encode_contexts`) or lazily advanced with the
            suffixes (:func:`context_encoder`: layer l of the contexts runs only once some row
            reaches layer l, so a batch whose rows all exit at layer 2 encodes 2 layers).
        suffixes: b token-id lists (no BOS), the candidates.
        groups: (b,) nondecreasing context index of each suffix (rows of one request together).
        policy, compaction, soft: as :func:`predict`.
    """
    runner = SuffixRunner(model, context, suffixes, groups, soft)
    return run_exits(runner, batch_size=len(suffixes), answer_layers=model.answer_layers, policy=policy,
                     compaction=compaction)


class ContextEncoder:
    """The contexts of a batch of requests, advanced through the decoder on demand (one pass in total).

    ``advance(l)`` runs the contexts through layers ``done..l-1`` and records their keys and values;
    shared by every suffix chunk of the batch. The last layer only records K/V (see
    :class:`~ranker_svc.prefix.ContextRecorder`).
    """

    def __init__(self, model: EarlyExitLM, contexts: Sequence[Sequence[int]], soft: Tensor | None = None) -> None:
        self.model = model
        input_ids, mask = pad_right(contexts, 0, model.device)
        self.hidden, lengths, self.rotary = model.embed_batch(input_ids, mask, soft)  # (R, C, H)
        self.masks = model.causal_masks(self.hidden)
        self.recorder = ContextRecorder(model.num_layers, stop_after=model.num_layers - 1)
        self.kv = ContextKV(keys=self.recorder.keys, values=self.recorder.values,  # type: ignore[arg-type]
                            lengths=lengths.tolist())
        self.done = 0

    @torch.inference_mode()
    def advance(self, layers: int) -> ContextKV:
        """K/V of layers 0..``layers``-1 are recorded; returns the (shared, growing) :class:`ContextKV`."""
        for index in range(self.done, layers):
            try:
                self.hidden = self.model.run_prompt_layer(index, self.hidden, self.masks, self.rotary,
                                                          cache=self.recorder)
            except KVRecorded:  # the last layer: its K/V are all the suffixes need
                pass
        self.done = max(self.done, layers)
        return self.kv


class PromptRunner:
    """:class:`~ranker_svc.exits.ExitRunner` over right-padded full prompts (positions 0..T-1)."""

    def __init__(self, model: EarlyExitLM, input_ids: Tensor, attention_mask: Tensor,
                 soft: Tensor | None = None) -> None:
        self.model = model
        self.hidden, self.lengths, self.rotary = model.embed_batch(input_ids, attention_mask, soft)  # (B, T, H)
        self.masks = model.causal_masks(self.hidden)
        self.done = 0  # layers run so far

    def answer(self, layer: int) -> Tensor:
        for index in range(self.done, layer):
            self.hidden = self.model.run_prompt_layer(index, self.hidden, self.masks, self.rotary)
        self.done = layer
        rows = torch.arange(self.hidden.shape[0], device=self.hidden.device)
        return self.model.p_yes(layer, self.hidden[rows, self.lengths - 1])  # (b,)

    def keep(self, rows: Tensor) -> None:
        rows = rows.to(self.hidden.device)
        self.lengths = self.lengths[rows]
        self.hidden = self.hidden[rows][:, : int(self.lengths.max())]  # (b', T', H) compacted and trimmed
        self.masks = self.model.causal_masks(self.hidden)


class SuffixRunner:
    """:class:`~ranker_svc.exits.ExitRunner` over candidate suffixes of cached contexts.

    Suffix token j of a row whose context has C tokens sits at position C + j: RoPE is applied there,
    and attention covers the context's cached K/V plus the row's own earlier suffix tokens.
    """

    def __init__(self, model: EarlyExitLM, context: "ContextKV | ContextEncoder", suffixes: Sequence[Sequence[int]],
                 groups: Sequence[int], soft: Tensor | None = None) -> None:
        self.model = model
        self.encoder = context if isinstance(context, ContextEncoder) else None
        self.context = context.kv if isinstance(context, ContextEncoder) else context
        device = model.device
        input_ids, mask = pad_right(suffixes, 0, device)
        self.lengths = right_padded_lengths(mask)  # (b,)
        self.groups = torch.as_tensor(list(groups), dtype=torch.long)  # (b,) on the CPU: spans are Python
        self.hidden = model.embed(input_ids[:, : int(self.lengths.max())], soft)  # (b, S, H)
        offsets = torch.as_tensor(self.context.lengths, device=device)[self.groups.to(device)]  # (b,)
        self.positions = offsets[:, None] + torch.arange(self.hidden.shape[1], device=device)[None]  # (b, S)
        self.rotary = model.rotary(self.hidden, self.positions)  # 2 x (b, S, head_dim)
        self.done = 0

    def answer(self, layer: int) -> Tensor:
        if self.encoder is not None:
            self.encoder.advance(layer)  # the contexts only go as deep as some row does
        cache = SuffixCache(self.context, spans_of(self.groups, self.context.lengths))
        with prefix_attention_enabled(self.model.causal_lm.config):
            for index in range(self.done, layer):
                self.hidden = self.model.run_layer(index, self.hidden, mask=None, positions=self.positions,
                                                   rotary=self.rotary, cache=cache)
        self.done = layer
        rows = torch.arange(self.hidden.shape[0], device=self.hidden.device)
        return self.model.p_yes(layer, self.hidden[rows, self.lengths - 1])  # (b,)

    def keep(self, rows: Tensor) -> None:
        self.groups = self.groups[rows.cpu()]
        rows = rows.to(self.hidden.device)
        self.lengths = self.lengths[rows]
        s = int(self.lengths.max())
        self.hidden = self.hidden[rows][:, :s]  # (b', S', H)
        self.positions = self.positions[rows][:, :s]
        cos, sin = self.rotary
        self.rotary = (cos[rows][:, :s], sin[rows][:, :s])
