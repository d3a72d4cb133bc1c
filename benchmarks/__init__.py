"""Benchmark scripts: run each as `python benchmarks/bench_X.py` (see README.md)."""
