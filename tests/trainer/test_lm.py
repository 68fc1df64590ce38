"""trainer.lm: the prompt tokenizer, the preset decoders, and loading a local base model."""

from __future__ import annotations

import pytest

from trainer.models import ModelError
import torch

from trainer.lm import (
    PRESETS,
    answer_token_ids,
    build_model,
    build_tokenizer,
    ensure_answer_tokens,
    load_base_model,
)

TEXTS = [f'Instruction: Predict. Input: The user liked "Book {n}". Answer:' for n in range(40)]


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tokenizer_makes_answers_single_tokens_and_prepends_bos():
    tok = build_tokenizer(TEXTS, vocab_size=400)
    yes, no = answer_token_ids(tok)
    assert yes != no
    ids = tok(TEXTS[0] + " Yes")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == yes
    assert tok.decode(ids, skip_special_tokens=True) == TEXTS[0] + " Yes"
    assert tok.padding_side == "right" and tok.pad_token_id is not None
    assert len(tok) <= 400 + 2


def test_tiny_vocabulary_falls_back_to_added_answer_tokens():
    tok = build_tokenizer(TEXTS, vocab_size=260)  # too few merges for " Yes"/" No"
    yes, no = answer_token_ids(tok)
    assert tok(TEXTS[1] + " No")["input_ids"][-1] == no
    # byte-level BPE: any text, even unseen scripts, still tokenizes and decodes
    text = "Тест ✓ 書"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_preset_for_each_architecture(arch):
    tok = build_tokenizer(TEXTS, vocab_size=300)
    model = build_model(tok, preset="tiny", arch=arch, seed=3)
    assert model.config.model_type == arch
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 64
    assert model.config.vocab_size == len(tok)
    again = build_model(tok, preset="tiny", arch=arch, seed=3)
    torch.testing.assert_close(model.lm_head.weight, again.lm_head.weight)  # seeded
    ids = tok(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (2, ids["input_ids"].shape[1], len(tok))


def test_presets_and_arguments_are_checked():
    assert PRESETS["small"]["hidden_size"] == 256 and PRESETS["small"]["num_hidden_layers"] == 8
    tok = build_tokenizer(TEXTS, vocab_size=300)
    with pytest.raises(ValueError, match="preset"):
        build_model(tok, preset="huge")
    with pytest.raises(ValueError, match="arch"):
        build_model(tok, arch="gpt2")


def test_load_base_model_adds_missing_answer_tokens(tmp_path):
    tok = build_tokenizer(TEXTS, vocab_size=262, answers=())  # a base tokenizer without " Yes"/" No" tokens
    assert len(tok(" Yes", add_special_tokens=False)["input_ids"]) > 1
    model = build_model(tok, preset="tiny", arch="qwen2")
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    loaded_tok, loaded = load_base_model(tmp_path / "base")
    yes, no = answer_token_ids(loaded_tok)
    assert loaded.get_input_embeddings().weight.shape[0] == len(loaded_tok) > max(yes, no)
    assert ensure_answer_tokens(loaded_tok, loaded) == []  # idempotent
    with pytest.raises(ModelError, match="checkpoint directory with config.json"):
        load_base_model(tmp_path / "missing")  # neither a checkpoint nor an installed model's name
