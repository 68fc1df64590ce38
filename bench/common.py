"""Helpers shared by the benchmarks: machine facts, percentiles, timers, the JSON last line.

Every benchmark prints human-readable progress to stderr and, as the LAST line of stdout, one
JSON object (the keys documented in shared/BENCH_OUTPUT.md), via :func:`emit`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """Cores, CPU model, load average and Python: the context every timing needs."""
    model = ""
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info
                          if line.startswith("model name")), "")
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"cores": os.cpu_count() or 1, "cpu": model, "python": platform.python_version(),
            "load_avg_1m": round(load[0], 2)}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float], prefix: str = "") -> dict[str, float]:
    """p50 / p99 (and mean) of latencies in seconds, as milliseconds rounded to 3 decimals."""
    return {f"{prefix}p50_ms": round(percentile(seconds, 50) * 1e3, 3),
            f"{prefix}p99_ms": round(percentile(seconds, 99) * 1e3, 3),
            f"{prefix}mean_ms": round(sum(seconds) / max(len(seconds), 1) * 1e3, 3)}


@contextmanager
def stage(name: str) -> Iterator[dict[str, float]]:
    """Log a stage's start and wall time to stderr; the dict gets ``seconds``."""
    out: dict[str, float] = {}
    say(f"{name} ...")
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - start, 2)
        say(f"{name}: {out['seconds']} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line a child prints on stdout, or "" after ``timeout`` seconds."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """Print the result as one JSON line, the last line of stdout."""
    print(json.dumps(result, default=_plain), flush=True)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)
