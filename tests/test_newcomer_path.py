"""README's "Running the pieces by hand", walked as a newcomer would: only the command line, on a fresh
synthetic data set, against real processes (``trainer``, ``retriever-svc`` with its embedded
redis-server, ``ranker-svc``, ``python -m exitrank.client``).

synth -> fit (the demo's recipe: collaborative soft tokens; small sizes) -> serve both -> load ->
rank -> ingest a new user -> rank again -> eval -> SIGTERM, each step's outcome asserted, including
that the fitted model tells items apart (its scores are not all alike, its held-out AUC is above
chance). One walk: the fit is most of its few minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from exitrank.artifacts import verify_manifest
from tests.conftest import await_ready, launch_service, stop_service

BIN = Path(sys.executable).parent
FIT = ("--preset", "tiny", "--collab-tokens", "full", "--epochs", "2",  # scripts/demo.py's recipe ...
       "--k", "1", "--max-train", "240", "--max-valid", "80", "--gcn-epochs", "20")  # ... at a test's size


def run(*argv: object, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)


def ok(*argv: object, timeout: float = 600) -> dict:
    """Runs a command that must succeed; its last stdout line is its JSON result."""
    proc = run(*argv, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trainer(*args: object) -> list[object]:
    return [BIN / "trainer", *args]


def client(*args: object) -> list[object]:
    return [sys.executable, "-m", "exitrank.client", *args]


def test_the_by_hand_path_from_a_fresh_data_set_to_sigterm(tmp_path):
    data, artifacts, report = tmp_path / "data", tmp_path / "artifacts", tmp_path / "report"

    # 1. a data set; a second synth into it is refused rather than overwriting it
    synth = ok(*trainer("data", "synth", data, "--users", 300, "--items", 150, "--groups", 4, "--seed", 0))
    assert synth["users"] == 300 and synth["items.jsonl"] == 150
    again = run(*trainer("data", "synth", data, "--users", 300))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr

    # 2. a model that learns: the demo's recipe; a line per epoch, no DeepSpeed probe, no bars
    fit = run(*trainer("fit", "--data", data, "--out", artifacts, *FIT, "--no-progress"), timeout=1200)
    assert fit.returncode == 0, fit.stderr[-3000:]
    for line in ("fit-gcn: epoch 20/20", "tune: epoch 2/2", "fit-heads: epoch 1/1", "calibrate: "):
        assert line in fit.stderr, line
    assert "Setting accelerator to CPU" not in fit.stdout + fit.stderr
    assert "Loading weights" not in fit.stderr and "Writing model shards" not in fit.stderr
    manifest = verify_manifest(artifacts)
    assert manifest["metrics"]["tune"]["valid_auc"] > 0.5

    logs = {name: tmp_path / f"{name}.log" for name in ("retriever", "ranker")}
    retriever = launch_service([BIN / "retriever-svc", "serve", "--port", "0", "--artifacts", artifacts],
                               logs["retriever"])
    ranker = None
    try:
        # 3. both services (the retriever's Redis under the default data directory, said at start)
        retriever_at = await_ready(retriever, "retriever listening on ", logs["retriever"])
        ranker = launch_service([BIN / "ranker-svc", "serve", "--port", "0", "--retriever", retriever_at,
                                 "--artifacts", artifacts], logs["ranker"])
        ranker_at = await_ready(ranker, "ranker listening on ", logs["ranker"], timeout_s=300)
        assert "keeps its data in" in logs["retriever"].read_text()
        assert run(*client("health", ranker_at)).stdout.strip() == "SERVING"

        samples = _held_out(data)
        user, candidates = next(iter(samples.items()))
        empty = run(*client("rank", ranker_at, "--user", user, "--items", ",".join(candidates)))
        assert empty.returncode == 1 and "exitrank.client load" in empty.stderr  # the way out is named

        # 4. the catalog and the interactions, from the command line
        loaded = ok(*client("load", retriever_at, "--data", data, "--no-progress"))
        assert loaded["items"]["accepted"] == 150 and loaded["interactions"]["accepted"] == synth["interactions.jsonl"]
        assert loaded["rejected"] == 0

        # 5. rank held-out users: retrieval in the prompt, scores that tell items apart
        ctrs = []
        for user, candidates in list(samples.items())[:3]:
            ranked = ok(*client("rank", ranker_at, "--user", user, "--items", ",".join(candidates)))
            assert ranked["retrieval_used"] and sorted(s["item_id"] for s in ranked["scores"]) == sorted(candidates)
            ctrs += [s["ctr"] for s in ranked["scores"]]
        assert max(ctrs) - min(ctrs) > 1e-3, ctrs

        # 6. a new user: ranked without neighbours, ingested, ranked with them once folded in
        clicks = _items_of_one_genre(data, 6)
        fresh = ok(*client("rank", ranker_at, "--user", "newcomer", "--items", ",".join(candidates)))
        assert not fresh["retrieval_used"]
        assert ok(*client("ingest", retriever_at, "--user", "newcomer", "--items", ",".join(clicks)))["accepted"] == 6
        deadline = time.monotonic() + 60
        while not (again := ok(*client("rank", ranker_at, "--user", "newcomer", "--items", ",".join(candidates)))
                   )["retrieval_used"]:
            assert time.monotonic() < deadline, "the new user never got neighbours"
        assert len(again["scores"]) == len(candidates)

        # 7. offline evaluation, as the model serves (its soft tokens included)
        evaluated = ok(*trainer("eval", "--data", data, "--artifacts", artifacts, "--report", report,
                                "--max-samples", 100, "--bootstrap", 100))
        assert evaluated["auc"]["gcn_retrieval+collab_tokens"] > 0.5, evaluated
        assert json.loads((report / "report.json").read_text())["collab_tokens"] is True
    finally:
        # 8. SIGTERM: both drain and exit 0
        codes = [stop_service(ranker)] if ranker is not None else []
        codes.append(stop_service(retriever))
    assert codes == [0, 0]
    for log in logs.values():
        assert "Traceback" not in log.read_text()


def _held_out(data: Path) -> dict[str, list[str]]:
    """Test-split users and their candidate items (the data set's own rule, as ``trainer eval`` reads it)."""
    from trainer.data.dataset import load_dataset

    samples: dict[str, list[str]] = defaultdict(list)
    for sample in load_dataset(data).split("test"):
        if sample.item_id not in samples[sample.user_id]:
            samples[sample.user_id].append(sample.item_id)
    return {u: items for u, items in samples.items() if len(items) > 1}


def _items_of_one_genre(data: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (data / "items.jsonl").read_text().splitlines()]
    genre = rows[0]["attributes"]["genre"]
    return [r["item_id"] for r in rows if r["attributes"]["genre"] == genre][:n]
