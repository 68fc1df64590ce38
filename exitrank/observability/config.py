"""``ObservabilityConfig``: the ``observability`` section both services share, and its CLI flags.

    ranker-svc serve ... --metrics-port 9452 --log-format json --tracing otlp
    retriever-svc serve ... --metrics-port 9451 --access-log all --tracing console --tracing-file spans.jsonl
    EXITRANK_RANKER_OBSERVABILITY_METRICS_PORT=9452 ranker-svc serve ...   # the ranker's env overrides

Metrics are off unless a port is given (``--metrics-port``): a fixed default port would collide
when several replicas or test servers share a host. 9451 (retriever) and 9452 (ranker) are the
suggested ports, next to the gRPC ports 50051/50052; 0 binds a free port, printed at start.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ACCESS_LOGS = ("off", "errors", "all")
TRACING_MODES = ("none", "console", "otlp")
SUGGESTED_METRICS_PORTS = {"retriever": 9451, "ranker": 9452}


@dataclass(frozen=True, slots=True, kw_only=True)
class ObservabilityConfig:
    """Metrics endpoint, logs and tracing of one service process.

    Args:
        metrics_port: Prometheus ``/metrics`` HTTP port; None (default): no endpoint and no
            metrics work on the hot path; 0: a free port (printed once serving).
        metrics_host: address the metrics endpoint binds; None: the gRPC server's host.
        log_format: ``text`` (default) or ``json`` (one object per line: time, level, logger,
            message, request_id, rpc, and status/duration_ms on access lines).
        log_level: the root logger's level.
        access_log: one line per call: ``off``, ``errors`` (default: calls ending in a server-side
            fault, INTERNAL/UNKNOWN/UNAVAILABLE/DEADLINE_EXCEEDED/...) or ``all`` (INFO per call).
        tracing: ``none`` (default, no cost), ``console`` (spans as JSON lines to ``tracing_file``
            or stderr) or ``otlp`` (OTLP/gRPC; endpoint, headers and sampler from the standard
            ``OTEL_EXPORTER_OTLP_*`` / ``OTEL_TRACES_SAMPLER`` environment variables).
        tracing_file: where ``console`` writes spans (appended); None: stderr.
        service_name: the trace resource's ``service.name`` (``OTEL_SERVICE_NAME`` wins);
            empty: ``exitrank-<service>``.
    """

    metrics_port: int | None = None
    metrics_host: str | None = None
    log_format: str = "text"
    log_level: str = "INFO"
    access_log: str = "errors"
    tracing: str = "none"
    tracing_file: Path | None = None
    service_name: str = ""

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"observability.metrics_port must be in 0..65535 (0: any free port), "
                             f"got {self.metrics_port}")
        for name, allowed in (("log_format", LOG_FORMATS), ("access_log", ACCESS_LOGS),
                              ("tracing", TRACING_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"observability.{name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        object.__setattr__(self, "log_level", str(self.log_level).upper())
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"observability.log_level must be one of {', '.join(LOG_LEVELS)}, "
                             f"got {self.log_level!r}")
        if self.tracing_file is not None and not isinstance(self.tracing_file, Path):
            object.__setattr__(self, "tracing_file", Path(self.tracing_file))


def add_flags(parser: argparse.ArgumentParser, *, service: str) -> None:
    """The ``observability`` flags of ``<service>-svc serve`` (each unset flag keeps the config)."""
    group = parser.add_argument_group("observability")
    suggested = SUGGESTED_METRICS_PORTS.get(service, 0)
    group.add_argument("--metrics-port", type=int,
                       help=f"Prometheus /metrics port (default: off; suggested {suggested}; 0: a free port)")
    group.add_argument("--metrics-host", help="metrics bind address (default: the gRPC --host)")
    group.add_argument("--log-format", choices=LOG_FORMATS, help="text (default) or json lines")
    group.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="default INFO")
    group.add_argument("--access-log", choices=ACCESS_LOGS,
                       help="a log line per call: off, errors (default: server faults), all")
    group.add_argument("--tracing", choices=TRACING_MODES,
                       help="OpenTelemetry tracing: none (default), console, otlp (OTEL_* env vars)")
    group.add_argument("--tracing-file", type=Path, help="where --tracing console appends spans")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of :func:`add_flags` that were given, as ``ObservabilityConfig`` fields."""
    names = ("metrics_port", "metrics_host", "log_format", "log_level", "access_log", "tracing",
             "tracing_file")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
