"""Transport security and request limits shared by both services (no grpc here).

Three settings objects, one section each in ``RetrieverConfig`` and ``RankerConfig``
(``tls``, ``limits``; the ranker's client to the retriever reads ``retriever.tls_*``):

* :class:`ServerTLS`: the server's certificate and key (PEM files); with ``client_ca`` the server
  asks clients for a certificate signed by that CA (mutual TLS), and refuses clients without one
  unless ``require_client_auth`` is false.
* :class:`ClientTLS`: how a client verifies a server (``ca``; the system roots when only
  ``enabled``) and the certificate it presents for mutual TLS (``cert``, ``key``).
* :class:`Limits`: per-message byte limits, a per-client token bucket (:class:`RateLimiter`) and a
  per-client cap on calls in progress.

:func:`load_server_tls` / :func:`load_client_tls` read and check the PEM files once at start-up:
a missing file, a file that is not PEM, or a key that does not belong to its certificate raises
:class:`TLSConfigError` naming the setting and its flag, so a service refuses to start instead of
failing every handshake later. The check uses the standard library's ``ssl`` (OpenSSL), which
gRPC's own BoringSSL would otherwise only report per connection.

The gRPC half (credentials, server options, the limiting interceptor) is
``exitrank.grpc_security``; core classes import neither.
"""

from __future__ import annotations

import math
import ssl
import time
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
# gRPC's limits are int32; the hard cut-off is twice the configured limit (see Limits)
MAX_MESSAGE_BYTES = 512 * MiB
# the current call's client, as the server's guard identified it (exitrank.grpc_security.client_identity,
# or "token:<identity>"): cores bound their per-client shares by it without importing grpc
caller_var: ContextVar[str | None] = ContextVar("exitrank_caller", default=None)


class TLSConfigError(ValueError):
    """A TLS setting names a missing or unusable file; the message says which setting and flag."""


def _as_path(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if value is not None and not isinstance(value, Path):
        object.__setattr__(obj, name, Path(value) if str(value) else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTLS:
    """TLS of a gRPC server (None everywhere: plaintext, loopback use only).

    Args:
        cert: PEM certificate chain of the server (flag ``--tls-cert``).
        key: PEM private key of ``cert`` (``--tls-key``).
        client_ca: PEM CA bundle that signs client certificates; set: mutual TLS (``--tls-client-ca``),
            clients without a certificate signed by it fail the handshake.
        require_client_auth: must stay true with ``client_ca`` (gRPC Python has no optional
            client certificates); kept so that a config asking for optional ones is refused
            by name instead of silently serving without client verification.
    """

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    require_client_auth: bool = True

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            _as_path(self, name)
        if (self.cert is None) != (self.key is None):
            raise TLSConfigError("tls.cert and tls.key go together: give both (--tls-cert, --tls-key) or neither")
        if self.client_ca is not None and self.cert is None:
            raise TLSConfigError("tls.client_ca (--tls-client-ca) needs a server certificate: set tls.cert and tls.key")
        if self.client_ca is not None and not self.require_client_auth:
            # grpc's Python API either requires and verifies a client certificate or never asks
            # for one: an optional client certificate could never be verified nor used
            raise TLSConfigError("tls.require_client_auth false with tls.client_ca: gRPC Python cannot ask for an "
                                 "optional client certificate; keep it true (mutual TLS) or drop tls.client_ca")

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTLS:
    """TLS of a gRPC client channel.

    Args:
        enabled: use TLS even without ``ca`` (the server's certificate is then checked against
            the system's roots).
        ca: PEM CA bundle that signs the server's certificate.
        cert / key: the client's certificate and key, for servers that require mutual TLS.
        server_name: the name expected in the server's certificate when it differs from the
            target's host (``grpc.ssl_target_name_override``).
        flag_prefix: how the settings are spelled on the command line, for error messages.
    """

    enabled: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""
    flag_prefix: str = "--retriever-tls"

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            _as_path(self, name)
        if (self.cert is None) != (self.key is None):
            raise TLSConfigError(f"the client certificate and key go together: give both "
                                 f"({self.flag_prefix}-cert, {self.flag_prefix}-key) or neither")

    @property
    def active(self) -> bool:
        return self.enabled or self.ca is not None or self.cert is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Message sizes and the per-client rate limit of a gRPC server.

    Args:
        max_receive_bytes: largest request message accepted (``--max-receive-bytes``, default
            4 MiB, gRPC's own default). A larger one gets RESOURCE_EXHAUSTED naming this limit;
            gRPC itself cuts off messages over twice the limit before they reach Python (same
            status, gRPC's wording), so one call buffers at most 2x the limit.
        max_send_bytes: largest response message sent (``--max-send-bytes``, default 16 MiB:
            GetItems answers up to 10,000 catalog entries).
        max_stream_message_bytes: largest message of a client stream (Ingest, UpsertItems,
            RankStream; default 1 MiB, at most ``max_receive_bytes``): the largest valid one is a
            RankRequest of 512 candidates (~70 KB) or an item with every attribute (~200 KB), and a
            stream's messages overlap in the server's buffers, so each must be far below the limit
            of a unary request.
        rate_per_s: requests per second each client may start, sustained (``--rate-limit``);
            0 (default) disables the limit: one feed server is usually the only client, and
            the right number depends on the deployment's capacity.
        burst: requests a client may start at once after idling (``--rate-burst``; 0: twice
            ``rate_per_s``, at least 1).
        max_clients: buckets kept; the least recently seen client's bucket is dropped beyond
            this (a new bucket starts full, so dropping one only forgets a client's debt).
        trust_client_id: identify clients by their ``x-client-id`` metadata when they present
            no verified certificate (``--trust-client-id``; only behind a gateway that sets it,
            since a client could otherwise pick a fresh id per call). Default: by peer address.
        max_concurrent_per_client: calls one client may have in progress at once
            (``--max-concurrent-per-client``; a stream counts from its start to its end; health
            checks are not counted); more are refused RESOURCE_EXHAUSTED at once. 0: no cap.
    """

    max_receive_bytes: int = 4 * MiB
    max_send_bytes: int = 16 * MiB
    max_stream_message_bytes: int = MiB
    rate_per_s: float = 0.0
    burst: int = 0
    max_clients: int = 10_000
    trust_client_id: bool = False
    max_concurrent_per_client: int = 256

    def __post_init__(self) -> None:
        for name in ("max_receive_bytes", "max_send_bytes", "max_stream_message_bytes"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_MESSAGE_BYTES:
                raise ValueError(f"limits.{name} must be in 1..{MAX_MESSAGE_BYTES}, got {value}")
        if not (self.rate_per_s >= 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"limits.rate_per_s must be >= 0 (0: no rate limit), got {self.rate_per_s}")
        if self.burst < 0 or self.max_clients < 1:
            raise ValueError("limits.burst must be >= 0 and limits.max_clients >= 1")
        if self.max_concurrent_per_client < 0:
            raise ValueError(f"limits.max_concurrent_per_client must be >= 0 (0: no cap), "
                             f"got {self.max_concurrent_per_client}")

    @property
    def bucket_size(self) -> int:
        return self.burst or max(1, math.ceil(2 * self.rate_per_s))


@dataclass(frozen=True, slots=True)
class ServerPEM:
    """The PEM bytes of a checked :class:`ServerTLS`."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    require_client_auth: bool


@dataclass(frozen=True, slots=True)
class ClientPEM:
    """The PEM bytes of a checked :class:`ClientTLS` (None: not given)."""

    ca: bytes | None
    cert: bytes | None
    key: bytes | None
    server_name: str


def _read(path: Path, setting: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"{setting}: {path} is not a PEM file")
    return data


def _check_pair(cert: Path, key: Path, cert_setting: str, key_setting: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        why = "does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(exc) else f"unusable ({exc})"
        raise TLSConfigError(f"{key_setting}: the key in {key} {why} in {cert} ({cert_setting})") from exc


def _check_ca(path: Path, setting: str) -> None:
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{setting}: {path} holds no usable CA certificate ({exc})") from exc


def load_server_tls(tls: ServerTLS) -> ServerPEM | None:
    """The checked PEM material of ``tls``, or None when TLS is off.

    Raises:
        TLSConfigError: a file is missing or not PEM, the key does not match the certificate,
            or the client CA holds no certificate; the message names the setting and flag.
    """
    if not tls.enabled:
        return None
    assert tls.cert is not None and tls.key is not None  # enabled
    cert = _read(tls.cert, "tls.cert (--tls-cert)")
    key = _read(tls.key, "tls.key (--tls-key)")
    _check_pair(tls.cert, tls.key, "tls.cert", "tls.key (--tls-key)")
    ca = None
    if tls.client_ca is not None:
        ca = _read(tls.client_ca, "tls.client_ca (--tls-client-ca)")
        _check_ca(tls.client_ca, "tls.client_ca (--tls-client-ca)")
    return ServerPEM(cert=cert, key=key, client_ca=ca, require_client_auth=tls.mutual)


def load_client_tls(tls: ClientTLS) -> ClientPEM | None:
    """The checked PEM material of ``tls``, or None when the channel is plaintext.

    Raises:
        TLSConfigError: as :func:`load_server_tls`, naming the ``flag_prefix`` flags.
    """
    if not tls.active:
        return None
    flag = tls.flag_prefix
    ca = None
    if tls.ca is not None:
        ca = _read(tls.ca, f"{flag}-ca")
        _check_ca(tls.ca, f"{flag}-ca")
    cert = key = None
    if tls.cert is not None and tls.key is not None:
        cert = _read(tls.cert, f"{flag}-cert")
        key = _read(tls.key, f"{flag}-key")
        _check_pair(tls.cert, tls.key, f"{flag}-cert", f"{flag}-key")
    return ClientPEM(ca=ca, cert=cert, key=key, server_name=tls.server_name)


class RateLimiter:
    """Token buckets per client identity: O(1) time per request, at most ``max_clients`` buckets.

    Each client's bucket holds up to ``burst`` tokens and refills at ``rate_per_s``; a request
    takes one token or is refused with the time until one is there. Buckets live in an LRU
    (``OrderedDict``): a request moves its client's bucket to the end, a new client beyond
    ``max_clients`` drops the least recently seen one.

    Args:
        rate_per_s: sustained requests per second per client (> 0).
        burst: bucket size (>= 1).
        max_clients: buckets kept.
        clock: seconds, monotonic (tests may pass their own).
    """

    def __init__(self, *, rate_per_s: float, burst: int, max_clients: int = 10_000,
                 clock=time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("RateLimiter needs rate_per_s > 0, burst >= 1, max_clients >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # client -> [tokens, last refill]
        self.allowed = 0
        self.refused = 0

    def _bucket(self, client: str) -> list[float]:
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
            bucket = self._buckets[client] = [float(self.burst), now]
        else:
            self._buckets.move_to_end(client)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_s)
            bucket[1] = now
        return bucket

    def reserve(self, client: str) -> float:
        """Take a token for ``client`` even into debt: the seconds to wait before using it (0.0: now).

        For the messages of a stream, which are paced rather than refused: the stream waits, and
        until the debt is paid back the client's new calls are refused (:meth:`acquire`)."""
        bucket = self._bucket(client)
        bucket[0] -= 1.0
        self.allowed += 1
        return 0.0 if bucket[0] >= 0.0 else -bucket[0] / self.rate_per_s

    def acquire(self, client: str) -> float:
        """Take a token for ``client``: 0.0 when allowed, else the seconds until one is there."""
        bucket = self._bucket(client)
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            self.allowed += 1
            return 0.0
        self.refused += 1
        return (1.0 - bucket[0]) / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)
