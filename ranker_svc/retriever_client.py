"""``RetrieverClient``: the ranker's :class:`~ranker_svc.ranker.ContextSource` over gRPC ``exitrank.v1.Retriever``.

Failure policy: the ranker must answer even when retrieval cannot. ``get_context`` returns None for
NOT_FOUND (unknown user) and for any transport failure (UNAVAILABLE, deadline), and the ranker then
ranks without neighbours. Titles are required to build prompts, so ``get_titles`` serves what the
bounded LRU cache (:class:`TitleCache`) holds, re-reads titles the catalog changed since, and raises
:class:`ContextUnavailable` only for ids whose title it never saw while the retriever cannot be
reached. Every call carries ``retriever.timeout_s``, or the ranker caller's remaining
deadline when that is shorter (the gRPC deadline propagates to the retriever), and the
ranker call's ``x-request-id`` and trace context (``exitrank.observability``).

Circuit breaker (:class:`CircuitBreaker`, ``retriever.breaker_failures``/``breaker_cooldown_s``):
after that many consecutive failed calls (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN; an
answer such as NOT_FOUND counts as success) the breaker opens and for the cool-down every call
skips the retriever at once: ``get_context`` returns None, ``get_titles`` serves the cache and
raises :class:`ContextUnavailable` ("circuit open", with the time to the next probe) for ids never seen,
so a dead or hung retriever costs a request no waiting. Then one call is let through (half-open);
its success closes the breaker, its failure opens it for another cool-down. The channel retries
its connection at least every ``RECONNECT_BACKOFF_MS``, so a returning retriever is seen at the
first probe after it is back.

The channel is TLS when ``retriever.tls``/``tls_ca`` is set, presenting ``tls_cert`` for a
retriever that requires mutual TLS (``exitrank.grpc_security.open_channel``); with
``retriever.token_file`` every call also carries ``authorization: Bearer <token>``, for a retriever
whose access policy knows this ranker by token (``exitrank.access``). It accepts replies
up to the retriever's default send limit (16 MiB, ``Limits.max_send_bytes``) rather than gRPC's
client default of 4 MiB, which a GetContext at its bounds (100 neighbours x 200 titles) exceeds.

Collaborative soft tokens: a ranker trained on embedding version V passes ``embedding_version=V``;
contexts and items then carry V's vectors (candidate vectors cached per version beside the titles),
and a retriever that no longer keeps V, or answers another version, raises
:class:`EmbeddingVersionUnavailable` instead of returning vectors the model cannot read.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import grpc
import numpy as np

from exitrank.access import BEARER_KEY, read_token
from exitrank.grpc_security import open_channel
from exitrank.observability import tracing
from exitrank.observability.context import outgoing_metadata
from exitrank.security import Limits, load_client_tls
from exitrank.types import HistoryItem, NeighborContext, UserContext
from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from ranker_svc.config import RetrieverConfig
from ranker_svc.errors import ContextUnavailable, EmbeddingVersionUnavailable, RetrieverOverloaded

log = logging.getLogger(__name__)
GET_ITEMS_CHUNK = 10_000  # the retriever's GetItems limit
MAX_RETRIEVER_K = 100
MAX_RETRIEVER_HISTORY = 200
MAX_REPLY_BYTES = Limits().max_send_bytes  # what a retriever with default limits may send
RECONNECT_BACKOFF_MS = 1000  # gRPC's default backoff grows to 120 s: a returning retriever would wait
# failures of the retriever itself; any other status is an answer (NOT_FOUND: unknown user)
BREAKER_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> half-open after ``cooldown_s``.

    Closed: every call goes through. Open: :meth:`allow` says no until the cool-down has passed.
    Half-open: one call (the probe) goes through, the others are refused; the probe's success
    closes the breaker, its failure opens it again. ``failures`` 0: always closed.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, *, failures: int, cooldown_s: float, clock=time.monotonic) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state = self.CLOSED
        self.consecutive = 0
        self.opened = 0  # times the breaker opened
        self.skipped = 0  # calls refused while open
        self._opened_at = 0.0
        self._probing = False

    def retry_in(self) -> float:
        """Seconds until the next probe may go (0 unless open)."""
        if self.state != self.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self._clock())

    def allow(self) -> bool:
        """Whether a call may go to the retriever now (a True in half-open makes it the probe)."""
        if self.state == self.OPEN and self.retry_in() == 0.0:
            self.state = self.HALF_OPEN
        if self.state == self.CLOSED or (self.state == self.HALF_OPEN and not self._probing):
            self._probing = self.state == self.HALF_OPEN
            return True
        self.skipped += 1
        return False

    def success(self) -> None:
        if self.state != self.CLOSED:
            log.info("retriever answered again: circuit closed")
        self.state, self.consecutive, self._probing = self.CLOSED, 0, False

    def failure(self) -> None:
        self.consecutive += 1
        self._probing = False
        if self.failures and (self.state == self.HALF_OPEN or self.consecutive >= self.failures):
            if self.state == self.CLOSED:  # a failed probe re-opens quietly: one line per outage
                log.warning("retriever failed %d calls in a row: circuit open, skipping it for %.1fs at a time",
                            self.consecutive, self.cooldown_s)
            if self.state != self.OPEN:
                self.opened += 1
            self.state, self._opened_at = self.OPEN, self._clock()

    def release(self) -> None:
        """A call ended without a verdict (its caller was cancelled): another call may probe."""
        self._probing = False


class TitleCache:
    """A bounded LRU of catalog titles, each tagged with the catalog version it was read at.

    Titles do not expire with time. The retriever sends its ``catalog_version`` (which every
    UpsertItems changes) with every GetContext and GetItems answer (:meth:`observe`); a title read at
    another version is re-read the next time the retriever can be asked, and is still served while
    it cannot be (``stale_ok``: the last title known), so a ranker keeps ranking every item it has
    seen while the retriever is down. ``capacity`` (``retriever.title_cache_size``) bounds memory:
    the least recently used title goes first.
    """

    def __init__(self, *, capacity: int) -> None:
        self.capacity = capacity
        self.version: int | None = None  # the newest catalog version the retriever answered with
        self._entries: OrderedDict[str, tuple[str, int | None]] = OrderedDict()

    def observe(self, version: int) -> None:
        """The retriever answered with catalog ``version``: titles read at another one are stale."""
        self.version = version

    def get(self, item_id: str, *, stale_ok: bool = False) -> str | None:
        """The item's title when current (any title known with ``stale_ok``), else None."""
        entry = self._entries.get(item_id)
        if entry is None:
            return None
        title, version = entry
        if not stale_ok and version != self.version:
            return None
        self._entries.move_to_end(item_id)
        return title

    def put(self, item_id: str, title: str) -> None:
        """Remembers a title read at the current catalog version."""
        if self.capacity == 0 or not title:
            return
        self._entries[item_id] = (title, self.version)
        self._entries.move_to_end(item_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class RetrieverClient:
    """Context and titles from a retriever service.

    Args:
        config: target, per-call timeout and title cache settings.
        channel: an existing channel (tests, shared channels); default: a channel to target, TLS
            per ``config.tls*`` (``TLSConfigError`` for unusable files).
    """

    def __init__(self, *, config: RetrieverConfig, channel: grpc.aio.Channel | None = None) -> None:
        if channel is None and not config.target:
            raise ValueError("retriever.target is empty: pass --retriever HOST:PORT")
        self.config = config
        token = None if config.token_file is None else read_token(config.token_file, "retriever.token_file")
        self._auth = () if token is None else ((BEARER_KEY, f"Bearer {token}"),)
        self._channel = channel or open_channel(config.target, load_client_tls(config.client_tls()), options=[
            ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
            ("grpc.initial_reconnect_backoff_ms", min(100, RECONNECT_BACKOFF_MS)),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS)])
        self._stub = retriever_pb2_grpc.RetrieverStub(self._channel)
        self.titles = TitleCache(capacity=config.title_cache_size)
        self._vectors = VectorCache(capacity=config.title_cache_size)  # (version, item) -> vector
        self.breaker = CircuitBreaker(failures=config.breaker_failures, cooldown_s=config.breaker_cooldown_s)

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        """The call's request id and trace context, and this ranker's bearer token when it has one."""
        return [*outgoing_metadata(), *self._auth]

    async def _call(self, name: str, rpc, request, timeout_s: float):
        """One retriever call carrying this request's ``x-request-id`` and, when tracing is on,
        the trace context of a client span around it; the breaker sees its outcome."""
        verdict = False
        try:
            with tracing.span(name, kind="client", attributes={"rpc.system": "grpc"}):
                reply = await rpc(request, timeout=timeout_s, metadata=self._metadata())
            verdict = True
            self.breaker.success()
            return reply
        except grpc.aio.AioRpcError as exc:
            verdict = True
            if exc.code() in BREAKER_FAILURES:
                self.breaker.failure()
            else:
                self.breaker.success()
            raise
        finally:
            if not verdict:
                self.breaker.release()

    def _open_message(self) -> str:
        return (f"retriever at {self.config.target or 'the configured channel'} is skipped: circuit open after "
                f"{self.breaker.consecutive} failed calls, next probe in {self.breaker.retry_in():.1f}s "
                "(retriever.breaker_failures, retriever.breaker_cooldown_s)")

    def _timeout(self, timeout_s: float | None) -> float:
        return self.config.timeout_s if timeout_s is None else max(0.0, min(self.config.timeout_s, timeout_s))

    async def get_context(self, user_id: str, k: int, max_history: int, *,
                          timeout_s: float | None = None, embedding_version: str | None = None) -> UserContext | None:
        request = retriever_pb2.ContextRequest(
            user_id=user_id, k=min(k, MAX_RETRIEVER_K), max_history=max(1, min(max_history, MAX_RETRIEVER_HISTORY)),
            with_embeddings=embedding_version is not None, embedding_version=embedding_version or "",
        )
        if not self.breaker.allow():
            return None
        try:
            reply = await self._call("exitrank.v1.Retriever/GetContext", self._stub.GetContext, request, self._timeout(timeout_s))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and embedding_version is not None:
                raise EmbeddingVersionUnavailable(embedding_version, exc.details() or "") from exc
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("GetContext(%r) failed: %s %s", user_id, exc.code().name, exc.details())
            return None
        _check_version(embedding_version, reply.vectors_version)
        ctx = _user_context(reply)
        self.titles.observe(reply.catalog_version)
        for item in ctx.history + tuple(h for n in ctx.neighbors for h in n.history):
            self.titles.put(item.item_id, item.title)
        return ctx

    async def get_titles(self, item_ids: Sequence[str], *, timeout_s: float | None = None,
                         embedding_version: str | None = None) -> dict[str, str]:
        """Titles of the known ids; with ``embedding_version`` a miss also fetches (and caches)
        the item's vector of that version, and an id whose vector is not cached counts as a miss.

        Stale titles (read before the catalog last changed) are read again; when the retriever
        cannot answer, the last titles known serve, and only ids without any raise
        :class:`ContextUnavailable`."""
        found: dict[str, str] = {}
        misses = []
        for item_id in item_ids:
            title = self.titles.get(item_id)
            if title is None or not self._has_vector(embedding_version, item_id):
                misses.append(item_id)
            else:
                found[item_id] = title
        try:
            for start in range(0, len(misses), GET_ITEMS_CHUNK):
                found.update(await self._fetch(misses[start : start + GET_ITEMS_CHUNK], self._timeout(timeout_s),
                                               embedding_version))
        except EmbeddingVersionUnavailable:
            raise
        except ContextUnavailable:
            known = {i: t for i in misses if i not in found and self._has_vector(embedding_version, i)
                     and (t := self.titles.get(i, stale_ok=True)) is not None}
            if len(found) + len(known) < len(item_ids):
                raise
            found.update(known)  # the retriever is away: the last titles known
        return found

    def _has_vector(self, embedding_version: str | None, item_id: str) -> bool:
        return embedding_version is None or (embedding_version, item_id) in self._vectors

    async def pinned_version_problem(self, version: str, *, timeout_s: float = 5.0) -> str | None:
        """Why the retriever cannot give the vectors of embedding ``version`` (the message a Rank
        would fail with), or None when it can, or cannot be asked now (an unreachable retriever is
        the breaker's business: ranking goes on without it). One GetItems for no items."""
        request = retriever_pb2.GetItemsRequest(with_embeddings=True, embedding_version=version)
        try:
            reply = await self._stub.GetItems(request, timeout=timeout_s, metadata=self._metadata())
            _check_version(version, reply.vectors_version)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                return None
            return str(EmbeddingVersionUnavailable(version, exc.details() or ""))
        except EmbeddingVersionUnavailable as exc:
            return str(exc)
        return None

    async def get_item_vectors(self, item_ids: Sequence[str], *, embedding_version: str,
                               timeout_s: float | None = None) -> dict[str, np.ndarray | None]:
        """The items' vectors of ``embedding_version`` (None for items the version lacks)."""
        await self.get_titles(item_ids, timeout_s=timeout_s, embedding_version=embedding_version)
        return {i: self._vectors.get((embedding_version, i)) for i in item_ids}

    async def _fetch(self, item_ids: list[str], timeout_s: float, embedding_version: str | None = None
                     ) -> dict[str, str]:
        if not self.breaker.allow():
            raise ContextUnavailable(f"{self._open_message()}; {len(item_ids)} candidate titles are not cached")
        request = retriever_pb2.GetItemsRequest(item_ids=item_ids, with_embeddings=embedding_version is not None,
                                                embedding_version=embedding_version or "")
        try:
            reply = await self._call("exitrank.v1.Retriever/GetItems", self._stub.GetItems, request, timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and embedding_version is not None:
                raise EmbeddingVersionUnavailable(embedding_version, exc.details() or "") from exc
            # gRPC's details name addresses and transport internals: logged, not passed to the caller
            log.warning("GetItems of %d ids failed: %s %s", len(item_ids), exc.code().name, exc.details())
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise RetrieverOverloaded("the retriever refused the candidate titles' look-up for load "
                                          "(RESOURCE_EXHAUSTED); retry with backoff") from exc
            raise ContextUnavailable(
                f"the retriever could not resolve candidate titles ({exc.code().name}); retry later"
            ) from exc
        _check_version(embedding_version, reply.vectors_version)
        self.titles.observe(reply.catalog_version)
        out = {}
        for item in reply.items:
            self.titles.put(item.item_id, item.title)
            if embedding_version is not None:
                self._vectors.put((embedding_version, item.item_id), _vector(item.embedding))
            out[item.item_id] = item.title
        return out


class VectorCache:
    """A bounded LRU of items' vectors per embedding version (they never change within one)."""

    _MISSING = object()

    def __init__(self, *, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], np.ndarray | None] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        value = self._entries.get(key)
        if key in self._entries:
            self._entries.move_to_end(key)
        return value

    def put(self, key: tuple[str, str], vector: np.ndarray | None) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = vector
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


def _check_version(asked: str | None, answered: str) -> None:
    """A pinned version must be the one that answered (an empty pin takes the current one)."""
    if asked and answered != asked:
        raise EmbeddingVersionUnavailable(asked, f"the retriever answered with version {answered!r}")


def _vector(values) -> np.ndarray | None:
    return np.asarray(values, dtype=np.float32) if len(values) else None


def _history(items: Sequence[common_pb2.HistoryItem]) -> tuple[HistoryItem, ...]:
    return tuple(HistoryItem(h.item_id, h.title, float(h.rating), int(h.timestamp_ms), _vector(h.embedding))
                 for h in items)


def _user_context(reply: retriever_pb2.UserContext) -> UserContext:
    return UserContext(
        user_id=reply.user_id,
        history=_history(reply.history),
        neighbors=tuple(NeighborContext(n.user_id, float(n.score), _history(n.history)) for n in reply.neighbors),
        embedding_version=reply.embedding_version,
        user_embedding=_vector(reply.user_embedding),
        vectors_version=reply.vectors_version,
    )
