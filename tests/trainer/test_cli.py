"""``trainer`` as real subprocesses: data synth -> fit (tiny, capped) -> eval, then the artifacts and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exitrank.artifacts import verify_manifest
from trainer.data.dataset import data_hash, load_dataset
from trainer.eval import CONFIGS

ROOT = Path(__file__).resolve().parents[2]
REPORT_KEYS = {"name", "retrieval", "early_exit", "auc", "auc_ci95", "requests_per_s", "mean_exit_layer"}


def trainer(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def ok(*args: str) -> dict:
    proc = trainer(*args)
    assert proc.returncode == 0, f"trainer {' '.join(map(str, args))} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])  # the result is stdout's last line


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, art, rep = root / "data", root / "artifacts", root / "report"
    ok("data", "synth", data, "--users", 150, "--items", 200, "--groups", 4, "--seed", 0)
    fit = ok("fit", "--data", data, "--out", art, "--preset", "tiny", "--seed", 0, "--no-progress",
             "--max-train", 64, "--epochs", 1, "--gcn-epochs", 3, "--heads-epochs", 1, "--max-valid", 40)
    ev = ok("eval", "--data", data, "--artifacts", art, "--report", rep, "--max-samples", 40, "--bootstrap", 100)
    return data, art, rep, fit, ev


def test_fit_writes_verified_artifacts(pipeline):
    data, art, _, fit, _ = pipeline
    manifest = verify_manifest(art)
    assert manifest["version"] == fit["version"]
    assert manifest["data_hash"] == data_hash(data)
    assert manifest["config"]["tune"]["max_train"] == 64 and manifest["config"]["seed"] == 0
    assert set(manifest["metrics"]) >= {"fit-gcn", "tune", "fit-heads", "calibrate"}
    for rel in ("gcn/embeddings.safetensors", "gcn/meta.json", "ranker/exitrank.json", "ranker/exit_heads.safetensors"):
        assert rel in manifest["files"] and (art / rel).is_file()
    gcn_meta = json.loads((art / "gcn/meta.json").read_text())
    train_users = {s.user_id for s in load_dataset(data).split("train")}
    assert train_users <= set(gcn_meta["user_ids"])
    ranker_meta = json.loads((art / "ranker/exitrank.json").read_text())
    assert ranker_meta["heads_trained"] is True and ranker_meta["exit_layers"]


def test_eval_report(pipeline):
    data, _, rep, _, ev = pipeline
    report = json.loads((rep / "report.json").read_text())
    assert [c["name"] for c in report["configs"]] == [n for n, _, _ in CONFIGS]
    assert report["samples"] == load_dataset(data).split_counts() and report["seed"] == 0
    assert report["evaluated"]["samples"] == 40
    for row in report["configs"]:
        assert REPORT_KEYS <= set(row)
        assert 0.0 <= row["auc"] <= 1.0 and row["auc_ci95"][0] <= row["auc"] <= row["auc_ci95"][1]
        assert row["requests_per_s"] > 0
        hist = {int(k): v for k, v in row["exit_layer_histogram"].items()}
        assert sum(hist.values()) == 40
        assert row["mean_exit_layer"] == pytest.approx(sum(k * v for k, v in hist.items()) / 40)
        if not row["early_exit"]:
            assert hist == {report["num_layers"]: 40}
    assert ev["auc"] == {row["name"]: round(row["auc"], 4) for row in report["configs"]}
    md = (rep / "report.md").read_text()
    assert all(name in md for name, _, _ in CONFIGS)


def test_import_subcommand_and_errors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.txt").write_text("0 0 1\n1 1 2\n")
    (src / "test.txt").write_text("0 2\n")
    summary = ok("data", "import", "lightgcn", src, tmp_path / "out", "--seed", 3)
    assert summary["interactions.jsonl"] == 4 and (tmp_path / "out/test_pairs.jsonl").is_file()
    bad = trainer("fit", "--data", tmp_path / "missing", "--out", tmp_path / "a", timeout=120)
    assert bad.returncode == 2 and "trainer data import" in bad.stderr
    bad = trainer("eval", "--data", tmp_path / "out", "--artifacts", tmp_path / "none", "--report", tmp_path / "r")
    assert bad.returncode == 2 and "manifest.json is missing" in bad.stderr


def test_flags_override_the_preset():
    from trainer.__main__ import build_parser, _fit_config

    args = build_parser().parse_args(["fit", "--data", "d", "--out", "o", "--preset", "small", "--epochs", "3",
                                      "--exit-layers", "2", "4", "--beta", "0.5", "--seed", "7"])
    cfg = _fit_config(args)
    assert cfg.tune.preset == "small" and cfg.tune.epochs == 3 and cfg.tune.max_train == 20000
    assert cfg.heads.exit_layers == (2, 4) and cfg.heads.beta == 0.5 and cfg.seed == 7
    assert cfg.gcn.epochs == 40 and cfg.k == 4 and cfg.tune.arch == "llama"
    with pytest.raises(ValueError, match="preset must be one of"):
        from trainer.pipeline import make_config

        make_config("d", "o", preset="huge")


def test_collab_tokens_fit_and_evaluate_as_they_serve_beside_another_model(pipeline, tmp_path):
    """``fit --collab-tokens full`` writes a pinned projector over a target-free graph; ``eval`` scores
    such an artifact with its soft tokens (its own prompt configuration), and ``--compare`` adds a
    second model's rows."""
    data, art, _, _, _ = pipeline
    collab, rep = tmp_path / "collab", tmp_path / "report"
    ok("fit", "--data", data, "--out", collab, "--preset", "tiny", "--seed", 0, "--no-progress", "--max-train", 48,
       "--epochs", 1, "--gcn-epochs", 3, "--heads-epochs", 1, "--max-valid", 40, "--collab-tokens", "full",
       "--k", 2)
    meta = json.loads((collab / "ranker/exitrank.json").read_text())
    gcn = json.loads((collab / "gcn/meta.json").read_text())
    assert meta["collab"]["mode"] == "full" and meta["collab"]["embedding_version"] == gcn["version"]
    assert meta["prompt"]["num_neighbors"] == 2  # the prompt asks for as many neighbours as tuning saw
    assert "ranker/collab.safetensors" in verify_manifest(collab)["files"]
    text_gcn = json.loads((art / "gcn/meta.json").read_text())
    assert gcn["interactions"] < text_gcn["interactions"]  # no training target is in the collab graph
    ok("eval", "--data", data, "--artifacts", collab, "--compare", art, "--report", rep,
       "--max-samples", 40, "--bootstrap", 50)
    report = json.loads((rep / "report.json").read_text())
    names = [c["name"] for c in report["configs"]]
    assert names == ["no_retrieval+collab_tokens", "no_retrieval+collab_tokens+early_exit", "gcn_retrieval+collab_tokens",
                     "gcn_retrieval+collab_tokens+early_exit"] + [f"compare/{n}" for n, _, _ in CONFIGS]
    assert report["collab_tokens"] is True and report["k"] == 2 and report["compare"] == str(art)


STAGE_FLAGS = {"fit-gcn": "--gcn-epochs", "tune": "--lora-rank", "fit-heads": "--lambda0", "calibrate": "--auc-budget"}


def test_each_stage_lists_its_own_flags_and_every_flag_says_what_it_does():
    for stage, own in STAGE_FLAGS.items():
        shown = trainer(stage, "--help", timeout=60)
        assert shown.returncode == 0 and own in shown.stdout, stage
        assert not [flag for other, flag in STAGE_FLAGS.items() if other != stage and flag in shown.stdout], stage
        assert "hyper-parameters of every stage" in shown.stdout  # --preset says what it is
    everything = trainer("fit", "--help", timeout=60).stdout
    assert all(flag in everything for flag in STAGE_FLAGS.values())
    synth = trainer("data", "synth", "--help", timeout=60).stdout
    for flag, says in (("--users", "users, each with"), ("--items", "catalog items"), ("--groups", "taste groups"),
                       ("--seed", "random seed"), ("--force", "replace an existing data set")):
        assert flag in synth and says in synth, flag


def test_one_stage_alone_logs_a_line_per_epoch(pipeline, tmp_path):
    data = pipeline[0]
    proc = trainer("fit-gcn", "--data", data, "--out", tmp_path / "gcn-only", "--gcn-epochs", 3, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if "fit-gcn: epoch" in line][-1].startswith(
        "[trainer] fit-gcn: epoch 3/3 loss ")
    assert json.loads(proc.stdout.splitlines()[-1])["metrics"]["fit-gcn"]["edges"] > 0
