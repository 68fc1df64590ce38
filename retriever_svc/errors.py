"""The retriever's errors: one hierarchy, mapped to gRPC statuses at one point (``servicer.py``).

Exception tree (status each maps to)::

    RetrievalError                     base of everything the core raises on purpose
    ├── InvalidArgument(field, msg)    INVALID_ARGUMENT: a request field is out of range or malformed
    ├── UnknownUser(user_id, reason)   NOT_FOUND: no embedding / no history for the user
    ├── StoreUnavailable               UNAVAILABLE: Redis cannot be reached or refused the command
    │   └── StoreRefusesWrites         UNAVAILABLE: Redis answers reads but refuses writes (full disk,
    │                                  ``maxmemory`` reached, a read-only replica)
    ├── EmbeddingsError                FAILED_PRECONDITION: an embedding artifact or version is unusable
    ├── ReplyTooLarge                  RESOURCE_EXHAUSTED: the answer would exceed limits.max_send_bytes
    └── BacklogFull                    RESOURCE_EXHAUSTED: the ingest stream holds index.max_stream_backlog

Core code raises these and never imports grpc; third-party errors (redis-py) are converted to
``StoreUnavailable`` at one boundary, ``store.py``. A client reads :meth:`RetrievalError.public_message`
only: ``StoreUnavailable``'s own text carries redis-py's error (addresses, socket paths, Redis's
replies) for the log, never for the caller.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class of the retriever's errors."""

    def public_message(self) -> str:
        """What a client may read (the servicer sends this, never ``str(exc)`` of an internal error)."""
        return str(self)


class InvalidArgument(RetrievalError):
    """A request field is invalid; ``field`` names it (``k``, ``item_ids[3]``, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownUser(RetrievalError):
    """The retriever has no embedding (NearestUsers) or knows nothing (GetContext) of a user."""

    def __init__(self, user_id: str, reason: str) -> None:
        super().__init__(f"unknown user {user_id!r}: {reason}")
        self.user_id = user_id


class StoreUnavailable(RetrievalError):
    """Redis could not be reached, timed out, or refused a command; retrying later may work."""

    def public_message(self) -> str:
        return "the retriever's store (Redis) cannot answer now; retry with backoff"


class StoreRefusesWrites(StoreUnavailable):
    """Redis answers but refuses writes: its disk is full (``MISCONF``, or ``NOREPLICAS`` from an
    embedded server restarted read-only, ``exitrank.redis_server``), it is out of memory (``OOM``) or
    a read-only replica; reads go on, writes may work again later."""

    def public_message(self) -> str:
        return "the retriever cannot store new data now (reads still answer); retry with backoff"


class EmbeddingsError(RetrievalError):
    """An embedding artifact or stored version is missing, inconsistent or of the wrong shape."""


class ReplyTooLarge(RetrievalError):
    """The answer, estimated from stored sizes before it is read, would exceed the reply limit."""


class BacklogFull(RetrievalError):
    """The ingest stream holds its bound of unapplied events; Ingest takes more once the consumers
    have caught up (a client retries with backoff, as for any RESOURCE_EXHAUSTED)."""
