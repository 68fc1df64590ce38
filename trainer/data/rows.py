"""The rows of a canonical data set directory (``trainer.data.dataset`` reads and writes them).

``InteractionRow`` is one line of ``interactions.jsonl``: every field required, as the file stores it.
It is not the services' interaction: ``retriever_svc.records.Interaction`` is one validated event of
the retriever's stream, and ``exitrank.client.Interaction`` is what a client sends (``timestamp_ms``
None meaning now). The data set's rows are read in bulk (millions for some data sets), hence a
``NamedTuple``.

The rows live apart from the reader so that ``samples`` (which builds CTR samples from rows and the
meta) and ``dataset`` (which loads a directory and builds its samples) import one way:
dataset -> samples -> rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple


class Item(NamedTuple):
    """One line of ``items.jsonl``."""

    item_id: str
    title: str
    attributes: dict[str, str] = {}


class InteractionRow(NamedTuple):
    """One line of ``interactions.jsonl``: a user's rating of an item at a time (ms since the epoch)."""

    user_id: str
    item_id: str
    rating: float
    timestamp_ms: int


@dataclass(frozen=True)
class DatasetMeta:
    """What ``dataset.json`` holds. ``sample_rule`` is a ``SampleRule`` as a dict (or None)."""

    name: str = "dataset"
    format: str = "canonical"
    implicit: bool = False
    rating_threshold: float = 4.0
    sample_rule: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "DatasetMeta":
        names = ("name", "format", "implicit", "rating_threshold", "sample_rule", "extra")
        return cls(**{k: row[k] for k in names if k in row})
