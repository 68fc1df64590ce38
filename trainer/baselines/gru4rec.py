r"""GRU4Rec, the paper's recurrent sequence baseline (Table 2).

Hidasi, Karatzoglou, Baltrunas and Tikk (2016), *Session-based Recommendations with Recurrent Neural
Networks*, ICLR. https://arxiv.org/abs/1511.06939
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from trainer.baselines.features import Batch, FeatureSpace
from trainer.baselines.layers import FieldEmbeddings, embedding


class GRU4Rec(nn.Module):
    r"""A GRU reads the history in order; its last state scores the target item.

    .. math::  z_t = \sigma(W_z x_t + U_z h_{t-1}), \qquad r_t = \sigma(W_r x_t + U_r h_{t-1})

    .. math::  \hat h_t = \tanh\big(W x_t + U (r_t \odot h_{t-1})\big), \qquad
               h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \hat h_t

    .. math::  \hat y = \sigma\big(h_T^\top M_i + b_i\big)

    :math:`x_t` is the t-th history entry's embedding (item plus rating bucket) scaled by
    :math:`\sqrt d`, and :math:`M_i, b_i` are the target item's row and bias of the output layer: the
    paper scores every item with the output layer and trains on sampled items, a CTR sample scores
    only its own target. The output rows are tied to the input item embeddings. Like the paper
    (session-based), no user id is used: the sequence is the user.

    Args:
        space: the feature space (table sizes).
        dim: embedding and hidden-state size (16).
        num_layers: stacked GRU layers (1, the paper's best setting).
        dropout: dropout on the inputs and on the final state (0.1).
    """

    def __init__(self, *, space: FeatureSpace, dim: int = 16, num_layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.fields = FieldEmbeddings(space, dim)
        self.gru = nn.GRU(dim, dim, num_layers=num_layers, batch_first=True)
        self.item_bias = embedding(len(space.items), 1)
        self.dropout = nn.Dropout(dropout)

    def sequence_state(self, batch: Batch) -> torch.Tensor:
        """(B, d) the last layer's state after the last real history entry (an empty history reads one
        padding step, a zero input)."""
        # x sqrt(d): rows of norm ~1, the scale of the paper's one-hot input (small inputs leave the GRU
        # state and the dot-product score both near 0, a saddle that early stopping may never see left)
        inputs = self.dropout(self.fields.history(batch) * math.sqrt(self.fields.dim))  # (B, N, d)
        lengths = batch.lengths.clamp(min=1).cpu()
        packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
        _, last = self.gru(packed)  # (layers, B, d), rows back in batch order
        return self.dropout(last[-1])

    def forward(self, batch: Batch) -> torch.Tensor:
        """(B,) click logits."""
        state = self.sequence_state(batch)  # (B, d)
        target = self.fields.target(batch)  # (B, d)
        return (state * target).sum(dim=-1) + self.item_bias(batch.item).squeeze(-1)
