"""The LLM retriever the paper's GCN retriever replaces (its Figure 2 and Table 2 "LLM-retriever").

A user is embedded by its history as text: the titles of its recent interactions in one prompt,
run through the ranker's decoder, the last layer's hidden states mean-pooled over the real tokens,

.. math::  e_u = \\frac{1}{T}\\sum_{t=1}^{T} h_t^{(N)}

and similar users are then found exactly as the GCN retriever finds them, by cosine similarity in
the same ``VectorIndex``. Every request pays a decoder pass over the query user's history, where
the GCN retriever reads a stored vector (kept fresh by fold-in): that is the cost Figure 2 compares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from exitrank.types import HistoryItem

MAX_TOKENS = 512


def history_prompt(history: Sequence[HistoryItem]) -> str:
    """The text a user is embedded from: its interactions' titles, oldest first."""
    return "The user interacted with: " + "; ".join(h.title for h in history) + "."


@dataclass(kw_only=True)
class UserVectors:
    """User embeddings from any retriever, shaped as ``OfflineContexts`` reads ``GCNEmbeddings``."""

    user_ids: list[str]
    user: np.ndarray  # (U, H) float32
    version: str


class LLMRetriever:
    """Embeds users' history prompts with a causal LM's decoder (``model.base_model``).

    Args:
        causal_lm: a transformers ``*ForCausalLM`` (the ranker's own, or any other).
        tokenizer: its tokenizer.
    """

    def __init__(self, causal_lm, tokenizer) -> None:
        self.decoder = causal_lm.base_model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id or 0

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], *, batch_size: int = 16) -> np.ndarray:
        """(len(texts), H) float32 mean-pooled last-layer states, one row per text, in order."""
        rows: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            ids = [self.tokenizer(t)["input_ids"][:MAX_TOKENS] for t in texts[start : start + batch_size]]
            width = max(len(i) for i in ids)
            input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, seq in enumerate(ids):
                input_ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            hidden = self.decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, H)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, H)
            rows.append(pooled.float().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)

    def user_vectors(self, histories: dict[str, Sequence[HistoryItem]], *, batch_size: int = 16) -> UserVectors:
        """Every user's embedding from its history prompt (users in sorted order)."""
        users = sorted(u for u, h in histories.items() if h)
        vectors = self.embed([history_prompt(histories[u]) for u in users], batch_size=batch_size)
        digest = hashlib.sha256(np.ascontiguousarray(vectors).tobytes()).hexdigest()[:12]
        return UserVectors(user_ids=users, user=vectors, version=f"llm-{digest}")
