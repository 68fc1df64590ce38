r"""Multi-head early exit over a transformers decoder (torch only).

References:
    - Zhou et al., "The Efficiency vs. Accuracy Trade-off: Optimizing RAG-Enhanced LLM Recommender
      Systems Using Multi-Head Early Exit", sections 3 (bidimensional softmax) and 5 (exit heads,
      Dynamic Predictive Exiting).
    - Chuang et al., "DoLa" (2024): intermediate layers already decode through the final head.

The pieces, top-down:
    1. ``answer_logits``: a language head restricted to the "Yes"/"No" rows.
    2. ``ExitHead``: norm + linear head mounted at an exit layer (paper 5.2).
    3. ``EarlyExitLM``: drives any ``AutoModelForCausalLM`` decoder (Llama, Qwen2, Mistral families)
       layer by layer, checks the exit heads, and removes settled rows from the batch.

Batches are RIGHT-padded (real tokens first). Under a causal mask a real token only attends to
positions before it, which are all real, so the padding never reaches the answer position and the
layers run with the plain causal mask; the answer is read at each row's last real token.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ranker_svc.exits import ExitPolicy, ExitState, depth_learning_rates, exit_step

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
    V x H head converges in far fewer steps and never begins worse than the untuned baseline.
    """

    def __init__(self, *, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.proj = lm_head

    @classmethod
    def from_final(cls, causal_lm: PreTrainedModel) -> "ExitHead":
        """A head initialised from the model's own final norm and language head (copies)."""
        norm = copy.deepcopy(causal_lm.base_model.norm)
        src = causal_lm.get_output_embeddings()
        proj = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None)
        proj.to(device=src.weight.device, dtype=src.weight.dtype)
        with torch.no_grad():
            proj.weight.copy_(src.weight)
            if src.bias is not None:
                proj.bias.copy_(src.bias)
        return cls(norm=norm, lm_head=proj)

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., H) -> (..., V) full-vocabulary logits (training: :math:`-\\log p^{(\\ell)}(y|x)`)."""
        return self.proj(self.norm(hidden))

    def answer_logits(self, hidden: Tensor, answer_ids: Tensor) -> Tensor:
        """(B, H) -> (B, 2) "Yes"/"No" logits only (inference)."""
        return answer_logits(self.norm, self.proj, hidden, answer_ids)


def default_exit_layers(num_layers: int, count: int = DEFAULT_EXIT_COUNT) -> list[int]:
    """``count`` evenly spaced exit layers below the last: 32 layers -> 5, 10, ..., 30; 6 -> 1..5."""
    step = max(1, num_layers // count)
    return [step * i for i in range(1, count + 1) if step * i < num_layers]


class EarlyExitLM(nn.Module):
    r"""A causal LM whose layers run one by one, with exit heads answering "Yes"/"No" early.

    For a row, the answering layers are ``exit_layers`` (each with an :class:`ExitHead`) followed by
    the last layer N, which answers with the model's own final norm and ``lm_head``. At each exit
    layer :func:`ranker_svc.exits.exit_step` decides which rows have settled; those rows leave the
    batch and the rest continue on a compacted batch (hidden states, lengths, criterion state).

    Args:
        causal_lm: any transformers decoder-only ``*ForCausalLM`` (Llama, Qwen2, Mistral families).
        yes_token_id: vocabulary index a of "Yes".
        no_token_id: vocabulary index b of "No".
        exit_layers: 1-based layers in 1..N-1 that get heads (default: :func:`default_exit_layers`).
        heads: trained heads keyed by ``str(layer)``; default: copies of the final head.
    """

    def __init__(
        self,
        *,
        causal_lm: PreTrainedModel,
        yes_token_id: int,
        no_token_id: int,
        exit_layers: Sequence[int] | None = None,
        heads: nn.ModuleDict | None = None,
    ) -> None:
        super().__init__()
        self.causal_lm = causal_lm
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
        self.register_buffer("answer_ids", torch.tensor([yes_token_id, no_token_id]), persistent=False)
        self._layer_kinds = _layer_kinds(causal_lm.config, self.num_layers)

    @property
    def yes_token_id(self) -> int:
        return int(self.answer_ids[0])

    @property
    def no_token_id(self) -> int:
        return int(self.answer_ids[1])

    # --- the layer loop -------------------------------------------------------------------------

    def _embed(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Token embeddings of the right-padded batch, each row's length, rotary (cos, sin)."""
        lengths = _right_padded_lengths(attention_mask)  # (B,)
        t = int(lengths.max())
        hidden = self.causal_lm.get_input_embeddings()(input_ids[:, :t])  # (B, T, H)
        positions = torch.arange(t, device=hidden.device)[None]  # (1, T)
        rotary = self.decoder.rotary_emb(hidden, positions)  # 2 x (1, T, head_dim)
        return hidden, lengths, rotary

    def _masks(self, hidden: Tensor) -> dict[str, Tensor | None]:
        """The causal mask per layer kind; None lets SDPA use its causal kernel."""
        kwargs = {"config": self.causal_lm.config, "inputs_embeds": hidden, "attention_mask": None,
                  "past_key_values": None, "position_ids": None}
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in self._layer_kinds:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def _layer(self, index: int, hidden: Tensor, masks: dict, rotary: tuple[Tensor, Tensor]) -> Tensor:
        """Decoder layer ``index`` (0-based) on (B, T, H) -> (B, T, H)."""
        t = hidden.shape[1]
        cos, sin = rotary
        out = self.decoder.layers[index](
            hidden,
            attention_mask=masks[self._layer_kinds[index]],
            position_ids=torch.arange(t, device=hidden.device)[None],
            position_embeddings=(cos[:, :t], sin[:, :t]),
            past_key_values=None,
            use_cache=False,
        )
        return out[0] if isinstance(out, tuple) else out

    def _head_logits(self, layer: int, last: Tensor) -> Tensor:
        """(B, H) last-token states at ``layer`` -> (B, 2) Yes/No logits of that layer's head."""
        if layer == self.num_layers:
            return answer_logits(self.decoder.norm, self.causal_lm.get_output_embeddings(), last, self.answer_ids)
        return self.heads[str(layer)].answer_logits(last, self.answer_ids)

    # --- training / calibration -------------------------------------------------------------------

    def exit_hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) ids + mask -> (B, E, H) last-token hidden states at each answering layer (pre-norm).

        E = len(answer_layers); the last entry is layer N before the final norm. The backbone is not
        differentiated here (``no_grad``): heads train on these states (paper 5.2, frozen backbone).
        """
        with torch.no_grad():
            hidden, lengths, rotary = self._embed(input_ids, attention_mask)
            masks = self._masks(hidden)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            states = []
            for index in range(self.num_layers):
                hidden = self._layer(index, hidden, masks, rotary)
                if index + 1 in self.answer_layers:
                    states.append(hidden[rows, lengths - 1])  # (B, H)
        return torch.stack(states, dim=1)  # (B, E, H)

    def answer_logits_from_states(self, states: Tensor) -> Tensor:
        """(B, E, H) states from :meth:`exit_hidden_states` -> (B, E, 2) Yes/No logits per answering layer."""
        return torch.stack(
            [self._head_logits(layer, states[:, i]) for i, layer in enumerate(self.answer_layers)], dim=1
        )

    def forward_all_exits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) -> (B, E, 2) Yes/No logits of every answering layer's head (no early exit)."""
        return self.answer_logits_from_states(self.exit_hidden_states(input_ids, attention_mask))

    def exit_losses(self, states: Tensor, targets: Tensor) -> Tensor:
        r""":math:`L^{(\ell)}_{exit} = -\log p^{(\ell)}(y|x)` over the full vocabulary, per exit head.

        Args:
            states: (B, E, H) from :meth:`exit_hidden_states` (the last column, layer N, is ignored).
            targets: (B,) the answer token id y ("Yes" or "No").

        Returns:
            (len(exit_layers),) mean loss of each head.
        """
        return torch.stack(
            [F.cross_entropy(self.heads[str(layer)](states[:, i]).float(), targets)
             for i, layer in enumerate(self.exit_layers)]
        )

    def configure_head_optimizer(self, *, lambda0: float, beta: float) -> torch.optim.Optimizer:
        r"""AdamW with one param group per head, :math:`\lambda_n = \lambda_0 e^{-\beta d_n}` (paper 5.2)."""
        rates = depth_learning_rates(lambda0, beta, self.exit_layers)
        groups = [
            {"params": list(self.heads[str(layer)].parameters()), "lr": lr, "layer": layer}
            for layer, lr in zip(self.exit_layers, rates)
        ]
        return torch.optim.AdamW(groups, weight_decay=0.0)

    # --- serving ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, input_ids: Tensor, attention_mask: Tensor, policy: ExitPolicy) -> tuple[Tensor, Tensor]:
        """CTR and exit layer of each row, exiting rows as soon as ``policy`` says they settled.

        Args:
            input_ids: (B, T) right-padded token ids.
            attention_mask: (B, T) 1 for real tokens.
            policy: the exit policy (``disabled``: every row runs all N layers).

        Returns:
            ``(ctr (B,) float32 in (0, 1), exit_layer (B,) long, 1-based)``.
        """
        hidden, lengths, rotary = self._embed(input_ids, attention_mask)
        b = hidden.shape[0]
        ctr = torch.empty(b, dtype=torch.float32, device=hidden.device)
        exit_layer = torch.full((b,), self.num_layers, dtype=torch.long, device=hidden.device)
        rows = torch.arange(b, device=hidden.device)  # original index of each live row
        state = ExitState.initial(b, hidden.device)
        masks = self._masks(hidden)
        for index in range(self.num_layers - 1):
            hidden = self._layer(index, hidden, masks, rotary)
            layer = index + 1
            if layer not in self.exit_layers or not _needs_head(policy, layer):
                continue
            live = torch.arange(hidden.shape[0], device=hidden.device)
            p_yes = self._head_logits(layer, hidden[live, lengths - 1]).float().softmax(-1)[:, 0]  # (b,)
            settled, state = exit_step(policy, state, p_yes, layer)
            if bool(settled.any()):
                ctr[rows[settled]] = p_yes[settled]
                exit_layer[rows[settled]] = layer
                keep = ~settled
                rows, lengths, state = rows[keep], lengths[keep], state.select(keep)
                if rows.numel() == 0:
                    return ctr, exit_layer
                hidden = hidden[keep][:, : int(lengths.max())]  # (b', T', H) compacted and trimmed
                masks = self._masks(hidden)
        hidden = self._layer(self.num_layers - 1, hidden, masks, rotary)
        live = torch.arange(hidden.shape[0], device=hidden.device)
        final = self._head_logits(self.num_layers, hidden[live, lengths - 1]).float().softmax(-1)[:, 0]
        ctr[rows] = final
        return ctr, exit_layer


def _needs_head(policy: ExitPolicy, layer: int) -> bool:
    """Whether the head at ``layer`` must run: the delta criterion needs every P_l for its D's."""
    if policy.disabled:
        return False
    return policy.criterion == "probability_delta" or layer >= policy.min_layer


def _right_padded_lengths(attention_mask: Tensor) -> Tensor:
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
