"""Admission per client on the retriever, over real gRPC to the real core and redis-server: a client
stream's messages count against its client's rate (paced, not cut), and a client's calls in progress
are capped while another client's still pass. Clients are told apart by ``x-client-id`` (a trusted
gateway's header, ``limits.trust_client_id``), as they would be by their certificates."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import pytest

from exitrank.grpc_security import CLIENT_ID_KEY, RETRY_AFTER_KEY
from exitrank.security import Limits
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from retriever_svc.config import IndexConfig, ServerConfig
from retriever_svc.index import Retriever
from retriever_svc.records import CatalogItem
from retriever_svc.server import start_grpc
from retriever_svc.store import RedisStore
from tests.support.reliability import recording

pytestmark = pytest.mark.anyio
CODE = grpc.StatusCode
GET = retriever_pb2.GetItemsRequest(item_ids=["c0i0"])


@pytest.fixture(scope="module")
async def core(redis_server, unique_prefix, clustered):
    emb, _ = clustered()
    store = RedisStore.from_url(redis_server.url, prefix=unique_prefix("admit"), timeout_s=2.0)
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
    await retriever.load_embeddings(emb)
    await retriever.upsert_items([CatalogItem(i, f"Title {i}") for i in emb.item_ids])
    yield SimpleNamespace(retriever=retriever)
    await store.close()


def _as(client: str) -> tuple[tuple[str, str], ...]:
    return ((CLIENT_ID_KEY, client),)


async def _code(call) -> tuple[grpc.StatusCode, str, dict]:
    try:
        await call
        return CODE.OK, "", {}
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", dict(exc.trailing_metadata() or ())


async def _until(condition, timeout_s: float = 10.0) -> None:
    """Waits until ``condition()`` holds (a positive condition, checked every 5 ms), or fails."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def test_stream_messages_count_against_the_rate_limit(request, core):
    rate, burst, sent = 20.0, 10, 40
    running = await start_grpc(core.retriever, ServerConfig(port=0),
                               limits=Limits(rate_per_s=rate, burst=burst, trust_client_id=True))
    with recording(request.node.nodeid, "rate limit") as row:
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = retriever_pb2_grpc.RetrieverStub(channel)
                items = [common_pb2.Item(item_id=f"paced-{n}", title=f"Paced {n}") for n in range(sent)]
                started = time.monotonic()
                summary = await stub.UpsertItems(iter(items), timeout=30, metadata=_as("A"))
                took = time.monotonic() - started
                after_a = await _code(stub.GetItems(GET, timeout=10, metadata=_as("A")))
                other_b = await _code(stub.GetItems(GET, timeout=10, metadata=_as("B")))
        finally:
            await running.server.stop(0)
        assert summary.accepted == sent  # paced, never cut: every message stored
        assert took >= (sent - burst) / rate * 0.9, took  # 40 messages, 10 at once, then 20/s
        # the stream spent A's tokens, so A's next call waits its turn; B's bucket is its own
        assert after_a[0] == CODE.RESOURCE_EXHAUSTED and "rate limit: client id:A" in after_a[1], after_a
        assert int(after_a[2][RETRY_AFTER_KEY]) > 0 and other_b[0] == CODE.OK
        row.sent, row.refused = 3, 1
        row.measured = (f"retriever {rate:g} requests/s, burst {burst}, per x-client-id: an UpsertItems stream of "
                        f"{sent} items from A took {took:.2f} s (paced at its rate, all {sent} stored: a stream counts "
                        "each message, not once); A's next GetItems RESOURCE_EXHAUSTED with retry-after-ms, "
                        "B's served")


async def test_a_clients_calls_in_progress_are_capped(request, core):
    cap = 2
    running = await start_grpc(core.retriever, ServerConfig(port=0),
                               limits=Limits(max_concurrent_per_client=cap, trust_client_id=True))
    release = asyncio.Event()

    async def held(n: int):
        yield common_pb2.Interaction(user_id=f"held-{n}", item_id="c0i0", timestamp_ms=1)
        await release.wait()  # the stream stays open: a call in progress

    with recording(request.node.nodeid, "concurrency") as row:
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = retriever_pb2_grpc.RetrieverStub(channel)
                streams = [stub.Ingest(held(n), timeout=30, metadata=_as("A")) for n in range(cap)]
                await _until(lambda: running.guard.in_progress("id:A") == cap)
                over = await _code(stub.GetItems(GET, timeout=10, metadata=_as("A")))
                other = await _code(stub.GetItems(GET, timeout=10, metadata=_as("B")))
                release.set()
                summaries = [await s for s in streams]
                await _until(lambda: running.guard.in_progress("id:A") == 0)
                again = await _code(stub.GetItems(GET, timeout=10, metadata=_as("A")))
        finally:
            await running.server.stop(0)
        assert over[0] == CODE.RESOURCE_EXHAUSTED and over[1].startswith(
            f"client id:A already has {cap} calls in progress (limits.max_concurrent_per_client"), over
        assert other[0] == CODE.OK and again[0] == CODE.OK
        assert [s.accepted for s in summaries] == [1] * cap
        assert running.guard.refusals["concurrency"] == 1
        row.sent, row.refused = cap + 3, 1
        row.measured = (f"limits.max_concurrent_per_client={cap}: with {cap} Ingest streams of client A open, A's "
                        "GetItems RESOURCE_EXHAUSTED at once, B's served; once A's streams ended (both stored), "
                        "A's next GetItems served")
