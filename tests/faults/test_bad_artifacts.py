"""A corrupted or truncated artifact directory, a tokenizer without single "Yes"/"No" tokens, a manifest
whose hashes do not match: ``ranker-svc`` and ``retriever-svc`` refuse to start, with their exit
status and a message naming the file, and never print their listening line. Real processes."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from exitrank.artifacts import write_manifest
from tests.support.reliability import recording
from ranker_svc.artifact import load_ranker, save_heads
from ranker_svc.config import ModelConfig, RankerConfig, RetrieverConfig
from ranker_svc.errors import RankerError
from ranker_svc.server import build_ranker
from tests.faults.conftest import BIN


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _swap_tokenizer(ranker: Path) -> None:
    """A tokenizer of 8 merges over bytes: " Yes"/" No" are several tokens."""
    from trainer.lm import build_tokenizer

    build_tokenizer(["The sunny garden. Answer: Yes No"] * 4, vocab_size=267, answers=()).save_pretrained(ranker)


def _touch(path: Path) -> None:
    path.write_text(path.read_text() + "\n")  # still valid, but no longer what the manifest hashed


def _with_heads(ranker: Path) -> None:
    save_heads(ranker, load_ranker(ranker).model)
    _truncate(ranker / "exit_heads.safetensors")


def _manifest_then(change):
    def corrupt(root: Path) -> None:
        write_manifest(root, config={}, data_hash="test", metrics={})
        change(root)
    return corrupt


RANKER = [  # (case, how to corrupt ARTIFACTS, what the message must name)
    ("truncated weights", lambda a: _truncate(a / "ranker/model.safetensors"), "model.safetensors"),
    ("truncated exit heads", lambda a: _with_heads(a / "ranker"), "exit_heads.safetensors"),
    ("truncated exitrank.json", lambda a: _truncate(a / "ranker/exitrank.json"), "exitrank.json is not valid JSON"),
    ("truncated config.json", lambda a: _truncate(a / "ranker/config.json"), "cannot load the model/tokenizer"),
    ("no single Yes/No token", lambda a: _swap_tokenizer(a / "ranker"), "is not a single token"),
    ("manifest hash mismatch", _manifest_then(lambda a: _touch(a / "ranker/config.json")), "ranker/config.json"),
    ("manifest file missing", _manifest_then(lambda a: (a / "ranker/generation_config.json").unlink()),
     "generation_config.json listed in the manifest is missing"),
    ("no ranker directory", lambda a: shutil.rmtree(a / "ranker"), "train the ranker"),
]
RETRIEVER = [
    ("truncated embeddings", lambda a: _truncate(a / "gcn/embeddings.safetensors"), "cannot read embeddings"),
    ("corrupted meta.json", lambda a: _truncate(a / "gcn/meta.json"), "cannot read embeddings"),
    ("manifest hash mismatch", _manifest_then(lambda a: _touch(a / "gcn/meta.json")), "gcn/meta.json"),
]


STARTUP_ERRORS = (RankerError, ValueError, OSError, RuntimeError)  # what ranker-svc's main exits 2 on
PROCESS_CASES = ("no single Yes/No token", "manifest hash mismatch")


def _start(argv: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout, proc.stderr


def _copy(stack_artifacts, root: Path, case: str) -> Path:
    target = root / case.replace(" ", "-").replace("/", "-")
    shutil.copytree(stack_artifacts.artifacts, target)
    return target


def _config(artifacts: Path) -> RankerConfig:
    return RankerConfig(model=ModelConfig(artifacts_dir=artifacts, dtype="float32"),
                        retriever=RetrieverConfig(target="127.0.0.1:1"))


def test_ranker_start_path_refuses_each_bad_artifact_by_name(request, tmp_path, stack_artifacts):
    """Every case through ``build_ranker``, the start path of ``ranker-svc`` before any port; the error
    is one ``main`` turns into exit 2 with the message (the process test below runs two of them)."""
    with recording(request.node.nodeid, "bad artifact", area="bad input") as row:
        for case, corrupt, named in RANKER:
            artifacts = _copy(stack_artifacts, tmp_path, case)
            corrupt(artifacts)
            with pytest.raises(STARTUP_ERRORS) as info:
                build_ranker(_config(artifacts))
            assert named in str(info.value), (case, str(info.value))
        row.sent = row.refused = len(RANKER)
        row.measured = (f"{len(RANKER)}/{len(RANKER)} corrupted ranker artifacts refused by the start path before a "
                        f"port, by an error ranker-svc exits 2 on, naming the file: {', '.join(c for c, _, _ in RANKER)}")


@pytest.mark.slow
def test_services_exit_with_a_status_and_the_reason(request, tmp_path, stack_artifacts, redis_url):
    runs = []
    for case, corrupt, named in (c for c in RANKER if c[0] in PROCESS_CASES):
        artifacts = _copy(stack_artifacts, tmp_path / "ranker", case)
        corrupt(artifacts)
        runs.append(("ranker-svc", case, named, 2, [str(BIN / "ranker-svc"), "serve", "--port", "0", "--retriever",
                                                   "127.0.0.1:1", "--artifacts", str(artifacts), "--dtype", "float32"]))
    for case, corrupt, named in RETRIEVER:
        artifacts = _copy(stack_artifacts, tmp_path / "retriever", case)
        corrupt(artifacts)
        runs.append(("retriever-svc", case, named, 2, [str(BIN / "retriever-svc"), "serve", "--port", "0",
                                                       "--artifacts", str(artifacts), "--redis-url", redis_url]))
    with recording(request.node.nodeid, "bad artifact", area="bad input") as row:
        with ThreadPoolExecutor(max_workers=2) as pool:  # 2 cores: two imports at a time
            results = list(pool.map(lambda run: _start(run[4]), runs))
        for (service, case, named, status, _), (code, out, err) in zip(runs, results):
            assert code == status, (service, case, code, err[-2000:])
            assert named in err, (service, case, err[-2000:])
            assert "listening" not in out and "Traceback" not in err, (service, case, err[-2000:])
        row.sent = row.refused = len(runs)
        row.measured = (f"{len(runs)}/{len(runs)} processes refused to start, the file named on stderr, no traceback, "
                        f"no port: ranker-svc exit 2 on {', '.join(PROCESS_CASES)}; retriever-svc exit 2 on "
                        f"{', '.join(c for c, _, _ in RETRIEVER)}")
