"""Fixtures for the observability tests: one artifacts directory holding a tiny real Llama ranker and
a LightGCN-shaped embedding over the same catalog, so a real ranker can call a real retriever."""

from __future__ import annotations

import asyncio
import itertools
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from exitrank.observability.config import ObservabilityConfig
from exitrank.observability.interceptors import ServerTelemetry
from exitrank.types import HistoryItem, NeighborContext, UserContext
from exitrank.v1 import common_pb2, ranker_pb2_grpc, retriever_pb2_grpc
from ranker_svc import config as ranker_config
from ranker_svc.artifact import save_ranker
from ranker_svc.exits import ExitPolicy
from ranker_svc.prompt import PromptBuilder, PromptConfig
from ranker_svc.server import start_server
from retriever_svc.config import IndexConfig, RedisConfig, ServerConfig
from retriever_svc.consumer import StreamConsumer
from retriever_svc.embeddings import GCNEmbeddings
from retriever_svc.index import Retriever
from retriever_svc.server import build_metrics, start_grpc
from retriever_svc.store import RedisStore
from trainer.lm import build_model, build_tokenizer

GROUPS = {0: ("sunny", "golden"), 1: ("gloomy", "rusty"), 2: ("bright", "broken")}
NOUNS = ("garden", "river", "castle", "story")
CATALOG = {f"i-{a}-{n}": f"The {a} {n}" for adjs in GROUPS.values() for a in adjs for n in NOUNS}
USERS_PER_GROUP = 4


def _group_items(group: int) -> list[str]:
    return [f"i-{a}-{n}" for a in GROUPS[group] for n in NOUNS]


def _histories() -> dict[str, list[str]]:
    """User ``g<g>u<j>`` interacted with 3 items of group g."""
    rng = np.random.default_rng(0)
    out = {}
    for group in GROUPS:
        items = _group_items(group)
        for j in range(USERS_PER_GROUP):
            out[f"g{group}u{j}"] = [items[p] for p in sorted(rng.choice(len(items), 3, replace=False))]
    return out


HISTORIES = _histories()


def gcn_embeddings() -> GCNEmbeddings:
    """Item vectors near axis g for group g; users are the exact fold-in of their items."""
    rng = np.random.default_rng(1)
    item_ids = sorted(CATALOG)
    basis = rng.normal(0, 0.05, (len(item_ids), 4)).astype(np.float32)
    for row, item in enumerate(item_ids):
        basis[row, next(g for g, adjs in GROUPS.items() if item.split("-")[1] in adjs)] += 1.0
    row_of = {item: row for row, item in enumerate(item_ids)}
    user_ids = sorted(HISTORIES)
    user = np.stack([basis[[row_of[i] for i in HISTORIES[u]]].sum(0) / np.sqrt(3) for u in user_ids])
    return GCNEmbeddings(user_ids=user_ids, item_ids=item_ids, user=user.astype(np.float32), item=basis.copy(),
                         item_foldin=basis, version="obs-test-1",
                         meta={"layers": 3, "layer_combination": "mean_1_to_K"})


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory) -> Path:
    """``ARTIFACTS/ranker`` (tiny random-weight Llama, 6 layers, exits 1..5) and ``ARTIFACTS/gcn``."""
    root = tmp_path_factory.mktemp("obs-artifacts")
    prompt = PromptConfig(rating_style="stars")
    builder = PromptBuilder(config=prompt)
    contexts = [UserContext(user_id=u, history=tuple(HistoryItem(i, CATALOG[i], 4.0, t) for t, i in enumerate(items)),
                            neighbors=(NeighborContext("g0u0", 0.9, ()),)) for u, items in HISTORIES.items()]
    texts = [builder.full_text(ctx, title) for ctx in contexts for title in list(CATALOG.values())[:6]]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = build_tokenizer(texts, vocab_size=400)
        causal_lm = build_model(tokenizer, preset="tiny", arch="llama", seed=0)
        with torch.no_grad():  # sharper random logits: rows exit at different layers
            causal_lm.lm_head.weight.mul_(40.0)
        save_ranker(root / "ranker", causal_lm=causal_lm, tokenizer=tokenizer, prompt=prompt,
                    exit_layers=[1, 2, 3, 4, 5],
                    policy=ExitPolicy(criterion="probability_delta", threshold=0.05, window=2))
    finally:
        torch.set_num_threads(before)
    gcn_embeddings().save(root)
    return root


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


_prefixes = itertools.count()


@pytest.fixture(scope="session")
def unique_prefix():
    """prefix(name): a Redis key prefix no other test uses."""
    return lambda name: f"obs{next(_prefixes)}{name}"


@pytest.fixture(scope="session")
def tools() -> SimpleNamespace:
    """The helpers below: scrape, ascrape, sample, until, and the fixed data."""
    return SimpleNamespace(scrape=scrape, ascrape=ascrape, sample=sample, until=until, catalog=dict(CATALOG),
                           histories={u: list(i) for u, i in HISTORIES.items()})


async def load_data(channel: grpc.aio.Channel) -> int:
    """The catalog and every history through the retriever's real UpsertItems/Ingest; the event count."""
    stub = retriever_pb2_grpc.RetrieverStub(channel)
    items = await stub.UpsertItems(iter([common_pb2.Item(item_id=i, title=t) for i, t in CATALOG.items()]))
    assert items.accepted == len(CATALOG)
    events = [common_pb2.Interaction(user_id=u, item_id=i, rating=4.0, timestamp_ms=100 + j)
              for u, history in HISTORIES.items() for j, i in enumerate(history)]
    summary = await stub.Ingest(iter(events))
    assert summary.accepted == len(events)
    return len(events)


@pytest.fixture(scope="module")
async def stack(artifacts_dir, redis_server, unique_prefix):
    """In process, on loopback: a real retriever (core, stream consumer, gRPC server, metrics on a
    free port, access lines for every call) over the session redis-server, and a real ranker
    server calling it (metrics on a free port, access lines)."""
    store = RedisStore.from_url(redis_server.url, prefix=unique_prefix("stack"), timeout_s=2.0)
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"), replica="stack")
    await retriever.load_embeddings(GCNEmbeddings.load(artifacts_dir))
    consumer = StreamConsumer(retriever=retriever, store=store, config=RedisConfig(consumer="stack", block_ms=50))
    consumer.start()
    retriever_metrics = build_metrics(retriever, consumer)
    retriever_metrics.serve("127.0.0.1", 0)
    running = await start_grpc(retriever, ServerConfig(port=0),
                               telemetry=ServerTelemetry(metrics=retriever_metrics, access_log="all"))
    server, port = running.server, running.port
    retriever_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    events = await load_data(retriever_channel)

    async def applied() -> bool:
        return consumer.applied >= events

    await until(applied)
    config = ranker_config.RankerConfig(
        model=ranker_config.ModelConfig(artifacts_dir=artifacts_dir, dtype="float32"),
        server=ranker_config.ServerConfig(port=0),
        retriever=ranker_config.RetrieverConfig(target=f"127.0.0.1:{port}", timeout_s=10.0),
        observability=ObservabilityConfig(metrics_port=0, access_log="all"))
    ranker = await start_server(config)
    ranker_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ranker.port}")
    yield SimpleNamespace(ranker=ranker, ranker_stub=ranker_pb2_grpc.RankerStub(ranker_channel),
                          retriever_stub=retriever_pb2_grpc.RetrieverStub(retriever_channel),
                          retriever_metrics=retriever_metrics, retriever=retriever, store=store)
    await ranker_channel.close()
    await ranker.stop(None)
    await retriever_channel.close()
    await server.stop(None)
    retriever_metrics.close()
    await consumer.stop()
    await store.close()


def scrape(port: int) -> dict[str, list]:
    """GET /metrics on 127.0.0.1:port; {family name: [(sample name, labels, value)]}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


async def ascrape(port: int) -> dict[str, list]:
    """:func:`scrape` off the event loop (the retriever's stats are read on the loop when scraped)."""
    return await asyncio.to_thread(scrape, port)


def sample(families: dict[str, list], family: str, name: str | None = None, **labels) -> float | None:
    """The value of the sample ``name`` (default: the family's name) whose labels include ``labels``."""
    for sample_name, sample_labels, value in families.get(family, []):
        if sample_name == (name or family) and all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return None


async def until(predicate, timeout_s: float = 20.0, interval_s: float = 0.05):
    """Await ``predicate()`` until it is truthy (then return it) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval_s)
