r"""Stage 1: instruction-tune the decoder on the Yes/No answer token (paper section 5.2).

.. math::  L_{CE} = -\log p(y \mid x)

with :math:`x` the prompt (``ranker_svc.prompt``) and :math:`y` the answer token " Yes" (label 1)
or " No" (label 0), over the full vocabulary at the prompt's last position. A fresh model
(``--preset tiny|small``) or a small base model is fully fine-tuned; a large base model
(> ``LORA_AUTO_PARAMS`` parameters) gets LoRA adapters (peft) that are merged before saving.

Writes ``out_dir/ranker/`` (the artifact with untrained exit heads and exits disabled) and returns
metrics. Run it through the trainer CLI (which builds the retrieval-augmented examples)::

    .venv/bin/python -m trainer tune --data data/synth --out artifacts --preset tiny --epochs 8
    .venv/bin/python -m trainer tune --data data/synth --out artifacts --base-model ~/models/qwen2-0.5b --lora
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from exitrank.types import RankExample
from ranker_svc.artifact import load_ranker, save_ranker
from ranker_svc.exits import ExitPolicy
from ranker_svc.model import default_exit_layers, pad_right
from ranker_svc.prompt import PromptBuilder, PromptConfig
from ranker_svc.prompt import encode_examples as ranker_examples
from ranker_svc.collab import CollabProjector, SoftTable, embed_tokens
from ranker_svc.scoring import Scorer
from trainer.lm import answer_token_ids, build_model, build_tokenizer, ensure_collab_token, load_base_model
from trainer.stats import auc

LORA_AUTO_PARAMS = 50_000_000  # above this, full fine-tuning on CPU is impractical: use LoRA
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def infer_prompt_config(examples: list[RankExample]) -> PromptConfig:
    """Binary liked/disliked for 0/1 (implicit) ratings, stars for explicit rating scales."""
    ratings = [h.rating for ex in examples for h in ex.context.history]
    ratings += [h.rating for ex in examples for n in ex.context.neighbors for h in n.history]
    if not ratings or max(ratings) <= 1.0:
        return PromptConfig(rating_style="binary", like_threshold=0.5)
    return PromptConfig(rating_style="stars")


def encode_examples(
    examples: list[RankExample], builder: PromptBuilder, tokenizer, *, max_tokens: int, answer_ids: tuple[int, int],
    table: SoftTable | None = None,
) -> tuple[list[list[int]], torch.Tensor]:
    """Prompt token ids per example and (N,) answer targets (" Yes" id for label 1, else " No").

    ``table``: soft-token slots are bound to the examples' vectors there (``ranker_svc.collab``).
    """
    ids = ranker_examples(examples, builder, tokenizer, max_tokens, table)
    targets = torch.tensor([answer_ids[0] if ex.label else answer_ids[1] for ex in examples], dtype=torch.long)
    return ids, targets


def batches(n: int, batch_size: int, *, shuffle: bool, rng: random.Random) -> list[list[int]]:
    order = list(range(n))
    if shuffle:
        rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def answer_loss(causal_lm: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                projector: CollabProjector | None = None, soft: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`-\\log p(y|x)` at each row's last real token, full vocabulary, mean over the batch.

    With ``projector``, virtual ids take its projection of ``soft`` (trained with the model)."""
    embeds = embed_tokens(causal_lm.get_input_embeddings(), projector, input_ids, soft)
    hidden = causal_lm.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, T, H)
    rows = torch.arange(hidden.shape[0])
    last = hidden[rows, mask.sum(dim=1) - 1]  # (B, H)
    logits = causal_lm.get_output_embeddings()(last).float()  # (B, V)
    return F.cross_entropy(logits, targets)


def instruction_tune(
    train: list[RankExample],
    *,
    out_dir: Path,
    valid: list[RankExample] | None = None,
    preset: str = "tiny",
    arch: str = "llama",
    base_model: Path | None = None,
    epochs: int = 1,
    lr: float | None = None,
    batch_size: int = 16,
    lora: bool | None = None,
    seed: int = 0,
    progress: bool = True,
    prompt: PromptConfig | None = None,
    vocab_size: int = 2048,
    amp: bool = False,
    collab_dim: int = 0,
    embedding_version: str = "",
) -> dict:
    """Trains the answer token and writes ``out_dir/ranker/``; returns metrics.

    Args:
        lr: default 3e-3 for a fresh model, 2e-5 for full fine-tuning a base model, 2e-4 for LoRA.
        lora: None: LoRA only for base models above ``LORA_AUTO_PARAMS`` parameters.
        prompt: rendering settings; default :func:`infer_prompt_config` on ``train``.
        amp: bfloat16 autocast for the forward and backward passes (weights and optimiser stay
            float32); ~1.5x faster for the small preset on CPUs with AMX.
        collab_dim, embedding_version: for a prompt with collaborative soft tokens
            (``prompt.collab`` "user" or "full"), the width of the LightGCN vectors the examples
            carry and their version; the projector is trained with the model.
    """
    if not train:
        raise ValueError("train must hold at least one example")
    torch.manual_seed(seed)
    started = time.perf_counter()
    prompt = prompt or infer_prompt_config(train)
    builder = PromptBuilder(config=prompt)
    tokenizer, causal_lm = _backbone(train, builder, base_model, preset, arch, seed, vocab_size)
    answer_ids = answer_token_ids(tokenizer, (prompt.answer_yes, prompt.answer_no))
    n_params = sum(p.numel() for p in causal_lm.parameters())
    use_lora = (base_model is not None and n_params > LORA_AUTO_PARAMS) if lora is None else lora
    lr = lr or (2e-4 if use_lora else 3e-3 if base_model is None else 2e-5)
    trainable = _attach_lora(causal_lm) if use_lora else causal_lm
    max_tokens = int(getattr(causal_lm.config, "max_position_embeddings", 2048))
    projector, table = _collab(prompt, tokenizer, causal_lm, collab_dim, embedding_version)
    ids, targets = encode_examples(train, builder, tokenizer, max_tokens=max_tokens, answer_ids=answer_ids,
                                   table=table)
    soft = table.tensor() if table is not None else None
    losses = _train(causal_lm, trainable, ids, targets, tokenizer.pad_token_id or 0, epochs=epochs, lr=lr,
                    batch_size=batch_size, seed=seed, progress=progress, amp=amp, projector=projector, soft=soft)
    if use_lora:
        causal_lm = trainable.merge_and_unload()
    metrics = {"train_loss": losses[-1], "epoch_losses": losses, "lr": lr, "lora": use_lora,
               "num_parameters": n_params, "train_examples": len(train), "epochs": epochs}
    ranker_dir = Path(out_dir) / "ranker"
    save_ranker(ranker_dir, causal_lm=causal_lm.eval(), tokenizer=tokenizer, prompt=prompt,
                exit_layers=default_exit_layers(causal_lm.config.num_hidden_layers),
                policy=ExitPolicy(disabled=True), metrics={"tune": metrics},
                collab=projector.eval() if projector is not None else None, embedding_version=embedding_version)
    if valid:
        metrics["valid_auc"] = evaluate_auc(ranker_dir, valid, batch_size=batch_size)
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def evaluate_auc(ranker_dir: Path, examples: list[RankExample], *, batch_size: int = 32) -> float:
    """AUC of the full-depth model (exits disabled) through the serving code path."""
    scorer = Scorer(loaded=load_ranker(ranker_dir))
    decisions = scorer.score_examples(examples, ExitPolicy(disabled=True), batch_size=batch_size)
    return auc([ex.label for ex in examples], [d.ctr for d in decisions])


def _backbone(train, builder, base_model, preset, arch, seed, vocab_size):
    if base_model is not None:
        return load_base_model(base_model)
    texts = [builder.full_text(ex.context, ex.title) for ex in train]
    answers = (builder.config.answer_yes, builder.config.answer_no)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size, answers=answers)
    return tokenizer, build_model(tokenizer, preset=preset, arch=arch, seed=seed)


def _collab(prompt: PromptConfig, tokenizer, causal_lm: PreTrainedModel, dim: int, embedding_version: str
            ) -> tuple[CollabProjector | None, SoftTable | None]:
    """The projector and the examples' soft-token table for a prompt with soft tokens, else (None, None)."""
    if prompt.collab == "none":
        return None, None
    if dim < 1 or not embedding_version:
        raise ValueError(f"prompt.collab={prompt.collab!r} needs collab_dim and embedding_version")
    token_id = ensure_collab_token(tokenizer, causal_lm)
    projector = CollabProjector(dim, causal_lm.config.hidden_size, token_id=token_id)
    table = SoftTable(vocab_size=causal_lm.get_input_embeddings().num_embeddings, placeholder_id=token_id, dim=dim)
    return projector, table


def _attach_lora(causal_lm: PreTrainedModel):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(causal_lm, config)


def _train(causal_lm, trainable, ids, targets, pad_id, *, epochs, lr, batch_size, seed, progress,
           amp: bool = False, projector: CollabProjector | None = None, soft: torch.Tensor | None = None
           ) -> list[float]:
    """AdamW with warm-up and cosine decay; returns the mean loss of each epoch."""
    rng = random.Random(seed)
    params = [p for p in trainable.parameters() if p.requires_grad]
    if projector is not None:
        params += list(projector.parameters())
        projector.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(ids) / batch_size)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    causal_lm.train()
    losses = []
    bar = tqdm(total=steps, desc="instruction tuning", disable=not progress)
    for _ in range(epochs):
        epoch = []
        for chunk in batches(len(ids), batch_size, shuffle=True, rng=rng):
            input_ids, mask = pad_right([ids[i] for i in chunk], pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = answer_loss(causal_lm, input_ids, mask, targets[chunk], projector, soft)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            epoch.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{epoch[-1]:.4f}")
        losses.append(float(np.mean(epoch)))
    bar.close()
    causal_lm.eval()
    return losses
