"""``scripts/demo.py --model auto`` (the default) trains the pretrained model only where bf16 matmuls are
native, where the whole demo fits its 20 minutes on 2 cores; a named model is taken as named."""

import importlib.util
from pathlib import Path

import torch

from ranker_svc.model import resolve_dtype

ROOT = Path(__file__).resolve().parents[1]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_picks_the_pretrained_model_only_where_bf16_is_native(capsys):
    demo = load_demo()
    native = resolve_dtype("auto") == torch.bfloat16
    chosen = demo.choose_model("auto")
    assert chosen == ("smollm2-135m" if native else "tiny")
    said = capsys.readouterr().out
    assert f"model: {chosen}" in said and "--model tiny" in said  # says what it chose and how to choose
    assert [demo.choose_model(name) for name in ("tiny", "smollm2-135m")] == ["tiny", "smollm2-135m"]
    assert capsys.readouterr().out == ""  # a named model: nothing to explain
