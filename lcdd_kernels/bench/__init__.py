"""Benchmark suites behind `lcdd bench` (and reused by benchmarks/ pytest-benchmark files)."""
