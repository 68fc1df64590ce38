"""``bench/bench_gpu.py`` runs end to end on the CPU with a tiny random decoder (its GPU figures are
measured on a GPU: bench/results/), so the script the GPU run depends on cannot rot unnoticed."""

from __future__ import annotations

import json

from bench.bench_gpu import main


def test_gpu_bench_dry_run_on_cpu(capsys):
    main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--batch", "6",
          "--context-tokens", "24", "--suffix-tokens", "6", "--candidates", "5", "--requests-per-pass", "2"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["exit_layers"] == [2, 4, 6, 8, 10] and result["layers"] == 12
    prompts = result["prompts"]
    assert set(prompts["prompts_per_s"]) == {"full", "mixed", "mixed_whole_batch",
                                             *(f"exit@{layer}" for layer in result["exit_layers"])}
    histogram = prompts["mixed"]["exit_histogram"]
    assert sum(histogram.values()) == 6 and set(histogram) <= {"2", "4", "6", "8", "10", "12"}
    assert 2 <= prompts["mixed"]["mean_exit_layer"] <= 12
    for rank in (result["rank50"], result["rank50_one_request"]):
        assert rank["candidates"] == 5 and rank["context_sharing_speedup"] > 0
    # DeepSpeed's module computes exactly what the plain model does (same weights, same loop)
    assert result["deepspeed"]["max_ctr_difference_vs_torch"] < 1e-6
