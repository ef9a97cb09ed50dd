"""`on_cpu`: an optimization barrier on XLA:CPU only."""

from __future__ import annotations

from typing import TypeVar

import jax

T = TypeVar("T")


def on_cpu(tree: T) -> T:
  """`tree` behind one `optimization_barrier` in a program lowered for CPU,
  as it is elsewhere: the CPU workarounds that keep XLA:CPU from sharing,
  hoisting or widening a value, which TPU and GPU programs do not need
  (decided at lowering, per platform)."""
  out: T = jax.lax.platform_dependent(
      tree, cpu=jax.lax.optimization_barrier, default=lambda t: t)
  return out
