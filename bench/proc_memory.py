"""Process memory from ``/proc`` (Linux): a process's resident set and one of its children's pid."""

from __future__ import annotations

from pathlib import Path


def rss_mb(pid: int) -> float:
    """The process's resident memory (``VmRSS``) in MiB, to 0.1; nan when ``/proc`` lacks it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def child_pid(pid: int, name: str) -> int | None:
    """The pid of ``pid``'s child process whose name contains ``name`` (redis-server under the retriever)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if name in Path(f"/proc/{child}/comm").read_text():
                return int(child)
    return None
