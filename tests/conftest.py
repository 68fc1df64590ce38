"""Session fixtures shared by every test package: a real redis-server, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exitrank.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EXITRANK_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> EmbeddedRedis:
    """One real redis-server (unix socket, password, AOF) for the whole session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The session server's URL with an emptied database for each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip only when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (set EXITRANK_DATA to the shared data folder)")
    return SHARED_DATA
