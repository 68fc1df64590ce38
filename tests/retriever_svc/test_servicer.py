"""The gRPC servicer in process (grpc.aio on 127.0.0.1:0) over the real core and redis-server."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from exitrank.redis_server import EmbeddedRedis
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from retriever_svc.config import IndexConfig, RedisConfig, ServerConfig
from retriever_svc.consumer import StreamConsumer
from retriever_svc.index import Retriever
from retriever_svc.server import start_grpc
from retriever_svc.store import RedisStore

pytestmark = pytest.mark.anyio


async def _serve(url: str, prefix: str, emb=None):
    store = RedisStore.from_url(url, prefix=prefix, timeout_s=1.0)
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
    if emb is not None:
        await retriever.load_embeddings(emb)
    consumer = StreamConsumer(retriever=retriever, store=store,
                              config=RedisConfig(consumer="svc", block_ms=50))
    consumer.start()
    running = await start_grpc(retriever, ServerConfig(port=0, ingest_batch=4))
    server, port = running.server, running.port
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = retriever_pb2_grpc.RetrieverStub(channel)

    async def close() -> None:
        await channel.close()
        await server.stop(0)
        await consumer.stop()
        await store.close()

    return SimpleNamespace(stub=stub, channel=channel, store=store, close=close, retriever=retriever)


@pytest.fixture(scope="module")
async def svc(redis_server, unique_prefix, clustered):
    emb, history = clustered()
    service = await _serve(redis_server.url, unique_prefix("svc"), emb)
    await service.stub.UpsertItems(
        common_pb2.Item(item_id=i, title=f"Title {i}", attributes={"n": str(j)})
        for j, i in enumerate(emb.item_ids))
    summary = await service.stub.Ingest(
        common_pb2.Interaction(user_id=u, item_id=i, rating=4.0, timestamp_ms=100 + j)
        for u, items in history.items() for j, i in enumerate(items))
    assert summary.accepted == sum(map(len, history.values())) and summary.rejected == 0
    service.emb, service.history = emb, history
    yield service
    await service.close()


async def _until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await predicate()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.01)


async def test_ingested_user_is_searchable_within_seconds(svc):
    messages = [
        common_pb2.Interaction(user_id="fresh", item_id="c1i0", rating=5.0, timestamp_ms=1),
        common_pb2.Interaction(user_id="", item_id="c1i1", rating=1.0, timestamp_ms=1),
        common_pb2.Interaction(user_id="fresh", item_id="c1i3", rating=float("inf")),
        common_pb2.Interaction(user_id="fresh", item_id="c1i4", rating=4.0, timestamp_ms=2),
    ]
    summary = await svc.stub.Ingest(iter(messages))
    acked = time.monotonic()
    assert (summary.accepted, summary.rejected) == (2, 2)
    assert list(summary.errors) == ["interaction 1: user_id must be a non-empty string",
                                    "interaction 2: rating must be finite, got inf"]
    answer = await _until(lambda: svc.stub.NearestUsers(
        retriever_pb2.NearestUsersRequest(user_id="fresh", k=4)))
    assert time.monotonic() - acked < 5.0
    assert len(answer.neighbors) == 4 and answer.embedding_version == svc.emb.version
    assert all(n.user_id.startswith("c1") for n in answer.neighbors)
    assert [n.score for n in answer.neighbors] == sorted((n.score for n in answer.neighbors), reverse=True)


async def test_get_context_contents(svc):
    await _until(lambda: svc.stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id="c0u1", k=1)))
    ctx = await svc.stub.GetContext(retriever_pb2.ContextRequest(user_id="c0u1", k=2, max_history=2))
    assert ctx.user_id == "c0u1" and ctx.embedding_version == svc.emb.version
    assert [h.item_id for h in ctx.history] == svc.history["c0u1"][-2:]
    assert all(h.title == f"Title {h.item_id}" and h.rating == 4.0 for h in ctx.history)
    assert [h.timestamp_ms for h in ctx.history] == [101, 102]
    assert len(ctx.neighbors) == 2
    for n in ctx.neighbors:
        assert n.user_id.startswith("c0") and n.user_id != "c0u1" and -1 <= n.score <= 1
        assert [h.item_id for h in n.history] == svc.history[n.user_id][-2:]


async def test_get_items_in_request_order(svc):
    answer = await svc.stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["c2i1", "nope", "c0i0"]))
    assert [i.item_id for i in answer.items] == ["c2i1", "c0i0"]
    assert answer.items[0].title == "Title c2i1" and dict(answer.items[1].attributes) == {"n": "0"}
    assert list(answer.missing_item_ids) == ["nope"]


async def test_unknown_user_is_not_found(svc):
    for call in (svc.stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id="ghost", k=3)),
                 svc.stub.GetContext(retriever_pb2.ContextRequest(user_id="ghost", k=1, max_history=5))):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in info.value.details()


async def _snapshot(store: RedisStore) -> dict:
    keys = sorted([k async for k in store.client.scan_iter(match=f"{store.keys.prefix}:*")])
    out = {}
    for key in keys:
        kind = await store.client.type(key)
        if kind == b"zset":
            out[key] = await store.client.zrange(key, 0, -1, withscores=True)
        elif kind == b"hash":
            out[key] = await store.client.hgetall(key)
        elif kind == b"string":
            out[key] = await store.client.get(key)
        elif kind == b"stream":
            out[key] = await store.client.xlen(key)
        else:
            out[key] = await store.client.scard(key)
    return out


async def test_invalid_arguments_name_the_field_and_change_nothing(svc):
    await _until(lambda: svc.stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id="c2u0", k=1)))
    deadline = time.monotonic() + 10
    while await svc.store.streams.stream_backlog() != (0, 0):  # every ingested event applied: Redis at rest
        assert time.monotonic() < deadline, "the consumer never caught up"
        await asyncio.sleep(0.01)
    before = await _snapshot(svc.store)
    bad = [
        (svc.stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id="c0u0", k=0)), "k"),
        (svc.stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id="c0u0", k=1001)), "k"),
        (svc.stub.GetContext(retriever_pb2.ContextRequest(user_id="c0u0", k=1, max_history=0)),
         "max_history"),
        (svc.stub.GetContext(retriever_pb2.ContextRequest(user_id="a\nb", k=1, max_history=3)),
         "user_id"),
        (svc.stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["c0i0", "x" * 200])),
         "item_ids[1]"),
    ]
    for call, field in bad:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"{field}:"), info.value.details()
    summary = await svc.stub.Ingest(iter([
        common_pb2.Interaction(user_id="c0u0", item_id="c0i0", rating=float("nan")),
        common_pb2.Interaction(user_id="c0u0", item_id="c0i0", timestamp_ms=-5)]))
    assert (summary.accepted, summary.rejected) == (0, 2)
    items = await svc.stub.UpsertItems(iter([common_pb2.Item(item_id="c0i0", title="")]))
    assert (items.accepted, items.rejected) == (0, 1) and "title" in items.errors[0]
    assert await _snapshot(svc.store) == before


async def test_health_and_reflection_answer(svc):
    health = health_pb2_grpc.HealthStub(svc.channel)
    for service in ("", "exitrank.v1.Retriever"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(svc.channel)
    replies = [r async for r in reflection.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="exitrank.v1.Retriever"),
    ]))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"exitrank.v1.Retriever", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto


async def test_redis_down_is_unavailable(tmp_path, clustered):
    server = EmbeddedRedis(tmp_path / "r").start()
    emb, _ = clustered()
    service = await _serve(server.url, "down", emb)
    try:
        server.kill()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await service.stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["c0i0"]))
        details = info.value.details()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in details
        # redis-py's own text (the socket path, "Error 111", "Connection refused") stays in the log
        assert str(tmp_path) not in details and "111" not in details and "refused" not in details, details
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await service.stub.Ingest(iter([common_pb2.Interaction(user_id="u", item_id="i")]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # FAISS still answers from memory while Redis is down
        answer = await service.stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id="c0u0", k=2))
        assert len(answer.neighbors) == 2
    finally:
        await service.close()
        server.stop()


async def test_context_and_items_carry_vectors_when_asked(svc):
    import numpy as np

    await _until(lambda: svc.stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id="c0u1", k=1)))
    plain = await svc.stub.GetContext(retriever_pb2.ContextRequest(user_id="c0u1", k=1, max_history=3))
    assert not plain.user_embedding and not plain.history[0].embedding and plain.vectors_version == ""
    ctx = await svc.stub.GetContext(retriever_pb2.ContextRequest(user_id="c0u1", k=1, max_history=3,
                                                                 with_embeddings=True))
    row = {i: r for r, i in enumerate(svc.emb.item_ids)}
    assert ctx.vectors_version == svc.emb.version
    for h in [*ctx.history, *ctx.neighbors[0].history]:
        np.testing.assert_allclose(h.embedding, svc.emb.item[row[h.item_id]], rtol=1e-6)
    rows = [row[h.item_id] for h in ctx.history]  # the user's vector: the fold-in of what it shows
    np.testing.assert_allclose(ctx.user_embedding, svc.emb.item_foldin[rows].sum(0) / np.sqrt(len(rows)), rtol=1e-5)
    items = await svc.stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["c2i1", "nope"], with_embeddings=True,
                                                                  embedding_version=svc.emb.version))
    assert items.vectors_version == svc.emb.version and list(items.missing_item_ids) == ["nope"]
    np.testing.assert_allclose(items.items[0].embedding, svc.emb.item[row["c2i1"]], rtol=1e-6)
    for call in (svc.stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["c2i1"], with_embeddings=True,
                                                                 embedding_version="gcn-gone")),
                 svc.stub.GetContext(retriever_pb2.ContextRequest(user_id="c0u1", k=1, max_history=3,
                                                                  with_embeddings=True, embedding_version="gcn-gone"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'gcn-gone' is not kept" in err.value.details()


async def test_a_pinned_version_is_served_beside_the_new_one_until_dropped(redis_server, unique_prefix, clustered):
    import numpy as np

    first, history = clustered(seed=0)
    service = await _serve(redis_server.url, unique_prefix("pin"), first)
    try:
        await service.stub.UpsertItems(common_pb2.Item(item_id=i, title=f"T {i}") for i in first.item_ids)
        second, third = clustered(seed=1), clustered(seed=2)
        core = service.retriever
        await core.load_embeddings(second[0])
        old = await service.stub.GetItems(retriever_pb2.GetItemsRequest(
            item_ids=["c0i0"], with_embeddings=True, embedding_version=first.version))
        new = await service.stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["c0i0"], with_embeddings=True))
        assert old.vectors_version == first.version and new.vectors_version == second[0].version
        np.testing.assert_allclose(old.items[0].embedding, first.item[0], rtol=1e-6)
        np.testing.assert_allclose(new.items[0].embedding, second[0].item[0], rtol=1e-6)
        await core.load_embeddings(third[0])  # keep_versions=2: the first version goes
        core._kept_vectors.clear()  # forget what this replica read, as a fresh replica would
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.GetItems(retriever_pb2.GetItemsRequest(
                item_ids=["c0i0"], with_embeddings=True, embedding_version=first.version))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await service.close()
