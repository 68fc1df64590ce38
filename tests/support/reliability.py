"""Reliability results: each test that proves a guarantee writes one JSON file, a script tabulates them.

A test measures while it runs and records only once its assertions have passed::

    def test_mtls_refuses_foreign_clients(request, ...):
        with recording(request.node.nodeid, "mTLS refusal") as row:
            ...                                   # send calls, count them
            row.sent, row.refused = 9, 6
            row.measured = f"{no_cert} calls without a certificate refused (UNAVAILABLE), ..."

Entering ``recording`` deletes the test's previous file, so a failing test leaves no stale row.
Files go to ``$EXITRANK_RELIABILITY_DIR`` (default ``runs/reliability`` under the working
directory), one per test: ``{"area", "class", "test", "sent", "refused", "measured", "seconds",
"recorded_at"}``. ``scripts/reliability_table.py`` turns every file there, whatever test or area
wrote it, into the table of ``RELIABILITY.md`` (:func:`table`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENV_DIR = "EXITRANK_RELIABILITY_DIR"
# rows of these areas come first, in this order; any other area follows alphabetically
AREA_ORDER = ("security", "faults", "bad input")
# within an area, known classes in this order, then the others alphabetically
CLASS_ORDER = ("TLS", "TLS bad config", "mTLS refusal", "authorisation", "Redis auth", "Embedded Redis", "Redis TLS",
               "message size", "rate limit", "concurrency", "safe loading", "prompt injection",
               "Redis restart", "retriever down", "SIGTERM drain", "overload", "malformed flood", "hostile mix", "soak",
               "retriever fields", "ranker fields", "resource caps", "cancelled stream", "fuzzing", "bad artifact")
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"


def results_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or Path.cwd() / "runs" / "reliability")


@dataclass
class Row:
    """One measured guarantee: how many requests were sent and how many the system refused."""

    test: str
    klass: str
    area: str = "security"
    sent: int = 0
    refused: int = 0
    measured: str = ""
    seconds: float = 0.0
    recorded_at: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
                             .isoformat(timespec="seconds"))

    def to_json(self) -> dict:
        row = asdict(self)
        row["class"] = row.pop("klass")
        return row

    @classmethod
    def from_json(cls, data: dict) -> "Row":
        data = dict(data)
        data["klass"] = data.pop("class")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _path(test: str, directory: Path) -> Path:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", test).strip("_")[:120]
    return directory / f"{stem}-{hashlib.sha1(test.encode()).hexdigest()[:8]}.json"


@contextlib.contextmanager
def recording(test: str, klass: str, *, area: str = "security",
              directory: Path | None = None) -> Iterator[Row]:
    """A :class:`Row` to fill in; written to the results directory only if the block succeeds."""
    directory = directory or results_dir()
    path = _path(test, directory)
    path.unlink(missing_ok=True)
    row = Row(test=test, klass=klass, area=area)
    start = time.perf_counter()
    yield row
    row.seconds = round(time.perf_counter() - start, 3)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row.to_json(), indent=1) + "\n")
    tmp.replace(path)


def load_rows(directory: Path | None = None) -> list[Row]:
    """Every result file of ``directory``, ordered by area and class (``AREA_ORDER``, ``CLASS_ORDER``
    first, then alphabetically), then by test."""
    directory = directory or results_dir()
    rows = [Row.from_json(json.loads(p.read_text())) for p in sorted(directory.glob("*.json"))]

    def key(row: Row) -> tuple:
        area = AREA_ORDER.index(row.area) if row.area in AREA_ORDER else len(AREA_ORDER)
        klass = CLASS_ORDER.index(row.klass) if row.klass in CLASS_ORDER else len(CLASS_ORDER)
        return (area, row.area, klass, row.klass, row.test)

    return sorted(rows, key=key)


def table(rows: list[Row]) -> str:
    """The Markdown table of ``rows``."""
    lines = ["| area | class | test | sent | refused | measured |",
             "|---|---|---|---:|---:|---|"]
    for row in rows:
        cells = [row.area, row.klass, f"`{row.test}`", str(row.sent), str(row.refused), row.measured]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def splice(document: str, generated: str) -> str:
    """``document`` with the text between the table markers replaced by ``generated``."""
    if BEGIN not in document or END not in document:
        raise ValueError(f"the document has no {BEGIN} ... {END} markers")
    head, _, rest = document.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{generated}\n{END}{tail}"
