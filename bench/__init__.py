"""exitrank benchmarks: each prints one JSON object as its last line (shared/BENCH_OUTPUT.md)."""
