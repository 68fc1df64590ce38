"""Resumable stages: a stage whose inputs are unchanged is not run again.

A stage is a name, a JSON-able description of everything it depends on (settings, seeds, and the
fingerprints of the stages it reads), and a function that writes its outputs under its own
directory and returns a JSON-able result. ``StageCache.run`` hashes the inputs; when
``DIR/<name>/stage.json`` holds the same hash, the stored result is returned without running the
function. Otherwise the directory is emptied, the function runs, and ``stage.json`` is written
last (atomically), so a stage interrupted half-way is simply run again. A stage's fingerprint
(its inputs' hash) is what downstream stages list among their inputs, so a change anywhere re-runs
everything after it and nothing before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD = "stage.json"


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 (16 hex digits) of the canonical JSON of ``inputs``."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageResult:
    """What a stage returned, its fingerprint, its directory, and whether it ran now."""

    name: str
    fingerprint: str
    dir: Path
    result: Any
    seconds: float
    reused: bool


class StageCache:
    """Stages under ``root`` (one directory each); ``force`` re-runs every stage."""

    def __init__(self, root: Path, *, force: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.force = force
        self.log = log or (lambda message: print(f"[reproduce] {message}", file=sys.stderr, flush=True))
        self.ran: list[StageResult] = []

    def run(self, name: str, inputs: dict[str, Any], fn: Callable[[Path], Any]) -> StageResult:
        """The stored result when ``inputs`` are those of the last completed run, else ``fn(dir)``."""
        key = fingerprint(inputs)
        out = self.root / name
        record = out / RECORD
        if not self.force and record.is_file():
            stored = json.loads(record.read_text())
            if stored.get("fingerprint") == key:
                self.log(f"{name}: inputs unchanged, reusing ({stored['seconds']:.0f}s saved)")
                done = StageResult(name, key, out, stored["result"], stored["seconds"], True)
                self.ran.append(done)
                return done
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        self.log(f"{name} ...")
        start = time.perf_counter()
        result = fn(out)
        seconds = time.perf_counter() - start
        tmp = out / (RECORD + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": key, "inputs": inputs, "result": result,
                                   "seconds": seconds}, indent=1, default=str))
        os.replace(tmp, record)
        self.log(f"{name}: done in {seconds:.0f}s")
        done = StageResult(name, key, out, json.loads(record.read_text())["result"], seconds, False)
        self.ran.append(done)
        return done
