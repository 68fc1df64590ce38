"""The ranker's admission per client, with the tiny real model behind ``start_server`` and real gRPC
retrievers on loopback: one client's RankStream cannot take every slot of
``batching.max_pending_requests`` (a second client's Rank is still served), and a retriever shedding
load reaches the caller as RESOURCE_EXHAUSTED, which the SDK does not retry, instead of UNAVAILABLE,
which it retries (so a retry policy never multiplies an overload)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from exitrank.client import aio as sdk
from exitrank.client.errors import Overloaded
from exitrank.grpc_security import CLIENT_ID_KEY, bind, find_guard, server_kwargs
from exitrank.security import Limits
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc, retriever_pb2, retriever_pb2_grpc
from ranker_svc.config import BatchingConfig, ModelConfig, RankerConfig, RetrieverConfig, ServerConfig
from ranker_svc.server import start_server
from tests.support.reliability import recording

pytestmark = pytest.mark.anyio
CODE = grpc.StatusCode
PENDING = 4


@contextlib.asynccontextmanager
async def served_retriever(servicer, limits: Limits | None = None):
    """``(address, guard)`` of ``servicer`` on loopback behind the production guard."""
    kwargs = server_kwargs(limits or Limits())
    server = grpc.aio.server(**kwargs)
    retriever_pb2_grpc.add_RetrieverServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1:0", None)
    await server.start()
    try:
        yield f"127.0.0.1:{port}", find_guard(kwargs["interceptors"])
    finally:
        await server.stop(None)


def _config(artifacts, target: str, **batching) -> RankerConfig:
    return RankerConfig(model=ModelConfig(artifacts_dir=artifacts, dtype="float32", reload_interval_s=0),
                        server=ServerConfig(port=0), batching=BatchingConfig(max_pending_requests=PENDING, **batching),
                        retriever=RetrieverConfig(target=target, timeout_s=5, breaker_failures=0),
                        limits=Limits(trust_client_id=True))


async def _until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.002)


async def _flood_then_rank(running, share: int, users: list[str], items: list[str]
                           ) -> tuple[int, grpc.StatusCode, str]:
    """Client A's RankStream of 20 requests (8 in flight, a slow retriever holding each); once A holds
    all it may (``share`` slots), client B's Rank: (A's slots then, B's status, B's details)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        requests = [ranker_pb2.RankRequest(user_id=users[n % len(users)], candidate_item_ids=items[n % 5: n % 5 + 3])
                    for n in range(20)]
        stream = stub.RankStream(iter(requests), timeout=60, metadata=((CLIENT_ID_KEY, "A"),))
        await _until(lambda: running.ranker.in_progress("id:A") >= share)
        held = running.ranker.in_progress("id:A")
        try:
            await stub.Rank(requests[0], timeout=30, metadata=((CLIENT_ID_KEY, "B"),))
            code, details = CODE.OK, ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details()
        stream.cancel()
        return held, code, details


async def test_one_clients_rank_stream_leaves_room_for_another_client(request, tiny_ranker_dir, memory_retriever,
                                                                      examples, catalog):
    slow = memory_retriever()
    slow.delay_s = 0.5  # every retrieval holds its request's slot half a second
    users, items = [ex.context.user_id for ex in examples], sorted(catalog)
    outcomes = {}
    async with served_retriever(slow) as (target, _):
        for name, per_client in (("shared", 0), ("no share", PENDING)):  # 0: three quarters of PENDING
            running = await start_server(_config(tiny_ranker_dir.parent, target, max_pending_per_client=per_client))
            try:
                outcomes[name] = await _flood_then_rank(running, per_client or (3 * PENDING) // 4, users, items)
            finally:
                await running.stop(None)
    with recording(request.node.nodeid, "overload", area="faults") as row:
        held, code, _ = outcomes["shared"]
        assert held == 3 and code == CODE.OK, outcomes
        # the same flood with the share turned off takes every slot: B is refused (what the share prevents)
        held_all, refused, details = outcomes["no share"]
        assert held_all == PENDING and refused == CODE.RESOURCE_EXHAUSTED and "max_pending_requests" in details
        row.sent, row.refused = 2, 1
        row.measured = (f"batching.max_pending_requests={PENDING}: client A's RankStream (8 requests in flight, a "
                        f"retriever slowed to 0.5 s) held {held}, its share (three quarters), and client B's Rank was "
                        f"served; with max_pending_per_client={PENDING} the same stream held all {held_all} and B was "
                        "refused RESOURCE_EXHAUSTED")


async def test_a_retriever_shedding_load_is_resource_exhausted_and_not_retried(request, tiny_ranker_dir,
                                                                              memory_retriever, catalog):
    items = sorted(catalog)[:3]
    async with served_retriever(memory_retriever(), Limits(rate_per_s=0.001, burst=1)) as (target, guard):
        running = await start_server(_config(tiny_ranker_dir.parent, target))
        try:
            async with grpc.aio.insecure_channel(target) as channel:  # this host's one token: spent
                await retriever_pb2_grpc.RetrieverStub(channel).GetItems(
                    retriever_pb2.GetItemsRequest(item_ids=items[:1]), timeout=10)
            with recording(request.node.nodeid, "overload", area="faults") as row:
                async with sdk.AsyncRankerClient(f"127.0.0.1:{running.port}", retries=3) as client:
                    with pytest.raises(Overloaded) as refused:
                        await client.rank("u1", items, timeout=30)
                assert refused.value.code == CODE.RESOURCE_EXHAUSTED and refused.value.attempts == 1
                assert refused.value.message == ("the retriever refused the candidate titles' look-up for load "
                                                 "(RESOURCE_EXHAUSTED); retry with backoff")
                # one Rank reached the retriever as one GetContext and one GetItems, both refused; an
                # UNAVAILABLE would have been retried 3 times: 8 calls on an overloaded retriever
                assert guard.refusals["rate_limit"] == 2
                row.sent, row.refused = 1, 1
                row.measured = ("a retriever refusing for load (its rate limit): the ranker's Rank ends "
                                "RESOURCE_EXHAUSTED 'retry with backoff' (was UNAVAILABLE), the SDK with 3 retries "
                                "makes 1 attempt, the retriever sees 2 calls (GetContext, GetItems), not 8")
        finally:
            await running.stop(None)
