"""RetrieverConfig from CLI flags: sections, defaults, refusal of bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from retriever_svc.config import IndexConfig, RedisConfig, RetrieverConfig
from retriever_svc.server import main


def test_from_args_builds_every_section(tmp_path):
    cfg = RetrieverConfig.from_args(["serve", "--port", "0", "--artifacts", str(tmp_path),
                                     "--redis-url", "redis://127.0.0.1:1/0", "--index-kind", "hnsw",
                                     "--consumer", "replica-2"])
    assert cfg.server.port == 0 and cfg.server.host == "127.0.0.1"
    assert cfg.artifacts.dir == Path(tmp_path)
    assert cfg.redis.url == "redis://127.0.0.1:1/0" and cfg.redis.consumer == "replica-2"
    assert cfg.index.kind == "hnsw"
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # frozen


def test_defaults_use_embedded_redis(tmp_path, monkeypatch):
    monkeypatch.delenv("EXITRANK_REDIS_URL", raising=False)
    cfg = RetrieverConfig.from_args(["serve", "--port", "7", "--artifacts", "a",
                                     "--data-dir", str(tmp_path)])
    assert cfg.redis.url is None and cfg.redis.data_dir == tmp_path and cfg.index.kind == "auto"


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="index.kind"):
        IndexConfig(kind="ivf")
    with pytest.raises(ValueError, match="block_ms"):
        RedisConfig(block_ms=10_000, timeout_s=5)
    with pytest.raises(SystemExit):
        RetrieverConfig.from_args(["serve", "--port", "1"])  # --artifacts is required
    assert main(["serve", "--port", "70000", "--artifacts", "x"]) == 2
