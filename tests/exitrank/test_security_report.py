"""``tests.support.reliability`` and ``scripts/reliability_table.py``: rows only from tests that passed, every
area's files in one table, the table spliced between RELIABILITY.md's markers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.reliability import BEGIN, END, load_rows, recording, splice, table

ROOT = Path(__file__).resolve().parents[2]


def test_a_failing_test_leaves_no_row_and_a_passing_one_replaces_its_old_row(tmp_path):
    with recording("t.py::a", "TLS", directory=tmp_path) as row:
        row.sent, row.refused, row.measured = 3, 1, "first"
    with pytest.raises(AssertionError), recording("t.py::a", "TLS", directory=tmp_path) as row:
        raise AssertionError("the test failed")
    assert load_rows(tmp_path) == []  # the stale row went with the failure
    with recording("t.py::a", "TLS", directory=tmp_path) as row:
        row.sent, row.measured = 5, "second | piped"
    (only,) = load_rows(tmp_path)
    assert (only.sent, only.refused, only.measured, only.klass) == (5, 0, "second | piped", "TLS")


def test_rows_of_any_area_are_tabulated_in_order(tmp_path):
    for test, klass, area in [("f.py::restart", "Redis restart", "faults"), ("s.py::b", "rate limit", "security"),
                              ("s.py::a", "TLS", "security"), ("z.py::z", "zzz", "chaos")]:
        with recording(test, klass, area=area, directory=tmp_path) as row:
            row.sent, row.refused = 2, 1
    rows = load_rows(tmp_path)
    assert [(r.area, r.klass) for r in rows] == [("security", "TLS"), ("security", "rate limit"),
                                                ("faults", "Redis restart"), ("chaos", "zzz")]
    text = table(rows)
    assert text.splitlines()[0].startswith("| area | class | test |") and "`f.py::restart` | 2 | 1 |" in text
    doc = f"intro\n{BEGIN}\nold\n{END}\nafter\n"
    assert splice(doc, "NEW") == f"intro\n{BEGIN}\nNEW\n{END}\nafter\n"
    with pytest.raises(ValueError, match="markers"):
        splice("no markers", "NEW")


def test_the_script_writes_the_table_and_checks_required_classes(tmp_path):
    with recording("s.py::a", "TLS", directory=tmp_path / "r") as row:
        row.sent, row.refused, row.measured = 4, 2, "measured text"
    doc = tmp_path / "R.md"
    doc.write_text(f"# R\n{BEGIN}\n{END}\n")
    script = [sys.executable, str(ROOT / "scripts" / "reliability_table.py"), "--results", str(tmp_path / "r")]
    assert subprocess.run([*script, "--write", str(doc)], capture_output=True).returncode == 0
    assert "| security | TLS | `s.py::a` | 4 | 2 | measured text |" in doc.read_text()
    missing = subprocess.run([*script, "--require", "security=2"], capture_output=True, text=True)
    assert missing.returncode == 1 and "1 classes recorded, 2 required" in missing.stderr
    empty = subprocess.run([*script[:2], "--results", str(tmp_path / "none")], capture_output=True, text=True)
    assert empty.returncode == 1 and "run the tests first" in empty.stderr
