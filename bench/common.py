"""Helpers shared by the benchmarks: machine facts, percentiles, timers, the JSON last line.

Every benchmark prints human-readable progress to stderr and, as the LAST line of stdout, one
JSON object (the keys documented in shared/BENCH_OUTPUT.md), via :func:`emit`.

:func:`run_load` drives a gRPC service from a separate process (``python -m bench.common``), so
the load generator's CPU is its own and measured, closed loop (saturation) or open loop (a fixed
offered rate, latency counted from each request's scheduled start).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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


# ------------------------------------------------------------------------- gRPC load generator


def run_load(addresses: list[str], caller: str, caller_args: dict[str, Any], *, concurrency: int,
             duration: float, servers: Sequence[int] = (), seed: int = 0, rate: float = 0.0
             ) -> dict[str, Any]:
    """Run :func:`load` in its own process; add the CPU the ``servers`` (pids) spent per request.

    ``caller`` is ``"module:function"``; ``function(channel, **caller_args)`` returns a request
    maker ``rng -> awaitable call`` for one channel.
    """
    before = sum(cpu_seconds(pid) for pid in servers)
    spec = {"addresses": addresses, "caller": caller, "caller_args": caller_args,
            "concurrency": concurrency, "duration": duration, "seed": seed, "rate": rate}
    proc = subprocess.run([sys.executable, "-m", "bench.common", "--load", json.dumps(spec)],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    spent = sum(cpu_seconds(pid) for pid in servers) - before
    result["server_cpu_ms_per_request"] = round(spent / max(result["requests"], 1) * 1e3, 3)
    return result


async def load(addresses: list[str], caller: str, caller_args: dict[str, Any], concurrency: int,
               duration: float, seed: int, rate: float = 0.0) -> dict[str, Any]:
    """``concurrency`` clients, one channel each, over ``addresses`` in turn: closed loop (each
    sends its next request when its last one is answered), or with ``rate`` open loop (a request
    every 1 / rate seconds, each its own task, over the channels in turn)."""
    import grpc  # noqa: PLC0415

    module, _, name = caller.partition(":")
    make: Callable[..., Any] = getattr(importlib.import_module(module), name)
    rng = random.Random(seed)
    channels = [grpc.aio.insecure_channel(addresses[c % len(addresses)]) for c in range(concurrency)]
    calls = [make(ch, **caller_args) for ch in channels]
    for call in calls:  # connect and warm up
        await call(rng)
    latencies: list[float] = []
    errors = 0

    async def once(call: Callable[[random.Random], Any], due: float) -> None:
        nonlocal errors
        try:
            await call(rng)
        except grpc.aio.AioRpcError:
            errors += 1
            return
        latencies.append(time.perf_counter() - due)

    async def closed(call: Callable[[random.Random], Any]) -> None:
        while time.perf_counter() < stop:
            await once(call, time.perf_counter())

    # the generator must not stall itself: a cyclic-GC pass over the heap it accumulates (tens
    # of ms at a deterministic point of every run) read as a server stall at p99; collect after
    gc.collect()
    gc.freeze()
    gc.disable()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    stop = wall0 + duration
    if rate:
        pending: set[asyncio.Task] = set()  # finished requests are dropped, not kept
        for j in range(int(rate * duration)):
            due = wall0 + j / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            task = asyncio.create_task(once(calls[j % concurrency], due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
    else:
        await asyncio.gather(*(closed(call) for call in calls))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    gc.enable()
    for ch in channels:
        await ch.close()
    done = max(len(latencies), 1)
    return {"concurrency": concurrency, "mode": "open" if rate else "closed",
            **({"offered_per_s": rate} if rate else {}), **latency_summary(latencies),
            "requests_per_s": round(len(latencies) / wall, 1), "requests": len(latencies),
            "errors": errors, "client_cpu_ms_per_request": round(cpu / done * 1e3, 3),
            "client_cpu_cores": round(cpu / wall, 2), "wall_s": round(wall, 2)}


if __name__ == "__main__":  # the load generator's own process (see run_load)
    parser = argparse.ArgumentParser(prog="python -m bench.common")
    parser.add_argument("--load", required=True, help="JSON arguments of load()")
    print(json.dumps(asyncio.run(load(**json.loads(parser.parse_args().load)))))


# ------------------------------------------------------------------------- early-exit policies


def mixed_depth_policy(p_yes, answer_layers: Sequence[int], target_layer: float):
    """The confidence policy whose mean exit layer on ``p_yes`` ((N, E) P(yes) of every answering
    layer's head) is closest to ``target_layer``: with half the depth as the target, the rows of a
    batch exit at every depth, which is what per-row compaction is measured on."""
    import torch  # noqa: PLC0415 - the gRPC benchmarks do not need it

    from ranker_svc.exits import ExitPolicy, simulate_exits  # noqa: PLC0415

    p_yes = p_yes.float().cpu()
    confidence = torch.maximum(p_yes, 1 - p_yes)[:, :-1].flatten()
    best, best_gap = ExitPolicy(disabled=True), math.inf
    for q in torch.linspace(0.05, 0.995, 120):
        tau = float(torch.quantile(confidence, q).clamp(0.5 + 1e-6, 1.0))
        policy = ExitPolicy(criterion="confidence", threshold=tau)
        _, layers = simulate_exits(p_yes, answer_layers, policy)
        gap = abs(float(layers.float().mean()) - target_layer)
        if gap < best_gap:
            best, best_gap = policy, gap
    return best


def side_by_side(a: Callable[[], object], b: Callable[[], object], *, rounds: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, alternating a, b, a, b, ... after one warm-up each."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(rounds):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)
