"""The gRPC half of ``exitrank.security``: credentials, server options, the limiting interceptor.

Both services build their server the same way::

    pem = load_server_tls(config.tls)                    # checked at start-up (TLSConfigError)
    server = grpc.aio.server(**server_kwargs(config.limits, mutual=config.tls.mutual))
    port = bind(server, f"{host}:{port}", pem)           # add_secure_port when TLS is on

and the ranker's retriever channel is ``open_channel(target, load_client_tls(...))``. Health checks
and reflection are served on the same port, so they run over TLS whenever the service does.

:class:`ServerGuard` (a ``grpc.aio.ServerInterceptor``) admits each call before any work, in this
order (each refusal counted by reason: ``ServerGuard.refusals``, and the ``on_refusal`` hook that
feeds the metric ``exitrank_server_refused_total``):

* **draining** (:func:`drain_and_stop`, on SIGTERM): from :meth:`ServerGuard.start_draining` on,
  every call the server begins is refused with UNAVAILABLE "shutting down" (health checks
  excepted: they answer NOT_SERVING), including calls gRPC had received but not yet begun, which
  ``server.stop`` alone would end CANCELLED; calls already running finish within the grace.
* **who may call what** (``auth.policy``, ``exitrank.access``): the caller is recognised by its
  verified client certificate's names or its bearer token; no identity is UNAUTHENTICATED, an
  identity the policy does not let call the method PERMISSION_DENIED (the messages name the
  identity and the method, nothing else). Without a policy every caller may call everything.
* **per-client rate limit**: one token per call and one per further message of a client stream,
  from the bucket of the caller (:func:`client_identity`; ``token:<identity>`` for token callers);
  a refused call ends with RESOURCE_EXHAUSTED, the retry delay in the message and in trailing
  metadata ``retry-after-ms``; a stream's messages beyond the bucket are paced (the stream waits
  for its tokens, so HTTP/2 flow control slows the sender) and the client's new calls are refused
  until it has paid. Health checks are exempt (load balancers poll them).
* **per-client concurrency**: at most ``limits.max_concurrent_per_client`` calls in progress per
  client, more are RESOURCE_EXHAUSTED at once. The caller's key is set in
  ``exitrank.security.caller_var`` for the service (the ranker's per-client share of its queue).
* **message size**: gRPC's own ``grpc.max_receive_message_length`` is set to twice
  ``max_receive_bytes`` (the hard cut-off, gRPC's wording); between the limit and the cut-off
  the guard's request deserializer, which runs in gRPC's receive path before admission, only
  measures the bytes, and the call ends with RESOURCE_EXHAUSTED "request message of N bytes
  exceeds limits.max_receive_bytes=L (--max-receive-bytes)". Responses are capped by
  ``grpc.max_send_message_length``.
* **malformed requests**: parsing happens only after admission, in protobuf's C code; bytes that
  do not parse (invalid UTF-8 in a string field from a raw client, corrupt wire format), which
  gRPC would answer UNKNOWN, end with INVALID_ARGUMENT: naming the field for messages up to
  ``exitrank.wire.MAX_WALK_BYTES`` (a Python walk, ``malformed_field``), and "request: not a valid
  <Message> (invalid UTF-8 or wire format)" for larger ones, so a malformed 4 MiB request costs
  milliseconds, not seconds of the event loop. A client stream's messages are parsed one by one
  as they arrive.

Each method's wrapped handler is built once and cached, so the per-call cost is one dict look-up,
one ``context.peer()`` (or the certificate's names), a bucket update and a counter: O(1).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from google.protobuf.message import DecodeError

from exitrank.ports import GRPC_PORT_SETTING, PortInUse
from exitrank.access import BEARER_KEY, AccessPolicy
from exitrank.security import ClientPEM, Limits, RateLimiter, ServerPEM, caller_var
from exitrank.server_streams import write_responses
from exitrank.wire import malformed_field

log = logging.getLogger(__name__)
CLIENT_ID_KEY = "x-client-id"
RETRY_AFTER_KEY = "retry-after-ms"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
_CACHE_SIZE = 1024
DRAIN_SETTLE_S = 0.5  # how long a draining server keeps refusing before server.stop (see drain_and_stop)


def server_options(limits: Limits) -> list[tuple[str, int]]:
    """gRPC channel arguments of a server under ``limits`` (see the module docstring), and no port
    sharing: with ``SO_REUSEPORT`` a second server could bind a busy port (``exitrank.ports``)."""
    return [
        ("grpc.max_receive_message_length", 2 * limits.max_receive_bytes),
        ("grpc.max_send_message_length", limits.max_send_bytes),
        ("grpc.so_reuseport", 0),
    ]


def server_kwargs(limits: Limits, *, mutual: bool = False, access: AccessPolicy | None = None,
                  interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> dict[str, Any]:
    """Keyword arguments of ``grpc.aio.server``: the limit options and the guard first. Without an
    access policy a warning says that every client reaching the port may call every RPC."""
    if access is None:
        log.warning("no access policy (auth.policy, --auth-policy): every client that reaches this port may call "
                    "every RPC; set one to authorise callers per RPC (README: Who may call what)")
    return {"options": server_options(limits),
            "interceptors": [ServerGuard(limits, mutual=mutual, access=access), *interceptors]}


def bind(server: grpc.aio.Server, address: str, pem: ServerPEM | None, *,
         setting: str = GRPC_PORT_SETTING) -> int:
    """Add a TLS port (``pem``) or a plaintext one (None) at ``address``; the bound port.

    Raises:
        PortInUse: the port is taken (``setting`` names the option to change).
    """
    host, _, port = address.rpartition(":")
    try:
        if pem is None:
            return server.add_insecure_port(address)
        credentials = grpc.ssl_server_credentials(
            [(pem.key, pem.cert)], root_certificates=pem.client_ca,
            require_client_auth=pem.require_client_auth,
        )
        return server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # gRPC says "Failed to bind to address ...", whatever the cause
        raise PortInUse(host, int(port or 0), setting, "gRPC could not bind it") from exc


def channel_credentials(pem: ClientPEM) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=pem.ca, private_key=pem.key,
                                        certificate_chain=pem.cert)


def open_channel(target: str, pem: ClientPEM | None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target``: TLS with ``pem``, plaintext when None."""
    if pem is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    opts = list(options)
    if pem.server_name:
        opts.append(("grpc.ssl_target_name_override", pem.server_name))
    return grpc.aio.secure_channel(target, channel_credentials(pem), options=opts)


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.1:5000`` -> ``10.0.0.1``; ``ipv6:[::1]:5000`` -> ``::1``; others unchanged.

    The port is dropped: a client gets a new one per connection, so it must not buy a new bucket.
    """
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = rest.rpartition(":")[0] or rest
    return host.replace("%5B", "[").replace("%5D", "]").strip("[]")


def client_identity(context: grpc.aio.ServicerContext, *, mutual: bool, trust_client_id: bool) -> str:
    """Who a call counts against, in this order:

    1. ``cert:<subject>``: the verified client certificate's subject (mutual TLS only);
    2. ``id:<x-client-id>``: the metadata value, only with ``limits.trust_client_id``;
    3. ``addr:<host>``: the peer's IP address (without the port).
    """
    if mutual:
        auth = context.auth_context()
        subject = auth.get("x509_subject") or auth.get("x509_common_name")
        if subject:
            return "cert:" + subject[0].decode("utf-8", "replace")
    if trust_client_id:
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_ID_KEY and value:
                return "id:" + (value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return "addr:" + peer_host(context.peer())


def certificate_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The verified client certificate's subject alternative names and common name (mutual TLS)."""
    auth = context.auth_context()
    return [value.decode("utf-8", "replace")
            for key in ("x509_subject_alternative_name", "x509_common_name") for value in auth.get(key, ())]


def bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in context.invocation_metadata() or ():
        if key == BEARER_KEY:
            text = value if isinstance(value, str) else value.decode("utf-8", "replace")
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class _Oversized:
    """What the guard's deserializer returns instead of a message over the limit."""

    __slots__ = ("size", "limit")

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit


class _Refused(Exception):
    """A call the guard refuses: the status, the client-facing message, the metrics reason."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, trailing: tuple = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.reason, self.trailing = code, message, reason, trailing


class ServerGuard(grpc.aio.ServerInterceptor):
    """Authorises every call and enforces the limits before the service sees it (module docstring).

    Args:
        limits: the limits; ``rate_per_s`` 0 checks sizes only.
        mutual: the server verifies client certificates (identity by certificate subject).
        access: who may call what (``exitrank.access``); None: every caller may call every RPC.
        on_refusal: told ``(method, reason)`` of every refused call (metrics); reasons are
            ``draining``, ``unauthenticated``, ``permission_denied``, ``rate_limit``,
            ``concurrency``, ``oversized``, ``malformed``.
    """

    def __init__(self, limits: Limits, *, mutual: bool = False, access: AccessPolicy | None = None,
                 on_refusal: Callable[[str, str], None] | None = None) -> None:
        self.limits = limits
        self.mutual = mutual
        self.access = access
        self.on_refusal = on_refusal
        self.limiter = (RateLimiter(rate_per_s=limits.rate_per_s, burst=limits.bucket_size,
                                    max_clients=limits.max_clients) if limits.rate_per_s > 0 else None)
        self.draining = False
        self.refusals: collections.Counter[str] = collections.Counter()  # by reason
        self._calls: dict[str, int] = {}  # calls in progress per client (clients with none are dropped)
        self._cache: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    @property
    def oversized(self) -> int:
        return self.refusals["oversized"]

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        hit = self._cache.get(id(handler))
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = self._wrap(handler, handler_call_details.method)
        if len(self._cache) < _CACHE_SIZE:  # handlers are per method; never grow without bound
            self._cache[id(handler)] = (handler, wrapped)
        return wrapped

    def start_draining(self) -> None:
        """Refuse every call begun from now on with UNAVAILABLE (health checks excepted)."""
        self.draining = True

    def in_progress(self, client: str) -> int:
        """Calls ``client`` has in progress (counted against ``limits.max_concurrent_per_client``)."""
        return self._calls.get(client, 0)

    def _identify(self, method: str, context: grpc.aio.ServicerContext) -> str:
        """The client the call counts against; raises _Refused when the policy does not let it call."""
        access = self.access
        names = certificate_names(context) if self.mutual else []
        if access is None or access.is_open(method):
            return client_identity(context, mutual=self.mutual, trust_client_id=self.limits.trust_client_id)
        identity = access.by_certificate(names)
        client = None
        if identity is None:
            token = bearer_token(context)
            if token is not None:
                identity = access.by_token(token) if token else None
                if identity is None:
                    raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "the bearer token in the 'authorization' "
                                   "metadata is not valid for this server", "unauthenticated")
                client = f"token:{identity.name}"
            elif names:
                raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "the client certificate belongs to no identity "
                               "of this server's access policy (auth.policy)", "permission_denied")
            else:
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "this server requires a caller identity: a client "
                               "certificate (mutual TLS) or 'authorization: Bearer <token>' metadata", "unauthenticated")
        if not identity.may_call(method):
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                           f"identity {identity.name!r} may not call {method.lstrip('/')} (auth.policy)",
                           "permission_denied")
        return client or client_identity(context, mutual=self.mutual, trust_client_id=self.limits.trust_client_id)

    def _admit(self, method: str, context: grpc.aio.ServicerContext, exempt: bool) -> str | None:
        """Draining, then who the caller is and may it call this, then its rate and its calls in
        progress: the client the call now holds a slot of (None: not counted), or _Refused."""
        if self.draining and not exempt:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry on another replica "
                           "or after its restart", "draining")
        client = self._identify(method, context)
        caller_var.set(client)
        if exempt:
            return None
        if self.limiter is not None:
            wait_s = self.limiter.acquire(client)
            if wait_s:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"rate limit: client {client} exceeded {self.limits.rate_per_s:g} requests/s "
                               f"(burst {self.limiter.burst}); retry in {wait_s:.3f}s (limits.rate_per_s, --rate-limit)",
                               "rate_limit", ((RETRY_AFTER_KEY, str(max(1, round(wait_s * 1000)))),))
        cap, held = self.limits.max_concurrent_per_client, self._calls.get(client, 0)
        if cap and held >= cap:
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"client {client} already has {held} calls in progress "
                           "(limits.max_concurrent_per_client, --max-concurrent-per-client); retry with backoff",
                           "concurrency")
        self._calls[client] = held + 1
        return client

    def _release(self, client: str | None) -> None:
        if client is not None:
            left = self._calls[client] - 1
            if left:
                self._calls[client] = left
            else:
                del self._calls[client]

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str, refused: _Refused) -> None:
        self.refusals[refused.reason] += 1
        if self.on_refusal is not None:
            self.on_refusal(method, refused.reason)
        await context.abort(refused.code, refused.message, trailing_metadata=refused.trailing)

    def _parse(self, raw: Any, parse: Callable[[bytes], Any] | None) -> Any:
        """The request message of ``raw`` (C-speed protobuf parsing), or _Refused."""
        if type(raw) is _Oversized:
            if raw.limit == self.limits.max_receive_bytes:
                setting = f"limits.max_receive_bytes={raw.limit} (raise it with --max-receive-bytes)"
            else:
                setting = f"limits.max_stream_message_bytes={raw.limit}, the limit of one message of a stream"
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request message of {raw.size} bytes exceeds "
                           f"{setting}", "oversized")
        if parse is None:
            return raw
        try:
            return parse(raw)
        except DecodeError:
            descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
            reason = "request: not a valid protobuf message" if descriptor is None else malformed_field(raw, descriptor)
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, reason, "malformed") from None

    async def _checked(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str,
                       parse: Callable[[bytes], Any] | None, client: str | None) -> AsyncIterator[Any]:
        """A client stream's messages, each parsed as it arrives; each after the first takes a
        token of the client's rate (the call took one), waiting for it: a stream is paced, not cut."""
        first = True
        async for raw in requests:
            try:
                message = self._parse(raw, parse)
            except _Refused as refused:
                await self._refuse(context, method, refused)
            if not first and self.limiter is not None and client is not None:
                wait_s = self.limiter.reserve(client)
                if wait_s:
                    await asyncio.sleep(wait_s)
            first = False
            yield message

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        exempt = method.startswith(EXEMPT_PREFIXES)
        limit, parse = self.limits.max_receive_bytes, handler.request_deserializer
        if handler.request_streaming:
            limit = min(limit, self.limits.max_stream_message_bytes)

        def deserialize(raw: bytes) -> Any:  # in gRPC's receive path, before admission: the size only
            return _Oversized(len(raw), limit) if len(raw) > limit else raw

        if handler.request_streaming and handler.response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            log.warning("%s has a synchronous handler: limits are not applied to it", method)
            return handler
        streaming_in = handler.request_streaming
        streaming_out = inspect.isasyncgenfunction(behavior)

        async def guarded(request, context):
            try:
                client = self._admit(method, context, exempt)
            except _Refused as refused:
                await self._refuse(context, method, refused)
            try:
                if streaming_in:
                    request = self._checked(request, context, method, parse, client)
                else:
                    try:
                        request = self._parse(request, parse)
                    except _Refused as refused:
                        await self._refuse(context, method, refused)
                if streaming_out:  # driven here, closed within the call (exitrank.server_streams)
                    return await write_responses(behavior(request, context), context)
                return await behavior(request, context)
            finally:
                self._release(client)

        return factory(guarded, request_deserializer=deserialize, response_serializer=handler.response_serializer)


async def start_health_port(health_servicer: Any, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A second, plaintext gRPC server on ``host:port`` answering only ``grpc.health.v1`` from the
    service's own health servicer (``server.health_port``): kubelet's gRPC probes cannot speak TLS
    nor present a certificate. It serves nothing else, so it needs neither. Returns it and its port."""
    from grpc_health.v1 import health_pb2_grpc  # noqa: PLC0415 - only servers with a health port

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = bind(server, f"{host}:{port}", None, setting="server.health_port (--health-port)")  # PortInUse if taken
    await server.start()
    return server, bound


def find_guard(interceptors: Sequence[Any]) -> ServerGuard | None:
    """The :class:`ServerGuard` among a server's interceptors (``server_kwargs(...)["interceptors"]``)."""
    return next((i for i in interceptors if isinstance(i, ServerGuard)), None)


async def drain_and_stop(server: grpc.aio.Server, guard: ServerGuard | None, grace: float | None, *,
                         settle_s: float = DRAIN_SETTLE_S) -> None:
    """Stop ``server`` gracefully: new calls, and calls received but not yet begun, are refused with
    UNAVAILABLE by ``guard`` for ``settle_s`` (at most ``grace``), then ``server.stop(grace)`` lets
    the running ones finish. Without a guard: ``server.stop(grace)`` only."""
    if guard is not None:
        guard.start_draining()
        await asyncio.sleep(min(settle_s, grace if grace is not None else settle_s))
    await server.stop(grace)

