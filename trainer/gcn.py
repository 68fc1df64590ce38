"""LightGCN fit for the GCN-Retriever (paper section 4), full-ranking evaluation, and publishing.

    # the LightGCN benchmark split (gowalla): fit, evaluate recall@20 / ndcg@20, save ARTIFACTS/gcn
    .venv/bin/python -m trainer.gcn --data ../shared/data/gowalla --out runs/gowalla \\
        --layer-combination mean_0_to_K --epochs 1500 --eval-every 100
    # publish a fit to running retrievers (they swap to it within a second)
    .venv/bin/python -m trainer.gcn --data ../shared/data/gowalla --out runs/g --epochs 50 \\
        --publish-redis-url redis://:secret@127.0.0.1:6379/0

From Python (what ``trainer fit-gcn`` does)::

    emb = fit_gcn([("u1", "i1"), ("u1", "i2"), ...], layers=3, dim=64, epochs=300)
    emb.save(artifacts_dir)                      # ARTIFACTS/gcn/{embeddings.safetensors, meta.json}
    publish_gcn(emb, redis_url=url)              # new embedding version for the live service

Training: LightGCN's model and loss (BPR, L2 on the pairs' layer-0 rows, Adam), arranged for a
CPU (``trainer.bpr``): every step is one propagation of the whole graph and scores every
training edge of a batch of whole users, each with ``negatives`` uniform negatives, through
sparse products; each user weighs the same (``weighting="user"``), the objective of LightGCN's
reference samplers, which draw users uniformly. LightGCN's own recipe (2048 pairs per step,
lr 1e-3, ~1000 epochs) needs ~400k propagations on gowalla: hours on 2 cores. The whole graph per
step at lr 5e-2, decayed by a cosine to 1e-3, needs a few thousand. Measured on gowalla, 2 shared
cores (bench/bench_gcn_quality.py, 40-minute budget, 3475 steps): recall@20 0.1853, ndcg@20
0.1569 (published 0.1824 / 0.1547), past 0.180 / 0.152 after 1200 steps (18 min). What the
measurements said on the way (recall@20): edge-weighted pairs plateau at 0.166 (constant lr)
or 0.1695 (cosine over 460 steps); weighting users equally: 0.1764 over the same 12 minutes;
8 user groups per epoch at lr 1e-2: 0.130 after 200 steps (a step costs a propagation whatever
its batch, so smaller batches buy nothing); lambda 1e-3: 0.150 (underfits); 4 negatives per
edge: no better per second.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from retriever_svc.embeddings import GCNEmbeddings
from trainer.bpr import PairSampler, bpr_loss, pair_scores
from trainer.gcn_model import LAYER_COMBINATIONS, LightGCNRetriever, normalized_adjacency
from trainer.publishing import publish_gcn


Pairs = Sequence[tuple[int, int]] | np.ndarray


def fit_gcn(
    interactions: Sequence[tuple[str, str]],
    *,
    layers: int = 3,
    dim: int = 64,
    epochs: int = 20,
    lr: float = 5e-2,
    batch_size: int = 0,
    negatives: int = 1,
    candidates: int = 1,
    weighting: str = "user",
    weight_decay: float = 1e-4,
    layer_combination: str = "mean_1_to_K",
    final_lr_ratio: float = 0.02,
    init_std: float | None = 0.1,
    time_budget_s: float | None = None,
    seed: int = 0,
    progress: bool = True,
    eval_pairs: Sequence[tuple[str, str]] | None = None,
    eval_every: int = 0,
    k: int = 20,
    on_epoch: Callable[[dict], None] | None = None,
    user_variants: Sequence[str] = (),
) -> GCNEmbeddings:
    """Fit LightGCN on (user, item) pairs (duplicates ignored); returns the embeddings.

    Args:
        interactions: training (user_id, item_id) pairs.
        layers, dim, layer_combination, init_std: the model (see ``LightGCNRetriever``).
        epochs: passes over every training edge.
        lr: Adam's peak learning rate, decayed by a cosine to ``lr * final_lr_ratio`` over the
            epochs, or over ``time_budget_s`` when given (whichever is further along).
        time_budget_s: stop training after this many seconds (then the final evaluation);
            the schedule follows the clock, so the epoch count depends on the machine's speed.
        batch_size: edges per step, approximately (whole users per batch); 0 = the whole graph.
        negatives: negative items per positive edge and step.
        candidates: 1: uniform negatives (LightGCN's); m > 1: each negative the best-scored of
            m uniform draws (dynamic negative sampling; see ``trainer.bpr``).
        weighting: ``user`` (each user weighs the same, as LightGCN's reference samplers
            draw users uniformly) or ``edge`` (see ``trainer.bpr.PairSampler``).
        weight_decay: lambda of the L2 term (PyG's ``BPRLoss`` form).
        seed: seeds the initialisation and the sampling.
        progress: show a tqdm bar.
        eval_pairs: held-out (user, item) pairs; when given, recall@k / ndcg@k of the final
            embeddings go to ``meta["metrics"]`` (and every ``eval_every`` epochs to ``meta["curve"]``),
            with every layer combination read from the same fit in ``meta["by_layer_combination"]``.
        on_epoch: called after each epoch with {"epoch", "seconds", "loss", [metrics]}.
        user_variants: other layer combinations whose user embeddings, read out of the same fit,
            go to ``user_variants`` of the result (the paper's Table 3: average against last layer).
    """
    if not interactions:
        raise ValueError("fit_gcn needs at least one (user, item) interaction")
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    user_ids, item_ids, train = _index_pairs(interactions)
    users_t, items_t = torch.from_numpy(train[:, 0]), torch.from_numpy(train[:, 1])
    num_users, num_items = len(user_ids), len(item_ids)
    adj = normalized_adjacency(users_t, items_t, num_users=num_users, num_items=num_items)
    model = LightGCNRetriever(num_users=num_users, num_items=num_items, embedding_dim=dim,
                              num_layers=layers, layer_combination=layer_combination,
                              init_std=init_std)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    sampler = PairSampler(users=users_t, items=items_t, num_users=num_users, num_items=num_items,
                          negatives=negatives, candidates=candidates, weighting=weighting,
                          generator=generator)
    groups = max(1, math.ceil(len(train) / batch_size)) if batch_size > 0 else 1
    held_out = _held_out(eval_pairs, user_ids, item_ids) if eval_pairs else None
    curve: list[dict] = []
    loss_value = float("nan")
    train_start, epoch = time.perf_counter(), 0
    for epoch in tqdm(range(1, epochs + 1), desc="lightgcn", disable=not progress, unit="epoch"):
        done = (epoch - 1) / max(epochs - 1, 1)
        if time_budget_s:
            done = max(done, (time.perf_counter() - train_start) / time_budget_s)
        _set_lr(optimizer, lr * _cosine(min(done, 1.0), final_lr_ratio))
        loss_value = _epoch(model, adj, optimizer, sampler, groups, weight_decay)
        elapsed = time.perf_counter() - train_start
        last = epoch == epochs or (time_budget_s is not None and elapsed >= time_budget_s)
        row = {"epoch": epoch, "seconds": round(time.perf_counter() - start, 2), "loss": loss_value}
        if held_out is not None and eval_every and (epoch % eval_every == 0 or last):
            row.update(evaluate_model(model, adj, train, held_out, k=k,
                                      combinations=(layer_combination,))[layer_combination])
        curve.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if last:
            break
    model.eval()
    user, item, basis = (t.numpy() for t in model.export(adj))
    variants = {}
    if user_variants:
        with torch.no_grad():
            layer_outputs = model.layer_embeddings(adj)
            for name in user_variants:
                variants[name] = model.split(model.combine(layer_outputs, name))[0].numpy()
    metrics: dict = {"loss": loss_value, "seconds": round(time.perf_counter() - start, 2)}
    meta = {
        "layers": layers, "layer_combination": layer_combination, "epochs": epoch, "lr": lr,
        "batch_size": batch_size, "negatives": negatives, "candidates": candidates,
        "weighting": weighting,
        "weight_decay": weight_decay,
        "final_lr_ratio": final_lr_ratio, "time_budget_s": time_budget_s, "seed": seed,
        "interactions": int(len(train)),
        "metrics": metrics, "curve": curve,
    }
    if held_out is not None:  # the other combinations read out of the same fit
        evaluated = curve and f"recall@{k}" in curve[-1]
        others = tuple(c for c in LAYER_COMBINATIONS if c != layer_combination or not evaluated)
        by_combination = evaluate_model(model, adj, train, held_out, k=k, combinations=others)
        if evaluated:
            by_combination[layer_combination] = {
                key: curve[-1][key] for key in (f"recall@{k}", f"ndcg@{k}")}
        metrics.update(by_combination[layer_combination])
        meta["by_layer_combination"] = by_combination
    return GCNEmbeddings(
        user_ids=user_ids, item_ids=item_ids, user=user, item=item, item_foldin=basis,
        version=GCNEmbeddings.make_version(user, item), meta=meta, user_variants=variants,
    )


def _cosine(done: float, final_ratio: float) -> float:
    """Cosine decay from 1 (nothing done) to ``final_ratio`` (all done)."""
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _epoch(model: LightGCNRetriever, adj: torch.Tensor, optimizer: torch.optim.Optimizer,
           sampler: PairSampler, groups: int, weight_decay: float) -> float:
    """One pass over every training edge in ``groups`` steps; returns the mean loss."""
    model.train()
    total = 0.0
    masks = sampler.user_groups(groups)
    for mask in masks:
        nodes = model(adj)  # (N, d): one propagation per step
        user, item = model.split(nodes)
        hard = (user.detach(), item.detach()) if sampler.candidates > 1 else None
        batch = sampler.sample(mask, embeddings=hard)
        scores = pair_scores(user, item, batch)  # (B, 1 + n)
        loss = bpr_loss(scores, model.gcn.embedding.weight, batch, lambda_reg=weight_decay)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / len(masks)


def _index_pairs(interactions: Sequence[tuple[str, str]]) -> tuple[list[str], list[str], np.ndarray]:
    """Sorted distinct user and item ids, and the distinct (user row, item row) pairs (E, 2)."""
    users = sorted({str(u) for u, _ in interactions})
    items = sorted({str(i) for _, i in interactions})
    user_row = {u: r for r, u in enumerate(users)}
    item_row = {i: r for r, i in enumerate(items)}
    pairs = np.array([(user_row[str(u)], item_row[str(i)]) for u, i in interactions], np.int64)
    return users, items, np.unique(pairs, axis=0)


def _held_out(pairs: Sequence[tuple[str, str]], users: list[str], items: list[str]) -> np.ndarray:
    """Held-out pairs as rows (E', 2); pairs with a user or item unseen in training are dropped."""
    user_row = {u: r for r, u in enumerate(users)}
    item_row = {i: r for r, i in enumerate(items)}
    rows = [(user_row[u], item_row[i]) for u, i in pairs if u in user_row and i in item_row]
    return np.array(rows, np.int64).reshape(-1, 2)


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_model(model: LightGCNRetriever, adj: torch.Tensor, train_pairs: Pairs,
                   test_pairs: Pairs, *, k: int = 20,
                   combinations: Sequence[str] = LAYER_COMBINATIONS) -> dict[str, dict[str, float]]:
    """recall@k / ndcg@k of one fit read out by each layer combination (one propagation)."""
    layers = model.layer_embeddings(adj)
    out = {}
    for combination in combinations:
        user, item = model.split(model.combine(layers, combination))
        out[combination] = evaluate_ranking(user, item, train_pairs, test_pairs, k=k)
    return out


@torch.no_grad()
def evaluate_ranking(
    user_emb: np.ndarray | torch.Tensor,
    item_emb: np.ndarray | torch.Tensor,
    train_pairs: Pairs,
    test_pairs: Pairs,
    k: int = 20,
    *,
    batch_users: int = 1024,
) -> dict[str, float]:
    """recall@k and ndcg@k by full ranking (LightGCN's protocol), averaged over test users.

    Every item is scored by the inner product e_u . e_i; the user's training items are masked out;
    recall@k = |top-k ∩ test_u| / |test_u| and ndcg@k = DCG@k / IDCG@k with DCG = sum over hits
    at rank r (0-based) of 1 / log2(r + 2) and IDCG the DCG of min(|test_u|, k) hits at the top.
    Pairs are (user row, item row) indices into the embedding matrices; duplicates count once.
    """
    user = torch.as_tensor(np.asarray(user_emb), dtype=torch.float32)  # (U, d)
    item = torch.as_tensor(np.asarray(item_emb), dtype=torch.float32)  # (I, d)
    num_users, num_items = user.shape[0], item.shape[0]
    train_offsets, train_items = _by_user(train_pairs, num_users, num_items)
    test_offsets, test_items = _by_user(test_pairs, num_users, num_items)
    test_keys = torch.repeat_interleave(torch.arange(num_users), test_offsets.diff()) * num_items
    test_keys += test_items  # (T,) sorted user * I + item
    k = min(k, num_items)
    test_users = torch.nonzero(test_offsets.diff() > 0).squeeze(1)
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float32) + 2)  # (k,)
    ideal_dcg = torch.cumsum(discount, 0)  # (k,) IDCG for 1..k relevant items
    recall_sum = ndcg_sum = 0.0
    for begin in range(0, len(test_users), batch_users):
        batch = test_users[begin : begin + batch_users]  # (B,)
        scores = user[batch] @ item.T  # (B, I)
        rows, cols = _rows_of(batch, train_offsets, train_items)
        scores[rows, cols] = -torch.inf  # train items are not recommended
        top = scores.topk(k, dim=1).indices  # (B, k)
        keys = batch.unsqueeze(1) * num_items + top  # (B, k)
        at = torch.searchsorted(test_keys, keys).clamp(max=len(test_keys) - 1)
        hits = (test_keys[at] == keys).float()  # (B, k)
        n_relevant = (test_offsets[batch + 1] - test_offsets[batch]).float()  # (B,)
        recall_sum += float((hits.sum(1) / n_relevant).sum())
        ideal = ideal_dcg[(n_relevant.clamp(max=k) - 1).long()]  # (B,)
        ndcg_sum += float(((hits * discount).sum(1) / ideal).sum())
    n = max(len(test_users), 1)
    return {f"recall@{k}": recall_sum / n, f"ndcg@{k}": ndcg_sum / n}


def _by_user(pairs: Pairs, num_users: int, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct pairs grouped by user: CSR offsets (U + 1,) and item rows sorted within a user."""
    array = torch.as_tensor(np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
    keys = torch.unique(array[:, 0] * num_items + array[:, 1])  # sorted, deduplicated
    offsets = torch.zeros(num_users + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(keys // num_items, minlength=num_users), 0, out=offsets[1:])
    return offsets, keys % num_items


def _rows_of(batch: torch.Tensor, offsets: torch.Tensor, items: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in batch, item) of every pair of the batch's users. (P,), (P,)."""
    counts = offsets[batch + 1] - offsets[batch]  # (B,)
    rows = torch.repeat_interleave(torch.arange(len(batch)), counts)
    first = torch.repeat_interleave(offsets[batch] - (torch.cumsum(counts, 0) - counts), counts)
    return rows, items[first + torch.arange(len(rows))]


# ------------------------------------------------------------------------------------ the CLI


def read_user_lines(path: Path) -> list[tuple[str, str]]:
    """``user item item ...`` lines (the LightGCN benchmark files) as (user, item) pairs."""
    pairs = []
    for line in path.read_text().splitlines():
        fields = line.split()
        pairs += [(fields[0], item) for item in fields[1:]]
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.gcn", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train.txt, test.txt")
    parser.add_argument("--out", type=Path, required=True, help="artifacts folder (writes gcn/)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--batch-size", type=int, default=0, help="edges per step, 0 = all")
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=1, help=">1: hard negatives")
    parser.add_argument("--weighting", choices=("user", "edge"), default="user")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--layer-combination", choices=LAYER_COMBINATIONS, default="mean_1_to_K")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--publish-redis-url", default=None,
                        help="also publish the fit as the retriever's current embedding version")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    train = read_user_lines(args.data / "train.txt")
    test = read_user_lines(args.data / "test.txt")
    emb = fit_gcn(train, layers=args.layers, dim=args.dim, epochs=args.epochs, lr=args.lr,
                  batch_size=args.batch_size, negatives=args.negatives,
                  candidates=args.candidates, weighting=args.weighting,
                  weight_decay=args.weight_decay, layer_combination=args.layer_combination,
                  seed=args.seed, eval_pairs=test, eval_every=args.eval_every,
                  on_epoch=lambda row: tqdm.write(json.dumps(row)) if len(row) > 3 else None)
    emb.save(args.out)
    if args.publish_redis_url:
        publish_gcn(emb, redis_url=args.publish_redis_url)
    print(json.dumps({"dataset": args.data.name, "layers": args.layers, "dim": args.dim,
                      "layer_combination": args.layer_combination, "epochs": args.epochs,
                      **emb.meta["metrics"], "wall_seconds": emb.meta["metrics"]["seconds"],
                      "version": emb.version,
                      "by_layer_combination": emb.meta.get("by_layer_combination", {}),
                      "curve": [r for r in emb.meta["curve"] if "recall@20" in r]}))


if __name__ == "__main__":
    main()
