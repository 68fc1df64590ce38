"""Metrics, structured logs, request ids and tracing, one implementation for both services.

| module | what | imports grpc |
|---|---|---|
| ``config.py`` | ``ObservabilityConfig`` (the ``observability`` section of both configs), CLI flags | no |
| ``context.py`` | request id / RPC name contextvars, ``outgoing_metadata()`` for calls made on a request's behalf | no |
| ``logs.py`` | text or JSON-lines logging; every line carries the current request id | no |
| ``settings.py`` | the effective config as JSON, secrets masked, logged once at start | no |
| ``tracing.py`` | OpenTelemetry spans, off by default (then free), W3C trace context | no |
| ``metrics.py`` | per-server Prometheus registries and the ``/metrics`` endpoint | no |
| ``interceptors.py`` | the grpc.aio server interceptor (and a client one) tying the above to each call | yes |

Core classes never see any of this directly: the ranker core reports to a ``RankObserver``
(``RankerMetrics`` implements it), the retriever core answers ``stats()`` when scraped.

    enable_crash_stacks()                                               # first thing in main()
    shutdown = setup_process(config.observability, service="ranker")   # in main(), once
"""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Callable

from exitrank.observability import tracing
from exitrank.observability.config import ObservabilityConfig
from exitrank.observability.logs import configure_logging

__all__ = ["ObservabilityConfig", "enable_crash_stacks", "setup_process"]


def setup_process(config: ObservabilityConfig, *, service: str) -> Callable[[], None]:
    """Process-wide setup from the config (root logging, tracing); returns the shutdown to call
    at exit (it flushes pending spans)."""
    configure_logging(config)
    tracing.configure(config.tracing, service_name=config.service_name or f"exitrank-{service}",
                      file=config.tracing_file, install_global=True)
    return tracing.shutdown


def enable_crash_stacks() -> None:
    """On a fatal signal (SIGSEGV, SIGFPE, SIGABRT, SIGBUS, SIGILL) write every thread's Python
    stack to stderr (the service's log) before the process dies: a native crash must leave a trace.
    A ``sys.stderr`` without a file descriptor (``main`` called in process under a capturing test
    runner) falls back to the process's own stderr."""
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation: no fileno()
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
