r"""Stage 1: instruction-tune the decoder on the Yes/No answer token (paper section 5.2).

.. math::  L_{CE} = -\log p(y \mid x)

with :math:`x` the prompt (``ranker_svc.prompt``) and :math:`y` the answer token " Yes" (label 1)
or " No" (label 0), over the full vocabulary at the prompt's last position, read as the next token
(TALLRec's formulation). A fresh model (``--preset tiny|small``) or a small base model is fully
fine-tuned; a pretrained model above ``LORA_AUTO_PARAMS`` parameters (``--base-model smollm2-135m``)
gets LoRA adapters (peft) on the attention and MLP projections, merged before saving. The loop, the
dtype choice and the FLOP count are in ``trainer.tune_loop``.

No collapsed models: the tuned model is written under a staging name, scored on the validation
examples, and only then moved to ``out_dir/ranker``; a model that scores everything alike, or whose
validation AUC is at chance while its training loss fell (``trainer.stats.collapse_reason``), raises
:class:`TrainingFailed` and leaves no artifact.

    .venv/bin/python -m trainer tune --data data/synth --out artifacts --preset tiny --epochs 8
    .venv/bin/python -m trainer tune --data data/tallrec --out artifacts --base-model smollm2-135m --max-train 256
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from exitrank.types import RankExample
from ranker_svc.artifact import load_ranker, save_ranker
from ranker_svc.exits import ExitPolicy
from ranker_svc.model import default_exit_layers
from ranker_svc.prompt import PromptBuilder, PromptConfig
from ranker_svc.prompt import encode_examples as ranker_examples
from ranker_svc.collab import CollabProjector, SoftTable
from ranker_svc.scoring import Scorer
from trainer.lm import answer_token_ids, build_model, build_tokenizer, ensure_collab_token, load_base_model
from trainer.errors import TrainingFailed
from trainer.stats import auc, collapse_reason
from trainer.tune_loop import BestEpoch, answer_scores, train_answers

LORA_AUTO_PARAMS = 50_000_000  # above this, full fine-tuning on CPU is impractical: use LoRA
# attention and MLP projections (Llama, Qwen2, Mistral names): TALLRec adapts attention only; the MLP
# holds most of a small model's weights, and adapting it too is what QLoRA found to matter
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]



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
    amp: bool | None = None,
    collab_dim: int = 0,
    embedding_version: str = "",
    lora_rank: int = 8,
    allow_collapse: bool = False,
    keep_best_epoch: bool = False,
    log=None,
) -> dict:
    """Trains the answer token and writes ``out_dir/ranker/``; returns metrics.

    Args:
        lr: default 3e-3 for a fresh model, 2e-5 for full fine-tuning a base model, 2e-4 for LoRA.
        lora: None: LoRA only for base models above ``LORA_AUTO_PARAMS`` parameters.
        prompt: rendering settings; default :func:`infer_prompt_config` on ``train``.
        amp: bfloat16 autocast for the forward and backward passes (weights and optimiser stay
            float32); None: where the hardware multiplies bf16 natively (``trainer.tune_loop``).
        lora_rank: r of the LoRA adapters (alpha = 2r).
        allow_collapse: write the artifact even when the model collapsed (tests of other stages).
        keep_best_epoch: with ``valid``, score it after every ``ceil(epochs / 4)`` epochs (and the
            last) and write the weights of the epoch with the best validation AUC (few-shot runs,
            which overfit their samples); ``best_epoch`` and ``epoch_valid_aucs`` join the metrics.
        log: ``log(message)`` for one line per epoch (None: silent); ``progress`` adds a bar.
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
    lr = lr or (3e-4 if use_lora else 3e-3 if base_model is None else 2e-5)
    trainable = _attach_lora(causal_lm, lora_rank) if use_lora else causal_lm
    max_tokens = int(getattr(causal_lm.config, "max_position_embeddings", 2048))
    projector, table = _collab(prompt, tokenizer, causal_lm, collab_dim, embedding_version)
    ids, targets = encode_examples(train, builder, tokenizer, max_tokens=max_tokens, answer_ids=answer_ids,
                                   table=table)
    valid_ids = (encode_examples(valid, builder, tokenizer, max_tokens=max_tokens, answer_ids=answer_ids,
                                 table=table)[0] if keep_best_epoch and valid else None)
    soft = table.tensor() if table is not None else None
    reporters = _reporters(epochs, len(ids), batch_size, progress, log)
    best = BestEpoch(trainable, projector) if valid_ids is not None else None
    if best is not None:
        reporters["on_epoch"] = _validating(reporters["on_epoch"], best, epochs, lambda: auc(
            [ex.label for ex in valid], answer_scores(causal_lm, valid_ids, answer_ids, tokenizer.pad_token_id or 0,
                                                      batch_size=batch_size, projector=projector, soft=soft)))
    run = train_answers(causal_lm, trainable, ids, targets, tokenizer.pad_token_id or 0, epochs=epochs, lr=lr,
                        batch_size=batch_size, seed=seed, amp=amp, projector=projector, soft=soft,
                        weights_train=not use_lora, **reporters)
    if best is not None:
        best.restore()
        run["best_epoch"] = best.epoch
        run["epoch_valid_aucs"] = {str(epoch): round(value, 4) for epoch, value in best.aucs.items()}
    if use_lora:
        causal_lm = trainable.merge_and_unload()
    metrics = {"train_loss": run["epoch_losses"][-1], "lr": lr, "lora": use_lora,
               "lora_rank": lora_rank if use_lora else None, "num_parameters": n_params,
               "train_examples": len(train), "epochs": epochs, "mean_prompt_tokens": round(float(np.mean(
                   [len(i) for i in ids])), 1), **{k: v for k, v in run.items() if k != "step_losses"}}
    staging = Path(out_dir) / ".ranker-staging"
    save_ranker(staging, causal_lm=causal_lm.eval(), tokenizer=tokenizer, prompt=prompt,
                exit_layers=default_exit_layers(causal_lm.config.num_hidden_layers),
                policy=ExitPolicy(disabled=True), metrics={"tune": metrics},
                collab=projector.eval() if projector is not None else None, embedding_version=embedding_version)
    if valid:
        labels, scores = evaluate_scores(staging, valid, batch_size=batch_size)
        metrics["valid_auc"] = auc(labels, scores)
        reason = collapse_reason(labels, scores, run["step_losses"])
        if reason is not None and not allow_collapse:
            shutil.rmtree(staging, ignore_errors=True)
            raise TrainingFailed(f"instruction tuning failed: {reason}; no artifact written "
                                 "(more or other training data, more epochs or a pretrained --base-model)")
        metrics["collapsed"] = reason
    ranker_dir = Path(out_dir) / "ranker"
    if ranker_dir.exists():
        shutil.rmtree(ranker_dir)
    staging.rename(ranker_dir)
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def _reporters(epochs: int, examples: int, batch_size: int, progress: bool, log) -> dict:
    """``on_step`` (a tqdm bar when ``progress``) and ``on_epoch`` (one ``log`` line per epoch)."""
    bar = tqdm(total=epochs * math.ceil(examples / batch_size), desc="instruction tuning", disable=not progress)

    def on_step(loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    def on_epoch(epoch: int, loss: float, seconds: float) -> None:
        if epoch == epochs:
            bar.close()
        if log is not None:
            log(f"tune: epoch {epoch}/{epochs} mean loss {loss:.4f} in {seconds:.1f}s")

    return {"on_step": on_step, "on_epoch": on_epoch}


def _validating(on_epoch: Callable[[int, float, float], None], best: BestEpoch, epochs: int,
               valid_auc: Callable[[], float]) -> Callable[[int, float, float], None]:
    """``on_epoch`` that also scores the validation prompts every ``ceil(epochs / 4)`` epochs and
    the last (``best``'s modules in eval mode meanwhile), recording each AUC in ``best``."""
    every = math.ceil(epochs / 4)

    def on_epoch_validated(epoch: int, loss: float, seconds: float) -> None:
        on_epoch(epoch, loss, seconds)
        if epoch % every and epoch != epochs:
            return
        for module in best.modules:
            module.eval()
        best.update(epoch, valid_auc())
        for module in best.modules:
            module.train()

    return on_epoch_validated


def evaluate_scores(ranker_dir: Path, examples: list[RankExample], *, batch_size: int = 32
                    ) -> tuple[list[int], list[float]]:
    """Labels and full-depth CTRs (exits disabled) through the serving code path."""
    scorer = Scorer(loaded=load_ranker(ranker_dir))
    decisions = scorer.score_examples(examples, ExitPolicy(disabled=True), batch_size=batch_size)
    return [ex.label for ex in examples], [d.ctr for d in decisions]


def evaluate_auc(ranker_dir: Path, examples: list[RankExample], *, batch_size: int = 32) -> float:
    """AUC of the full-depth model (exits disabled) through the serving code path."""
    return auc(*evaluate_scores(ranker_dir, examples, batch_size=batch_size))


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


def _attach_lora(causal_lm: PreTrainedModel, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(causal_lm, config)
