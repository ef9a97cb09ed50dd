"""Test set-up: 8 CPU devices for the sharding tests, fast compiles, and
strict dtype and rank promotion so that no implicit upcast or broadcast hides
in the library."""

import os
import subprocess
import sys

# Fast compiles (most of the suite's time), options of XLA:CPU's code
# generation (tests/fast_compile.py); the tests that read XLA:CPU's compiled
# program compile it with XLA's defaults. An XLA that does not know a flag
# aborts the process, so a flag that may be retired is probed first.
_BASE_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"


def _xla_flags() -> str:
  flags = (f"{_BASE_FLAGS} --xla_cpu_use_fusion_emitters=false"
           " --xla_cpu_parallel_codegen_split_count=1")
  probe = subprocess.run(
      [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
      env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, capture_output=True)
  return flags if probe.returncode == 0 else _BASE_FLAGS


if "XLA_FLAGS" not in os.environ:  # set once; pytest-xdist's workers inherit it
  if os.environ.get("JAXCE_TEST_COMPILE") == "shipped":  # .ci/shipped
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  else:
    os.environ["XLA_FLAGS"] = _xla_flags()

import jax  # noqa: E402 (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# No Python tracebacks in the lowered programs' locations, which the tests do
# not read: tests/test_gradients.py on one core took 66.9 and 64.2 s with
# them, 57.8 and 54.9 s without (alternating runs; two runs of one setting
# differed by 5 s later). Tracebacks of raised errors are not affected.
jax.config.update("jax_traceback_in_locations_limit", 0)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  if hasattr(config, "workerinput"):
    # A pytest-xdist worker has sent its reports and its exit status (at
    # sessionfinish) by now. The interpreter's teardown of the worker's
    # thousands of compiled executables took 10-12 s at the end of the
    # default suite, which the controller waits for: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _on_branch(param, monkeypatch):
  if param == "cpu":
    yield param
    return
  key = "tpu" if param == "tpu" else "cuda"

  def accelerator(*args, default=None, **per_platform):
    return per_platform.get(key, default)(*args)

  monkeypatch.setattr(jax.lax, "platform_dependent", accelerator)
  with jax.default_matmul_precision("highest" if key == "tpu" else "float32"):
    yield param


@pytest.fixture(params=["cpu", "tpu"])
def branches(request, monkeypatch):
  """Runs each test twice: with jaxce's XLA:CPU code paths, and with those it
  takes on TPU (the `tpu=` or `default=` branch of every
  `lax.platform_dependent`), traced on CPU, so that their values are tested
  where no accelerator is at hand. The GPU's are TPU's except where
  `all_branches` says.

  The TPU run is under a `default_matmul_precision` of its own, a setting
  that is part of every jit cache's key (and that XLA:CPU's dots ignore), so
  that internal `jax.jit`s trace it anew instead of reusing the CPU traces,
  and the CPU traces stay cached for later tests (`jax.clear_caches()` made
  every later test compile again)."""
  yield from _on_branch(request.param, monkeypatch)


@pytest.fixture(params=["cpu", "tpu", "gpu"])
def all_branches(request, monkeypatch):
  """`branches` and the GPU's (`cuda=` or `default=`) branches too, for the
  tests that reach a GPU-only one: label smoothing and probability targets'
  statistics (`_stats._gpu_smoothed`, `_stats._gpu_target_stats`)."""
  yield from _on_branch(request.param, monkeypatch)
