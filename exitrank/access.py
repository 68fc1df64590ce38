"""Who may call what: caller identities and the access policy of both services (no grpc here).

A deployment names its callers and the RPCs each may call in one YAML file, given to both services
as ``auth.policy`` (``--auth-policy``)::

    # exitrank access policy: default deny; each identity may call what its `allow` lists
    open: [health]                        # callable by any client that reaches the port (default: [health])
    identities:
      feed-server:
        certificate_names: [feed-server.exitrank.svc]   # a SAN (DNS, URI) or the CN of its client certificate
        allow: [Rank, RankStream]
      ingest:
        token_files: [/var/run/secrets/exitrank/ingest.token]   # "authorization: Bearer <token>"
        allow: [Ingest, UpsertItems]
      ranker:
        certificate_names: [ranker.exitrank.svc]
        allow: [GetContext, GetItems, NearestUsers]
      operator:
        certificate_names: [ops.exitrank.svc]
        allow: [health, reflection]

An RPC is named by its method (``Rank``), ``Service/Method`` (``exitrank.v1.Ranker/Rank``), a whole
service (``exitrank.v1.Retriever/*``), ``health``, ``reflection`` or ``*`` (everything); a name that
matches no RPC of the two services stops the start, as does an identity with no way to be recognised.

A caller is recognised by its verified client certificate (mutual TLS: any subject alternative name
or the common name equal to one of ``certificate_names``), else by a bearer token in the
``authorization`` metadata, for deployments whose mesh terminates TLS (:meth:`AccessPolicy.by_token`:
each token file holds one token of at least 16 characters; only their SHA-256 digests are kept, and
a presented token is compared with every one in constant time, ``hmac.compare_digest``; tokens are
never logged). The gRPC half, which reads certificates and metadata and refuses calls
(UNAUTHENTICATED, PERMISSION_DENIED), is ``exitrank.grpc_security.ServerGuard``.

Without a policy (``auth.policy`` unset) every client that reaches the port may call every RPC, as
before this module existed; both services then log a warning at start.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from exitrank.config_sources import ConfigError
from exitrank.v1 import ranker_pb2, retriever_pb2

BEARER_KEY = "authorization"
MIN_TOKEN_CHARS = 16
HEALTH = "/grpc.health.v1.Health/"
REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
ALIASES = {"health": (HEALTH,), "reflection": REFLECTION}
DEFAULT_OPEN = ("health",)
# every RPC of the two services, "/package.Service/Method"
SERVICE_METHODS = tuple(f"/{service.full_name}/{method.name}" for module in (ranker_pb2, retriever_pb2)
                        for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """Section ``auth`` of both services.

    Args:
        policy: the access policy file (YAML, module docstring; ``--auth-policy``). None: no
            authorisation, every client that reaches the port may call every RPC (a warning at start).
    """

    policy: Path | None = None

    def __post_init__(self) -> None:
        if self.policy is not None and not isinstance(self.policy, Path):
            object.__setattr__(self, "policy", Path(self.policy))


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller of the policy: how it is recognised and the method prefixes it may call."""

    name: str
    certificate_names: frozenset[str]
    token_digests: tuple[bytes, ...]
    allowed: tuple[str, ...]  # full method names or prefixes ending in "/" ("" for everything)

    def may_call(self, method: str) -> bool:
        return _matches(method, self.allowed)


def _matches(method: str, allowed: tuple[str, ...]) -> bool:
    return any(method == rule or (rule.endswith("/") and method.startswith(rule)) or rule == ""
               for rule in allowed)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def read_token(path: Path, setting: str) -> str:
    """The one token in ``path`` (surrounding whitespace dropped).

    Raises:
        ConfigError: naming ``setting``: the file cannot be read, or the token is shorter than 16
            characters or holds whitespace (the token itself is never in the message).
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(setting, f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if len(token) < MIN_TOKEN_CHARS or any(ch.isspace() for ch in token):
        raise ConfigError(setting, f"the token in {path} must be one word of at least {MIN_TOKEN_CHARS} characters "
                          "(e.g. `openssl rand -hex 32`)")
    return token


def resolve_methods(names: Iterable[object], where: str) -> tuple[str, ...]:
    """The full method names / prefixes of a policy's RPC names (module docstring).

    Raises:
        ConfigError: a name matches no RPC of the two services, naming ``where`` and the name.
    """
    rules: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(where, f"RPC names must be non-empty strings, got {name!r}")
        if name == "*":
            rules.append("")
        elif name in ALIASES:
            rules.extend(ALIASES[name])
        elif name.endswith("/*"):
            prefix = "/" + name[:-1].lstrip("/")
            if not any(m.startswith(prefix) for m in SERVICE_METHODS):
                raise ConfigError(where, f"{name!r} names no service of exitrank.v1 (Ranker, Retriever)")
            rules.append(prefix)
        else:
            found = [m for m in SERVICE_METHODS if m == "/" + name.lstrip("/") or m.rpartition("/")[2] == name]
            if not found:
                known = ", ".join(sorted({m.rpartition("/")[2] for m in SERVICE_METHODS}))
                raise ConfigError(where, f"{name!r} is not an RPC of exitrank.v1 (known: {known}; or health, "
                                  "reflection, Service/*, *)")
            rules.extend(found)
    return tuple(rules)


class AccessPolicy:
    """Identities and the RPCs they may call; default deny. Build with :meth:`load`.

    Args:
        identities: the callers.
        open_methods: rules (``resolve_methods``) any caller may call without an identity.
    """

    def __init__(self, *, identities: Iterable[Identity], open_methods: tuple[str, ...] = ()) -> None:
        self.identities = tuple(identities)
        self.open_methods = open_methods
        self._by_name = {n: i for i in self.identities for n in i.certificate_names}
        self._tokens = [(d, i) for i in self.identities for d in i.token_digests]

    @classmethod
    def load(cls, path: Path) -> AccessPolicy:
        """The policy in ``path`` (token files relative to its directory).

        Raises:
            ConfigError: naming ``auth.policy`` and the entry: unreadable or not YAML, unknown keys,
                unknown RPC names, an identity without certificate names or tokens, or a certificate
                name or token given to two identities.
        """
        setting = "auth.policy"
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(setting, f"cannot read the access policy {path}: {getattr(exc, 'strerror', None) or exc}") from exc
        if not isinstance(data, dict) or set(data) - {"open", "identities"} or not isinstance(data.get("identities"), dict):
            raise ConfigError(setting, f"{path} must be a mapping with `identities` (name -> certificate_names, "
                              "token_files, allow) and optionally `open` (see exitrank/access.py)")
        identities = [cls._identity(str(name), spec, Path(path).parent) for name, spec in data["identities"].items()]
        opened = resolve_methods(data.get("open", DEFAULT_OPEN) or (), f"{setting} open")
        policy = cls(identities=identities, open_methods=opened)
        names = [n for i in identities for n in i.certificate_names]
        digests = [d for i in identities for d in i.token_digests]
        if len(names) != len(set(names)) or len(digests) != len(set(digests)):
            raise ConfigError(setting, f"{path}: a certificate name or token belongs to two identities")
        return policy

    @staticmethod
    def _identity(name: str, spec: object, base: Path) -> Identity:
        where = f"auth.policy identities.{name}"
        if not isinstance(spec, dict) or set(spec) - {"certificate_names", "token_files", "allow"}:
            raise ConfigError(where, "must be a mapping of certificate_names, token_files and allow (lists)")
        certs = spec.get("certificate_names") or []
        files = spec.get("token_files") or []
        if not isinstance(certs, list) or not isinstance(files, list) or not isinstance(spec.get("allow", []), list):
            raise ConfigError(where, "certificate_names, token_files and allow must be lists")
        if not certs and not files:
            raise ConfigError(where, "needs certificate_names or token_files: nothing could identify it")
        tokens = tuple(_digest(read_token(base / str(f), f"{where}.token_files")) for f in files)
        allowed = resolve_methods(spec.get("allow") or [], f"{where}.allow")
        return Identity(name=name, certificate_names=frozenset(str(c) for c in certs), token_digests=tokens,
                        allowed=allowed)

    def is_open(self, method: str) -> bool:
        """Whether ``method`` ("/package.Service/Method") needs no identity."""
        return _matches(method, self.open_methods)

    def by_certificate(self, names: Iterable[str]) -> Identity | None:
        """The identity one of a verified certificate's names (SANs, CN) belongs to, or None."""
        for name in names:
            identity = self._by_name.get(name)
            if identity is not None:
                return identity
        return None

    def by_token(self, token: str) -> Identity | None:
        """The identity whose token this is, or None; compares with every token in constant time."""
        presented, found = _digest(token), None
        for digest, identity in self._tokens:  # no early exit: the time does not depend on which matched
            if hmac.compare_digest(presented, digest):
                found = identity
        return found


def load_policy(auth: AuthConfig) -> AccessPolicy | None:
    """The policy of ``auth`` (None without one); raises ConfigError as :meth:`AccessPolicy.load`."""
    return None if auth.policy is None else AccessPolicy.load(auth.policy)
