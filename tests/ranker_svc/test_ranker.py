"""The core Ranker (and its Scorer) with a real tiny Llama and a real in-memory ContextSource."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from ranker_svc.config import BatchingConfig
from ranker_svc.errors import ContextUnavailable, DeadlineExceeded, InvalidArgument, Overloaded, UnknownItems
from ranker_svc.exits import ExitPolicy
from ranker_svc.ranker import Ranker
from ranker_svc.scoring import ScoreJob, Scorer

pytestmark = pytest.mark.anyio


def test_scores_are_probabilities_at_valid_layers(loaded, examples):
    ranker = Scorer(loaded=loaded)
    decisions = ranker.score_examples(examples, ExitPolicy(threshold=0.3, window=1))
    assert len(decisions) == len(examples)
    assert all(0.0 < d.ctr < 1.0 for d in decisions)
    assert {d.exit_layer for d in decisions} <= set(loaded.model.answer_layers)
    assert min(d.exit_layer for d in decisions) >= 3  # the delta criterion needs two discrepancies


def test_disabled_policy_runs_every_row_to_the_last_layer(loaded, examples):
    decisions = Scorer(loaded=loaded).score_examples(examples, ExitPolicy(disabled=True))
    assert {d.exit_layer for d in decisions} == {6}


def test_batching_and_order_do_not_change_scores(loaded, examples):
    ranker = Scorer(loaded=loaded)
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
    offline = ranker.scorer.score_texts([loaded.prompt.full_text(ctx, catalog[i]) for i in candidates])
    assert [s.ctr for s in result.scores] == pytest.approx([d.ctr for d in offline], abs=1e-5)
    await ranker.rank(user_id=ctx.user_id, candidate_item_ids=candidates[:1], num_neighbors=1)
    assert source.context_calls[-1][1] == 1


async def test_unknown_user_or_unreachable_context_ranks_without_retrieval(loaded, memory_source_factory, catalog):
    ranker = Ranker(loaded=loaded, context_source=memory_source_factory())
    result = await ranker.rank(user_id="nobody", candidate_item_ids=sorted(catalog)[:3])
    assert not result.retrieval_used and result.embedding_version == ""
    assert all(0.0 < s.ctr < 1.0 for s in result.scores)

    class ContextDown:  # context fails, titles still resolve (e.g. GetContext times out)
        async def get_context(self, user_id, k, max_history, *, timeout_s=None, embedding_version=None):
            raise TimeoutError("retriever too slow")

        async def get_titles(self, item_ids, *, timeout_s=None, embedding_version=None):
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
        await ranker.rank(user_id="u0", candidate_item_ids=candidates, deadline=time.perf_counter())
    results = await asyncio.gather(
        ranker.rank(user_id="u0", candidate_item_ids=candidates),
        ranker.rank(user_id="u1", candidate_item_ids=candidates),
        return_exceptions=True,
    )
    assert isinstance(results[0].scores, tuple) and isinstance(results[1], Overloaded)


async def test_admission_alone_bounds_the_batchers_queue(loaded, memory_source_factory, catalog):
    """The batcher has no bound of its own: with max_pending_requests=2, of three concurrent
    requests two are scored and the third is refused before reaching it; the batcher keeps working."""
    ranker = Ranker(loaded=loaded, context_source=memory_source_factory(),
                    batching=dataclasses.replace(BatchingConfig(), max_pending_requests=2, max_wait_ms=50.0))
    candidates = sorted(catalog)[:4]
    results = await asyncio.gather(*(ranker.rank(user_id=u, candidate_item_ids=candidates) for u in ("u0", "u1", "u2")),
                                   return_exceptions=True)
    assert all(len(r.scores) == 4 for r in results[:2]) and isinstance(results[2], Overloaded)
    assert ranker.batcher.stats.jobs == 2 and ranker.batcher.pending == 0
    assert len((await ranker.rank(user_id="u3", candidate_item_ids=candidates)).scores) == 4


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


def test_one_context_pass_scores_equal_full_prompts(loaded, examples, catalog):
    ranker = Scorer(loaded=loaded)
    assert ranker.shared_context and loaded.context_split_ok  # the trained BPE splits cleanly
    ctx = examples[3].context
    titles = [catalog[i] for i in sorted(catalog)[:20]]
    context_ids, suffix_ids = ranker.encode_job(ScoreJob(ctx, tuple(titles), ranker.policy))
    for title, suffix in zip(titles, suffix_ids):  # the boundary tokenises exactly as the full prompt
        assert context_ids + suffix == loaded.tokenizer(loaded.prompt.full_text(ctx, title))["input_ids"]
    for policy in (ExitPolicy(disabled=True), ExitPolicy(threshold=0.05, window=1)):
        shared = ranker.score_candidates(ctx, titles, policy)
        full = ranker.score_texts([loaded.prompt.full_text(ctx, t) for t in titles], policy)
        assert [d.exit_layer for d in shared] == [d.exit_layer for d in full]
        assert [d.ctr for d in shared] == pytest.approx([d.ctr for d in full], abs=1e-4)


def _boundary_merging_tokenizer(texts):
    """Byte-level BPE without the pre-tokenizer regex: merges may span the context/target boundary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.add_tokens([AddedToken(" Yes", normalized=False), AddedToken(" No", normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="right")


def test_a_tokenizer_that_merges_across_the_boundary_falls_back_to_full_prompts(tmp_path, examples, catalog):
    from ranker_svc.artifact import check_context_split, load_ranker, save_ranker
    from ranker_svc.prompt import PromptBuilder
    from trainer.lm import build_model

    builder = PromptBuilder()
    tokenizer = _boundary_merging_tokenizer([builder.full_text(ex.context, ex.title) for ex in examples])
    assert not check_context_split(tokenizer, builder)
    save_ranker(tmp_path / "ranker", causal_lm=build_model(tokenizer), tokenizer=tokenizer, prompt=builder.config,
                exit_layers=[2, 4], policy=ExitPolicy(disabled=True))
    ranker = Scorer(loaded=load_ranker(tmp_path / "ranker"))
    assert not ranker.shared_context
    ctx, titles = examples[0].context, [catalog[i] for i in sorted(catalog)[:4]]
    served = ranker.score_candidates(ctx, titles)
    full = ranker.score_texts([builder.full_text(ctx, t) for t in titles])
    assert [d.ctr for d in served] == pytest.approx([d.ctr for d in full], abs=1e-5)


async def test_concurrent_requests_share_one_batch(loaded, examples, memory_source_factory, catalog):
    batching = dataclasses.replace(BatchingConfig(), max_wait_ms=200.0)
    ranker = Ranker(loaded=loaded, context_source=memory_source_factory(), batching=batching)
    users = [ex.context.user_id for ex in examples[:4]]
    ids = sorted(catalog)
    together = await asyncio.gather(*(ranker.rank(user_id=u, candidate_item_ids=ids[n : n + 5])
                                      for n, u in enumerate(users)))
    assert ranker.batcher.stats.batches == 1 and ranker.batcher.stats.largest_batch_jobs == 4
    for n, (user, result) in enumerate(zip(users, together)):  # the same scores as one request at a time
        alone = ranker.scorer.score_candidates(next(ex.context for ex in examples if ex.context.user_id == user),
                                        [catalog[i] for i in ids[n : n + 5]])
        assert [s.exit_layer for s in result.scores] == [d.exit_layer for d in alone]
        assert [s.ctr for s in result.scores] == pytest.approx([d.ctr for d in alone], abs=1e-4)


async def test_the_callers_deadline_bounds_the_context_calls(loaded, memory_source_factory, catalog):
    source = memory_source_factory()
    ranker = Ranker(loaded=loaded, context_source=source)
    await ranker.rank(user_id="u0", candidate_item_ids=sorted(catalog)[:2], deadline=time.perf_counter() + 3.0)
    assert len(source.timeouts) == 2 and all(t is not None and 0 < t <= 3.0 for t in source.timeouts)
    await ranker.rank(user_id="u0", candidate_item_ids=sorted(catalog)[:2])
    assert source.timeouts[-2:] == [None, None]
