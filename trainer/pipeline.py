"""The training pipeline: fit-gcn -> tune -> fit-heads -> calibrate, then the artifact manifest.

1. ``fit-gcn``: LightGCN on ``graph_pairs(dataset)`` (no valid/test targets) -> ``ARTIFACTS/gcn/``.
2. ``tune``: instruction-tune the decoder on training examples WITH retrieval (the user's history and
   its k=4 GCN-nearest users, paper section 6) -> ``ARTIFACTS/ranker/``. The no-retrieval evaluation
   uses the same model.
3. ``fit-heads``: freeze the tuned model, train one head per exit layer with depth-decayed learning
   rates ``lambda_n = lambda_0 e^{-beta d_l}`` (paper section 5.2).
4. ``calibrate``: pick the exit policy on the valid split within an AUC budget.
5. ``exitrank.artifacts.write_manifest`` hashes every file and records the data hash and the config.

Presets (``PRESETS``) fix the hyper-parameters; any field can be overridden (CLI flags). ``tiny`` caps
training at 2,000 samples so ``trainer fit --preset tiny`` on ~2,000 synthetic users takes minutes on 2
cores; ``small`` trains a bigger decoder on more samples.

    .venv/bin/python -m trainer data synth data/synth --users 2000 --items 1500 --seed 0
    .venv/bin/python -m trainer fit --data data/synth --out artifacts --preset tiny
    .venv/bin/python -m trainer eval --data data/synth --artifacts artifacts --report reports/synth
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from trainer.context import OfflineContexts
from trainer.data.dataset import Dataset, data_hash, graph_pairs, load_dataset

STAGES = ("fit-gcn", "tune", "fit-heads", "calibrate")


@dataclass(frozen=True)
class GCNSection:
    layers: int = 3
    dim: int = 64
    epochs: int = 20
    lr: float | None = None  # None: fit_gcn's defaults
    batch_size: int | None = None
    weight_decay: float = 1e-4
    layer_combination: str = "mean_1_to_K"


@dataclass(frozen=True)
class TuneSection:
    preset: str = "tiny"
    arch: str = "llama"
    base_model: str | None = None
    epochs: int = 1
    lr: float | None = None  # None: instruction_tune's default for a fresh model / base model / LoRA
    batch_size: int = 16
    max_train: int | None = 2000  # the paper tunes few-shot (< 10 % of the training data)
    lora: bool | None = None  # None: LoRA only for large base models
    collab: str = "none"  # collaborative soft tokens: none (the paper's prompt) | user | full
    amp: bool | None = None  # bfloat16 autocast while tuning; None: where bf16 matmuls are native (AMX, GPUs)
    lora_rank: int = 8
    # write the artifact of a collapsed model anyway (trainer.stats.collapse_reason): only `trainer reproduce`
    # sets it, to report such a row labelled as collapsed beside the others; the CLI never does
    allow_collapse: bool = False


@dataclass(frozen=True)
class HeadsSection:
    exit_layers: tuple[int, ...] | None = None  # None: the ranker's default layers
    lambda0: float = 1e-3
    beta: float = 0.1
    epochs: int = 1
    batch_size: int = 16
    max_train: int | None = 2000


@dataclass(frozen=True)
class CalibrateSection:
    auc_budget_points: float = 0.3
    margin_sigmas: float = 1.0  # standard errors of the loss that must fit in the budget too
    max_valid: int | None = 500


@dataclass(frozen=True)
class FitConfig:
    """Everything ``trainer fit`` needs; sections go to their stage only."""

    data: Path
    out: Path
    seed: int = 0
    k: int = 4  # retrieved neighbours in the prompt (the paper's "example number")
    max_history: int = 15
    progress: bool = True
    gcn: GCNSection = field(default_factory=GCNSection)
    tune: TuneSection = field(default_factory=TuneSection)
    heads: HeadsSection = field(default_factory=HeadsSection)
    calibrate: CalibrateSection = field(default_factory=CalibrateSection)

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["data"], row["out"] = str(self.data), str(self.out)
        return row


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"gcn": {"epochs": 20}, "tune": {"preset": "tiny", "epochs": 1, "max_train": 2000},
             "heads": {"epochs": 1, "max_train": 2000}, "calibrate": {"max_valid": 500}},
    "small": {"gcn": {"epochs": 40}, "tune": {"preset": "small", "epochs": 2, "lr": 1e-3, "max_train": 20000, "amp": True},
              "heads": {"epochs": 2, "max_train": 20000}, "calibrate": {"max_valid": 4000}},
}


def make_config(data: str | Path, out: str | Path, *, preset: str = "tiny", base_model: str | None = None,
                seed: int = 0, overrides: dict[str, dict[str, Any]] | None = None, **top: Any) -> FitConfig:
    """A ``FitConfig`` from a preset plus ``{section: {field: value}}`` overrides (None values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    sections: dict[str, Any] = {}
    for name, kind in (("gcn", GCNSection), ("tune", TuneSection), ("heads", HeadsSection),
                       ("calibrate", CalibrateSection)):
        values = dict(PRESETS[preset].get(name, {}))
        values.update({k: v for k, v in (overrides or {}).get(name, {}).items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(kind)}
        if unknown:
            raise ValueError(f"unknown {name} setting(s): {', '.join(sorted(unknown))}")
        sections[name] = kind(**values)
    if base_model is not None:
        sections["tune"] = replace(sections["tune"], base_model=str(base_model))
    return FitConfig(data=Path(data), out=Path(out), seed=seed, **{k: v for k, v in top.items() if v is not None},
                     **sections)


def _say(message: str) -> None:
    print(f"[trainer] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- stages


def stage_fit_gcn(cfg: FitConfig, dataset: Dataset) -> dict:
    """LightGCN on the training graph; writes ``ARTIFACTS/gcn``."""
    from trainer.gcn import fit_gcn

    pairs = graph_pairs(dataset, all_targets=cfg.tune.collab != "none")  # soft tokens: no answer in the graph
    if not pairs:
        raise ValueError(f"{cfg.data} has no graph interactions (positives outside valid/test targets)")
    settings = {k: v for k, v in asdict(cfg.gcn).items() if v is not None}
    on_epoch = None if cfg.progress else (  # --no-progress: a line per epoch instead of a bar
        lambda row: _say(f"fit-gcn: epoch {row['epoch']}/{cfg.gcn.epochs} loss {row['loss']:.4f} "
                         f"at {row['seconds']:.1f}s"))
    gcn = fit_gcn(pairs, **settings, seed=cfg.seed, progress=cfg.progress, on_epoch=on_epoch)
    gcn.save(cfg.out)
    return {"edges": len(pairs), "users": len(gcn.user_ids), "items": len(gcn.item_ids), "version": gcn.version,
            **gcn.meta.get("metrics", {})}


def _contexts(cfg: FitConfig, dataset: Dataset, *, collab: str | None = None) -> OfflineContexts:
    """Contexts over ``ARTIFACTS/gcn``; soft-token vectors when ``collab`` (default: ``cfg.tune.collab``)
    is not ``none``."""
    from retriever_svc.embeddings import GCNEmbeddings

    if not (Path(cfg.out) / "gcn").is_dir():
        raise FileNotFoundError(f"{cfg.out}/gcn is missing: run `trainer fit-gcn` (or `trainer fit`) first")
    gcn = GCNEmbeddings.load(cfg.out)
    vectors = gcn if (collab or cfg.tune.collab) != "none" else None
    return OfflineContexts(dataset, gcn, k=cfg.k, max_history=cfg.max_history, vectors=vectors)


def _tuned_contexts(cfg: FitConfig, dataset: Dataset) -> OfflineContexts:
    """Contexts for the stages after ``tune``: soft tokens as the tuned ranker reads them (its
    artifact says), whatever ``--collab-tokens`` says now."""
    from ranker_svc.artifact import read_meta

    mode = (read_meta(Path(cfg.out) / "ranker").get("collab") or {}).get("mode", "none")
    return _contexts(cfg, dataset, collab=mode)


def stage_tune(cfg: FitConfig, dataset: Dataset) -> dict:
    """Instruction-tune the decoder on retrieval-augmented training examples; writes ``ARTIFACTS/ranker``."""
    from trainer.tune import infer_prompt_config, instruction_tune

    contexts = _contexts(cfg, dataset)
    t = cfg.tune
    train = contexts.examples("train", retrieval=True, limit=t.max_train, seed=cfg.seed)
    valid = contexts.examples("valid", retrieval=True, limit=cfg.calibrate.max_valid, seed=cfg.seed)
    _say(f"tune: {len(train)} train / {len(valid)} valid examples, preset {t.preset}, arch {t.arch}")
    base_model = Path(t.base_model) if t.base_model else None
    prompt = replace(infer_prompt_config(train), collab=t.collab, num_neighbors=cfg.k)  # serving asks for as many
    vectors = contexts.vectors
    return instruction_tune(train, out_dir=cfg.out, valid=valid or None, preset=t.preset, arch=t.arch,
                            base_model=base_model, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                            lora=t.lora, seed=cfg.seed, progress=cfg.progress, prompt=prompt, amp=t.amp,
                            lora_rank=t.lora_rank, allow_collapse=t.allow_collapse, log=_say,
                            collab_dim=vectors.dim if vectors is not None else 0,
                            embedding_version=vectors.version if vectors is not None else "")


def stage_fit_heads(cfg: FitConfig, dataset: Dataset) -> dict:
    """Train the exit heads of the tuned ranker (backbone frozen)."""
    from trainer.heads import fit_heads

    h = cfg.heads
    train = _tuned_contexts(cfg, dataset).examples("train", retrieval=True, limit=h.max_train, seed=cfg.seed + 1)
    exit_layers = list(h.exit_layers) if h.exit_layers else None
    return fit_heads(train, ranker_dir=Path(cfg.out) / "ranker", exit_layers=exit_layers, lambda0=h.lambda0,
                     beta=h.beta, epochs=h.epochs, batch_size=h.batch_size, seed=cfg.seed, progress=cfg.progress,
                     log=_say)


def stage_calibrate(cfg: FitConfig, dataset: Dataset) -> dict:
    """Choose the exit policy on the valid split; stores it in the ranker artifact."""
    from trainer.calibrate import calibrate

    valid = _tuned_contexts(cfg, dataset).examples("valid", retrieval=True, limit=cfg.calibrate.max_valid,
                                                   seed=cfg.seed)
    if not valid:
        raise ValueError(f"the valid split of {cfg.data} is empty: calibration needs samples")
    return calibrate(valid, ranker_dir=Path(cfg.out) / "ranker", auc_budget_points=cfg.calibrate.auc_budget_points,
                     margin_sigmas=cfg.calibrate.margin_sigmas, plot_path=Path(cfg.out) / "calibration.png", log=_say)


STAGE_FUNCTIONS = {"fit-gcn": stage_fit_gcn, "tune": stage_tune, "fit-heads": stage_fit_heads,
                   "calibrate": stage_calibrate}


def run_stages(cfg: FitConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Run ``stages`` in order, then (re)write the manifest; returns the manifest."""
    from exitrank.artifacts import write_manifest

    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(cfg.data)
    _say(f"data {cfg.data}: {dataset.split_counts()} samples, {len(dataset.interactions)} interactions")
    if any(s in stages for s in ("tune", "fit-heads")) and not dataset.split("train"):
        raise ValueError(f"{cfg.data} has no training samples (sample rule {dataset.meta.sample_rule}); "
                         "re-import it with `--sample-rule chronological` or add a samples.jsonl")
    metrics = _previous_metrics(cfg.out)
    for name in stages:
        start = time.perf_counter()
        _say(f"stage {name} ...")
        result = STAGE_FUNCTIONS[name](cfg, dataset)
        metrics[name] = {**jsonable(result), "seconds": round(time.perf_counter() - start, 3)}
        _say(f"stage {name} done in {metrics[name]['seconds']:.1f}s")
    return write_manifest(Path(cfg.out), config=cfg.to_json(), data_hash=data_hash(cfg.data), metrics=metrics)


def fit(data_dir: str | Path, out: str | Path, *, preset: str = "tiny", base_model: str | None = None,
        seed: int = 0, overrides: dict[str, dict[str, Any]] | None = None, progress: bool = True) -> dict:
    """``trainer fit``: every stage on ``data_dir``, artifacts in ``out``; returns the manifest."""
    cfg = make_config(data_dir, out, preset=preset, base_model=base_model, seed=seed, overrides=overrides,
                      progress=progress)
    return run_stages(cfg)


def _previous_metrics(out: Path) -> dict:
    path = Path(out) / "manifest.json"
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("metrics", {}))
    except (json.JSONDecodeError, AttributeError):
        return {}


def jsonable(value: Any) -> Any:
    """Stage results as JSON (paths to str, tuples to lists, other objects to str)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
