"""``python -m exitrank.client load``: a data set directory into a running retriever, resumably.

    python -m exitrank.client load 127.0.0.1:50051 --data data/synth
    python -m exitrank.client load 127.0.0.1:50051 --data data/synth --restart   # send everything again

1. ``DIR/items.jsonl`` (``{"item_id", "title", "attributes"?}`` per line) through ``UpsertItems``,
2. then ``DIR/interactions.jsonl`` (``{"user_id", "item_id", "rating"?, "timestamp_ms"?}``) through
   ``Ingest`` (the layout of ``docs/architecture.md``, what ``trainer data import``/``synth`` write),

each streamed in calls of ``--batch`` lines, with a progress bar on stderr (``--no-progress``: none).
The last line of stdout is a JSON summary: per file the lines sent, accepted, rejected and skipped,
and the retriever's first reasons for refusing rows.

**Resuming.** After every acknowledged call the number of lines done per file, and the SHA-256 of
those lines, go to a small state file (``--state``, default ``DIR/.exitrank-load.json``), keyed by
the retriever's address. A run that stopped (Ctrl-C; a retriever that went away: exit 1; a line that
is not a row: exit 2 naming ``file:line``) continues where it stopped when started again: the lines
acknowledged before are skipped, as long as they are unchanged (lines appended or fixed after them
do not matter). ``--restart`` sends everything again. Sending a line twice is harmless: an upsert
replaces the item with itself, and the retriever applies a repeated interaction (same user, item
and time) once.

**Shedding.** A retriever that sheds load (RESOURCE_EXHAUSTED: its per-client rate, or its ingest
backlog at ``index.max_stream_backlog`` while its consumers catch up) gets the same call again after
a pause that doubles from ``BACKOFF_S`` up to ``MAX_PAUSE_S``, for at most ``--max-wait`` seconds in
a row (default 300; then exit 1, and a rerun resumes); the summary counts the pauses (``backoffs``).

Only the standard library, ``tqdm`` and the client are used: no service code.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exitrank.client.errors import Overloaded
from exitrank.client.models import IngestSummary, Interaction, Item
from exitrank.client.sync import RetrieverClient

ITEMS, INTERACTIONS = "items.jsonl", "interactions.jsonl"
STATE_FILE = ".exitrank-load.json"
DEFAULT_BATCH = 1000
MAX_ERRORS = 10  # refusal reasons kept in the summary
BACKOFF_S, MAX_PAUSE_S = 0.2, 5.0  # the first and the longest pause after a RESOURCE_EXHAUSTED


class LoadError(ValueError):
    """The data set cannot be read (a missing file, a line that is not a row); the message names it."""


@dataclass
class FileProgress:
    """What happened to one file in this run (``skipped``: lines acknowledged by an earlier run)."""

    lines: int = 0
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    backoffs: int = 0  # calls sent again after the retriever shed them
    errors: list[str] = field(default_factory=list)

    def add(self, summary: IngestSummary, sent: int) -> None:
        self.sent += sent
        self.accepted += summary.accepted
        self.rejected += summary.rejected
        self.errors += list(summary.errors)[: MAX_ERRORS - len(self.errors)]

    def to_json(self) -> dict:
        return {"lines": self.lines, "sent": self.sent, "accepted": self.accepted, "rejected": self.rejected,
                "skipped": self.skipped, "backoffs": self.backoffs, "errors": self.errors}


class LoadState:
    """Lines acknowledged per (retriever address, file), with the SHA-256 of those lines' bytes."""

    def __init__(self, path: Path, target: str) -> None:
        self.path, self.target = path, target
        try:
            self._all: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            self._all = {}

    def done(self, file: Path) -> int:
        """Lines of ``file`` already acknowledged, when they are unchanged since (else 0)."""
        entry = self._all.get(self.target, {}).get(file.name) or {}
        lines = int(entry.get("lines", 0))
        if lines <= 0:
            return 0
        digest, read = hashlib.sha256(), 0
        with file.open("rb") as data:
            for raw in data:
                digest.update(raw)
                read += 1
                if read == lines:
                    break
        return lines if read == lines and digest.hexdigest() == entry.get("sha256") else 0

    def record(self, file: Path, lines: int, sha256: str) -> None:
        self._all.setdefault(self.target, {})[file.name] = {"lines": lines, "sha256": sha256}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self._all, indent=1) + "\n")
        os.replace(tmp, self.path)  # a reader never sees half a file

    def forget(self) -> None:
        self._all.pop(self.target, None)


def _item(row: dict) -> Item:
    return Item(item_id=str(row["item_id"]), title=str(row.get("title", "")),
                attributes={str(k): str(v) for k, v in (row.get("attributes") or {}).items()})


def _interaction(row: dict) -> Interaction:
    stamp = row.get("timestamp_ms")
    return Interaction(user_id=str(row["user_id"]), item_id=str(row["item_id"]), rating=float(row.get("rating", 1.0)),
                       timestamp_ms=None if stamp is None else int(stamp))


def count_lines(file: Path) -> int:
    with file.open("rb") as data:
        return sum(1 for _ in data)


@dataclass(frozen=True)
class LoadOptions:
    """Flags of ``load``: the data directory, the calls' size and deadline, the state file, progress."""

    data: Path
    batch: int = DEFAULT_BATCH
    timeout_s: float = 60.0
    state: Path | None = None  # None: DATA/.exitrank-load.json
    restart: bool = False
    progress: bool = True
    max_wait_s: float = 300.0  # longest run of pauses while the retriever sheds load


def load(target: str, options: LoadOptions, *, client: RetrieverClient | None = None) -> dict:
    """Upserts the catalog, then ingests the interactions; returns the summary (see the module docstring).

    Raises:
        LoadError: the directory or a line of it is unusable (nothing is sent for a missing file).
        exitrank.client.ExitrankError: a call failed for good (what was acknowledged stays recorded).
    """
    data = Path(options.data)
    files = [(data / ITEMS, _item, "upsert_items"), (data / INTERACTIONS, _interaction, "ingest")]
    for file, _, _ in files:
        if not file.is_file():
            raise LoadError(f"{file} is missing: --data must be a data set directory with {ITEMS} and "
                            f"{INTERACTIONS} (trainer data synth / trainer data import write one)")
    if options.batch < 1:
        raise LoadError(f"--batch must be >= 1, got {options.batch}")
    state = LoadState(options.state or data / STATE_FILE, target)
    if options.restart:
        state.forget()
    own = client is None
    client = client or RetrieverClient(target, timeout=options.timeout_s)
    report: dict[str, Any] = {"target": target, "data": str(data)}
    try:
        for file, convert, method in files:
            report[file.stem] = _send(file, convert, getattr(client, method), state, options).to_json()
    finally:
        if own:
            client.close()
    report["accepted"] = sum(report[f.stem]["accepted"] for f, _, _ in files)
    report["rejected"] = sum(report[f.stem]["rejected"] for f, _, _ in files)
    return report


def _send(file: Path, convert: Callable[[dict], Any], call: Callable[..., IngestSummary], state: LoadState,
          options: LoadOptions) -> FileProgress:
    from tqdm import tqdm  # noqa: PLC0415 - only for this command

    progress = FileProgress(lines=count_lines(file))
    done = progress.skipped = min(state.done(file), progress.lines)
    bar = tqdm(total=progress.lines, initial=done, desc=file.name, unit="row", disable=not options.progress,
               file=sys.stderr)
    batch: list[Any] = []
    last_line, digest = done, hashlib.sha256()  # digest: of every line up to last_line

    def flush() -> None:
        summary = send_shed_aware(lambda: call(batch, batch_size=len(batch), timeout=options.timeout_s),
                                  progress, options.max_wait_s)
        progress.add(summary, len(batch))
        state.record(file, last_line, digest.hexdigest())  # acknowledged: a rerun starts after it
        bar.update(last_line - bar.n)
        batch.clear()

    try:
        with file.open("rb") as lines:
            for number, raw in enumerate(lines, 1):
                digest.update(raw)
                if number <= done:
                    continue
                last_line = number
                if raw.strip():
                    batch.append(parse_line(file, number, raw, convert))
                if len(batch) >= options.batch:
                    flush()
        if batch:
            flush()
        elif last_line > done:  # only blank lines since the last call
            state.record(file, last_line, digest.hexdigest())
            bar.update(last_line - bar.n)
    finally:
        bar.close()
    return progress


def send_shed_aware(send: Callable[[], IngestSummary], progress: FileProgress, max_wait_s: float) -> IngestSummary:
    """``send()``, made again after a growing pause while the retriever sheds it (module docstring).

    Raises:
        exitrank.client.Overloaded: still shed after ``max_wait_s`` seconds of pauses.
    """
    pause, waited = BACKOFF_S, 0.0
    while True:
        try:
            return send()
        except Overloaded:
            if waited + pause > max_wait_s:
                raise
        progress.backoffs += 1
        time.sleep(pause)  # a client's backoff: the server asked for less
        waited, pause = waited + pause, min(2 * pause, MAX_PAUSE_S)


def parse_line(file: Path, number: int, line: bytes, convert: Callable[[dict], Any]) -> Any:
    """One JSON line as a row.

    Raises:
        LoadError: the line is not a JSON object with the row's fields; names ``file:number``.
    """
    try:
        return convert(json.loads(line.strip()))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise LoadError(f"{file}:{number}: not a row of {file.name} ({what})") from None
