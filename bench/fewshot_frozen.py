"""What a frozen pretrained model reads from tallrec-book's prompts: TALLRec's few-shot protocol with the
backbone frozen and a logistic answer head at one layer, beside the model's zero-shot answer.

    .venv/bin/python -m bench.fewshot_frozen --data data/tallrec --model smollm2-135m --work runs/fewshot-frozen

The prompts are the few-shot stage's (``trainer.reproduce.fewshot``: k=0, no retrieval, the same seeded
16 / 64 / 256-sample training subsets, the same 200 validation and 600 test samples). Each prompt runs
once through the frozen model; the hidden state at its last token (the position the answer is read
from) is kept for every layer, with the zero-shot answer :math:`\\log p(\\text{Yes}) - \\log p(\\text{No})`.
Per training subset, the layer and the L2 strength of a logistic head are chosen on the validation
AUC only, then the test AUC is measured once. Beside them, the rule "the share of the user's listed
books marked liked" (no model), which tells how much the prompt's own words carry.

A diagnosis, not a recipe the ranker serves: it separates "the information is in the prompt" from "the
model reads it from few samples". Features are cached in ``--work`` (one ``.npz`` per split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

SHOTS, SEEDS = (16, 64, 256), (0, 1, 2)
SIZES = {"valid": 200, "test": 600}
C_GRID = (1e-3, 1e-2, 1e-1, 1.0)
BATCH = 8


def split_examples(data: Path) -> tuple[dict[str, list], dict[tuple[int, int], list[str]]]:
    """The few-shot stage's examples (the union of every training subset, validation, test) and each
    (shots, seed) subset's keys."""
    from trainer.context import OfflineContexts
    from trainer.data.dataset import load_dataset
    from trainer.reproduce.plan import MAX_HISTORY

    contexts = OfflineContexts(load_dataset(data), None, k=0, max_history=MAX_HISTORY)
    out = {split: contexts.examples(split, retrieval=False, limit=n, seed=0) for split, n in SIZES.items()}
    pool, subsets = {}, {}
    for seed in SEEDS:
        for shots in SHOTS:
            subset = contexts.examples("train", retrieval=False, limit=shots, seed=seed)
            subsets[shots, seed] = [key(ex) for ex in subset]
            for ex in subset:
                pool.setdefault(key(ex), ex)
    out["train"] = list(pool.values())
    return out, subsets


def key(ex) -> str:
    return json.dumps([ex.context.user_id, ex.item_id])


@torch.inference_mode()
def features(examples: list, model: str) -> dict[str, np.ndarray]:
    """Per example: (layers, H) last-token hidden states and the zero-shot Yes-minus-No logit."""
    from ranker_svc.model import pad_right
    from ranker_svc.prompt import PromptBuilder, encode_examples
    from trainer.lm import answer_token_ids, load_base_model
    from trainer.tune import infer_prompt_config

    tokenizer, lm = load_base_model(model)
    lm.eval()
    builder = PromptBuilder(config=infer_prompt_config(examples))
    ids = encode_examples(examples, builder, tokenizer, 2048, None)
    yes, no = answer_token_ids(tokenizer, (builder.config.answer_yes, builder.config.answer_no))
    order = np.argsort([len(row) for row in ids])
    states, zero_shot = [None] * len(ids), np.zeros(len(ids))
    for start in range(0, len(ids), BATCH):
        chunk = order[start:start + BATCH]
        input_ids, mask = pad_right([ids[i] for i in chunk], tokenizer.pad_token_id or 0)
        out = lm(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        rows, last = torch.arange(len(chunk)), mask.sum(1) - 1
        hidden = torch.stack([h[rows, last] for h in out.hidden_states[1:]], 1)  # (B, layers, H)
        logits = out.logits[rows, last]
        for r, i in enumerate(chunk):
            states[i], zero_shot[i] = hidden[r].float().numpy(), float(logits[r, yes] - logits[r, no])
    return {"feats": np.stack(states), "zs": zero_shot, "labels": np.array([ex.label for ex in examples]),
            "keys": np.array([key(ex) for ex in examples])}


def like_share(examples: list) -> np.ndarray:
    return np.array([np.mean([h.rating >= 0.5 for h in ex.context.history]) if ex.context.history else 0.5
                     for ex in examples])


def probe_row(train: dict, valid: dict, test: dict, rows: list[int], layers: list[int]) -> dict:
    """The head chosen on validation (layer, C) for one training subset, and its test AUC."""
    def standardised(d: dict, layer: int) -> np.ndarray:
        pool = train["feats"][:, layer]  # unlabelled statistics of the whole training pool
        return (d["feats"][:, layer] - pool.mean(0)) / (pool.std(0) + 1e-6)

    y = train["labels"][rows]
    best = None
    for layer in layers:
        x_train, x_valid = standardised(train, layer)[rows], standardised(valid, layer)
        for c in C_GRID:
            head = LogisticRegression(C=c, max_iter=3000).fit(x_train, y)
            score = roc_auc_score(valid["labels"], head.decision_function(x_valid))
            if best is None or score > best[0]:
                best = (score, layer, c, head)
    score, layer, c, head = best
    return {"layer": layer + 1, "C": c, "valid_auc": round(score, 4),
            "test_auc": round(roc_auc_score(test["labels"], head.decision_function(standardised(test, layer))), 4)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="tallrec-book imported by `trainer data import`")
    parser.add_argument("--model", default="smollm2-135m", help="an installed model's name or a checkpoint")
    parser.add_argument("--work", type=Path, required=True, help="feature cache")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    examples, subsets = split_examples(args.data)
    args.work.mkdir(parents=True, exist_ok=True)
    feats = {}
    for split, rows in examples.items():
        path = args.work / f"{split}.npz"
        if not path.exists():
            np.savez(path, **features(rows, args.model))
        feats[split] = dict(np.load(path))
    train, valid, test = feats["train"], feats["valid"], feats["test"]
    index = {k: i for i, k in enumerate(train["keys"])}
    layers = sorted({4, 9, 14, 19, 24, train["feats"].shape[1] - 1})  # 0-based: layers 5 .. 25 and the last
    runs = [{"shots": shots, "seed": seed,
             **probe_row(train, valid, test, [index[k] for k in subsets[shots, seed]], layers)}
            for shots in SHOTS for seed in SEEDS]
    table = [{"shots": s, "test_auc_mean": round(100 * np.mean([r["test_auc"] for r in runs if r["shots"] == s]), 2),
              "test_auc_std": round(100 * np.std([r["test_auc"] for r in runs if r["shots"] == s], ddof=1), 2)}
             for s in SHOTS]
    report = {"model": args.model, "runs": runs, "table": table,
              "zero_shot_auc": {s: round(roc_auc_score(feats[s]["labels"], feats[s]["zs"]), 4) for s in ("valid", "test")},
              "like_share_auc": {s: round(roc_auc_score(feats[s]["labels"], like_share(examples[s])), 4)
                                 for s in ("valid", "test")}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
