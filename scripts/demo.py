"""`make demo`: the whole path end to end on real parts, as a feed server would use it.

    .venv/bin/python scripts/demo.py --data-root ../shared/data --workdir runs/demo
    .venv/bin/python scripts/demo.py --model smollm2-135m     # the pretrained model (make demo MODEL=smollm2-135m)
    .venv/bin/python scripts/demo.py --model tiny             # a decoder trained from scratch (make demo MODEL=tiny)

1. data: imports ``DATA/games6k`` (a user sample) when present, else synthesises a data set;
2. the model (``--model auto``, the default: ``smollm2-135m`` where the machine multiplies bf16 natively,
   a GPU or a CPU with AMX or AVX512-BF16, where the whole demo fits its 20 minutes on 2 cores;
   ``tiny`` elsewhere, where the pretrained model's float32 tuning alone overruns them):
   ``tiny``: ``trainer fit --preset tiny --collab-tokens full``; a pretrained model: ``trainer models
   install`` and LoRA tuning on fewer samples (``PRETRAINED_FIT``); skipped when the artifacts already
   match the data;
3. starts ``retriever-svc`` (with its embedded redis-server) and ``ranker-svc`` as real processes;
4. loads the catalog with ``UpsertItems`` and replays every interaction that is not a held-out
   target through ``Ingest`` (the stream, the consumer, the fold-in);
5. calls ``Rank`` for each held-out (test) user with its candidate items, as a feed server would;
6. prints AUC, the exit-layer histogram and p50/p99 latency, and writes ``WORKDIR/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from exitrank.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc, retriever_pb2_grpc
from trainer.stats import auc

PY = sys.executable


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def choose_model(name: str) -> str:
    """``auto``: the pretrained model where bf16 matmuls are native, else ``tiny`` (the README has both
    measured: in float32 the pretrained model's tuning alone overruns the demo's 20 minutes)."""
    if name != "auto":
        return name
    import torch

    from ranker_svc.model import resolve_dtype

    native = resolve_dtype("auto") == torch.bfloat16  # CUDA, AMX or AVX512-BF16
    chosen = "smollm2-135m" if native else "tiny"
    print(f"model: {chosen} (bf16 matmuls {'native' if native else 'not native'} here; --model tiny or "
          f"--model smollm2-135m chooses)", flush=True)
    return chosen


def prepare_data(data_root: Path, work: Path, max_users: int, seed: int) -> Path:
    data = work / "data"
    if (data / "interactions.jsonl").is_file():
        return data
    games = data_root / "games6k"
    if games.is_dir():
        run(PY, "-m", "trainer", "data", "import", "games6k", str(games), str(data),
            "--max-users", str(max_users), "--seed", str(seed))
    else:
        print(f"{games} not found: synthesising a data set instead")
        run(PY, "-m", "trainer", "data", "synth", str(data), "--users", str(max_users),
            "--items", str(max_users // 4), "--seed", str(seed))
    return data


# the pretrained model costs ~200x the tiny preset per token on a CPU: fewer samples, LoRA
PRETRAINED_FIT = ("--max-train", "256", "--epochs", "2", "--batch-size", "8", "--max-valid", "300",
                  "--heads-epochs", "2")


def train(data: Path, artifacts: Path, seed: int, model: str) -> None:
    from exitrank.artifacts import ManifestError, verify_manifest
    from ranker_svc.artifact import COLLAB_LAYOUT, META_FILE
    from trainer.data.dataset import data_hash

    try:
        meta = json.loads((artifacts / "ranker" / META_FILE).read_text())
        if (verify_manifest(artifacts).get("data_hash") == data_hash(data)
                and (meta.get("collab") or {}).get("layout") == COLLAB_LAYOUT):
            print(f"artifacts in {artifacts} match the data and the soft-token layout: training skipped")
            return
    except (ManifestError, OSError, ValueError):
        pass
    # collaborative soft tokens: on games6k's popularity-matched negatives the text-only tiny model
    # stays at chance within a demo's budget; the soft tokens carry the LightGCN signal (README)
    if model == "tiny":
        run(PY, "-m", "trainer", "fit", "--data", str(data), "--out", str(artifacts),
            "--preset", "tiny", "--seed", str(seed), "--collab-tokens", "full", "--epochs", "2")
        return
    run(PY, "-m", "trainer", "models", "install", model)
    run(PY, "-m", "trainer", "fit", "--data", str(data), "--out", str(artifacts), "--base-model", model,
        "--seed", str(seed), "--collab-tokens", "full", *PRETRAINED_FIT)


class Service:
    """A service started as a real subprocess; the bound port is read from its first line."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.log = open(log, "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.address = self._wait_listening()

    def _wait_listening(self, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}: see {self.log.name}")
            if match := re.search(r"listening on (\S+:\d+)", line):
                print(f"{self.name} listening on {match.group(1)}")
                return match.group(1)
        raise SystemExit(f"{self.name} did not start within {timeout}s: see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def replay(channel: grpc.Channel, dataset, held_out: set[tuple[str, str]]) -> None:
    stub = retriever_pb2_grpc.RetrieverStub(channel)
    items = [common_pb2.Item(item_id=i, title=t) for i, t in dataset.titles.items()]
    summary = stub.UpsertItems(iter(tqdm(items, desc="UpsertItems", unit="item")), timeout=600)
    print(f"catalog: {summary.accepted} accepted, {summary.rejected} rejected")
    events = [
        common_pb2.Interaction(user_id=e.user_id, item_id=e.item_id, rating=e.rating,
                               timestamp_ms=e.timestamp_ms)
        for e in dataset.interactions if (e.user_id, e.item_id) not in held_out
    ]
    summary = stub.Ingest(iter(tqdm(events, desc="Ingest", unit="event")), timeout=600)
    print(f"stream: {summary.accepted} accepted, {summary.rejected} rejected")


def rank_held_out(channel: grpc.Channel, tests: dict[str, list], max_users: int) -> dict:
    stub = ranker_pb2_grpc.RankerStub(channel)
    labels, scores, layers, latencies, with_retrieval = [], [], Counter(), [], 0
    for user_id, samples in tqdm(list(tests.items())[:max_users], desc="Rank", unit="user"):
        candidates = list(dict.fromkeys(s.item_id for s in samples))
        label_of = {s.item_id: s.label for s in samples}
        started = time.perf_counter()
        response = stub.Rank(ranker_pb2.RankRequest(user_id=user_id, candidate_item_ids=candidates,
                                                    num_neighbors=4), timeout=30)
        latencies.append((time.perf_counter() - started) * 1000)
        with_retrieval += response.retrieval_used
        for score in response.scores:
            labels.append(label_of[score.item_id])
            scores.append(score.ctr)
            layers[score.exit_layer] += 1
    return {
        "users": len(latencies), "candidates": len(scores), "auc": auc(labels, scores),
        "retrieval_used_fraction": with_retrieval / max(1, len(latencies)),
        "exit_layer_histogram": dict(sorted(layers.items())),
        "latency_ms": {"p50": float(np.percentile(latencies, 50)),
                       "p99": float(np.percentile(latencies, 99))},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--max-users", type=int, default=2000, help="users imported or synthesised")
    parser.add_argument("--rank-users", type=int, default=200, help="held-out users ranked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="auto",
                        help="auto (the default: smollm2-135m where bf16 matmuls are native, else tiny), tiny "
                             "(a fresh decoder) or an installable model such as smollm2-135m")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model = choose_model(args.model)
    data = prepare_data(args.data_root, work, args.max_users, args.seed)
    artifacts = work / ("artifacts" if model == "tiny" else f"artifacts-{model}")
    train(data, artifacts, args.seed, model)

    from trainer.data.dataset import load_dataset

    dataset = load_dataset(data)
    held_out = {(s.user_id, s.item_id) for s in dataset.samples if s.split != "train"}
    tests: dict[str, list] = defaultdict(list)
    for sample in dataset.samples:
        if sample.split == "test":
            tests[sample.user_id].append(sample)

    retriever = Service("retriever", [PY, "-m", "retriever_svc.server", "serve", "--port", "0",
                                      "--artifacts", str(artifacts), "--data-dir", str(work / "redis")],
                        work / "retriever.log")
    ranker = None
    try:
        ranker = Service("ranker", [PY, "-m", "ranker_svc.server", "serve", "--port", "0",
                                    "--retriever", retriever.address, "--artifacts", str(artifacts)],
                         work / "ranker.log")
        with grpc.insecure_channel(retriever.address) as channel:
            replay(channel, dataset, held_out)
        time.sleep(1.0)  # let the stream consumer apply the tail of the replay
        with grpc.insecure_channel(ranker.address) as channel:
            result = rank_held_out(channel, tests, args.rank_users)
    finally:
        if ranker is not None:
            ranker.stop()
        retriever.stop()

    result["model"] = model
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    (work / "demo.json").write_text(json.dumps(result, indent=2))
    print(f"\nAUC on {result['candidates']} held-out candidates of {result['users']} users: "
          f"{result['auc']:.4f}  (retrieval used for {result['retrieval_used_fraction']:.0%})")
    print("exit-layer histogram:", result["exit_layer_histogram"])
    print(f"Rank latency p50 {result['latency_ms']['p50']:.1f} ms, p99 {result['latency_ms']['p99']:.1f} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
