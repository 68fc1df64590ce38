"""The effective settings of a process as plain JSON values, secrets masked, logged once at start.

Masked (replaced by ``***``): the password of any URL (``redis://:pw@host``,
``unix://:pw@/path?db=0``) and password/token query parameters; the value of any field whose name
says it is a secret (password, secret, token, credential, api_key, passphrase); bytes, and any
string holding a PEM block (key or certificate contents). Paths are shown (a TLS key *path* is
fine to log, its contents are not).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_NAME = re.compile(r"pass(word|wd|phrase)?$|secret|token|credential|api_?key|auth", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"pass(word|wd)?$|secret|token|key$", re.IGNORECASE)


def mask_url(value: str) -> str:
    """``value`` with the password of its user info and secret query parameters masked."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon and password else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*/:@,")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def masked(value: Any, *, name: str = "") -> Any:
    """``value`` (dataclasses, mappings, sequences, scalars) as JSON values with secrets masked."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if name and _SECRET_NAME.search(name) and not isinstance(value, PurePath):
        return MASK if value not in ("", b"") else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: masked(getattr(value, f.name), name=f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): masked(v, name=str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [masked(v, name=name) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return MASK
    if isinstance(value, enum.Enum):
        return masked(value.value, name=name)
    if isinstance(value, PurePath):
        return str(value)
    text = str(value)
    if "-----BEGIN" in text:
        return MASK
    return mask_url(text) if "://" in text else text


def log_settings(logger: logging.Logger, config: Any, *, service: str) -> dict:
    """Log ``config`` (masked) once, as the ``config`` field of one INFO line; returns it."""
    settings = masked(config)
    logger.info("%s effective config", service, extra={"config": settings})
    return settings
