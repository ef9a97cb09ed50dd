"""Benchmark suite for jaxce: `python benchmarks/run.py --help`."""
