"""Fixtures for the ranker tests: synthetic examples, a tiny real Llama artifact, an in-memory context
source, and a real in-process ``exitrank.v1.Retriever`` gRPC server over fixed data."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
import torch

from exitrank.types import HistoryItem, NeighborContext, RankExample, UserContext
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from ranker_svc.artifact import LoadedRanker, load_ranker, save_ranker
from ranker_svc.exits import ExitPolicy
from ranker_svc.prompt import PromptBuilder, PromptConfig
from trainer.lm import build_model, build_tokenizer

POSITIVE = ("sunny", "golden", "bright", "happy")
NEGATIVE = ("gloomy", "rusty", "dull", "broken")
NOUNS = ("garden", "river", "castle", "story", "journey", "forest")
CATALOG = {f"i-{a}-{n}": f"The {a} {n}" for a in POSITIVE + NEGATIVE for n in NOUNS}


def make_examples(n: int, seed: int = 0) -> list[RankExample]:
    """Examples whose label is 1 exactly when the target title has a positive adjective."""
    rng = random.Random(seed)
    items = sorted(CATALOG.items())

    def history(k: int) -> tuple[HistoryItem, ...]:
        return tuple(HistoryItem(i, t, float(rng.randint(1, 5)), j) for j, (i, t) in enumerate(rng.sample(items, k)))

    out = []
    for u in range(n):
        ctx = UserContext(user_id=f"u{u}", history=history(2),
                          neighbors=tuple(NeighborContext(f"v{u}-{j}", 0.9 - 0.1 * j, history(2)) for j in range(2)),
                          embedding_version="emb-1")
        item_id, title = rng.choice(items)
        out.append(RankExample(context=ctx, item_id=item_id, title=title, label=int(title.split()[1] in POSITIVE)))
    return out


class MemoryContextSource:
    """A real in-process ContextSource over Python dicts (an alternative implementation of the Protocol).

    ``available=False`` behaves like an unreachable retriever: no context, titles raise.
    """

    def __init__(self, *, contexts: dict[str, UserContext], titles: dict[str, str], available: bool = True) -> None:
        self.contexts = contexts
        self.titles = titles
        self.available = available
        self.context_calls: list[tuple[str, int, int]] = []
        self.timeouts: list[float | None] = []

    async def get_context(self, user_id: str, k: int, max_history: int, *, timeout_s: float | None = None,
                          embedding_version: str | None = None) -> UserContext | None:
        self.context_calls.append((user_id, k, max_history))
        self.timeouts.append(timeout_s)
        if not self.available or user_id not in self.contexts:
            return None
        ctx = self.contexts[user_id]
        return UserContext(user_id=ctx.user_id, history=ctx.history[-max_history:],
                           neighbors=ctx.neighbors[:k], embedding_version=ctx.embedding_version)

    async def get_titles(self, item_ids: Sequence[str], *, timeout_s: float | None = None,
                         embedding_version: str | None = None) -> dict[str, str]:
        from ranker_svc.errors import ContextUnavailable

        self.timeouts.append(timeout_s)
        if not self.available:
            raise ContextUnavailable("memory source switched off")
        return {i: self.titles[i] for i in item_ids if i in self.titles}

    async def get_item_vectors(self, item_ids: Sequence[str], *, embedding_version: str,
                               timeout_s: float | None = None) -> dict:
        return {i: None for i in item_ids}  # no vectors here: every item lacks them


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models: one torch thread (OpenMP barriers on a shared 2-core box cost far more than they save)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def examples() -> list[RankExample]:
    return make_examples(48)


@pytest.fixture(scope="session")
def tiny_ranker_dir(tmp_path_factory, examples) -> Path:
    """A real tiny Llama (hidden 64, 6 layers, random weights) saved as a ranker artifact."""
    prompt = PromptConfig(rating_style="stars")
    builder = PromptBuilder(config=prompt)
    texts = [builder.full_text(ex.context, ex.title) for ex in examples]
    tokenizer = build_tokenizer(texts, vocab_size=500)
    causal_lm = build_model(tokenizer, preset="tiny", arch="llama", seed=0)
    with torch.no_grad():  # sharper random logits, so heads disagree and rows exit at different layers
        causal_lm.lm_head.weight.mul_(40.0)
    ranker_dir = tmp_path_factory.mktemp("artifacts") / "ranker"
    save_ranker(ranker_dir, causal_lm=causal_lm, tokenizer=tokenizer, prompt=prompt, exit_layers=[1, 2, 3, 4, 5],
                policy=ExitPolicy(criterion="probability_delta", threshold=0.05, window=2))
    return ranker_dir


@pytest.fixture(scope="session")
def loaded(tiny_ranker_dir) -> LoadedRanker:
    return load_ranker(tiny_ranker_dir)


@pytest.fixture(scope="session")
def memory_source_factory(examples):
    def make(available: bool = True) -> MemoryContextSource:
        contexts = {ex.context.user_id: ex.context for ex in examples}
        return MemoryContextSource(contexts=contexts, titles=dict(CATALOG), available=available)

    return make


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def catalog() -> dict[str, str]:
    return dict(CATALOG)


class MemoryRetriever(retriever_pb2_grpc.RetrieverServicer):
    """A real ``exitrank.v1.Retriever`` gRPC servicer over fixed in-memory data (GetContext, GetItems).

    ``delay_s`` slows every call down (deadline tests); ``get_items_calls`` counts catalog look-ups;
    ``deadlines`` records the time each call had left (the deadline the ranker propagated).
    """

    def __init__(self, *, contexts: dict[str, UserContext], titles: dict[str, str]) -> None:
        self.contexts = contexts
        self.titles = titles
        self.delay_s = 0.0
        self.get_items_calls = 0
        self.deadlines: list[float | None] = []

    async def GetContext(self, request, context):
        self.deadlines.append(context.time_remaining())
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        ctx = self.contexts.get(request.user_id)
        if ctx is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"user_id: unknown user {request.user_id!r}")
        return retriever_pb2.UserContext(
            user_id=ctx.user_id,
            history=[_history_pb(h) for h in ctx.history[-request.max_history:]],
            neighbors=[retriever_pb2.NeighborContext(user_id=n.user_id, score=n.score,
                                                     history=[_history_pb(h) for h in n.history])
                       for n in ctx.neighbors[: request.k]],
            embedding_version=ctx.embedding_version,
        )

    async def GetItems(self, request, context):
        self.deadlines.append(context.time_remaining())
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.get_items_calls += 1
        return retriever_pb2.GetItemsResponse(
            items=[common_pb2.Item(item_id=i, title=self.titles[i]) for i in request.item_ids if i in self.titles],
            missing_item_ids=[i for i in request.item_ids if i not in self.titles],
        )


def _history_pb(item: HistoryItem) -> common_pb2.HistoryItem:
    return common_pb2.HistoryItem(item_id=item.item_id, title=item.title, rating=item.rating,
                                  timestamp_ms=item.timestamp_ms)


@pytest.fixture(scope="module")
async def retriever(examples):
    """(servicer, "127.0.0.1:PORT") of a MemoryRetriever served on loopback for the module."""
    servicer = MemoryRetriever(contexts={ex.context.user_id: ex.context for ex in examples}, titles=dict(CATALOG))
    server = grpc.aio.server()
    retriever_pb2_grpc.add_RetrieverServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture(scope="session")
def memory_retriever(examples):
    """make(extra={user: UserContext}) -> a fresh :class:`MemoryRetriever` over the examples (and
    ``extra``), for tests that serve it themselves (over TLS, under limits)."""
    def make(extra: dict[str, UserContext] | None = None) -> MemoryRetriever:
        contexts = {ex.context.user_id: ex.context for ex in examples}
        return MemoryRetriever(contexts={**contexts, **(extra or {})}, titles=dict(CATALOG))

    return make
