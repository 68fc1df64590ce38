r"""Stage 2: train the exit heads on a frozen backbone (paper section 5.2).

Each head :math:`\ell` minimises

.. math::  L^{(\ell)}_{exit} = -\log p^{(\ell)}(y \mid x)

(full-vocabulary softmax of the head at the prompt's last position), in its own AdamW param group
with the depth-aware rate :math:`\lambda_n = \lambda_0 e^{-\beta d_n}` (``ranker_svc.exits``). The
backbone is frozen, so each example's last-token hidden states at the exit layers are computed
once and the heads train on that cache for every epoch (memory: N x E x H floats).

Heads start as copies of the final head. Small vocabularies train full-vocabulary heads (the
paper's loss); when ``V x H x heads`` exceeds ``FULL_VOCAB_HEAD_PARAMS`` (a 7B model: 6 x 131 M
parameters) the heads hold only the "Yes"/"No" rows and train on the bidimensional softmax, which
is all serving reads. Either way the artifact stores the two rows per head.

    .venv/bin/python -m trainer fit-heads --data data/synth --out artifacts --lambda0 1e-3 --beta 0.1 --heads-epochs 5
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from torch import nn

from exitrank.types import RankExample
from ranker_svc.artifact import load_ranker, save_heads
from ranker_svc.model import EarlyExitLM, ExitHead, pad_right
from trainer.stats import auc
from trainer.tune import encode_examples
from trainer.tune_loop import batches

FULL_VOCAB_HEAD_PARAMS = 50_000_000


def exit_states(model: EarlyExitLM, ids: list[list[int]], pad_id: int, *, batch_size: int = 32,
                soft: torch.Tensor | None = None) -> torch.Tensor:
    """(N, E, H) last-token hidden states at every answering layer, rows in input order.

    ``soft``: the vectors the prompts' virtual ids index (collaborative soft tokens), or None."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch
    out: list[torch.Tensor | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, mask = pad_right([ids[i] for i in chunk], pad_id, model.answer_ids.device)
        states = model.exit_hidden_states(input_ids, mask, soft)  # (b, E, H)
        for row, i in enumerate(chunk):
            out[i] = states[row]
    return torch.stack(out)  # type: ignore[arg-type]


def fit_heads(
    train: list[RankExample],
    *,
    ranker_dir: Path,
    exit_layers: list[int] | None = None,
    lambda0: float = 1e-3,
    beta: float = 0.1,
    epochs: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    full_vocab: bool | None = None,
    log=None,
) -> dict:
    """Trains fresh heads (copies of the final head) at the artifact's (or ``exit_layers``) layers; saves them.

    Args:
        full_vocab: full-vocabulary heads; None: when ``V x H x heads <= FULL_VOCAB_HEAD_PARAMS``.
        log: ``log(message)`` for a line once the frozen states are computed and one per epoch
            (None: silent); ``progress`` adds a bar.

    Returns:
        ``{"epoch_losses": {layer: [...]}, "train_auc": {layer: auc}, "learning_rates": {layer: lr}, ...}``
    """
    if not train:
        raise ValueError("train must hold at least one example")
    torch.manual_seed(seed)
    started = time.perf_counter()
    loaded = load_ranker(ranker_dir, dtype=torch.float32)
    model = _fresh_heads(loaded.model, exit_layers, full_vocab)
    model.requires_grad_(False)  # the backbone and the soft-token projector stay frozen
    model.heads.requires_grad_(True)
    max_tokens = int(getattr(model.causal_lm.config, "max_position_embeddings", 2048))
    table = model.soft_table()
    ids, targets = encode_examples(train, loaded.prompt, loaded.tokenizer, max_tokens=max_tokens,
                                   answer_ids=(model.yes_token_id, model.no_token_id), table=table)
    states = exit_states(model, ids, loaded.tokenizer.pad_token_id or 0,
                         soft=table.tensor() if table is not None else None)  # (N, E, H)
    if log is not None:
        log(f"fit-heads: hidden states of {len(ids)} examples at {len(model.answer_layers)} layers "
            f"in {time.perf_counter() - started:.1f}s")
    optimizer = model.configure_head_optimizer(lambda0=lambda0, beta=beta)
    losses = _train_heads(model, optimizer, states, targets, epochs=epochs, batch_size=batch_size,
                          seed=seed, progress=progress, log=log)
    model.eval()
    with torch.no_grad():
        p_yes = model.answer_logits_from_states(states).float().softmax(-1)[..., 0]  # (N, E)
    labels = [ex.label for ex in train]
    metrics = {
        "exit_layers": list(model.exit_layers),
        "epoch_losses": {str(layer): losses[:, i].tolist() for i, layer in enumerate(model.exit_layers)},
        "train_auc": {str(layer): auc(labels, p_yes[:, i].tolist()) for i, layer in enumerate(model.answer_layers)},
        "learning_rates": {str(g["layer"]): g["lr"] for g in optimizer.param_groups},
        "lambda0": lambda0, "beta": beta, "epochs": epochs, "train_examples": len(train),
        "head_vocab": "full" if model.heads[str(model.exit_layers[0])].full_vocab else "answer",
    }
    save_heads(ranker_dir, model, metrics=metrics)
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def _fresh_heads(model: EarlyExitLM, exit_layers: list[int] | None, full_vocab: bool | None) -> EarlyExitLM:
    """The backbone with new heads, full-vocabulary or answer-row (see the module docstring)."""
    layers = sorted(set(exit_layers)) if exit_layers is not None else list(model.exit_layers)
    lm_head = model.causal_lm.get_output_embeddings()
    if full_vocab is None:
        full_vocab = lm_head.out_features * lm_head.in_features * len(layers) <= FULL_VOCAB_HEAD_PARAMS
    rows = None if full_vocab else (model.yes_token_id, model.no_token_id)
    heads = nn.ModuleDict({str(layer): ExitHead.from_final(model.causal_lm, rows=rows) for layer in layers})
    return EarlyExitLM(causal_lm=model.causal_lm, yes_token_id=model.yes_token_id, no_token_id=model.no_token_id,
                       exit_layers=layers, heads=heads, collab=model.collab)


def _train_heads(model: EarlyExitLM, optimizer, states, targets, *, epochs, batch_size, seed, progress,
                 log=None) -> np.ndarray:
    """Sum of the heads' losses per step (each head only receives its own gradient); (epochs, heads) means."""
    rng = random.Random(seed)
    started = time.perf_counter()
    model.heads.train()
    history = []
    steps = epochs * ((len(states) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="exit heads", disable=not progress)
    for _ in range(epochs):
        epoch = []
        for chunk in batches(len(states), batch_size, shuffle=True, rng=rng):
            per_head = model.exit_losses(states[chunk], targets[chunk])  # (heads,)
            optimizer.zero_grad(set_to_none=True)
            per_head.sum().backward()
            optimizer.step()
            epoch.append(per_head.detach().numpy())
            bar.update(1)
        history.append(np.mean(epoch, axis=0))
        if log is not None:
            log(f"fit-heads: epoch {len(history)}/{epochs} mean loss per head {float(history[-1].mean()):.4f} "
                f"in {time.perf_counter() - started:.1f}s")
    bar.close()
    return np.stack(history)
