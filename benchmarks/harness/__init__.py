"""Shared code of the benchmark scripts, and the benchmarks that run as modules (``python -m benchmarks.harness.X``)."""
