"""``trainer``: the command line of the exitrank trainer (a thin dispatcher; each command is one function).

    # data: import a public data set, or synthesise one
    .venv/bin/python -m trainer data import games6k ../shared/data/games6k data/games6k --max-users 2000 --seed 0
    .venv/bin/python -m trainer data import tallrec ../shared/data/tallrec-book data/tallrec
    .venv/bin/python -m trainer data synth data/synth --users 2000 --items 1500 --seed 0

    # train every stage (fit-gcn -> tune -> fit-heads -> calibrate) and write ARTIFACTS/manifest.json
    .venv/bin/python -m trainer fit --data data/synth --out artifacts --preset tiny --seed 0
    .venv/bin/python -m trainer fit --data data/synth --out artifacts --preset small --arch qwen2
    .venv/bin/python -m trainer fit --data data/synth --out artifacts --base-model ~/models/vicuna-7b --lora

    # or one stage at a time (each rewrites the manifest)
    .venv/bin/python -m trainer fit-gcn --data data/synth --out artifacts --gcn-epochs 40
    .venv/bin/python -m trainer tune --data data/synth --out artifacts --epochs 2 --max-train 8000
    .venv/bin/python -m trainer fit-heads --data data/synth --out artifacts --lambda0 1e-3 --beta 0.1
    .venv/bin/python -m trainer calibrate --data data/synth --out artifacts --auc-budget 0.3

    # pretrained models: install once (verified, converted), then name them in --base-model
    .venv/bin/python -m trainer models install smollm2-135m
    .venv/bin/python -m trainer models list
    .venv/bin/python -m trainer models import-gguf ~/gguf/model.gguf --name my-model
    .venv/bin/python -m trainer fit --data data/tallrec --out artifacts --base-model smollm2-135m

    # evaluate the four configurations on the test split
    .venv/bin/python -m trainer eval --data data/synth --artifacts artifacts --report reports/synth

    # the paper's tables and figures on the real data (resumable), or a quick run of the same code
    .venv/bin/python -m trainer reproduce --data-root ../shared/data --out reports/reproduce [--quick]

    # releases and periodic refits from the live log (trainer/refit.py): publish only when not worse
    .venv/bin/python -m trainer publish --from artifacts --artifacts /srv/artifacts --redis-url redis://...
    .venv/bin/python -m trainer refit --redis-url redis://... --artifacts /srv/artifacts --every 1h --heads-every 24h
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PRESET_CHOICES = ("tiny", "small")


def _data_import(args: argparse.Namespace) -> dict:
    from trainer.data.importers import ImportOptions, import_dataset

    options = ImportOptions(max_users=args.max_users, seed=args.seed, threshold=args.threshold,
                            targets_per_user=args.targets_per_user, negatives_per_positive=args.negatives,
                            sample_kind=args.sample_rule)
    return import_dataset(args.format, args.src, args.out, options)


def _data_synth(args: argparse.Namespace) -> dict:
    from trainer.data.synth import SynthConfig, synth

    return synth(args.out, SynthConfig(users=args.users, items=args.items, groups=args.groups, seed=args.seed),
                 force=args.force)


def _fit_config(args: argparse.Namespace):
    from trainer.pipeline import make_config

    args = argparse.Namespace(**{**dict.fromkeys(_ALL_FIT_FLAGS), **vars(args)})  # a stage's parser lacks the others'
    overrides = {
        "gcn": {"layers": args.gcn_layers, "dim": args.gcn_dim, "epochs": args.gcn_epochs, "lr": args.gcn_lr},
        "tune": {"arch": args.arch, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                 "lora_rank": args.lora_rank,
                 "max_train": args.max_train, "lora": args.lora or None, "collab": args.collab_tokens},
        "heads": {"exit_layers": tuple(args.exit_layers) if args.exit_layers else None, "lambda0": args.lambda0,
                  "beta": args.beta, "epochs": args.heads_epochs, "max_train": args.max_train},
        "calibrate": {"auc_budget_points": args.auc_budget, "margin_sigmas": args.auc_margin_sigmas,
                      "max_valid": args.max_valid},
    }
    if args.base_model is not None:  # a missing model is named before any data is read
        from trainer.models import resolve_base_model

        args.base_model = str(resolve_base_model(args.base_model))
    return make_config(args.data, args.out, preset=args.preset, base_model=args.base_model, seed=args.seed,
                       overrides=overrides, k=args.k, progress=not args.no_progress)


def _stages(*names: str):
    def run(args: argparse.Namespace) -> dict:
        from trainer.pipeline import run_stages

        manifest = run_stages(_fit_config(args), names)
        scalars = {stage: {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
                   for stage, m in manifest["metrics"].items() if stage in names}
        return {"out": str(args.out), "version": manifest["version"], "metrics": scalars}

    return run


def _eval(args: argparse.Namespace) -> dict:
    from trainer.eval import EvalConfig, run

    cfg = EvalConfig(data=args.data, artifacts=args.artifacts, report=args.report, max_samples=args.max_samples,
                     seed=args.seed, batch_size=args.batch_size, bootstrap=args.bootstrap, k=args.k,
                     compare=args.compare)
    report = run(cfg)
    return {"report": str(Path(args.report) / "report.json"),
            "auc": {row["name"]: round(row["auc"], 4) for row in report["configs"]}}


_ALL_FIT_FLAGS = ("gcn_layers", "gcn_dim", "gcn_epochs", "gcn_lr", "arch", "epochs", "lr", "batch_size", "max_train",
                  "lora", "lora_rank", "collab_tokens", "base_model", "k", "exit_layers", "lambda0", "beta",
                  "heads_epochs", "auc_budget", "auc_margin_sigmas", "max_valid")


def _fit_flags(p: argparse.ArgumentParser, stages: tuple[str, ...]) -> None:
    """The flags of ``stages`` only (``fit``: all of them); settings of the others come from the preset."""
    p.add_argument("--data", type=Path, required=True, help="canonical data set directory")
    p.add_argument("--out", type=Path, required=True, help="ARTIFACTS directory")
    p.add_argument("--preset", choices=PRESET_CHOICES, default="tiny",
                   help="hyper-parameters of every stage (trainer/pipeline.py PRESETS): tiny (default; a 6-layer "
                        "decoder, 2,000 training samples, minutes on a CPU) or small (bigger, more samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars: one log line per epoch instead")
    if "fit-gcn" in stages or "tune" in stages:
        p.add_argument("--collab-tokens", choices=("none", "user", "full"),
                       help="LightGCN embeddings as soft tokens in the prompt (default none: text only); "
                            "fit-gcn then leaves every valid/test target out of the graph")
    if set(stages) & {"tune", "fit-heads", "calibrate"}:
        p.add_argument("--k", type=int, help="retrieved neighbours per prompt (default 4)")
    if "tune" in stages or "fit-heads" in stages:
        p.add_argument("--max-train", type=int, help="cap on training samples (tune and fit-heads)")
    if "fit-gcn" in stages:
        g = p.add_argument_group("fit-gcn")
        g.add_argument("--gcn-layers", type=int)
        g.add_argument("--gcn-dim", type=int)
        g.add_argument("--gcn-epochs", type=int)
        g.add_argument("--gcn-lr", type=float)
    if "tune" in stages:
        t = p.add_argument_group("tune")
        t.add_argument("--base-model", help="an installed model's name (trainer models list) or a local transformers "
                       "checkpoint directory, tuned instead of a fresh decoder")
        t.add_argument("--arch", choices=("llama", "qwen2", "mistral"))
        t.add_argument("--epochs", type=int)
        t.add_argument("--lr", type=float)
        t.add_argument("--batch-size", type=int)
        t.add_argument("--lora", action="store_true", help="LoRA adapters instead of full fine-tuning")
        t.add_argument("--lora-rank", type=int, help="r of the LoRA adapters (default 8)")
    if "fit-heads" in stages:
        h = p.add_argument_group("fit-heads")
        h.add_argument("--exit-layers", type=int, nargs="+")
        h.add_argument("--lambda0", type=float, help="base learning rate of the exit heads")
        h.add_argument("--beta", type=float, help="depth decay: lr_n = lambda0 * exp(-beta * depth)")
        h.add_argument("--heads-epochs", type=int)
    if "calibrate" in stages:
        c = p.add_argument_group("calibrate")
        c.add_argument("--auc-budget", type=float, help="AUC points the exit policy may lose (default 0.3)")
        c.add_argument("--auc-margin-sigmas", type=float,
                       help="standard errors of the validation loss that must fit in the budget too (default 1)")
        c.add_argument("--max-valid", type=int, help="cap on valid samples used for calibration")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="import or synthesise a data set").add_subparsers(dest="data_command",
                                                                                        required=True)
    imp = data.add_parser("import", help="convert a public data set to the canonical layout")
    from trainer.data.importers import FORMATS

    imp.add_argument("format", choices=FORMATS)
    imp.add_argument("src", type=Path)
    imp.add_argument("out", type=Path)
    imp.add_argument("--max-users", type=int, help="keep a seeded random subset of users")
    imp.add_argument("--seed", type=int, default=0)
    imp.add_argument("--threshold", type=float, help="explicit ratings >= this are positives")
    imp.add_argument("--targets-per-user", type=int, default=5, help="last K interactions as targets (0: all)")
    imp.add_argument("--negatives", type=int, default=1, help="sampled negatives per positive (implicit data)")
    imp.add_argument("--sample-rule", choices=("chronological", "given", "none"))
    imp.set_defaults(func=_data_import)
    syn = data.add_parser("synth", help="a synthetic data set with taste groups")
    syn.add_argument("out", type=Path, help="the data set directory to write (refused when it holds files)")
    syn.add_argument("--users", type=int, default=2000, help="users, each with 8-24 interactions (default 2000)")
    syn.add_argument("--items", type=int, default=1500, help="catalog items (default 1500)")
    syn.add_argument("--groups", type=int, default=8, help="taste groups users and items belong to (default 8)")
    syn.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same data")
    syn.add_argument("--force", action="store_true", help="replace an existing data set in OUT")
    syn.set_defaults(func=_data_synth)

    for name, stages, help_text in (
        ("fit", ("fit-gcn", "tune", "fit-heads", "calibrate"), "every stage, then the manifest"),
        ("fit-gcn", ("fit-gcn",), "LightGCN user/item embeddings -> ARTIFACTS/gcn"),
        ("tune", ("tune",), "instruction-tune the decoder -> ARTIFACTS/ranker"),
        ("fit-heads", ("fit-heads",), "train the exit heads (backbone frozen)"),
        ("calibrate", ("calibrate",), "choose the exit policy on the valid split"),
    ):
        p = sub.add_parser(name, help=help_text)
        _fit_flags(p, stages)
        p.set_defaults(func=_stages(*stages))

    ev = sub.add_parser("eval", help="AUC, requests/s and exit depth of the four configurations")
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--artifacts", type=Path, required=True)
    ev.add_argument("--report", type=Path, required=True, help="output directory for report.json / report.md")
    ev.add_argument("--max-samples", type=int, help="a seeded random subset of the test split")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--bootstrap", type=int, default=1000)
    ev.add_argument("--k", type=int, help="neighbours per prompt (default: the artifact's, as it serves)")
    ev.add_argument("--compare", type=Path,
                    help="a second artifacts directory scored on the same samples (its rows are named compare/...)")
    ev.set_defaults(func=_eval)

    rep = sub.add_parser("reproduce", help="the paper's tables and figures on the real data, one report")
    rep.add_argument("--data-root", type=Path, required=True, help="the shared data folder (games6k/, tallrec-book/)")
    rep.add_argument("--out", type=Path, required=True, help="report.md, report.json, figures/ and stages/ go here")
    rep.add_argument("--quick", action="store_true", help="the same code on subsets with the tiny preset")
    rep.add_argument("--datasets", nargs="+", choices=("games6k", "tallrec-book", "synthetic"))
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--force", action="store_true", help="re-run stages whose inputs are unchanged")
    rep.add_argument("--bootstrap", type=int, default=1000)
    rep.add_argument("--model", help="an installed pretrained model (trainer models list) as the LLM of every "
                                     "table, LoRA-tuned on 256 samples; default: the small preset from scratch")
    rep.add_argument("--no-few-shot", action="store_true",
                     help="leave out the few-shot table's runs (tallrec-book; their cached stages are kept)")
    rep.add_argument("--no-progress", action="store_true")
    rep.set_defaults(func=_reproduce)

    models = sub.add_parser("models", help="install, import and list pretrained models").add_subparsers(
        dest="models_command", required=True)
    ins = models.add_parser("install", help="install a known model (verified, converted once to safetensors)")
    ins.add_argument("name", help="e.g. smollm2-135m")
    ins.add_argument("--force", action="store_true", help="convert again even when installed")
    ins.set_defaults(func=_models_install)
    lst = models.add_parser("list", help="installed models (and the known ones not installed)")
    lst.set_defaults(func=_models_list)
    gguf = models.add_parser("import-gguf", help="convert a local GGUF file (llama, qwen2, mistral)")
    gguf.add_argument("file", type=Path)
    gguf.add_argument("--name", required=True, help="the name --base-model will use")
    gguf.set_defaults(func=_models_import)

    from trainer.refit import add_parsers as add_refit_parsers

    add_refit_parsers(sub)  # refit (periodic, gated by evaluation) and publish (a release, a rollback)
    return parser


def _reproduce(args: argparse.Namespace) -> dict:
    from trainer.reproduce import ReproduceConfig, reproduce

    if args.model is not None:  # a missing model is named before any data is read
        from trainer.models import resolve_base_model

        resolve_base_model(args.model)
    report = reproduce(ReproduceConfig(data_root=args.data_root, out=args.out, quick=args.quick,
                                       datasets=tuple(args.datasets) if args.datasets else None, seed=args.seed,
                                       force=args.force, progress=not args.no_progress, bootstrap=args.bootstrap,
                                       model=args.model, few_shot=not args.no_few_shot))
    return {"out": str(args.out), "goals": report["goals"], "wall_seconds": report["wall_seconds"]}


def _models_install(args: argparse.Namespace) -> dict:
    from trainer.models import install

    return install(args.name, force=args.force)


def _models_list(args: argparse.Namespace) -> dict:
    from trainer.models import list_models, models_dir

    return {"models_dir": str(models_dir()), "models": list_models()}


def _models_import(args: argparse.Namespace) -> dict:
    from trainer.models import import_gguf

    return import_gguf(args.file, name=args.name)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "fix your input" (printed as one line, exit 2), not a bug (a traceback)."""
    from exitrank.artifacts import ManifestError
    from ranker_svc.errors import ArtifactError
    from exitrank.redis_server import RedisServerError
    from retriever_svc.errors import RetrievalError
    from trainer.models import ModelError

    return (FileNotFoundError, FileExistsError, ValueError, ManifestError, ArtifactError, RetrievalError, ModelError,
            RedisServerError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.errors import TrainingFailed
    from trainer.logs import quiet_libraries

    quiet_libraries(progress=not getattr(args, "no_progress", False))

    try:
        result = args.func(args)
    except _user_errors() as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:  # a collapsed model: no artifact, a distinct status for scripts
        print(f"trainer: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(result, default=str))  # one line, the last of stdout: scripts parse it
    return 0


if __name__ == "__main__":
    sys.exit(main())
