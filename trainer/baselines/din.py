r"""DIN, the paper's user-behaviour baseline (Table 2).

Zhou, Zhu, Song, Fan, Zhu, Ma, Yan, Jin, Li and Gai (2018), *Deep Interest Network for Click-Through
Rate Prediction*, KDD. https://arxiv.org/abs/1706.06978
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.baselines.features import Batch, FeatureSpace
from trainer.baselines.layers import FieldEmbeddings, mlp


class DIN(nn.Module):
    r"""Target attention over the behaviour sequence, then an MLP.

    The user's interest is a candidate-dependent sum of the history embeddings :math:`e_j`,
    weighted by a local activation unit that compares each entry with the target ad :math:`v_A`:

    .. math::  v_U(A) = \sum_{j=1}^{H} a(e_j, v_A)\, e_j, \qquad
               a(e_j, v_A) = \mathrm{MLP}\big([e_j;\ v_A;\ e_j - v_A;\ e_j \odot v_A]\big)

    .. math::  \hat y = \sigma\big(\mathrm{MLP}([e_u;\ v_U(A);\ v_A])\big)

    The weights are not softmax-normalised (section 4.3: the sum keeps the *intensity* of the user's
    interest in the target). The activation unit's input follows the paper's released code
    (difference and element-wise product instead of the outer product); the paper's Dice activation is
    replaced by PReLU, of which Dice is the data-adaptive form, and its mini-batch aware regulariser
    by dropout, which is enough at this table size.

    Args:
        space: the feature space (table sizes).
        dim: embedding size (16).
        attention_hidden: the activation unit's hidden sizes ((32,)).
        hidden: the output MLP's hidden sizes ((64, 32); the paper uses 200-80).
        dropout: dropout in the output MLP (0.1).
    """

    def __init__(self, *, space: FeatureSpace, dim: int = 16, attention_hidden: tuple[int, ...] = (32,),
                 hidden: tuple[int, ...] = (64, 32), dropout: float = 0.1) -> None:
        super().__init__()
        self.fields = FieldEmbeddings(space, dim)
        self.activation_unit = mlp([4 * dim, *attention_hidden, 1], activation=nn.PReLU)
        self.head = mlp([3 * dim, *hidden, 1], dropout=dropout, activation=nn.PReLU)

    def attention(self, history: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, d), (B, d), (B, N) -> (B, N) the weights :math:`a(e_j, v_A)`, 0 at padding."""
        query = target.unsqueeze(1).expand_as(history)  # (B, N, d)
        unit_in = torch.cat([history, query, history - query, history * query], dim=-1)  # (B, N, 4d)
        return self.activation_unit(unit_in).squeeze(-1) * mask

    def forward(self, batch: Batch) -> torch.Tensor:
        """(B,) click logits."""
        history = self.fields.history(batch)  # (B, N, d)
        target = self.fields.target(batch)  # (B, d)
        weights = self.attention(history, target, batch.mask)  # (B, N)
        interest = (weights.unsqueeze(-1) * history).sum(dim=1)  # (B, d)
        return self.head(torch.cat([self.fields.user(batch), interest, target], dim=-1)).squeeze(-1)
