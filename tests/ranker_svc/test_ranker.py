"""The core Ranker with a real tiny Llama and a real in-memory ContextSource."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ranker_svc.config import BatchingConfig
from ranker_svc.errors import ContextUnavailable, DeadlineExceeded, InvalidArgument, Overloaded, UnknownItems
from ranker_svc.exits import ExitPolicy
from ranker_svc.ranker import Ranker

pytestmark = pytest.mark.anyio


def test_scores_are_probabilities_at_valid_layers(loaded, examples):
    ranker = Ranker(loaded=loaded)
    decisions = ranker.score_examples(examples, ExitPolicy(threshold=0.3, window=1))
    assert len(decisions) == len(examples)
    assert all(0.0 < d.ctr < 1.0 for d in decisions)
    assert {d.exit_layer for d in decisions} <= set(loaded.model.answer_layers)
    assert min(d.exit_layer for d in decisions) >= 3  # the delta criterion needs two discrepancies


def test_disabled_policy_runs_every_row_to_the_last_layer(loaded, examples):
    decisions = Ranker(loaded=loaded).score_examples(examples, ExitPolicy(disabled=True))
    assert {d.exit_layer for d in decisions} == {6}


def test_batching_and_order_do_not_change_scores(loaded, examples):
    ranker = Ranker(loaded=loaded)
    policy = ExitPolicy(threshold=0.05, window=2)
    batched = ranker.score_examples(examples[:16], policy, batch_size=16)
    single = [ranker.score_examples([ex], policy)[0] for ex in examples[:16]]
    reversed_ = ranker.score_examples(examples[:16][::-1], policy, batch_size=5)[::-1]
    for a, b, c in zip(batched, single, reversed_):
        assert a.exit_layer == b.exit_layer == c.exit_layer
        assert a.ctr == pytest.approx(b.ctr, abs=1e-5) and a.ctr == pytest.approx(c.ctr, abs=1e-5)


async def test_rank_uses_retrieval_for_a_known_user(loaded, examples, memory_source_factory, catalog):
    source = memory_source_factory()
    ranker = Ranker(loaded=loaded, context_source=source)
    candidates = sorted(catalog)[:5]
    result = await ranker.rank(user_id=examples[0].context.user_id, candidate_item_ids=candidates, num_neighbors=0)
    assert [s.item_id for s in result.scores] == candidates
    assert result.retrieval_used and result.embedding_version == "emb-1"
    assert result.model_version == loaded.version
    assert source.context_calls[-1][1] == loaded.prompt.config.num_neighbors  # 0 -> the default k
    assert {"retrieval", "inference", "total"} <= set(result.timings_ms)
    # the retrieved prompt is what gets scored: same CTRs as scoring the context offline
    ctx = examples[0].context
    offline = ranker.score_texts([loaded.prompt.full_text(ctx, catalog[i]) for i in candidates])
    assert [s.ctr for s in result.scores] == pytest.approx([d.ctr for d in offline], abs=1e-5)
    await ranker.rank(user_id=ctx.user_id, candidate_item_ids=candidates[:1], num_neighbors=1)
    assert source.context_calls[-1][1] == 1


async def test_unknown_user_or_unreachable_context_ranks_without_retrieval(loaded, memory_source_factory, catalog):
    ranker = Ranker(loaded=loaded, context_source=memory_source_factory())
    result = await ranker.rank(user_id="nobody", candidate_item_ids=sorted(catalog)[:3])
    assert not result.retrieval_used and result.embedding_version == ""
    assert all(0.0 < s.ctr < 1.0 for s in result.scores)

    class ContextDown:  # context fails, titles still resolve (e.g. GetContext times out)
        async def get_context(self, user_id, k, max_history):
            raise TimeoutError("retriever too slow")

        async def get_titles(self, item_ids):
            return {i: catalog[i] for i in item_ids if i in catalog}

    result = await Ranker(loaded=loaded, context_source=ContextDown()).rank(
        user_id="u0", candidate_item_ids=sorted(catalog)[:2])
    assert not result.retrieval_used


async def test_titles_unavailable_is_reported(loaded, memory_source_factory, catalog):
    ranker = Ranker(loaded=loaded, context_source=memory_source_factory(available=False))
    with pytest.raises(ContextUnavailable):
        await ranker.rank(user_id="u0", candidate_item_ids=sorted(catalog)[:2])


async def test_unknown_candidates_are_named(loaded, memory_source_factory, catalog):
    ranker = Ranker(loaded=loaded, context_source=memory_source_factory())
    with pytest.raises(UnknownItems, match="'ghost-1', 'ghost-2'") as info:
        await ranker.rank(user_id="u0", candidate_item_ids=[sorted(catalog)[0], "ghost-1", "ghost-2"])
    assert info.value.item_ids == ("ghost-1", "ghost-2")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"user_id": "a\nb"}, "user_id"),
        ({"user_id": "x" * 129}, "user_id"),
        ({"candidate_item_ids": []}, "candidate_item_ids"),
        ({"candidate_item_ids": ["a", "b", "a"]}, r"candidate_item_ids\[2\]"),
        ({"candidate_item_ids": ["a", ""]}, r"candidate_item_ids\[1\]"),
        ({"candidate_item_ids": [f"i{n}" for n in range(513)]}, "candidate_item_ids"),
        ({"num_neighbors": 17}, "num_neighbors"),
        ({"num_neighbors": -1}, "num_neighbors"),
        ({"policy": ExitPolicy(min_layer=7)}, "exit_policy.min_layer"),
    ],
)
async def test_invalid_requests_name_the_field(loaded, memory_source_factory, kwargs, field):
    ranker = Ranker(loaded=loaded, context_source=memory_source_factory())
    request = {"user_id": "u0", "candidate_item_ids": ["a"], "num_neighbors": 0, **kwargs}
    with pytest.raises(InvalidArgument, match=f"^{field}"):
        await ranker.rank(**request)


async def test_deadline_and_overload(loaded, memory_source_factory, catalog):
    ranker = Ranker(loaded=loaded, context_source=memory_source_factory(),
                    batching=dataclasses.replace(BatchingConfig(), max_pending_requests=1))
    candidates = sorted(catalog)[:8]
    with pytest.raises(DeadlineExceeded):
        await ranker.rank(user_id="u0", candidate_item_ids=candidates, timeout_s=0.0)
    results = await asyncio.gather(
        ranker.rank(user_id="u0", candidate_item_ids=candidates),
        ranker.rank(user_id="u1", candidate_item_ids=candidates),
        return_exceptions=True,
    )
    assert isinstance(results[0].scores, tuple) and isinstance(results[1], Overloaded)


async def test_event_loop_stays_responsive_during_inference(loaded, memory_source_factory, catalog):
    ranker = Ranker(loaded=loaded, context_source=memory_source_factory())
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    await ranker.rank(user_id="u0", candidate_item_ids=sorted(catalog), policy=ExitPolicy(disabled=True))
    task.cancel()
    assert ticks >= 2
