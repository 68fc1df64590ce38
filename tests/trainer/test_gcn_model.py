"""trainer.gcn_model.LightGCNRetriever: the propagation equals the dense computation; layer mixing; fold-in; BPR."""

from __future__ import annotations

import pytest
import torch

from trainer.gcn_model import (
    LAYER_COMBINATIONS,
    LightGCNRetriever,
    layer_weights,
    normalized_adjacency,
)

# users 0..2, items 0..3; (0, 1) twice: duplicates count once
USERS = torch.tensor([0, 0, 0, 1, 1, 2, 2])
ITEMS = torch.tensor([0, 1, 1, 1, 2, 2, 3])


@pytest.fixture(autouse=True)
def _threads(torch_one_thread):
    torch.manual_seed(0)


def dense_adjacency() -> torch.Tensor:
    a = torch.zeros(7, 7)
    for u, i in zip(USERS.tolist(), ITEMS.tolist()):
        a[u, 3 + i] = a[3 + i, u] = 1.0
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


def test_layer_weights():
    assert layer_weights("mean_1_to_K", 3).tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])
    assert layer_weights("mean_0_to_K", 3).tolist() == pytest.approx([0.25] * 4)
    assert layer_weights("last", 2).tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="layer_combination"):
        layer_weights("max", 3)


def test_normalized_adjacency_matches_dense():
    adj = normalized_adjacency(USERS, ITEMS, num_users=3, num_items=4)
    assert adj.layout == torch.sparse_csr and adj.shape == (7, 7)
    torch.testing.assert_close(adj.to_dense(), dense_adjacency())


@pytest.mark.parametrize("combination", LAYER_COMBINATIONS)
@pytest.mark.parametrize("layers", [1, 3])
def test_propagation_matches_dense(combination, layers):
    model = LightGCNRetriever(num_users=3, num_items=4, embedding_dim=5, num_layers=layers,
                              layer_combination=combination)
    adj = normalized_adjacency(USERS, ITEMS, num_users=3, num_items=4)
    out = model(adj)
    assert out.shape == (7, 5)
    user, item = model.split(out)
    assert user.shape == (3, 5) and item.shape == (4, 5)
    x0 = model.gcn.embedding.weight
    dense, x = layer_weights(combination, layers)[0] * x0, x0
    for k in range(1, layers + 1):
        x = dense_adjacency() @ x
        dense = dense + layer_weights(combination, layers)[k] * x
    torch.testing.assert_close(out, dense)
    # the symmetric sparse backward gives the dense gradient
    out.pow(2).sum().backward()
    sparse_grad = model.gcn.embedding.weight.grad.clone()
    model.gcn.embedding.weight.grad = None
    dense.pow(2).sum().backward()
    torch.testing.assert_close(sparse_grad, model.gcn.embedding.weight.grad)


@pytest.mark.parametrize("combination", LAYER_COMBINATIONS)
def test_fold_in_basis_reproduces_users(combination):
    model = LightGCNRetriever(num_users=3, num_items=4, embedding_dim=6, num_layers=3,
                              layer_combination=combination)
    adj = normalized_adjacency(USERS, ITEMS, num_users=3, num_items=4)
    user, item, basis = model.export(adj)
    assert user.shape == (3, 6) and item.shape == (4, 6) and basis.shape == (4, 6)
    for u in range(3):
        items = sorted(set(ITEMS[USERS == u].tolist()))
        folded = basis[items].sum(0) / len(items) ** 0.5
        alpha0 = layer_weights(combination, 3)[0]
        own = alpha0 * model.gcn.embedding.weight[u].detach()  # the free layer-0 term
        torch.testing.assert_close(folded + own, user[u], atol=1e-6, rtol=1e-5)


def test_bpr_loss_decreases():
    model = LightGCNRetriever(num_users=3, num_items=4, embedding_dim=8, num_layers=2)
    adj = normalized_adjacency(USERS, ITEMS, num_users=3, num_items=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    users, pos = USERS, ITEMS
    neg = torch.tensor([3, 3, 3, 0, 0, 0, 1])  # items each user never touched
    losses = []
    for _ in range(40):
        loss = model.recommendation_loss(model(adj), users, pos, neg, lambda_reg=1e-4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    user, item = model.split(model(adj).detach())
    assert float(user[0] @ item[1]) > float(user[0] @ item[3])


def test_invalid_sizes():
    with pytest.raises(ValueError, match="at least one"):
        LightGCNRetriever(num_users=0, num_items=3)
    with pytest.raises(ValueError, match="num_layers"):
        LightGCNRetriever(num_users=1, num_items=1, num_layers=0)
