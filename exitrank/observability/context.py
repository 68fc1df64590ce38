"""The request id and RPC name of the call being served, in contextvars (no grpc here).

The server interceptor (``interceptors.py``) takes the id from the caller's ``x-request-id``
metadata, or makes one, and sets it here before the handler runs; every task the handler starts
copies it, so each log line of the request carries it (``logs.py``), and :func:`outgoing_metadata`
hands it (with the W3C trace context when tracing is on) to the calls the request makes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from contextvars import ContextVar

from exitrank.observability import tracing

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_LEN = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/=+-]{1,%d}" % MAX_REQUEST_ID_LEN)

request_id_var: ContextVar[str | None] = ContextVar("exitrank_request_id", default=None)
rpc_var: ContextVar[str | None] = ContextVar("exitrank_rpc", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: str | bytes | None) -> str | None:
    """``value`` when it is usable as a request id (1..128 of ``A-Za-z0-9._:/=+-``: safe in logs,
    metadata and file names), else None."""
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return value
    return None


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's ``x-request-id`` when valid, else a new id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return valid_request_id(value) or new_request_id()
    return new_request_id()


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for a call made on behalf of the current request: its ``x-request-id`` and, when
    tracing is on, ``traceparent``/``tracestate`` of the current span (call inside its span)."""
    request_id = request_id_var.get()
    pairs: list[tuple[str, str]] = [] if request_id is None else [(REQUEST_ID_KEY, request_id)]
    if tracing.enabled():
        pairs.extend(tracing.inject())
    return tuple(pairs)
