"""What the host CPU can do, where XLA:CPU's speed depends on it and the
compiled program cannot tell (its matmul library picks kernels at run time).
XLA:CPU compiles for the host it runs on, so the host is the CPU a program
lowered for CPU targets."""

from __future__ import annotations

import functools

import jax.numpy as jnp

# x86 CPU flags of bfloat16 dot-product instructions (Linux /proc/cpuinfo).
_BF16_DOT_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_has_bf16_dot() -> bool:
  """Whether this machine's CPU has bfloat16 dot-product instructions. Read
  from /proc/cpuinfo once; False where that is missing (not Linux) or names
  no such flag, e.g. on ARM, where it was not measured."""
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      return bf16_dot_in_cpuinfo(f.read())
  except OSError:
    return False


def bf16_dot_in_cpuinfo(text: str) -> bool:
  """Whether a /proc/cpuinfo text lists a bfloat16 dot-product flag."""
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "flags" and _BF16_DOT_FLAGS & set(value.split()):
      return True
  return False


def native_bf16_dot(dtype: object) -> bool:
  """Whether XLA:CPU on this host multiplies `dtype` operands with native
  instructions: bfloat16 on a CPU with bfloat16 dot instructions. Elsewhere
  16-bit matmuls are the slow ones, and jaxce's fused loss widens them."""
  return dtype == jnp.bfloat16 and cpu_has_bf16_dot()
