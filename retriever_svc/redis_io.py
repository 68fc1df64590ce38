"""Redis connection helpers shared by ``store.py`` and ``stream.py``: clients, error conversion.

A URL whose scheme ends in ``+cluster`` (``redis+cluster://:pw@host:port/0``,
``rediss+cluster://...``) gives a ``redis.asyncio.RedisCluster`` seeded from that node; any other
URL redis-py accepts (``redis://``, ``rediss://``, ``unix://``) a plain ``redis.asyncio.Redis``.
Every key of one user shares a hash tag (see ``store.py``), so multi-key scripts stay in one slot
and pipelines fan out to the nodes owning their keys (one round trip per node, in parallel).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster

from retriever_svc.errors import StoreUnavailable

T = TypeVar("T")
CLUSTER_SUFFIX = "+cluster"
Client = aioredis.Redis | RedisCluster


def is_cluster_url(url: str) -> bool:
    """True for ``redis+cluster://`` and ``rediss+cluster://`` URLs."""
    scheme, _, _ = url.partition("://")
    return scheme.endswith(CLUSTER_SUFFIX)


def connect(url: str, *, timeout_s: float = 5.0) -> Client:
    """A client for ``url`` (bytes replies; see the module docstring for cluster URLs)."""
    options: dict[str, Any] = {"decode_responses": False, "socket_timeout": timeout_s,
                               "socket_connect_timeout": timeout_s}
    if is_cluster_url(url):
        scheme, _, rest = url.partition("://")
        return RedisCluster.from_url(f"{scheme[: -len(CLUSTER_SUFFIX)]}://{rest}", **options)
    return aioredis.Redis.from_url(url, **options)


def guarded(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Convert redis-py (and socket) errors of ``method`` into ``StoreUnavailable``."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await method(*args, **kwargs)
        except (rexc.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis {method.__name__} failed: {exc}") from exc

    return wrapper


def text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def stream_id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = text(value).partition("-")
    return int(ms), int(seq or 0)
