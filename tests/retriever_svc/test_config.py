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


def test_file_then_environment_then_flags(tmp_path):
    (tmp_path / "retriever.yaml").write_text(
        "index: {kind: hnsw, ef_search: 64, cache_dir: /var/cache/xr}\n"
        "server: {host: 0.0.0.0, grace_s: 9}\n"
        "redis: {prefix: from-file, consumer: file-1}\n")
    env = {"EXITRANK_RETRIEVER_INDEX_EF_SEARCH": "200", "EXITRANK_RETRIEVER_REDIS_CONSUMER": "env-1",
           "EXITRANK_REDIS_URL": "redis://:shared@redis:6379/0"}
    cfg = RetrieverConfig.from_args(["serve", "--port", "5", "--artifacts", "a", "--config",
                                     str(tmp_path / "retriever.yaml"), "--consumer", "flag-1"], env)
    assert cfg.index.kind == "hnsw" and cfg.index.cache_dir == Path("/var/cache/xr")  # the file (a Path)
    assert cfg.index.ef_search == 200 and cfg.redis.prefix == "from-file"  # env over the file
    assert cfg.redis.consumer == "flag-1" and cfg.server.port == 5  # flags over both
    assert cfg.server.host == "0.0.0.0" and cfg.server.grace_s == 9  # unset flags keep what the file said
    assert cfg.redis.url == "redis://:shared@redis:6379/0"
    own = RetrieverConfig.from_args(["serve", "--port", "5", "--artifacts", "a"],
                                    {**env, "EXITRANK_RETRIEVER_REDIS_URL": "redis://own:6379/1"})
    assert own.redis.url == "redis://own:6379/1"  # the retriever's own variable over the shared one


@pytest.mark.parametrize(("env", "named"), [
    ({"EXITRANK_RETRIEVER_INDX_KIND": "hnsw"}, "EXITRANK_RETRIEVER_INDX_KIND"),
    ({"EXITRANK_RETRIEVER_INDEX_EF": "3"}, "index.ef"),
    ({"EXITRANK_RETRIEVER_INDEX_EF_SEARCH": "many"}, "EXITRANK_RETRIEVER_INDEX_EF_SEARCH"),
    ({"EXITRANK_RETRIEVER_INDEX_KIND": "ivf"}, "index.kind"),
])
def test_bad_environment_is_refused_by_name(env, named):
    with pytest.raises(ValueError, match=named):
        RetrieverConfig.from_args(["serve", "--port", "5", "--artifacts", "a"], env)


def test_bad_file_is_refused_by_name(tmp_path):
    (tmp_path / "bad.yaml").write_text("index: {kind: hnsw, efsearch: 3}\n")
    with pytest.raises(ValueError, match="index.efsearch"):
        RetrieverConfig.from_args(["serve", "--port", "5", "--artifacts", "a", "--config", str(tmp_path / "bad.yaml")], {})
    (tmp_path / "worse.yaml").write_text("indexes: {}\n")
    assert main(["serve", "--port", "5", "--artifacts", "a", "--config", str(tmp_path / "worse.yaml")]) == 2
    (tmp_path / "broken.yaml").write_text("index: {kind: [\n")
    assert main(["serve", "--port", "5", "--artifacts", "a", "--config", str(tmp_path / "broken.yaml")]) == 2
    assert main(["serve", "--port", "5", "--artifacts", "a", "--config", str(tmp_path / "absent.yaml")]) == 2
