"""``exitrank.security``: TLS settings refused by name, both CLIs refusing bad TLS files before they
start anything, the token bucket, peer identities, and how private the embedded redis-server is."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from exitrank.grpc_security import peer_host
from exitrank.redis_server import EmbeddedRedis
from tests.support.reliability import recording
from exitrank.security import (
    ClientTLS,
    Limits,
    RateLimiter,
    ServerTLS,
    TLSConfigError,
    load_client_tls,
    load_server_tls,
)
from tests.support.pki import DevCA


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    ca = DevCA(out)
    other = DevCA(out, name="other-ca")
    not_pem = out / "garbage.crt"
    not_pem.write_text("not a certificate\n")
    return SimpleNamespace(ca=ca.cert, server=ca.server(), client=ca.client(name="feed-server"),
                           other=other.server("other-server"), not_pem=not_pem, missing=out / "absent.pem")


def test_good_tls_settings_load(pki):
    pem = load_server_tls(ServerTLS(cert=pki.server.cert, key=pki.server.key))
    assert pem.cert.startswith(b"-----BEGIN CERTIFICATE") and pem.client_ca is None and not pem.require_client_auth
    mutual = load_server_tls(ServerTLS(cert=str(pki.server.cert), key=str(pki.server.key), client_ca=str(pki.ca)))
    assert mutual.require_client_auth and mutual.client_ca == pki.ca.read_bytes()  # YAML strings become paths
    assert load_server_tls(ServerTLS()) is None and load_client_tls(ClientTLS()) is None
    client = load_client_tls(ClientTLS(ca=pki.ca, cert=pki.client.cert, key=pki.client.key, server_name="x"))
    assert client.ca == pki.ca.read_bytes() and client.key.startswith(b"-----BEGIN PRIVATE KEY")
    assert load_client_tls(ClientTLS(enabled=True)).ca is None  # system roots


def _bad_settings(pki) -> list[tuple[object, str]]:
    """(a way to build and load a bad setting, what the refusal must say)."""
    s, o = pki.server, pki.other
    return [
        (lambda: load_server_tls(ServerTLS(cert=pki.missing, key=s.key)), r"tls.cert \(--tls-cert\): cannot read"),
        (lambda: load_server_tls(ServerTLS(cert=pki.not_pem, key=s.key)), r"tls.cert .* is not a PEM file"),
        (lambda: load_server_tls(ServerTLS(cert=s.cert, key=o.key)),
         r"tls.key \(--tls-key\): the key in .* does not belong to the certificate"),
        (lambda: load_server_tls(ServerTLS(cert=s.cert, key=s.key, client_ca=s.key)),
         r"tls.client_ca \(--tls-client-ca\): .* holds no usable CA certificate"),
        (lambda: load_server_tls(ServerTLS(cert=s.cert, key=s.key, client_ca=pki.missing)),
         r"tls.client_ca \(--tls-client-ca\): cannot read"),
        (lambda: ServerTLS(cert=s.cert), r"tls.cert and tls.key go together"),
        (lambda: ServerTLS(client_ca=pki.ca), r"tls.client_ca .* needs a server certificate"),
        (lambda: ServerTLS(cert=s.cert, key=s.key, client_ca=pki.ca, require_client_auth=False),
         r"cannot ask for an optional client certificate"),
        (lambda: load_client_tls(ClientTLS(ca=pki.missing)), r"--retriever-tls-ca: cannot read"),
        (lambda: load_client_tls(ClientTLS(cert=pki.client.cert, key=s.key)),
         r"--retriever-tls-key: the key in .* does not belong"),
        (lambda: ClientTLS(cert=pki.client.cert), r"--retriever-tls-cert, --retriever-tls-key"),
    ]


def test_bad_tls_settings_are_refused_by_name(pki):
    for build, message in _bad_settings(pki):
        with pytest.raises(TLSConfigError, match=message):
            build()


def test_limits_are_validated():
    assert Limits().max_receive_bytes == 4 << 20 and Limits().rate_per_s == 0  # safe, unlimited rate
    assert Limits(rate_per_s=2.5).bucket_size == 5 and Limits(rate_per_s=0.1).bucket_size == 1
    for kwargs, field in [({"max_receive_bytes": 0}, "max_receive_bytes"), ({"max_send_bytes": 1 << 30}, "max_send_bytes"),
                          ({"rate_per_s": -1}, "rate_per_s"), ({"rate_per_s": float("inf")}, "rate_per_s"),
                          ({"burst": -1}, "burst")]:
        with pytest.raises(ValueError, match=field):
            Limits(**kwargs)


def test_services_refuse_to_start_on_bad_tls_files(pki, tmp_path, capsys, request):
    """Both CLIs exit 2 with the setting's name before Redis, the model or a port is touched."""
    from ranker_svc.server import main as ranker_main
    from retriever_svc.server import main as retriever_main

    s, o = pki.server, pki.other
    base = ["serve", "--port", "0", "--artifacts", str(tmp_path / "nothing")]
    ranker = [*base, "--retriever", "localhost:1"]
    cases = [
        (retriever_main, [*base, "--tls-cert", str(pki.missing), "--tls-key", str(s.key)], "tls.cert (--tls-cert): cannot read"),
        (retriever_main, [*base, "--tls-cert", str(s.cert), "--tls-key", str(o.key)], "does not belong to the certificate"),
        (retriever_main, [*base, "--tls-cert", str(s.cert)], "tls.cert and tls.key go together"),
        (retriever_main, [*base, "--redis-tls-ca", str(pki.ca)], "need --redis-url rediss://"),
        (retriever_main, [*base, "--redis-url", "redis://127.0.0.1:1/0", "--redis-tls-ca", str(pki.ca)],
         "need a rediss:// URL"),
        (retriever_main, [*base, "--redis-url", "rediss://127.0.0.1:1/0", "--redis-tls-ca", str(pki.missing)],
         "redis.tls_ca: cannot read"),
        (ranker_main, [*ranker, "--tls-cert", str(s.cert), "--tls-key", str(o.key)], "does not belong to the certificate"),
        (ranker_main, [*ranker, "--tls-cert", str(s.cert), "--tls-key", str(s.key), "--tls-client-ca", str(pki.not_pem)],
         "tls.client_ca (--tls-client-ca)"),
        (ranker_main, [*ranker, "--retriever-tls-ca", str(pki.missing)], "--retriever-tls-ca: cannot read"),
    ]
    with recording(request.node.nodeid, "TLS bad config") as row:
        refused = 0
        for main, argv, message in cases:
            start = time.perf_counter()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert message in err, (argv, err)
            assert time.perf_counter() - start < 5  # refused up front: no model load, no redis-server
            refused += 1
        row.sent, row.refused = len(cases), refused
        row.measured = (f"{refused}/{len(cases)} bad settings (missing file, not PEM, key of another cert, cert "
                        "without key, Redis TLS files without rediss://) stop retriever-svc/ranker-svc with exit 2 "
                        "and the setting's name, before Redis, the model or a port")


def test_token_bucket_refills_refuses_with_the_wait_and_stays_bounded():
    now = [100.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, max_clients=2, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)  # empty: one token in 1/rate
    now[0] += 0.25
    assert limiter.acquire("a") == pytest.approx(0.25)  # refusals do not take tokens
    now[0] += 0.25
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("b") == 0.0  # its own bucket
    now[0] += 100
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0  # refill caps at the burst
    limiter.acquire("c")  # a third client evicts the least recently seen (b)
    assert len(limiter) == 2 and limiter.allowed == 9 and limiter.refused == 3
    with pytest.raises(ValueError):
        RateLimiter(rate_per_s=0, burst=1)


def test_token_bucket_is_constant_time_per_request():
    limiter = RateLimiter(rate_per_s=1000.0, burst=10, max_clients=20_000)
    clients = [f"addr:10.0.{i // 256}.{i % 256}" for i in range(40_000)]  # twice max_clients: evictions too
    start = time.perf_counter()
    for client in clients * 3:
        limiter.acquire(client)
    per_call_us = (time.perf_counter() - start) / (3 * len(clients)) * 1e6
    assert len(limiter) == 20_000
    assert per_call_us < 20, per_call_us  # ~1 us on a laptop; a dict + OrderedDict move, no scan


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:127.0.0.1:50312", "127.0.0.1"), ("ipv6:[::1]:50312", "::1"), ("ipv6:%5B::1%5D:4", "::1"),
    ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
])
def test_peer_host_drops_the_port(peer, host):
    assert peer_host(peer) == host


def _listening_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp_listeners(pid: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* has them) of the process's listening TCP sockets."""
    inodes = _listening_inodes(pid)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.append(cols[1])
    return found


def test_embedded_redis_listens_privately_with_a_generated_password(tmp_path, request):
    with recording(request.node.nodeid, "Embedded Redis") as row:
        with EmbeddedRedis(tmp_path / "a") as first, EmbeddedRedis(tmp_path / "b") as second:
            assert first.url.startswith("unix://:") and first.password in first.url.replace("%", "")
            assert first.password != second.password and len(first.password) >= 32  # token_urlsafe(24)
            assert _tcp_listeners(first.pid) == []  # the unix socket only
            mode = stat.S_IMODE(first.socket_path.stat().st_mode)
            assert mode & 0o077 == 0, oct(mode)  # unixsocketperm 700: the owner only
            client = redis.Redis.from_url(first.url)
            config = client.config_get("*")
            assert config["port"] == "0" and config["protected-mode"] == "yes" and config["requirepass"] == first.password
            refused = 0
            once = Retry(NoBackoff(), 0)  # redis-py retries AuthenticationError (a ConnectionError) by default
            for attempt in (redis.Redis(unix_socket_path=str(first.socket_path), retry=once),
                            redis.Redis(unix_socket_path=str(first.socket_path), password=second.password, retry=once)):
                with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
                    attempt.ping()
                refused += 1
            client.close()
        with socket_port() as port, EmbeddedRedis(tmp_path / "c", port=port) as tcp:
            listeners = _tcp_listeners(tcp.pid)
            assert listeners == [f"0100007F:{port:04X}"], listeners  # 127.0.0.1 only, no IPv6, no 0.0.0.0
        row.sent, row.refused = 2, refused
        row.measured = ("unix socket only (no TCP listener in /proc/net/tcp*, socket mode 0700), a fresh 32-char "
                        f"password per server; {refused}/2 logins without it or with another server's refused; "
                        "with a port: 127.0.0.1 only")


class socket_port:
    """A free loopback TCP port (closed again before use)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        return None
