"""A synthetic data set whose similar users carry real signal (for tests, the demo and quick runs).

Model: ``groups`` taste groups, each with its own title vocabulary. Every item belongs to one group and its
title is two words of that group's vocabulary plus a generic word ("Dragon Castle Chronicles"); its group is
the item's ``genre`` attribute. Every user belongs to one group (``users.jsonl``) and makes 8..24
interactions: with probability ``p_in_group`` an item of its own group, otherwise any item, both drawn
Zipf-popular. Ratings are noisy in 1..5: mean 4.3 for own-group items, 2.4 for the others (sd 0.9), so a
positive (rating >= 4) mostly means "the item is of the user's group". A user's own few interactions are a
noisy guess at its group; its nearest users in the interaction graph reveal it, which is what retrieval
is meant to exploit. Timestamps increase per user (one interaction every few hours).

    .venv/bin/python -m trainer data synth data/synth --users 2000 --items 1500 --seed 0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trainer.data.dataset import write_dataset, write_jsonl
from trainer.data.rows import DatasetMeta, InteractionRow, Item
from trainer.data.samples import SampleRule

THEMES = {
    "fantasy": "dragon castle wizard sword elven quest rune throne crystal knight spell realm",
    "space": "galaxy orbit rocket nebula planet starship comet alien lunar quasar cosmic voyager",
    "crime": "murder detective alibi witness heist shadow suspect verdict noir cartel ransom clue",
    "romance": "kiss wedding heart summer lovers promise moonlight bride passion letters rose vow",
    "cooking": "kitchen recipe bread spice garden baking pasta flavor soup harvest feast grill",
    "sports": "football marathon champion stadium league goal racing team victory coach season trophy",
    "history": "empire war ancient dynasty revolution pharaoh medieval colony treaty legion crown siege",
    "music": "guitar jazz symphony melody rhythm piano opera chorus blues concert ballad drum",
    "nature": "forest river ocean mountain wild bird wolf island desert storm glacier meadow",
    "tech": "robot code network silicon quantum digital machine cyber data circuit startup algorithm",
}
GENERIC = ["Chronicles", "Stories", "Collection", "Guide", "Edition", "Tales", "Journal", "Handbook",
           "Saga", "Companion", "Diaries", "Omnibus"]
SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sha", "vor", "el", "dan", "qui", "zo", "bri"]


@dataclass(frozen=True)
class SynthConfig:
    users: int = 2000
    items: int = 1500
    groups: int = 8
    seed: int = 0
    p_in_group: float = 0.65
    min_interactions: int = 8
    max_interactions: int = 24
    zipf: float = 1.1


def group_vocab(groups: int) -> list[tuple[str, list[str]]]:
    """``[(group_name, words)]``: the built-in themes, then generated pseudo-word groups."""
    out = [(name, words.split()) for name, words in THEMES.items()][:groups]
    for g in range(len(out), groups):
        words = [SYLLABLES[(g + j) % 12] + SYLLABLES[(3 * g + 5 * j) % 12] + SYLLABLES[(g * j) % 12]
                 for j in range(12)]
        out.append((f"group{g}", words))
    return out


def make_items(cfg: SynthConfig, rng: np.random.Generator) -> tuple[list[Item], np.ndarray]:
    """Items with group-worded titles; returns the items and each item's group (I,)."""
    vocab = group_vocab(cfg.groups)
    item_group = rng.integers(0, cfg.groups, size=cfg.items)
    items, seen = [], set()
    for j, g in enumerate(item_group):
        name, words = vocab[g]
        title = ""
        for _ in range(20):  # distinct titles keep items distinguishable in prompts
            a, b = rng.choice(len(words), size=2, replace=False)
            title = f"{words[a].title()} {words[b].title()} {GENERIC[rng.integers(len(GENERIC))]}"
            if title not in seen:
                break
        if title in seen:
            title = f"{title} {j}"
        seen.add(title)
        items.append(Item(str(j), title, {"genre": name}))
    return items, item_group


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w)


def make_interactions(cfg: SynthConfig, item_group: np.ndarray,
                      rng: np.random.Generator) -> tuple[list[InteractionRow], np.ndarray]:
    """Interactions per the module's model; returns them and each user's group (U,)."""
    popularity = _zipf_weights(cfg.items, cfg.zipf, rng)  # (I,)
    by_group = [np.flatnonzero(item_group == g) for g in range(cfg.groups)]
    user_group = rng.integers(0, cfg.groups, size=cfg.users)
    interactions = []
    for u, g in enumerate(user_group):
        n = int(rng.integers(cfg.min_interactions, cfg.max_interactions + 1))
        own = by_group[g] if len(by_group[g]) else np.arange(cfg.items)
        picked: list[int] = []
        while len(picked) < n:
            pool = own if rng.random() < cfg.p_in_group else np.arange(cfg.items)
            p = popularity[pool] / popularity[pool].sum()
            j = int(rng.choice(pool, p=p))
            if j not in picked:
                picked.append(j)
        ts = 1_600_000_000_000 + int(rng.integers(0, 10**9)) + np.cumsum(rng.integers(1, 12, size=n)) * 3_600_000
        for j, t in zip(picked, ts):
            mean = 4.3 if item_group[j] == g else 2.4
            rating = float(np.clip(np.rint(rng.normal(mean, 0.9)), 1, 5))
            interactions.append(InteractionRow(f"u{u}", str(j), rating, int(t)))
    return interactions, user_group


def synth(out: str | Path, cfg: SynthConfig, *, force: bool = True) -> dict:
    """Write the synthetic data set to ``out``; returns a summary.

    Raises:
        FileExistsError: ``force`` is False and ``out`` already holds files (``trainer data synth``
            without ``--force``: a data set, or anything else, is never overwritten by surprise).
    """
    if cfg.users < 1 or cfg.items < cfg.groups or cfg.groups < 1:
        raise ValueError("synth needs users >= 1, groups >= 1 and items >= groups")
    if not force and Path(out).is_dir() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} already holds files: choose another directory, or pass --force to "
                              "replace the data set in it")
    rng = np.random.default_rng(cfg.seed)
    items, item_group = make_items(cfg, rng)
    interactions, user_group = make_interactions(cfg, item_group, rng)
    rule = SampleRule(threshold=4.0, implicit=False, seed=cfg.seed)
    meta = DatasetMeta(name="synth", format="synth", implicit=False, rating_threshold=4.0,
                       sample_rule=rule.to_json(), extra={"config": asdict(cfg)})
    counts = write_dataset(out, items=items, interactions=interactions, meta=meta)
    names = [name for name, _ in group_vocab(cfg.groups)]
    write_jsonl(Path(out) / "users.jsonl",
                ({"user_id": f"u{u}", "group": names[g]} for u, g in enumerate(user_group)))
    return {"out": str(out), "users": cfg.users, **counts}
