"""Soak: ``retriever-svc`` and ``ranker-svc`` as real processes, loaded at their measured capacity for
a long time, their resident memory sampled; the result says whether memory stayed flat and how many
calls failed (the guarantee: none, and flat).

    make soak                                                   # 5 minutes at capacity
    .venv/bin/python -m bench.soak --duration 30 --sample-s 1   # the short run of the test suite
    .venv/bin/python -m bench.soak --artifacts artifacts --duration 600
    make soak-growth                                            # --growth: ever-new users and items, 5 minutes
    .venv/bin/python -m bench.soak --growth --duration 60       # its smoke (bench/soak_growth.py)

1. Artifacts: ``--artifacts`` (``gcn/`` and ``ranker/``), else a tiny random-weight stack written to
   the work dir (a real Llama with exit heads; scores mean nothing, memory and errors do).
2. Both services start on loopback (the retriever with its embedded redis-server); the catalog and
   a few interactions per user are ingested.
3. Capacity: ``--concurrency`` clients in a closed loop (each sends its next Rank when its last one
   is answered) for ``--calibrate`` seconds, from a separate process (``bench.common.run_load``).
4. Soak: the same closed loop for ``--duration`` seconds, so the ranker runs at its capacity and
   never beyond (no queue builds up); the services' RSS is read from ``/proc`` every
   ``--sample-s`` seconds. Memory is flat when the median of the last quarter of the samples is
   within ``max(16 MiB, 5%)`` of the median of the second quarter (the first is warm-up).

The JSON last line: ``{"soak": {"duration_s", "concurrency", "capacity_rps", "requests", "errors",
"requests_per_s", "p50_ms", "p99_ms", "rss_mb": {"ranker": [...], "retriever": [...]},
"rss_growth_mb": {...}, "rss_flat": bool, "exit_codes": {...}}, "machine": {...}}``.

``--growth`` (``bench.soak_growth``): the retriever with small bounds, ever-new users and items at
``--growth-rate`` events/s beside the Rank load, RSS of both services and of redis-server and Redis's
``used_memory`` and key count sampled; the JSON last line is ``{"soak_growth": {...}, "machine": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

from bench.common import emit, first_line, machine, run_load, say
from bench.proc_memory import rss_mb
from bench.soak_growth import GROWTH_BOUNDS, growth_soak, ranker_env, retriever_env

SOAK_TEST = "bench/soak.py (make soak)"  # the result file's test name (tests.support.reliability)

BIN = Path(sys.executable).parent
ADJECTIVES = ("sunny", "golden", "bright", "gloomy", "rusty", "dull")
NOUNS = ("garden", "river", "castle", "story")


def write_artifacts(out: Path) -> None:
    """A tiny random-weight stack: ``out/gcn`` (users clustered by adjective) and ``out/ranker``."""
    import numpy as np
    import torch

    from exitrank.types import HistoryItem, UserContext
    from ranker_svc.artifact import save_ranker
    from ranker_svc.exits import ExitPolicy
    from ranker_svc.prompt import PromptBuilder, PromptConfig
    from retriever_svc.embeddings import GCNEmbeddings
    from trainer.lm import build_model, build_tokenizer

    items = [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]
    basis = np.random.default_rng(0).normal(0, 0.05, (len(items), len(ADJECTIVES))).astype(np.float32)
    for row, item in enumerate(items):
        basis[row, ADJECTIVES.index(item.split("-")[0])] += 1.0
    histories = {f"g{g}u{j}": [f"{ADJECTIVES[g]}-{NOUNS[(j + k) % 4]}" for k in range(3)]
                 for g in range(len(ADJECTIVES)) for j in range(8)}
    users = np.stack([basis[[items.index(i) for i in h]].sum(0) / np.sqrt(3) for h in histories.values()])
    GCNEmbeddings(user_ids=list(histories), item_ids=items, user=users, item=basis.copy(), item_foldin=basis,
                  version="soak-1", meta={"layers": 2, "layer_combination": "mean_1_to_K"}).save(out)
    prompt = PromptConfig(rating_style="stars")
    builder = PromptBuilder(config=prompt)
    texts = [builder.full_text(UserContext(u, tuple(HistoryItem(i, title(i), 5.0) for i in h)), title(t))
             for u, h in histories.items() for t in items]
    tokenizer = build_tokenizer(texts, vocab_size=400)
    causal_lm = build_model(tokenizer, preset="tiny", arch="llama", seed=0)
    with torch.no_grad():  # sharper random logits: rows exit at different layers
        causal_lm.lm_head.weight.mul_(40.0)
    save_ranker(out / "ranker", causal_lm=causal_lm, tokenizer=tokenizer, prompt=prompt, exit_layers=[1, 2, 3, 4, 5],
                policy=ExitPolicy(criterion="probability_delta", threshold=0.05, window=2))


def title(item_id: str) -> str:
    return "The " + item_id.replace("-", " ")


def seed(address: str, artifacts: Path) -> tuple[list[str], list[str]]:
    """Upsert every item of the fit and 3 interactions per user; (user ids, item ids)."""
    import grpc

    from exitrank.v1 import common_pb2, retriever_pb2_grpc

    meta = json.loads((artifacts / "gcn" / "meta.json").read_text())
    users, items = list(meta["user_ids"]), list(meta["item_ids"])
    rng = random.Random(0)
    with grpc.insecure_channel(address) as channel:
        stub = retriever_pb2_grpc.RetrieverStub(channel)
        stub.UpsertItems(iter([common_pb2.Item(item_id=i, title=title(i)) for i in items]), timeout=60)
        stub.Ingest(iter([common_pb2.Interaction(user_id=u, item_id=i, rating=5.0, timestamp_ms=1 + k)
                          for u in users for k, i in enumerate(rng.sample(items, min(3, len(items))))]), timeout=60)
    return users, items


def rank_caller(channel, *, users: list[str], items: list[str], candidates: int, timeout_s: float):
    """``run_load``'s request maker: Rank for a random user over random catalog items."""
    from exitrank.v1 import ranker_pb2, ranker_pb2_grpc

    stub = ranker_pb2_grpc.RankerStub(channel)

    def call(rng: random.Random):
        request = ranker_pb2.RankRequest(user_id=rng.choice(users), candidate_item_ids=rng.sample(items, candidates))
        return stub.Rank(request, timeout=timeout_s)

    return call


def growth(samples: list[float]) -> float:
    """Median of the last quarter minus the median of the second quarter (the first is warm-up)."""
    quarter = max(1, len(samples) // 4)
    return round(statistics.median(samples[-quarter:]) - statistics.median(samples[quarter : 2 * quarter]), 1)


def start(argv: list[str], log: Path, ready: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start a service; (its process, the address it printed once listening)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    line = first_line(proc, 180)
    if not line.startswith(ready):
        proc.kill()
        raise RuntimeError(f"{argv[0]} did not start ({line!r}); see {log}")
    return proc, line.split()[-1]


def soak(args: argparse.Namespace, ranker: subprocess.Popen, retriever: subprocess.Popen, load_args: dict,
         address: str) -> dict:
    """The calibration, then the soak with RSS sampling; the result's ``soak`` section."""
    capacity = run_load([address], "bench.soak:rank_caller", load_args, concurrency=args.concurrency,
                        duration=args.calibrate)
    say(f"capacity: {capacity['requests_per_s']} Rank/s at {args.concurrency} clients "
        f"(p50 {capacity['p50_ms']} ms), {capacity['errors']} errors")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_load(
        [address], "bench.soak:rank_caller", load_args, concurrency=args.concurrency, duration=args.duration,
        servers=[ranker.pid, retriever.pid], seed=1)), daemon=True)
    rss: dict[str, list[float]] = {"ranker": [], "retriever": []}
    runner.start()
    while runner.is_alive():
        rss["ranker"].append(rss_mb(ranker.pid))
        rss["retriever"].append(rss_mb(retriever.pid))
        runner.join(args.sample_s)
    growth_mb = {name: growth(values) for name, values in rss.items()}
    flat = all(growth_mb[n] <= max(16.0, 0.05 * statistics.median(v)) for n, v in rss.items())
    say(f"soak: {result.get('requests')} Ranks, {result.get('errors')} errors, RSS growth {growth_mb} MiB")
    return {"duration_s": args.duration, "concurrency": args.concurrency, "candidates": args.candidates,
            "capacity_rps": capacity["requests_per_s"], "calibration_errors": capacity["errors"],
            "requests": result.get("requests", 0), "errors": result.get("errors", -1),
            "requests_per_s": result.get("requests_per_s"), "p50_ms": result.get("p50_ms"),
            "p99_ms": result.get("p99_ms"), "server_cpu_ms_per_request": result.get("server_cpu_ms_per_request"),
            "sample_s": args.sample_s, "rss_mb": rss, "rss_growth_mb": growth_mb, "rss_flat": flat}


def record(result: dict) -> None:
    """``result`` as the ``faults``/``soak`` row of ``runs/reliability`` (only when it passed)."""
    from tests.support.reliability import recording

    soak, ranker = result["soak"], result["soak"]["rss_mb"]["ranker"]
    if soak["errors"] or not soak["rss_flat"]:
        return
    with recording(SOAK_TEST, "soak", area="faults") as row:
        row.sent, row.refused = soak["requests"], soak["errors"]
        row.measured = (f"{soak['duration_s']:.0f} s at the measured capacity ({soak['capacity_rps']} Rank/s, "
                        f"{soak['concurrency']} closed-loop clients, {soak['candidates']} candidates; "
                        f"{result['machine']['cores']} cores, load average {result['machine']['load_avg_1m']}): "
                        f"{soak['requests']} Ranks at {soak['requests_per_s']}/s, 0 errors, p50 {soak['p50_ms']:.0f} ms, "
                        f"p99 {soak['p99_ms']:.0f} ms; ranker RSS {ranker[0]:.0f} -> {ranker[-1]:.0f} MiB "
                        f"(growth {soak['rss_growth_mb']['ranker']} MiB over {len(ranker)} samples, "
                        f"{soak['sample_s']:.0f} s apart), retriever {soak['rss_mb']['retriever'][0]:.0f} -> "
                        f"{soak['rss_mb']['retriever'][-1]:.0f} MiB; both exit 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/soak"))
    parser.add_argument("--artifacts", type=Path, help="gcn/ and ranker/ (default: a tiny random stack)")
    parser.add_argument("--duration", type=float, default=300.0, help="soak seconds (default 300)")
    parser.add_argument("--calibrate", type=float, default=10.0, help="capacity measurement seconds")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="each Rank's deadline")
    parser.add_argument("--record", action="store_true",
                        help="write the result as a reliability result file (RELIABILITY.md's table)")
    parser.add_argument("--growth", action="store_true",
                        help="ever-new users and items beside the Rank load, small retriever bounds "
                        "(bench.soak_growth)")
    parser.add_argument("--growth-rate", type=float, default=200.0, help="growth events/s (default 200)")
    args = parser.parse_args(argv)
    envs = (retriever_env(GROWTH_BOUNDS), ranker_env()) if args.growth else ({}, {})
    work = args.workdir.resolve()
    shutil.rmtree(work / "data", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    artifacts = args.artifacts or work / "artifacts"
    if args.artifacts is None and not (artifacts / "ranker").is_dir():
        say(f"writing a tiny random-weight stack to {artifacts}")
        write_artifacts(artifacts)
    retriever, retriever_at = start([str(BIN / "retriever-svc"), "serve", "--port", "0", "--artifacts", str(artifacts),
                                     "--data-dir", str(work / "data")], work / "retriever.log",
                                    "retriever listening on ", envs[0])
    ranker = None
    try:
        ranker, ranker_at = start([str(BIN / "ranker-svc"), "serve", "--port", "0", "--retriever", retriever_at,
                                   "--artifacts", str(artifacts), "--dtype", "float32", "--num-threads", "1"],
                                  work / "ranker.log", "ranker listening on ", envs[1])
        users, items = seed(retriever_at, artifacts)
        load_args = {"users": users, "items": items, "candidates": min(args.candidates, len(items)),
                     "timeout_s": args.timeout_s}
        if args.growth:
            out = growth_soak(args, ranker, retriever, load_args, ranker_at, retriever_at, work, artifacts)
        else:
            out = soak(args, ranker, retriever, load_args, ranker_at)
    finally:
        codes = {}
        for name, proc in (("ranker", ranker), ("retriever", retriever)):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                codes[name] = proc.wait(60)
    out["exit_codes"] = codes
    result = {"soak_growth" if args.growth else "soak": out, "machine": machine()}
    if args.record and not args.growth:
        record(result)
    emit(result)
    passed = out["passed"] if args.growth else out["errors"] == 0 and out["rss_flat"]
    return 0 if passed and not any(codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
