"""Who may call what on the retriever: a real core and redis-server behind ``start_grpc`` with an access
policy, over mutual TLS (callers known by their certificate's names) and over plaintext (callers known
by a bearer token, as behind a mesh that terminates TLS). Every refusal is counted in the metrics."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from exitrank.access import AuthConfig
from exitrank.grpc_security import open_channel
from exitrank.observability.metrics import ServiceMetrics
from exitrank.security import ClientTLS, ServerTLS, load_client_tls
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from retriever_svc.config import IndexConfig, ServerConfig
from retriever_svc.index import Retriever
from retriever_svc.records import CatalogItem
from retriever_svc.server import start_grpc
from retriever_svc.store import RedisStore
from tests.support.pki import DevCA
from tests.support.reliability import recording

pytestmark = pytest.mark.anyio
CODE = grpc.StatusCode
INGEST_TOKEN = "ingest-0123456789abcdef0123456789"
RANKER_TOKEN = "ranker-0123456789abcdef0123456789"
POLICY = """\
# the shipped shape (infra/k8s/access-policy.yaml): default deny, health open
identities:
  feed-server: {certificate_names: [feed-server.exitrank.svc], allow: [Rank, RankStream]}
  ingest: {certificate_names: [ingest.exitrank.svc], token_files: [ingest.token], allow: [Ingest, UpsertItems]}
  ranker: {certificate_names: [ranker.exitrank.svc], token_files: [ranker.token],
           allow: [GetContext, GetItems, NearestUsers]}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("authz")
    ca = DevCA(out)
    (out / "ingest.token").write_text(INGEST_TOKEN)
    (out / "ranker.token").write_text(RANKER_TOKEN)
    (out / "policy.yaml").write_text(POLICY)
    issue = {name: ca.client(name, name=name, dns_names=[f"{name}.exitrank.svc"])
             for name in ("ranker", "feed-server", "ingest")}
    return SimpleNamespace(ca=ca.cert, server=ca.server(), stranger=ca.client("stranger", name="stranger"),
                           policy=out / "policy.yaml", **{k.replace("-", "_"): v for k, v in issue.items()})


@pytest.fixture(scope="module")
async def core(redis_server, unique_prefix, clustered):
    emb, _ = clustered()
    store = RedisStore.from_url(redis_server.url, prefix=unique_prefix("authz"), timeout_s=2.0)
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
    await retriever.load_embeddings(emb)
    await retriever.upsert_items([CatalogItem(i, f"Title {i}") for i in emb.item_ids])
    yield SimpleNamespace(retriever=retriever, store=store)
    await store.close()


@contextlib.asynccontextmanager
async def serving(core, setup, *, mutual: bool):
    tls = ServerTLS(cert=setup.server.cert, key=setup.server.key, client_ca=setup.ca) if mutual else None
    metrics = ServiceMetrics(service="retriever")
    running = await start_grpc(core.retriever, ServerConfig(port=0), tls=tls, auth=AuthConfig(policy=setup.policy),
                               metrics=metrics)
    try:
        yield running, metrics
    finally:
        await running.server.stop(0)


@contextlib.asynccontextmanager
async def channel(port: int, setup, issued=None, *, tls: bool = True):
    pem = load_client_tls(ClientTLS(ca=setup.ca, cert=issued.cert if issued else None,
                                    key=issued.key if issued else None)) if tls else None
    ch = open_channel(f"localhost:{port}", pem)
    try:
        yield retriever_pb2_grpc.RetrieverStub(ch), ch
    finally:
        await ch.close()


async def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
        return CODE.OK, ""
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""


def _refused(metrics: ServiceMetrics, method: str, reason: str) -> float:
    return metrics.registry.get_sample_value(
        "exitrank_server_refused_total", {"grpc_service": "exitrank.v1.Retriever", "grpc_method": method,
                                          "reason": reason}) or 0.0


GET = retriever_pb2.GetItemsRequest(item_ids=["c0i0"])
NEAREST = retriever_pb2.NearestUsersRequest(user_id="c0u0", k=2)
CONTEXT = retriever_pb2.ContextRequest(user_id="c0u0", k=1, max_history=3)


async def test_mutual_tls_identities_call_only_their_rpcs(request, core, setup):
    outcomes: dict[str, tuple[grpc.StatusCode, str]] = {}
    with recording(request.node.nodeid, "authorisation") as row:
        async with serving(core, setup, mutual=True) as (running, metrics):
            port = running.port
            async with channel(port, setup, setup.ranker) as (stub, _):
                for name, call in (("ranker GetItems", stub.GetItems(GET, timeout=10)),
                                   ("ranker NearestUsers", stub.NearestUsers(NEAREST, timeout=10)),
                                   ("ranker GetContext", stub.GetContext(CONTEXT, timeout=10)),
                                   ("ranker UpsertItems", stub.UpsertItems(iter([common_pb2.Item(
                                       item_id="forged", title="Retitled by the ranker")]), timeout=10)),
                                   ("ranker Ingest", stub.Ingest(iter([common_pb2.Interaction(
                                       user_id="c0u0", item_id="c0i1")]), timeout=10))):
                    outcomes[name] = await _code(call)
            async with channel(port, setup, setup.feed_server) as (stub, _):
                outcomes["feed-server GetContext"] = await _code(stub.GetContext(CONTEXT, timeout=10))
            async with channel(port, setup, setup.ingest) as (stub, _):
                outcomes["ingest UpsertItems"] = await _code(stub.UpsertItems(iter([common_pb2.Item(
                    item_id="authz-new", title="New")]), timeout=10))
                outcomes["ingest GetItems"] = await _code(stub.GetItems(GET, timeout=10))
            async with channel(port, setup, setup.stranger) as (stub, ch):  # signed by the CA, in no identity
                outcomes["stranger GetItems"] = await _code(stub.GetItems(GET, timeout=10))
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                # no request written: a client still writing when the server ends a bidi call can read grpc's
                # own "Internal error from Core" instead of the status (2 of 130 runs wrote one); the guard
                # refuses at the call's start, before any message, so reading alone meets the refusal
                reflected = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(timeout=10)
                outcomes["stranger reflection"] = await _code(reflected.read())
        allowed = ("ranker GetItems", "ranker NearestUsers", "ranker GetContext", "ingest UpsertItems")
        assert all(outcomes[name][0] == CODE.OK for name in allowed), outcomes
        denied = [name for name in outcomes if name not in allowed]
        assert all(outcomes[name][0] == CODE.PERMISSION_DENIED for name in denied), outcomes
        assert outcomes["ranker UpsertItems"][1] == ("identity 'ranker' may not call exitrank.v1.Retriever/UpsertItems "
                                                     "(auth.policy)")
        assert "belongs to no identity" in outcomes["stranger GetItems"][1]
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # open: health
        found = await core.retriever.get_items(["forged", "authz-new"])
        assert [i.item_id for i in found[0]] == ["authz-new"]  # the refused upsert stored nothing
        counted = sum(_refused(metrics, m, "permission_denied") for m in ("UpsertItems", "Ingest", "GetContext",
                                                                         "GetItems"))
        assert counted == len(denied) - 1  # all but reflection's, which is a service of its own
        assert running.guard.refusals["permission_denied"] == len(denied)
        row.sent, row.refused = len(outcomes) + 1, len(denied)
        row.measured = (f"retriever over mutual TLS with an access policy: the ranker's certificate (SAN "
                        f"ranker.exitrank.svc) served GetItems/NearestUsers/GetContext and refused UpsertItems and "
                        f"Ingest (nothing stored); the feed server's refused GetContext, the ingest pipeline's "
                        f"served UpsertItems but not GetItems; a CA-signed certificate of no identity refused "
                        f"GetItems and reflection, health open: {len(denied)} PERMISSION_DENIED, each counted in "
                        "exitrank_server_refused_total")


async def test_bearer_tokens_behind_a_mesh_that_terminates_tls(request, core, setup):
    with recording(request.node.nodeid, "authorisation") as row:
        async with serving(core, setup, mutual=False) as (running, metrics):
            port = running.port
            async with channel(port, setup, tls=False) as (stub, _):
                bearer = lambda token: (("authorization", f"Bearer {token}"),)  # noqa: E731
                ingest = await _code(stub.Ingest(iter([common_pb2.Interaction(user_id="authz-u", item_id="c0i0")]),
                                                 timeout=10, metadata=bearer(INGEST_TOKEN)))
                ranker = await _code(stub.GetItems(GET, timeout=10, metadata=bearer(RANKER_TOKEN)))
                wrong_rpc = await _code(stub.GetItems(GET, timeout=10, metadata=bearer(INGEST_TOKEN)))
                forged = "ranker-0123456789abcdef012345678X"
                bad_token = await _code(stub.GetItems(GET, timeout=10, metadata=bearer(forged)))
                no_token = await _code(stub.GetItems(GET, timeout=10))
                other_scheme = await _code(stub.GetItems(GET, timeout=10,
                                                         metadata=(("authorization", f"Basic {RANKER_TOKEN}"),)))
        assert ingest[0] == ranker[0] == CODE.OK, (ingest, ranker)
        assert wrong_rpc == (CODE.PERMISSION_DENIED, "identity 'ingest' may not call exitrank.v1.Retriever/GetItems "
                                                     "(auth.policy)")
        for code, details in (bad_token, no_token, other_scheme):
            assert code == CODE.UNAUTHENTICATED, (code, details)
            assert forged not in details and RANKER_TOKEN not in details  # nothing secret in a refusal
        assert "client certificate (mutual TLS) or 'authorization: Bearer <token>'" in no_token[1]
        assert _refused(metrics, "GetItems", "unauthenticated") == 3
        assert _refused(metrics, "GetItems", "permission_denied") == 1
        row.sent, row.refused = 6, 4
        row.measured = ("retriever in plaintext (TLS ended by a mesh) with the same policy: bearer tokens (files, "
                        "compared in constant time) let the ingest pipeline Ingest and the ranker GetItems; the "
                        "ingest token on GetItems PERMISSION_DENIED; a token one character off, no token, and "
                        "'Basic <token>' UNAUTHENTICATED without echoing it; 4 refusals counted by reason")
