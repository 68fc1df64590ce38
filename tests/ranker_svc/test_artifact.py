"""Ranker artifact: save -> load round trip, heads, version stamping, and refusal of bad tokenizers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ranker_svc.artifact import (
    HEADS_FILE,
    META_FILE,
    check_answer_tokens,
    load_ranker,
    save_heads,
    save_ranker,
    stamp_version,
)
from ranker_svc.errors import ArtifactError
from ranker_svc.exits import ExitPolicy
from ranker_svc.model import EarlyExitLM, ExitHead
from ranker_svc.prompt import PromptBuilder, PromptConfig
from ranker_svc.scoring import Scorer
from trainer.lm import build_model, build_tokenizer


def test_meta_records_the_contract(tiny_ranker_dir, loaded):
    meta = json.loads((tiny_ranker_dir / META_FILE).read_text())
    assert meta["exit_layers"] == [1, 2, 3, 4, 5] and meta["num_layers"] == 6 and meta["arch"] == "llama"
    assert meta["yes_token_id"] == loaded.model.yes_token_id != meta["no_token_id"]
    assert loaded.tokenizer.convert_ids_to_tokens([meta["yes_token_id"]]) != loaded.tokenizer.convert_ids_to_tokens(
        [meta["no_token_id"]])
    assert ExitPolicy.from_json(meta["policy"]) == loaded.policy
    assert PromptConfig.from_json(meta["prompt"]) == loaded.prompt.config
    assert meta["version"] == loaded.version and loaded.version.startswith("llama-")
    assert (tiny_ranker_dir / "model.safetensors").is_file() and not (tiny_ranker_dir / HEADS_FILE).exists()


def test_round_trip_with_trained_heads_scores_the_same(tmp_path, tiny_ranker_dir, examples):
    ranker_dir = tmp_path / "ranker"
    shutil.copytree(tiny_ranker_dir, ranker_dir)
    first = load_ranker(ranker_dir)
    with torch.no_grad():  # stand-in for stage 2: heads that differ from the final head
        for head in first.model.heads.values():
            head.proj.weight.add_(0.5 * torch.randn_like(head.proj.weight))
    before = first.version
    meta = save_heads(ranker_dir, first.model, metrics={"note": "test"})
    assert meta["heads_trained"] and meta["version"] != before  # new weights, new version
    saved = load_file(str(ranker_dir / HEADS_FILE))
    assert set(saved) == {f"{layer}.{part}.weight" for layer in range(1, 6) for part in ("norm", "proj")}
    hidden = first.model.causal_lm.config.hidden_size
    assert saved["3.proj.weight"].shape == (2, hidden)  # only the "Yes"/"No" rows are stored
    assert meta["head_rows"] == "answer"
    again = load_ranker(ranker_dir)
    answer = first.model.answer_ids
    for layer in ("1", "5"):
        assert again.model.heads[layer].vocab_rows.tolist() == answer.tolist()
        torch.testing.assert_close(again.model.heads[layer].proj.weight, first.model.heads[layer].proj.weight)
    policy = ExitPolicy(threshold=0.2, window=1)
    a = Scorer(loaded=first).score_examples(examples[:12], policy)
    b = Scorer(loaded=again).score_examples(examples[:12], policy)
    assert [d.exit_layer for d in a] == [d.exit_layer for d in b]
    assert [d.ctr for d in a] == pytest.approx([d.ctr for d in b], abs=1e-6)


def test_bfloat16_load(tiny_ranker_dir, examples):
    loaded16 = load_ranker(tiny_ranker_dir, dtype=torch.bfloat16)
    assert loaded16.model.causal_lm.lm_head.weight.dtype is torch.bfloat16
    assert loaded16.model.heads["1"].proj.weight.dtype is torch.bfloat16
    decisions = Scorer(loaded=loaded16).score_examples(examples[:4])
    assert all(0.0 < d.ctr < 1.0 for d in decisions)


def _bad_tokenizer(texts):
    # 8 merges on top of the bytes: " Yes"/" No" cannot be single tokens; no fallback tokens added
    return build_tokenizer(texts, vocab_size=267, answers=())


def test_tokenizer_without_single_answer_tokens_is_refused(tmp_path, examples):
    builder = PromptBuilder()
    texts = [builder.full_text(ex.context, ex.title) for ex in examples[:8]]
    tokenizer = _bad_tokenizer(texts)
    assert len(tokenizer(" Yes", add_special_tokens=False)["input_ids"]) > 1
    with pytest.raises(ArtifactError, match="not a single token"):
        check_answer_tokens(tokenizer, builder)
    with pytest.raises(ArtifactError, match="not a single token"):
        save_ranker(tmp_path / "r", causal_lm=build_model(tokenizer), tokenizer=tokenizer, prompt=builder.config,
                    exit_layers=[1], policy=ExitPolicy())


def test_load_refuses_a_swapped_tokenizer(tmp_path, tiny_ranker_dir, examples):
    ranker_dir = tmp_path / "ranker"
    shutil.copytree(tiny_ranker_dir, ranker_dir)
    builder = PromptBuilder()
    _bad_tokenizer([builder.full_text(ex.context, ex.title) for ex in examples[:8]]).save_pretrained(ranker_dir)
    with pytest.raises(ArtifactError, match="answer ' Yes' is not a single token"):
        load_ranker(ranker_dir)


def test_load_refuses_heads_that_do_not_match_the_exit_layers(tmp_path, tiny_ranker_dir):
    ranker_dir = tmp_path / "ranker"
    shutil.copytree(tiny_ranker_dir, ranker_dir)
    model = load_ranker(ranker_dir).model
    save_heads(ranker_dir, model)
    meta = json.loads((ranker_dir / META_FILE).read_text())
    meta["exit_layers"] = [2, 4]
    (ranker_dir / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="exit_layers"):
        load_ranker(ranker_dir)


def test_missing_artifact_says_what_to_do(tmp_path):
    with pytest.raises(ArtifactError, match="train the ranker"):
        load_ranker(tmp_path / "nothing")


def test_full_vocabulary_heads_of_older_artifacts_still_load(tmp_path, tiny_ranker_dir, examples):
    from safetensors.torch import save_file

    ranker_dir = tmp_path / "ranker"
    shutil.copytree(tiny_ranker_dir, ranker_dir)
    first = load_ranker(ranker_dir)
    lm = first.model.causal_lm
    full = nn.ModuleDict({str(layer): ExitHead.from_final(lm) for layer in first.model.exit_layers})
    with torch.no_grad():
        for head in full.values():
            head.proj.weight.add_(0.5 * torch.randn_like(head.proj.weight))
    first.model = EarlyExitLM(causal_lm=lm, yes_token_id=first.model.yes_token_id, no_token_id=first.model.no_token_id,
                              exit_layers=first.model.exit_layers, heads=full)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(ranker_dir / HEADS_FILE))
    assert load_file(str(ranker_dir / HEADS_FILE))["1.proj.weight"].shape[0] == len(first.tokenizer)
    again = load_ranker(ranker_dir)
    assert again.model.heads["1"].proj.weight.shape[0] == 2
    policy = ExitPolicy(threshold=0.2, window=1)
    a = Scorer(loaded=first).score_examples(examples[:8], policy)
    b = Scorer(loaded=again).score_examples(examples[:8], policy)
    assert [d.exit_layer for d in a] == [d.exit_layer for d in b]
    assert [d.ctr for d in a] == pytest.approx([d.ctr for d in b], abs=1e-6)


def test_the_calibration_dtype_is_the_default_serving_dtype(tmp_path, tiny_ranker_dir):
    ranker_dir = tmp_path / "ranker"
    shutil.copytree(tiny_ranker_dir, ranker_dir)
    assert load_ranker(ranker_dir).model.causal_lm.dtype is torch.float32
    meta = json.loads((ranker_dir / META_FILE).read_text())
    version = meta["version"]
    meta["policy_dtype"] = "bfloat16"
    (ranker_dir / META_FILE).write_text(json.dumps(meta))
    assert stamp_version(ranker_dir)["version"] != version  # the dtype is part of what scores depend on
    assert load_ranker(ranker_dir).model.causal_lm.dtype is torch.bfloat16
    assert load_ranker(ranker_dir, dtype=torch.float32).model.causal_lm.dtype is torch.float32
