r"""SASRec, the self-attentive sequence baseline beside GRU4Rec.

Table 2 of the paper has SIM in this place; with 15-entry histories SIM's search stage keeps the whole
sequence and what is left is DIN-like target attention, so the reproduction runs SASRec instead.

Kang and McAuley (2018), *Self-Attentive Sequential Recommendation*, ICDM.
https://arxiv.org/abs/1808.09781
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.baselines.features import Batch, FeatureSpace
from trainer.baselines.layers import EMBEDDING_STD, FieldEmbeddings, embedding


class SASRec(nn.Module):
    r"""Causal self-attention blocks over the history; the last position's output scores the target.

    .. math::  \hat E_t = \sqrt{d}\, x_t + P_t

    .. math::  S = \mathrm{SA}(\hat E) = \mathrm{softmax}\Big(\frac{Q K^\top}{\sqrt d}\Big) V, \quad
               Q, K, V = \hat E W^{Q,K,V}, \quad \text{entry } t \text{ attends only to } j \le t

    .. math::  F_t = \mathrm{FFN}(S_t) = \mathrm{ReLU}(S_t W^{(1)} + b^{(1)}) W^{(2)} + b^{(2)}

    each sub-layer as :math:`g(x) = x + \mathrm{Dropout}(g(\mathrm{LayerNorm}(x)))`, ``num_blocks``
    times, and the relevance of item i after the history is :math:`r_{i} = F_T^\top M_i` (+ a bias
    :math:`b_i`), with :math:`M` the item embeddings shared with the input (the paper's shared item
    embedding). :math:`x_t` is the t-th entry's item embedding plus its rating bucket. :math:`P_t` is a
    learned position embedding counted back from the most recent entry (the paper left-pads so that
    the last position is always the most recent; here the history is right-padded, so recency is the
    position that stays aligned). Like the paper, no user id is used.

    Args:
        space: the feature space (table sizes; ``max_history`` bounds the positions).
        dim: embedding size (16).
        num_blocks: self-attention blocks (2, as in the paper).
        num_heads: attention heads (1, as in the paper).
        dropout: dropout on embeddings and inside each block (0.2, the paper's for dense data sets).
    """

    def __init__(self, *, space: FeatureSpace, dim: int = 16, num_blocks: int = 2, num_heads: int = 1,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.fields = FieldEmbeddings(space, dim)
        self.positions = nn.Embedding(space.max_history, dim)
        nn.init.normal_(self.positions.weight, std=EMBEDDING_STD * math.sqrt(dim))  # the scale of sqrt(d) x_t
        self.item_bias = embedding(len(space.items), 1)
        self.dropout = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=dim, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, num_blocks, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def recency(self, batch: Batch) -> torch.Tensor:
        """(B, N) each entry's distance from the most recent one (0 = most recent; padding clamps to 0)."""
        slots = torch.arange(batch.history.shape[1], device=batch.history.device)
        return (batch.lengths.unsqueeze(1) - 1 - slots).clamp(min=0)

    def sequence_state(self, batch: Batch) -> torch.Tensor:
        """(B, d) the output at the most recent history entry (slot 0, padding, for an empty history)."""
        width = batch.history.shape[1]
        x = self.fields.history(batch) * math.sqrt(self.fields.dim) + self.positions(self.recency(batch))
        x = self.dropout(x * batch.mask.unsqueeze(-1))  # (B, N, d), padding stays 0 before the blocks
        causal = nn.Transformer.generate_square_subsequent_mask(width, device=x.device)  # (N, N)
        # Right padding: a real entry's causal window holds only real entries, so no key mask is needed
        # (and none may be: an empty history would mask every key of slot 0 and give NaN).
        out = self.blocks(x, mask=causal, is_causal=True)  # (B, N, d)
        last = (batch.lengths - 1).clamp(min=0)  # (B,)
        return out[torch.arange(len(batch), device=x.device), last]

    def forward(self, batch: Batch) -> torch.Tensor:
        """(B,) click logits."""
        state = self.sequence_state(batch)  # (B, d)
        return (state * self.fields.target(batch)).sum(dim=-1) + self.item_bias(batch.item).squeeze(-1)
