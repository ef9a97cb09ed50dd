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
import pytest

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


@pytest.fixture(params=["cpu", "accelerator"])
def branches(request, monkeypatch):
  """Runs each test twice: with jaxce's XLA:CPU code paths, and with those it
  takes on TPU and GPU (the `tpu=` or `default=` branch of every
  `lax.platform_dependent`), traced on CPU, so that their values are tested
  where no accelerator is at hand. Caches are cleared around the second
  (internal `jax.jit`s would otherwise reuse the CPU traces)."""
  if request.param == "accelerator":
    def accelerator(*args, default=None, **per_platform):
      branch = per_platform.get("tpu", default)
      return branch(*args)

    jax.clear_caches()
    monkeypatch.setattr(jax.lax, "platform_dependent", accelerator)
    yield request.param
    jax.clear_caches()
  else:
    yield request.param
