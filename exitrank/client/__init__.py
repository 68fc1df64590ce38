"""Typed Python clients of the exitrank services, for feed servers and scripts.

    from exitrank.client import RankerClient, NotFound

    with RankerClient("ranker:50052", timeout=0.5, retries=2) as ranker:
        try:
            result = ranker.rank("u42", candidates)
        except NotFound as exc:        # unknown candidate items; exc.code, exc.message
            ...
        ranked = sorted(result.scores, key=lambda s: s.ctr, reverse=True)

``RankerClient`` and ``RetrieverClient`` (``sync.py``) block; ``exitrank.client.aio`` has asyncio
twins; ``python -m exitrank.client`` is a shell front end (health probes, one-off ranks). They take
and return plain dataclasses (``models.py``; ranking answers are ``exitrank.types.RankResult``),
set a deadline on every call, retry UNAVAILABLE only (``retry.py``), and raise the exceptions of
``errors.py``. Pass ``credentials=`` a ``grpc.ChannelCredentials`` for TLS. Only the generated
stubs (``exitrank.v1``) and the shared types are imported: the client does not depend on the
services' code.
"""

from exitrank.client.errors import (
    AccessDenied,
    DeadlineExceeded,
    ExitrankError,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    Overloaded,
    ServerError,
    Unavailable,
)
from exitrank.client.models import ExitPolicy, IngestSummary, Interaction, Item, ItemsResult, NearestUsers, Neighbor
from exitrank.client.retry import RetryPolicy
from exitrank.client.sync import RankerClient, RetrieverClient, ServiceClient
from exitrank.types import RankResult, ScoredItem, UserContext

__all__ = [
    "AccessDenied", "DeadlineExceeded", "ExitPolicy", "ExitrankError", "FailedPrecondition", "IngestSummary",
    "Interaction", "InvalidRequest", "Item", "ItemsResult", "NearestUsers", "Neighbor", "NotFound", "Overloaded",
    "RankResult", "RankerClient", "RetrieverClient", "RetryPolicy", "ScoredItem", "ServerError", "ServiceClient",
    "Unavailable", "UserContext",
]
