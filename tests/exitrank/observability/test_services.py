"""Both services as real processes (``retriever-svc serve``, ``ranker-svc serve``) with JSON logs,
metrics endpoints and tracing on: the retriever exports OTLP to a real OTLP/gRPC receiver in this
test, the ranker writes console spans to a file; this test plays the feed server, through the
``ClientTelemetry`` interceptor and its own in-memory tracer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from exitrank.observability import tracing
from exitrank.observability.interceptors import ClientTelemetry
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc, retriever_pb2, retriever_pb2_grpc

pytestmark = pytest.mark.anyio
RETRIEVER_CLI = Path(sys.executable).with_name("retriever-svc")


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver keeping what it is sent: [(service.name, Span proto)]."""

    def __init__(self) -> None:
        self.spans: list = []

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.spans.extend((attributes.get("service.name"), s) for s in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def _start(args: list[str], log: Path, env: dict, ready: str, lines: int) -> tuple:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=log.open("w"), env=env)
    out = []
    try:
        for _ in range(lines):
            out.append((await asyncio.wait_for(proc.stdout.readline(), timeout=180)).decode().strip())
    except TimeoutError:
        proc.kill()
        pytest.fail(f"{args[0]} printed {out}; log: {log.read_text()[-3000:]}")
    assert out[0].startswith(ready), (out, log.read_text()[-3000:])
    return proc, out


def _port(line: str) -> int:
    return int(line.rstrip("/metrics").rsplit(":", 1)[1])


def _json_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                out.append(value)
    return out


async def _stop(proc) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), timeout=60)
        except TimeoutError:
            proc.kill()
            return await proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
async def services(artifacts_dir, redis_server, unique_prefix, tmp_path_factory, tools):
    work = tmp_path_factory.mktemp("obs-services")
    receiver = Receiver()
    collector = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    otlp_port = collector.add_insecure_port("127.0.0.1:0")
    await collector.start()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    env.pop("OTEL_SERVICE_NAME", None)
    common = ["--port", "0", "--metrics-port", "0", "--log-format", "json", "--access-log", "all"]
    retriever, r_out = await _start(
        [str(RETRIEVER_CLI), "serve", *common, "--artifacts", str(artifacts_dir), "--redis-url", redis_server.url,
         "--redis-prefix", unique_prefix("procs"), "--consumer", "procs", "--index-kind", "exact", "--tracing", "otlp"],
        work / "retriever.log", env, "retriever listening on ", 2)
    retriever_address = r_out[0].rsplit(" ", 1)[1]
    ranker_start = asyncio.ensure_future(_start(
        [sys.executable, "-m", "ranker_svc.server", "serve", *common, "--retriever", retriever_address,
         "--artifacts", str(artifacts_dir), "--dtype", "float32", "--num-threads", "1", "--tracing", "console",
         "--tracing-file", str(work / "ranker-spans.jsonl")],
        work / "ranker.log", env, "ranker listening on ", 2))
    channel = grpc.aio.insecure_channel(retriever_address)
    ranker = None
    try:
        stub = retriever_pb2_grpc.RetrieverStub(channel)
        await _load(stub, tools)

        async def applied():
            with contextlib.suppress(grpc.aio.AioRpcError):
                ctx = await stub.GetContext(retriever_pb2.ContextRequest(user_id="g0u0", k=2, max_history=5))
                return len(ctx.history) == 3
            return False

        await tools.until(applied)
        ranker, k_out = await ranker_start
        yield SimpleNamespace(
            work=work, receiver=receiver, redis_password=redis_server.password,
            ranker_address=k_out[0].rsplit(" ", 1)[1], ranker_metrics=_port(k_out[1]),
            retriever_metrics=_port(r_out[1]), retriever_stub=stub,
            ranker_log=work / "ranker.log", retriever_log=work / "retriever.log",
            ranker_spans=work / "ranker-spans.jsonl", procs=(retriever, ranker))
    finally:
        await channel.close()
        if ranker is None:
            ranker_start.cancel()
            with contextlib.suppress(BaseException):
                ranker, _ = await ranker_start
        codes = [await _stop(p) for p in (ranker, retriever) if p is not None]
        await collector.stop(None)
    assert codes == [0] * len(codes), codes


async def _load(stub, tools) -> None:
    from exitrank.v1 import common_pb2

    await stub.UpsertItems(iter([common_pb2.Item(item_id=i, title=t) for i, t in tools.catalog.items()]))
    await stub.Ingest(iter([common_pb2.Interaction(user_id=u, item_id=i, rating=4.0, timestamp_ms=100 + j)
                            for u, history in tools.histories.items() for j, i in enumerate(history)]))


async def _rank(services, request_id: str, candidates: list[str], user: str = "g0u0"):
    """Rank as a feed server would: through ClientTelemetry, inside a span of its own tracer."""
    exporter = InMemorySpanExporter()
    tracing.configure("none", service_name="feed-server", exporter=exporter)
    try:
        async with grpc.aio.insecure_channel(services.ranker_address, interceptors=[ClientTelemetry()]) as channel:
            with tracing.span("feed.render") as root:
                call = ranker_pb2_grpc.RankerStub(channel).Rank(
                    ranker_pb2.RankRequest(user_id=user, candidate_item_ids=candidates),
                    metadata=(("x-request-id", request_id),), timeout=60)
                reply = await call
                trailing = tuple(await call.trailing_metadata())
        return reply, trailing, exporter.get_finished_spans(), root
    finally:
        tracing.configure("none", service_name="feed-server")


async def test_a_request_id_is_logged_by_both_services_and_returned(services, tools):
    reply, trailing, _, _ = await _rank(services, "feed-req-0001", sorted(tools.catalog)[:4])
    assert len(reply.scores) == 4 and reply.retrieval_used
    assert ("x-request-id", "feed-req-0001") in trailing

    async def logged():
        ranker = [x for x in _json_lines(services.ranker_log) if x.get("request_id") == "feed-req-0001"]
        retriever = [x for x in _json_lines(services.retriever_log) if x.get("request_id") == "feed-req-0001"]
        return (ranker, retriever) if ranker and retriever else None

    ranker, retriever = await tools.until(logged, timeout_s=10)
    (rank,) = [x for x in ranker if x.get("rpc") == "exitrank.v1.Ranker/Rank"]
    assert rank["status"] == "OK" and rank["duration_ms"] > 0 and rank["logger"] == "exitrank.access"
    assert {"time", "level", "message"} <= set(rank)
    (context,) = [x for x in retriever if x.get("rpc") == "exitrank.v1.Retriever/GetContext"]
    assert context["status"] == "OK" and context["level"] == "INFO"


async def test_one_trace_from_the_feed_server_to_redis(services, tools):
    _, _, feed_spans, root = await _rank(services, "feed-req-trace", sorted(tools.catalog)[4:9], user="g1u0")
    trace_id = format(root.get_span_context().trace_id, "032x")
    (feed_client,) = [s for s in feed_spans if s.name == "exitrank.v1.Ranker/Rank"]
    assert feed_client.parent.span_id == root.get_span_context().span_id

    async def ranker_spans():
        spans = [s for s in _json_lines(services.ranker_spans) if s.get("context", {}).get("trace_id") == f"0x{trace_id}"]
        return spans if {s["name"] for s in spans} >= {"exitrank.v1.Ranker/Rank", "ranker.score"} else None

    spans = {s["name"]: s for s in await tools.until(ranker_spans, timeout_s=10)}
    rank = spans["exitrank.v1.Ranker/Rank"]
    assert rank["kind"] == "SpanKind.SERVER" and rank["resource"]["attributes"]["service.name"] == "exitrank-ranker"
    assert rank["parent_id"] == f"0x{feed_client.context.span_id:016x}"  # continued the feed server's trace
    assert spans["ranker.retrieval"]["parent_id"] == rank["context"]["span_id"]
    assert spans["ranker.score"]["parent_id"] == rank["context"]["span_id"]
    client = spans["exitrank.v1.Retriever/GetContext"]
    assert client["kind"] == "SpanKind.CLIENT" and client["parent_id"] == spans["ranker.retrieval"]["context"]["span_id"]

    async def retriever_spans():
        got = [(svc, s) for svc, s in services.receiver.spans if s.trace_id.hex() == trace_id]
        return got if any(s.name == "redis.pipeline" for _, s in got) else None

    exported = await tools.until(retriever_spans, timeout_s=15)
    assert {svc for svc, _ in exported} == {"exitrank-retriever"}
    (server,) = [s for _, s in exported if s.name == "exitrank.v1.Retriever/GetContext"]
    assert f"0x{server.parent_span_id.hex()}" == client["context"]["span_id"]  # across the second hop
    assert any(s.parent_span_id == server.span_id for _, s in exported if s.name == "redis.pipeline")


async def test_both_metrics_endpoints_count_real_calls(services, tools):
    before = await tools.ascrape(services.ranker_metrics)
    reply, _, _, _ = await _rank(services, "feed-req-metrics", sorted(tools.catalog)[9:16], user="g2u2")
    after = await tools.ascrape(services.ranker_metrics)
    family = "exitrank_ranker_exit_layer"

    def delta(name, **labels):
        return (tools.sample(after, family, name, **labels) or 0) - (tools.sample(before, family, name, **labels) or 0)

    assert delta(f"{family}_count") == len(reply.scores) == 7
    assert delta(f"{family}_sum") == sum(s.exit_layer for s in reply.scores)
    retriever = await tools.ascrape(services.retriever_metrics)
    assert tools.sample(retriever, "exitrank_retriever_index_users") == len(tools.histories)
    assert tools.sample(retriever, "exitrank_retriever_stream_lag") == 0
    assert tools.sample(retriever, "exitrank_retriever_stream_applied", "exitrank_retriever_stream_applied_total") == \
        sum(map(len, tools.histories.values()))
    assert tools.sample(retriever, "grpc_server_handling_seconds", "grpc_server_handling_seconds_count",
                        grpc_method="GetContext", grpc_code="OK") >= 3


async def test_each_service_logs_its_effective_config_once_with_secrets_masked(services):
    retriever = [x for x in _json_lines(services.retriever_log) if "config" in x]
    ranker = [x for x in _json_lines(services.ranker_log) if "config" in x]
    assert len(retriever) == 1 and len(ranker) == 1
    settings = retriever[0]["config"]
    assert retriever[0]["message"] == "retriever effective config"
    assert ":***@" in settings["redis"]["url"] and settings["redis"]["consumer"] == "procs"
    assert settings["observability"]["tracing"] == "otlp" and settings["observability"]["metrics_port"] == 0
    assert services.redis_password not in services.retriever_log.read_text()
    assert ranker[0]["config"]["model"]["dtype"] == "float32"
    assert ranker[0]["config"]["observability"]["tracing_file"] == str(services.ranker_spans)
