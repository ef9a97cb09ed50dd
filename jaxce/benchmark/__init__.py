"""jaxce's benchmarks, shipped with the package (``python -m jaxce.benchmark.aot``)."""
