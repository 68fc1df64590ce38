"""The ranker over real mutual TLS, to a retriever that requires mutual TLS too, and under its limits:
``start_server`` with the tiny real model, a real gRPC ``exitrank.v1.Retriever`` on loopback."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from exitrank.grpc_security import RETRY_AFTER_KEY, bind, open_channel, server_kwargs
from tests.support.reliability import recording
from exitrank.security import ClientTLS, Limits, ServerTLS, load_client_tls, load_server_tls
from tests.support.pki import DevCA
from exitrank.types import HistoryItem, NeighborContext, UserContext
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc, retriever_pb2_grpc
from ranker_svc.config import ModelConfig, RankerConfig, RetrieverConfig, ServerConfig
from ranker_svc.errors import ContextUnavailable
from ranker_svc.retriever_client import MAX_RETRIEVER_HISTORY, MAX_RETRIEVER_K, RetrieverClient
from ranker_svc.server import parse_args, start_server

pytestmark = pytest.mark.anyio
CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    ca = DevCA(out)
    clients = {name: ca.client(name, name=name) for name in ("ranker", "feed-a", "feed-b", "feed-c")}
    return SimpleNamespace(ca=ca.cert, server=ca.server(), **{k.replace("-", "_"): v for k, v in clients.items()})


def client_tls(pki, issued=None) -> ClientTLS:
    return ClientTLS(ca=pki.ca, cert=issued.cert if issued else None, key=issued.key if issued else None)


@pytest.fixture(scope="module")
async def mtls_retriever(pki, memory_retriever):
    """(servicer, "localhost:PORT") of a MemoryRetriever that requires client certificates of the CA."""
    servicer = memory_retriever()
    server = grpc.aio.server(**server_kwargs(Limits(), mutual=True))
    retriever_pb2_grpc.add_RetrieverServicer_to_server(servicer, server)
    pem = load_server_tls(ServerTLS(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca))
    port = bind(server, "127.0.0.1:0", pem)
    await server.start()
    yield servicer, f"localhost:{port}"
    await server.stop(None)


@pytest.fixture(scope="module")
async def ranker(tiny_ranker_dir, mtls_retriever, pki):
    _, target = mtls_retriever
    config = RankerConfig(
        model=ModelConfig(artifacts_dir=tiny_ranker_dir.parent, dtype="float32"), server=ServerConfig(port=0),
        retriever=RetrieverConfig(target=target, timeout_s=5, tls_ca=pki.ca, tls_cert=pki.ranker.cert,
                                  tls_key=pki.ranker.key),
        tls=ServerTLS(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca),
        limits=Limits(max_receive_bytes=64 << 10, rate_per_s=1, burst=3),
    )
    running = await start_server(config)
    yield running
    await running.stop(None)


@contextlib.asynccontextmanager
async def channel(port: int, tls: ClientTLS):
    ch = open_channel(f"localhost:{port}", load_client_tls(tls))
    try:
        yield ch
    finally:
        await ch.close()


def _rank(ch, candidates, user: str = "u0"):
    return ranker_pb2_grpc.RankerStub(ch).Rank(ranker_pb2.RankRequest(user_id=user, candidate_item_ids=candidates),
                                               timeout=30)


async def test_rank_over_mutual_tls_through_a_mutual_tls_retriever(ranker, mtls_retriever, pki, catalog, request):
    servicer, _ = mtls_retriever
    with recording(request.node.nodeid, "TLS") as row:
        calls_before = len(servicer.deadlines)
        async with channel(ranker.port, client_tls(pki, pki.feed_a)) as ch:
            reply = await _rank(ch, sorted(catalog)[:3])
            assert len(reply.scores) == 3 and reply.retrieval_used and reply.embedding_version == "emb-1"
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="exitrank.v1.Ranker"), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflected = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            assert "exitrank.v1.Ranker" in [s.name async for r in reflected for s in r.list_services_response.service]
        retriever_calls = len(servicer.deadlines) - calls_before
        assert retriever_calls >= 2  # GetContext and GetItems reached the mTLS retriever
        async with channel(ranker.port, client_tls(pki)) as ch:  # no client certificate
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _rank(ch, sorted(catalog)[:1])
            assert refused.value.code() == CODE.UNAVAILABLE
        row.sent, row.refused = 4, 1
        row.measured = (f"Rank, Health.Check, reflection over mutual TLS answered; the Rank made {retriever_calls} "
                        "calls to a retriever that requires mutual TLS (the ranker's own client certificate, "
                        "retriever.tls_ca/tls_cert/tls_key) and used their context; a feed client without a "
                        "certificate refused (UNAVAILABLE)")


async def test_retriever_refuses_a_ranker_without_its_certificate(mtls_retriever, pki, catalog, request):
    _, target = mtls_retriever
    with recording(request.node.nodeid, "mTLS refusal") as row:
        anonymous = RetrieverClient(config=RetrieverConfig(target=target, timeout_s=2, tls_ca=pki.ca))
        try:
            assert await anonymous.get_context("u0", 2, 5) is None  # degrades to no context
            with pytest.raises(ContextUnavailable, match="UNAVAILABLE"):
                await anonymous.get_titles(sorted(catalog)[:2])
        finally:
            await anonymous.close()
        trusted = RetrieverClient(config=RetrieverConfig(target=target, timeout_s=5, tls_ca=pki.ca,
                                                         tls_cert=pki.ranker.cert, tls_key=pki.ranker.key))
        try:
            assert len(await trusted.get_titles(sorted(catalog)[:2])) == 2
        finally:
            await trusted.close()
        row.sent, row.refused = 3, 2
        row.measured = ("ranker -> retriever: without retriever.tls_cert both calls refused at the handshake "
                        "(GetContext degrades to no context, GetItems -> ContextUnavailable); with it served")


async def test_rank_request_over_the_size_limit(ranker, pki, catalog, request):
    with recording(request.node.nodeid, "message size") as row:
        async with channel(ranker.port, client_tls(pki, pki.feed_b)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await _rank(ch, [f"{j:03d}".ljust(100, "x") for j in range(700)])  # ~72 kB
            assert over.value.code() == CODE.RESOURCE_EXHAUSTED
            assert "exceeds limits.max_receive_bytes=65536 (raise it with --max-receive-bytes)" in over.value.details()
            reply = await _rank(ch, sorted(catalog)[:2])  # refused before the rate limit: no token spent
            assert len(reply.scores) == 2
        row.sent, row.refused = 2, 1
        row.measured = ("ranker limits.max_receive_bytes 64 KiB: a 72 kB RankRequest refused with RESOURCE_EXHAUSTED "
                        "naming the flag (no model or retriever work); the next normal Rank served")


async def test_rank_rate_limit_per_client(ranker, pki, catalog, request):
    with recording(request.node.nodeid, "rate limit") as row:
        outcomes = []
        async with channel(ranker.port, client_tls(pki, pki.feed_c)) as ch:
            for _ in range(6):
                try:
                    await _rank(ch, sorted(catalog)[:2])
                    outcomes.append("served")
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == CODE.RESOURCE_EXHAUSTED and "CN=feed-c" in exc.details()
                    assert int(dict(exc.trailing_metadata())[RETRY_AFTER_KEY]) > 0
                    outcomes.append("refused")
        served = outcomes.count("served")
        assert outcomes[:3] == ["served"] * 3 and 3 <= served <= 4 and outcomes[-1] == "refused"
        row.sent, row.refused = len(outcomes), len(outcomes) - served
        row.measured = (f"ranker 1 Rank/s, burst 3 per client certificate: {len(outcomes)} Ranks back to back, "
                        f"{served} served, {len(outcomes) - served} RESOURCE_EXHAUSTED with retry-after-ms")


def test_tls_and_limit_settings_from_flags_env_and_yaml(tmp_path, monkeypatch):
    path = tmp_path / "ranker.yaml"
    path.write_text("tls: {cert: s.crt, key: s.key}\nlimits: {rate_per_s: 50, max_receive_bytes: 1048576}\n"
                    "retriever: {tls_ca: ca.crt}\n")
    base = ["serve", "--port", "0", "--retriever", "r:1", "--artifacts", "a"]
    config = parse_args([*base, "--config", str(path)])
    assert config.tls.cert.name == "s.crt" and config.tls.key.name == "s.key" and not config.tls.mutual
    assert config.limits.rate_per_s == 50 and config.limits.max_receive_bytes == 1 << 20
    assert config.retriever.client_tls().ca.name == "ca.crt" and config.retriever.client_tls().active
    plain = parse_args(base)
    assert not plain.tls.enabled and not plain.retriever.client_tls().active and plain.limits.rate_per_s == 0
    with pytest.raises(ValueError, match="tls.cert and tls.key go together"):
        parse_args([*base, "--tls-cert", "s.crt"])
    monkeypatch.setenv("EXITRANK_RANKER_TLS_CERT", "/e/s.crt")  # cert and key as two variables
    monkeypatch.setenv("EXITRANK_RANKER_TLS_KEY", "/e/s.key")
    monkeypatch.setenv("EXITRANK_RANKER_LIMITS_BURST", "7")
    monkeypatch.setenv("EXITRANK_RANKER_RETRIEVER_TLS_SERVER_NAME", "retriever.internal")
    config = parse_args([*base, "--config", str(path), "--tls-client-ca", "/f/ca.crt", "--rate-limit", "9",
                         "--retriever-tls-cert", "/f/c.crt", "--retriever-tls-key", "/f/c.key", "--trust-client-id"])
    assert str(config.tls.cert) == "/e/s.crt" and str(config.tls.client_ca) == "/f/ca.crt" and config.tls.mutual
    assert config.limits.burst == 7 and config.limits.rate_per_s == 9 and config.limits.trust_client_id
    assert config.retriever.tls_server_name == "retriever.internal" and str(config.retriever.tls_cert) == "/f/c.crt"


async def test_a_context_reply_over_4_mib_reaches_the_ranker(memory_retriever):
    """gRPC clients refuse replies over 4 MiB by default; GetContext at its bounds is larger."""
    title = "t" * 256
    big = UserContext(user_id="big", history=(HistoryItem("h", title, 5.0, 1),), neighbors=tuple(
        NeighborContext(f"n{j}", 0.5, tuple(HistoryItem(f"i{j}-{i}", title, 4.0, i) for i in range(MAX_RETRIEVER_HISTORY)))
        for j in range(MAX_RETRIEVER_K)))
    server = grpc.aio.server(**server_kwargs(Limits()))
    retriever_pb2_grpc.add_RetrieverServicer_to_server(memory_retriever({"big": big}), server)
    port = bind(server, "127.0.0.1:0", None)
    await server.start()
    client = RetrieverClient(config=RetrieverConfig(target=f"127.0.0.1:{port}", timeout_s=30, title_cache_size=0))
    try:
        ctx = await client.get_context("big", MAX_RETRIEVER_K, MAX_RETRIEVER_HISTORY)
        assert ctx is not None and len(ctx.neighbors) == MAX_RETRIEVER_K  # ~6 MB: more than 4 MiB
        assert sum(len(n.history) for n in ctx.neighbors) == MAX_RETRIEVER_K * MAX_RETRIEVER_HISTORY
    finally:
        await client.close()
        await server.stop(None)
