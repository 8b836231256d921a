"""Benchmark scripts. A package so that tests can import one as a library (`benchmarks.soak`);
each still runs on its own (`python benchmarks/serve_load.py`, `python -m benchmarks.soak`)."""
