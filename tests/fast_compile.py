"""Compiling test programs quickly: the suite must fit in a few minutes on
2 CPU cores, and much of its time is XLA compilation (tests/test_numerics.py
in one process, before the third option below: 53 s of 152, beside 28 s of
lowering). These options are
XLA:CPU's code generation: LLVM's optimizations off (no HLO pass changes);
the older loop-fusion emitters, which compile in about half the time of
the MLIR ones (the default suite: 3 min 57 s -> 2 min 44 s on 2 cores, the
same tests passing); and each program's LLVM module compiled whole, not
split for threads that the two test workers leave no core for (4 min 46-55 s
-> 4 min 30 s on 2026-12-06, 551 -> 503 s of CPU time; it changes how the
program is compiled, not the program, so `compile_as_shipped` keeps it).
With them a few HLO details differ (the form of a
gather); on every loss's value_and_grad checked, in float32 and bfloat16,
the temp memory was the same and the results bitwise equal.
conftest.py sets the same for the whole suite through XLA_FLAGS;
`compile_fast` keeps them for a run that sets its own XLA_FLAGS, and
`compile_as_shipped` undoes the first two for the checks of XLA:CPU's compiled
program.

JAXCE_TEST_COMPILE=shipped (.ci/shipped) turns the fast options off for a
whole run: a result can depend on the code generation (the sum of a fused
pass's +inf and -inf terms was +inf or -inf as shipped and NaN at -O0), so
the numerics tests also run on the programs users get."""

from __future__ import annotations

import os

import jax

# XLA's defaults, which users' programs compile with.
SHIPPED = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}

AS_SHIPPED = os.environ.get("JAXCE_TEST_COMPILE") == "shipped"

FAST_COMPILE = SHIPPED if AS_SHIPPED else {
    "xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False,
    "xla_cpu_parallel_codegen_split_count": 1}


def _compile(lowered, options):
  try:
    return lowered.compile(options)
  except jax.errors.JaxRuntimeError as e:  # an XLA that does not know an option
    if "compile option" not in str(e):
      raise
    return lowered.compile()


def compile_lowered_fast(lowered):
  """`lowered.compile` with FAST_COMPILE, falling back as `compile_fast` does."""
  return _compile(lowered, FAST_COMPILE)


def compile_fast(fn, *args, **options):
  """`jax.jit(fn)` compiled for `args` with FAST_COMPILE (plus `options`),
  falling back to the default options on an XLA that does not know one."""
  return _compile(jax.jit(fn).lower(*args), {**FAST_COMPILE, **options})


def compile_as_shipped(lowered):
  """`lowered.compile()` with XLA:CPU's default code generation, whatever
  XLA_FLAGS say: for the tests that read the compiled program's HLO or
  memory, which must be the program users get."""
  return _compile(lowered, SHIPPED)
