"""What ``trainer reproduce`` runs: the from-scratch plans train their preset, and ``--model`` puts the
pretrained model into every ranker and the few-shot table, in stages of their own."""

from __future__ import annotations

from trainer.reproduce.plan import PRETRAINED_SIZES, QUICK_SIZES, plans
from trainer.reproduce.stages import fingerprint


def test_from_scratch_plans_train_their_preset_at_its_own_rate():
    for plan in plans() + plans(quick=True):
        row = plan.to_json()
        assert row["base_model"] is None and row["lr"] is None and row["batch_size"] is None
        assert "preset" in row and row["train"] == plan.train


def test_a_pretrained_model_is_every_rankers_llm_and_the_few_shot_tables():
    scratch = {p.name: p for p in plans()}
    chosen = plans(model="smollm2-135m")
    assert [p.name for p in chosen] == list(scratch)
    for plan in chosen:
        assert plan.base_model == "smollm2-135m"
        assert {k: getattr(plan, k) for k in PRETRAINED_SIZES} == PRETRAINED_SIZES
        assert plan.importer == scratch[plan.name].importer and plan.max_users == scratch[plan.name].max_users
        assert fingerprint(plan.to_json()) != fingerprint(scratch[plan.name].to_json())  # stages of their own
        assert (plan.few_shot is None) == (scratch[plan.name].few_shot is None)
    (book,) = [p for p in chosen if p.few_shot is not None]
    assert book.few_shot.model == "smollm2-135m" and book.few_shot.shots == (16, 64, 256)


def test_quick_sizes_win_over_the_pretrained_ones_but_keep_the_model():
    for plan in plans(quick=True, model="my-model", names=("tallrec-book",)):
        assert plan.base_model == "my-model" and plan.train == QUICK_SIZES["train"]
        assert plan.few_shot.model == "my-model" and plan.few_shot.seeds == (0,)
