"""Print or refresh the reliability table from the tests' result files (``tests.support.reliability``).

    .venv/bin/python -m pytest -q -p no:cacheprovider tests    # tests write runs/reliability/*.json
    .venv/bin/python scripts/reliability_table.py               # print the table
    .venv/bin/python scripts/reliability_table.py --write RELIABILITY.md
    .venv/bin/python scripts/reliability_table.py --require security=8   # fail if rows are missing

Every ``*.json`` in the results directory becomes a row, whichever test wrote it: a new area of
guarantees (fault injection, ...) only has to record its tests with ``tests.support.reliability.recording``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.reliability import load_rows, results_dir, splice, table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=None, help="result files (default runs/reliability)")
    parser.add_argument("--write", type=Path, help="replace the table between the markers of this file")
    parser.add_argument("--require", action="append", default=[], metavar="AREA=N",
                        help="fail unless AREA has at least N distinct classes recorded")
    args = parser.parse_args(argv)
    directory = args.results or results_dir()
    rows = load_rows(directory)
    if not rows:
        print(f"no result files in {directory}: run the tests first", file=sys.stderr)
        return 1
    classes = Counter()
    for area, klass in {(r.area, r.klass) for r in rows}:
        classes[area] += 1
    for want in args.require:
        area, _, count = want.partition("=")
        if classes[area] < int(count or 1):
            print(f"{area}: {classes[area]} classes recorded, {count} required", file=sys.stderr)
            return 1
    generated = table(rows)
    if args.write:
        args.write.write_text(splice(args.write.read_text(), generated))
        print(f"{args.write}: {len(rows)} rows", file=sys.stderr)
    else:
        print(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
