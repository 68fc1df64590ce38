"""Metrics, request ids and traces of a real ranker calling a real retriever (both in this process,
on loopback, over the session redis-server), read back from their /metrics endpoints, their
trailing metadata, their log lines and an in-memory span exporter."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import generate_latest

from exitrank.observability import tracing
from exitrank.observability.logs import ContextFilter, JsonFormatter
from exitrank.v1 import ranker_pb2, retriever_pb2
from retriever_svc.config import IndexConfig, RedisConfig
from retriever_svc.consumer import StreamConsumer
from retriever_svc.embeddings import GCNEmbeddings
from retriever_svc.index import Retriever
from retriever_svc.records import Interaction
from retriever_svc.server import build_metrics
from retriever_svc.store import RedisStore

pytestmark = pytest.mark.anyio
RANK = "exitrank.v1.Ranker/Rank"
GET_CONTEXT = "exitrank.v1.Retriever/GetContext"


def _delta(tools, after, before, family, name=None, **labels) -> float:
    return (tools.sample(after, family, name, **labels) or 0.0) - (tools.sample(before, family, name, **labels) or 0.0)


async def test_ranker_metrics_count_what_was_scored(stack, tools):
    port = stack.ranker.metrics.port
    ids = sorted(tools.catalog)
    calls = [("g0u0", ids[:5]), ("g1u1", ids[5:12]), ("stranger", ids[12:15])]
    before = await tools.ascrape(port)
    retriever_before = await tools.ascrape(stack.retriever_metrics.port)
    replies = [await stack.ranker_stub.Rank(ranker_pb2.RankRequest(user_id=u, candidate_item_ids=c), timeout=60)
               for u, c in calls]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.ranker_stub.Rank(ranker_pb2.RankRequest(user_id="g0u0", candidate_item_ids=[]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = await tools.ascrape(port)
    layers = [s.exit_layer for r in replies for s in r.scores]
    assert len(layers) == 15 and set(layers) <= set(range(1, 7))

    family = "exitrank_ranker_exit_layer"
    assert _delta(tools, after, before, family, f"{family}_count") == len(layers)
    assert _delta(tools, after, before, family, f"{family}_sum") == sum(layers)
    for layer in range(1, 7):  # one bucket per layer, cumulative
        assert _delta(tools, after, before, family, f"{family}_bucket", le=f"{float(layer)}") == \
            sum(1 for x in layers if x <= layer)
    per_request = "exitrank_ranker_candidates_per_request"
    assert _delta(tools, after, before, per_request, f"{per_request}_count") == 3
    assert _delta(tools, after, before, per_request, f"{per_request}_sum") == 15
    retrieval = "exitrank_ranker_retrieval_seconds"
    assert _delta(tools, after, before, retrieval, f"{retrieval}_count") == 3
    assert _delta(tools, after, before, retrieval, f"{retrieval}_sum") > 0
    assert _delta(tools, after, before, "exitrank_ranker_batch_rows", "exitrank_ranker_batch_rows_sum") == 15
    assert _delta(tools, after, before, "exitrank_ranker_batch_requests", "exitrank_ranker_batch_requests_sum") == 3
    assert _delta(tools, after, before, "exitrank_ranker_ranked_without_retrieval",
                  "exitrank_ranker_ranked_without_retrieval_total") == 1  # the stranger
    assert tools.sample(after, "exitrank_ranker_pending_requests") == 0

    handled = "grpc_server_handling_seconds"
    rank = {"grpc_service": "exitrank.v1.Ranker", "grpc_method": "Rank", "grpc_type": "unary"}
    assert _delta(tools, after, before, handled, f"{handled}_count", grpc_code="OK", **rank) == 3
    assert _delta(tools, after, before, handled, f"{handled}_count", grpc_code="INVALID_ARGUMENT", **rank) == 1
    assert _delta(tools, after, before, "grpc_server_started", "grpc_server_started_total", **rank) == 4
    assert tools.sample(after, "process_cpu_seconds", "process_cpu_seconds_total") > 0

    # the retriever answered the two known users and NOT_FOUND for the stranger
    retriever_after = await tools.ascrape(stack.retriever_metrics.port)
    context = {"grpc_service": "exitrank.v1.Retriever", "grpc_method": "GetContext"}
    assert _delta(tools, retriever_after, retriever_before, handled, f"{handled}_count", grpc_code="OK", **context) == 2
    assert _delta(tools, retriever_after, retriever_before, handled, f"{handled}_count", grpc_code="NOT_FOUND",
                  **context) == 1


async def test_retriever_metrics_follow_the_stream_and_the_version(artifacts_dir, redis_server, unique_prefix, tools):
    store = RedisStore.from_url(redis_server.url, prefix=unique_prefix("lag"), timeout_s=2.0)
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
    consumer = StreamConsumer(retriever=retriever, store=store, config=RedisConfig(consumer="lagger", block_ms=50))
    metrics = build_metrics(retriever, consumer)
    port = metrics.serve("127.0.0.1", 0)
    try:
        await retriever.load_embeddings(GCNEmbeddings.load(artifacts_dir))
        await retriever.ingest([Interaction("g2u0", "i-bright-garden", 5.0, 1000 + j) for j in range(5)])
        first = await tools.ascrape(port)
        assert tools.sample(first, "exitrank_retriever_stream_lag") == 5  # no consumer group yet
        assert tools.sample(first, "exitrank_retriever_stream_pending") == 0
        assert tools.sample(first, "exitrank_retriever_index_users") == len(tools.histories)
        assert tools.sample(first, "exitrank_retriever_embedding_version_info", version="obs-test-1") == 1
        assert tools.sample(first, "exitrank_retriever_stats_up") == 1
        age = tools.sample(first, "exitrank_retriever_embedding_version_age_seconds")
        assert 0 <= age < 60

        await store.streams.ensure_group()
        assert len(await store.streams.read_events("lagger", count=2, block_ms=1)) == 2  # delivered, not applied
        second = await tools.ascrape(port)
        assert tools.sample(second, "exitrank_retriever_stream_lag") == 3
        assert tools.sample(second, "exitrank_retriever_stream_pending") == 2
        assert tools.sample(second, "exitrank_retriever_embedding_version_age_seconds") >= age

        consumer.start()  # recovers its own 2 pending entries, then reads the other 3

        async def drained():  # one scrape reads XINFO before the applied counter: wait for both to settle
            m = await tools.ascrape(port)
            applied = tools.sample(m, "exitrank_retriever_stream_applied", "exitrank_retriever_stream_applied_total")
            return m if applied == 5 and tools.sample(m, "exitrank_retriever_stream_pending") == 0 else None

        third = await tools.until(drained)
        assert tools.sample(third, "exitrank_retriever_stream_lag") == 0
        assert tools.sample(third, "exitrank_retriever_stream_pending") == 0
        assert tools.sample(third, "exitrank_retriever_redis_round_trips",
                            "exitrank_retriever_redis_round_trips_total") > 0

        # a scrape on the event loop itself cannot wait for the loop: it reports stats_up 0 at once
        started = time.perf_counter()
        text = generate_latest(metrics.registry).decode()
        assert time.perf_counter() - started < 1.0 and "exitrank_retriever_stats_up 0.0" in text
    finally:
        await consumer.stop()
        metrics.close()
        await store.close()


@pytest.fixture
def access_lines():
    """JSON lines of the ``exitrank.access`` logger (both servers' access lines), as parsed dicts."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("exitrank.access")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(level)


async def _logged(access_lines, wanted: set[str]) -> list[dict]:
    """The access lines once every request id of ``wanted`` has one. An aborted call's status reaches the
    client before the interceptor's ``finally`` writes its line (gRPC sends it inside ``abort``), so the
    line follows the client's error by a turn of the event loop or two."""
    deadline = time.monotonic() + 10
    while True:
        lines = access_lines()
        missing = wanted - {line.get("request_id") for line in lines}
        if not missing:
            return lines
        assert time.monotonic() < deadline, f"no access line for {missing}"
        await asyncio.sleep(0.01)


async def test_request_id_is_carried_to_the_retriever_and_returned(stack, tools, access_lines):
    ids = sorted(tools.catalog)[:3]
    call = stack.ranker_stub.Rank(ranker_pb2.RankRequest(user_id="g2u1", candidate_item_ids=ids),
                                  metadata=(("x-request-id", "req-in-process-7"),), timeout=60)
    await call
    assert ("x-request-id", "req-in-process-7") in tuple(await call.trailing_metadata())
    lines = [line for line in access_lines() if line.get("request_id") == "req-in-process-7"]
    by_rpc = {line["rpc"]: line for line in lines}
    assert by_rpc[RANK]["status"] == "OK" and by_rpc[RANK]["duration_ms"] > 0
    assert by_rpc[RANK]["logger"] == "exitrank.access" and by_rpc[RANK]["level"] == "INFO"
    assert by_rpc[GET_CONTEXT]["status"] == "OK"  # the ranker's retriever call carried the id
    assert by_rpc[GET_CONTEXT]["duration_ms"] <= by_rpc[RANK]["duration_ms"]

    # no id or an unusable one: a fresh one per call, returned on errors too
    seen = set()
    for metadata in ((), (("x-request-id", "bad id with spaces"),), (("x-request-id", "x" * 300),)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.ranker_stub.Rank(ranker_pb2.RankRequest(user_id="g2u1"), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        (given,) = [v for k, v in info.value.trailing_metadata() if k == "x-request-id"]
        assert len(given) == 32 and int(given, 16) >= 0
        seen.add(given)
    assert len(seen) == 3
    errors = [line for line in await _logged(access_lines, seen) if line.get("status") == "INVALID_ARGUMENT"]
    assert {line["request_id"] for line in errors} >= seen


async def test_one_trace_spans_ranker_retriever_and_redis(stack, tools):
    exporter = InMemorySpanExporter()
    tracing.configure("none", service_name="obs-test", exporter=exporter)
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        await stack.ranker_stub.Rank(
            ranker_pb2.RankRequest(user_id="g1u2", candidate_item_ids=sorted(tools.catalog)[-4:]),
            metadata=(("traceparent", f"00-{trace_id}-{caller_span}-01"),), timeout=60)
        spans = exporter.get_finished_spans()
    finally:
        tracing.configure("none", service_name="obs-test")
    assert spans and {format(s.context.trace_id, "032x") for s in spans} == {trace_id}
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    (rank,) = by_name[RANK]
    assert rank.kind == SpanKind.SERVER and rank.parent.span_id == int(caller_span, 16)
    assert rank.attributes["rpc.grpc.status_code"] == "OK"
    (retrieval,) = by_name["ranker.retrieval"]
    (score,) = by_name["ranker.score"]
    assert retrieval.parent.span_id == rank.context.span_id and score.parent.span_id == rank.context.span_id
    assert score.attributes["ranker.candidates"] == 4
    client = next(s for s in by_name[GET_CONTEXT] if s.kind == SpanKind.CLIENT)
    server = next(s for s in by_name[GET_CONTEXT] if s.kind == SpanKind.SERVER)
    assert client.parent.span_id == retrieval.context.span_id
    assert server.parent.span_id == client.context.span_id  # the hop crossed gRPC metadata
    redis_spans = [s for s in by_name["redis.pipeline"] if s.parent.span_id == server.context.span_id]
    assert redis_spans and all(s.attributes["db.system"] == "redis" for s in redis_spans)
    assert all(s.end_time <= rank.end_time for s in spans if s is not rank)

    # off again: nothing is recorded, no trace context is sent
    assert not tracing.enabled() and tracing.inject() == []
    await stack.retriever_stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["i-sunny-river"]))
    assert len(exporter.get_finished_spans()) == len(spans)


async def test_streaming_calls_are_timed_once_with_their_final_status(stack, tools):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = stack.ranker.metrics.port
    before = await tools.ascrape(port)
    ids = sorted(tools.catalog)
    requests = [ranker_pb2.RankRequest(user_id=f"g0u{n}", candidate_item_ids=ids[n : n + 2]) for n in range(3)]
    call = stack.ranker_stub.RankStream(iter(requests), metadata=(("x-request-id", "stream-1"),), timeout=60)
    assert len([reply async for reply in call]) == 3
    assert ("x-request-id", "stream-1") in tuple(await call.trailing_metadata())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ranker.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING  # written with context.write
        watch.cancel()

    handled = "grpc_server_handling_seconds_count"

    async def counted():
        after = await tools.ascrape(port)
        return after if tools.sample(after, handled.removesuffix("_count"), handled, grpc_method="Watch",
                                     grpc_code="CANCELLED") else None

    after = await tools.until(counted, timeout_s=10)
    assert _delta(tools, after, before, handled.removesuffix("_count"), handled, grpc_method="RankStream",
                  grpc_type="bidi_stream", grpc_code="OK") == 1
    assert _delta(tools, after, before, "exitrank_ranker_candidates_per_request",
                  "exitrank_ranker_candidates_per_request_count") == 3


async def test_calls_refused_by_the_rate_limit_are_counted_not_logged(stack, tools, access_lines):
    from exitrank.observability.interceptors import ServerTelemetry
    from exitrank.observability.metrics import ServiceMetrics
    from exitrank.security import Limits
    from exitrank.v1 import retriever_pb2_grpc
    from retriever_svc.config import ServerConfig
    from retriever_svc.server import start_grpc

    metrics = ServiceMetrics(service="retriever")
    port = metrics.serve("127.0.0.1", 0)
    running = await start_grpc(stack.retriever, ServerConfig(port=0), limits=Limits(rate_per_s=0.01, burst=1),
                               telemetry=ServerTelemetry(metrics=metrics))  # access_log "errors"
    server, grpc_port = running.server, running.port
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            request = retriever_pb2.GetItemsRequest(item_ids=["i-sunny-river"])
            await stub.GetItems(request)
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetItems(request, metadata=(("x-request-id", "limited-1"),))
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        families = await tools.ascrape(port)
    finally:
        await server.stop(None)
        metrics.close()
    count = "grpc_server_handling_seconds_count"
    assert tools.sample(families, "grpc_server_handling_seconds", count, grpc_method="GetItems", grpc_code="OK") == 1
    assert tools.sample(families, "grpc_server_handling_seconds", count, grpc_method="GetItems",
                        grpc_code="RESOURCE_EXHAUSTED") == 2  # the telemetry runs before the limits guard
    # refusals are counted, not logged (access_log "errors"): no log flood under overload
    assert not [line for line in access_lines() if line.get("request_id") == "limited-1"]
