"""OpenTelemetry tracing: off by default, one setting (``observability.tracing``) turns it on.

    ranker-svc serve ... --tracing otlp      # OTLP/gRPC; OTEL_EXPORTER_OTLP_ENDPOINT (default
                                             # localhost:4317), OTEL_TRACES_SAMPLER, ... as usual
    ranker-svc serve ... --tracing console --tracing-file spans.jsonl    # one JSON span per line

Off (the default), :func:`span` returns one shared no-op context manager and :func:`enabled` is
False, so instrumented code pays one global read; the OpenTelemetry packages are not even
imported. On, spans come from this module's own ``TracerProvider`` (``configure`` with
``install_global=True`` also makes it the global one, for libraries that use the global API).

Spans of one request (their names):
- ``exitrank.v1.Ranker/Rank`` (server), its children ``ranker.retrieval`` (context and titles),
  ``exitrank.v1.Retriever/GetContext`` / ``GetItems`` (client), ``ranker.score`` (batch wait and
  model work);
- in the retriever ``exitrank.v1.Retriever/GetContext`` (server), children ``redis.pipeline``
  (one per Redis round trip).

The W3C trace context (``traceparent``, ``tracestate``) travels in gRPC metadata: servers read it
in :func:`start_server_span`, clients add :func:`inject`'s pairs (``context.outgoing_metadata``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from exitrank.observability.config import TRACING_MODES

_TRACE_KEYS = ("traceparent", "tracestate")
_NOOP = contextlib.nullcontext()

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None
_propagator: Any = None
_out: IO[str] | None = None


def enabled() -> bool:
    return _tracer is not None


def configure(mode: str, *, service_name: str, file: Path | None = None, exporter: Any = None,
              install_global: bool = False) -> None:
    """Turn tracing on (``console``/``otlp``) or off (``none``), replacing an earlier setup.

    Args:
        mode: one of ``none``, ``console``, ``otlp``.
        service_name: the resource's ``service.name`` unless ``OTEL_SERVICE_NAME`` is set.
        file: where ``console`` appends spans (one JSON object per line); None: stderr.
        exporter: a ``SpanExporter`` to use instead, exported synchronously (tests pass an
            ``InMemorySpanExporter``); turns tracing on whatever ``mode`` is.
        install_global: also make the provider OpenTelemetry's global one (once per process).
    """
    global _tracer, _provider, _propagator, _out
    if mode not in TRACING_MODES:
        raise ValueError(f"observability.tracing must be one of {', '.join(TRACING_MODES)}, got {mode!r}")
    shutdown()
    if mode == "none" and exporter is None:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif mode == "console":
        # a debugging aid: synchronous, so a span is in the file once it has ended
        _out = open(file, "a", buffering=1, encoding="utf-8") if file is not None else None  # noqa: SIM115
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
            out=_out or sys.stderr, formatter=lambda s: s.to_json(indent=None) + "\n")))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if install_global:
        trace.set_tracer_provider(provider)
    _provider, _propagator = provider, TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("exitrank")


def shutdown() -> None:
    """Flush and stop the exporter (a no-op when tracing is off)."""
    global _tracer, _provider, _out
    provider, out = _provider, _out
    _tracer = _provider = _out = None
    if provider is not None:
        provider.shutdown()
    if out is not None:
        out.close()


def _kind(kind: str) -> Any:
    from opentelemetry.trace import SpanKind

    return {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT, "server": SpanKind.SERVER}[kind]


def span(name: str, *, kind: str = "internal", attributes: Mapping[str, Any] | None = None) -> Any:
    """A context manager: a child span of the current one while tracing is on, else a no-op
    (``with span(...) as s``: ``s`` is the span, or None when off)."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, kind=_kind(kind), attributes=attributes)


def start_server_span(name: str, metadata: Iterable[tuple[str, Any]] | None,
                      attributes: Mapping[str, Any] | None = None) -> Any:
    """Start a server span continuing the caller's trace (``traceparent`` in ``metadata``) and
    make it current for the rest of this task; None when tracing is off.

    The context is attached and never detached: each gRPC call runs in its own task, and a
    streaming handler may be closed from elsewhere, where a detach would fail. End the span with
    :func:`end_span`.
    """
    if _tracer is None:
        return None
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    carrier = {key: value for key, value in metadata or () if key in _TRACE_KEYS}
    parent = _propagator.extract(carrier)
    server_span = _tracer.start_span(name, context=parent, kind=_kind("server"), attributes=attributes)
    otel_context.attach(trace.set_span_in_context(server_span, parent))
    return server_span


def start_client_span(name: str) -> Any:
    """A client span, child of the current one, not made current (a call whose end a callback
    sees); None when tracing is off. Send :func:`inject` of it, end it with :func:`end_span`."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, kind=_kind("client"), attributes={"rpc.system": "grpc"})


def end_span(any_span: Any, code: str, *, error: bool) -> None:
    """Record the call's gRPC status on the span and end it."""
    from opentelemetry.trace import Status, StatusCode

    any_span.set_attribute("rpc.grpc.status_code", code)
    if error:
        any_span.set_status(Status(StatusCode.ERROR, code))
    any_span.end()


def inject(of_span: Any = None) -> list[tuple[str, str]]:
    """``traceparent``/``tracestate`` of ``of_span`` (default: the current span); empty when
    tracing is off or there is no span."""
    if _tracer is None:
        return []
    from opentelemetry import trace

    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=None if of_span is None else trace.set_span_in_context(of_span))
    return list(carrier.items())


def current_trace_id() -> str | None:
    """The current span's 32-hex-digit trace id (None when off or no span is current)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
