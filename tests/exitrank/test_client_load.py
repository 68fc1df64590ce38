"""``python -m exitrank.client load`` against a real ``retriever-svc``: a data set directory in, a JSON
summary out, and a run that stopped half way continues where it stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc

from exitrank.v1 import retriever_pb2, retriever_pb2_grpc

USERS = [f"g{g}u{j}" for g in range(3) for j in range(2)]


def _load(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exitrank.client", "load", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=120)


def _data(root: Path, titles: dict[str, str]) -> Path:
    """24 items and 30 interactions (5 per user, the 25th line broken)."""
    root.mkdir()
    (root / "items.jsonl").write_text("".join(json.dumps({"item_id": i, "title": t}) + "\n" for i, t in titles.items()))
    items = sorted(titles)
    rows = [json.dumps({"user_id": u, "item_id": items[(3 * n + k) % len(items)], "rating": 4.0, "timestamp_ms": 1000 + k})
            for n, u in enumerate(USERS) for k in range(5)]
    rows[24] = '{"user_id": "g2u0", "item_id": '  # a truncated line
    (root / "interactions.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_load_reports_stops_at_a_broken_line_and_resumes_after_what_was_acknowledged(
        tmp_path, stack_artifacts, spawn_service):
    address = spawn_service("retriever-svc", "serve", "--port", "0", "--artifacts", str(stack_artifacts.artifacts),
                            "--data-dir", str(tmp_path / "redis"), ready="retriever listening on ")
    data = _data(tmp_path / "data", stack_artifacts.titles)

    broken = _load(address, "--data", data, "--batch", 10)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines() == [  # one line: the file, the line, what is wrong
        f"exitrank.client: {data / 'interactions.jsonl'}:25: not a row of interactions.jsonl "
        "(Expecting value: line 1 column 31 (char 30))"]
    state = json.loads((data / ".exitrank-load.json").read_text())[address]
    assert state["items.jsonl"]["lines"] == 24 and state["interactions.jsonl"]["lines"] == 20  # two calls acked

    lines = (data / "interactions.jsonl").read_text().splitlines()
    lines[24] = json.dumps({"user_id": "g2u0", "item_id": "sunny-garden", "rating": 4.0, "timestamp_ms": 2000})
    (data / "interactions.jsonl").write_text("\n".join(lines) + "\n")  # fixed after the acknowledged lines
    resumed = _load(address, "--data", data, "--batch", 10)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.splitlines()[-1])
    assert summary["items"] == {"lines": 24, "sent": 0, "accepted": 0, "rejected": 0, "skipped": 24, "backoffs": 0,
                                "errors": []}
    assert summary["interactions"] == {"lines": 30, "sent": 10, "accepted": 10, "rejected": 0, "skipped": 20,
                                       "backoffs": 0, "errors": []}
    assert summary["accepted"] == 10 and summary["rejected"] == 0

    with grpc.insecure_channel(address) as channel:  # every interaction arrived, once
        stub = retriever_pb2_grpc.RetrieverStub(channel)
        deadline = time.monotonic() + 30
        while True:
            histories = {u: len(stub.GetContext(retriever_pb2.ContextRequest(user_id=u, k=0, max_history=50),
                                                timeout=10).history) for u in USERS}
            if all(n == 5 for n in histories.values()):
                break
            assert time.monotonic() < deadline, histories
            time.sleep(0.05)

    again = json.loads(_load(address, "--data", data, "--restart").stdout.splitlines()[-1])
    assert again["items"]["sent"] == 24 and again["interactions"]["sent"] == 30 and again["rejected"] == 0
    missing = _load(address, "--data", tmp_path / "nowhere")
    assert missing.returncode == 2 and "items.jsonl is missing" in missing.stderr and "Traceback" not in missing.stderr


def test_every_command_speaks_mutual_tls_with_the_tls_flags(tmp_path, stack_artifacts, spawn_service):
    from tests.support.pki import DevCA

    ca = DevCA(tmp_path / "pki")
    server, ingest = ca.server(), ca.client("ingest", name="ingest")
    address = spawn_service("retriever-svc", "serve", "--port", "0", "--artifacts", str(stack_artifacts.artifacts),
                            "--data-dir", str(tmp_path / "redis"), "--tls-cert", str(server.cert), "--tls-key",
                            str(server.key), "--tls-client-ca", str(ca.cert), ready="retriever listening on ")
    data = _data(tmp_path / "data", stack_artifacts.titles)
    lines = (data / "interactions.jsonl").read_text().splitlines()
    (data / "interactions.jsonl").write_text("\n".join(lines[:24]) + "\n")  # the good lines only
    tls = ("--tls-ca", ca.cert, "--tls-cert", ingest.cert, "--tls-key", ingest.key)

    plaintext = _load(address, "--data", data)
    assert plaintext.returncode == 1 and len(plaintext.stderr.strip().splitlines()) == 1
    loaded = _load(address, "--data", data, *tls)
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout.splitlines()[-1])["accepted"] == 24 + 24
    health = subprocess.run([sys.executable, "-m", "exitrank.client", "health", address, *map(str, tls)],
                            capture_output=True, text=True, timeout=60)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"
    half = _load(address, "--data", data, "--restart", "--tls-ca", ca.cert, "--tls-cert", ingest.cert)
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr


def test_a_retriever_shedding_load_is_waited_for_not_given_up_on(tmp_path, stack_artifacts, spawn_service):
    """A per-client rate of 20 calls or messages a second (burst 2): a call made right after a paced
    stream finds the bucket empty and is refused RESOURCE_EXHAUSTED; the loader pauses and sends it
    again, so everything arrives. With no patience (--max-wait 0) the first refusal ends the run
    (exit 1, one line) and what was acknowledged before it stays recorded for a rerun."""
    address = spawn_service("retriever-svc", "serve", "--port", "0", "--artifacts", str(stack_artifacts.artifacts),
                            "--data-dir", str(tmp_path / "redis"), "--rate-limit", "20", "--rate-burst", "2",
                            ready="retriever listening on ")
    data = _data(tmp_path / "data", stack_artifacts.titles)
    lines = (data / "interactions.jsonl").read_text().splitlines()
    (data / "interactions.jsonl").write_text("\n".join(lines[:24]) + "\n")  # the good lines only

    impatient = _load(address, "--data", data, "--batch", 4, "--max-wait", 0)
    assert impatient.returncode == 1 and len(impatient.stderr.strip().splitlines()) == 1, impatient.stderr
    assert "rate limit" in impatient.stderr and "Traceback" not in impatient.stderr
    acknowledged = json.loads((data / ".exitrank-load.json").read_text())[address]["items.jsonl"]["lines"]
    assert 4 <= acknowledged < 24  # the first call went through, a later one was shed

    patient = _load(address, "--data", data, "--batch", 4)
    assert patient.returncode == 0, patient.stderr
    summary = json.loads(patient.stdout.splitlines()[-1])
    assert summary["items"]["skipped"] == acknowledged and summary["accepted"] == 24 - acknowledged + 24
    assert summary["items"]["backoffs"] + summary["interactions"]["backoffs"] >= 1  # it was shed, and waited
    assert summary["rejected"] == 0
