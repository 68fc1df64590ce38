"""A service's one config object from its three sources: a YAML file, environment variables, flags.

Both services keep a frozen dataclass of sections (``RankerConfig``, ``RetrieverConfig``), each
section a frozen dataclass with defaults. This module fills one from the sources in order, later
winning: :func:`from_mapping` (the ``--config`` YAML file), :func:`with_env`
(``<PREFIX><SECTION>_<KEY>`` variables, e.g. ``EXITRANK_RETRIEVER_INDEX_EF_SEARCH=256``), then
:func:`with_given` (the flags a user actually gave; unset flags are None). Values are typed by the
field's annotation (bool, int, float, str, Path, or an optional of those); an unknown section or
key, or a value of the wrong type, is refused by name with a :class:`ConfigError`, the one error both
services raise for their config (their sections' own checks too); either service stops on it with
exit status 2 and the message.

    config = with_given(with_env(from_mapping(RetrieverConfig, yaml_data), "EXITRANK_RETRIEVER_"),
                        {"server": {"port": 50051}})
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

Config = TypeVar("Config")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; ``field`` names it (``index.kind``,
    ``EXITRANK_RANKER_MODEL_ENGINE``) and the message says what to change: ``"<field>: <message>"``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def from_mapping(config_cls: type[Config], data: Mapping[str, Any] | None) -> Config:
    """``config_cls`` with the sections of ``data`` (YAML) over the defaults; unknown names refused."""
    data = dict(data or {})
    sections = {f.name: f for f in fields(config_cls)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(unknown[0], f"unknown config section; known: {', '.join(sections)}")
    config = config_cls()
    for name, values in data.items():
        section_type = type(getattr(config, name))
        hints = typing.get_type_hints(section_type)
        values = dict(values or {})
        bad = sorted(set(values) - set(hints))
        if bad:
            raise ConfigError(f"{name}.{bad[0]}", f"unknown key; known: {', '.join(sorted(hints))}")
        typed = {key: _as_path(value, hints[key]) for key, value in values.items()}
        config = with_section(config, name, **typed)
    return config


def with_env(config: Config, prefix: str, environ: Mapping[str, str] | None = None) -> Config:
    """``config`` with every ``<prefix><SECTION>_<KEY>`` variable applied (typed like its field)."""
    environ = os.environ if environ is None else environ
    changes: dict[str, dict[str, Any]] = {}  # per section, applied at once (a TLS cert and key go together)
    names = [f.name for f in fields(config)]
    for var, raw in sorted(environ.items()):
        if not var.startswith(prefix):
            continue
        rest = var[len(prefix):].lower()
        section = next((n for n in names if rest.startswith(n + "_")), None)
        if section is None:
            raise ConfigError(var, f"unknown config section; known: {', '.join(names)}")
        key = rest[len(section) + 1 :]
        hints = typing.get_type_hints(type(getattr(config, section)))
        if key not in hints:
            raise ConfigError(var, f"unknown key {section}.{key}; known: {', '.join(sorted(hints))}")
        changes.setdefault(section, {})[key] = parse_value(var, raw, hints[key])
    return with_given(config, changes)


def with_given(config: Config, changes: Mapping[str, Mapping[str, Any]]) -> Config:
    """``config`` with ``{section: {key: value}}`` applied, skipping None values (flags not given)."""
    for section, values in changes.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            config = with_section(config, section, **given)
    return config


def with_section(config: Config, name: str, **changes: Any) -> Config:
    return replace(config, **{name: replace(getattr(config, name), **changes)})


def parse_value(var: str, raw: str, kind: Any) -> Any:
    """``raw`` as the field type ``kind`` (bool, int, float, str, Path, optional of those)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args:
        if raw.lower() in ("", "none", "null"):
            return None
        kind = args[0]
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(var, f"cannot read {raw!r} as {getattr(kind, '__name__', kind)}") from exc


def _as_path(value: Any, kind: Any) -> Any:
    """A YAML string for a Path field becomes a Path."""
    path_field = kind is Path or Path in typing.get_args(kind)
    return Path(value) if path_field and isinstance(value, str) else value
