"""Session fixtures shared by every test package: a real redis-server, data paths, and a live stack
(real ``retriever-svc`` and ``ranker-svc`` processes) for the client and example tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from exitrank.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EXITRANK_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory) -> Path:
    """``XDG_STATE_HOME`` of every process the tests start: a retriever without ``--data-dir`` keeps
    its embedded Redis under it (``retriever_svc.config.default_data_dir``), never in the user's home."""
    path = tmp_path_factory.mktemp("state-home")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(path)
    yield path
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> EmbeddedRedis:
    """One real redis-server (unix socket, password, AOF) for the whole session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The session server's URL with an emptied database for each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip only when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (set EXITRANK_DATA to the shared data folder)")
    return SHARED_DATA


# ---- a live stack: real retriever-svc and ranker-svc processes over a tiny real artifact ------------

STACK_ADJECTIVES = ("sunny", "golden", "bright", "gloomy", "rusty", "dull")
STACK_NOUNS = ("garden", "river", "castle", "story")


@dataclass(frozen=True)
class LiveStack:
    """Addresses of the running services and the data they were seeded with.

    ``titles``: item id -> title (the catalog); ``histories``: user id -> the item ids it interacted with
    (users ``g<group>u<j>`` like the items of adjective group ``g``); ``logs``: the services' stderr files.
    """

    retriever: str
    ranker: str
    titles: dict[str, str]
    histories: dict[str, list[str]]
    artifacts: Path
    logs: dict[str, Path]


def _stack_data() -> tuple[dict[str, str], dict[str, list[str]]]:
    titles = {f"{a}-{n}": f"The {a} {n}" for a in STACK_ADJECTIVES for n in STACK_NOUNS}
    histories = {f"g{g}u{j}": [f"{a}-{STACK_NOUNS[(j + k) % len(STACK_NOUNS)]}" for k in range(3)]
                 for g, a in enumerate(STACK_ADJECTIVES[:3]) for j in range(4)}
    return titles, histories


def _write_stack_artifacts(out: Path, titles: dict[str, str], histories: dict[str, list[str]]) -> None:
    """``out/gcn`` (fold-in embeddings whose users cluster by adjective) and ``out/ranker`` (a tiny
    random-weight Llama with exit heads, as ``tests/ranker_svc/conftest.py`` builds it)."""
    import numpy as np
    import torch

    from exitrank.types import HistoryItem, UserContext
    from ranker_svc.artifact import save_ranker
    from ranker_svc.exits import ExitPolicy
    from ranker_svc.prompt import PromptBuilder, PromptConfig
    from retriever_svc.embeddings import GCNEmbeddings
    from trainer.lm import build_model, build_tokenizer

    item_ids = sorted(titles)
    basis = np.random.default_rng(0).normal(0, 0.05, (len(item_ids), len(STACK_ADJECTIVES))).astype(np.float32)
    for row, item in enumerate(item_ids):
        basis[row, STACK_ADJECTIVES.index(item.split("-")[0])] += 1.0
    users = np.stack([basis[[item_ids.index(i) for i in h]].sum(0) / np.sqrt(len(h)) for h in histories.values()])
    GCNEmbeddings(user_ids=list(histories), item_ids=item_ids, user=users, item=basis.copy(), item_foldin=basis,
                  version="stack-1", meta={"layers": 2, "layer_combination": "mean_1_to_K"}).save(out)
    prompt = PromptConfig(rating_style="stars")
    builder = PromptBuilder(config=prompt)
    texts = [builder.full_text(UserContext(u, tuple(HistoryItem(i, titles[i], 5.0) for i in h)), t)
             for u, h in histories.items() for t in titles.values()]
    tokenizer = build_tokenizer(texts, vocab_size=400)
    causal_lm = build_model(tokenizer, preset="tiny", arch="llama", seed=0)
    with torch.no_grad():  # sharper random logits: candidates get distinct CTRs and exit at different layers
        causal_lm.lm_head.weight.mul_(40.0)
    save_ranker(out / "ranker", causal_lm=causal_lm, tokenizer=tokenizer, prompt=prompt, exit_layers=[1, 2, 3, 4, 5],
                policy=ExitPolicy(criterion="probability_delta", threshold=0.05, window=2))


def launch_service(argv: list[str], log: Path) -> subprocess.Popen:
    """Starts a console script with stderr to ``log`` (a pipe nobody reads could fill and block it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as err:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)


def await_ready(proc: subprocess.Popen, ready: str, log: Path, timeout_s: float = 120) -> str:
    """Waits for the service's ``<ready> HOST:PORT`` line; returns HOST:PORT (fails the test otherwise)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not lines or not lines[0].startswith(ready):
        stop_service(proc)
        pytest.fail(f"{proc.args[0]} printed {lines!r}, not {ready!r}; stderr: {log.read_text()[-3000:]}")
    return lines[0].split()[-1]


def stop_service(proc: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _seed_retriever(address: str, titles: dict[str, str], histories: dict[str, list[str]]) -> None:
    """The catalog and the histories through the generated stubs; waits until the consumer applied them."""
    import grpc

    from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = retriever_pb2_grpc.RetrieverStub(channel)
        stub.UpsertItems(iter([common_pb2.Item(item_id=i, title=t) for i, t in titles.items()]), timeout=30)
        stub.Ingest(iter([common_pb2.Interaction(user_id=u, item_id=i, rating=5.0, timestamp_ms=1000 + k)
                          for u, h in histories.items() for k, i in enumerate(h)]), timeout=30)
        deadline = time.monotonic() + 30
        last = next(reversed(histories))
        while len(stub.GetContext(retriever_pb2.ContextRequest(user_id=last, k=1, max_history=10),
                                  timeout=10).history) < len(histories[last]):
            assert time.monotonic() < deadline, "the retriever never applied the seeded interactions"
            time.sleep(0.05)


@dataclass(frozen=True)
class StackArtifacts:
    """The live stack's artifact directory (``gcn/`` and ``ranker/``), its data, and ``seed(address)``,
    which upserts the catalog and ingests the histories into a retriever and waits until applied."""

    artifacts: Path
    titles: dict[str, str]
    histories: dict[str, list[str]]

    def seed(self, address: str) -> None:
        _seed_retriever(address, self.titles, self.histories)


@pytest.fixture(scope="session")
def stack_artifacts(tmp_path_factory) -> StackArtifacts:
    """The live stack's artifacts, written once per session, for tests that run their own processes."""
    root = tmp_path_factory.mktemp("stack-artifacts")
    titles, histories = _stack_data()
    _write_stack_artifacts(root / "artifacts", titles, histories)
    return StackArtifacts(artifacts=root / "artifacts", titles=titles, histories=histories)


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory, stack_artifacts) -> LiveStack:
    """Real ``retriever-svc`` (its embedded redis-server) and ``ranker-svc`` on loopback for the session.

    The retriever keeps its own redis-server: ``redis_url`` flushes the shared one before each test.
    """
    root = tmp_path_factory.mktemp("stack")
    titles, histories = stack_artifacts.titles, stack_artifacts.histories
    artifacts = stack_artifacts.artifacts
    bin_dir = Path(sys.executable).parent
    logs = {"retriever": root / "retriever.log", "ranker": root / "ranker.log"}
    retriever = launch_service([str(bin_dir / "retriever-svc"), "serve", "--port", "0", "--artifacts",
                                str(artifacts), "--data-dir", str(root / "data")], logs["retriever"])
    ranker = None
    try:
        retriever_addr = await_ready(retriever, "retriever listening on ", logs["retriever"])
        ranker = launch_service([str(bin_dir / "ranker-svc"), "serve", "--port", "0", "--retriever", retriever_addr,
                                 "--artifacts", str(artifacts), "--dtype", "float32", "--num-threads", "1"],
                                logs["ranker"])
        _seed_retriever(retriever_addr, titles, histories)  # while the ranker loads its model
        ranker_addr = await_ready(ranker, "ranker listening on ", logs["ranker"])
        yield LiveStack(retriever=retriever_addr, ranker=ranker_addr, titles=titles, histories=histories,
                        artifacts=artifacts, logs=logs)
    finally:
        if ranker is not None:
            stop_service(ranker)
        stop_service(retriever)


@pytest.fixture(scope="module")
def spawn_service(tmp_path_factory):
    """spawn(script, *args, ready=...) -> HOST:PORT: a console script of the venv as a real process,
    stopped (SIGTERM) when the module's tests are done; its stderr goes to a log file."""
    started: list[subprocess.Popen] = []
    logs = tmp_path_factory.mktemp("spawned")

    def spawn(script: str, *args: str, ready: str) -> str:
        log = logs / f"{script}-{len(started)}.log"
        proc = launch_service([str(Path(sys.executable).parent / script), *args], log)
        started.append(proc)
        return await_ready(proc, ready, log)

    yield spawn
    for proc in started:
        stop_service(proc)
