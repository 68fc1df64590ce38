"""``RankerConfig``: the one frozen configuration of a ranker process, in sections.

Built once in ``server.py`` from an optional YAML file, then command-line flags; each core class
receives only its section. Example ``ranker.yaml`` (``ranker-svc serve --config ranker.yaml``)::

    model: {artifacts_dir: artifacts, dtype: auto, engine: torch, num_threads: 0}
    exits: {criterion: null}            # null fields keep the artifact's calibrated policy
    batching: {batch_size: 32, max_candidates: 512, max_pending_requests: 64}
    server: {host: 127.0.0.1, port: 50052, grace_s: 5.0}
    retriever: {target: 127.0.0.1:50051, timeout_s: 0.5, title_cache_size: 100000, title_ttl_s: 300}
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ranker_svc.errors import InvalidArgument

ENGINES = ("torch",)  # issue 4 adds "deepspeed" and "onnx"
DTYPES = ("auto", "bfloat16", "float32")
MAX_CANDIDATES = 512


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Where the artifact is and how to run it (``num_threads`` 0: torch's default)."""

    artifacts_dir: Path = Path("artifacts")
    dtype: str = "auto"
    engine: str = "torch"
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InvalidArgument("model.engine", f"must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            raise InvalidArgument("model.dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.num_threads < 0:
            raise InvalidArgument("model.num_threads", f"must be >= 0, got {self.num_threads}")

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

    def overrides(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """Rows per forward pass, request limits, and how many requests may wait for the model."""

    batch_size: int = 32
    max_candidates: int = MAX_CANDIDATES
    max_pending_requests: int = 64

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidArgument("batching.batch_size", f"must be >= 1, got {self.batch_size}")
        if not 1 <= self.max_candidates <= MAX_CANDIDATES:
            raise InvalidArgument("batching.max_candidates", f"must be in 1..{MAX_CANDIDATES}, got {self.max_candidates}")
        if self.max_pending_requests < 1:
            raise InvalidArgument("batching.max_pending_requests", f"must be >= 1, got {self.max_pending_requests}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50052
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidArgument("server.port", f"must be in 0..65535 (0: any free port), got {self.port}")
        if self.grace_s < 0:
            raise InvalidArgument("server.grace_s", f"must be >= 0, got {self.grace_s}")


@dataclass(frozen=True, slots=True)
class RetrieverConfig:
    """The retriever endpoint ("" = none: rank without retrieval), call timeout, title cache."""

    target: str = ""
    timeout_s: float = 0.5
    title_cache_size: int = 100_000
    title_ttl_s: float = 300.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise InvalidArgument("retriever.timeout_s", f"must be > 0, got {self.timeout_s}")
        if self.title_cache_size < 0:
            raise InvalidArgument("retriever.title_cache_size", f"must be >= 0, got {self.title_cache_size}")
        if self.title_ttl_s < 0:
            raise InvalidArgument("retriever.title_ttl_s", f"must be >= 0, got {self.title_ttl_s}")


@dataclass(frozen=True, slots=True)
class RankerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)

    @classmethod
    def from_dict(cls, data: dict) -> "RankerConfig":
        """Sections from a mapping (YAML); unknown sections or keys are refused by name."""
        sections = {f.name: f.default_factory for f in fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise InvalidArgument(sorted(unknown)[0], f"unknown config section; known: {', '.join(sections)}")
        built = {}
        for name, factory in sections.items():
            section_type = type(factory())
            values = dict(data.get(name) or {})
            known = {f.name for f in fields(section_type)}
            bad = set(values) - known
            if bad:
                raise InvalidArgument(f"{name}.{sorted(bad)[0]}", f"unknown key; known: {', '.join(sorted(known))}")
            if name == "model" and "artifacts_dir" in values:
                values["artifacts_dir"] = Path(values["artifacts_dir"])
            built[name] = section_type(**values)
        return cls(**built)

    def with_section(self, name: str, **changes) -> "RankerConfig":
        return replace(self, **{name: replace(getattr(self, name), **changes)})
