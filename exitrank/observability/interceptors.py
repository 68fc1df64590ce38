"""gRPC (grpc.aio) interceptors: request id, metrics, access line and trace span of every call.

Server side, :class:`ServerTelemetry` (first in the server's interceptor list) for each call:
1. takes ``x-request-id`` from the caller's metadata (or makes one), sets it and the RPC name in
   ``context.py``'s contextvars for every log line of the call, and returns it in the trailing
   metadata (on errors too);
2. when tracing is on, starts a server span continuing the caller's ``traceparent``;
3. at the end records ``grpc_server_handling_seconds{..., grpc_code}``, ends the span with the
   status, and writes the access line (``observability.access_log``).

Client side, :class:`ClientTelemetry` (``grpc.aio.insecure_channel(target, interceptors=[...])``)
sends the current request id (a new one outside a served call) and the trace context of a client
span per call. The ranker's retriever client adds the same metadata per call instead
(``context.outgoing_metadata``), so it works on any channel it is given.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import grpc

from exitrank.observability import tracing
from exitrank.observability.context import (
    REQUEST_ID_KEY,
    new_request_id,
    request_id_from,
    request_id_var,
    rpc_var,
)
from exitrank.observability.metrics import RpcMetrics, ServiceMetrics
from exitrank.server_streams import write_responses

access_log = logging.getLogger("exitrank.access")
# statuses that are the server's fault: logged under access_log "errors". RESOURCE_EXHAUSTED (rate
# limits, a full batcher) is not: a line per refused call would add load exactly when there is too
# much; grpc_server_handling_seconds counts those.
SERVER_FAULTS = frozenset({"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "UNIMPLEMENTED"})


class _Method:
    """Per-method state: names, span attributes, metrics children, the last wrapped handler."""

    __slots__ = ("name", "metrics", "attributes", "handler", "wrapped")

    def __init__(self, method: str, rpc_type: str, metrics: ServiceMetrics | None) -> None:
        self.name = method.lstrip("/")
        service, _, short = self.name.rpartition("/")
        self.metrics: RpcMetrics | None = None if metrics is None else metrics.rpc(method, rpc_type)
        self.attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": short}
        self.handler: Any = None
        self.wrapped: Any = None


class _Call(NamedTuple):
    """What :meth:`ServerTelemetry._begin` took from a call for its end: the span and the peer."""

    span: Any
    peer: str


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    return ("bidi_stream" if handler.request_streaming else "server_stream") if handler.response_streaming \
        else ("client_stream" if handler.request_streaming else "unary")


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the caller went away (or its deadline)
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = context.code()
    if code is not None:
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    return "OK" if exc is None else "UNKNOWN"


class ServerTelemetry(grpc.aio.ServerInterceptor):
    """Request id, metrics, access line and server span of every call (module docstring).

    Args:
        metrics: the server's registry (None: record no metrics).
        access_log: ``off``, ``errors`` (calls ending in :data:`SERVER_FAULTS`) or ``all``.
    """

    def __init__(self, *, metrics: ServiceMetrics | None = None, access_log: str = "errors") -> None:
        self._metrics = metrics
        self._access = access_log
        self._methods: dict[str, _Method] = {}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = self._methods.get(details.method)
        if method is None:
            method = self._methods[details.method] = _Method(details.method, _rpc_type(handler), self._metrics)
        if method.handler is not handler:  # handlers are static per method; wrap each one once
            method.handler, method.wrapped = handler, self._wrap(method, handler)
        return method.wrapped

    def _wrap(self, method: _Method, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        serde = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if handler.response_streaming:
            inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
            make = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
                else grpc.unary_stream_rpc_method_handler

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> None:
                # a coroutine writing the responses, never a generator grpc could leave open past
                # the call's end (exitrank.server_streams): _finish runs while the call is alive
                call, start = self._begin(method, context), time.perf_counter()
                error: BaseException | None = None
                try:
                    result = inner(request, context)
                    if hasattr(result, "__aiter__"):
                        await write_responses(result, context)
                    elif inspect.isawaitable(result):  # writes with context.write
                        await result
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._finish(method, context, error, start, call)

            return make(streaming, **serde)
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
        make = grpc.stream_unary_rpc_method_handler if handler.request_streaming \
            else grpc.unary_unary_rpc_method_handler

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call, start = self._begin(method, context), time.perf_counter()
            error: BaseException | None = None
            try:
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._finish(method, context, error, start, call)

        return make(unary, **serde)

    def _begin(self, method: _Method, context: grpc.aio.ServicerContext) -> _Call:
        metadata = context.invocation_metadata()
        request_id = request_id_from(metadata)
        request_id_var.set(request_id)  # this call's task only: grpc.aio runs each call in its own
        rpc_var.set(method.name)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        if method.metrics is not None:
            method.metrics.started.inc()
        span = tracing.start_server_span(method.name, metadata, method.attributes) if tracing.enabled() else None
        # the peer is read now, while gRPC core holds the call: never from _finish (module docstring)
        return _Call(span=span, peer=context.peer() if self._access != "off" else "")

    def _finish(self, method: _Method, context: grpc.aio.ServicerContext, error: BaseException | None,
                start: float, call: _Call) -> None:
        seconds = time.perf_counter() - start
        code = _code(context, error)
        if method.metrics is not None:
            method.metrics.observe(code, seconds)
        if call.span is not None:
            tracing.end_span(call.span, code, error=code != "OK")
        fault = code in SERVER_FAULTS
        if self._access == "all" or (fault and self._access == "errors"):
            ms = seconds * 1e3
            access_log.log(logging.WARNING if fault else logging.INFO, "%s %s %.1f ms", method.name, code, ms,
                           extra={"status": code, "duration_ms": round(ms, 3), "peer": call.peer})


class ClientTelemetry(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                      grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    """Sends ``x-request-id`` (the served call's, else a new one; an id already in the call's
    metadata is kept) and, when tracing is on, the ``traceparent`` of a client span per call."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        details, span = self._details(client_call_details)
        call = await continuation(details, request)
        if span is None:
            return call
        try:
            await call
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        tracing.end_span(span, code, error=code != "OK")
        return call

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        details, span = self._details(client_call_details)
        return self._end_when_done(await continuation(details, request), span)

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        details, span = self._details(client_call_details)
        return self._end_when_done(await continuation(details, request_iterator), span)

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        details, span = self._details(client_call_details)
        return self._end_when_done(await continuation(details, request_iterator), span)

    @staticmethod
    def _details(details: grpc.aio.ClientCallDetails) -> tuple[grpc.aio.ClientCallDetails, Any]:
        metadata = list(details.metadata or ())
        if not any(key == REQUEST_ID_KEY for key, _ in metadata):
            metadata.append((REQUEST_ID_KEY, request_id_var.get() or new_request_id()))
        span = None
        if tracing.enabled():
            method = details.method.decode() if isinstance(details.method, bytes) else details.method
            span = tracing.start_client_span(method.lstrip("/"))
            metadata.extend(tracing.inject(span))
        return grpc.aio.ClientCallDetails(details.method, details.timeout, grpc.aio.Metadata(*metadata),
                                          details.credentials, details.wait_for_ready), span

    @staticmethod
    def _end_when_done(call: Any, span: Any) -> Any:
        if span is not None:
            async def end() -> None:
                code = await call.code()
                tracing.end_span(span, code.name, error=code != grpc.StatusCode.OK)

            call.add_done_callback(lambda _: asyncio.ensure_future(end()))
        return call


def with_telemetry(server_kwargs: dict[str, Any], telemetry: ServerTelemetry) -> dict[str, Any]:
    """``grpc.aio.server`` keyword arguments with ``telemetry`` as the first interceptor, so it
    times, counts and ids the calls later interceptors (limits) refuse too."""
    return {**server_kwargs, "interceptors": [telemetry, *server_kwargs.get("interceptors", ())]}
