"""asyncio clients (``grpc.aio``) with the same methods, results, errors and retries as ``sync.py``.

    from exitrank.client.aio import AsyncRankerClient

    async with AsyncRankerClient("127.0.0.1:50052", timeout=1.0) as ranker:
        result = await ranker.rank("u42", ["i1", "i2"])

Create and use a client inside one running event loop (a ``grpc.aio`` channel belongs to the loop
it was made in). ``ingest`` and ``upsert_items`` also take async iterables.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exitrank.client import models
from exitrank.client._common import RANKER, RETRIEVER, ClientSettings, Metadata, achunks, item_ids, settings
from exitrank.client.errors import from_rpc_error
from exitrank.client.models import ExitPolicy, IngestSummary, Interaction, Item, ItemsResult, NearestUsers
from exitrank.client.retry import RetryPolicy
from exitrank.client.sync import DEFAULT_TIMEOUT_S, INGEST_BATCH
from exitrank.types import RankResult, UserContext
from exitrank.v1 import ranker_pb2_grpc, retriever_pb2, retriever_pb2_grpc

T = TypeVar("T")


class AsyncServiceClient:
    """The aio channel and the retry loop; see ``sync._Client`` for the arguments."""

    service = ""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT_S, retries: int = 3,
                 retry_policy: RetryPolicy | None = None, credentials: grpc.ChannelCredentials | None = None,
                 metadata: Metadata = (), options: Sequence[tuple[str, Any]] = ()) -> None:
        self.settings: ClientSettings = settings(target, timeout=timeout, retries=retries, retry_policy=retry_policy,
                                                 credentials=credentials, metadata=metadata, options=options)
        args = self.settings.channel_args()
        self._channel = (grpc.aio.secure_channel(target, credentials, options=args) if credentials is not None
                         else grpc.aio.insecure_channel(target, options=args))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def health(self, *, service: str | None = None, timeout: float | None = None) -> str:
        """The gRPC health status name of ``service`` (default: this client's service)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=self.service if service is None else service)
        reply = await self._call("grpc.health.v1.Health/Check",
                                 lambda t, md: stub.Check(request, timeout=t, metadata=md), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def _call(self, method: str, invoke: Callable[[float, tuple], Awaitable[T]], timeout: float | None) -> T:
        """Awaits ``invoke(remaining_s, metadata)`` under the same retry rules as the sync client."""
        deadline = time.monotonic() + self.settings.deadline_s(timeout)
        attempts = 0
        while True:
            attempts += 1
            try:
                return await invoke(max(deadline - time.monotonic(), 1e-3), self.settings.metadata)
            except grpc.RpcError as exc:
                delay = self.settings.retry.next_delay(exc.code(), attempts, deadline - time.monotonic())
                if delay is None:
                    raise from_rpc_error(exc, method=method, attempts=attempts) from exc
            await asyncio.sleep(delay)


class AsyncRankerClient(AsyncServiceClient):
    """``exitrank.v1.Ranker`` over asyncio; see :class:`exitrank.client.RankerClient`."""

    service = RANKER

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = ranker_pb2_grpc.RankerStub(self._channel)

    async def rank(self, user_id: str, items: Iterable[str], *, num_neighbors: int = 0,
                   exit_policy: ExitPolicy | None = None, timeout: float | None = None) -> RankResult:
        request = models.rank_request(user_id, item_ids(items), num_neighbors, exit_policy)
        reply = await self._call(f"{RANKER}/Rank", lambda t, md: self._stub.Rank(request, timeout=t, metadata=md),
                                 timeout)
        return models.rank_result(reply)


class AsyncRetrieverClient(AsyncServiceClient):
    """``exitrank.v1.Retriever`` over asyncio; see :class:`exitrank.client.RetrieverClient`."""

    service = RETRIEVER

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = retriever_pb2_grpc.RetrieverStub(self._channel)

    async def ingest(self, interactions: Iterable[Interaction] | AsyncIterable[Interaction], *,
                     batch_size: int = INGEST_BATCH, timeout: float | None = None) -> IngestSummary:
        """Batched, at-least-once ``Ingest`` (see ``RetrieverClient.ingest``)."""
        total = IngestSummary()
        async for batch in achunks(interactions, batch_size):
            total += await self._client_stream("Ingest", [models.interaction_pb(e) for e in batch], timeout)
        return total

    async def upsert_items(self, items: Iterable[Item] | AsyncIterable[Item], *, batch_size: int = INGEST_BATCH,
                           timeout: float | None = None) -> IngestSummary:
        total = IngestSummary()
        async for batch in achunks(items, batch_size):
            total += await self._client_stream("UpsertItems", [models.item_pb(i) for i in batch], timeout)
        return total

    async def nearest_users(self, user_id: str, k: int = 10, *, timeout: float | None = None) -> NearestUsers:
        request = retriever_pb2.NearestUsersRequest(user_id=user_id, k=k)
        return models.nearest_users(await self._unary("NearestUsers", request, timeout))

    async def get_context(self, user_id: str, *, k: int = 4, max_history: int = 20,
                          timeout: float | None = None) -> UserContext:
        request = retriever_pb2.ContextRequest(user_id=user_id, k=k, max_history=max_history)
        return models.user_context(await self._unary("GetContext", request, timeout))

    async def get_items(self, item_ids: Iterable[str], *, timeout: float | None = None) -> ItemsResult:
        request = retriever_pb2.GetItemsRequest(item_ids=list(item_ids))
        return models.items_result(await self._unary("GetItems", request, timeout))

    async def _unary(self, name: str, request: Any, timeout: float | None) -> Any:
        rpc = getattr(self._stub, name)
        return await self._call(f"{RETRIEVER}/{name}", lambda t, md: rpc(request, timeout=t, metadata=md), timeout)

    async def _client_stream(self, name: str, batch: list, timeout: float | None) -> IngestSummary:
        rpc = getattr(self._stub, name)
        reply = await self._call(f"{RETRIEVER}/{name}", lambda t, md: rpc(iter(batch), timeout=t, metadata=md),
                                 timeout)
        return models.ingest_summary(reply)
