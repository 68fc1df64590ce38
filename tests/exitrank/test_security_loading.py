"""Nothing the services read (artifacts, Redis values, network messages, config) is unpickled or evaluated:
a scan of every project source file's syntax tree, and a check that the scan catches each pattern."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.reliability import recording

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("exitrank", "retriever_svc", "ranker_svc", "trainer", "bench", "scripts", "examples")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
LOADERS = {"load_file", "safe_open", "from_pretrained", "read_index", "load"}


@dataclass
class Scan:
    files: int = 0
    loader_calls: int = 0
    problems: list[str] = field(default_factory=list)


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def _has_keyword(call: ast.Call, name: str) -> bool:
    return any(k.arg == name for k in call.keywords)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def scan_source(source: str, where: str, scan: Scan) -> None:
    """Add the unsafe deserialisation patterns of ``source`` to ``scan.problems``."""
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            scan.problems += [f"{line} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                scan.problems.append(f"{line} imports from {node.module}")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                scan.problems.append(f"{line} imports torch.load by name (its weights_only cannot be checked)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if last in LOADERS:
                scan.loader_calls += 1
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "compile", "__import__"):
                scan.problems.append(f"{line} calls {node.func.id}()")
            elif name == "torch.load" and not _keyword_is_true(node, "weights_only"):
                scan.problems.append(f"{line} torch.load without weights_only=True")
            elif name.startswith("yaml.") and last in UNSAFE_YAML:
                scan.problems.append(f"{line} {name} (use yaml.safe_load)")
            elif last == "load" and name.split(".")[0] in ("np", "numpy") and _keyword_is_true(node, "allow_pickle"):
                scan.problems.append(f"{line} {name}(allow_pickle=True)")
            elif last in ("read_pickle", "loads") and name.split(".")[0] in ("pd", "pandas", "torch"):
                scan.problems.append(f"{line} {name}")
            elif last == "from_pretrained" and "Tokenizer" not in name and "Config" not in name \
                    and not _keyword_is_true(node, "use_safetensors") and not _has_keyword(node, "gguf_file"):
                # gguf_file: transformers reads that one GGUF file (a tensor container, nothing unpickled)
                scan.problems.append(f"{line} {name} without use_safetensors=True (would unpickle a .bin)")
            if _keyword_is_true(node, "trust_remote_code"):
                scan.problems.append(f"{line} trust_remote_code=True")


def scan_project() -> Scan:
    scan = Scan()
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else ():
            scan.files += 1
            scan_source(path.read_text(), str(path.relative_to(ROOT)), scan)
    return scan


def test_the_scan_catches_every_pattern():
    bad = """
import pickle, dill
from joblib import load as jl
from torch import load
import torch, yaml, numpy as np, pandas as pd
torch.load("w.pt")
torch.load("w.pt", weights_only=False)
yaml.load(text)
np.load("a.npy", allow_pickle=True)
pd.read_pickle("x")
eval(message)
exec(code)
AutoModelForCausalLM.from_pretrained(path)
PeftModel.from_pretrained(model, path)
AutoTokenizer.from_pretrained(path, trust_remote_code=True)
"""
    good = """
import torch, yaml, numpy as np
torch.load("w.pt", weights_only=True)
yaml.safe_load(text)
np.load("a.npy")
model.eval()
re.compile("x")
AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
AutoTokenizer.from_pretrained(path, local_files_only=True)
"""
    caught = Scan()
    scan_source(bad, "bad.py", caught)
    assert len(caught.problems) == 14, caught.problems
    clean = Scan()
    scan_source(good, "good.py", clean)
    assert clean.problems == [] and clean.loader_calls == 5


def test_no_unsafe_deserialisation_in_the_project(request):
    with recording(request.node.nodeid, "safe loading") as row:
        scan = scan_project()
        assert scan.files > 80 and scan.loader_calls >= 5
        assert scan.problems == [], "\n".join(scan.problems)
        row.sent, row.refused = scan.loader_calls, 0
        row.measured = (f"{scan.files} source files scanned, {scan.loader_calls} loader calls checked: no pickle/"
                        "dill/joblib/marshal, no eval/exec, torch.load only with weights_only=True, "
                        "yaml.safe_load only, every model from_pretrained with use_safetensors=True")
