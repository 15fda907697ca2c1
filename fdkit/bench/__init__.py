"""Benchmarks: `python -m fdkit.bench offline ...` (the engine in-process), `... serve ...` (over HTTP)."""
