"""``bench/collab_cost.py``: the soft-token cost that ``make bench-ranker`` reports, on the tiny preset."""

from __future__ import annotations

from bench.bench_ranker import PROMPT, taste_examples
from bench.collab_cost import measure_collab_cost, with_vectors


def test_every_slot_gets_a_vector():
    ex = with_vectors(taste_examples(1, 0, full=True))[0]
    ctx = ex.context
    assert ctx.user_embedding is not None and ex.item_embedding is not None
    assert all(h.embedding is not None for h in ctx.history)
    assert all(h.embedding is not None for n in ctx.neighbors for h in n.history)


def test_collab_cost_counts_the_slots_and_times_both_prompts(tmp_path):
    cost = measure_collab_cost("tiny", tmp_path, examples=taste_examples, prompt=PROMPT, seed=0, rounds=1)
    # full-length contexts: the user, 10 own items, 4 similar users x 5 items; the target in the suffix
    own, neighbours = PROMPT.max_history, PROMPT.num_neighbors * PROMPT.neighbor_history
    assert cost["soft_tokens_per_prompt"] == 1 + own + neighbours + 1
    assert cost["extra_context_tokens"] >= 1 + own + neighbours and cost["extra_suffix_tokens"] >= 1
    assert cost["extra_tokens_per_prompt"] == cost["extra_context_tokens"] + cost["extra_suffix_tokens"]
    assert cost["projector_rows_per_request"] == 1 + own + neighbours + 50
    assert cost["full_prompt_time_ratio"] > 0 and cost["candidates50_time_ratio"] > 0
    assert 0 < cost["projector_share_of_rank50"] < 1
