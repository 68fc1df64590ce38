r"""DeepFM, the paper's feature-interaction baseline (Table 2).

Guo, Tang, Ye, Li and He (2017), *DeepFM: A Factorization-Machine based Neural Network for CTR
Prediction*, IJCAI. https://arxiv.org/abs/1703.04247
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.baselines.features import Batch, FeatureSpace
from trainer.baselines.layers import FieldEmbeddings, embedding, masked_mean, mlp


class DeepFM(nn.Module):
    r"""A factorisation machine and an MLP over the same field embeddings, summed before the sigmoid.

    .. math::  \hat y = \sigma(y_{FM} + y_{DNN})

    .. math::  y_{FM} = w_0 + \sum_{f} w_f + \sum_{f < g} \langle e_f, e_g \rangle, \qquad
               \sum_{f<g} \langle e_f, e_g \rangle
               = \tfrac12 \sum_{k=1}^{d} \Big[\big(\textstyle\sum_f e_{f,k}\big)^2 - \sum_f e_{f,k}^2\Big]

    .. math::  y_{DNN} = \mathrm{MLP}([e_1; \dots; e_m])

    The FM part and the deep part share the embeddings :math:`e_f` (the paper's point against
    Wide&Deep: no feature engineering, one embedding layer). Fields: the user id, the target item,
    and the history as one multi-valent field (the mean of its entries' embeddings, rating included);
    :math:`w_f` is the field value's first-order weight (for the history, the mean of its items').

    Args:
        space: the feature space (table sizes).
        dim: embedding size (16).
        hidden: the deep part's hidden sizes ((64, 32); the paper uses 400-400-400 on Criteo).
        dropout: dropout between the deep part's layers (0.1).
    """

    num_fields = 3

    def __init__(self, *, space: FeatureSpace, dim: int = 16, hidden: tuple[int, ...] = (64, 32),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.fields = FieldEmbeddings(space, dim)
        self.user_weight = embedding(len(space.users), 1)
        self.item_weight = embedding(len(space.items), 1)
        self.bias = nn.Parameter(torch.zeros(1))
        self.deep = mlp([self.num_fields * dim, *hidden, 1], dropout=dropout)

    def field_embeddings(self, batch: Batch) -> torch.Tensor:
        """(B, m, d): user, target item, mean of the history."""
        history = masked_mean(self.fields.history(batch), batch.mask)  # (B, N, d) -> (B, d)
        return torch.stack([self.fields.user(batch), self.fields.target(batch), history], dim=1)

    def first_order(self, batch: Batch) -> torch.Tensor:
        """(B,) :math:`w_0 + \\sum_f w_f`."""
        history = masked_mean(self.item_weight(batch.history), batch.mask)  # (B, N, 1) -> (B, 1)
        return (self.bias + self.user_weight(batch.user) + self.item_weight(batch.item) + history).squeeze(-1)

    @staticmethod
    def pairwise(fields: torch.Tensor) -> torch.Tensor:
        """(B, m, d) -> (B,) the sum of the fields' pairwise inner products, in O(m d)."""
        return 0.5 * (fields.sum(dim=1).pow(2) - fields.pow(2).sum(dim=1)).sum(dim=-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """(B,) click logits."""
        fields = self.field_embeddings(batch)  # (B, m, d)
        y_fm = self.first_order(batch) + self.pairwise(fields)
        y_dnn = self.deep(fields.flatten(1)).squeeze(-1)  # (B, m d) -> (B,)
        return y_fm + y_dnn
