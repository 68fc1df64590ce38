"""The CTR sample rule: chronology, history cap, binarisation, per-user split, popularity negatives."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from trainer.data.rows import InteractionRow
from trainer.data.samples import PopularitySampler, SampleRule, build_samples, split_users


def _explicit_log(users: int = 200, per_user: int = 30, seed: int = 0) -> list[InteractionRow]:
    rng = np.random.default_rng(seed)
    log = []
    for u in range(users):
        ts = rng.permutation(per_user) * 1000 + 7  # shuffled: the rule must sort by time
        for j in range(per_user):
            log.append(InteractionRow(f"u{u}", f"i{rng.integers(500)}", float(rng.integers(1, 6)), int(ts[j])))
    return log


def test_chronology_history_cap_and_binarisation():
    log = _explicit_log()
    rule = SampleRule(threshold=4.0, targets_per_user=3)
    samples = build_samples(log, rule)
    by_key = {(x.user_id, x.timestamp_ms): x for x in log}
    per_user = Counter(s.user_id for s in samples)
    assert set(per_user.values()) == {3}
    for s in samples:
        assert 1 <= len(s.history) <= 15
        times = [e.timestamp_ms for e in s.history]
        assert times == sorted(times) and times[-1] < s.timestamp_ms
        target = by_key[(s.user_id, s.timestamp_ms)]
        assert s.item_id == target.item_id
        assert s.label == int(target.rating >= 4.0)
        # the history is exactly the interactions right before the target
        before = sorted(x.timestamp_ms for x in log if x.user_id == s.user_id and x.timestamp_ms < s.timestamp_ms)
        assert times == before[-15:]
    # the last 3 interactions of each user are the targets
    last = {u: sorted(x.timestamp_ms for x in log if x.user_id == u)[-3:] for u in per_user}
    assert all(s.timestamp_ms in last[s.user_id] for s in samples)


def test_users_with_few_prior_interactions_are_filtered():
    log = [InteractionRow("short", f"i{j}", 5.0, j) for j in range(3)]
    log += [InteractionRow("ok", f"i{j}", 5.0, j) for j in range(4)]
    samples = build_samples(log, SampleRule(threshold=4.0, targets_per_user=0))
    assert [(s.user_id, len(s.history)) for s in samples] == [("ok", 3)]


def test_split_is_by_user_disjoint_and_8_1_1():
    samples = build_samples(_explicit_log(users=400), SampleRule(threshold=4.0, seed=3))
    users = {name: {s.user_id for s in samples if s.split == name} for name in ("train", "valid", "test")}
    assert not (users["train"] & users["valid"]) and not (users["train"] & users["test"])
    assert not (users["valid"] & users["test"])
    assert [len(users[n]) for n in ("train", "valid", "test")] == [320, 40, 40]
    other = build_samples(_explicit_log(users=400), SampleRule(threshold=4.0, seed=4))
    assert {s.user_id for s in other if s.split == "test"} != users["test"]  # the seed matters
    assert build_samples(_explicit_log(users=400), SampleRule(threshold=4.0, seed=3)) == samples


def test_split_users_rounds_fractions():
    split = split_users([f"u{j}" for j in range(25)], (0.8, 0.1, 0.1), seed=0)
    assert Counter(split.values()) == {"train": 20, "valid": 2, "test": 3} or \
        Counter(split.values()) == {"train": 20, "valid": 3, "test": 2}


def _implicit_log(seed: int = 0) -> list[InteractionRow]:
    """Zipf-popular items; items 0..9 are the popular head."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 201) ** 1.2
    p /= p.sum()
    log = []
    for u in range(300):
        items = rng.choice(200, size=12, replace=False, p=p)
        log += [InteractionRow(f"u{u}", str(i), 1.0, t) for t, i in enumerate(items)]
    return log


def test_implicit_negatives_exclude_user_items_and_follow_popularity():
    log = _implicit_log()
    rule = SampleRule(implicit=True, threshold=1.0, targets_per_user=0, negatives_per_positive=1, seed=1)
    samples = build_samples(log, rule)
    pos = [s for s in samples if s.label == 1]
    neg = [s for s in samples if s.label == 0]
    assert len(pos) == len(neg) == 300 * (12 - 3)
    seen = {}
    for x in log:
        seen.setdefault(x.user_id, set()).add(x.item_id)
    assert all(s.item_id not in seen[s.user_id] for s in neg)
    # a negative shares its positive's history and time
    assert all(a.history == b.history and a.timestamp_ms == b.timestamp_ms for a, b in zip(pos, neg))
    popularity = Counter(x.item_id for x in log)
    drawn = Counter(s.item_id for s in neg)
    head = [i for i, _ in popularity.most_common(20)]
    tail = [i for i, _ in popularity.most_common()[-50:]]
    assert sum(drawn[i] for i in head) > 5 * max(1, sum(drawn[i] for i in tail))
    # frequent items are drawn more: rank correlation with popularity is strongly positive
    items = sorted(popularity)
    a = np.argsort(np.argsort([popularity[i] for i in items]))
    b = np.argsort(np.argsort([drawn[i] for i in items]))
    assert np.corrcoef(a, b)[0, 1] > 0.5


def test_popularity_sampler_never_repeats_or_returns_excluded():
    sampler = PopularitySampler(Counter({"a": 100, "b": 1, "c": 1, "d": 1}), rng=np.random.default_rng(0))
    out = sampler.draw(3, exclude={"a"})
    assert sorted(out) == ["b", "c", "d"]
    assert sampler.draw(2, exclude={"a", "b", "c", "d"}) == []


def test_rule_validation_names_the_setting():
    with pytest.raises(ValueError, match="sample_rule.split"):
        SampleRule(split=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="sample_rule.kind"):
        SampleRule(kind="random")
