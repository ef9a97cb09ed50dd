"""Elementwise losses over arrays whose last axis is short, on XLA:CPU."""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxce import _checks, _explicit, _stats

# The longest last axis that is flattened. float32 value_and_grad of
# `binary_cross_entropy_with_logits`, flattened against as it is, in
# interleaved rounds on the 2-core CPU machine: 0.20x the time at
# 262144 x 2, 0.59x at 131072 x 8, 0.76x at 65536 x 16, 0.97x at 16384 x 64,
# 1.00-1.02x at 8192 x 128 and 1024 x 1024, and 1.19x at 64 x 32000
# (bfloat16: 0.33, 0.71, 0.83, 0.93, 0.95, 1.11 and 0.96x).
NARROW = 64


def flat_when_narrow(
    loss: Callable[..., jax.Array], shape: tuple[int, ...], out_shape: tuple[int, ...],
    *arrays: jax.Array | None,
) -> jax.Array:
  """`loss(*arrays)`, elementwise over `shape` (each array of that shape,
  of size 1, or None), of shape `out_shape` (`shape`, or () when reduced).

  On XLA:CPU, when the last axis has at most `NARROW` entries (and is not
  the only one), the arrays go in flattened to 1-D behind an optimization
  barrier. XLA:CPU vectorizes its loops along the last axis, so on
  (N, 1) arrays they ran scalar code: value_and_grad of
  `binary_cross_entropy_with_logits` over 262144 x 1 took 6.7 ms against
  0.74 ms flattened (optax: 3.3). Without the barrier XLA moves the reshape
  back out of the loss. Size-1 arrays go in as scalars. With an array of
  another shape (a per-class `pos_weight`, say) nothing is flattened:
  broadcast behind the barrier, it would be written out at full size.
  Only in a process with one CPU device (`_stats.one_cpu_device`): with
  more, an axis other than the first may be split, and the partitioner
  all-gathers the arrays to flatten them (a (64, 16) split on its second
  axis, on an Auto mesh of 8). Nor on an Explicit mesh, even of one device
  (the reshape would need an output sharding), nor for symbolic shapes;
  other platforms keep the shape (a reshape can be a copy in tiled
  layouts).
  """
  present = [a for a in arrays if a is not None]
  if (len(shape) < 2 or not _checks.static(*shape) or shape[-1] > NARROW or 0 in shape
      or any(a.size != 1 and a.shape != shape for a in present)
      or not _stats.one_cpu_device()
      or any(_explicit.spec_of(a) is not None for a in present)):
    return loss(*arrays)

  def cpu(*arrays: jax.Array | None) -> jax.Array:
    scalars = [a is not None and a.size == 1 for a in arrays]
    flat = jax.lax.optimization_barrier(tuple(
        None if a is None or scalar else a.reshape(-1)
        for a, scalar in zip(arrays, scalars, strict=True)))
    args = [a.reshape(()) if scalar else f  # type: ignore[union-attr]  # (not None)
            for a, f, scalar in zip(arrays, flat, scalars, strict=True)]
    return loss(*args).reshape(out_shape)

  out: jax.Array = jax.lax.platform_dependent(*arrays, cpu=cpu, default=loss)
  return out
