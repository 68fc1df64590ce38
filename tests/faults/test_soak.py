"""A short soak (``bench/soak.py``, ``make soak`` runs 5 minutes): real ranker-svc and retriever-svc
processes at their measured capacity, resident memory sampled every second, zero errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.reliability import recording
from tests.conftest import ROOT


@pytest.mark.slow
def test_short_soak_at_capacity_keeps_memory_flat_without_errors(request, tmp_path, stack_artifacts):
    duration = 25
    with recording(request.node.nodeid, "soak", area="faults") as row:
        proc = subprocess.run([sys.executable, "-m", "bench.soak", "--artifacts", str(stack_artifacts.artifacts),
                               "--workdir", str(tmp_path), "--duration", str(duration), "--calibrate", "5",
                               "--sample-s", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.stdout.strip(), proc.stderr[-3000:]
        soak = json.loads(proc.stdout.strip().splitlines()[-1])["soak"]
        assert proc.returncode == 0, (soak, proc.stderr[-3000:])
        assert soak["requests"] > 0 and soak["errors"] == 0 and soak["calibration_errors"] == 0
        assert soak["rss_flat"] and len(soak["rss_mb"]["ranker"]) >= duration // 2
        assert soak["exit_codes"] == {"ranker": 0, "retriever": 0}
        ranker, retriever = soak["rss_mb"]["ranker"], soak["rss_mb"]["retriever"]
        row.sent, row.refused = soak["requests"], soak["errors"]
        row.measured = (f"bench/soak.py, {duration} s (make soak: 300 s) at the measured capacity "
                        f"({soak['capacity_rps']} Rank/s, {soak['concurrency']} closed-loop clients, "
                        f"{soak['candidates']} candidates): {soak['requests']} Ranks, 0 errors, p99 {soak['p99_ms']:.0f} ms; "
                        f"RSS ranker {ranker[0]:.0f} -> {ranker[-1]:.0f} MiB (growth {soak['rss_growth_mb']['ranker']} MiB, "
                        f"{len(ranker)} samples), retriever {retriever[0]:.0f} -> {retriever[-1]:.0f} MiB; both exit 0")
