"""``trainer refit``: periodic refits from the live interaction log, published only when not worse.

    # once (cron, a Kubernetes CronJob): refit LightGCN now, the exit heads when they are due
    .venv/bin/python -m trainer refit --redis-url redis://:pw@redis:6379/0 --artifacts /srv/artifacts --once
    # a loop: LightGCN every hour, exit heads and policy every day
    .venv/bin/python -m trainer refit --redis-url ... --artifacts /srv/artifacts --every 1h --heads-every 24h
    # gate a candidate trained elsewhere through the same evaluation
    .venv/bin/python -m trainer refit --redis-url ... --artifacts /srv/artifacts --once --candidate build/artifacts
    # the first release (or a rollback): verify, copy, point ROOT/current at it, publish its embeddings
    .venv/bin/python -m trainer publish --from build/artifacts --artifacts /srv/artifacts --redis-url ...

Services follow ``ROOT/current`` (``ranker-svc --artifacts ROOT/current``; ``exitrank.artifacts``
has the release layout) and Redis's current embedding version by themselves; nothing restarts.

One refit (:func:`refit_once`), under a lock file so runs never overlap:

1. Pull the interaction log from the retriever's Redis and write a canonical data set
   (``trainer.data.live_log.export_dataset``). Samples follow ``trainer.data.samples`` (chronological
   targets, explicit ratings >= ``--rating-threshold`` positive, or sampled negatives for implicit
   data), but each user's split is a keyed hash of its id (8:1:1, the key secret in
   ``ROOT/.split-key``), so it never changes between refits and no caller can choose to be a test
   user: test users never trained the serving model, and the comparison below is fair.
2. Build a candidate in ``ROOT/releases/.candidate-*``: the serving release's frozen backbone
   (weights hard-linked where possible), LightGCN refitted on the new graph (``fit-gcn``), and,
   when ``--heads-every`` has passed since the serving heads were fitted (or always with 0), new
   exit heads and a new exit policy (``fit-heads`` + ``calibrate``). Hyper-parameters come from the
   serving release's manifest, then flags. Its manifest is written last.
3. Evaluate the candidate and the recent releases (the serving one and the newest other kept ones,
   ``--compare-recent`` in all) on the same held-out samples (the test split, at most
   ``--max-eval``): each with its own embeddings for the neighbours and its own calibrated exit
   policy, as each would serve. AUCs with bootstrap intervals (``trainer.stats.auc_with_ci``) and
   the paired DeLong difference (``trainer.stats.paired_auc_difference``) to the reference: the
   best of the recent releases, so regressions each inside the noise cannot accumulate release
   after release.
4. The rule: publish when ``AUC_candidate - AUC_reference >= -(z * se + tolerance)``, ``z`` =
   ``--noise-sigmas`` (default 2) standard errors of the paired difference and ``tolerance`` =
   ``--tolerance`` AUC points (default 0): a candidate is refused only when it is worse by more
   than the noise of the evaluation. Fewer than ``--min-eval`` held-out samples, or one class
   only, refuses too (no evidence is not "not worse"). A candidate identical to the serving
   release (same ranker and embedding versions) is not published again.
5. Publish the pair (``trainer.publishing.publish_pair``): the embeddings stored in Redis, not
   current; ``ROOT/current`` flipped to the release (the commit point: the rankers reload it); Redis's
   current version set (every retriever replica follows it). A refit first rolls forward a publish
   that stopped after its flip (``rolled_forward`` in the summary). A refused candidate is deleted.

Each refit prints one JSON line: ``decision`` (published | refused | unchanged | failed), ``reason``,
the serving and candidate AUCs, the difference, its standard error and the threshold, the versions,
whether the heads were refit, the data counts and the seconds taken.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exitrank.artifacts import (RELEASES, ManifestError, current_release, read_manifest, verify_manifest,
                                write_manifest)
from trainer.data.live_log import RefitError, export_dataset, split_key
from trainer.publishing import publish, publish_pair, release_embeddings, roll_forward

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class RefitConfig:
    """Flags of ``trainer refit`` (module docstring).

    Args:
        overrides: ``{section: {field: value}}`` over the serving release's fit config
            (``trainer.pipeline`` sections ``gcn``, ``heads``, ``calibrate``).
        heads_every_s: refit the exit heads and policy when the serving ones are this old (0: always).
        candidate: gate this complete artifact directory instead of building one.
    """

    redis_url: str
    artifacts: Path
    redis_prefix: str = "xr"
    data_out: Path | None = None  # None: ROOT/refit-data
    heads_every_s: float = 86400.0
    candidate: Path | None = None
    seed: int = 0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    rating_threshold: float = 4.0
    max_eval: int | None = 2000
    min_eval: int = 20
    noise_sigmas: float = 2.0
    tolerance_points: float = 0.0
    compare_recent: int = 3
    keep_releases: int = 3
    keep_embedding_versions: int = 2
    progress: bool = False


# ------------------------------------------------------------------------------------ the candidate


def build_candidate(cfg: RefitConfig, serving: Path, data_dir: Path, *, heads: bool) -> Path:
    """A complete candidate release in ``ROOT/releases/.candidate-*`` (module docstring, step 2)."""
    from trainer.data.dataset import data_hash, load_dataset
    from trainer.pipeline import jsonable, stage_calibrate, stage_fit_gcn, stage_fit_heads

    staging = Path(tempfile.mkdtemp(prefix=".candidate-", dir=Path(cfg.artifacts) / RELEASES))
    staging.chmod(0o755)
    try:
        _copy_backbone(serving / "ranker", staging / "ranker")
        fit_cfg = fit_config(cfg, serving, data_dir, staging)
        dataset = load_dataset(data_dir)
        metrics: dict[str, Any] = {}
        stages = [("fit-gcn", stage_fit_gcn)] + ([("fit-heads", stage_fit_heads), ("calibrate", stage_calibrate)]
                                                 if heads else [])
        for name, stage in stages:
            start = time.perf_counter()
            _say(f"refit: stage {name} ...")
            metrics[name] = {**jsonable(stage(fit_cfg, dataset)), "seconds": round(time.perf_counter() - start, 3)}
        previous = read_manifest(serving).get("metrics", {})
        metrics["refit"] = {"from_release": serving.name, "heads_refit": heads,
                            "heads_at": _now() if heads else heads_fitted_at(previous)}
        for name in ("tune", "fit-heads", "calibrate"):  # the stages this candidate kept from the serving release
            if name not in metrics and name in previous:
                metrics[name] = previous[name]
        write_manifest(staging, config=fit_cfg.to_json(), data_hash=data_hash(data_dir), metrics=metrics)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def fit_config(cfg: RefitConfig, serving: Path, data_dir: Path, out: Path):
    """The serving release's fit settings (its manifest's ``config``), then ``cfg.overrides``."""
    from trainer.pipeline import CalibrateSection, GCNSection, HeadsSection, TuneSection, make_config

    recorded = read_manifest(serving).get("config", {}) or {}
    sections = {"gcn": GCNSection, "tune": TuneSection, "heads": HeadsSection, "calibrate": CalibrateSection}
    overrides: dict[str, dict[str, Any]] = {}
    for name, kind in sections.items():
        known = {f.name for f in dataclasses.fields(kind)}
        values = {k: v for k, v in (recorded.get(name) or {}).items() if k in known}  # older manifests: fewer keys
        values.update({k: v for k, v in cfg.overrides.get(name, {}).items() if v is not None})
        if isinstance(values.get("exit_layers"), list):
            values["exit_layers"] = tuple(values["exit_layers"])
        overrides[name] = values
    top = {key: recorded[key] for key in ("k", "max_history") if isinstance(recorded.get(key), int)}
    return make_config(data_dir, out, seed=cfg.seed, overrides=overrides, progress=cfg.progress, **top)


def _copy_backbone(src: Path, dst: Path) -> None:
    """The serving ranker files: model weights hard-linked (never written by a refit, and releases
    are immutable), everything else copied (the heads stages rewrite those)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name.startswith("model") and path.suffix == ".safetensors":
            try:
                os.link(path, target)
                continue
            except OSError:  # another file system
                pass
        shutil.copy2(path, target)


def heads_fitted_at(metrics: dict) -> str | None:
    """When the release's exit heads were fitted: a refit's record, else the fit's (None: unknown)."""
    refit = metrics.get("refit") or {}
    return refit.get("heads_at") or metrics.get("fitted_at")


def heads_due(manifest: dict, every_s: float, now: float | None = None) -> bool:
    """Whether the serving release's heads are at least ``every_s`` seconds old (0: always)."""
    if every_s <= 0:
        return True
    stamp = heads_fitted_at(manifest.get("metrics", {}) or {}) or manifest.get("created_at")
    if not stamp:
        return True
    fitted = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return (now if now is not None else time.time()) - fitted.timestamp() >= every_s


# ------------------------------------------------------------------------------------ evaluation and rule


def recent_releases(root: Path, serving: Path, count: int, *, exclude: Path | None = None) -> list[Path]:
    """The serving release, then the newest other kept releases, ``count`` in all (one whose files
    do not match its manifest is left out; so is ``exclude``, a candidate kept under ``releases/``)."""
    skip = {Path(serving).resolve()} | ({Path(exclude).resolve()} if exclude is not None else set())
    others = sorted((p for p in (Path(root) / RELEASES).iterdir()
                     if p.is_dir() and not p.name.startswith(".") and p.resolve() not in skip),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    kept = [Path(serving)]
    for path in others:
        if len(kept) >= count:
            break
        try:
            verify_manifest(path)
        except ManifestError:
            continue
        kept.append(path)
    return kept


def evaluate(recent: list[Path], candidate: Path, data_dir: Path, cfg: RefitConfig) -> dict:
    """The recent releases (the serving one first) and the candidate scored on the same held-out
    samples; AUCs, and the paired difference to the best of the recent ones (the reference) with its se."""
    from trainer.context import subsample
    from trainer.data.dataset import load_dataset
    from trainer.stats import auc_with_ci, paired_auc_difference

    dataset = load_dataset(data_dir)
    samples = subsample(dataset.split("test"), cfg.max_eval, cfg.seed)
    labels = [s.label for s in samples]
    out: dict[str, Any] = {"samples": len(samples), "positives": sum(labels)}
    if len(samples) < cfg.min_eval or len(set(labels)) < 2:
        out["error"] = (f"{len(samples)} held-out samples ({sum(labels)} positive): at least {cfg.min_eval} "
                        "of both classes are needed to compare models")
        return out
    scores, rows = {}, {}
    for key, path in [*((f"recent{j}", p) for j, p in enumerate(recent)), ("candidate", candidate)]:
        scores[key], versions = score_release(path, dataset, samples)
        gc.collect()  # the scored model (a reference cycle with its batcher) goes before the next one loads
        auc, ci = auc_with_ci(labels, scores[key], resamples=200, seed=cfg.seed)
        rows[key] = {"release": path.name, **versions, "auc": round(auc, 4), "auc_ci95": [round(ci[0], 4), round(ci[1], 4)]}
    best = max((k for k in rows if k != "candidate"), key=lambda k: (rows[k]["auc"], k == "recent0"))
    out["serving"], out["candidate"] = rows["recent0"], rows["candidate"]
    out["recent"] = [rows[f"recent{j}"] for j in range(1, len(recent))]
    out["reference"] = {"release": rows[best]["release"], "auc": rows[best]["auc"], "serving": best == "recent0"}
    diff, se = paired_auc_difference(labels, scores["candidate"], scores[best])
    out["auc_difference"], out["se"] = round(diff, 5), round(se, 5)
    return out


def score_release(path: Path, dataset, samples) -> tuple[list[float], dict[str, str]]:
    """CTRs of one release on ``samples`` as it would serve them (its embeddings, its calibrated policy)."""
    from ranker_svc.artifact import load_ranker
    from ranker_svc.scoring import Scorer
    from trainer.context import OfflineContexts

    config = read_manifest(path).get("config", {}) or {}
    gcn = release_embeddings(path)
    contexts = OfflineContexts(dataset, gcn, k=int(config.get("k", 4)), max_history=int(config.get("max_history", 15)))
    scorer = Scorer(loaded=load_ranker(path / "ranker"))
    decisions = scorer.score_examples([contexts.example(s, retrieval=True) for s in samples])
    return [d.ctr for d in decisions], {"model_version": scorer.model_version,
                                        "embedding_version": gcn.version if gcn is not None else ""}


def decide(evaluation: dict, cfg: RefitConfig) -> tuple[str, str]:
    """(decision, reason) by the rule of the module docstring."""
    if "error" in evaluation:
        return "refused", evaluation["error"]
    serving, candidate = evaluation["serving"], evaluation["candidate"]
    if (serving["model_version"], serving["embedding_version"]) == (candidate["model_version"],
                                                                     candidate["embedding_version"]):
        return "unchanged", "the candidate has the serving ranker and embedding versions: nothing to publish"
    diff, se = evaluation["auc_difference"], evaluation["se"]
    threshold = -(cfg.noise_sigmas * se + cfg.tolerance_points / 100)
    evaluation["threshold"] = round(threshold, 5)
    reference = evaluation.get("reference") or {"serving": True, "auc": serving["auc"]}
    against = "serving" if reference["serving"] else f"the best recent release {reference['release']}"
    verdict = (f"AUC {candidate['auc']:.4f} vs {against} {reference['auc']:.4f}: difference {diff:+.4f}, "
               f"se {se:.4f}, threshold {threshold:+.4f} ({cfg.noise_sigmas:g} se + {cfg.tolerance_points:g} points)")
    if diff >= threshold:
        return "published", f"not worse: {verdict}"
    return "refused", f"worse beyond the noise: {verdict}"


# ------------------------------------------------------------------------------------ one refit, a loop


def refit_once(cfg: RefitConfig) -> dict:
    """Steps 1-5 of the module docstring; returns the summary (one JSON-able dict)."""
    started = time.perf_counter()
    root = Path(cfg.artifacts)
    with _refit_lock(root):
        serving = current_release(root)
        if serving is None:
            raise RefitError(f"{root}/current does not exist: publish a first release with "
                             f"`trainer publish --from DIR --artifacts {root}`")
        manifest = verify_manifest(serving)  # once: the later reads trust it
        _refuse_soft_tokens(serving)
        rolled = roll_forward(root, redis_url=cfg.redis_url, prefix=cfg.redis_prefix,
                              keep_versions=cfg.keep_embedding_versions)
        if cfg.candidate is not None:
            verify_manifest(cfg.candidate)
        data_dir = Path(cfg.data_out or root / "refit-data")
        counts = export_dataset(cfg.redis_url, data_dir, key=split_key(root), prefix=cfg.redis_prefix,
                                rating_threshold=cfg.rating_threshold, seed=cfg.seed)
        heads = cfg.candidate is None and heads_due(manifest, cfg.heads_every_s)
        candidate = Path(cfg.candidate) if cfg.candidate else build_candidate(cfg, serving, data_dir, heads=heads)
        recent = recent_releases(root, serving, cfg.compare_recent, exclude=candidate)
        evaluation = evaluate(recent, candidate, data_dir, cfg)
        decision, reason = decide(evaluation, cfg)
        summary = {"decision": decision, "reason": reason, "heads_refit": heads, "rolled_forward": rolled, "data": counts,
                   "data_dir": str(data_dir), "evaluation": evaluation, "release": None, "embedding_version": None,
                   "timings_s": {**_stage_seconds(candidate, cfg), "total_before_publish": round(
                       time.perf_counter() - started, 2)}}
        if decision == "published":
            summary.update(publish_pair(candidate, root, redis_url=cfg.redis_url, prefix=cfg.redis_prefix,
                                        keep_releases=cfg.keep_releases, keep_versions=cfg.keep_embedding_versions))
        elif cfg.candidate is None:
            shutil.rmtree(candidate, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def _stage_seconds(candidate: Path, cfg: RefitConfig) -> dict[str, float]:
    """Seconds of each stage this refit ran (from the candidate's manifest)."""
    if cfg.candidate is not None:
        return {}
    metrics = read_manifest(candidate).get("metrics", {})
    fresh = ("fit-gcn", "fit-heads", "calibrate") if metrics.get("refit", {}).get("heads_refit") else ("fit-gcn",)
    return {name: metrics[name].get("seconds") for name in fresh if name in metrics}


def run_refits(cfg: RefitConfig, every_s: float, *, stop: threading.Event | None = None) -> dict:
    """Refit every ``every_s`` seconds until ``stop`` (SIGTERM/SIGINT: after the refit in progress);
    prints each summary as one JSON line. A failed refit is reported and retried at the next tick."""
    stop = stop or _stop_on_signals()
    summary: dict = {}
    while not stop.is_set():
        tick = time.monotonic()
        try:
            summary = refit_once(cfg)
        except Exception as exc:  # noqa: BLE001 - a loop survives Redis outages and bad candidates
            summary = {"decision": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(summary, default=str), flush=True)
        stop.wait(max(0.0, every_s - (time.monotonic() - tick)))
    return summary


def _refuse_soft_tokens(release: Path) -> None:
    """A ranker whose prompt carries LightGCN vectors as soft tokens is tied to the embedding version
    its projector learnt: new embeddings need a re-tuned ranker (``trainer fit``), not a refit."""
    meta = json.loads((release / "ranker" / "exitrank.json").read_text())
    collab = meta.get("collab") or {}
    if collab.get("mode", "none") != "none":
        raise RefitError(f"the serving ranker uses soft tokens of embedding version {collab.get('embedding_version')}: "
                         "refit LightGCN by re-tuning the ranker (`trainer fit`, then `trainer publish`)")


@contextmanager
def _refit_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on ``ROOT/.refit.lock`` (overlapping cron runs: the second one stops)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".refit.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RefitError(f"another refit holds {root}/.refit.lock") from exc
        yield


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def parse_duration(text: str) -> float:
    """Seconds of ``90``, ``90s``, ``30m``, ``1h``, ``1.5h``, ``2d``."""
    text = str(text).strip().lower()
    unit = _DURATION_UNITS.get(text[-1:]) if text else None
    try:
        value = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 1h, 2d)") from None
    if value < 0:
        raise ValueError(f"a duration must be >= 0, got {text!r}")
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _say(message: str) -> None:
    print(f"[trainer] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ the CLI


def add_parsers(sub) -> None:
    """``trainer refit`` and ``trainer publish`` on the trainer's subcommand parser."""
    p = sub.add_parser("refit", help="refit from the live interaction log; publish only when not worse")
    env_url = os.environ.get("EXITRANK_REDIS_URL")  # a secret: keep it out of the process list
    p.add_argument("--redis-url", required=env_url is None, default=env_url,
                   help="the retrievers' Redis (histories, catalog, embeddings); default $EXITRANK_REDIS_URL")
    p.add_argument("--redis-prefix", default="xr", help="their key prefix (default xr)")
    p.add_argument("--artifacts", type=Path, required=True, help="release ROOT (releases/, current)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="one refit, then exit (cron; the default)")
    when.add_argument("--every", type=parse_duration, help="refit in a loop at this interval (e.g. 1h)")
    p.add_argument("--heads-every", type=parse_duration, default=86400.0,
                   help="refit exit heads and policy when the serving ones are this old (default 24h; 0: always)")
    p.add_argument("--data-out", type=Path, help="where the pulled data set goes (default ROOT/refit-data)")
    p.add_argument("--candidate", type=Path, help="gate this artifact directory instead of refitting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rating-threshold", type=float, default=4.0, help="explicit ratings >= this are positives")
    p.add_argument("--gcn-epochs", type=int)
    p.add_argument("--heads-epochs", type=int)
    p.add_argument("--max-train", type=int, help="training samples for the exit heads")
    p.add_argument("--max-valid", type=int, help="validation samples for calibration")
    p.add_argument("--max-eval", type=int, default=2000, help="held-out samples compared (default 2000)")
    p.add_argument("--min-eval", type=int, default=20, help="fewer held-out samples refuse (default 20)")
    p.add_argument("--noise-sigmas", type=float, default=2.0, help="standard errors of noise tolerated (default 2)")
    p.add_argument("--tolerance", type=float, default=0.0, help="AUC points tolerated beyond the noise (default 0)")
    p.add_argument("--compare-recent", type=int, default=3,
                   help="compare with the best of the serving and the newest kept releases, this many in all "
                        "(default 3; 1: the serving release only)")
    p.add_argument("--keep-releases", type=int, default=3)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_refit_command)
    pub = sub.add_parser("publish", help="make an artifact directory the current release (first release, rollback)")
    pub.add_argument("--from", dest="src", type=Path, required=True, help="a complete artifact directory")
    pub.add_argument("--artifacts", type=Path, required=True, help="release ROOT (releases/, current)")
    pub.add_argument("--redis-url", default=env_url,
                     help="also make its embeddings Redis's current version; default $EXITRANK_REDIS_URL")
    pub.add_argument("--redis-prefix", default="xr")
    pub.add_argument("--keep-releases", type=int, default=3)
    pub.set_defaults(func=lambda a: publish(a.src, a.artifacts, redis_url=a.redis_url, prefix=a.redis_prefix,
                                            keep=a.keep_releases))


def _refit_command(args) -> dict:
    overrides = {"gcn": {"epochs": args.gcn_epochs},
                 "heads": {"epochs": args.heads_epochs, "max_train": args.max_train},
                 "calibrate": {"max_valid": args.max_valid}}
    cfg = RefitConfig(redis_url=args.redis_url, artifacts=args.artifacts, redis_prefix=args.redis_prefix,
                      data_out=args.data_out, heads_every_s=args.heads_every, candidate=args.candidate,
                      seed=args.seed, overrides=overrides, rating_threshold=args.rating_threshold,
                      max_eval=args.max_eval, min_eval=args.min_eval, noise_sigmas=args.noise_sigmas,
                      tolerance_points=args.tolerance, compare_recent=args.compare_recent,
                      keep_releases=args.keep_releases,
                      progress=not args.no_progress)
    if args.every:
        return run_refits(cfg, args.every)
    return refit_once(cfg)
