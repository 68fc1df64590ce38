"""The ranker's error hierarchy; ``servicer.py`` maps it to gRPC statuses at one point.

::

    RankerError                      (INTERNAL)
    ├── InvalidArgument(field, msg)  INVALID_ARGUMENT  a request field (or exit policy) is out of range
    ├── UnknownItems(item_ids)       NOT_FOUND         candidates the catalog does not hold
    ├── ContextUnavailable           UNAVAILABLE       the retriever cannot resolve candidate titles
    │   ├── EmbeddingVersionUnavailable FAILED_PRECONDITION the retriever no longer serves the
    │   │                              embedding version this ranker's soft tokens were trained on
    │   └── RetrieverOverloaded      RESOURCE_EXHAUSTED the retriever refused for load: passed on as
    │                                  such, so clients back off instead of retrying (UNAVAILABLE)
    ├── Overloaded                   RESOURCE_EXHAUSTED too many requests are already waiting
    ├── DeadlineExceeded             DEADLINE_EXCEEDED the caller's deadline passed before scoring
    └── ArtifactError                FAILED_PRECONDITION the ranker artifact is missing or inconsistent

``InvalidArgument`` also subclasses ``ValueError`` so that a policy checked at start-up reads naturally
outside gRPC. A bad config value is not a request error: it is ``exitrank.config_sources.ConfigError``,
as in the retriever. Messages always say what to change.
"""

from __future__ import annotations

from collections.abc import Sequence


class RankerError(Exception):
    """Base of every error the ranker raises on purpose."""


class InvalidArgument(RankerError, ValueError):
    """A field is out of range; ``field`` is its request (or config) name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownItems(RankerError):
    """Candidate items that the catalog does not know."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        shown = ", ".join(repr(i) for i in list(item_ids)[:20])
        more = f" (and {len(item_ids) - 20} more)" if len(item_ids) > 20 else ""
        super().__init__(
            f"candidate_item_ids: unknown items {shown}{more}; load them into the retriever's catalog "
            "(`python -m exitrank.client load RETRIEVER --data DIR`, or Retriever.UpsertItems) or remove them "
            "from the request"
        )
        self.item_ids = tuple(item_ids)


class ContextUnavailable(RankerError):
    """The context source (retriever) cannot answer at all."""


class EmbeddingVersionUnavailable(ContextUnavailable):
    """The retriever cannot give the vectors of the version the ranker was trained with."""

    def __init__(self, version: str, detail: str) -> None:
        super().__init__(f"this ranker reads the LightGCN vectors of version {version!r} (its collaborative soft "
                         f"tokens were trained on them), and the retriever cannot give them: {detail}. Serve the "
                         "retriever with the same artifacts as the ranker (`retriever-svc serve --artifacts` the "
                         "ranker's directory, or `trainer publish` them), or serve a ranker trained with the retriever's "
                         "embeddings")
        self.version = version
        self.detail = detail


class RetrieverOverloaded(ContextUnavailable):
    """The retriever answered RESOURCE_EXHAUSTED (its rate or concurrency limit, or a reply too large)."""


class Overloaded(RankerError):
    """More requests are queued than ``batching.max_pending_requests`` allows."""


class DeadlineExceeded(RankerError):
    """The caller's deadline passed before the work could finish."""


class ArtifactError(RankerError):
    """The ranker artifact is missing, incomplete or inconsistent with its tokenizer."""
