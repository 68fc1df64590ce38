r"""Collaborative soft tokens: LightGCN embeddings read by the decoder directly, beside the text.

The paper hands similar users to the LLM only as text. Following later work that maps
collaborative embeddings into the LLM's token space (CoLLM, Zhang et al. 2023; LLaRA, Liao et
al. 2024), a small projector turns a LightGCN vector :math:`e \in \mathbb{R}^d` into an input
embedding of the decoder,

.. math::  x = W_2\,\mathrm{GELU}(W_1\,\mathrm{LN}(e) + b_1) + b_2 + W_m\,m + b_m \in \mathbb{R}^H,

where :math:`m = e_u \odot e_i` on the target item's slot (the terms of the LightGCN score
:math:`\hat y_{ui} = e_u^\top e_i`, through a linear map without LayerNorm, which would remove
their sum) and :math:`m = 0` on every other slot. The prompt marks where soft tokens go with the
placeholder :data:`COLLAB_TOKEN` (one token of the tokenizer): ``user`` mode puts one after the
instruction for the user; ``full`` mode also puts one after every history item's title (the
user's own and each similar user's) and one for the target item at the very end of the prompt,
after the answer cue, so it lies in the candidate suffix and at the position the answer is read
from: its embedding is in the residual stream the exit heads read. Placed after the target's
title instead, a few tokens before the answer, a small decoder trained from scratch has to learn
to carry the vector over to the answer position, and with little training data it may not; at
the answer position no such carrying is needed (the figures are in the reports of ``make
reproduce``, not here).

Binding. A prompt's placeholders are replaced by *virtual token ids* ``V + j`` (V the vocabulary
size) that index a per-call table of raw rows :math:`[e, m]` (width 2d); :func:`embed_tokens`
embeds real ids with the token embedding and virtual ids with the projected table rows. Prompts
thus stay lists of ints through batching, padding, per-row compaction and the shared-context path,
and the same tokens always get the same vectors. A vector the caller lacks (a user or item unknown
to the embedding version) is zero, which the projector maps to a constant learned embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

COLLAB_TOKEN = "<|cf|>"
MODES = ("none", "user", "full")
# the user's vector is folded in from its most recent COLLAB_HISTORY interactions, offline
# (trainer.context) and in serving (the ranker asks the retriever for at least that many)
COLLAB_HISTORY = 15


class CollabProjector(nn.Module):
    """Table rows ``[e, m]`` (2d) -> decoder input embeddings (H): an MLP of ``e`` plus a linear map of ``m``.

    ``token_id``: the tokenizer's id of :data:`COLLAB_TOKEN`, whose occurrences the vectors replace.
    """

    def __init__(self, dim: int, hidden_size: int, *, token_id: int) -> None:
        super().__init__()
        self.dim = dim
        self.token_id = token_id
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.match = nn.Linear(dim, hidden_size)

    def forward(self, rows: Tensor) -> Tensor:  # (n, 2d) -> (n, H)
        return self.net(rows[:, : self.dim]) + self.match(rows[:, self.dim :])


class SoftTable:
    """Raw rows ``[e, m]`` of one call's soft tokens; :meth:`bind` turns placeholders into virtual ids.

    Args:
        vocab_size: V, the first virtual id.
        placeholder_id: the token id of :data:`COLLAB_TOKEN`.
        dim: d, the vectors' width (missing vectors are zeros of this width); rows are 2d wide.
    """

    def __init__(self, *, vocab_size: int, placeholder_id: int, dim: int) -> None:
        self.vocab_size = vocab_size
        self.placeholder_id = placeholder_id
        self.dim = dim
        self.rows: list[np.ndarray] = []

    def bind(self, ids: Sequence[int], vectors: Sequence[np.ndarray | None],
             partners: Sequence[np.ndarray | None] | None = None) -> list[int]:
        """``ids`` with its k placeholders replaced by virtual ids of the LAST k ``vectors``.

        Aligned from the end because an over-long prompt is cut in its middle-to-early part (its
        BOS and its end are kept), which drops the earliest slots; without a cut, k equals
        ``len(vectors)``. ``partners`` (aligned with ``vectors``): a slot whose partner is given
        gets ``m = partner * vector`` (the target item's slot, partnered with the user), others 0.

        Raises:
            ValueError: the prompt holds more placeholders than vectors were given.
        """
        out = list(ids)
        slots = [position for position, token in enumerate(out) if token == self.placeholder_id]
        if len(slots) > len(vectors):
            raise ValueError(f"the prompt has {len(slots)} {COLLAB_TOKEN} slots but {len(vectors)} vectors")
        partners = partners if partners is not None else [None] * len(vectors)
        first = len(vectors) - len(slots)
        for position, vector, partner in zip(slots, vectors[first:], partners[first:]):
            out[position] = self.vocab_size + len(self.rows)
            e = self._vector(vector)
            m = e * self._vector(partner) if partner is not None else np.zeros(self.dim, np.float32)
            self.rows.append(np.concatenate([e, m]))
        return out

    def _vector(self, vector: np.ndarray | None) -> np.ndarray:
        if vector is None:
            return np.zeros(self.dim, np.float32)
        row = np.asarray(vector, dtype=np.float32).reshape(-1)
        if row.shape[0] != self.dim:
            raise ValueError(f"a collaborative vector has {row.shape[0]} dimensions, the model expects {self.dim}")
        return row

    def tensor(self) -> Tensor:
        """(n, 2d) float32; (0, 2d) when nothing was bound."""
        if not self.rows:
            return torch.zeros((0, 2 * self.dim))
        return torch.from_numpy(np.stack(self.rows))


def embed_tokens(embedding: nn.Embedding, projector: CollabProjector | None, ids: Tensor,
                 soft: Tensor | None) -> Tensor:
    """(B, T) ids -> (B, T, H): token embeddings, and projected ``soft`` rows at virtual ids >= V."""
    vocab = embedding.num_embeddings
    virtual = ids >= vocab
    if soft is None or projector is None or not bool(virtual.any()):
        if bool(virtual.any()):
            raise ValueError("the prompt holds collaborative slots but no vectors (or no projector) were given")
        return embedding(ids)
    hidden = embedding(ids.masked_fill(virtual, 0))  # (B, T, H)
    # project only the rows this batch uses: a training table holds every example's vectors
    rows, inverse = torch.unique(ids[virtual] - vocab, return_inverse=True)  # (u,), (k,)
    used = soft[rows.to(soft.device)].to(device=hidden.device, dtype=next(projector.parameters()).dtype)
    hidden = hidden.clone()
    hidden[virtual] = projector(used)[inverse].to(hidden.dtype)
    return hidden
