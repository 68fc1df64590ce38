"""Who may call the ranker, and the ranker as a caller of the retriever: ``start_server`` with the tiny real
model and an access policy (bearer tokens, as behind a mesh that terminates TLS), its retriever client
sending the ranker's own token to a real gRPC retriever that enforces the same policy. Mutual TLS
identities are covered on the retriever (tests/retriever_svc/test_authorization.py) by the same guard."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exitrank.access import AccessPolicy, AuthConfig
from exitrank.grpc_security import bind, find_guard, server_kwargs
from exitrank.observability.config import ObservabilityConfig
from exitrank.security import Limits
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc, retriever_pb2_grpc
from ranker_svc.config import ModelConfig, RankerConfig, RetrieverConfig, ServerConfig
from ranker_svc.errors import ContextUnavailable
from ranker_svc.retriever_client import RetrieverClient
from ranker_svc.server import start_server
from tests.support.reliability import recording

pytestmark = pytest.mark.anyio
CODE = grpc.StatusCode
TOKENS = {"feed": "feed-0123456789abcdef0123456789ab", "ingest": "ingest-0123456789abcdef012345678",
          "ranker": "ranker-0123456789abcdef012345678"}
POLICY = """\
identities:
  feed-server: {token_files: [feed.token], allow: [Rank, RankStream]}
  ingest: {token_files: [ingest.token], allow: [Ingest, UpsertItems]}
  ranker: {token_files: [ranker.token], allow: [GetContext, GetItems, NearestUsers]}
"""


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy")
    for name, token in TOKENS.items():
        (out / f"{name}.token").write_text(token + "\n")
    (out / "policy.yaml").write_text(POLICY)
    return out / "policy.yaml"


@pytest.fixture(scope="module")
async def guarded_retriever(memory_retriever, policy_file):
    """(servicer, address, guard) of a MemoryRetriever behind the production guard and the policy."""
    servicer = memory_retriever()
    kwargs = server_kwargs(Limits(), access=AccessPolicy.load(policy_file))
    server = grpc.aio.server(**kwargs)
    retriever_pb2_grpc.add_RetrieverServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1:0", None)
    await server.start()
    yield servicer, f"127.0.0.1:{port}", find_guard(kwargs["interceptors"])
    await server.stop(None)


def _bearer(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name]}"),)


async def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
        return CODE.OK, ""
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""


async def test_feed_server_ranks_and_the_ranker_reaches_the_retriever_with_its_token(
        request, tiny_ranker_dir, guarded_retriever, policy_file, catalog):
    servicer, target, retriever_guard = guarded_retriever
    config = RankerConfig(
        model=ModelConfig(artifacts_dir=tiny_ranker_dir.parent, dtype="float32", reload_interval_s=0),
        server=ServerConfig(port=0, health_port=0), auth=AuthConfig(policy=policy_file),
        retriever=RetrieverConfig(target=target, timeout_s=5, token_file=policy_file.parent / "ranker.token"),
        observability=ObservabilityConfig(metrics_port=0),
    )
    items = sorted(catalog)[:3]
    rank = ranker_pb2.RankRequest(user_id="u1", candidate_item_ids=items)
    running = await start_server(config)
    try:
        with recording(request.node.nodeid, "authorisation") as row:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = ranker_pb2_grpc.RankerStub(channel)
                served = await stub.Rank(rank, timeout=30, metadata=_bearer("feed"))
                streamed = [r async for r in stub.RankStream(iter([rank, rank]), timeout=30, metadata=_bearer("feed"))]
                as_ingest = await _code(stub.Rank(rank, timeout=30, metadata=_bearer("ingest")))
                as_ranker = await _code(stub.RankStream(iter([rank]), timeout=30, metadata=_bearer("ranker")).read())
                anonymous = await _code(stub.Rank(rank, timeout=30))
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_port}") as probe:  # kubelet's view
                probed = await health_pb2_grpc.HealthStub(probe).Check(
                    health_pb2.HealthCheckRequest(service="exitrank.v1.Ranker"), timeout=10)
                on_probe_port = await _code(ranker_pb2_grpc.RankerStub(probe).Rank(rank, timeout=10,
                                                                                   metadata=_bearer("feed")))
            without_token = RetrieverClient(config=RetrieverConfig(target=target, timeout_s=5, breaker_failures=0))
            try:
                with pytest.raises(ContextUnavailable) as no_titles:
                    await without_token.get_titles(items)
            finally:
                await without_token.close()
            registry = running.metrics.registry
            refused = {(method, reason): registry.get_sample_value("exitrank_server_refused_total", {
                "grpc_service": "exitrank.v1.Ranker", "grpc_method": method, "reason": reason})
                for method, reason in (("Rank", "permission_denied"), ("RankStream", "permission_denied"),
                                       ("Rank", "unauthenticated"))}
            assert len(served.scores) == 3 and served.retrieval_used  # its token reached the retriever
            assert len(streamed) == 2
            assert as_ingest == (CODE.PERMISSION_DENIED, "identity 'ingest' may not call exitrank.v1.Ranker/Rank "
                                                         "(auth.policy)")
            assert as_ranker[0] == CODE.PERMISSION_DENIED and anonymous[0] == CODE.UNAUTHENTICATED
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # health stays open
            assert probed.status == health_pb2.HealthCheckResponse.SERVING
            assert on_probe_port[0] == CODE.UNIMPLEMENTED  # the plaintext health port serves health only
            assert "(UNAUTHENTICATED)" in str(no_titles.value) and TOKENS["ranker"] not in str(no_titles.value)
            assert retriever_guard.refusals["unauthenticated"] == 1  # only the tokenless client's call
            assert set(refused.values()) == {1.0}, refused
            row.sent, row.refused = 7, 4
            row.measured = ("ranker with an access policy (bearer tokens): the feed server's token served Rank and a "
                            "RankStream, whose retrievals reached a policy-enforcing retriever with the ranker's own "
                            "token (retriever.token_file); the ingest pipeline's token on Rank and the ranker's on "
                            "RankStream PERMISSION_DENIED, no token UNAUTHENTICATED (counted in "
                            "exitrank_server_refused_total), health open; the plaintext health port (kubelet probes) "
                            "answers health and nothing else (Rank UNIMPLEMENTED); a retriever client without the "
                            "token refused UNAUTHENTICATED by the retriever")
    finally:
        await running.stop(None)
