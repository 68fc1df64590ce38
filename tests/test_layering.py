"""The code's one-way rules hold (``scripts/check_imports.py``: no import circle, no private name
crossing a file, no file over 500 lines), and the checker itself finds each kind of violation in a
small tree written for the purpose, so the first test can fail."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


CLEAN = {
    "trainer/__init__.py": "",
    "trainer/low.py": """
        class Store:
            def _flush(self):
                return 1

            def save(self):
                return self._flush()


        def _helper():
            return 2


        def public():
            return _helper()
        """,
    "trainer/high.py": """
        from typing import TYPE_CHECKING

        from trainer.low import Store, public

        if TYPE_CHECKING:
            from trainer import low


        def run(store: Store):
            return store.save() + public()
        """,
}


def test_the_repository_keeps_the_rules(checker):
    assert checker.violations() == []


def test_a_clean_tree_reports_nothing(checker, tmp_path):
    assert checker.violations(_tree(tmp_path, CLEAN)) == []


def test_each_kind_of_violation_is_reported(checker, tmp_path):
    root = _tree(tmp_path, {
        **CLEAN,
        # a circle through a function-local import
        "trainer/a.py": "import trainer.b\n",
        "trainer/b.py": "def late():\n    from trainer import a\n    return a\n",
        # a private name imported from another file
        "trainer/c.py": "from trainer.low import _helper\n",
        # a private method of another file's class, called on its object
        "trainer/d.py": "def poke(store):\n    return store._flush()\n",
        # a file over the limit
        "bench/__init__.py": "",
        "bench/long.py": "x = 1\n" * (checker.MAX_LINES + 1),
    })
    problems = checker.violations(root)
    assert "import circle: trainer.a <-> trainer.b" in problems
    assert any(p.startswith("trainer/c.py:1: private name _helper of trainer.low") for p in problems), problems
    assert any(p.startswith("trainer/d.py:2: private attribute _flush") for p in problems), problems
    assert f"bench/long.py: {checker.MAX_LINES + 1} lines (at most {checker.MAX_LINES})" in problems
    assert len(problems) == 4, problems
