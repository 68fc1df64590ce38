r"""The instruction-tuning loop: the answer loss, length-bucketed batches, the dtype, the FLOP count.

.. math::  L_{CE} = -\log p(y \mid x)

over the full vocabulary at each prompt's last real token (the answer is read as the next token).

Where the time goes, and the choices made here (measured on 2 cores, SmolLM2-135M, LoRA):

* **dtype**: bf16 autocast only where the hardware multiplies bf16 natively (CUDA, CPUs with AMX or
  AVX512-BF16: ``ranker_svc.model.resolve_dtype("auto")``). Elsewhere PyTorch falls back to its
  reference GEMM (``cpublas_gemm_impl``) for bf16: a 2048^3 bf16 matmul ran at 0.2 GFLOP/s on an
  AVX2-only CPU where float32 ran at ~50. ``amp=None`` chooses; the metrics say what ran.
* **padding**: a batch is padded to its longest prompt, so batches are drawn from length buckets
  (rows of similar length together, bucket and batch order shuffled): fewer pad tokens computed.
* **the head**: the full-vocabulary head runs on the answer position only, never on all T.

:func:`training_flops` counts the multiply-adds a step performs (for the TFLOP/s the metrics
report beside the machine's matmul rate): per decoder layer, linear layers :math:`2 N_\ell T` forward
and as much again for the input gradient (plus as much for weight gradients when the weights train);
causal attention :math:`2 T^2 D` forward and twice that backward.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from ranker_svc.collab import CollabProjector, embed_tokens
from ranker_svc.model import pad_right, resolve_dtype

BUCKET_BATCHES = 8  # a length bucket holds this many batches: similar lengths, still shuffled


def answer_loss(causal_lm: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                projector: CollabProjector | None = None, soft: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`-\\log p(y|x)` at each row's last real token, full vocabulary, mean over the batch.

    With ``projector``, virtual ids take its projection of ``soft`` (trained with the model)."""
    return F.cross_entropy(next_token_logits(causal_lm, input_ids, mask, projector, soft), targets)


def next_token_logits(causal_lm: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor,
                      projector: CollabProjector | None = None, soft: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) float32 logits of the token after each row's last real token (right-padded rows)."""
    embeds = embed_tokens(causal_lm.get_input_embeddings(), projector, input_ids, soft)
    hidden = causal_lm.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, T, H)
    last = hidden[torch.arange(hidden.shape[0]), mask.sum(dim=1) - 1]  # (B, H)
    return causal_lm.get_output_embeddings()(last).float()


@torch.inference_mode()
def answer_scores(causal_lm: PreTrainedModel, ids: list[list[int]], answer_ids: tuple[int, int], pad_id: int, *,
                  batch_size: int, projector: CollabProjector | None = None, soft: torch.Tensor | None = None
                  ) -> list[float]:
    """P(yes) per prompt, the softmax over the "Yes"/"No" logits (the CTR serving computes at full
    depth), from the model being trained: validation between epochs without writing an artifact."""
    device = next(causal_lm.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    scores = [0.0] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, mask = pad_right([ids[i] for i in chunk], pad_id, device)
        pair = next_token_logits(causal_lm, input_ids, mask, projector, soft)[:, list(answer_ids)]
        for i, p in zip(chunk, pair.softmax(dim=-1)[:, 0].tolist()):
            scores[i] = p
    return scores


class BestEpoch:
    """Keeps a copy of the trainable weights at the epoch with the best validation AUC, and puts
    them back at the end: a run that overfits its few samples ends at its best epoch, not its last."""

    def __init__(self, *modules: nn.Module | None) -> None:
        self.modules = [m for m in modules if m is not None]
        self.epoch, self.auc, self.aucs, self.state = 0, -1.0, {}, None

    def update(self, epoch: int, auc: float) -> bool:
        """Record ``auc`` for ``epoch``; copies the weights when it is the best so far (True)."""
        self.aucs[epoch] = auc
        if auc <= self.auc:
            return False
        self.epoch, self.auc = epoch, auc
        self.state = [{n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
                      for m in self.modules]
        return True

    def restore(self) -> None:
        """The best epoch's weights back into the modules (nothing when none was recorded)."""
        if self.state is None:
            return
        for module, saved in zip(self.modules, self.state):
            module.load_state_dict(saved, strict=False)  # the trainable parameters; the rest stay


def batches(n: int, batch_size: int, *, shuffle: bool, rng: random.Random) -> list[list[int]]:
    """Consecutive (or shuffled) index batches of ``range(n)``."""
    order = list(range(n))
    if shuffle:
        rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches whose rows have similar lengths: a shuffled order is cut into buckets of
    ``BUCKET_BATCHES`` batches, each bucket sorted by length and cut into batches, and the batches
    shuffled. Every index appears once."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bucket = batch_size * BUCKET_BATCHES
    out = []
    for start in range(0, len(order), bucket):
        ranked = sorted(order[start : start + bucket], key=lambda i: lengths[i])
        out += [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]
    rng.shuffle(out)
    return out


def autocast_dtype(amp: bool | None, device: torch.device) -> torch.dtype | None:
    """bf16 when ``amp`` is True, or None (auto) on hardware with native bf16 matmuls; else None (fp32)."""
    if amp is None:
        amp = device.type == "cuda" or resolve_dtype("auto") == torch.bfloat16
    return torch.bfloat16 if amp else None


def autocast(dtype: torch.dtype | None, device: torch.device):
    """``torch.autocast`` to ``dtype`` (from :func:`autocast_dtype`) on ``device``; off when it is None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def layer_linear_params(causal_lm: PreTrainedModel) -> int:
    """Weights of the decoder layers' linear maps (what a token multiplies through, embeddings excluded)."""
    return sum(m.weight.numel() for layer in causal_lm.base_model.layers for name, m in layer.named_modules()
               if isinstance(m, nn.Linear) and "lora_" not in name)  # peft's lora_A/lora_B: tiny, not counted


def training_flops(causal_lm: PreTrainedModel, batch_rows: int, padded_length: int, *,
                   weights_train: bool) -> float:
    """Floating-point operations of one training step on a (rows, T) batch (module docstring)."""
    config = causal_lm.config
    tokens = batch_rows * padded_length
    linear = 2 * layer_linear_params(causal_lm) * tokens * (3 if weights_train else 2)
    heads_dim = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    attention = 2 * batch_rows * padded_length**2 * heads_dim * config.num_hidden_layers * 3
    return float(linear + attention)


def train_answers(causal_lm: PreTrainedModel, trainable: nn.Module, ids: list[list[int]], targets: torch.Tensor,
                  pad_id: int, *, epochs: int, lr: float, batch_size: int, seed: int, amp: bool | None = None,
                  projector: CollabProjector | None = None, soft: torch.Tensor | None = None,
                  weights_train: bool = True, on_step: Callable[[float], None] | None = None,
                  on_epoch: Callable[[int, float, float], None] | None = None) -> dict:
    """AdamW with warm-up and cosine decay over length-bucketed batches.

    Returns ``epoch_losses``, ``step_losses``, ``seconds``, ``flops``, ``tflops_achieved``, ``dtype``
    and ``pad_fraction`` (the share of computed tokens that were padding). ``on_step(loss)`` and
    ``on_epoch(epoch, mean_loss, seconds)`` report progress.
    """
    rng = random.Random(seed)
    params = [p for p in trainable.parameters() if p.requires_grad]
    if projector is not None:
        params += list(projector.parameters())
        projector.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(ids) / batch_size)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    device = next(causal_lm.parameters()).device
    dtype = autocast_dtype(amp, device)
    lengths = [len(row) for row in ids]
    losses, steps_seen, flops, computed = [], [], 0.0, 0
    causal_lm.train()
    started = time.perf_counter()
    for epoch in range(epochs):
        epoch_started, epoch_losses = time.perf_counter(), []
        for chunk in length_batches(lengths, batch_size, rng):
            input_ids, mask = pad_right([ids[i] for i in chunk], pad_id, device)
            with autocast(dtype, device):
                loss = answer_loss(causal_lm, input_ids, mask, targets[chunk].to(device), projector, soft)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            flops += training_flops(causal_lm, *input_ids.shape, weights_train=weights_train)
            computed += input_ids.numel()
            epoch_losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(epoch_losses[-1])
        losses.append(float(np.mean(epoch_losses)))
        steps_seen += epoch_losses
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1], time.perf_counter() - epoch_started)
    causal_lm.eval()
    seconds = time.perf_counter() - started
    return {"epoch_losses": losses, "step_losses": steps_seen, "seconds": round(seconds, 3), "flops": flops,
            "tflops_achieved": round(flops / seconds / 1e12, 4),
            "dtype": "bfloat16-autocast" if dtype is not None else "float32",
            "pad_fraction": round(1 - sum(lengths) * epochs / max(1, computed), 4)}
