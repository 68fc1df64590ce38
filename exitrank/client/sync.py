"""Blocking clients of ``exitrank.v1.Ranker`` and ``exitrank.v1.Retriever``.

    from exitrank.client import RankerClient, RetrieverClient, Interaction

    with RankerClient("127.0.0.1:50052", timeout=1.0, retries=3) as ranker:
        result = ranker.rank("u42", ["i1", "i2", "i3"], num_neighbors=4)
        best = max(result.scores, key=lambda s: s.ctr)

    with RetrieverClient("127.0.0.1:50051") as retriever:
        retriever.ingest(Interaction("u42", item, 1.0) for item in clicked)

One channel per client object, reused by every call and closed by ``close()`` or the ``with`` block;
a client is safe to share between threads. Every call has a deadline (``timeout``, the client's by
default), which covers its retries. UNAVAILABLE is retried with jittered exponential backoff
(``exitrank.client.retry``); every other failure raises an ``exitrank.client.errors`` exception at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exitrank.client import models
from exitrank.client._common import RANKER, RETRIEVER, ClientSettings, Metadata, chunks, item_ids, settings
from exitrank.client.errors import ExitrankError, Unavailable, from_rpc_error
from exitrank.client.models import ExitPolicy, IngestSummary, Interaction, Item, ItemsResult, NearestUsers
from exitrank.client.retry import RetryPolicy
from exitrank.types import RankResult, UserContext
from exitrank.v1 import ranker_pb2_grpc, retriever_pb2, retriever_pb2_grpc

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 5.0
INGEST_BATCH = 1000  # messages per client stream: a failed stream is resent whole (see ingest)


class ServiceClient:
    """Any exitrank gRPC server: the channel, the retry loop and health checks.

    ``RankerClient`` and ``RetrieverClient`` add one method per RPC; used alone it serves probes
    (``python -m exitrank.client health``). Arguments as in :class:`RankerClient`.
    """

    service = ""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT_S, retries: int = 3,
                 retry_policy: RetryPolicy | None = None, credentials: grpc.ChannelCredentials | None = None,
                 metadata: Metadata = (), options: Sequence[tuple[str, Any]] = ()) -> None:
        self.settings: ClientSettings = settings(target, timeout=timeout, retries=retries, retry_policy=retry_policy,
                                                 credentials=credentials, metadata=metadata, options=options)
        args = self.settings.channel_args()
        self._channel = (grpc.secure_channel(target, credentials, options=args) if credentials is not None
                         else grpc.insecure_channel(target, options=args))

    def close(self) -> None:
        """Closes the channel; calls made afterwards fail."""
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def health(self, *, service: str | None = None, timeout: float | None = None) -> str:
        """The gRPC health status name (``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN``) of ``service``
        (default: this client's service)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=self.service if service is None else service)
        reply = self._call("grpc.health.v1.Health/Check", lambda t, md: stub.Check(request, timeout=t, metadata=md),
                           timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout: float = 30.0) -> None:
        """Blocks until health says SERVING.

        Raises:
            Unavailable: it did not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=max(0.05, min(1.0, deadline - time.monotonic()))) == "SERVING":
                    return
                status = "NOT_SERVING"
            except ExitrankError as exc:
                status = exc.message
            if time.monotonic() >= deadline:
                raise Unavailable(code=grpc.StatusCode.UNAVAILABLE, method=f"{self.service} health",
                                  message=f"not serving after {timeout}s: {status}")
            time.sleep(0.05)

    def _call(self, method: str, invoke: Callable[[float, tuple], T], timeout: float | None) -> T:
        """Runs ``invoke(remaining_s, metadata)`` until it succeeds, fails for good, or the deadline passes."""
        deadline = time.monotonic() + self.settings.deadline_s(timeout)
        attempts = 0
        while True:
            attempts += 1
            try:
                return invoke(max(deadline - time.monotonic(), 1e-3), self.settings.metadata)
            except grpc.RpcError as exc:
                delay = self.settings.retry.next_delay(exc.code(), attempts, deadline - time.monotonic())
                if delay is None:
                    raise from_rpc_error(exc, method=method, attempts=attempts) from exc
            time.sleep(delay)


class RankerClient(ServiceClient):
    """``exitrank.v1.Ranker``: CTR scores of a user's candidate items.

    Args:
        target: the ranker's ``HOST:PORT``.
        timeout: default deadline per call in seconds (retries included). Default 5.
        retries: UNAVAILABLE retries after the first attempt. Default 3.
        retry_policy: full control over retries and waits (replaces ``retries``).
        credentials: ``grpc.ChannelCredentials`` for TLS; None: plaintext.
        metadata: key/value pairs sent with every call.
        options: extra gRPC channel arguments.
    """

    service = RANKER

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = ranker_pb2_grpc.RankerStub(self._channel)

    def rank(self, user_id: str, items: Iterable[str], *, num_neighbors: int = 0,
             exit_policy: ExitPolicy | None = None, timeout: float | None = None) -> RankResult:
        """Scores every candidate for ``user_id``; ``scores`` come in the order of ``items``.

        ``num_neighbors`` 0 takes the model's default; ``exit_policy`` None its calibrated policy.

        Raises:
            InvalidRequest: no candidates, too many, duplicates, or a policy field out of range.
            NotFound: candidates the catalog does not hold (the message lists them).
            Overloaded, Unavailable, DeadlineExceeded: see ``exitrank.client.errors``.
        """
        request = models.rank_request(user_id, item_ids(items), num_neighbors, exit_policy)
        reply = self._call(f"{RANKER}/Rank", lambda t, md: self._stub.Rank(request, timeout=t, metadata=md), timeout)
        return models.rank_result(reply)


class RetrieverClient(ServiceClient):
    """``exitrank.v1.Retriever``: the interaction stream, the catalog, similar users and contexts.

    Takes the same arguments as :class:`RankerClient`, with the retriever's ``HOST:PORT``.
    """

    service = RETRIEVER

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = retriever_pb2_grpc.RetrieverStub(self._channel)

    def ingest(self, interactions: Iterable[Interaction], *, batch_size: int = INGEST_BATCH,
               timeout: float | None = None) -> IngestSummary:
        """Streams interactions to ``Ingest``, ``batch_size`` per call (each with its own deadline).

        A batch that fails UNAVAILABLE is sent again whole: delivery is at least once, which is safe
        because the retriever applies a repeated (user, item, timestamp) event idempotently. The
        iterable is read lazily, one batch at a time.
        """
        total = IngestSummary()
        for batch in chunks(map(models.interaction_pb, interactions), batch_size):
            total += self._client_stream("Ingest", batch, timeout)
        return total

    def upsert_items(self, items: Iterable[Item], *, batch_size: int = INGEST_BATCH,
                     timeout: float | None = None) -> IngestSummary:
        """Adds or replaces catalog items through ``UpsertItems``, batched like :meth:`ingest`."""
        total = IngestSummary()
        for batch in chunks(map(models.item_pb, items), batch_size):
            total += self._client_stream("UpsertItems", batch, timeout)
        return total

    def nearest_users(self, user_id: str, k: int = 10, *, timeout: float | None = None) -> NearestUsers:
        """The ``k`` users most similar to ``user_id``. Raises NotFound without an embedding for it."""
        request = retriever_pb2.NearestUsersRequest(user_id=user_id, k=k)
        reply = self._unary("NearestUsers", request, timeout)
        return models.nearest_users(reply)

    def get_context(self, user_id: str, *, k: int = 4, max_history: int = 20,
                    timeout: float | None = None) -> UserContext:
        """The user's recent history and its ``k`` nearest users' histories (what the ranker prompts with)."""
        request = retriever_pb2.ContextRequest(user_id=user_id, k=k, max_history=max_history)
        return models.user_context(self._unary("GetContext", request, timeout))

    def get_items(self, item_ids: Iterable[str], *, timeout: float | None = None) -> ItemsResult:
        """Catalog entries by id (at most 10,000 per call); unknown ids come back in ``missing_item_ids``."""
        request = retriever_pb2.GetItemsRequest(item_ids=list(item_ids))
        return models.items_result(self._unary("GetItems", request, timeout))

    def _unary(self, name: str, request: Any, timeout: float | None) -> Any:
        rpc = getattr(self._stub, name)
        return self._call(f"{RETRIEVER}/{name}", lambda t, md: rpc(request, timeout=t, metadata=md), timeout)

    def _client_stream(self, name: str, batch: list, timeout: float | None) -> IngestSummary:
        rpc = getattr(self._stub, name)
        reply = self._call(f"{RETRIEVER}/{name}", lambda t, md: rpc(iter(batch), timeout=t, metadata=md), timeout)
        return models.ingest_summary(reply)
