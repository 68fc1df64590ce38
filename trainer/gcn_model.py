"""LightGCN for the GCN-Retriever (the paper's section 4), through torch_geometric. Torch only.

References:
    He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation",
    SIGIR 2020, https://arxiv.org/abs/2002.02126 (propagation, layer combination, BPR).
    "The Efficiency vs. Accuracy Trade-off: Optimizing RAG-Enhanced LLM Recommender Systems Using
    Multi-Head Early Exit", section 4 (mean of layers 1..K, cosine similarity of users).

Blocks, top-down: the layer weights of each combination, the normalised adjacency (built once),
the symmetric sparse product, then ``LightGCNRetriever`` with its loss and export. The same loss
arranged for large batches on a CPU (pair scores as sparse products) is in ``trainer.bpr``.
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch
from torch import Tensor
from torch_geometric.nn.conv import LGConv
from torch_geometric.nn.models import LightGCN

LayerCombination = Literal["mean_1_to_K", "mean_0_to_K", "last"]
LAYER_COMBINATIONS: tuple[str, ...] = get_args(LayerCombination)


def layer_weights(layer_combination: str, num_layers: int) -> Tensor:
    """alpha_0..alpha_K, the weights of the layer outputs in the final embedding. Shape (K+1,).

    - ``mean_1_to_K`` (the paper's eq.: e_u = 1/K sum_{k=1..K} e_u^(k)): alpha_0 = 0, others 1/K
    - ``mean_0_to_K`` (LightGCN's and PyG's default): every alpha_k = 1/(K+1)
    - ``last``: only layer K
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if layer_combination == "mean_1_to_K":
        alpha = torch.full((num_layers + 1,), 1.0 / num_layers)
        alpha[0] = 0.0
    elif layer_combination == "mean_0_to_K":
        alpha = torch.full((num_layers + 1,), 1.0 / (num_layers + 1))
    elif layer_combination == "last":
        alpha = torch.zeros(num_layers + 1)
        alpha[-1] = 1.0
    else:
        raise ValueError(
            f"layer_combination must be one of {LAYER_COMBINATIONS}, got {layer_combination!r}"
        )
    return alpha


def normalized_adjacency(
    user_index: Tensor, item_index: Tensor, *, num_users: int, num_items: int
) -> Tensor:
    """The symmetric-normalised bipartite adjacency D^-1/2 A D^-1/2 as a sparse CSR (N, N).

    Nodes are users 0..U-1 then items U..U+I-1; duplicate (user, item) pairs count once. Built once
    per fit: letting ``LGConv`` re-normalise an edge index on every call is ~25x slower. Indices
    are int32, MKL's native type (a product on gowalla: 38 ms, 56 ms with int64 indices).
    """
    pairs = torch.unique(user_index.long() * num_items + item_index.long())  # (E,) deduplicated
    users, items = pairs // num_items, pairs % num_items + num_users
    num_nodes = num_users + num_items
    row = torch.cat([users, items])  # (2E,) both directions
    col = torch.cat([items, users])
    degree = torch.bincount(row, minlength=num_nodes).float()  # (N,)
    inv_sqrt = degree.clamp(min=1).rsqrt()
    weight = inv_sqrt[row] * inv_sqrt[col]  # 1 / sqrt(|N_u| |N_i|)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and measured here
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(torch.stack([row, col]), weight, (num_nodes, num_nodes))
        adj = coo.coalesce().to_sparse_csr()
        return torch.sparse_csr_tensor(adj.crow_indices().int(), adj.col_indices().int(),
                                       adj.values(), adj.shape)


class _SymmetricSpmm(torch.autograd.Function):
    """y = A x for a symmetric sparse A; the backward is A g (no CSR transpose: ~2x faster)."""

    @staticmethod
    def forward(ctx, adj: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.adj = adj
        return adj @ x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, ctx.adj @ grad


class SymmetricLGConv(LGConv):
    """``LGConv`` over a pre-normalised symmetric sparse adjacency (``normalize=False``)."""

    def __init__(self) -> None:
        super().__init__(normalize=False)

    def message_and_aggregate(self, adj_t: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        return _SymmetricSpmm.apply(adj_t, x)


class LightGCNRetriever(torch.nn.Module):
    r"""LightGCN user/item embeddings whose layer mixing is selectable, for similar-user retrieval.

    Propagation on the user-item graph (no weights, no non-linearity; LightGCN eq. 3):

    .. math::
        e_u^{(k+1)} = \sum_{i \in N_u} \frac{1}{\sqrt{|N_u|}\sqrt{|N_i|}} e_i^{(k)}, \qquad
        e_i^{(k+1)} = \sum_{u \in N_i} \frac{1}{\sqrt{|N_i|}\sqrt{|N_u|}} e_u^{(k)}

    Layer combination, :math:`e_u = \sum_{k=0}^{K} \alpha_k e_u^{(k)}`; the paper's (section 4,
    ``mean_1_to_K``, the default) is :math:`\overline{e_u} = \frac{1}{K}\sum_{k=1}^{K} e_u^{(k)}`.
    Users are compared by cosine similarity,
    :math:`\mathrm{sim}(u, v) = \frac{e_u \cdot e_v}{\lVert e_u\rVert \lVert e_v\rVert}`, and
    :math:`v^* = \arg\max_v \mathrm{sim}(u, v)`. Training uses BPR (LightGCN eq. 15):
    :math:`L = -\frac{1}{B}\sum \ln\sigma(e_u\cdot e_i - e_u\cdot e_j) + \lambda \lVert E^{(0)}_B\rVert^2 / B`.

    Fold-in basis: for a user absent from the fit, with the item layers held fixed,
    :math:`e_u = \frac{1}{\sqrt{|N_u|}} \sum_{i \in N_u} f_i` where
    :math:`f_i = \sum_{k=1}^{K} \alpha_k\, e_i^{(k-1)} / \sqrt{|N_i|}` (see :meth:`export`). For
    ``mean_1_to_K`` and ``last`` (alpha_0 = 0) this reproduces a fitted user's embedding exactly.

    Args:
        num_users: U, users are nodes 0..U-1.
        num_items: I, items are nodes U..U+I-1.
        embedding_dim: d (default 64).
        num_layers: K propagation layers (default 3).
        layer_combination: ``mean_1_to_K`` (default), ``mean_0_to_K`` or ``last``.
        init_std: E^(0) ~ N(0, init_std^2) as in LightGCN's reference code (default 0.1);
            None keeps PyG's Xavier-uniform initialisation.
    """

    def __init__(
        self,
        *,
        num_users: int,
        num_items: int,
        embedding_dim: int = 64,
        num_layers: int = 3,
        layer_combination: str = "mean_1_to_K",
        init_std: float | None = 0.1,
    ) -> None:
        super().__init__()
        if num_users < 1 or num_items < 1:
            raise ValueError(f"need at least one user and one item, got {num_users}, {num_items}")
        self.num_users, self.num_items = num_users, num_items
        self.layer_combination = layer_combination
        alpha = layer_weights(layer_combination, num_layers)
        self.gcn = LightGCN(num_users + num_items, embedding_dim, num_layers, alpha=alpha)
        self.gcn.convs = torch.nn.ModuleList(SymmetricLGConv() for _ in range(num_layers))
        if init_std is not None:
            torch.nn.init.normal_(self.gcn.embedding.weight, std=init_std)

    @property
    def num_layers(self) -> int:
        return self.gcn.num_layers

    @property
    def embedding_dim(self) -> int:
        return self.gcn.embedding_dim

    def forward(self, adj: Tensor) -> Tensor:
        """The combined embedding of every node, sum_k alpha_k e^(k). (N, d)."""
        return self.gcn.get_embedding(adj)

    def layer_embeddings(self, adj: Tensor) -> list[Tensor]:
        """e^(0), ..., e^(K) of every node, K+1 tensors of shape (N, d)."""
        x = self.gcn.embedding.weight
        layers = [x]
        for conv in self.gcn.convs:
            x = conv(x, adj)
            layers.append(x)
        return layers

    @staticmethod
    def combine(layers: list[Tensor], layer_combination: str) -> Tensor:
        """sum_k alpha_k e^(k) of given layer outputs under any combination (Table 3's question:
        the same fit read out differently). (N, d)."""
        alpha = layer_weights(layer_combination, len(layers) - 1)
        return sum(float(a) * x for a, x in zip(alpha, layers))

    def split(self, nodes: Tensor) -> tuple[Tensor, Tensor]:
        """(N, d) -> users (U, d), items (I, d)."""
        return nodes[: self.num_users], nodes[self.num_users :]

    def recommendation_loss(
        self, nodes: Tensor, users: Tensor, pos_items: Tensor, neg_items: Tensor, *, lambda_reg: float
    ) -> Tensor:
        """Mean BPR loss of (user, positive, negative) triples plus L2 on their layer-0 rows.

        ``nodes`` is :meth:`forward`'s output; the index tensors are (B,) user rows and item rows
        (0-based within items).
        """
        u = nodes[users]  # (B, d)
        pos = nodes[pos_items + self.num_users]  # (B, d)
        neg = nodes[neg_items + self.num_users]  # (B, d)
        node_id = torch.cat([users, pos_items + self.num_users, neg_items + self.num_users])
        return self.gcn.recommendation_loss(
            (u * pos).sum(-1), (u * neg).sum(-1), node_id=node_id, lambda_reg=lambda_reg
        )

    @torch.no_grad()
    def export(self, adj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """user (U, d), item (I, d) final embeddings and the item fold-in basis f (I, d).

        f_i = sum_{k=1..K} alpha_k e_i^(k-1) / sqrt(|N_i|), so that a user's layer-k embedding
        e_u^(k) = sum_{i in N_u} e_i^(k-1) / sqrt(|N_u| |N_i|) gives
        sum_{k>=1} alpha_k e_u^(k) = sum_{i in N_u} f_i / sqrt(|N_u|).
        """
        layers = self.layer_embeddings(adj)
        alpha = self.gcn.alpha
        combined = sum(a * x for a, x in zip(alpha, layers))  # (N, d)
        users, items = self.split(combined)
        item_degree = _degrees(adj)[self.num_users :].clamp(min=1)  # (I,)
        basis = sum(alpha[k] * layers[k - 1][self.num_users :] for k in range(1, len(layers)))
        basis = basis / item_degree.sqrt().unsqueeze(1)  # (I, d)
        return users, items, basis


def _degrees(adj: Tensor) -> Tensor:
    """Node degrees (number of neighbours) of a CSR adjacency. (N,)."""
    return (adj.crow_indices()[1:] - adj.crow_indices()[:-1]).float()
