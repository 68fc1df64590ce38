"""Blocks shared by the four baselines: the id embedding tables and a plain MLP.

Every model embeds its inputs through one ``FieldEmbeddings``: a user table, an item table shared by
the target and the history (so a history entry and a candidate live in one space, which is what
target attention and dot-product scoring compare), a rating-bucket table added to each history entry,
and optionally a title-word table whose mean is added to each item's id embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.baselines.features import PAD, RATING_VOCAB, Batch, FeatureSpace

EMBEDDING_STD = 0.05  # small start: dot-product scores begin near 0, so the first steps are not saturated


def embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table with a zero, untrained padding row."""
    table = nn.Embedding(num, dim, padding_idx=PAD)
    nn.init.normal_(table.weight, std=EMBEDDING_STD)
    with torch.no_grad():
        table.weight[PAD].zero_()
    return table


def mlp(sizes: list[int], *, dropout: float = 0.0, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with activation and dropout between them."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers += [activation(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (..., N, d) over the entries where ``mask`` (..., N) is True; 0 when none."""
    weights = mask.unsqueeze(-1).to(values.dtype)
    return (values * weights).sum(dim=-2) / weights.sum(dim=-2).clamp(min=1.0)


class FieldEmbeddings(nn.Module):
    r"""The id fields of a ``Batch`` as vectors.

    .. math::  e_u = U[u], \quad e_i = M[i] + \tfrac{1}{|w(i)|}\sum_{w \in w(i)} V[w], \quad
               h_j = e_{s_j} + R[r_j]

    with :math:`w(i)` the title words (only when the feature space has titles), :math:`s_j` the
    j-th history item and :math:`r_j` its rating bucket.

    Args:
        space: the vocabularies (sizes of the tables).
        dim: embedding size of every table.
    """

    def __init__(self, space: FeatureSpace, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.users = embedding(len(space.users), dim)
        self.items = embedding(len(space.items), dim)
        self.ratings = embedding(RATING_VOCAB, dim)
        self.words = embedding(len(space.words), dim) if space.words is not None else None

    def _item(self, ids: torch.Tensor, words: torch.Tensor | None) -> torch.Tensor:
        vectors = self.items(ids)  # (..., d)
        if self.words is not None and words is not None:
            vectors = vectors + masked_mean(self.words(words), words != PAD)  # (..., W, d) -> (..., d)
        return vectors

    def user(self, batch: Batch) -> torch.Tensor:
        """(B, d)"""
        return self.users(batch.user)

    def target(self, batch: Batch) -> torch.Tensor:
        """(B, d)"""
        return self._item(batch.item, batch.item_words)

    def history(self, batch: Batch) -> torch.Tensor:
        """(B, N, d), zero at padding."""
        vectors = self._item(batch.history, batch.history_words) + self.ratings(batch.rating)
        return vectors * batch.mask.unsqueeze(-1)
