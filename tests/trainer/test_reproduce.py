"""``trainer reproduce --quick`` on the real data: every table and figure, then a resumed run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from trainer.reproduce import ReproduceConfig, reproduce
from trainer.reproduce.plan import TABLE2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    cfg = ReproduceConfig(data_root=shared_data, out=out, quick=True, progress=False, bootstrap=200)
    return cfg, reproduce(cfg)


def test_every_table_and_figure_for_every_data_set(quick_run):
    cfg, report = quick_run
    assert set(report["datasets"]) == {"games6k", "tallrec-book", "synthetic"}
    on_disk = json.loads((cfg.out / "report.json").read_text())
    assert on_disk["table2"] == report["table2"]
    markdown = (cfg.out / "report.md").read_text()
    for name, ds in report["datasets"].items():
        assert [c["name"] for c in ds["configs"]] == ["no_retrieval", "no_retrieval+early_exit", "gcn_retrieval",
                                                      "gcn_retrieval+early_exit", "gcn_retrieval+collab_tokens",
                                                      "gcn_retrieval+collab_tokens+early_exit"]
        for row in ds["configs"]:
            assert 0 <= row["auc_ci95"][0] <= row["auc"] <= row["auc_ci95"][1] <= 1
            assert row["requests_per_s"] > 0 and 1 <= row["mean_exit_layer"] <= ds["num_layers"]
        assert [r["model"] for r in report["table2"][name]] == [key for key, _ in TABLE2]
        assert len(report["table3"][name]) == 2 and len(report["table4"][name]) == 4
        figs = report["figures"][name]
        assert figs["figure2"]["gcn_p50_ms"] < figs["figure2"]["llm_p50_ms"]  # a search vs a decoder pass
        assert [p["k"] for p in figs["figure5"]] == [0, 1, 2, 4, 8]
        taus = [p for p in figs["figure3"]]
        assert taus[0]["mean_exit_layer"] >= taus[-1]["mean_exit_layer"]  # a looser tau exits earlier
        for plot in report["plots"][name].values():
            assert (cfg.out / plot).stat().st_size > 1000
        assert f"## {name}" in markdown
    # the paper's numbers stand beside ours where the paper has them, and only there
    games = {r["model"]: r for r in report["table2"]["games6k"]}
    assert games["gcn_earlyexit"]["paper_auc"] == 97.19 and games["sasrec"]["paper_auc"] is None
    assert report["table2"]["synthetic"][0]["paper_auc"] is None
    assert "beats_tallrec_7b_256" in report["goals"]["tallrec-book"]


def test_a_second_run_reuses_every_stage_and_reports_the_same(quick_run):
    cfg, first = quick_run
    again = reproduce(cfg)
    # 8 stages per data set, and tallrec-book's few-shot rows (one stage per shot count and seed)
    few = first["datasets"]["tallrec-book"]["few_shot"]["plan"]
    fewshot = len(few["shots"]) * len(few["seeds"])
    assert fewshot >= 1 and again["stages_reused"] == again["stages"] == first["stages"] == 8 * 3 + fewshot
    assert again["table2"] == first["table2"] and again["figures"] == first["figures"]
    # leaving the few-shot table out re-runs nothing else, and leaves the table out of the report
    without = reproduce(replace(cfg, few_shot=False))
    assert without["stages_reused"] == without["stages"] == 8 * 3
    assert without["datasets"]["tallrec-book"]["few_shot"] is None and without["table2"] == first["table2"]
