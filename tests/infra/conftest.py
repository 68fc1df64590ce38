"""Helpers for the deployment-file tests: the repository's paths, console scripts, CLI parsers."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
_VAR = re.compile(r"\$\((\w+)\)")


@pytest.fixture(scope="session")
def infra() -> Path:
    return INFRA


@pytest.fixture(scope="session")
def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: name -> ``module:function``."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="session")
def expand():
    """expand(text, env): Kubernetes' ``$(VAR)`` substitution; fails on a reference env lacks."""

    def run(text: str, env: dict[str, str]) -> str:
        missing = [m for m in _VAR.findall(text) if m not in env]
        assert not missing, f"{text!r} refers to undefined variables {missing}"
        return _VAR.sub(lambda m: env[m.group(1)], text)

    return run


@pytest.fixture
def trainer_commands(monkeypatch):
    """trainer_commands(env)[name] -> the ``trainer`` CLI's subcommand parser, built with exactly
    ``env``'s EXITRANK_* variables set (flags take their defaults from the environment)."""
    import os

    from trainer.__main__ import build_parser

    def run(env: dict[str, str]) -> dict[str, argparse.ArgumentParser]:
        for name in [n for n in os.environ if n.startswith("EXITRANK_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(actions[0].choices)

    return run


@pytest.fixture
def check_ranker_argv(monkeypatch):
    """check_ranker_argv(argv, env) -> RankerConfig: ``ranker-svc`` argv parsed as the server would,
    with exactly ``env``'s EXITRANK_RANKER_* variables set."""
    from ranker_svc.server import parse_args

    def run(argv: list[str], env: dict[str, str]):
        import os

        for var in [v for v in os.environ if v.startswith("EXITRANK_RANKER_")]:
            monkeypatch.delenv(var)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        return parse_args(argv)

    return run


@pytest.fixture
def check_retriever_argv(monkeypatch):
    """check_retriever_argv(argv, env) -> RetrieverConfig, with ``env`` (e.g. EXITRANK_REDIS_URL) set."""
    from retriever_svc.config import RetrieverConfig

    def run(argv: list[str], env: dict[str, str] | None = None):
        monkeypatch.delenv("EXITRANK_REDIS_URL", raising=False)
        for var, value in (env or {}).items():
            monkeypatch.setenv(var, value)
        return RetrieverConfig.from_args(argv)

    return run
