"""Every field of Rank and RankStream requests, bad: refused with the right status and a message naming
the field, before any retriever or model work (nothing is fetched, cached or scored). Also raw
clients (invalid UTF-8, garbage bytes), 100,000 candidates, messages over the size limit, and a
RankStream that fails or is cancelled mid-way. Real model, real servers on loopback."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.reliability import recording
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_svc.config import ModelConfig, RankerConfig, RetrieverConfig, ServerConfig
from ranker_svc.server import start_server

pytestmark = pytest.mark.anyio
INVALID = grpc.StatusCode.INVALID_ARGUMENT
GOOD = "i-sunny-river"


@pytest.fixture(scope="module")
async def ranker(tiny_ranker_dir, retriever):
    servicer, target = retriever
    config = RankerConfig(model=ModelConfig(artifacts_dir=tiny_ranker_dir.parent, dtype="float32", reload_interval_s=0),
                          server=ServerConfig(port=0), retriever=RetrieverConfig(target=target, timeout_s=2.0))
    running = await start_server(config)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield ranker_pb2_grpc.RankerStub(channel), channel, running, servicer
    await channel.close()
    await running.stop(None)


def _policy(**kwargs) -> ranker_pb2.ExitPolicy:
    return ranker_pb2.ExitPolicy(**kwargs)


CASES = [  # (request fields over a valid request, the field the message starts with)
    ({"user_id": "x" * 129}, "user_id"),
    ({"user_id": "u\x00"}, "user_id"),
    ({"user_id": "u\u009f1"}, "user_id"),
    ({"user_id": "u{1}"}, "user_id"),  # would choose its Redis Cluster slot
    ({"candidate_item_ids": [GOOD, "i-\u202esunny"]}, "candidate_item_ids[1]"),  # a bidi override (Cf)
    ({"candidate_item_ids": [GOOD, "x" * 129]}, "candidate_item_ids[1]"),
    ({"candidate_item_ids": ["a\nb"]}, "candidate_item_ids[0]"),
    ({"candidate_item_ids": [GOOD, "i-dull-story", GOOD]}, "candidate_item_ids[2]"),
    ({"candidate_item_ids": [f"i{n}" for n in range(100_000)]}, "candidate_item_ids"),
    ({"num_neighbors": 2**31 - 1}, "num_neighbors"),
    ({"num_neighbors": -(2**31)}, "num_neighbors"),
    ({"exit_policy": _policy(threshold=math.nan)}, "exit_policy.threshold"),
    ({"exit_policy": _policy(threshold=math.inf)}, "exit_policy.threshold"),
    ({"exit_policy": _policy(threshold=-math.inf)}, "exit_policy.threshold"),
    ({"exit_policy": _policy(threshold=3.4e38)}, "exit_policy.threshold"),
    ({"exit_policy": _policy(window=2**31 - 1)}, "exit_policy.window"),
    ({"exit_policy": _policy(window=-(2**31))}, "exit_policy.window"),
    ({"exit_policy": _policy(min_layer=2**31 - 1)}, "exit_policy.min_layer"),
    ({"exit_policy": _policy(criterion=-1)}, "exit_policy.criterion"),
    ({"exit_policy": _policy(criterion=2**31 - 1)}, "exit_policy.criterion"),
    ({"exit_policy": _policy(confidence=math.nan)}, "exit_policy.confidence"),
    ({"exit_policy": _policy(confidence=-math.inf)}, "exit_policy.confidence"),
    ({"exit_policy": _policy(confidence=3.4e38)}, "exit_policy.confidence"),
]
RAW = [  # (request with "zz" in one string field, that field)
    (ranker_pb2.RankRequest(user_id="zz", candidate_item_ids=[GOOD]), "user_id"),
    (ranker_pb2.RankRequest(user_id="u1", candidate_item_ids=[GOOD, "i-zz"]), "candidate_item_ids[1]"),
]


def _request(**changes) -> ranker_pb2.RankRequest:
    return ranker_pb2.RankRequest(**{"user_id": "u1", "candidate_item_ids": [GOOD], **changes})


async def test_every_bad_field_is_refused_by_name_before_any_work(request, ranker):
    stub, channel, running, servicer = ranker
    await stub.Rank(_request(), timeout=30)  # warm: the title is cached
    calls, cached = len(servicer.deadlines), len(running.client.titles)
    batches = running.ranker.batcher.stats.batches
    with recording(request.node.nodeid, "ranker fields", area="bad input") as row:
        for changes, field in CASES:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Rank(_request(**changes), timeout=30)
            assert info.value.code() == INVALID and info.value.details().startswith(field), (changes, field)
        raw = channel.unary_unary("/exitrank.v1.Ranker/Rank")
        for message, field in RAW:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(message.SerializeToString().replace(b"zz", b"\xed\xa0\x80"), timeout=10)  # a UTF-8 surrogate
            assert info.value.code() == INVALID and info.value.details().startswith(f"{field}: invalid UTF-8")
        for garbage in (b"\x0a\xff", b"\x12\x02a", b"\xff" * 8):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(garbage, timeout=10)
            assert info.value.code() == INVALID and "wire format" in info.value.details(), info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:  # 4.6 MB: over the 4 MiB default
            await stub.Rank(_request(candidate_item_ids=[f"{n:045d}" for n in range(100_000)]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-receive-bytes" in info.value.details()
        # no retriever call, no new cached title, no model batch for any of them
        assert (len(servicer.deadlines), len(running.client.titles)) == (calls, cached)
        assert running.ranker.batcher.stats.batches == batches
        row.sent = row.refused = len(CASES) + len(RAW) + 3 + 1
        row.measured = (f"{len(CASES)} Rank requests (129-byte, control-character, brace and bidi ids, a duplicate "
                        f"candidate, 100,000 "
                        f"candidates, +-2^31 neighbours/window/min_layer, NaN/inf/3.4e38 thresholds, unknown criteria) "
                        f"INVALID_ARGUMENT naming the field; invalid UTF-8 from a raw client in user_id and "
                        f"candidate_item_ids[1] and 3 garbage payloads INVALID_ARGUMENT naming the field (gRPC alone "
                        f"answers UNKNOWN); a 4.6 MB request RESOURCE_EXHAUSTED; 0 retriever calls, 0 titles cached, "
                        f"0 model batches for all of them")


async def test_rank_stream_fails_by_field_and_survives_a_cancelled_client(request, ranker, catalog):
    stub, channel, running, _ = ranker
    ids = sorted(catalog)
    with recording(request.node.nodeid, "cancelled stream", area="bad input") as row:
        bad = [_request(candidate_item_ids=ids[:2]), _request(num_neighbors=99), _request(candidate_item_ids=ids[2:4])]
        seen = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for reply in stub.RankStream(iter(bad), timeout=30):
                seen.append(reply)
        assert len(seen) == 1 and info.value.code() == INVALID and info.value.details().startswith("num_neighbors")

        async def endless():
            n = 0
            while True:
                yield _request(candidate_item_ids=ids[n % 20 : n % 20 + 3])
                n += 1
                await asyncio.sleep(0.01)

        call = stub.RankStream(endless(), timeout=30)
        got = [await call.read() for _ in range(5)]
        call.cancel()  # the client goes away mid-stream
        assert all(len(r.scores) == 3 for r in got)
        await asyncio.sleep(0.2)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert len((await stub.Rank(_request(), timeout=30)).scores) == 1
        assert running.ranker.batcher.pending == 0  # nothing of the cancelled stream left queued
        row.sent, row.refused = len(bad) + len(got) + 1, 1
        row.measured = ("RankStream with a bad num_neighbors as 2nd request: 1 answer, then INVALID_ARGUMENT naming the "
                        "field; a client cancelling an endless RankStream after 5 answers: the ranker stays SERVING, "
                        "its queue empty, the next Rank served")
