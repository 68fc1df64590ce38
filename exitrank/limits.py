"""The public contract's limits and pure checks, shared by both services (no grpc, no service errors).

Each check returns None when the value is valid, else what is wrong with it (a phrase that completes
"<field> ..."); each service wraps that in its own error type, naming the field::

    problem = id_problem(value)                      # "must not contain control characters"
    if problem is not None:
        raise InvalidArgument("candidate_item_ids[3]", problem)
"""

from __future__ import annotations

import unicodedata

MAX_ID_BYTES = 128
MAX_NEIGHBORS = 16  # similar users in one prompt (RankRequest.num_neighbors)
# categories an id may not hold: controls and unpaired surrogates (neither survives UTF-8 framing)
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs"})


def id_problem(value: object) -> str | None:
    """None for a valid user or item id (1..128 bytes of UTF-8, no control characters or unpaired
    surrogates), else what is wrong with it."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value.encode("utf-8", errors="surrogatepass")) > MAX_ID_BYTES:
        return f"must be at most {MAX_ID_BYTES} bytes of UTF-8"
    if any(unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in value):
        return "must not contain control characters or unpaired surrogates"
    return None
