"""The public contract's limits and pure checks, shared by both services (no grpc, no service errors).

Each check returns None when the value is valid, else what is wrong with it (a phrase that completes
"<field> ..."); each service wraps that in its own error type, naming the field::

    problem = id_problem(value)                      # "must not contain control characters"
    if problem is not None:
        raise InvalidArgument("candidate_item_ids[3]", problem)
"""

from __future__ import annotations

import re
import unicodedata

MAX_ID_BYTES = 128
MAX_NEIGHBORS = 16  # similar users in one prompt (RankRequest.num_neighbors)
# categories an id may not hold: controls and unpaired surrogates (neither survives UTF-8 framing),
# and format characters (Cf: bidi overrides and isolates, zero-width joiners, soft hyphens), which
# make two different ids look alike in logs, tools and prompts, or reorder the text around them
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Cf"})
# Redis Cluster hashes only the text between the first "{" and "}" of a key: an id holding braces
# could choose its own hash tag, and a client could pile every key onto one slot (one node)
_REFUSED_CHARS = frozenset("{}")
MAX_VERSION_CHARS = 64
# embedding versions are "gcn-" + 12 hex digits (retriever_svc.embeddings), or a name an operator gave
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def id_problem(value: object) -> str | None:
    """None for a valid user or item id (1..128 bytes of UTF-8; no control, format (Cf) or unpaired
    surrogate characters; no ``{`` or ``}``), else what is wrong with it."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > MAX_ID_BYTES or len(value.encode("utf-8", errors="surrogatepass")) > MAX_ID_BYTES:
        return f"must be at most {MAX_ID_BYTES} bytes of UTF-8"
    if any(ch in _REFUSED_CHARS for ch in value):
        return "must not contain '{' or '}' (they would choose the id's Redis Cluster slot)"
    categories = {unicodedata.category(ch) for ch in value}
    if "Cf" in categories:
        return "must not contain format characters (Unicode Cf: bidi controls, zero-width characters)"
    if categories & _REFUSED_CATEGORIES:
        return "must not contain control characters or unpaired surrogates"
    return None


def version_problem(value: object) -> str | None:
    """None for a valid embedding version ("" means the current one; else 1..64 characters of
    letters, digits and ``._:-``, starting with a letter or digit), else what is wrong with it."""
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return None
    if len(value) > MAX_VERSION_CHARS:
        return f"must be at most {MAX_VERSION_CHARS} characters, got {len(value)}"
    if _VERSION.fullmatch(value) is None:
        return "must hold only letters, digits and '._:-', starting with a letter or digit (e.g. gcn-1a2b3c4d5e6f)"
    return None
