"""jaxce's benchmarks, installed with the package (`pip install "jaxce[bench]"`).

- `python -m jaxce.benchmark` (or `jaxce-benchmark`): the sweep of `run`:
  times, compiled memory and errors against optax / jax.nn / naive JAX.
- `python -m jaxce.benchmark.acceptance`: the issues' acceptance figures.
- `python -m jaxce.benchmark.aot`: compile-only TPU/GPU memory and HLO figures.

Nothing here is imported by `import jaxce`.
"""
