import json

import pytest

from trainer.reproduce.stages import StageCache, fingerprint


def test_fingerprint_is_order_free_and_input_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_unchanged_inputs_reuse_the_stored_result(tmp_path):
    calls = []

    def stage(out):
        calls.append(out)
        (out / "weights.bin").write_bytes(b"x")
        return {"auc": 0.7}

    cache = StageCache(tmp_path, log=lambda m: None)
    first = cache.run("ds/fit", {"lr": 1e-3}, stage)
    again = StageCache(tmp_path, log=lambda m: None).run("ds/fit", {"lr": 1e-3}, stage)
    assert len(calls) == 1 and not first.reused and again.reused
    assert again.result == {"auc": 0.7} and again.fingerprint == first.fingerprint
    assert (again.dir / "weights.bin").is_file()


def test_changed_inputs_or_force_run_again_in_an_emptied_directory(tmp_path):
    seen = []

    def stage(out):
        seen.append(sorted(p.name for p in out.iterdir()))
        (out / "left-over").write_text("from this run")
        return len(seen)

    StageCache(tmp_path, log=lambda m: None).run("s", {"x": 1}, stage)
    assert StageCache(tmp_path, log=lambda m: None).run("s", {"x": 2}, stage).result == 2
    assert StageCache(tmp_path, force=True, log=lambda m: None).run("s", {"x": 2}, stage).result == 3
    assert seen == [[], [], []]  # each run starts from an empty directory


def test_an_interrupted_stage_leaves_no_record_and_runs_again(tmp_path):
    def broken(out):
        (out / "partial").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        StageCache(tmp_path, log=lambda m: None).run("s", {"x": 1}, broken)
    assert not (tmp_path / "s" / "stage.json").exists()
    done = StageCache(tmp_path, log=lambda m: None).run("s", {"x": 1}, lambda out: "ok")
    assert done.result == "ok" and not done.reused
    assert json.loads((tmp_path / "s" / "stage.json").read_text())["inputs"] == {"x": 1}
