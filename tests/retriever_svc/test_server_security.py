"""The retriever's gRPC server over real TLS and mutual TLS, and under message-size and rate limits:
``start_grpc`` on loopback over the real core and redis-server, called through the generated stubs."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from exitrank.grpc_security import CLIENT_ID_KEY, RETRY_AFTER_KEY, open_channel
from tests.support.reliability import recording
from exitrank.security import ClientTLS, Limits, ServerTLS, load_client_tls
from tests.support.pki import DevCA
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from retriever_svc.config import IndexConfig, ServerConfig
from retriever_svc.index import Retriever
from retriever_svc.records import CatalogItem
from retriever_svc.server import start_grpc
from retriever_svc.store import RedisStore

pytestmark = pytest.mark.anyio
CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    ca, other = DevCA(out), DevCA(out, name="other-ca")
    return SimpleNamespace(ca=ca.cert, other_ca=other.cert, server=ca.server(), a=ca.client("a", name="feed-a"),
                           b=ca.client("b", name="feed-b"), rogue=other.client("rogue", name="feed-a"))


@pytest.fixture(scope="module")
async def core(redis_server, unique_prefix, clustered):
    emb, _ = clustered()
    store = RedisStore.from_url(redis_server.url, prefix=unique_prefix("sec"), timeout_s=2.0)
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
    await retriever.load_embeddings(emb)
    await retriever.upsert_items([CatalogItem(i, f"Title {i}") for i in emb.item_ids])
    yield SimpleNamespace(retriever=retriever, emb=emb)
    await store.close()


@contextlib.asynccontextmanager
async def serving(core, *, tls: ServerTLS | None = None, limits: Limits | None = None):
    running = await start_grpc(core.retriever, ServerConfig(port=0), tls=tls, limits=limits)
    server, port = running.server, running.port
    try:
        yield port
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def channel(port: int, tls: ClientTLS | None, host: str = "localhost"):
    ch = open_channel(f"{host}:{port}", load_client_tls(tls) if tls is not None else None)
    try:
        yield ch
    finally:
        await ch.close()


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return CODE.OK


def _get_items(ch, ids, timeout: float = 5.0):
    return retriever_pb2_grpc.RetrieverStub(ch).GetItems(retriever_pb2.GetItemsRequest(item_ids=ids), timeout=timeout)


async def test_tls_serves_rpcs_health_and_reflection(core, pki, request):
    with recording(request.node.nodeid, "TLS") as row:
        tls = ServerTLS(cert=pki.server.cert, key=pki.server.key)
        async with serving(core, tls=tls) as port:
            answered = 0
            for host in ("localhost", "127.0.0.1"):  # both subjectAltNames verify
                async with channel(port, ClientTLS(ca=pki.ca), host) as ch:
                    items = await _get_items(ch, ["c0i0", "c1i1"])
                    assert [i.title for i in items.items] == ["Title c0i0", "Title c1i1"]
                    near = await retriever_pb2_grpc.RetrieverStub(ch).NearestUsers(
                        retriever_pb2.NearestUsersRequest(user_id="c0u0", k=3), timeout=5)
                    assert len(near.neighbors) == 3 and all(n.user_id.startswith("c0") for n in near.neighbors)
                    health = await health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service="exitrank.v1.Retriever"), timeout=5)
                    assert health.status == health_pb2.HealthCheckResponse.SERVING
                    reflected = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
                    names = [s.name async for r in reflected for s in r.list_services_response.service]
                    assert "exitrank.v1.Retriever" in names and "grpc.health.v1.Health" in names
                    answered += 4
            refused = 0
            for client in (None, ClientTLS(ca=pki.other_ca)):  # plaintext; TLS trusting another CA
                async with channel(port, client) as ch:
                    assert await _code(_get_items(ch, ["c0i0"], timeout=2)) == CODE.UNAVAILABLE
                    refused += 1
        row.sent, row.refused = answered + refused, refused
        row.measured = (f"{answered}/{answered} calls over TLS answered (GetItems, NearestUsers, Health.Check, "
                        f"reflection; via localhost and 127.0.0.1); {refused}/2 refused: a plaintext client and "
                        "a client trusting another CA (UNAVAILABLE)")


async def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(core, pki, request):
    with recording(request.node.nodeid, "mTLS refusal") as row:
        tls = ServerTLS(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca)
        clients = {
            "certificate of the CA": ClientTLS(ca=pki.ca, cert=pki.a.cert, key=pki.a.key),
            "no certificate": ClientTLS(ca=pki.ca),
            "certificate of another CA (same name)": ClientTLS(ca=pki.ca, cert=pki.rogue.cert, key=pki.rogue.key),
            "plaintext": None,
        }
        outcomes: dict[str, list[grpc.StatusCode]] = {}
        async with serving(core, tls=tls) as port:
            for name, client in clients.items():
                for _ in range(3):  # a fresh connection each time
                    async with channel(port, client) as ch:
                        items = await _code(_get_items(ch, ["c0i0"], timeout=2))
                        checked = await _code(health_pb2_grpc.HealthStub(ch).Check(
                            health_pb2.HealthCheckRequest(), timeout=2))
                        outcomes.setdefault(name, []).extend([items, checked])
        assert set(outcomes.pop("certificate of the CA")) == {CODE.OK}
        assert all(set(codes) == {CODE.UNAVAILABLE} for codes in outcomes.values()), outcomes
        refused = sum(len(codes) for codes in outcomes.values())
        row.sent, row.refused = refused + 6, refused
        row.measured = (f"6/6 calls with a client certificate of the CA answered; {refused}/{refused} refused "
                        "at the handshake (UNAVAILABLE, health checks included): 6 without a certificate, 6 with "
                        "a certificate of another CA carrying the same name, 6 plaintext")


async def test_oversized_messages_get_resource_exhausted_naming_the_flag(core, pki, request):
    limits = Limits(max_receive_bytes=32 << 10, max_send_bytes=64 << 10)
    with recording(request.node.nodeid, "message size") as row:
        async with serving(core, limits=limits) as port, channel(port, None) as ch:
            stub = retriever_pb2_grpc.RetrieverStub(ch)
            assert len((await _get_items(ch, ["c0i0", *_ids(300)])).missing_item_ids) == 300  # 30 kB: served
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await _get_items(ch, _ids(400))
            assert over.value.code() == CODE.RESOURCE_EXHAUSTED
            assert "40800 bytes exceeds limits.max_receive_bytes=32768" in over.value.details()
            assert "--max-receive-bytes" in over.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as far_over:  # past gRPC's own cut-off (2x)
                await _get_items(ch, _ids(700))
            assert far_over.value.code() == CODE.RESOURCE_EXHAUSTED and "larger than max" in far_over.value.details()
            stream = [common_pb2.Interaction(user_id="u", item_id="c0i0", rating=1, timestamp_ms=1)] * 3
            stream.append(common_pb2.Interaction(user_id="u" * 40_000, item_id="c0i0"))
            with pytest.raises(grpc.aio.AioRpcError) as ingest:  # one oversized message of a client stream
                await stub.Ingest(iter(stream), timeout=5)
            assert ingest.value.code() == CODE.RESOURCE_EXHAUSTED and "--max-receive-bytes" in ingest.value.details()
            big = [common_pb2.Item(item_id=f"big{j}", title="t" * 500) for j in range(150)]
            assert (await stub.UpsertItems(iter(big), timeout=5)).accepted == 150
            with pytest.raises(grpc.aio.AioRpcError) as reply:  # all 150, a 77 kB reply, exceed max_send_bytes
                await _get_items(ch, [i.item_id for i in big])
            assert reply.value.code() == CODE.RESOURCE_EXHAUSTED
            assert len((await _get_items(ch, [i.item_id for i in big[:60]])).items) == 60  # 31 kB: served
        row.sent, row.refused = 7, 4
        row.measured = ("limits 32 KiB in / 64 KiB out: a 31 kB request, a 150-item upsert stream and a 31 kB "
                        "reply served; RESOURCE_EXHAUSTED for a 41 kB request (the message names "
                        "limits.max_receive_bytes and --max-receive-bytes), a 71 kB one (gRPC's 2x cut-off), "
                        "a 40 kB message inside an Ingest stream, and a 77 kB GetItems reply")


def _ids(n: int) -> list[str]:
    """n distinct 100-byte item ids: 102 bytes each on the wire."""
    return [f"{j:04d}".ljust(100, "x") for j in range(n)]


async def _burst(ch, n: int) -> list[grpc.aio.AioRpcError | None]:
    out = []
    for _ in range(n):
        try:
            await _get_items(ch, ["c0i0"])
            out.append(None)
        except grpc.aio.AioRpcError as exc:
            out.append(exc)
    return out


async def test_rate_limit_per_client_certificate(core, pki, request):
    limits = Limits(rate_per_s=2, burst=4)
    tls = ServerTLS(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca)
    a = ClientTLS(ca=pki.ca, cert=pki.a.cert, key=pki.a.key)
    b = ClientTLS(ca=pki.ca, cert=pki.b.cert, key=pki.b.key)
    with recording(request.node.nodeid, "rate limit") as row:
        async with serving(core, tls=tls, limits=limits) as port, channel(port, a) as ch_a, channel(port, b) as ch_b:
            first = await _burst(ch_a, 12)
            served = first.count(None)
            assert 4 <= served <= 5 and first[:4] == [None] * 4  # the burst, plus what refilled meanwhile
            refusals = [e for e in first if e is not None]
            for exc in refusals:
                assert exc.code() == CODE.RESOURCE_EXHAUSTED
                assert "client cert:CN=feed-a,O=exitrank dev exceeded 2 requests/s (burst 4)" in exc.details()
                assert "retry in" in exc.details() and "--rate-limit" in exc.details()
                assert 0 < int(dict(exc.trailing_metadata())[RETRY_AFTER_KEY]) <= 500
            health = await health_pb2_grpc.HealthStub(ch_a).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # health checks are exempt
            other = await _burst(ch_b, 4)  # same address, another certificate: its own bucket
            assert other == [None] * 4
            wait_ms = int(dict(refusals[-1].trailing_metadata())[RETRY_AFTER_KEY])
            await asyncio.sleep(wait_ms / 1000 + 0.05)
            assert await _burst(ch_a, 1) == [None]  # the hint was right
        row.sent, row.refused = len(first) + 5, len(refusals)
        row.measured = (f"2/s, burst 4, mTLS: feed-a sent 12 back to back, {served} served, {len(refusals)} "
                        "RESOURCE_EXHAUSTED with retry-after-ms; feed-b (same address, own certificate) 4/4 "
                        "served; health checks exempt; feed-a served again after the hinted wait")


async def test_rate_limit_by_address_unless_client_ids_are_trusted(core, request):
    with recording(request.node.nodeid, "rate limit") as row:
        counts = {}
        for trusted in (False, True):
            limits = Limits(rate_per_s=1, burst=2, trust_client_id=trusted)
            async with serving(core, limits=limits) as port, channel(port, None) as ch:
                stub = retriever_pb2_grpc.RetrieverStub(ch)
                codes = []
                for client_id in ("x", "x", "x", "y"):  # x empties its bucket, then y asks
                    codes.append(await _code(stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["c0i0"]),
                                                           metadata=((CLIENT_ID_KEY, client_id),), timeout=5)))
                counts[trusted] = codes
        ok, limited = CODE.OK, CODE.RESOURCE_EXHAUSTED
        assert counts[False] == [ok, ok, limited, limited]  # untrusted ids: one bucket per address
        assert counts[True] == [ok, ok, limited, ok]  # trusted ids: y has its own bucket
        row.sent, row.refused = 8, 3
        row.measured = ("1/s, burst 2, plaintext: by peer address, x-client-id ignored (a 4th call under a new id "
                        "refused); with trust_client_id the new id gets its own bucket (served)")
