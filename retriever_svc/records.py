"""Plain records the core reads and answers (no grpc), and the request validation rules.

The limits are the public contract's (protos/exitrank/v1/*.proto); the id rule, shared with the ranker,
lives in ``exitrank.limits``. Each check raises ``InvalidArgument`` naming the field and saying what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from exitrank.limits import id_problem, version_problem
from retriever_svc.errors import InvalidArgument

MAX_TITLE_CHARS = 512
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_VALUE_CHARS = 1024
NEAREST_K_RANGE = (1, 1000)
CONTEXT_K_RANGE = (0, 100)
MAX_HISTORY_RANGE = (1, 200)
MAX_GET_ITEMS = 10_000
# the largest stored catalog entry a valid item makes: its JSON, each character at most 6 bytes (\uXXXX)
MAX_ENTRY_BYTES = 64 + 6 * (MAX_TITLE_CHARS + MAX_ATTRIBUTES * (128 + MAX_ATTRIBUTE_VALUE_CHARS + 8))
MAX_REPORTED_ERRORS = 10
MAX_TIMESTAMP_MS = 2**53  # Redis keeps history timestamps as double scores: larger ones would not round-trip
# how far ahead of the retriever's clock an event may be (index.max_future_s): histories are ordered
# by time and a prompt shows the newest, so one event dated years ahead would stay on top for good
DEFAULT_MAX_FUTURE_S = 3600.0


@dataclass(frozen=True, slots=True)
class Interaction:
    """One event of the interaction stream: the contract's ``Interaction`` as the core validates and
    stores it (the client's ``exitrank.client.Interaction`` may leave the time out; the trainer's data
    set rows are ``trainer.data.rows.InteractionRow``)."""

    user_id: str
    item_id: str
    rating: float = 1.0
    timestamp_ms: int = 0


@dataclass(frozen=True, slots=True)
class CatalogItem:
    """A catalog entry: the title shown to the LLM and free-form attributes."""

    item_id: str
    title: str
    attributes: dict[str, str] = field(default_factory=dict)
    embedding: Any = field(default=None, compare=False, repr=False)  # (d,) when asked for, else None


@dataclass(frozen=True, slots=True)
class IngestResult:
    """How many records a stream call stored and refused, and why the first few were refused."""

    accepted: int = 0
    rejected: int = 0
    errors: tuple[str, ...] = ()

    def __add__(self, other: IngestResult) -> IngestResult:
        errors = (self.errors + other.errors)[:MAX_REPORTED_ERRORS]
        return IngestResult(self.accepted + other.accepted, self.rejected + other.rejected, errors)


@dataclass(frozen=True, slots=True)
class Neighbors:
    """Nearest users, best first, as (user_id, cosine), and the embedding version that answered."""

    neighbors: tuple[tuple[str, float], ...]
    embedding_version: str


def check_id(field_name: str, value: object) -> str:
    """The contract's id rule (exitrank.limits.id_problem), refused as this service's InvalidArgument."""
    problem = id_problem(value)
    if problem is not None:
        raise InvalidArgument(field_name, problem)
    return value  # type: ignore[return-value]  # id_problem accepted it: a str


def check_ids(field_name: str, ids: Sequence[str], limit: int) -> None:
    """At most ``limit`` ids, each valid (named ``field[j]``) and none twice: a copy would be read
    and sent again, so a request of copies of one large item could cost the reply's size many times."""
    if len(ids) > limit:
        raise InvalidArgument(field_name, f"at most {limit} ids, got {len(ids)}")
    seen: set[str] = set()
    for j, value in enumerate(ids):
        check_id(f"{field_name}[{j}]", value)
        if value in seen:
            raise InvalidArgument(f"{field_name}[{j}]", f"duplicate id {value!r}; ask for each item once")
        seen.add(value)


def check_range(field_name: str, value: int, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise InvalidArgument(field_name, f"must be in {low}..{high}, got {value}")
    return value


def check_version(field_name: str, value: str) -> str:
    """An embedding version as requests carry it ("" = the current one; ``exitrank.limits.version_problem``)."""
    problem = version_problem(value)
    if problem is not None:
        raise InvalidArgument(field_name, problem)
    return value


def check_interaction(event: Interaction, *, now_ms: int | None = None,
                      max_future_s: float = DEFAULT_MAX_FUTURE_S) -> Interaction:
    """The event, or InvalidArgument naming its bad field. ``now_ms`` (ms since the epoch; None: no
    clock check) bounds ``timestamp_ms`` to at most ``max_future_s`` ahead of it."""
    check_id("user_id", event.user_id)
    check_id("item_id", event.item_id)
    if not math.isfinite(event.rating):
        raise InvalidArgument("rating", f"must be finite, got {event.rating}")
    if not 0 <= event.timestamp_ms <= MAX_TIMESTAMP_MS:
        raise InvalidArgument("timestamp_ms", f"must be in 0..{MAX_TIMESTAMP_MS} (ms since the epoch), "
                              f"got {event.timestamp_ms}")
    if now_ms is not None and event.timestamp_ms > now_ms + max_future_s * 1000:
        raise InvalidArgument("timestamp_ms", f"must not be more than {max_future_s:g} s ahead of the retriever's "
                              f"clock (index.max_future_s), got {event.timestamp_ms} "
                              f"({(event.timestamp_ms - now_ms) / 1000:.0f} s ahead); send the event's real time")
    return event


def check_item(item: CatalogItem) -> CatalogItem:
    check_id("item_id", item.item_id)
    if not item.title or len(item.title) > MAX_TITLE_CHARS:
        raise InvalidArgument("title", f"must be 1..{MAX_TITLE_CHARS} characters")
    if len(item.attributes) > MAX_ATTRIBUTES:
        raise InvalidArgument("attributes", f"must have at most {MAX_ATTRIBUTES} entries")
    for key, value in item.attributes.items():
        check_id(f"attributes[{key!r}]", key)
        if len(value) > MAX_ATTRIBUTE_VALUE_CHARS:
            raise InvalidArgument(
                f"attributes[{key!r}]", f"value must be at most {MAX_ATTRIBUTE_VALUE_CHARS} chars"
            )
    return item


def refusal(kind: str, index: int, error: InvalidArgument) -> str:
    """The IngestSummary line for a refused record, e.g. "interaction 3: rating must be finite"."""
    return f"{kind} {index}: {error.field} {error.message}"
