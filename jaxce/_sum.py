"""Sums as XLA:CPU runs them fastest: `total`, and the class-axis blocks.

XLA:CPU's (YNNPACK) fused reductions run 2-2.5x slower when their initial
value is a fusion parameter rather than a constant inside the fusion, which
happens whenever the program uses the same constant elsewhere: `jnp.sum`'s
0.0 is shared by every `where(..., 0.0)`. `total` starts from -0.0 instead,
the exact additive identity (-0.0 + x == x for every x, +0.0 included) and a
constant no other op here uses, so it stays in the fusion. XLA:TPU makes the
same fusion of it as of `jnp.sum` (checked for v5e), and the compile-only
TPU/GPU tests' memory figures are unchanged. An empty sum is -0.0, which
compares equal to 0.0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _checks


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def total(a: jax.Array, axis: int | tuple[int, ...]) -> jax.Array:
  """`jnp.sum(a, axis)` of a floating array, starting from -0.0."""
  axes = (axis,) if isinstance(axis, int) else axis
  axes = tuple(d % a.ndim for d in axes)
  # A generic reducer (not `jax.lax.add`): JAX turns any zero start of an
  # add reduction back into a `reduce_sum` from 0.0.
  out: jax.Array = jax.lax.reduce(a, np.array(-0.0, a.dtype), lambda p, q: p + q, axes)
  return out


@total.defjvp
def _total_jvp(
    axis: int | tuple[int, ...], primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
  return total(primals[0], axis), jnp.sum(tangents[0], axis)


def column_total(a: jax.Array, axis: int) -> jax.Array:
  """The sum over a short `axis` (kept), for XLA:CPU: elementwise adds of
  its slices, one loop fusion vectorized across rows, where its reductions
  over rows this short run slower (`_log_softmax.row_sum`; the integer
  labels' `_stats._others_in_columns` sums its columns the same way, with
  the label's column left out)."""
  return functools.reduce(jnp.add, [
      jax.lax.index_in_dim(a, c, axis, keepdims=True) for c in range(a.shape[axis])])


def block_shape(shape: tuple[int, ...], axis: int, block: int) -> tuple[int, ...]:
  """`shape` with the class axis split into (C // block, block): a free reshape."""
  return (*shape[:axis], shape[axis] // block, block, *shape[axis + 1:])


def block_size(num_classes: int) -> int | None:
  """The block length of two-stage sums over C classes (`_stats.
  _others_in_blocks`, `_log_softmax.shifted_stats`): a divisor of C in
  [64, 2048] with at least 4 blocks, closest to 2 sqrt(C) (the label's
  gathered block and the per-block sums stay a few percent of the logits);
  None if C has none, or is symbolic (`jax.export`)."""
  if not _checks.static(num_classes):
    return None
  target = 2.0 * num_classes**0.5
  sizes = [b for b in range(64, min(2048, num_classes // 4) + 1) if num_classes % b == 0]
  return min(sizes, key=lambda b: abs(math.log(b / target)), default=None)


def blocked_total(a: jax.Array, axis: int) -> jax.Array:
  """The sum over `axis` of the class-axis block view `a` (split at `axis`,
  `axis + 1`; see `block_shape`), for XLA:CPU: each block's sum, then a
  matrix-vector product with ones across the blocks. As two reductions,
  XLA:CPU fuses them into one (YNNPACK) kernel whose time depends on the
  block count by up to 6x (exp-sums at 512 x 65536, float32: 8-50 ms for
  blocks of 256-1024 and 94 ms flat; with the product, 10 ms at each;
  4096 x 65536: 419 against 69 ms). The product accumulates in float32
  (`Precision.HIGHEST`), as the reductions do."""
  partial = total(a, axis + 1)
  ones = jnp.ones((partial.shape[axis],), partial.dtype)
  out: jax.Array = jax.lax.dot_general(
      partial, ones, (((axis,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
  return out
