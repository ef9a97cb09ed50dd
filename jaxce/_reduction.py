"""From per-position statistics to a loss: weights, ignore_index, smoothing,
z-loss and the reduction, all on arrays without a class axis.

These run as ordinary JAX code after the custom_vjp kernels of `_stats.py`
(and of the fused linear loss), so their gradients come from autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce._collective import ClassSlice, label_weight


def reduce(
    loss: jax.Array,
    reduction: str,
    denominator: jax.Array | None = None,
    row_axes: tuple[str, ...] = (),
):
  """Applies `reduction`; "mean" divides by `denominator` (default: count).

  A zero denominator (every position ignored) gives 0.0 with zero gradient,
  not NaN: a padding-only batch must not poison training. `row_axes` are
  mesh axes (inside shard_map) over which the positions are split.
  """
  if reduction == "none":
    return loss
  total = _psum(jnp.sum(loss), row_axes)
  if reduction == "sum":
    return total
  if denominator is None:
    denominator = jnp.ones(loss.shape, loss.dtype)
  d = _psum(jnp.sum(denominator), row_axes)
  return total / jnp.where(d == 0, 1.0, d)


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def integer_target_loss(
    lse: jax.Array | None,
    picked: jax.Array,
    labels: jax.Array,
    *,
    classes: ClassSlice,
    weight: jax.Array | None,
    ignore_index: int | None,
    reduction: str,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    smoothing_sums: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    row_axes: tuple[str, ...] = (),
) -> jax.Array:
  """PyTorch's integer-target loss from per-position statistics.

  With lse=None this is `nll_loss` (`picked` holds log-probabilities);
  otherwise -log p[y] = lse - picked. `classes` says where this device's
  classes sit (all of them, outside shard_map) and `weight` is their class
  weights (None: 1). `smoothing_sums` is (sum_c w_c x_c, sum_c w_c, number of
  classes) over each position's active classes, required when
  `label_smoothing` > 0.
  """
  ct = picked.dtype
  valid = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
  w_pos = valid.astype(ct)
  w_y = label_weight(weight, classes)
  if w_y is not None:
    w_pos = jnp.where(valid, w_y.astype(ct), 0.0)
  # Positions that are ignored, or whose classes are all masked, contribute 0;
  # zeroing the statistics first keeps their gradients 0 rather than NaN.
  # (a NaN lse is kept: NaN inputs must give a NaN loss, not a silent 0)
  keep = valid if lse is None else valid & (lse != -jnp.inf)
  picked = jnp.where(keep, picked, 0.0)
  if lse is None:
    loss = -w_pos * picked
  else:
    lse = jnp.where(keep, lse, 0.0)
    loss = w_pos * (lse - picked)
    if label_smoothing:
      loss = (1.0 - label_smoothing) * loss + label_smoothing * _uniform_ce(
          lse, smoothing_sums, keep)
    if z_loss:
      loss = loss + z_loss * lse**2
  # Labels outside [0, C) that are not ignored: NaN, never a plausible number.
  bad = valid & ((labels < 0) | (labels >= classes.num_classes))
  loss = loss * jnp.where(bad, jnp.nan, 1.0).astype(ct)
  return reduce(loss, reduction, w_pos, row_axes)


def _uniform_ce(lse, smoothing_sums, keep):
  """-(1/K) sum_c w_c log p_c over the K active classes, from the sums."""
  weighted_sum, weight_sum, count = smoothing_sums
  weighted_sum = jnp.where(keep, weighted_sum, 0.0)
  return jnp.where(keep, weight_sum * lse - weighted_sum, 0.0) / jnp.maximum(count, 1.0)


def target_loss(
    lse: jax.Array,
    target_mass: jax.Array,
    target_logits: jax.Array,
    *,
    reduction: str,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    smoothing_sums: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    row_axes: tuple[str, ...] = (),
) -> jax.Array:
  """Probability-target loss -sum_c w_c q_c log p_c, q = (1 - eps) t + eps / K.

  That is (1 - eps) (target_mass * lse - target_logits) + eps * uniform CE.
  "mean" divides by the number of positions, as PyTorch does.
  """
  keep = lse != -jnp.inf
  lse = jnp.where(keep, lse, 0.0)
  loss = jnp.where(keep, target_mass * lse - jnp.where(keep, target_logits, 0.0), 0.0)
  if label_smoothing:
    loss = (1.0 - label_smoothing) * loss + label_smoothing * _uniform_ce(
        lse, smoothing_sums, keep)
  if z_loss:
    loss = loss + z_loss * lse**2
  return reduce(loss, reduction, None, row_axes)
