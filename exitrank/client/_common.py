"""Pieces the sync and the asyncio clients share: settings, argument checks, batching."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

import grpc

from exitrank.client.retry import RetryPolicy
from exitrank.v1 import ranker_pb2, retriever_pb2

T = TypeVar("T")
RANKER = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name
RETRIEVER = retriever_pb2.DESCRIPTOR.services_by_name["Retriever"].full_name
Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """What one client object applies to every call.

    Args:
        target: ``HOST:PORT`` (any gRPC target string, e.g. ``dns:///ranker:50052``).
        timeout: default deadline of a call in seconds, retries included; always set.
        retry: the UNAVAILABLE retry policy.
        credentials: ``grpc.ChannelCredentials`` for TLS (``grpc.ssl_channel_credentials(...)``);
            None: a plaintext channel.
        metadata: sent with every call (e.g. an ``authorization`` header).
        options: extra gRPC channel arguments, after the client's own (later ones win).
    """

    target: str
    timeout: float
    retry: RetryPolicy
    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target must be HOST:PORT, got an empty string")
        check_timeout(self.timeout)

    def channel_args(self) -> list[tuple[str, object]]:
        return [*self.retry.channel_options(), *self.options]

    def deadline_s(self, override: float | None) -> float:
        """The call's timeout: ``override`` when given, else the client's default."""
        return self.timeout if override is None else check_timeout(override)


def settings(target: str, *, timeout: float, retries: int, retry_policy: RetryPolicy | None,
             credentials: grpc.ChannelCredentials | None, metadata: Metadata,
             options: Sequence[tuple[str, object]]) -> ClientSettings:
    """The constructor arguments of either client, checked, as one settings object."""
    policy = retry_policy if retry_policy is not None else RetryPolicy(retries=retries)
    return ClientSettings(target=target, timeout=timeout, retry=policy, credentials=credentials,
                          metadata=tuple(metadata), options=tuple(options))


def check_timeout(timeout: float) -> float:
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    return float(timeout)


def item_ids(items: Iterable[str]) -> list[str]:
    """The candidate ids as a list; a lone string is refused (it would be ranked letter by letter)."""
    if isinstance(items, (str, bytes)):
        raise TypeError("items must be a sequence of item ids, not a single string")
    return [str(i) for i in items]


def chunks(iterable: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most ``size`` elements."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    it = iter(iterable)
    while batch := list(islice(it, size)):
        yield batch


async def achunks(iterable: Iterable[T] | AsyncIterable[T], size: int) -> AsyncIterator[list[T]]:
    """``chunks`` for a sync or an async iterable."""
    if not isinstance(iterable, AsyncIterable):
        for batch in chunks(iterable, size):
            yield batch
        return
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    batch: list[T] = []
    async for element in iterable:
        batch.append(element)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
