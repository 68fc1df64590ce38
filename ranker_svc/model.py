r"""Multi-head early exit over a transformers decoder (torch only).

References:
    - Zhou et al., "The Efficiency vs. Accuracy Trade-off: Optimizing RAG-Enhanced LLM Recommender
      Systems Using Multi-Head Early Exit", sections 3 (bidimensional softmax) and 5 (exit heads,
      Dynamic Predictive Exiting).
    - Chuang et al., "DoLa" (2024): intermediate layers already decode through the final head.

The pieces, top-down:
    1. ``answer_logits``: a language head restricted to the "Yes"/"No" rows.
    2. ``ExitHead``: norm + linear head mounted at an exit layer (paper 5.2).
    3. ``EarlyExitLM``: any ``AutoModelForCausalLM`` decoder (Llama, Qwen2, Mistral families) with
       its exit heads, and the public layer-stepping API that every driver of the layer loop uses:
       :meth:`~EarlyExitLM.embed_batch` (embeddings, lengths, rotary tables of a right-padded batch),
       :meth:`~EarlyExitLM.causal_masks`, :meth:`~EarlyExitLM.run_layer` /
       :meth:`~EarlyExitLM.run_prompt_layer` (one decoder layer), :meth:`~EarlyExitLM.p_yes` (one
       head's answer), :func:`right_padded_lengths`; plus the training/calibration passes.

The drivers sit above this module and call only that API (imports flow one way, into here):
``ranker_svc.runners`` (``predict``, ``context_encoder``/``encode_contexts``, ``predict_suffixes``:
settled rows leave the batch through ``ranker_svc.exits.run_exits``) and the ONNX segments
(``ranker_svc.onnx_engine``).

Batches are RIGHT-padded (real tokens first). Under a causal mask a real token only attends to
positions before it, which are all real, so the padding never reaches the answer position and the
layers run with the plain causal mask; the answer is read at each row's last real token.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ranker_svc.collab import CollabProjector, SoftTable, embed_tokens
from ranker_svc.exits import depth_learning_rates

DEFAULT_EXIT_COUNT = 6


def answer_logits(norm: nn.Module, lm_head: nn.Linear, hidden: Tensor, answer_ids: Tensor) -> Tensor:
    r"""The "Yes"/"No" logits :math:`(s^a, s^b)` of a language head, without the other V-2 rows.

    The CTR is the bidimensional softmax :math:`\hat y = e^{s^a} / (e^{s^a} + e^{s^b})` (paper
    section 3). It depends on rows a and b of the head only, so computing those two rows is exact,
    and costs 2/V of the full head.

    Args:
        hidden: (B, H) hidden states at the answer position.
        answer_ids: (2,) token ids of "Yes" and "No".

    Returns:
        (B, 2) logits.
    """
    weight = lm_head.weight[answer_ids]  # (2, H)
    bias = None if lm_head.bias is None else lm_head.bias[answer_ids]
    return F.linear(norm(hidden), weight, bias)  # (B, 2)


class ExitHead(nn.Module):
    r"""A language head at exit layer :math:`\ell`: :math:`p^{(\ell)} = \mathrm{softmax}(W\,\mathrm{norm}(h^{(\ell)}))`.

    The paper mounts randomly initialised heads. We start each head as a copy of the model's final
    norm and ``lm_head`` instead: in a pre-norm decoder every layer writes into the same residual
    stream, and the final head already reads intermediate states sensibly (the "logit lens" the paper
    cites in 5.1). A copy starts at that untrained early-exit quality instead of at chance, so the
    head converges in far fewer steps and never begins worse than the untuned baseline.

    A head holds either the full vocabulary (``vocab_rows`` None: W is V x H, trained with the
    paper's full-vocabulary loss) or only the "Yes"/"No" rows (``vocab_rows`` = the two token ids:
    W is 2 x H). Serving needs nothing else (the bidimensional softmax reads rows a and b only), so
    artifacts store answer-row heads: 2H numbers per head instead of VH (a 7B model: 8 K instead of
    131 M parameters per head).

    Args:
        norm: the head's copy of the final norm.
        lm_head: its projection, V x H or len(vocab_rows) x H.
        vocab_rows: token ids of the projection's rows; None: row v is token v.
    """

    def __init__(self, *, norm: nn.Module, lm_head: nn.Linear, vocab_rows: Sequence[int] | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.proj = lm_head
        rows = None if vocab_rows is None else torch.tensor(list(vocab_rows), dtype=torch.long)
        if rows is not None and rows.numel() != lm_head.out_features:
            raise ValueError(f"vocab_rows has {rows.numel()} ids for a projection of {lm_head.out_features} rows")
        self.register_buffer("vocab_rows", rows, persistent=False)

    @classmethod
    def from_final(cls, causal_lm: PreTrainedModel, *, rows: Sequence[int] | None = None) -> "ExitHead":
        """A head initialised from the model's own final norm and language head (copies; only ``rows``)."""
        norm = copy.deepcopy(causal_lm.base_model.norm)
        src = causal_lm.get_output_embeddings()
        index = slice(None) if rows is None else torch.tensor(list(rows), device=src.weight.device)
        weight = src.weight.detach()[index]
        proj = nn.Linear(src.in_features, weight.shape[0], bias=src.bias is not None)
        proj.to(device=src.weight.device, dtype=src.weight.dtype)
        with torch.no_grad():
            proj.weight.copy_(weight)
            if src.bias is not None:
                proj.bias.copy_(src.bias.detach()[index])
        return cls(norm=norm, lm_head=proj, vocab_rows=rows)

    @property
    def full_vocab(self) -> bool:
        return self.vocab_rows is None

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., H) -> (..., V) logits (or (..., k) for a k-row head)."""
        return self.proj(self.norm(hidden))

    def answer_logits(self, hidden: Tensor, answer_ids: Tensor) -> Tensor:
        """(B, H) -> (B, 2) "Yes"/"No" logits only (inference)."""
        if self.vocab_rows is None:
            return answer_logits(self.norm, self.proj, hidden, answer_ids)
        return self.proj(self.norm(hidden))  # rows are exactly (yes, no): checked by EarlyExitLM

    def loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        r""":math:`-\log p^{(\ell)}(y|x)`: over the vocabulary, or over the head's rows for a k-row head.

        Args:
            hidden: (B, H) last-token states at the head's layer.
            targets: (B,) answer token ids.
        """
        logits = self(hidden).float()  # (B, V) or (B, k)
        if self.vocab_rows is None:
            return F.cross_entropy(logits, targets)
        index = (targets[:, None] == self.vocab_rows[None].to(targets.device)).long().argmax(dim=1)  # (B,)
        return F.cross_entropy(logits, index)

    def answer_rows(self, answer_ids: Sequence[int]) -> "ExitHead":
        """A copy holding only the rows ``answer_ids`` (what artifacts store)."""
        answer_ids = list(answer_ids)
        if self.vocab_rows is not None:
            if self.vocab_rows.tolist() != answer_ids:
                raise ValueError(f"head rows {self.vocab_rows.tolist()} are not the answer ids {answer_ids}")
            return self
        index = torch.tensor(answer_ids, device=self.proj.weight.device)
        proj = nn.Linear(self.proj.in_features, len(answer_ids), bias=self.proj.bias is not None)
        proj.to(device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        with torch.no_grad():
            proj.weight.copy_(self.proj.weight[index])
            if self.proj.bias is not None:
                proj.bias.copy_(self.proj.bias[index])
        return ExitHead(norm=copy.deepcopy(self.norm), lm_head=proj, vocab_rows=answer_ids)


def default_exit_layers(num_layers: int, count: int = DEFAULT_EXIT_COUNT) -> list[int]:
    """``count`` evenly spaced exit layers below the last: 32 layers -> 5, 10, ..., 30; 6 -> 1..5."""
    step = max(1, num_layers // count)
    return [step * i for i in range(1, count + 1) if step * i < num_layers]


class EarlyExitLM(nn.Module):
    r"""A causal LM whose layers run one by one, with exit heads answering "Yes"/"No" early.

    For a row, the answering layers are ``exit_layers`` (each with an :class:`ExitHead`) followed by
    the last layer N, which answers with the model's own final norm and ``lm_head``. The class
    owns the weights and one step of the loop at a time (the layer-stepping API below); the
    serving entry points that walk a batch through it, exiting settled rows, are the functions of
    ``ranker_svc.runners``:

    - ``predict(model, ...)``: right-padded full prompts.
    - ``encode_contexts(model, ...)`` + ``predict_suffixes(model, ...)``: each request's shared
      context is encoded once (K/V of every layer), then its candidates run as short suffixes over
      that cache (``ranker_svc.prefix``). The scores equal ``predict`` on the concatenated prompts.

    Args:
        causal_lm: any transformers decoder-only ``*ForCausalLM`` (Llama, Qwen2, Mistral families).
        yes_token_id: vocabulary index a of "Yes".
        no_token_id: vocabulary index b of "No".
        exit_layers: 1-based layers in 1..N-1 that get heads (default: :func:`default_exit_layers`).
        heads: trained heads keyed by ``str(layer)``; default: copies of the final head.
        collab: the projector of collaborative soft tokens (``ranker_svc.collab``), or None. With
            it, every entry point takes ``soft``: the (n, d) raw vectors that the prompts' virtual
            ids (>= the vocabulary size) index.
    """

    def __init__(
        self,
        *,
        causal_lm: PreTrainedModel,
        yes_token_id: int,
        no_token_id: int,
        exit_layers: Sequence[int] | None = None,
        heads: nn.ModuleDict | None = None,
        collab: CollabProjector | None = None,
    ) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.collab = collab
        self.decoder = causal_lm.base_model
        self.num_layers = len(self.decoder.layers)
        layers = default_exit_layers(self.num_layers) if exit_layers is None else sorted(set(exit_layers))
        if any(not 1 <= layer < self.num_layers for layer in layers):
            raise ValueError(f"exit_layers must lie in 1..{self.num_layers - 1}, got {list(exit_layers or [])}")
        if yes_token_id == no_token_id:
            raise ValueError("yes_token_id and no_token_id must differ")
        self.exit_layers: tuple[int, ...] = tuple(layers)
        self.answer_layers: tuple[int, ...] = (*self.exit_layers, self.num_layers)
        self.heads = heads if heads is not None else nn.ModuleDict(
            {str(layer): ExitHead.from_final(causal_lm) for layer in self.exit_layers}
        )
        for layer, head in self.heads.items():
            if head.vocab_rows is not None and head.vocab_rows.tolist() != [yes_token_id, no_token_id]:
                raise ValueError(f"head {layer} holds rows {head.vocab_rows.tolist()}, not the answer ids")
        self.register_buffer("answer_ids", torch.tensor([yes_token_id, no_token_id]), persistent=False)
        self.layer_kinds: list[str] = _layer_kinds(causal_lm.config, self.num_layers)  # mask kind per layer
        self._cache_arg = _cache_arg(type(self.decoder.layers[0]).forward)

    @property
    def yes_token_id(self) -> int:
        return int(self.answer_ids[0])

    @property
    def no_token_id(self) -> int:
        return int(self.answer_ids[1])

    @property
    def device(self) -> torch.device:
        return self.answer_ids.device

    # --- the layer-stepping API (ranker_svc.runners, ranker_svc.onnx_engine) ------------------------

    def soft_table(self) -> SoftTable | None:
        """A fresh table for one call's soft tokens, or None for a text-only model."""
        if self.collab is None:
            return None
        return SoftTable(vocab_size=self.causal_lm.get_input_embeddings().num_embeddings,
                         placeholder_id=self.collab.token_id, dim=self.collab.dim)

    def embed(self, input_ids: Tensor, soft: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, T, H) input embeddings; virtual ids take projected ``soft`` rows."""
        return embed_tokens(self.causal_lm.get_input_embeddings(), self.collab, input_ids, soft)

    def rotary(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotary (cos, sin) tables at ``positions`` ((1, T) or (B, T)): 2 x (1 or B, T, head_dim)."""
        return self.decoder.rotary_emb(hidden, positions)

    def embed_batch(self, input_ids: Tensor, attention_mask: Tensor, soft: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """A right-padded batch, trimmed to its longest row: ``(hidden (B, T, H), lengths (B,),
        rotary 2 x (1, T, head_dim))`` at positions 0..T-1."""
        lengths = right_padded_lengths(attention_mask)  # (B,)
        t = int(lengths.max())
        hidden = self.embed(input_ids[:, :t], soft)  # (B, T, H)
        positions = torch.arange(t, device=hidden.device)[None]  # (1, T)
        return hidden, lengths, self.rotary(hidden, positions)

    def causal_masks(self, hidden: Tensor) -> dict[str, Tensor | None]:
        """The causal mask of (B, T, H) ``hidden`` per layer kind; None lets SDPA use its causal kernel."""
        kwargs = {"config": self.causal_lm.config, "inputs_embeds": hidden, "attention_mask": None,
                  _MASK_CACHE_ARG: None, "position_ids": None}
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in self.layer_kinds:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def run_layer(self, index: int, hidden: Tensor, *, mask: Tensor | None, positions: Tensor,
                  rotary: tuple[Tensor, Tensor], cache=None) -> Tensor:
        """Decoder layer ``index`` (0-based) on (B, T, H) -> (B, T, H); ``cache`` records or supplies K/V."""
        out = self.decoder.layers[index](
            hidden,
            attention_mask=mask,
            position_ids=positions,
            position_embeddings=rotary,
            use_cache=False,
            **{self._cache_arg: cache},
        )
        return out[0] if isinstance(out, tuple) else out

    def run_prompt_layer(self, index: int, hidden: Tensor, masks: dict, rotary: tuple[Tensor, Tensor],
                         cache=None) -> Tensor:
        """Layer ``index`` over (B, T, H) right-padded prompts at positions 0..T-1 (``masks`` from
        :meth:`causal_masks`, ``rotary`` from :meth:`embed_batch`, trimmed here to T)."""
        t = hidden.shape[1]
        cos, sin = rotary
        return self.run_layer(index, hidden, mask=masks[self.layer_kinds[index]],
                              positions=torch.arange(t, device=hidden.device)[None],
                              rotary=(cos[:, :t], sin[:, :t]), cache=cache)

    def head_logits(self, layer: int, last: Tensor) -> Tensor:
        """(B, H) last-token states at ``layer`` -> (B, 2) Yes/No logits of that layer's head."""
        if layer == self.num_layers:
            return answer_logits(self.decoder.norm, self.causal_lm.get_output_embeddings(), last, self.answer_ids)
        return self.heads[str(layer)].answer_logits(last, self.answer_ids)

    def p_yes(self, layer: int, last: Tensor) -> Tensor:
        """(B, H) -> (B,) float32 P(yes) of the head at ``layer`` (bidimensional softmax)."""
        return self.head_logits(layer, last).float().softmax(-1)[:, 0]

    # --- training / calibration -------------------------------------------------------------------

    def exit_hidden_states(self, input_ids: Tensor, attention_mask: Tensor, soft: Tensor | None = None) -> Tensor:
        """(B, T) ids + mask -> (B, E, H) last-token hidden states at each answering layer (pre-norm).

        E = len(answer_layers); the last entry is layer N before the final norm. The backbone is not
        differentiated here (``no_grad``): heads train on these states (paper 5.2, frozen backbone).
        """
        with torch.no_grad():
            hidden, lengths, rotary = self.embed_batch(input_ids, attention_mask, soft)
            masks = self.causal_masks(hidden)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            states = []
            for index in range(self.num_layers):
                hidden = self.run_prompt_layer(index, hidden, masks, rotary)
                if index + 1 in self.answer_layers:
                    states.append(hidden[rows, lengths - 1])  # (B, H)
        return torch.stack(states, dim=1)  # (B, E, H)

    def answer_logits_from_states(self, states: Tensor) -> Tensor:
        """(B, E, H) states from :meth:`exit_hidden_states` -> (B, E, 2) Yes/No logits per answering layer."""
        return torch.stack(
            [self.head_logits(layer, states[:, i]) for i, layer in enumerate(self.answer_layers)], dim=1
        )

    def forward_all_exits(self, input_ids: Tensor, attention_mask: Tensor, soft: Tensor | None = None) -> Tensor:
        """(B, T) -> (B, E, 2) Yes/No logits of every answering layer's head (no early exit)."""
        return self.answer_logits_from_states(self.exit_hidden_states(input_ids, attention_mask, soft))

    def exit_losses(self, states: Tensor, targets: Tensor) -> Tensor:
        r""":math:`L^{(\ell)}_{exit} = -\log p^{(\ell)}(y|x)` per exit head (see :meth:`ExitHead.loss`).

        Args:
            states: (B, E, H) from :meth:`exit_hidden_states` (the last column, layer N, is ignored).
            targets: (B,) the answer token id y ("Yes" or "No").

        Returns:
            (len(exit_layers),) mean loss of each head.
        """
        return torch.stack([self.heads[str(layer)].loss(states[:, i], targets)
                            for i, layer in enumerate(self.exit_layers)])

    def configure_head_optimizer(self, *, lambda0: float, beta: float) -> torch.optim.Optimizer:
        r"""AdamW with one param group per head, :math:`\lambda_n = \lambda_0 e^{-\beta d_n}` (paper 5.2)."""
        rates = depth_learning_rates(lambda0, beta, self.exit_layers)
        groups = [
            {"params": list(self.heads[str(layer)].parameters()), "lr": lr, "layer": layer}
            for layer, lr in zip(self.exit_layers, rates)
        ]
        return torch.optim.AdamW(groups, weight_decay=0.0)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Right-padded (B, T) ids and (B, T) attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _cache_arg(function) -> str:
    """The name under which ``function`` takes its KV cache: ``cache`` since transformers 5.x
    renamed it, ``past_key_values`` before (still accepted there, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


_MASK_CACHE_ARG = _cache_arg(create_causal_mask)


def right_padded_lengths(attention_mask: Tensor) -> Tensor:
    """(B, T) mask -> (B,) lengths; refuses left padding or empty rows (they would read a pad)."""
    mask = attention_mask.to(torch.bool)
    if mask.shape[1] == 0 or not bool(mask[:, 0].all()):
        raise ValueError("every row needs at least one token and right padding (real tokens first)")
    if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("attention_mask must be right-padded: a real token follows a pad")
    return mask.sum(dim=1)


def _layer_kinds(config, num_layers: int) -> list[str]:
    """Mask kind of each layer: ``config.layer_types`` (Qwen2), else sliding when the config slides (Mistral)."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)[:num_layers]
    sliding = getattr(config, "sliding_window", None)
    return ["sliding_attention" if sliding else "full_attention"] * num_layers


def resolve_dtype(name: str | None) -> torch.dtype:
    """``auto`` -> bfloat16 where the CPU has AMX/AVX512-BF16 (or on CUDA), else float32."""
    if name in (None, "float32", "fp32"):
        return torch.float32
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if (amx or avx_bf16) else torch.float32
    raise ValueError(f"dtype must be auto, bfloat16 or float32, got {name!r}")
