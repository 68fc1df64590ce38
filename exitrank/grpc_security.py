"""The gRPC half of ``exitrank.security``: credentials, server options, the limiting interceptor.

Both services build their server the same way::

    pem = load_server_tls(config.tls)                    # checked at start-up (TLSConfigError)
    server = grpc.aio.server(**server_kwargs(config.limits, mutual=config.tls.mutual))
    port = bind(server, f"{host}:{port}", pem)           # add_secure_port when TLS is on

and the ranker's retriever channel is ``open_channel(target, load_client_tls(...))``. Health checks
and reflection are served on the same port, so they run over TLS whenever the service does.

:class:`ServerGuard` (a ``grpc.aio.ServerInterceptor``) enforces :class:`~exitrank.security.Limits`:

* **message size**: gRPC's own ``grpc.max_receive_message_length`` is set to twice
  ``max_receive_bytes`` (the hard cut-off, gRPC's wording); between the limit and the cut-off
  the guard's request deserializer sees the raw bytes first and turns them into a marker, and
  the call ends with RESOURCE_EXHAUSTED "request message of N bytes exceeds
  limits.max_receive_bytes=L (--max-receive-bytes)" before any protobuf parsing. Responses are
  capped by ``grpc.max_send_message_length``.
* **malformed requests**: bytes that do not parse as the request message (a string field with
  invalid UTF-8 from a raw client, corrupt wire format), which gRPC would answer UNKNOWN, end
  with INVALID_ARGUMENT naming the field (``exitrank.wire.malformed_field``), before the servicer.
* **draining** (:func:`drain_and_stop`, on SIGTERM): from :meth:`ServerGuard.start_draining` on,
  every call the server begins is refused with UNAVAILABLE "shutting down" (health checks
  excepted: they answer NOT_SERVING), including calls gRPC had received but not yet begun, which
  ``server.stop`` alone would end CANCELLED; calls already running finish within the grace.
* **per-client rate limit**: one token per call (a stream is one call), from the bucket of the
  caller's identity (:func:`client_identity`); a refused call ends with RESOURCE_EXHAUSTED, a
  message with the retry delay, and trailing metadata ``retry-after-ms``. Health checks are
  exempt (load balancers poll them).

Each method's wrapped handler is built once and cached, so the per-call cost is one dict look-up,
one ``context.peer()`` and one bucket update: O(1).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from google.protobuf.message import DecodeError

from exitrank.ports import GRPC_PORT_SETTING, PortInUse
from exitrank.security import ClientPEM, Limits, RateLimiter, ServerPEM
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


def server_kwargs(limits: Limits, *, mutual: bool = False,
                  interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> dict[str, Any]:
    """Keyword arguments of ``grpc.aio.server``: the limit options and the guard first."""
    return {"options": server_options(limits),
            "interceptors": [ServerGuard(limits, mutual=mutual), *interceptors]}


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


class _Oversized:
    """What the guard's deserializer returns instead of a message over the limit."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _Malformed:
    """What the guard's deserializer returns instead of bytes that do not parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class ServerGuard(grpc.aio.ServerInterceptor):
    """Enforces message-size and per-client rate limits (see the module docstring).

    Args:
        limits: the limits; ``rate_per_s`` 0 checks sizes only.
        mutual: the server verifies client certificates (identity by certificate subject).
    """

    def __init__(self, limits: Limits, *, mutual: bool = False) -> None:
        self.limits = limits
        self.mutual = mutual
        self.limiter = (RateLimiter(rate_per_s=limits.rate_per_s, burst=limits.bucket_size,
                                    max_clients=limits.max_clients) if limits.rate_per_s > 0 else None)
        self.oversized = 0
        self.draining = False
        self._cache: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

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

    async def _admit(self, request: Any, context: grpc.aio.ServicerContext, limited: bool,
                     exempt: bool = False) -> None:
        if self.draining and not exempt:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the server is shutting down: retry on another replica or after its restart")
        if type(request) is _Oversized:
            await self._refuse_size(request, context)
        if type(request) is _Malformed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        if limited:
            client = client_identity(context, mutual=self.mutual, trust_client_id=self.limits.trust_client_id)
            wait_s = self.limiter.acquire(client)
            if wait_s:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"rate limit: client {client} exceeded {self.limits.rate_per_s:g} requests/s "
                    f"(burst {self.limiter.burst}); retry in {wait_s:.3f}s "
                    "(limits.rate_per_s, --rate-limit)",
                    trailing_metadata=((RETRY_AFTER_KEY, str(max(1, round(wait_s * 1000)))),),
                )

    async def _refuse_size(self, request: _Oversized, context: grpc.aio.ServicerContext) -> None:
        self.oversized += 1
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request message of {request.size} bytes exceeds limits.max_receive_bytes="
            f"{self.limits.max_receive_bytes} (raise it with --max-receive-bytes)",
        )

    async def _checked(self, requests: AsyncIterator[Any], context) -> AsyncIterator[Any]:
        async for request in requests:
            if type(request) is _Oversized:
                await self._refuse_size(request, context)
            if type(request) is _Malformed:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            yield request

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        exempt = method.startswith(EXEMPT_PREFIXES)
        limited = self.limiter is not None and not exempt
        limit, parse = self.limits.max_receive_bytes, handler.request_deserializer

        def deserialize(raw: bytes) -> Any:
            if len(raw) > limit:
                return _Oversized(len(raw))
            try:
                return parse(raw) if parse is not None else raw
            except DecodeError:
                descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
                return _Malformed(malformed_field(raw, descriptor) if descriptor is not None
                                  else "request: not a valid protobuf message")

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
        admit, checked = self._admit, self._checked
        streaming_in = handler.request_streaming

        if inspect.isasyncgenfunction(behavior):  # driven here, closed within the call (exitrank.server_streams)
            async def guarded(request, context):
                await admit(None if streaming_in else request, context, limited, exempt)
                await write_responses(behavior(checked(request, context) if streaming_in else request, context),
                                      context)
        else:
            async def guarded(request, context):
                await admit(None if streaming_in else request, context, limited, exempt)
                return await behavior(checked(request, context) if streaming_in else request, context)

        return factory(guarded, request_deserializer=deserialize,
                       response_serializer=handler.response_serializer)


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

