"""Id features of ``RankExample`` rows for the classic CTR baselines (no text, no neighbours by default).

What a baseline sees of one example (the paper's full-shot models use ids, section 6):

- the user id and the target item id;
- the user's history: up to ``max_history`` item ids, oldest first, most recent last, right-padded;
- each history item's rating as a bucket (the rating rounded and clipped to 0..10), so explicit data
  (BookCrossing 0-10, Amazon 1-5) lets a model learn its own liked/disliked threshold; implicit data
  (every rating 1) gives one constant bucket;
- optionally (``titles=True``) each item's title as a bag of lower-cased words.

Retrieved neighbours are ignored: they are the LLM ranker's extra context, not a classic model's input.

Index 0 is padding and index 1 is out-of-vocabulary in every vocabulary: users, items and words not
seen in the training examples (test users are new when the data set is split by user) all map to 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from exitrank.types import RankExample

PAD, OOV = 0, 1
MAX_RATING_BUCKET = 10  # ratings are rounded and clipped to 0..10, stored as bucket + 1 (0 = padding)
RATING_VOCAB = MAX_RATING_BUCKET + 2
_WORD = re.compile(r"[a-z0-9]+")


class Vocab:
    """String ids to indices: 0 padding, 1 out-of-vocabulary, then the known ids in first-seen order."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.index: dict[str, int] = {}
        for value in ids:
            self.index.setdefault(value, len(self.index) + 2)

    def __len__(self) -> int:
        return len(self.index) + 2

    def lookup(self, ids: Sequence[str]) -> list[int]:
        return [self.index.get(value, OOV) for value in ids]


def title_words(title: str) -> list[str]:
    """The title's lower-cased alphanumeric words."""
    return _WORD.findall(title.lower())


def rating_bucket(rating: float) -> int:
    """The rating's embedding index: ``round(clip(rating, 0, 10)) + 1`` (0 is padding)."""
    return int(round(min(max(rating, 0.0), float(MAX_RATING_BUCKET)))) + 1


@dataclass(frozen=True)
class Batch:
    """Encoded examples; ``B`` examples, ``N`` history slots, ``W`` title words per item."""

    user: torch.Tensor  # (B,) user index
    item: torch.Tensor  # (B,) target item index
    history: torch.Tensor  # (B, N) item indices, oldest first, PAD after the last real entry
    rating: torch.Tensor  # (B, N) rating bucket + 1, PAD where history is PAD
    item_words: torch.Tensor | None = None  # (B, W) word indices of the target's title
    history_words: torch.Tensor | None = None  # (B, N, W) word indices of each history title

    def __len__(self) -> int:
        return int(self.user.shape[0])

    @property
    def mask(self) -> torch.Tensor:
        """(B, N) True at real history entries."""
        return self.history != PAD

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of real history entries."""
        return self.mask.sum(dim=1)

    def take(self, rows: torch.Tensor) -> "Batch":
        """The batch of the given rows (a 1-d index tensor)."""
        return Batch(
            user=self.user[rows], item=self.item[rows], history=self.history[rows], rating=self.rating[rows],
            item_words=None if self.item_words is None else self.item_words[rows],
            history_words=None if self.history_words is None else self.history_words[rows],
        )


@dataclass(frozen=True)
class FeatureSpace:
    """The vocabularies of the training examples and the encoding of any examples against them.

    Args:
        users: user ids of the training examples.
        items: target and history item ids of the training examples.
        words: title words of those items (None: titles are not a feature).
        max_history: the most recent history entries kept (15, the paper's history length).
        max_title_words: words kept per title.
    """

    users: Vocab
    items: Vocab
    words: Vocab | None = None
    max_history: int = 15
    max_title_words: int = 8

    @classmethod
    def fit(cls, examples: Sequence[RankExample], *, max_history: int = 15, titles: bool = False,
            max_title_words: int = 8) -> "FeatureSpace":
        """Vocabularies of ``examples`` (in first-seen order, so the space is deterministic)."""
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        users = Vocab(ex.context.user_id for ex in examples)
        items = Vocab(i for ex in examples for i in (*_history_ids(ex, max_history), ex.item_id))
        words = None
        if titles:
            words = Vocab(w for ex in examples for t in (*_history_titles(ex, max_history), ex.title)
                          for w in title_words(t))
        return cls(users, items, words, max_history, max_title_words)

    def encode(self, examples: Sequence[RankExample]) -> Batch:
        """All ``examples`` as one ``Batch`` (unknown ids map to OOV)."""
        n, width = len(examples), self.max_history
        history = torch.zeros(n, width, dtype=torch.long)
        rating = torch.zeros(n, width, dtype=torch.long)
        for row, ex in enumerate(examples):
            recent = ex.context.history[-width:]
            if recent:
                history[row, : len(recent)] = torch.tensor(self.items.lookup([h.item_id for h in recent]))
                rating[row, : len(recent)] = torch.tensor([rating_bucket(h.rating) for h in recent])
        batch = Batch(
            user=torch.tensor(self.users.lookup([ex.context.user_id for ex in examples]), dtype=torch.long),
            item=torch.tensor(self.items.lookup([ex.item_id for ex in examples]), dtype=torch.long),
            history=history, rating=rating,
        )
        if self.words is None:
            return batch
        return Batch(batch.user, batch.item, batch.history, batch.rating,
                     item_words=self._words([ex.title for ex in examples]).view(n, -1),
                     history_words=self._words([t for ex in examples for t in self._titles(ex)]).view(n, width, -1))

    def _titles(self, ex: RankExample) -> list[str]:
        """The example's history titles padded with "" to ``max_history``."""
        titles = _history_titles(ex, self.max_history)
        return titles + [""] * (self.max_history - len(titles))

    def _words(self, titles: Sequence[str]) -> torch.Tensor:
        """(len(titles), W) word indices; unknown words are dropped, PAD fills the rest."""
        assert self.words is not None
        out = torch.zeros(len(titles), self.max_title_words, dtype=torch.long)
        for row, title in enumerate(titles):
            known = [j for j in self.words.lookup(title_words(title)) if j != OOV][: self.max_title_words]
            if known:
                out[row, : len(known)] = torch.tensor(known)
        return out


def _history_ids(ex: RankExample, max_history: int) -> list[str]:
    return [h.item_id for h in ex.context.history[-max_history:]]


def _history_titles(ex: RankExample, max_history: int) -> list[str]:
    return [h.title for h in ex.context.history[-max_history:]]
