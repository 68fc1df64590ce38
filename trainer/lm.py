"""The ranker's language model: a byte-level BPE tokenizer trained on the prompts and a small decoder.

Either a fresh model (``build_tokenizer`` + ``build_model``: presets "tiny"/"small", archs
llama|qwen2|mistral) or any local transformers checkpoint (``load_base_model``, never a hub
download). Either way the answer strings " Yes"/" No" are made single tokens.

    .venv/bin/python -c "from trainer.lm import *; print(build_model(build_tokenizer(['Answer: Yes'] * 9, vocab_size=300)))"
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from trainer.models import resolve_base_model

ANSWERS = (" Yes", " No")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
PRESETS: dict[str, dict[str, int]] = {
    # ~0.2M parameters + embeddings: trains in a couple of minutes on 2 CPU cores.
    "tiny": {"hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 176, "max_position_embeddings": 1024},
    # ~6M parameters + embeddings.
    "small": {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "intermediate_size": 688, "max_position_embeddings": 2048},
}
ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def build_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 2048, answers: Sequence[str] = ANSWERS
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (the prompts), BOS prepended, right padding.

    Every answer string is guaranteed to be one token: when BPE did not merge it, it is added as
    a token (byte-level BPE has no unknown token, so any title still tokenizes).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_with_answers(texts, answers), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    missing = [a for a in answers if len(tok.encode(a, add_special_tokens=False).ids) != 1]
    if missing:
        tok.add_tokens([AddedToken(a, normalized=False) for a in missing])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )


def _with_answers(texts: Iterable[str], answers: Sequence[str]) -> Iterable[str]:
    yield from texts
    for _ in range(64):  # frequent enough that BPE merges them in all but tiny vocabularies
        yield from answers


def build_model(
    tokenizer: PreTrainedTokenizerFast, *, preset: str = "tiny", arch: str = "llama", seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised decoder sized by ``preset`` ("tiny" | "small") of family ``arch``."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    config = ARCHS[arch](
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **PRESETS[preset],
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_base_model(path: Path | str) -> tuple[PreTrainedTokenizerFast, PreTrainedModel]:
    """An installed model's name (``trainer.models``) or a local checkpoint directory (config,
    safetensors weights, tokenizer), in float32; nothing is downloaded."""
    path = resolve_base_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # use_safetensors: a checkpoint holding only pytorch_model.bin (a pickle) is refused, not unpickled
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                 use_safetensors=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    ensure_answer_tokens(tokenizer, model)
    return tokenizer, model


def ensure_answer_tokens(
    tokenizer: PreTrainedTokenizerFast, model: PreTrainedModel, answers: Sequence[str] = ANSWERS
) -> list[str]:
    """Adds answer strings that are not single tokens and grows the embeddings; returns those added."""
    missing = [a for a in answers if len(tokenizer(a, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        tokenizer.add_tokens([AddedToken(a, normalized=False) for a in missing])
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return missing


def ensure_collab_token(tokenizer: PreTrainedTokenizerFast, model: PreTrainedModel) -> int:
    """Makes :data:`~ranker_svc.collab.COLLAB_TOKEN` one special token (growing the embeddings
    when it is new); returns its id."""
    from ranker_svc.collab import COLLAB_TOKEN  # noqa: PLC0415

    if len(tokenizer(COLLAB_TOKEN, add_special_tokens=False)["input_ids"]) != 1:
        tokenizer.add_special_tokens({"additional_special_tokens": [COLLAB_TOKEN]})
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return tokenizer.convert_tokens_to_ids(COLLAB_TOKEN)


def answer_token_ids(tokenizer: PreTrainedTokenizerFast, answers: Sequence[str] = ANSWERS) -> tuple[int, int]:
    """The ids of the (single-token) answer strings, "Yes" first."""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"answers {list(answers)} are not single tokens: {ids}")
    return ids[0][0], ids[1][0]
