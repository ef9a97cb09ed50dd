"""Test set-up: 8 CPU devices for the sharding tests, fast compiles, and
strict dtype and rank promotion so that no implicit upcast or broadcast hides
in the library."""

import os

# O0: XLA:CPU's LLVM backend skips its optimizations, which cuts compile time
# (most of the suite's time: 303 -> 281 s) and changes no HLO pass, so the
# memory and HLO checks see the HLO and buffer assignment users get; only the
# machine code is unoptimized (tests/fast_compile.py).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionfinish(session):
  # Under pytest-xdist (`-n 2` in pyproject's addopts) a worker is stopped
  # with an interrupt of its main thread; landing inside JAX's garbage
  # collection callback it prints a KeyboardInterrupt warning. Collect now
  # and let no collection run during the shutdown.
  if hasattr(session.config, "workerinput"):
    import gc

    gc.collect()
    gc.disable()
