"""``trainer models``: a GGUF file the test writes itself with the ``gguf`` package (a tiny random Llama
with a byte-level BPE vocabulary, as llama.cpp writes them) is imported through the real CLI, listed,
and loaded by name as ``--base-model``; bad files, names and hashes are refused with what to run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ Y", "e s", "ĠY es", "Ġ N", "ĠN o"]
HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 32, 2, 64, 4, 2


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what byte-level BPE vocabularies list)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(extra))]


def write_tiny_gguf(path: Path, *, architecture: str = "llama", seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer random Llama in GGUF (f32 tensors, gpt2-style tokenizer); returns its tensors."""
    from gguf import GGUFWriter

    tokens = SPECIALS + _byte_alphabet() + ["ĠY", "es", "ĠYes", "ĠN", "ĠNo"]
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    rng = np.random.default_rng(seed)
    tensors = {"token_embd.weight": rng.normal(0, 0.1, (len(tokens), HIDDEN))}
    kv = HIDDEN * KV_HEADS // HEADS
    for i in range(LAYERS):
        tensors |= {f"blk.{i}.attn_norm.weight": np.ones(HIDDEN), f"blk.{i}.ffn_norm.weight": np.ones(HIDDEN),
                    f"blk.{i}.attn_q.weight": rng.normal(0, 0.1, (HIDDEN, HIDDEN)),
                    f"blk.{i}.attn_k.weight": rng.normal(0, 0.1, (kv, HIDDEN)),
                    f"blk.{i}.attn_v.weight": rng.normal(0, 0.1, (kv, HIDDEN)),
                    f"blk.{i}.attn_output.weight": rng.normal(0, 0.1, (HIDDEN, HIDDEN)),
                    f"blk.{i}.ffn_gate.weight": rng.normal(0, 0.1, (FFN, HIDDEN)),
                    f"blk.{i}.ffn_up.weight": rng.normal(0, 0.1, (FFN, HIDDEN)),
                    f"blk.{i}.ffn_down.weight": rng.normal(0, 0.1, (HIDDEN, FFN))}
    tensors["output_norm.weight"] = np.ones(HIDDEN)
    for name, value in tensors.items():
        writer.add_tensor(name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def trainer_cli(*args: str, models: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EXITRANK_MODELS": str(models)}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    return path, write_tiny_gguf(path)


def test_import_gguf_converts_lists_and_loads_by_name(tiny_gguf, tmp_path, monkeypatch):
    path, tensors = tiny_gguf
    models = tmp_path / "models"
    done = trainer_cli("models", "import-gguf", str(path), "--name", "tiny-llama", models=models)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    target = Path(record["path"])
    assert target == models / "tiny-llama"
    assert {"config.json", "model.safetensors", "tokenizer.json", "exitrank-model.json"} <= {
        p.name for p in target.iterdir()}
    assert record["architecture"] == "llama" and record["dtype"] == "bfloat16" and record["num_layers"] == LAYERS
    assert 0 <= record["bf16_max_abs_p_change"] < 0.01
    assert not list(models.glob(".*")), "a staging directory was left behind"

    listed = json.loads(trainer_cli("models", "list", models=models).stdout.strip().splitlines()[-1])
    mine = [m for m in listed["models"] if m["name"] == "tiny-llama"]
    assert mine and mine[0]["installed"] and mine[0]["gguf_sha256"] == record["gguf_sha256"]

    from trainer.lm import load_base_model

    monkeypatch.setenv("EXITRANK_MODELS", str(models))
    tokenizer, model = load_base_model("tiny-llama")  # by name, as --base-model takes it
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == LAYERS
    embeddings = tensors["token_embd.weight"]
    loaded = model.get_input_embeddings().weight.detach()[: embeddings.shape[0]].numpy()
    np.testing.assert_allclose(loaded, embeddings, rtol=1e-2, atol=1e-3)  # bf16 rounding only
    down = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_allclose(down, tensors["blk.1.ffn_down.weight"], rtol=1e-2, atol=1e-3)
    assert len(tokenizer(" Yes", add_special_tokens=False)["input_ids"]) == 1
    logits = model(torch.tensor([tokenizer("Yes No")["input_ids"]])).logits
    assert torch.isfinite(logits).all()


def test_bad_inputs_are_refused_with_what_to_run(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    models = tmp_path / "models"
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    cases = [
        (("models", "import-gguf", str(not_gguf), "--name", "x"), "not a readable GGUF"),
        (("models", "import-gguf", str(tmp_path / "absent.gguf"), "--name", "x"), "no such file"),
        (("models", "import-gguf", str(path), "--name", "../escape"), "no path separators"),
        (("models", "install", "llama-70b"), "import-gguf FILE --name NAME"),
        (("fit", "--data", str(tmp_path), "--out", str(tmp_path / "a"), "--base-model", "smollm2-135m"),
         "trainer models install smollm2-135m"),
    ]
    for args, expected in cases:
        done = trainer_cli(*args, models=models)
        assert done.returncode == 2, (args, done.stderr[-1500:])
        assert expected in done.stderr and "Traceback" not in done.stderr, (args, done.stderr[-1500:])
    assert not models.exists() or not any(models.iterdir())  # nothing half-installed


def test_an_unsupported_architecture_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, architecture="gpt2")
    from trainer.models import ModelError, import_gguf

    monkeypatch.setenv("EXITRANK_MODELS", str(tmp_path / "models"))
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported"):
        import_gguf(path, name="g")


def test_install_refuses_a_file_whose_hash_is_not_the_pinned_one(tmp_path, monkeypatch):
    import gguf

    from trainer import models

    # a known model whose "package" is one that is installed: its file cannot have the pinned hash
    fake = models.KnownModel(package="gguf", version=gguf.__version__ if hasattr(gguf, "__version__") else "0",
                             module="gguf", file="__init__.py", sha256="0" * 64, license="")
    monkeypatch.setitem(models.KNOWN, "fake-model", fake)
    monkeypatch.setenv("EXITRANK_MODELS", str(tmp_path / "models"))
    with pytest.raises(models.ModelError, match="not the pinned"):
        models.install("fake-model")
    assert not (tmp_path / "models" / "fake-model").exists()
