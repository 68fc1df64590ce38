"""Redis connection helpers shared by ``store.py`` and ``stream.py``: clients, error conversion.

A URL whose scheme ends in ``+cluster`` (``redis+cluster://:pw@host:port/0``,
``rediss+cluster://...``) gives a ``redis.asyncio.RedisCluster`` seeded from that node; any other
URL redis-py accepts (``redis://``, ``rediss://``, ``unix://``) a plain ``redis.asyncio.Redis``.
Every key of one user shares a hash tag (see ``store.py``), so multi-key scripts stay in one slot
and pipelines fan out to the nodes owning their keys (one round trip per node, in parallel).

Authentication and TLS come with the URL, as redis-py reads it: ``redis://user:pw@host:6379/0``
logs in as the ACL user ``user`` (``redis://:pw@...``: the default user, ``requirepass``);
``rediss://`` speaks TLS and verifies the server against the system roots, or against the CA
in the ``ssl_ca_certs`` query parameter (``rediss://:pw@host:6380/0?ssl_ca_certs=/etc/ca.pem``),
or the one :func:`connect` gets as ``tls_ca`` (``--redis-tls-ca``); ``tls_cert``/``tls_key``
present a client certificate (Redis ``tls-auth-clients``). TLS files given for a non-TLS URL
are refused rather than ignored. A ``unix://`` URL without a password reaches an embedded
redis-server of this user: the password comes from the 0600 ``credentials`` file beside the
socket (``exitrank.redis_server.with_credentials``).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster

from exitrank.redis_server import with_credentials
from retriever_svc.errors import StoreRefusesWrites, StoreUnavailable

T = TypeVar("T")
CLUSTER_SUFFIX = "+cluster"
WRITE_REFUSALS = re.compile(r"(?:^|[\s-])(?:MISCONF|NOREPLICAS|OOM|READONLY)\b")  # Redis's error codes
Client = aioredis.Redis | RedisCluster


def is_cluster_url(url: str) -> bool:
    """True for ``redis+cluster://`` and ``rediss+cluster://`` URLs."""
    scheme, _, _ = url.partition("://")
    return scheme.endswith(CLUSTER_SUFFIX)


def is_tls_url(url: str) -> bool:
    """True for ``rediss://`` and ``rediss+cluster://`` URLs."""
    return url.partition("://")[0].removesuffix(CLUSTER_SUFFIX) == "rediss"


def tls_options(url: str, *, tls_ca: str | os.PathLike | None = None,
                tls_cert: str | os.PathLike | None = None,
                tls_key: str | os.PathLike | None = None) -> dict[str, str]:
    """redis-py ``ssl_*`` keyword arguments for the given files (empty when none is given).

    Raises:
        ValueError: files given for a URL that is not ``rediss://``, a cert without its key, or
            a file that cannot be read; the message names the setting.
    """
    given = {"ssl_ca_certs": tls_ca, "ssl_certfile": tls_cert, "ssl_keyfile": tls_key}
    given = {k: os.fspath(v) for k, v in given.items() if v is not None and os.fspath(v)}
    if not given:
        return {}
    if not is_tls_url(url):
        raise ValueError("redis.tls_ca/tls_cert/tls_key (--redis-tls-*) need a rediss:// URL, "
                         f"got scheme {url.partition('://')[0]!r}")
    if ("ssl_certfile" in given) != ("ssl_keyfile" in given):
        raise ValueError("redis.tls_cert and redis.tls_key (--redis-tls-cert, --redis-tls-key) go together")
    for key, path in given.items():
        if not os.access(path, os.R_OK):
            setting = {"ssl_ca_certs": "tls_ca", "ssl_certfile": "tls_cert", "ssl_keyfile": "tls_key"}[key]
            raise ValueError(f"redis.{setting}: cannot read {path}")
    return given


def connect(url: str, *, timeout_s: float = 5.0, tls: dict[str, str] | None = None) -> Client:
    """A client for ``url`` (bytes replies; see the module docstring for cluster URLs).

    ``tls``: :func:`tls_options` for a ``rediss://`` URL (they win over the URL's query).

    Raises:
        RedisServerError: the embedded server's credentials file cannot be read.
    """
    url = with_credentials(url)
    options: dict[str, Any] = {"decode_responses": False, "socket_timeout": timeout_s,
                               "socket_connect_timeout": timeout_s, **(tls or {})}
    if is_cluster_url(url):
        scheme, _, rest = url.partition("://")
        return RedisCluster.from_url(f"{scheme[: -len(CLUSTER_SUFFIX)]}://{rest}", **options)
    return aioredis.Redis.from_url(url, **options)


def refuses_writes(exc: BaseException) -> bool:
    """True for Redis's answers that refuse a write while reads go on (also inside a script's error):
    ``MISCONF`` (it cannot write its append-only file or snapshot), ``NOREPLICAS`` (an embedded
    server restarted on a full disk), ``OOM`` (``maxmemory``), ``READONLY`` (a replica)."""
    return isinstance(exc, rexc.ResponseError) and WRITE_REFUSALS.search(str(exc)) is not None


def guarded(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Convert redis-py (and socket) errors of ``method`` into ``StoreUnavailable`` (a refused write:
    ``StoreRefusesWrites``)."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await method(*args, **kwargs)
        except (rexc.RedisError, OSError) as exc:
            error = StoreRefusesWrites if refuses_writes(exc) else StoreUnavailable
            raise error(f"redis {method.__name__} failed: {exc}") from exc

    return wrapper


def text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def stream_id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = text(value).partition("-")
    return int(ms), int(seq or 0)
