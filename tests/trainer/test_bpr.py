"""Large-batch BPR: the sparse-product loss and gradient equal PyG's BPR through autograd."""

from __future__ import annotations

import pytest
import torch

from trainer.bpr import PairSampler, bpr_loss, pair_scores, sampled_dot
from trainer.gcn_model import LightGCNRetriever, normalized_adjacency

U, I = 7, 9
USERS = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5, 6, 6, 6, 2, 0])
ITEMS = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 8, 1])  # (0, 1) twice


@pytest.fixture(autouse=True)
def _threads(torch_one_thread):
    torch.manual_seed(0)


def _sampler(negatives: int, seed: int = 1, weighting: str = "edge") -> PairSampler:
    return PairSampler(users=USERS, items=ITEMS, num_users=U, num_items=I, negatives=negatives,
                       weighting=weighting, generator=torch.Generator().manual_seed(seed))


def test_batches_hold_every_edge_of_their_users_in_both_orders():
    sampler = _sampler(negatives=3)
    assert sampler.num_edges == 13  # edges as given (the trainer passes distinct ones)
    groups = sampler.user_groups(3)
    assert len(groups) == 3 and sum(int(g.sum()) for g in groups) == sampler.num_edges
    for mask in [None, *groups]:
        batch = sampler.sample(mask)
        users = sampler.users if mask is None else sampler.users[mask]
        items = sampler.items if mask is None else sampler.items[mask]
        entries = batch.user_major_items.view(-1, 4)  # (B, 1 + n)
        assert torch.equal(entries[:, 0], items) and batch.pairs == 3 * len(users)
        assert (entries >= 0).all() and (entries < I).all()
        # item-major views list the same (user, item) entries
        pos = sorted(zip(batch.pos_users.tolist(),
                         torch.repeat_interleave(torch.arange(I), batch.item_offsets_pos.diff()).tolist()))
        assert pos == sorted(zip(users.tolist(), items.tolist()))
        neg_items = torch.repeat_interleave(torch.arange(I), batch.item_offsets_neg.diff())
        assert torch.equal(entries[:, 1:].reshape(-1)[batch.neg_order], neg_items)
        assert torch.equal(users.repeat_interleave(3)[batch.neg_order], batch.neg_users)
        assert batch.pair_weights.shape == (len(users), 3)
        torch.testing.assert_close(batch.pair_weights.sum(), torch.tensor(1.0))
        torch.testing.assert_close(batch.reg_weights.sum(), torch.tensor(3.0))  # u, i, j per pair


@pytest.mark.parametrize("combination", ["mean_1_to_K", "mean_0_to_K", "last"])
@pytest.mark.parametrize("negatives", [1, 3])
def test_loss_and_gradient_equal_pyg_bpr_through_autograd(combination, negatives):
    adj = normalized_adjacency(USERS, ITEMS, num_users=U, num_items=I)
    model = LightGCNRetriever(num_users=U, num_items=I, embedding_dim=4, num_layers=3,
                              layer_combination=combination)
    sampler = _sampler(negatives)
    for mask in [None, sampler.user_groups(2)[1]]:
        batch = sampler.sample(mask)
        nodes = model(adj)
        scores = pair_scores(*model.split(nodes), batch)
        fast = bpr_loss(scores, model.gcn.embedding.weight, batch, lambda_reg=1e-2)
        model.zero_grad()
        fast.backward()
        fast_grad = model.gcn.embedding.weight.grad.clone()
        users = (sampler.users if mask is None else sampler.users[mask]).repeat_interleave(negatives)
        entries = batch.user_major_items.view(-1, 1 + negatives)
        pos, neg = entries[:, 0].repeat_interleave(negatives), entries[:, 1:].reshape(-1)
        reference = model.recommendation_loss(model(adj), users, pos, neg, lambda_reg=1e-2)
        model.zero_grad()
        reference.backward()
        torch.testing.assert_close(fast, reference)
        torch.testing.assert_close(fast_grad, model.gcn.embedding.weight.grad)


def test_user_weighting_is_the_mean_over_users_of_their_mean_pair_loss():
    adj = normalized_adjacency(USERS, ITEMS, num_users=U, num_items=I)
    model = LightGCNRetriever(num_users=U, num_items=I, embedding_dim=4, num_layers=2)
    sampler = _sampler(negatives=2, weighting="user")
    batch = sampler.sample(sampler.user_groups(2)[0])
    nodes = model(adj)
    scores = pair_scores(*model.split(nodes), batch)
    got = bpr_loss(scores, model.gcn.embedding.weight, batch, lambda_reg=0.1)
    mask = batch.user_offsets.diff() > 0  # the batch's users
    entries = batch.user_major_items.view(-1, 3)
    edge_users = torch.repeat_interleave(torch.arange(U), batch.user_offsets.diff() // 3)
    e0 = model.gcn.embedding.weight
    per_user = []
    for user in torch.nonzero(mask).squeeze(1).tolist():
        rows = torch.nonzero(edge_users == user).squeeze(1)
        losses = []
        for row in rows.tolist():
            for k in (1, 2):
                pos, neg = int(entries[row, 0]), int(entries[row, k])
                pair = torch.nn.functional.softplus(scores[row, k] - scores[row, 0])
                reg = e0[user].pow(2).sum() + e0[U + pos].pow(2).sum() + e0[U + neg].pow(2).sum()
                losses.append(pair + 0.1 * reg)
        per_user.append(torch.stack(losses).mean())
    torch.testing.assert_close(got, torch.stack(per_user).mean())


def test_hard_negatives_are_the_best_scored_candidates():
    sampler = PairSampler(users=USERS, items=ITEMS, num_users=U, num_items=I, negatives=2,
                          candidates=60, generator=torch.Generator().manual_seed(3))
    user_emb, item_emb = torch.randn(U, 4), torch.randn(I, 4)
    batch = sampler.sample(embeddings=(user_emb, item_emb))
    scores = user_emb @ item_emb.T  # (U, I)
    negatives = batch.user_major_items.view(-1, 3)[:, 1:]  # (B, 2)
    chosen = scores[sampler.users.unsqueeze(1), negatives]
    # 60 draws over 9 items cover every item (probability > 0.99): the best of all is chosen
    torch.testing.assert_close(chosen, scores.max(1).values[sampler.users].unsqueeze(1).expand(-1, 2))
    neg_items = torch.repeat_interleave(torch.arange(I), batch.item_offsets_neg.diff())
    assert torch.equal(negatives.reshape(-1)[batch.neg_order], neg_items)  # item-major view
    with pytest.raises(ValueError, match="embeddings"):
        sampler.sample()


@pytest.mark.parametrize("entries_per_user", [2, 20])  # below / above the dense size (7 x 9)
def test_sampled_dot_is_the_row_dot_product(entries_per_user):
    users, items = torch.randn(U, 5), torch.randn(I, 5)
    offsets = torch.arange(0, (U + 1) * entries_per_user, entries_per_user)
    cols = torch.randint(I, (U * entries_per_user,))
    rows = torch.arange(U).repeat_interleave(entries_per_user)
    torch.testing.assert_close(sampled_dot(offsets, cols, users, items),
                               (users[rows] * items[cols]).sum(-1))


def test_invalid_settings():
    with pytest.raises(ValueError, match="negatives"):
        _sampler(negatives=0)
    with pytest.raises(ValueError, match="weighting"):
        _sampler(negatives=1, weighting="item")
    with pytest.raises(ValueError, match="candidates"):
        PairSampler(users=USERS, items=ITEMS, num_users=U, num_items=I, candidates=0)
