"""``RetrieverConfig``: the retriever process's one frozen config, built once at start from an
optional YAML file (``--config``), then ``EXITRANK_RETRIEVER_<SECTION>_<KEY>`` environment variables,
then flags (later wins; ``exitrank.config_sources``). ``EXITRANK_REDIS_URL``, which the refit job
reads too, sets ``redis.url`` below the retriever's own variable and flag.

    retriever-svc serve --port 50051 --artifacts artifacts/          # embedded redis-server
    retriever-svc serve --port 0 --artifacts A --data-dir /var/lib/xr  # its AOF there (default: ~/.local/state)
    retriever-svc serve --port 50051 --artifacts A --redis-url redis://:secret@127.0.0.1:6379/0
    # a replica of a Redis Cluster deployment (give every replica its own --consumer name)
    retriever-svc serve --port 50052 --artifacts A --consumer replica-2 \
        --redis-url redis+cluster://:secret@10.0.0.5:7000/0 --index-cache /var/cache/xr
    # TLS, mutual TLS (clients need a certificate signed by ca.crt), a per-client rate limit,
    # and Redis over TLS as an ACL user
    retriever-svc serve --port 50051 --artifacts A --tls-cert server.crt --tls-key server.key \
        --tls-client-ca ca.crt --rate-limit 2000 \
        --redis-url rediss://retriever:secret@redis:6380/0 --redis-tls-ca redis-ca.crt

Example ``retriever.yaml``::

    redis: {url: null, data_dir: null, prefix: xr, group: retriever, consumer: replica-1,
            read_count: 512, block_ms: 200, claim_idle_ms: 30000, timeout_s: 5.0}
    index: {kind: auto, hnsw_min_users: 200000, hnsw_m: 32, ef_construction: 80, ef_search: 128,
            keep_versions: 2, version_poll_s: 1.0, cache_dir: /var/cache/xr, history_per_user: 500,
            max_users: 10000000, max_items: 10000000, max_stream_backlog: 1000000, rebuild_jitter_s: 60}
    server: {host: 0.0.0.0, port: 50051, grace_s: 5.0, ingest_batch: 512}
    artifacts: {dir: /artifacts/current}
    tls: {cert: null, key: null, client_ca: null}      # and limits, auth, observability: as the ranker's

Each core class gets only its section: ``Retriever`` the ``index`` section, the store and the
consumer the ``redis`` section, ``server.py`` the ``server``, ``tls``, ``limits`` and ``artifacts``
sections (``tls`` and ``limits`` are ``exitrank.security``'s, shared with the ranker), and
``observability`` (metrics port, log format, tracing: ``exitrank.observability.config``).

A bad value anywhere (file, variable, flag, or a section's own check) is a
``exitrank.config_sources.ConfigError`` naming the field, as in the ranker; ``retriever-svc`` exits 2 on it.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from exitrank import config_sources
from exitrank.access import AuthConfig
from exitrank.config_sources import ConfigError
from exitrank.observability import config as observability_config
from exitrank.observability.config import ObservabilityConfig
from exitrank.security import Limits, ServerTLS
from retriever_svc.keys import HISTORY_PER_USER
from retriever_svc.redis_io import tls_options
from retriever_svc.vectors import INDEX_KINDS


def default_data_dir() -> Path:
    """The embedded Redis's default home: ``$XDG_STATE_HOME/exitrank/retriever`` (``XDG_STATE_HOME``
    unset: ``~/.local/state``), so a restarted retriever finds its catalog, histories and embeddings."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "exitrank" / "retriever"


@dataclass(frozen=True, kw_only=True)
class RedisConfig:
    """Where Redis is and how the stream is consumed.

    Args:
        url: a redis-py URL (``redis+cluster://...`` for a Redis Cluster); None starts an
            embedded redis-server under ``data_dir``.
        data_dir: the embedded server's directory (AOF, socket, credentials; kept across restarts);
            None: :func:`default_data_dir`.
        prefix: key prefix (see ``store.py``).
        group: the stream's consumer group.
        consumer: this process's consumer name, distinct per replica and stable across its
            restarts (a restart re-reads what it left pending under this name).
        read_count: entries read per batch.
        block_ms: how long one read waits for new entries.
        claim_idle_ms: entries pending this long are taken from a (crashed) peer.
        timeout_s: socket timeout of Redis commands.
        tls_ca, tls_cert, tls_key: for a ``rediss://`` URL, the CA that signs the Redis server's
            certificate (default: the system roots, or the URL's ``ssl_ca_certs``) and a client
            certificate for Redis's ``tls-auth-clients`` (see ``redis_io``).
    """

    url: str | None = None
    data_dir: Path | None = None
    prefix: str = "xr"
    group: str = "retriever"
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}")
    read_count: int = 512
    block_ms: int = 200
    claim_idle_ms: int = 30_000
    timeout_s: float = 5.0
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def embedded_dir(self) -> Path:
        """Where the embedded redis-server keeps its data: ``data_dir/redis``."""
        return Path(self.data_dir or default_data_dir()) / "redis"

    def tls(self) -> dict[str, str]:
        """redis-py ``ssl_*`` options of the TLS fields (checked: files readable, URL rediss://)."""
        if self.url is None:
            return {}
        return tls_options(self.url, tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key)

    def __post_init__(self) -> None:
        if self.url is None and (self.tls_ca or self.tls_cert or self.tls_key):
            raise ConfigError("redis.tls_ca/tls_cert/tls_key (--redis-tls-*)", "need --redis-url rediss://...")
        if self.read_count < 1:
            raise ConfigError("redis.read_count", f"must be >= 1, got {self.read_count}")
        if not 1 <= self.block_ms < self.timeout_s * 1000:
            raise ConfigError("redis.block_ms", "must be >= 1 and below redis.timeout_s")
        if not self.prefix or not self.group or not self.consumer:
            raise ConfigError("redis.prefix/group/consumer", "must be non-empty")


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """The FAISS index and embedding versions.

    Args:
        kind: ``auto`` (HNSW from ``hnsw_min_users`` users on), ``exact`` or ``hnsw``.
        hnsw_min_users, hnsw_m, ef_construction, ef_search: see ``VectorIndex``.
        keep_versions: embedding versions kept in Redis (the current one and older ones).
        title_cache_size: item titles cached in process before the cache is cleared.
        faiss_threads: OpenMP threads of one search. 1 (default): a single-query search gains
            nothing from more, and on a busy 2-core box their barrier waits cost 0.2 -> 7 ms.
        version_poll_s: how often a replica checks Redis for a newly published version.
        max_future_s: Ingest refuses events dated more than this many seconds after the retriever's
            clock (default one hour: clock skew between hosts; a prompt shows the newest events, so an
            event dated years ahead would stay on top of its user's history for good).
        cache_dir: where built indexes are kept (``<prefix>-<version>.faiss/.json``), so a
            restart or another replica on this machine skips the build; None: no cache. Files of
            versions Redis no longer keeps are deleted.
        history_per_user: interactions kept per user (the newest; default 500).
        max_users: users with a history at most; Ingest refuses events of new users beyond (0: no bound).
        max_items: catalog ids at most; UpsertItems refuses new ids beyond (0: no bound).
        max_stream_backlog: events the ingest stream may hold unapplied; Ingest answers
            RESOURCE_EXHAUSTED beyond (0: no bound). ``store.py`` states every key's bound.
        rebuild_jitter_s: a due index rebuild (exact to HNSW, HNSW compaction) starts after a random
            delay up to this, so replicas do not all rebuild at once.
    """

    kind: str = "auto"
    hnsw_min_users: int = 200_000
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    keep_versions: int = 2
    title_cache_size: int = 2_000_000
    faiss_threads: int = 1
    version_poll_s: float = 1.0
    cache_dir: Path | None = None
    max_future_s: float = 3600.0
    history_per_user: int = HISTORY_PER_USER
    max_users: int = 10_000_000
    max_items: int = 10_000_000
    max_stream_backlog: int = 1_000_000
    rebuild_jitter_s: float = 60.0

    def __post_init__(self) -> None:
        if self.history_per_user < 1:
            raise ConfigError("index.history_per_user", f"must be >= 1, got {self.history_per_user}")
        if min(self.max_users, self.max_items, self.max_stream_backlog) < 0:
            raise ConfigError("index.max_users/max_items/max_stream_backlog", "must be >= 0 (0: no bound)")
        if not 0 <= self.rebuild_jitter_s <= 3600:
            raise ConfigError("index.rebuild_jitter_s", f"must be in 0..3600, got {self.rebuild_jitter_s}")
        if not 0 <= self.max_future_s <= 366 * 86400:
            raise ConfigError("index.max_future_s", f"must be in 0..31622400 (a year), got {self.max_future_s}")
        if not 0 < self.version_poll_s <= 3600:
            raise ConfigError("index.version_poll_s", f"must be in (0, 3600], got {self.version_poll_s}")
        if self.kind not in INDEX_KINDS:
            raise ConfigError("index.kind", f"must be one of {INDEX_KINDS}, got {self.kind!r}")
        if self.keep_versions < 1:
            raise ConfigError("index.keep_versions", f"must be >= 1, got {self.keep_versions}")
        if min(self.hnsw_m, self.ef_construction, self.ef_search, self.title_cache_size,
               self.faiss_threads) < 1:
            raise ConfigError("index.hnsw_m/ef_construction/ef_search/title_cache_size/faiss_threads",
                              "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The gRPC listener.

    Args:
        host: address to bind (default loopback).
        port: TCP port; 0 picks a free one (printed once serving).
        grace_s: how long in-flight calls may finish at shutdown.
        ingest_batch: stream messages written to Redis per pipeline.
        health_port: a second, plaintext port answering only gRPC health checks (kubelet's gRPC
            probes speak neither TLS nor mutual TLS); None: none.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    grace_s: float = 5.0
    ingest_batch: int = 512
    health_port: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("server.port", f"must be in 0..65535, got {self.port}")
        if self.grace_s < 0:
            raise ConfigError("server.grace_s", f"must be >= 0, got {self.grace_s}")
        if self.ingest_batch < 1:
            raise ConfigError("server.ingest_batch", f"must be >= 1, got {self.ingest_batch}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ConfigError("server.health_port", f"must be in 0..65535, got {self.health_port}")


@dataclass(frozen=True, kw_only=True)
class ArtifactsConfig:
    """Args: dir: the artifacts directory; ``dir/gcn`` is published at start when present."""

    dir: Path = Path("artifacts")


ENV_PREFIX = "EXITRANK_RETRIEVER_"


@dataclass(frozen=True, kw_only=True)
class RetrieverConfig:
    redis: RedisConfig = field(default_factory=RedisConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    artifacts: ArtifactsConfig = field(default_factory=ArtifactsConfig)
    tls: ServerTLS = field(default_factory=ServerTLS)
    limits: Limits = field(default_factory=Limits)
    auth: AuthConfig = field(default_factory=AuthConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> RetrieverConfig:
        """``retriever-svc serve ...``: the file, then the environment, then the flags given.

        Raises:
            ConfigError: naming the section.key (or variable) of a bad value.
        """
        args = build_parser().parse_args(argv)
        environ = os.environ if environ is None else environ
        data = yaml.safe_load(args.config.read_text()) if args.config else None
        config = config_sources.from_mapping(cls, data)
        config = config_sources.with_given(config, {"redis": {"url": environ.get("EXITRANK_REDIS_URL") or None}})
        config = config_sources.with_env(config, ENV_PREFIX, environ)
        return config_sources.with_given(config, _flag_sections(args))


def _flag_sections(args: argparse.Namespace) -> dict[str, dict]:
    """The flags of ``serve`` by section and field (None: not given)."""
    return {
        "redis": {"url": args.redis_url, "data_dir": args.data_dir, "prefix": args.redis_prefix,
                  "consumer": args.consumer, "tls_ca": args.redis_tls_ca, "tls_cert": args.redis_tls_cert,
                  "tls_key": args.redis_tls_key},
        "index": {"kind": args.index_kind, "hnsw_min_users": args.hnsw_min_users, "hnsw_m": args.hnsw_m,
                  "ef_construction": args.ef_construction, "ef_search": args.ef_search,
                  "cache_dir": args.index_cache, "version_poll_s": args.version_poll,
                  "max_future_s": args.max_future_skew},
        "server": {"host": args.host, "port": args.port, "grace_s": args.grace, "health_port": args.health_port},
        "artifacts": {"dir": args.artifacts},
        "tls": {"cert": args.tls_cert, "key": args.tls_key, "client_ca": args.tls_client_ca},
        "limits": {"max_receive_bytes": args.max_receive_bytes, "max_send_bytes": args.max_send_bytes,
                   "rate_per_s": args.rate_limit, "burst": args.rate_burst, "trust_client_id": args.trust_client_id,
                   "max_concurrent_per_client": args.max_concurrent_per_client},
        "auth": {"policy": args.auth_policy},
        "observability": observability_config.overrides(args),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retriever-svc", description="The exitrank GCN-Retriever gRPC service."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve exitrank.v1.Retriever")
    serve.add_argument("--port", type=int, required=True, help="TCP port, 0 for a free one")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--artifacts", type=Path, required=True,
                       help="artifacts directory; ARTIFACTS/gcn is published when present")
    serve.add_argument("--config", type=Path, help="YAML file with config sections (env and flags win)")
    serve.add_argument("--redis-url", help="external Redis (default: start an embedded redis-server)")
    serve.add_argument("--data-dir", type=Path, help="embedded redis-server directory, kept across restarts "
                       "(default $XDG_STATE_HOME/exitrank/retriever, else ~/.local/state/exitrank/retriever)")
    serve.add_argument("--redis-prefix", help="Redis key prefix (default xr)")
    serve.add_argument("--consumer", help="stream consumer name (default hostname)")
    serve.add_argument("--index-kind", choices=INDEX_KINDS, help="default auto")
    serve.add_argument("--hnsw-min-users", type=int, help=f"default {IndexConfig.hnsw_min_users}")
    serve.add_argument("--hnsw-m", type=int, help=f"default {IndexConfig.hnsw_m}")
    serve.add_argument("--ef-construction", type=int, help=f"default {IndexConfig.ef_construction}")
    serve.add_argument("--ef-search", type=int, help=f"default {IndexConfig.ef_search}")
    serve.add_argument("--index-cache", type=Path, help="keep built indexes here; restarts and replicas reuse them")
    serve.add_argument("--max-future-skew", type=float,
                       help="seconds an ingested event may be dated after this host's clock (default 3600)")
    serve.add_argument("--version-poll", type=float,
                       help="seconds between checks for a newly published embedding version (default 1)")
    serve.add_argument("--grace", type=float, help="shutdown grace seconds (default 5)")
    add_security_arguments(serve)
    observability_config.add_flags(serve, service="retriever")
    return parser


def add_security_arguments(serve: argparse.ArgumentParser) -> None:
    """TLS, limits and Redis TLS flags (``exitrank.security``; defaults are ``Limits``'s)."""
    tls = serve.add_argument_group("TLS and limits")
    tls.add_argument("--tls-cert", type=Path, help="PEM server certificate: serve TLS only")
    tls.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    tls.add_argument("--tls-client-ca", type=Path,
                     help="PEM CA of client certificates: mutual TLS, clients without one are refused")
    tls.add_argument("--max-receive-bytes", type=int, help="largest request message (default 4 MiB)")
    tls.add_argument("--max-send-bytes", type=int, help="largest response message (default 16 MiB)")
    tls.add_argument("--rate-limit", type=float,
                     help="requests/s per client (certificate subject, else peer address); default 0: off")
    tls.add_argument("--rate-burst", type=int, help="token bucket size (0: 2x --rate-limit)")
    tls.add_argument("--trust-client-id", action="store_true", default=None,
                     help="count calls by their x-client-id metadata (behind a trusted gateway only)")
    tls.add_argument("--max-concurrent-per-client", type=int,
                     help="calls one client may have in progress (default 256; 0: no cap)")
    tls.add_argument("--auth-policy", type=Path, help="access policy YAML: who may call which RPC (default: anyone)")
    tls.add_argument("--health-port", type=int, help="plaintext port answering only health checks (kubelet probes)")
    tls.add_argument("--redis-tls-ca", type=Path, help="PEM CA of the Redis server (rediss:// URLs)")
    tls.add_argument("--redis-tls-cert", type=Path, help="PEM client certificate for Redis")
    tls.add_argument("--redis-tls-key", type=Path, help="PEM key of --redis-tls-cert")
