"""Every field of every Retriever request, bad: refused with the right status and a message naming the
field, and nothing stored changes. Also raw clients (invalid UTF-8 in a string field, garbage bytes,
messages over the size limit) and client streams cut off mid-way (whole events or none).

Real core, real redis-server, real grpc.aio server on loopback with the production interceptors."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest

from tests.support.reliability import recording
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from retriever_svc.config import IndexConfig, RedisConfig, ServerConfig
from retriever_svc.consumer import StreamConsumer
from retriever_svc.index import Retriever
from retriever_svc.server import start_grpc
from retriever_svc.store import RedisStore
from retriever_svc.stream import decode_event

pytestmark = pytest.mark.anyio
INVALID = grpc.StatusCode.INVALID_ARGUMENT
BATCH = 50  # the server's ingest batch: a stream is stored in batches of this many


@pytest.fixture(scope="module")
async def svc(redis_server, unique_prefix, clustered):
    emb, history = clustered()
    store = RedisStore.from_url(redis_server.url, prefix=unique_prefix("bad"), timeout_s=2.0)
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
    await retriever.load_embeddings(emb)
    consumer = StreamConsumer(retriever=retriever, store=store, config=RedisConfig(consumer="bad", block_ms=50))
    consumer.start()
    running = await start_grpc(retriever, ServerConfig(port=0, ingest_batch=BATCH))
    server, port = running.server, running.port
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = retriever_pb2_grpc.RetrieverStub(channel)
    await stub.UpsertItems(iter([common_pb2.Item(item_id=i, title=f"Title {i}") for i in emb.item_ids]))
    await stub.Ingest(iter([common_pb2.Interaction(user_id=u, item_id=i, timestamp_ms=1)
                            for u, items in history.items() for i in items]))
    while await store.streams.pending_count() or not await store.client.exists(store.keys.hist("c2u5")):
        await asyncio.sleep(0.05)
    yield stub, channel, store
    await channel.close()
    await server.stop(0)
    await consumer.stop()
    await store.close()


async def _snapshot(store: RedisStore) -> dict:
    """Every key of the store's prefix with its content (streams by length)."""
    out = {}
    async for key in store.client.scan_iter(match=f"{store.keys.prefix}:*"):
        kind = await store.client.type(key)
        read = {b"zset": lambda k: store.client.zrange(k, 0, -1, withscores=True), b"hash": store.client.hgetall,
                b"string": store.client.get, b"stream": store.client.xlen, b"set": store.client.smembers}[kind]
        out[key] = await read(key)
    return out


TOO_LONG = "x" * 129
UNARY = [  # (rpc, request, field the message must start with)
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id="", k=3), "user_id"),
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id=TOO_LONG, k=3), "user_id"),
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id="c0u0\x00", k=3), "user_id"),
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id="c0\u0085u0", k=3), "user_id"),
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id="c0u0", k=0), "k"),
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id="c0u0", k=-1), "k"),
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id="c0u0", k=1001), "k"),
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id="c0u0", k=2**31 - 1), "k"),
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id="c0u0", k=-(2**31)), "k"),
    ("GetContext", retriever_pb2.ContextRequest(user_id="", k=1, max_history=5), "user_id"),
    ("GetContext", retriever_pb2.ContextRequest(user_id=TOO_LONG, k=1, max_history=5), "user_id"),
    ("GetContext", retriever_pb2.ContextRequest(user_id="a\nb", k=1, max_history=5), "user_id"),
    ("GetContext", retriever_pb2.ContextRequest(user_id="c0u0", k=-1, max_history=5), "k"),
    ("GetContext", retriever_pb2.ContextRequest(user_id="c0u0", k=101, max_history=5), "k"),
    ("GetContext", retriever_pb2.ContextRequest(user_id="c0u0", k=2**31 - 1, max_history=5), "k"),
    ("GetContext", retriever_pb2.ContextRequest(user_id="c0u0", k=1, max_history=0), "max_history"),
    ("GetContext", retriever_pb2.ContextRequest(user_id="c0u0", k=1, max_history=-7), "max_history"),
    ("GetContext", retriever_pb2.ContextRequest(user_id="c0u0", k=1, max_history=201), "max_history"),
    ("GetItems", retriever_pb2.GetItemsRequest(item_ids=[""]), "item_ids[0]"),
    ("GetItems", retriever_pb2.GetItemsRequest(item_ids=["c0i0", TOO_LONG]), "item_ids[1]"),
    ("GetItems", retriever_pb2.GetItemsRequest(item_ids=["c0i0", "c0i1", "a\tb"]), "item_ids[2]"),
    ("GetItems", retriever_pb2.GetItemsRequest(item_ids=[f"i{n}" for n in range(10_001)]), "item_ids"),
    ("GetItems", retriever_pb2.GetItemsRequest(item_ids=[f"i{n}" for n in range(100_000)]), "item_ids"),
    ("GetItems", retriever_pb2.GetItemsRequest(item_ids=["c0i0", "c0i1", "c0i0"]), "item_ids[2]"),  # duplicate
    ("GetItems", retriever_pb2.GetItemsRequest(item_ids=["{slot}"]), "item_ids[0]"),  # a chosen cluster slot
    ("GetItems", retriever_pb2.GetItemsRequest(item_ids=["c0i0", "c0\u202ei1"]), "item_ids[1]"),  # bidi override
    ("GetItems", retriever_pb2.GetItemsRequest(item_ids=["c0i0"], with_embeddings=True, embedding_version="x" * 65),
     "embedding_version"),
    ("GetContext", retriever_pb2.ContextRequest(user_id="c0u0", k=1, max_history=5, with_embeddings=True,
                                                embedding_version="../gcn-1\n"), "embedding_version"),
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id="c0u0\u200d", k=3), "user_id"),  # zero-width joiner
]
OK_INTERACTION = {"user_id": "c0u0", "item_id": "c0i0", "rating": 3.0, "timestamp_ms": 5}
INTERACTIONS = [  # (field changes, field named in IngestSummary.errors)
    ({"user_id": ""}, "user_id"), ({"user_id": TOO_LONG}, "user_id"), ({"user_id": "a\x7fb"}, "user_id"),
    ({"item_id": ""}, "item_id"), ({"item_id": TOO_LONG}, "item_id"), ({"item_id": "\x1b[31m"}, "item_id"),
    ({"rating": math.nan}, "rating"), ({"rating": math.inf}, "rating"), ({"rating": -math.inf}, "rating"),
    ({"timestamp_ms": -1}, "timestamp_ms"), ({"timestamp_ms": -(2**63)}, "timestamp_ms"),
    ({"timestamp_ms": 2**63 - 1}, "timestamp_ms"), ({"timestamp_ms": 2**53 + 1}, "timestamp_ms"),
    ({"timestamp_ms": 2**53}, "timestamp_ms"),  # valid as a number, but pinned atop the history for good
    ({"timestamp_ms": int(time.time() * 1000) + 2 * 3600_000}, "timestamp_ms"),  # beyond index.max_future_s
    ({"user_id": "u{0}"}, "user_id"), ({"item_id": "\u2066c0i0\u2069"}, "item_id"), ({"item_id": "c0\u00adi0"}, "item_id"),
]
ITEMS = [
    (common_pb2.Item(item_id="", title="t"), "item_id"),
    (common_pb2.Item(item_id=TOO_LONG, title="t"), "item_id"),
    (common_pb2.Item(item_id="a\rb", title="t"), "item_id"),
    (common_pb2.Item(item_id="new", title=""), "title"),
    (common_pb2.Item(item_id="new", title="t" * 513), "title"),
    (common_pb2.Item(item_id="new", title="t", attributes={f"k{n}": "v" for n in range(33)}), "attributes"),
    (common_pb2.Item(item_id="new", title="t", attributes={"": "v"}), "attributes"),
    (common_pb2.Item(item_id="new", title="t", attributes={"a\x00": "v"}), "attributes"),
    (common_pb2.Item(item_id="new", title="t", attributes={"brand": "v" * 1025}), "attributes['brand']"),
]
RAW = [  # (method, serialized request with one string field's bytes replaced by invalid UTF-8, field)
    ("NearestUsers", retriever_pb2.NearestUsersRequest(user_id="zz", k=3), "user_id"),
    ("GetContext", retriever_pb2.ContextRequest(user_id="zz", k=1, max_history=3), "user_id"),
    ("GetItems", retriever_pb2.GetItemsRequest(item_ids=["c0i0", "zz"]), "item_ids[1]"),
]


async def test_every_bad_field_is_refused_by_name_and_nothing_changes(request, svc):
    stub, channel, store = svc
    before = await _snapshot(store)
    refused = 0
    with recording(request.node.nodeid, "retriever fields", area="bad input") as row:
        for rpc, message, field in UNARY:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await getattr(stub, rpc)(message, timeout=10)
            assert info.value.code() == INVALID and info.value.details().startswith(f"{field}:"), (rpc, field)
            refused += 1
        for changes, field in INTERACTIONS:  # one bad message between two good ones... that also change nothing
            bad = common_pb2.Interaction(**{**OK_INTERACTION, **changes})
            summary = await stub.Ingest(iter([bad]), timeout=10)
            assert (summary.accepted, summary.rejected) == (0, 1) and summary.errors[0].startswith(
                f"interaction 0: {field} "), (changes, summary.errors)
            refused += 1
        for item, field in ITEMS:
            summary = await stub.UpsertItems(iter([item]), timeout=10)
            assert (summary.accepted, summary.rejected) == (0, 1), (item.item_id, summary.errors)
            assert summary.errors[0].startswith(f"item 0: {field}"), summary.errors
            refused += 1
        for method, message, field in RAW:
            raw = channel.unary_unary(f"/exitrank.v1.Retriever/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(message.SerializeToString().replace(b"zz", b"\xc3\x28"), timeout=10)
            assert info.value.code() == INVALID and info.value.details().startswith(f"{field}: invalid UTF-8")
            refused += 1
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x10" + b"\xff" * 11):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/exitrank.v1.Retriever/NearestUsers")(garbage, timeout=10)
            assert info.value.code() == INVALID and "wire format" in info.value.details()
            refused += 1
        bad_stream = [common_pb2.Interaction(**OK_INTERACTION).SerializeToString().replace(b"c0u0", b"c0\xffu")]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.stream_unary("/exitrank.v1.Retriever/Ingest")(iter(bad_stream), timeout=10)
        assert info.value.code() == INVALID and info.value.details().startswith("user_id: invalid UTF-8")
        with pytest.raises(grpc.aio.AioRpcError) as info:  # over the 4 MiB default limit
            await stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["y" * 60] * 80_000), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-receive-bytes" in info.value.details()
        refused += 2
        # no waiting: an Ingest answers once its events are in the stream (XADD acknowledged) and an
        # UpsertItems once its entries are written, so anything wrongly accepted is in the snapshot already
        # (the stream by its length; the consumer's later writes all follow from a stream entry)
        assert await _snapshot(store) == before
        assert len((await stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id="c0u0", k=3))).neighbors) == 3
        row.sent, row.refused = refused, refused
        row.measured = (f"{len(UNARY)} NearestUsers/GetContext/GetItems requests (empty, 129-byte and control-character "
                        f"ids, ids with braces or format characters, duplicate ids, bad embedding versions, "
                        f"k/max_history out of range, +-2^31, 10,001 and 100,000 ids) INVALID_ARGUMENT naming the "
                        f"field; {len(INTERACTIONS)} Ingest and {len(ITEMS)} UpsertItems messages rejected by field "
                        f"(NaN/inf ratings, negative, > 2^53 and 2 h future timestamps, titles, attributes); invalid "
                        f"UTF-8 from a raw "
                        f"client in {len(RAW)} request fields and an Ingest stream, 3 garbage payloads: INVALID_ARGUMENT "
                        f"naming the field (gRPC alone answers UNKNOWN); a 4.9 MB request RESOURCE_EXHAUSTED; every "
                        f"Redis key of the store unchanged")


async def _cut_stream(stub, messages: list, keep: int):
    """Send ``messages`` on a client stream and cancel the call after ``keep`` of them."""
    sent = asyncio.Event()

    async def produce():
        for n, message in enumerate(messages):
            if n == keep:
                sent.set()
                await asyncio.sleep(30)  # the call is cancelled meanwhile
            yield message
            await asyncio.sleep(0)

    return sent, produce()


async def test_a_cancelled_ingest_stream_stores_whole_events_or_none(request, svc):
    stub, _, store = svc
    events = [common_pb2.Interaction(user_id=f"cut{n % 7}", item_id=f"c1i{n % 5}", rating=float(n % 5 + 1),
                                     timestamp_ms=1000 + n) for n in range(400)]
    keep = 3 * BATCH + 20
    with recording(request.node.nodeid, "cancelled stream", area="bad input") as row:
        last = (await store.client.xrevrange(store.keys.stream, count=1) or [(b"0-0", {})])[0][0]
        sent, messages = await _cut_stream(stub, events, keep)
        call = stub.Ingest(messages, timeout=30)
        await sent.wait()
        await asyncio.sleep(0.3)  # the server has read what was sent
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        stored = await store.client.xrange(store.keys.stream, min=f"({last.decode()}", max="+")
        by_key = {(e.user_id, e.item_id, e.timestamp_ms): e for e in events}
        decoded = [decode_event(fields) for _, fields in stored]
        assert all(d is not None and by_key.get((d.user_id, d.item_id, d.timestamp_ms)) is not None
                   and by_key[(d.user_id, d.item_id, d.timestamp_ms)].rating == d.rating for d in decoded)
        # the full batches the server had taken, and the partial one if gRPC ended the cut stream as
        # finished rather than failed: either way whole events, a prefix of what was sent
        assert len(stored) in (3 * BATCH, keep), len(stored)
        assert [d.timestamp_ms for d in decoded] == [1000 + n for n in range(len(stored))]  # a prefix, in order
        items = [common_pb2.Item(item_id=f"cutitem{n}", title=f"Cut {n}", attributes={"n": str(n)}) for n in range(200)]
        sent, messages = await _cut_stream(stub, items, BATCH + 10)
        call = stub.UpsertItems(messages, timeout=30)
        await sent.wait()
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        found = await stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=[i.item_id for i in items]))
        assert [i.item_id for i in found.items] in ([i.item_id for i in items[:n]] for n in (BATCH, BATCH + 10))
        assert all(i.title == f"Cut {n}" and dict(i.attributes) == {"n": str(n)} for n, i in enumerate(found.items))
        row.sent, row.refused = keep + BATCH + 10, keep - len(stored) + BATCH + 10 - len(found.items)
        row.measured = (f"client cancelled an Ingest stream after {keep} of {len(events)} events (server batches of "
                        f"{BATCH}): {len(stored)} stored, a prefix of the sent events, each entry intact and equal to "
                        f"its event, 0 torn; an UpsertItems stream cancelled after {BATCH + 10} items: "
                        f"{len(found.items)} stored whole (title and attributes), 0 torn (stored: the whole batches "
                        f"taken, plus the last partial one when gRPC ends the cut stream as finished)")
