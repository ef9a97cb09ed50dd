"""Compiling test programs quickly: the suite must fit in a few minutes on
2 CPU cores, and most of its time is XLA compilation. These options skip
XLA's backend optimizations (the HLO passes, and so the arithmetic and the
buffer assignment, are unchanged). conftest.py sets the same level for the
whole suite through XLA_FLAGS; `compile_fast` keeps it for a run that sets
its own XLA_FLAGS."""

from __future__ import annotations

import jax

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_fast(fn, *args, **options):
  """`jax.jit(fn)` compiled for `args` with FAST_COMPILE (plus `options`),
  falling back to the default options on an XLA that does not know one."""
  lowered = jax.jit(fn).lower(*args)
  try:
    return lowered.compile({**FAST_COMPILE, **options})
  except jax.errors.JaxRuntimeError as e:
    if "compile option" not in str(e):
      raise
    return lowered.compile()
