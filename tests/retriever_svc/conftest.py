"""Fixtures for the retriever tests: the asyncio backend, a store per test, clustered embeddings, and
``retriever-svc`` as a real process (:func:`start_retriever`)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from retriever_svc.embeddings import GCNEmbeddings
from retriever_svc.store import RedisStore

_prefixes = itertools.count()
CLI = Path(sys.executable).with_name("retriever-svc")


def start_retriever(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``retriever-svc serve --port 0 ARGS`` as a real process: (the process, its address) once it listens.

    Its stderr goes to an unnamed temporary file, never a pipe that a long run could fill (and so
    block the server); :func:`stderr_of` reads it. ``env``: its environment (default: this one's).
    """
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([str(CLI), "serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=log, text=True,
                            env=env)
    proc.log = log  # type: ignore[attr-defined]
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=60)
    if not lines or not lines[0].startswith("retriever listening on "):
        proc.kill()
        pytest.fail(f"retriever-svc did not start: {lines}; stderr: {stderr_of(proc)}")
    return proc, lines[0].split()[-1]


def stderr_of(proc: subprocess.Popen, tail: int = 2000) -> str:
    """The last ``tail`` characters a :func:`start_retriever` process wrote to stderr."""
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read()[-tail:]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def unique_prefix():
    """prefix(name): a key prefix no other test uses (module-scoped data survives flushes)."""
    return lambda name: f"t{next(_prefixes)}{name}"


@pytest.fixture(scope="session")
def clustered():
    """clustered(**kw) -> (GCNEmbeddings, {user: items}); see ``clustered_embeddings``."""
    return clustered_embeddings


@pytest.fixture(scope="session")
def brute_force():
    """brute_force(ids, vectors, query, k, exclude) -> cosine top-k by a full scan."""
    return brute_force_search


@pytest.fixture
async def store(redis_url: str):
    """A store on the flushed session redis-server."""
    s = RedisStore.from_url(redis_url, prefix="xr")
    yield s
    await s.close()


def clustered_embeddings(
    *, clusters: int = 3, users_per_cluster: int = 6, items_per_cluster: int = 5, dim: int = 8,
    seed: int = 0,
) -> tuple[GCNEmbeddings, dict[str, list[str]]]:
    """Embeddings whose users are the exact fold-in of their items' basis vectors.

    Items of cluster c point near axis c; user ``c<c>u<j>`` interacted with 3 items of cluster c.
    Returns the embeddings and each user's items.
    """
    rng = np.random.default_rng(seed)
    item_ids = [f"c{c}i{j}" for c in range(clusters) for j in range(items_per_cluster)]
    basis = rng.normal(0, 0.05, (len(item_ids), dim)).astype(np.float32)
    for row, item in enumerate(item_ids):
        basis[row, int(item[1:].split("i")[0])] += 1.0
    history: dict[str, list[str]] = {}
    for c in range(clusters):
        for j in range(users_per_cluster):
            picks = rng.choice(items_per_cluster, 3, replace=False)
            history[f"c{c}u{j}"] = [f"c{c}i{p}" for p in sorted(picks)]
    row_of = {item: row for row, item in enumerate(item_ids)}
    user_ids = list(history)
    user = np.stack([
        basis[[row_of[i] for i in history[u]]].sum(0) / np.sqrt(len(history[u])) for u in user_ids
    ]).astype(np.float32)
    emb = GCNEmbeddings(
        user_ids=user_ids, item_ids=item_ids, user=user, item=basis.copy(), item_foldin=basis,
        version=f"test-{seed}", meta={"layers": 3, "layer_combination": "mean_1_to_K"},
    )
    return emb, history


def brute_force_search(emb_ids: list[str], vectors: np.ndarray, query: np.ndarray, k: int,
                exclude: str | None = None) -> list[tuple[str, float]]:
    """Cosine top-k by a full scan (the reference for FAISS)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = query / np.linalg.norm(query)
    scores = unit @ q
    order = np.argsort(-scores, kind="stable")
    out = [(emb_ids[r], float(scores[r])) for r in order if emb_ids[r] != exclude]
    return out[:k]
