"""The Ranker gRPC service on loopback: real core, real tiny model, real in-process Retriever server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_svc.config import ModelConfig, RankerConfig, RetrieverConfig, ServerConfig
from ranker_svc.server import start_server

pytestmark = pytest.mark.anyio


def config_for(tiny_ranker_dir, target: str, timeout_s: float = 2.0) -> RankerConfig:
    return RankerConfig(model=ModelConfig(artifacts_dir=tiny_ranker_dir.parent, dtype="float32"),
                        server=ServerConfig(port=0), retriever=RetrieverConfig(target=target, timeout_s=timeout_s))


@pytest.fixture(scope="module")
async def stub(tiny_ranker_dir, retriever):
    _, target = retriever
    running = await start_server(config_for(tiny_ranker_dir, target))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield ranker_pb2_grpc.RankerStub(channel), channel, running
    await channel.close()
    await running.stop(None)


async def test_rank_scores_every_candidate_in_order(stub, examples, catalog):
    ranker, _, running = stub
    ids = sorted(catalog)[:6][::-1]
    reply = await ranker.Rank(ranker_pb2.RankRequest(user_id=examples[0].context.user_id, candidate_item_ids=ids),
                              timeout=30)
    assert [s.item_id for s in reply.scores] == ids
    assert all(0.0 < s.ctr < 1.0 for s in reply.scores)
    assert {s.exit_layer for s in reply.scores} <= set(running.ranker.current.scorer.model.answer_layers)
    assert reply.retrieval_used and reply.embedding_version == "emb-1"
    assert reply.model_version == running.ranker.model_version


async def test_unknown_user_is_ranked_without_retrieval(stub, catalog):
    ranker, _, _ = stub
    reply = await ranker.Rank(ranker_pb2.RankRequest(user_id="stranger", candidate_item_ids=sorted(catalog)[:2]))
    assert not reply.retrieval_used and reply.embedding_version == "" and len(reply.scores) == 2


async def test_request_policy_overrides_the_calibrated_one(stub, catalog):
    ranker, _, _ = stub
    ids = sorted(catalog)[:5]
    full = await ranker.Rank(ranker_pb2.RankRequest(user_id="u1", candidate_item_ids=ids,
                                                    exit_policy=ranker_pb2.ExitPolicy(disabled=True)))
    assert {s.exit_layer for s in full.scores} == {6}
    # confidence >= 0.5 always holds: every row exits at the first head
    first = await ranker.Rank(ranker_pb2.RankRequest(user_id="u1", candidate_item_ids=ids, exit_policy=ranker_pb2.ExitPolicy(
        criterion=ranker_pb2.EXIT_CRITERION_CONFIDENCE, threshold=0.5)))
    assert {s.exit_layer for s in first.scores} == {1}
    late = await ranker.Rank(ranker_pb2.RankRequest(user_id="u1", candidate_item_ids=ids, exit_policy=ranker_pb2.ExitPolicy(
        criterion=ranker_pb2.EXIT_CRITERION_CONFIDENCE, threshold=0.5, min_layer=4)))
    assert {s.exit_layer for s in late.scores} == {4}



async def test_request_confidence_exit_is_present_or_absent(stub, catalog):
    ranker, _, _ = stub
    ids = sorted(catalog)[:5]

    def rank(**policy):
        return ranker.Rank(ranker_pb2.RankRequest(user_id="u1", candidate_item_ids=ids,
                                                  exit_policy=ranker_pb2.ExitPolicy(**policy)))

    # the delta test cannot fire before the third head; a confidence exit of 0.5 always holds at the first
    delta = dict(criterion=ranker_pb2.EXIT_CRITERION_PROBABILITY_DELTA, threshold=1.0, window=1)
    assert {s.exit_layer for s in (await rank(**delta)).scores} == {3}
    assert {s.exit_layer for s in (await rank(**delta, confidence=0.51)).scores} == {1}
    # present and 0 turns it off (proto3 optional): the delta test decides again
    assert {s.exit_layer for s in (await rank(**delta, confidence=0.0)).scores} == {3}


def _policy(**kwargs) -> ranker_pb2.ExitPolicy:
    return ranker_pb2.ExitPolicy(**kwargs)


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"candidate_item_ids": []}, "candidate_item_ids"),
        ({"candidate_item_ids": ["x", "x"]}, "candidate_item_ids[1]"),
        ({"candidate_item_ids": [f"i{n}" for n in range(513)]}, "candidate_item_ids"),
        ({"candidate_item_ids": ["ok", ""]}, "candidate_item_ids[1]"),
        ({"num_neighbors": 17}, "num_neighbors"),
        ({"num_neighbors": -2}, "num_neighbors"),
        ({"exit_policy": _policy(threshold=1.5)}, "exit_policy.threshold"),
        ({"exit_policy": _policy(threshold=-0.1)}, "exit_policy.threshold"),
        ({"exit_policy": _policy(window=17)}, "exit_policy.window"),
        ({"exit_policy": _policy(window=-1)}, "exit_policy.window"),
        ({"exit_policy": _policy(min_layer=-3)}, "exit_policy.min_layer"),
        ({"exit_policy": _policy(min_layer=99)}, "exit_policy.min_layer"),
        ({"exit_policy": _policy(criterion=9)}, "exit_policy.criterion"),
        ({"exit_policy": _policy(confidence=0.3)}, "exit_policy.confidence"),
        ({"exit_policy": _policy(confidence=1.5)}, "exit_policy.confidence"),
    ],
)
async def test_invalid_argument_names_the_field(stub, request_kwargs, field):
    ranker, _, _ = stub
    request = {"user_id": "u1", "candidate_item_ids": ["i-sunny-river"], **request_kwargs}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ranker.Rank(ranker_pb2.RankRequest(**request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)


async def test_unknown_items_are_not_found_by_name(stub, catalog):
    ranker, _, _ = stub
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ranker.Rank(ranker_pb2.RankRequest(user_id="u1", candidate_item_ids=[sorted(catalog)[0], "nope-7"]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "'nope-7'" in info.value.details()


async def test_rank_stream_answers_in_order_and_stops_at_the_first_error(stub, catalog):
    ranker, _, _ = stub
    ids = sorted(catalog)
    requests = [ranker_pb2.RankRequest(user_id=f"u{n}", candidate_item_ids=ids[n : n + 3]) for n in range(3)]
    replies = [r async for r in ranker.RankStream(iter(requests))]
    assert [[s.item_id for s in r.scores] for r in replies] == [ids[n : n + 3] for n in range(3)]
    bad = [requests[0], ranker_pb2.RankRequest(user_id="u1", candidate_item_ids=[]), requests[1]]
    seen = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for reply in ranker.RankStream(iter(bad)):
            seen.append(reply)
    assert len(seen) == 1 and info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_slow_retriever_hits_the_callers_deadline_and_the_server_keeps_serving(stub, retriever, catalog):
    ranker, _, _ = stub
    servicer, _ = retriever
    servicer.delay_s = 1.0
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ranker.Rank(ranker_pb2.RankRequest(user_id="u2", candidate_item_ids=["i-dull-forest"]), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        servicer.delay_s = 0.0
    reply = await ranker.Rank(ranker_pb2.RankRequest(user_id="u2", candidate_item_ids=["i-dull-forest"]))
    assert len(reply.scores) == 1


async def test_health_and_reflection(stub):
    _, channel, _ = stub
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "exitrank.v1.Ranker"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {"exitrank.v1.Ranker", "grpc.health.v1.Health"} <= names


async def test_retriever_down_gives_unavailable(tiny_ranker_dir, catalog):
    running = await start_server(config_for(tiny_ranker_dir, "127.0.0.1:1", timeout_s=0.3))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ranker_pb2_grpc.RankerStub(channel).Rank(
                    ranker_pb2.RankRequest(user_id="u1", candidate_item_ids=sorted(catalog)[:1]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "titles" in info.value.details()
    finally:
        await running.stop(None)


def test_core_never_imports_grpc():
    code = ("import sys, ranker_svc.ranker, ranker_svc.model, ranker_svc.exits, ranker_svc.prompt, "
            "ranker_svc.artifact; bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


async def test_the_callers_deadline_reaches_the_retriever(stub, retriever, catalog):
    ranker, _, _ = stub
    servicer, _ = retriever
    servicer.deadlines.clear()
    await ranker.Rank(ranker_pb2.RankRequest(user_id="u3", candidate_item_ids=sorted(catalog)[-2:]), timeout=1.5)
    # the retriever calls carry the caller's remaining time (below the configured 2 s retriever timeout)
    assert servicer.deadlines and all(d is not None and 0 < d <= 1.6 for d in servicer.deadlines)


async def test_concurrent_calls_are_batched_and_streams_keep_order(tiny_ranker_dir, retriever, catalog):
    _, target = retriever
    config = config_for(tiny_ranker_dir, target).with_section("batching", max_wait_ms=100.0)
    running = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = ranker_pb2_grpc.RankerStub(channel)
            ids = sorted(catalog)
            calls = [stub.Rank(ranker_pb2.RankRequest(user_id=f"u{n}", candidate_item_ids=ids[n : n + 4]), timeout=30)
                     for n in range(6)]
            replies = await asyncio.gather(*calls)
            assert [[s.item_id for s in r.scores] for r in replies] == [ids[n : n + 4] for n in range(6)]
            assert running.ranker.batcher.stats.largest_batch_jobs > 1  # calls shared a batch
            before = running.ranker.batcher.stats.batches
            requests = [ranker_pb2.RankRequest(user_id=f"u{n}", candidate_item_ids=ids[n : n + 2]) for n in range(6)]
            streamed = [r async for r in stub.RankStream(iter(requests))]
            assert [[s.item_id for s in r.scores] for r in streamed] == [ids[n : n + 2] for n in range(6)]
            assert running.ranker.batcher.stats.batches - before < 6  # the stream's requests were in flight together
    finally:
        await running.stop(None)
