"""Large-batch BPR for LightGCN on a CPU: pair sampling and pair scores as sparse products. Torch only.

The model and the loss are LightGCN's (``trainer.gcn_model``; BPR with L2 on the layer-0 rows of
every pair, as PyG's ``BPRLoss``); only the arithmetic is arranged for large batches:

- one propagation per step over the normalised adjacency (built once, CSR, int32 indices);
- a batch is every training edge of a set of users, kept in user-major order, with ``negatives``
  uniformly drawn items per edge; the pairs form a sparse pattern P (U, I) with 1 + n entries per
  edge, so the scores e_u . e_i of every pair are one sampled dense-dense product
  (``torch.sparse.sampled_addmm``) instead of three (B, d) gathers;
- the gradient of the pair scores is two sparse products, dL/dE_U = W E_I and dL/dE_I = W^T E_U,
  where W holds dL/ds on P's pattern. W^T needs P in item-major order: negatives are drawn as a
  sorted multiset (counts per item) and dealt to edges by a random permutation, so no sort is
  needed, and the positives' item-major order is computed once.

Measured on gowalla (810k edges, 2 shared cores), per full-graph step: autograd through row
indexing (``nodes[users]``) 4.3 s of gathers and scatters, these sparse products 0.3 s.
A uniform negative that happens to be one of the user's positives is kept, where LightGCN's
reference samplers draw again: |N_u| / I of a user's pairs, 0.07 % of the user-weighted loss
on gowalla (0.19 % edge-weighted), not worth a membership test of every pair on every step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


def csr(crow: Tensor, col: Tensor, value: Tensor, shape: tuple[int, int]) -> Tensor:
    """A sparse CSR tensor with int32 indices (MKL's native type: ~30 % faster products)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and measured here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.int(), col.int(), value, shape, check_invariants=False)


def sampled_dot(offsets: Tensor, cols: Tensor, user_emb: Tensor, item_emb: Tensor) -> Tensor:
    """e_u . e_i for the CSR pattern (offsets over users, item columns), in pattern order. (P,).

    ``torch.sparse.sampled_addmm`` (one pass, no (P, d) gathers); it refuses patterns with more
    entries than the dense matrix has (only on toy graphs), where row gathers do instead.
    """
    shape = (user_emb.shape[0], item_emb.shape[0])
    if cols.numel() < shape[0] * shape[1]:
        pattern = csr(offsets, cols, user_emb.new_zeros(cols.numel()), shape)
        return torch.sparse.sampled_addmm(pattern, user_emb, item_emb.T, beta=0.0).values()
    rows = torch.repeat_interleave(torch.arange(shape[0]), offsets.diff())
    return (user_emb[rows] * item_emb[cols]).sum(-1)


def _offsets(counts: Tensor) -> Tensor:
    """CSR row offsets of per-row counts. (R,) -> (R + 1,)."""
    out = torch.zeros(len(counts) + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=out[1:])
    return out


WEIGHTINGS = ("user", "edge")


@dataclass(frozen=True)
class PairBatch:
    """The (user, positive, negatives) pairs of one step, in both orders.

    ``scores`` of :func:`pair_scores` are (B, 1 + n): column 0 the positive, then the negatives.
    """

    num_users: int
    num_items: int
    negatives: int
    user_offsets: Tensor  # (U + 1,) into the user-major entries, 1 + n per edge
    user_major_items: Tensor  # (B (1 + n),) item of each entry
    item_offsets_pos: Tensor  # (I + 1,) item-major positives
    pos_users: Tensor  # (B,) user of each item-major positive
    pos_order: Tensor  # (B,) edge row (in the batch) of each item-major positive
    item_offsets_neg: Tensor  # (I + 1,) item-major negatives
    neg_users: Tensor  # (B n,) user of each item-major negative
    neg_order: Tensor  # (B n,) flat (edge, k) slot of each item-major negative
    pair_weights: Tensor  # (B, n) weight of each pair in the loss, summing to 1
    reg_weights: Tensor  # (U + I,) summed weight of the pairs each node is in (the L2 term)

    @property
    def pairs(self) -> int:
        return int(self.neg_order.numel())


class PairSampler:
    """Draws :class:`PairBatch` es from training edges.

    Args:
        users: (E,) user row of each distinct training edge.
        items: (E,) item row of each edge.
        num_users, num_items: U, I.
        negatives: uniform negative items per positive edge and step (n >= 1).
        candidates: 1 (default) draws negatives uniformly; m > 1 keeps the best-scored of m
            uniform draws (dynamic negative sampling, Zhang et al., SIGIR 2013): the same model
            and loss, a sampler that spends the steps on informative pairs.
        weighting: ``user`` (default): every user of a batch weighs the same, its edges
            1 / |N_u| each: the objective of LightGCN's reference samplers, which draw a user
            uniformly, then one of its positives (and it matches the metrics, which average
            over users); ``edge``: every edge weighs the same (PyG's examples).
        generator: the random source (seeded by the caller).
    """

    def __init__(self, *, users: Tensor, items: Tensor, num_users: int, num_items: int,
                 negatives: int = 1, candidates: int = 1, weighting: str = "user",
                 generator: torch.Generator | None = None) -> None:
        if negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {negatives}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.weighting, self.candidates = weighting, candidates
        order = torch.argsort(users * num_items + items)  # user-major
        self.users, self.items = users[order].long(), items[order].long()  # (E,)
        self.item_major = torch.argsort(self.items * num_users + self.users)  # (E,) edge rows
        self.num_users, self.num_items, self.negatives = num_users, num_items, negatives
        self.generator = generator

    @property
    def num_edges(self) -> int:
        return int(self.users.numel())

    def user_groups(self, groups: int) -> list[Tensor | None]:
        """A random split of the users into ``groups``, as edge masks (None: every edge)."""
        if groups <= 1:
            return [None]
        rank = torch.randperm(self.num_users, generator=self.generator)
        group_of_user = torch.empty(self.num_users, dtype=torch.long)
        group_of_user[rank] = torch.arange(self.num_users) % groups
        group_of_edge = group_of_user[self.users]  # (E,)
        return [group_of_edge == g for g in range(groups)]

    def sample(self, edge_mask: Tensor | None = None, *,
               embeddings: tuple[Tensor, Tensor] | None = None) -> PairBatch:
        """Every edge of ``edge_mask`` (None: all) with freshly drawn negatives; with
        ``candidates`` > 1 each negative is the best-scored of that many uniform draws under
        ``embeddings`` (users (U, d), items (I, d), the current final embeddings)."""
        n, num_users, num_items = self.negatives, self.num_users, self.num_items
        if edge_mask is None:
            users, items, item_major = self.users, self.items, self.item_major
        else:
            users, items = self.users[edge_mask], self.items[edge_mask]
            position = torch.cumsum(edge_mask, 0) - 1  # edge row -> row in the batch
            item_major = position[self.item_major[edge_mask[self.item_major]]]
        batch = users.numel()
        user_count = torch.bincount(users, minlength=num_users)  # (U,)
        if self.candidates > 1:
            if embeddings is None:
                raise ValueError("hard negatives (candidates > 1) need the current embeddings")
            negs = self._hardest(user_count, *embeddings)
            slot = torch.argsort(negs, stable=True)  # item-major -> slot
            neg_count = torch.bincount(negs, minlength=num_items)
        else:  # a sorted multiset (item-major for free), dealt to (edge, k) slots at random
            drawn = torch.randint(num_items, (batch * n,), generator=self.generator)
            neg_count = torch.bincount(drawn, minlength=num_items)  # (I,)
            slot = torch.randperm(batch * n, generator=self.generator)  # item-major -> slot
            negs = torch.empty(batch * n, dtype=torch.long)
            negs[slot] = torch.repeat_interleave(torch.arange(num_items), neg_count)
        entries = torch.cat([items.unsqueeze(1), negs.view(batch, n)], 1)  # (B, 1 + n)
        pos_count = torch.bincount(items, minlength=num_items)  # (I,)
        if self.weighting == "user":  # 1 / (|users in batch| |N_u|) per edge
            edge_weight = 1.0 / (user_count[users] * int((user_count > 0).sum())).double()
        else:
            edge_weight = torch.full((batch,), 1.0 / batch, dtype=torch.float64)
        pair_weights = (edge_weight / n).float().unsqueeze(1).expand(batch, n)  # (B, n)
        reg_weights = torch.zeros(num_users + num_items, dtype=torch.float64)
        reg_weights.index_add_(0, users, edge_weight)
        reg_weights.index_add_(0, items + num_users, edge_weight)
        reg_weights.index_add_(0, negs + num_users, (edge_weight / n).repeat_interleave(n))
        return PairBatch(
            num_users=num_users, num_items=num_items, negatives=n,
            user_offsets=_offsets(user_count * (1 + n)),
            user_major_items=entries.reshape(-1),
            item_offsets_pos=_offsets(pos_count), pos_users=users[item_major], pos_order=item_major,
            item_offsets_neg=_offsets(neg_count), neg_users=users[slot // n], neg_order=slot,
            pair_weights=pair_weights, reg_weights=reg_weights.float(),
        )


    @torch.no_grad()
    def _hardest(self, user_count: Tensor, user_emb: Tensor, item_emb: Tensor) -> Tensor:
        """For each (edge, k) slot, user-major, the best-scored of ``candidates`` uniform items."""
        m, per_edge = self.candidates, self.negatives * self.candidates
        slots = int(user_count.sum()) * self.negatives
        drawn = torch.randint(self.num_items, (slots * m,), generator=self.generator)
        scores = sampled_dot(_offsets(user_count * per_edge), drawn, user_emb, item_emb)
        best = scores.view(slots, m).argmax(1, keepdim=True)  # (slots, 1)
        return drawn.view(slots, m).gather(1, best).squeeze(1)


class _PairScores(torch.autograd.Function):
    """s = (E_U E_I^T) on the batch's pattern; ds -> (W E_I, W^T E_U). (B, 1 + n)."""

    @staticmethod
    def forward(ctx, user_emb: Tensor, item_emb: Tensor, batch: PairBatch) -> Tensor:  # type: ignore[override]
        ctx.batch = batch
        ctx.save_for_backward(user_emb, item_emb)
        scores = sampled_dot(batch.user_offsets, batch.user_major_items, user_emb, item_emb)
        return scores.view(-1, 1 + batch.negatives)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        batch: PairBatch = ctx.batch
        user_emb, item_emb = ctx.saved_tensors
        grad = grad.contiguous()  # (B, 1 + n)
        shape = (batch.num_users, batch.num_items)
        w = csr(batch.user_offsets, batch.user_major_items, grad.reshape(-1), shape)
        grad_users = w @ item_emb  # (U, d)
        item_shape = (batch.num_items, batch.num_users)
        pos = csr(batch.item_offsets_pos, batch.pos_users, grad[:, 0][batch.pos_order], item_shape)
        neg = csr(batch.item_offsets_neg, batch.neg_users,
                  grad[:, 1:].reshape(-1)[batch.neg_order], item_shape)
        grad_items = pos @ user_emb + neg @ user_emb  # (I, d)
        return grad_users, grad_items, None


def pair_scores(user_emb: Tensor, item_emb: Tensor, batch: PairBatch) -> Tensor:
    """e_u . e_i for each pair of ``batch``: (B, 1 + n), positives in column 0. Differentiable."""
    return _PairScores.apply(user_emb, item_emb, batch)


def bpr_loss(scores: Tensor, layer0: Tensor, batch: PairBatch, *, lambda_reg: float) -> Tensor:
    r"""LightGCN's BPR (eq. 15) in PyG's form, over the (user, positive, negative) pairs with
    weights w summing to 1 (1 / Bn each under ``edge`` weighting, PyG's ``BPRLoss`` exactly):

    .. math::
        L = \sum_{(u,i,j)} w_{uij} \Big(-\ln\sigma(s_{ui} - s_{uj})
            + \lambda \big(\lVert e^{(0)}_u\rVert^2 + \lVert e^{(0)}_i\rVert^2
            + \lVert e^{(0)}_j\rVert^2\big)\Big)

    Args:
        scores: (B, 1 + n) from :func:`pair_scores`.
        layer0: (U + I, d) the free embeddings E^(0).
        batch: the pairs (for each node's count in them).
        lambda_reg: lambda.
    """
    diff = scores[:, 1:] - scores[:, :1]  # (B, n) s_uj - s_ui
    ranking = (torch.nn.functional.softplus(diff) * batch.pair_weights).sum()  # -ln sigma(.)
    reg = (batch.reg_weights * layer0.pow(2).sum(1)).sum()
    return ranking + lambda_reg * reg
