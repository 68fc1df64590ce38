"""Process logging: text or JSON lines, each carrying the request id of the call it belongs to.

``--log-format json`` writes one object per line::

    {"time": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "exitrank.access",
     "message": "exitrank.v1.Ranker/Rank OK 12.4 ms", "request_id": "f3c1...", "rpc":
     "exitrank.v1.Ranker/Rank", "status": "OK", "duration_ms": 12.41}

``request_id`` and ``rpc`` come from ``context.py``'s contextvars (set by the server
interceptor), ``trace_id`` from the current span while tracing is on, ``status`` and
``duration_ms`` (access lines) and any other ``extra=`` fields from the record; an exception
goes under ``exception``. ``--log-format text`` keeps the classic line and appends
``request_id=...`` and the extra fields as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO

from exitrank.observability import tracing
from exitrank.observability.config import ObservabilityConfig
from exitrank.observability.context import request_id_var, rpc_var

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_CONTEXT = ("request_id", "rpc", "trace_id")


class ContextFilter(logging.Filter):
    """Copies the request id, RPC name and trace id of the current call onto every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "rpc", None) is None:
            record.rpc = rpc_var.get()
        if getattr(record, "trace_id", None) is None:
            record.trace_id = tracing.current_trace_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (keys in the module docstring); values that JSON lacks become str."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _CONTEXT and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic ``time LEVEL logger: message`` line, then ``key=value`` for the request id,
    trace id and ``extra=`` fields (JSON for structured values)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [(key, getattr(record, key, None)) for key in ("request_id", "trace_id")]
        fields += [(k, v) for k, v in record.__dict__.items()
                   if k not in _STANDARD and k not in _CONTEXT and not k.startswith("_")]
        extra = " ".join(f"{k}={v if isinstance(v, str | int | float) else json.dumps(v, default=str)}"
                         for k, v in fields if v is not None)
        return f"{line} {extra}" if extra else line


def configure_logging(config: ObservabilityConfig, *, stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root logger's handlers by one on ``stream`` (default stderr) in the configured
    format and level; returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(config.log_level)
    return handler
