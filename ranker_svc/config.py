"""``RankerConfig``: the one frozen configuration of a ranker process, in sections.

Built once in ``server.py`` from an optional YAML file, then environment variables, then
command-line flags (later wins); each core class receives only its section. Example ``ranker.yaml``
(``ranker-svc serve --config ranker.yaml``)::

    model: {artifacts_dir: artifacts, dtype: auto, engine: torch, num_threads: 0, device: auto,
            tensor_parallel: 1, onnx_dir: null, reload_interval_s: 2.0}
    exits: {criterion: null}            # null fields keep the artifact's calibrated policy
    batching: {batch_size: 32, max_candidates: 512, max_pending_requests: 64, max_pending_per_client: 0,
               max_wait_ms: 2.0, max_batch_rows: 256, shared_context: true}
    server: {host: 127.0.0.1, port: 50052, grace_s: 5.0, health_port: null}
    retriever: {target: 127.0.0.1:50051, timeout_s: 0.5, title_cache_size: 100000,
                breaker_failures: 5, breaker_cooldown_s: 2.0,
                tls: false, tls_ca: null, tls_cert: null, tls_key: null, tls_server_name: "", token_file: null}
    tls: {cert: null, key: null, client_ca: null}          # exitrank.security.ServerTLS
    limits: {max_receive_bytes: 4194304, max_send_bytes: 16777216, rate_per_s: 0, burst: 0,
             max_clients: 10000, trust_client_id: false, max_concurrent_per_client: 256}   # exitrank.security.Limits
    auth: {policy: /etc/exitrank/policy.yaml}             # exitrank.access.AuthConfig: who may call what
    observability: {metrics_port: 9452, log_format: json, access_log: errors, tracing: none}
                                     # exitrank.observability.config.ObservabilityConfig

Environment variables ``EXITRANK_RANKER_<SECTION>_<KEY>`` set single keys, e.g.
``EXITRANK_RANKER_BATCHING_MAX_WAIT_MS=5`` or ``EXITRANK_RANKER_MODEL_ENGINE=onnx``; TLS files
too (``EXITRANK_RANKER_TLS_CERT``, ``EXITRANK_RANKER_RETRIEVER_TLS_CA``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from exitrank import config_sources
from exitrank.access import AuthConfig
from exitrank.config_sources import ConfigError
from exitrank.observability.config import ObservabilityConfig
from exitrank.security import ClientTLS, Limits, ServerTLS

ENGINES = ("torch", "deepspeed", "onnx")
DTYPES = ("auto", "bfloat16", "float32")
MAX_CANDIDATES = 512
ENV_PREFIX = "EXITRANK_RANKER_"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Where the artifact is and how to run it.

    Args:
        dtype: ``auto`` (bfloat16 where the CPU has AMX/AVX512-BF16, or on CUDA), bfloat16, float32.
            Serve in the dtype the policy was calibrated in (``trainer calibrate --dtype``).
        engine: ``torch``, ``deepspeed`` (``tensor_parallel`` GPUs) or ``onnx``.
        num_threads: torch / ONNX Runtime intra-op threads; 0: the library default.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``, ...
        onnx_dir: where the onnx engine caches its exported graphs (None: a temporary directory).
        reload_interval_s: how often the artifacts path is checked for a newly published release,
            which is then loaded off the serving path and swapped in (``ranker_svc.reload``); 0: never.
    """

    artifacts_dir: Path = Path("artifacts")
    dtype: str = "auto"
    engine: str = "torch"
    num_threads: int = 0
    device: str = "auto"
    tensor_parallel: int = 1
    onnx_dir: Path | None = None
    reload_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.reload_interval_s <= 3600:
            raise ConfigError("model.reload_interval_s", f"must be in 0..3600 (0: off), got {self.reload_interval_s}")
        if self.engine not in ENGINES:
            raise ConfigError("model.engine", f"must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            raise ConfigError("model.dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.num_threads < 0:
            raise ConfigError("model.num_threads", f"must be >= 0, got {self.num_threads}")
        if self.tensor_parallel < 1:
            raise ConfigError("model.tensor_parallel", f"must be >= 1, got {self.tensor_parallel}")
        if self.tensor_parallel > 1 and self.engine != "deepspeed":
            raise ConfigError("model.tensor_parallel", "needs model.engine deepspeed")

    @property
    def ranker_dir(self) -> Path:
        return Path(self.artifacts_dir) / "ranker"


@dataclass(frozen=True, slots=True)
class ExitsConfig:
    """Overrides of the artifact's calibrated exit policy (None: keep the calibrated value)."""

    criterion: str | None = None
    threshold: float | None = None
    window: int | None = None
    min_layer: int | None = None
    disabled: bool | None = None
    confidence: float | None = None

    def overrides(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """Rows per forward pass, cross-request batching, request limits.

    Args:
        batch_size: full prompts per forward pass (offline scoring, engines without context sharing).
        max_candidates: candidates one request may carry.
        max_pending_requests: requests in progress at once, retrieval to scores (more: RESOURCE_EXHAUSTED).
        max_pending_per_client: of those, how many one client (its certificate, token, or address:
            ``exitrank.grpc_security.client_identity``) may hold; 0 (default): three quarters of
            ``max_pending_requests``, so one client's RankStreams or bursts leave room for the others.
        max_wait_ms: how long a request may wait for others to share its batch (0: no waiting).
        max_batch_rows: candidate rows per batch of concurrent requests (and per suffix pass).
        shared_context: encode each request's context once and score candidates as suffixes.
    """

    batch_size: int = 32
    max_candidates: int = MAX_CANDIDATES
    max_pending_requests: int = 64
    max_pending_per_client: int = 0
    max_wait_ms: float = 2.0
    max_batch_rows: int = 256
    shared_context: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.max_wait_ms <= 1000:
            raise ConfigError("batching.max_wait_ms", f"must be in 0..1000, got {self.max_wait_ms}")
        if self.max_batch_rows < 1:
            raise ConfigError("batching.max_batch_rows", f"must be >= 1, got {self.max_batch_rows}")
        if self.batch_size < 1:
            raise ConfigError("batching.batch_size", f"must be >= 1, got {self.batch_size}")
        if not 1 <= self.max_candidates <= MAX_CANDIDATES:
            raise ConfigError("batching.max_candidates", f"must be in 1..{MAX_CANDIDATES}, got {self.max_candidates}")
        if self.max_pending_requests < 1:
            raise ConfigError("batching.max_pending_requests", f"must be >= 1, got {self.max_pending_requests}")
        if not 0 <= self.max_pending_per_client <= self.max_pending_requests:
            raise ConfigError("batching.max_pending_per_client", "must be in 0..batching.max_pending_requests "
                              f"(0: three quarters of it), got {self.max_pending_per_client}")

    @property
    def client_share(self) -> int:
        """Requests one client may have in progress (``max_pending_per_client``, 0 resolved)."""
        return self.max_pending_per_client or max(1, (3 * self.max_pending_requests) // 4)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The gRPC listener; ``health_port``: a second, plaintext port answering only gRPC health checks
    (kubelet's gRPC probes speak neither TLS nor mutual TLS; None: none)."""

    host: str = "127.0.0.1"
    port: int = 50052
    grace_s: float = 5.0
    health_port: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("server.port", f"must be in 0..65535 (0: any free port), got {self.port}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ConfigError("server.health_port", f"must be in 0..65535, got {self.health_port}")
        if self.grace_s < 0:
            raise ConfigError("server.grace_s", f"must be >= 0, got {self.grace_s}")


@dataclass(frozen=True, slots=True)
class RetrieverConfig:
    """The retriever endpoint ("" = none: rank without retrieval), call timeout, title cache, and
    TLS to it: ``tls`` (system roots) or ``tls_ca`` (``--retriever-tls-ca``) verify the retriever,
    ``tls_cert``/``tls_key`` are this ranker's client certificate when the retriever requires
    mutual TLS, ``tls_server_name`` the name its certificate holds if not the target's host.

    The circuit breaker (``ranker_svc.retriever_client.CircuitBreaker``): after ``breaker_failures``
    consecutive failed calls (unreachable, timed out, server fault; 0 turns the breaker off) the
    retriever is skipped for ``breaker_cooldown_s`` (Rank goes on without neighbours, titles come
    from the cache), then one probe call decides whether it is back.

    ``token_file``: a file holding this ranker's bearer token, sent as ``authorization: Bearer`` on
    every call to a retriever whose access policy identifies callers by token (``exitrank.access``).

    ``title_cache_size``: catalog titles kept (an LRU; ``ranker_svc.retriever_client.TitleCache``).
    They do not expire with time: a title is valid until the catalog changes (the retriever's
    ``catalog_version``), and while the retriever is unreachable the last title known is used."""

    target: str = ""
    timeout_s: float = 0.5
    title_cache_size: int = 100_000
    breaker_failures: int = 5
    breaker_cooldown_s: float = 2.0
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str = ""
    token_file: Path | None = None

    def client_tls(self) -> ClientTLS:
        return ClientTLS(enabled=self.tls, ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key,
                         server_name=self.tls_server_name, flag_prefix="--retriever-tls")

    def __post_init__(self) -> None:
        for key in ("tls_ca", "tls_cert", "tls_key", "token_file"):  # YAML gives strings
            if getattr(self, key) is not None:
                object.__setattr__(self, key, Path(getattr(self, key)))
        self.client_tls()  # cert and key together
        if self.timeout_s <= 0:
            raise ConfigError("retriever.timeout_s", f"must be > 0, got {self.timeout_s}")
        if self.title_cache_size < 0:
            raise ConfigError("retriever.title_cache_size", f"must be >= 0, got {self.title_cache_size}")
        if self.breaker_failures < 0:
            raise ConfigError("retriever.breaker_failures", f"must be >= 0 (0: no breaker), got {self.breaker_failures}")
        if self.breaker_cooldown_s <= 0:
            raise ConfigError("retriever.breaker_cooldown_s", f"must be > 0, got {self.breaker_cooldown_s}")


@dataclass(frozen=True, slots=True)
class RankerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    tls: ServerTLS = field(default_factory=ServerTLS)
    limits: Limits = field(default_factory=Limits)
    auth: AuthConfig = field(default_factory=AuthConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)

    @classmethod
    def from_dict(cls, data: dict) -> "RankerConfig":
        """Sections from a mapping (YAML); unknown sections or keys are refused by name."""
        return config_sources.from_mapping(cls, data)

    def with_env(self, environ: Mapping[str, str] | None = None) -> "RankerConfig":
        """Overrides from ``EXITRANK_RANKER_<SECTION>_<KEY>`` variables (typed like the field).

        Raises:
            ConfigError: an unknown section/key or a value of the wrong type, named.
        """
        return config_sources.with_env(self, ENV_PREFIX, environ)

    def with_section(self, name: str, **changes) -> "RankerConfig":
        return config_sources.with_section(self, name, **changes)


def add_security_flags(serve) -> None:
    """``--tls-*``, limit and ``--retriever-tls-*`` flags of ``ranker-svc serve`` (None: keep config)."""
    group = serve.add_argument_group("TLS and limits")
    group.add_argument("--tls-cert", type=Path, help="PEM server certificate: serve TLS only")
    group.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", type=Path, help="PEM CA of client certificates: mutual TLS")
    group.add_argument("--max-receive-bytes", type=int, help="largest request message (default 4 MiB)")
    group.add_argument("--max-send-bytes", type=int, help="largest response message (default 16 MiB)")
    group.add_argument("--rate-limit", type=float, help="requests/s per client (default 0: off)")
    group.add_argument("--rate-burst", type=int, help="token bucket size (0: 2x --rate-limit)")
    group.add_argument("--trust-client-id", action="store_true", default=None,
                       help="count calls by their x-client-id metadata (behind a trusted gateway only)")
    group.add_argument("--max-concurrent-per-client", type=int,
                       help="calls one client may have in progress (default 256; 0: no cap)")
    group.add_argument("--auth-policy", type=Path, help="access policy YAML: who may call which RPC (default: anyone)")
    group.add_argument("--health-port", type=int, help="plaintext port answering only health checks (kubelet probes)")
    group.add_argument("--retriever-token-file", type=Path, help="bearer token this ranker sends to the retriever")
    group.add_argument("--retriever-tls", action="store_true", default=None,
                       help="TLS to the retriever, verified against the system roots")
    group.add_argument("--retriever-tls-ca", type=Path, help="PEM CA of the retriever's certificate")
    group.add_argument("--retriever-tls-cert", type=Path, help="PEM client certificate for a mutual-TLS retriever")
    group.add_argument("--retriever-tls-key", type=Path, help="PEM key of --retriever-tls-cert")
    group.add_argument("--retriever-tls-server-name", help="name in the retriever's certificate, if not its host")


_SECURITY_FLAGS = {
    "tls": {"cert": "tls_cert", "key": "tls_key", "client_ca": "tls_client_ca"},
    "limits": {"max_receive_bytes": "max_receive_bytes", "max_send_bytes": "max_send_bytes",
               "rate_per_s": "rate_limit", "burst": "rate_burst", "trust_client_id": "trust_client_id",
               "max_concurrent_per_client": "max_concurrent_per_client"},
    "retriever": {"tls": "retriever_tls", "tls_ca": "retriever_tls_ca", "tls_cert": "retriever_tls_cert",
                  "tls_key": "retriever_tls_key", "tls_server_name": "retriever_tls_server_name",
                  "token_file": "retriever_token_file"},
    "auth": {"policy": "auth_policy"},
    "server": {"health_port": "health_port"},
}


def with_security_flags(config: "RankerConfig", args) -> "RankerConfig":
    """``config`` with the flags of :func:`add_security_flags` that were given."""
    for section, keys in _SECURITY_FLAGS.items():
        given = {key: getattr(args, flag) for key, flag in keys.items() if getattr(args, flag) is not None}
        if given:
            config = config.with_section(section, **given)
    return config
