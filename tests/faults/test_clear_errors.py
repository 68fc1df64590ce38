"""Start-up mistakes a newcomer makes, each met with one clear line and a non-zero exit by real
``ranker-svc``/``retriever-svc`` processes, never a silent start or a traceback:

- a port another process listens on (gRPC's ``SO_REUSEPORT`` is off: a second server used to bind
  the retriever's port and split its calls), for ``--port`` and ``--metrics-port``;
- an ``--artifacts`` directory that does not exist (the message names it and ``trainer fit``);
- a ranker trained with collaborative soft tokens against a retriever holding other embeddings: it
  starts, but its health is NOT_SERVING with the reason logged, and Rank fails with that one message.
"""

from __future__ import annotations

import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from tests.conftest import await_ready, launch_service, stop_service
from tests.faults.conftest import BIN

RANKER, RETRIEVER = str(BIN / "ranker-svc"), str(BIN / "retriever-svc")
BUSY = "is already in use"


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=240)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "ERROR" in line or line.startswith(("ranker-svc:", "retriever-svc:"))]


def test_busy_ports_and_a_missing_artifacts_directory_stop_both_services(tmp_path, live_stack, stack_artifacts):
    taken = live_stack.retriever.rsplit(":", 1)[1]  # the live retriever's gRPC port
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    metrics = str(holder.getsockname()[1])  # a port a plain TCP server holds
    art, missing = str(stack_artifacts.artifacts), str(tmp_path / "no-such-artifacts")
    cases = [  # (argv, what stderr must name)
        ([RANKER, "serve", "--port", taken, "--retriever", live_stack.retriever, "--artifacts", art],
         f"server.port (--port): 127.0.0.1:{taken} {BUSY}"),
        ([RETRIEVER, "serve", "--port", taken, "--artifacts", art, "--data-dir", str(tmp_path / "r1")],
         f"server.port (--port): 127.0.0.1:{taken} {BUSY}"),
        ([RANKER, "serve", "--port", "0", "--metrics-port", metrics, "--retriever", live_stack.retriever,
          "--artifacts", art], f"observability.metrics_port (--metrics-port): 127.0.0.1:{metrics} {BUSY}"),
        ([RETRIEVER, "serve", "--port", "0", "--metrics-port", metrics, "--artifacts", art,
          "--data-dir", str(tmp_path / "r2")], f"observability.metrics_port (--metrics-port): 127.0.0.1:{metrics} {BUSY}"),
        ([RANKER, "serve", "--port", "0", "--retriever", live_stack.retriever, "--artifacts", missing],
         f"--artifacts {missing} does not exist: train one with `trainer fit --data DATA --out {missing}`"),
        ([RETRIEVER, "serve", "--port", "0", "--artifacts", missing, "--data-dir", str(tmp_path / "r3")],
         f"--artifacts {missing} does not exist: train one with `trainer fit --data DATA --out {missing}`"),
    ]
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:  # 2 cores: two imports at a time
            results = list(pool.map(lambda case: _run(case[0]), cases))
    finally:
        holder.close()
    for (argv, named), proc in zip(cases, results):
        where = f"{Path(argv[0]).name} {' '.join(argv[1:4])}: {proc.stderr[-1500:]}"
        assert proc.returncode == 2, where
        assert "listening on" not in proc.stdout and "Traceback" not in proc.stderr, where
        errors = _error_lines(proc.stderr)
        assert len(errors) == 1 and named in errors[0], where
    assert not (tmp_path / "r3").exists()  # refused before its Redis started
    with grpc.insecure_channel(live_stack.retriever) as channel:  # the port's owner alone answers on it
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="exitrank.v1.Retriever"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def _soft_token_ranker(root: Path, titles: dict[str, str], version: str) -> Path:
    """A tiny random ranker whose prompts read LightGCN vectors of ``version`` (as ``trainer fit
    --collab-tokens full`` writes one)."""
    from exitrank.types import HistoryItem, UserContext
    from ranker_svc.artifact import save_ranker
    from ranker_svc.collab import CollabProjector
    from ranker_svc.exits import ExitPolicy
    from ranker_svc.prompt import PromptBuilder, PromptConfig
    from trainer.lm import build_model, build_tokenizer, ensure_collab_token

    prompt = PromptConfig(rating_style="stars", collab="full")
    builder = PromptBuilder(config=prompt)
    items = sorted(titles)
    texts = [builder.full_text(UserContext("u", tuple(HistoryItem(i, titles[i], 5.0) for i in items[:3])), t)
             for t in titles.values()]
    tokenizer = build_tokenizer(texts, vocab_size=400)
    causal_lm = build_model(tokenizer, preset="tiny", arch="llama", seed=0)
    torch.manual_seed(0)
    projector = CollabProjector(6, causal_lm.config.hidden_size, token_id=ensure_collab_token(tokenizer, causal_lm))
    save_ranker(root / "ranker", causal_lm=causal_lm, tokenizer=tokenizer, prompt=prompt, exit_layers=[2, 4],
                policy=ExitPolicy(), collab=projector, embedding_version=version)
    return root


def test_a_soft_token_ranker_against_other_embeddings_is_not_serving_and_says_why(tmp_path, live_stack):
    artifacts = _soft_token_ranker(tmp_path / "collab", live_stack.titles, version="gcn-elsewhere")
    log = tmp_path / "ranker.log"
    ranker = launch_service([RANKER, "serve", "--port", "0", "--retriever", live_stack.retriever, "--artifacts",
                             str(artifacts), "--dtype", "float32", "--num-threads", "1"], log)
    try:
        address = await_ready(ranker, "ranker listening on ", log)
        with grpc.insecure_channel(address) as channel:
            for service in ("", "exitrank.v1.Ranker"):  # decided before the listening line
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                ranker_pb2_grpc.RankerStub(channel).Rank(ranker_pb2.RankRequest(
                    user_id="g0u0", candidate_item_ids=sorted(live_stack.titles)[:3]), timeout=30)
                raise AssertionError("Rank answered with vectors of another embedding version")
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "'gcn-elsewhere'" in details and "is not kept by this retriever (it serves stack-1" in details
        assert details.count("Serve the retriever with the same artifacts") == 1 and "any more" not in details
    finally:
        assert stop_service(ranker) == 0
    reasons = [line for line in log.read_text().splitlines() if "health NOT_SERVING" in line]
    assert len(reasons) == 1 and "'gcn-elsewhere'" in reasons[0]  # logged once, with the reason
