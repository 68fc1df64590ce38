"""The client's error hierarchy: every failed call raises one of these, never a bare ``grpc.RpcError``.

::

    ExitrankError(code, message, method, attempts)
    ├── InvalidRequest       INVALID_ARGUMENT, OUT_OF_RANGE   fix the request; never retried
    ├── NotFound             NOT_FOUND                        unknown user or items
    ├── Unavailable          UNAVAILABLE                      retried with backoff; raised once retries ran out
    ├── DeadlineExceeded     DEADLINE_EXCEEDED                the call's deadline passed (retries included)
    ├── Overloaded           RESOURCE_EXHAUSTED               the server sheds load or rate-limits this caller
    ├── FailedPrecondition   FAILED_PRECONDITION              not set up yet (no artifact, no embeddings)
    ├── AccessDenied         UNAUTHENTICATED, PERMISSION_DENIED
    └── ServerError          INTERNAL, UNKNOWN and every other code

Each carries the gRPC status ``code``, the server's ``message``, the RPC ``method`` and how many
``attempts`` were made, so a caller can log or branch without touching gRPC types.
"""

from __future__ import annotations

import grpc


class ExitrankError(Exception):
    """A failed RPC: its gRPC status code, the server's message, the method and the attempts made."""

    def __init__(self, *, code: grpc.StatusCode, message: str, method: str, attempts: int = 1) -> None:
        super().__init__(f"{method}: {code.name}: {message} (after {attempts} attempt{'s' * (attempts != 1)})")
        self.code = code
        self.message = message
        self.method = method
        self.attempts = attempts


class InvalidRequest(ExitrankError):
    """The server refused a field of the request; the message names it."""


class NotFound(ExitrankError):
    """The user, or some candidate items, are unknown to the server."""


class Unavailable(ExitrankError):
    """The server could not be reached (or could not reach its dependencies), retries included."""


class DeadlineExceeded(ExitrankError):
    """The call's deadline passed before an answer came back."""


class Overloaded(ExitrankError):
    """The server refused the call to protect itself (queue full, rate limit)."""


class FailedPrecondition(ExitrankError):
    """The server is running but not ready for this call (missing artifact or embeddings)."""


class AccessDenied(ExitrankError):
    """The server refused the caller's identity or its rights."""


class ServerError(ExitrankError):
    """The server failed unexpectedly (INTERNAL, UNKNOWN, ...); its log says more."""


_BY_CODE: dict[grpc.StatusCode, type[ExitrankError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: AccessDenied,
    grpc.StatusCode.PERMISSION_DENIED: AccessDenied,
}


def error_for(code: grpc.StatusCode, message: str, *, method: str, attempts: int = 1) -> ExitrankError:
    """The exception class for ``code`` (the single mapping point), instantiated."""
    kind = _BY_CODE.get(code, ServerError)
    return kind(code=code, message=message, method=method, attempts=attempts)


def from_rpc_error(exc: grpc.RpcError, *, method: str, attempts: int) -> ExitrankError:
    """Converts a sync or aio ``grpc.RpcError`` (both expose ``code()`` and ``details()``)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "", method=method, attempts=attempts)
