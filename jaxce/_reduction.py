"""From per-position statistics to a loss: weights, ignore_index, smoothing,
z-loss and the reduction, all on arrays without a class axis.

These run as ordinary JAX code after the custom_jvp kernels of `_stats.py`
(and of the fused linear loss), so their derivatives come from autodiff.
Every loss is formed from differences relative to the per-position shift
(``log_sum - picked``, ``picked = x_y - shift <= 0``), never as the
difference of two large logsumexp-sized numbers.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxce._collective import ClassSlice, label_weight
from jaxce._stats import LabelStats, SmoothingSums, TargetStats, derivative_of

T = TypeVar("T")


def reduce(
    loss: jax.Array,
    reduction: str,
    denominator: jax.Array | None = None,
    row_axes: tuple[str, ...] = (),
    *,
    binary: bool = False,
    present: jax.Array | None = None,
) -> jax.Array:
  """Applies `reduction`; "mean" divides by `denominator` (default: count).

  "mean" divides by the sum of `denominator` even when it is zero (weights
  that cancel give +-inf or NaN, as PyTorch does), except when every entry
  of `denominator` is zero (every position ignored or of zero weight, or no
  position at all): then 0.0 with zero gradient, so a padding-only batch
  cannot poison training. `binary`: every entry of `denominator` is 0 or 1,
  so its sum is 0 only when all are. `present` marks positions that are not
  "nothing" even at weight 0 (labels outside [0, C), whose loss is NaN).
  `row_axes` are mesh axes (inside shard_map) over which the positions are
  split.
  """
  if reduction == "none":
    return loss
  if reduction == "sum":
    return _psum(jnp.sum(loss), row_axes)
  if denominator is None:
    total_loss = _psum(jnp.sum(loss), row_axes)
    d = _psum(jnp.sum(jnp.ones_like(loss)), row_axes)
    nothing = d == 0
    return jnp.where(nothing, 0.0, total_loss / jnp.where(nothing, 1.0, d))
  counted = None
  if not binary:
    counted = denominator != 0 if present is None else (denominator != 0) | present
  out: jax.Array = _weighted_mean(loss, denominator.astype(loss.dtype), counted, row_axes)
  return out


def _weighted_sums(
    loss: jax.Array, weights: jax.Array, counted: jax.Array | None, row_axes: tuple[str, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of loss, sum of weights, whether nothing counts) in one stacked
  reduction (and one psum) rather than one per sum: on small and short-row
  inputs each separate per-position pass costs as much as the sums
  themselves (a kernel launch on GPU, a thunk on CPU). Without `counted`,
  every weight is 0 or 1."""
  parts = [loss, weights]
  if counted is not None:
    parts.append(counted.astype(loss.dtype))  # exact 0 iff all 0
  sums = _psum(jnp.sum(jnp.stack(parts), tuple(range(1, loss.ndim + 1))), row_axes)
  return sums[0], sums[1], sums[-1] == 0


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _weighted_mean(
    loss: jax.Array, weights: jax.Array, counted: jax.Array | None, row_axes: tuple[str, ...]
) -> jax.Array:
  """sum(loss) / sum(weights), 0 where nothing counts (see `reduce`)."""
  total, d, nothing = _weighted_sums(loss, weights, counted, row_axes)
  return jnp.where(nothing, 0.0, total / jnp.where(nothing, 1.0, d))


@functools.partial(_weighted_mean.defjvp, symbolic_zeros=True)
def _weighted_mean_jvp(
    row_axes: tuple[str, ...], primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
  # The weights' term only where they have a tangent: through the stacked
  # sum, autodiff gave their sum a zero tangent, and an infinite mean (a
  # label on a -inf logit) times that zero made the whole tangent NaN where
  # reverse mode's gradient was finite. The mean through this rule again,
  # for the same reason at the second order (forward over forward).
  loss, weights, counted = primals
  t_loss, t_weights, _ = tangents
  mean = _weighted_mean(loss, weights, counted, row_axes)
  _, d, nothing = _weighted_sums(loss, weights, counted, row_axes)
  d = jnp.where(nothing, 1.0, d)
  t = jnp.zeros_like(mean)
  if not isinstance(t_loss, SymbolicZero):
    t = t + _psum(jnp.sum(t_loss), row_axes)
  if not isinstance(t_weights, SymbolicZero):
    t = t - mean * _psum(jnp.sum(t_weights), row_axes)
  return mean, jnp.where(nothing, 0.0, t / d)


def _psum(x: T, axes: tuple[str, ...]) -> T:
  if not axes:
    return x
  out: T = jax.lax.psum(x, axes)
  return out


def integer_target_loss(
    stats: LabelStats,
    labels: jax.Array,
    *,
    classes: ClassSlice,
    weight: jax.Array | None,
    ignore_index: int | None,
    reduction: str,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    row_axes: tuple[str, ...] = (),
) -> jax.Array:
  """PyTorch's integer-target loss from per-position statistics.

  -log p[y] = log_sum - picked. With ``stats.log_sum`` None this is
  `nll_loss` (`picked` holds log-probabilities). `classes` says where this
  device's classes sit (all of them, outside shard_map) and `weight` is their
  class weights (None: 1). ``stats.smoothing`` is required when
  `label_smoothing` > 0. `labels` and `ignore_index` are as
  `_checks.class_labels` returns them (int32 codes, compared without
  wrap-around).
  """
  picked = stats.picked
  ct = picked.dtype
  # (`ones_like`: sharded as the labels, which an Explicit mesh requires)
  valid = jnp.ones_like(labels, bool) if ignore_index is None else labels != ignore_index
  # Labels outside [0, C) that are not ignored: NaN, never a plausible number.
  bad = valid & ((labels < 0) | (labels >= classes.num_classes))
  nan_at_bad = jnp.where(bad, jnp.nan, 1.0).astype(ct)
  w_pos = valid.astype(ct)
  w_y = label_weight(weight, classes)
  if w_y is not None:
    # A class that does not exist has no weight: 0 (whichever device, or
    # clipped index, would have supplied one), so that the other positions'
    # gradients do not depend on the sharding; `reduce` still counts such a
    # position, so that its NaN is not taken for an all-ignored batch.
    w_pos = jnp.where(valid & ~bad, w_y.astype(ct), 0.0)
  # Positions that are ignored, or whose classes are all masked, contribute 0;
  # zeroing the statistics first keeps their gradients 0 rather than NaN.
  # (a NaN log_sum is kept: NaN inputs must give a NaN loss, not a silent 0)
  keep = valid if stats.log_sum is None else valid & (stats.log_sum != -jnp.inf)
  picked = jnp.where(keep, picked, 0.0)
  if stats.log_sum is None:
    loss = w_pos * (0.0 - picked) * nan_at_bad  # (not -w * p: +0.0 at ignored positions)
  else:
    log_sum = jnp.where(keep, stats.log_sum, 0.0)
    # Class weights with smoothing: nll's derivative taken as log_sum's and
    # picked's (equal on kept rows), which the smoothing's term shares.
    weighted_smoothing = stats.nll is not None and w_y is not None and bool(label_smoothing)
    if stats.nll is None:
      loss = w_pos * (log_sum - picked) * nan_at_bad
    elif weighted_smoothing:
      loss = w_pos * _nll_through_log_sum(stats.nll, stats.log_sum, picked, keep, bad)
    else:
      # Already 0 where not kept and NaN at bad labels: unweighted, the loss
      # is the statistic itself, and its cotangent one scalar.
      loss = stats.nll if w_y is None else w_pos * stats.nll
    if label_smoothing:
      assert stats.smoothing is not None
      smoothed = (1.0 - label_smoothing) * loss + label_smoothing * _uniform_ce(
          log_sum, stats.smoothing, keep)
      if stats.nll is not None and w_y is None:
        smoothed = _smoothed_through_nll(smoothed, stats.nll, picked, stats.smoothing, keep,
                                         label_smoothing)
      loss = smoothed
    if z_loss:
      ls = log_sum if stats.nll is None or weighted_smoothing else _log_sum_through_nll(
          log_sum, stats.nll, picked, keep)
      loss = loss + z_loss * jnp.where(keep, stats.shift + ls, 0.0) ** 2
  return reduce(loss, reduction, w_pos, row_axes, binary=w_y is None,
                present=None if w_y is None else bad)


def _log_sum_through_nll(
    log_sum: jax.Array, nll: jax.Array, picked: jax.Array, keep: jax.Array
) -> jax.Array:
  """`log_sum`, differentiated as nll + picked (equal on kept rows; nll and
  its derivative are 0 elsewhere), so that the gradient takes one exp, the
  nll's (see `_smoothed_through_nll`)."""
  return jax.lax.stop_gradient(log_sum) + derivative_of(nll) + jnp.where(
      keep, derivative_of(picked), 0.0)


def _nll_through_log_sum(
    nll: jax.Array, log_sum: jax.Array, picked: jax.Array, keep: jax.Array, bad: jax.Array,
) -> jax.Array:
  """`nll`, differentiated as log_sum - picked (the reverse of
  `_log_sum_through_nll`), for class weights with label smoothing: the
  label's term then has a per-row cotangent (w_y) and the smoothing's adds
  one to log_sum, and this way the gradient is p * a - [c = y] b - w_c
  [active] d with one exp, where through nll it took a second exp or a
  seventh per-row operand: on a v5p chip (float32, N=2048, D=512, C=32768)
  and a v5e chip (bfloat16) XLA:TPU wrote that gradient out (385 against
  optax's 256 MiB, 257 against 128). `log_sum` is the statistic before
  masking: on `bad` rows (labels outside [0, C)) the derivative is NaN, as
  nll's own is, also on rows with no active class (through log_sum's
  derivative there, as nll's)."""
  routed = (jnp.where(keep | bad, derivative_of(log_sum), 0.0)
            - jnp.where(keep, derivative_of(picked), 0.0))
  return jax.lax.stop_gradient(nll) + routed * jnp.where(bad, jnp.nan, 1.0).astype(nll.dtype)


def _smoothed_through_nll(
    smoothed: jax.Array, nll: jax.Array, picked: jax.Array, sums: SmoothingSums,
    keep: jax.Array, eps: float,
) -> jax.Array:
  """`smoothed` (unweighted), differentiated as nll + eps (picked - mean_c
  (x_c - shift)), the same function on kept rows (log_sum = nll + picked;
  elsewhere nll and the smoothing are 0). Then log_sum has no cotangent, so
  the gradient takes one exp, the nll's: through log_sum it took a second,
  and on a v5p chip (float32, N=2048, D=512, C=32768, through `h @ W`)
  XLA:TPU wrote that gradient out rather than fuse it into the matmuls (385
  against optax's 256 MiB of temp). The value stays `smoothed`'s, exact
  also where the sum would lose digits (eps near 1) or be inf - inf (a
  label at a -inf logit)."""
  mean = sums.weighted_sum / _active_classes(sums, keep)
  routed = derivative_of(nll) + eps * jnp.where(
      keep, derivative_of(picked) - derivative_of(mean), 0.0)
  return jax.lax.stop_gradient(smoothed) + routed


def _uniform_ce(log_sum: jax.Array, sums: SmoothingSums, keep: jax.Array) -> jax.Array:
  """-(1/K) sum_c w_c log p_c over the K active classes, from the sums:
  (sum_c w_c) log_sum - sum_c w_c (x_c - shift), two non-negative terms."""
  weighted_sum = jnp.where(keep, sums.weighted_sum, 0.0)
  return jnp.where(keep, sums.weight_sum * log_sum - weighted_sum, 0.0) / _active_classes(
      sums, keep)


def _active_classes(sums: SmoothingSums, keep: jax.Array) -> jax.Array:
  """K, at least 1; 1 on rows not kept, where a NaN or +inf logit can make
  the count NaN (XLA:CPU's arithmetic count), and 0 / NaN gave an ignored
  row a NaN loss (PyTorch: 0)."""
  return jnp.where(keep, jnp.maximum(sums.num_active, 1.0), 1.0)


def _target_ce(mass: jax.Array, log_sum: jax.Array, target_logits: jax.Array, keep: jax.Array
               ) -> jax.Array:
  """mass * log_sum - target_logits per row; a row with no active class
  (`keep` false) has only the second term: 0, or +inf when target mass sits
  on its -inf logits, as on any row with target mass on a -inf logit (the
  sum over log_softmax's all -inf row is +inf only with mass on every class:
  0 * -inf is NaN).

  `target_logits` is not masked, so its cotangent is one scalar and the
  gradient's fusion has two per-row operands, which XLA:TPU fuses into the
  matmuls that consume it (with a third it writes the gradient out).
  """
  return jnp.where(keep, mass * log_sum, 0.0) - target_logits


def _cpu_target_ce(mass: jax.Array, log_sum: jax.Array, target_logits: jax.Array,
                   keep: jax.Array) -> jax.Array:
  """`_target_ce` for XLA:CPU, the same values through a select: fed to the
  loss's sum unmasked, `target_logits`' row sums are fused into it, and
  value_and_grad took 1.07-1.12x the previous loss's time at float32
  16384 x 100, 65536 x 10 and 4096 x 1024 (this select: 0.99-1.02x)."""
  return jnp.where(keep, mass * log_sum - target_logits, -target_logits)


def target_loss(
    stats: TargetStats,
    *,
    reduction: str,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    row_axes: tuple[str, ...] = (),
) -> jax.Array:
  """Probability-target loss -sum_c w_c q_c log p_c, q = (1 - eps) t + eps / K.

  That is (1 - eps) (target_mass * log_sum - target_logits) + eps * uniform
  CE, two non-negative terms for non-negative targets. "mean" divides by the
  number of positions, as PyTorch does.
  """
  keep = stats.log_sum != -jnp.inf
  log_sum = jnp.where(keep, stats.log_sum, 0.0)
  loss: jax.Array = jax.lax.platform_dependent(
      stats.target_mass, log_sum, stats.target_logits, keep, cpu=_cpu_target_ce, default=_target_ce)
  if label_smoothing:
    assert stats.smoothing is not None
    uniform = _uniform_ce(log_sum, stats.smoothing, keep)
    # At eps = 1 the targets take no part (q = 1 / K): not 0 * their term,
    # which is NaN where target mass sits on a -inf logit.
    loss = uniform if label_smoothing == 1.0 else (
        (1.0 - label_smoothing) * loss + label_smoothing * uniform)
  if z_loss:
    loss = loss + z_loss * jnp.where(keep, stats.shift + log_sum, 0.0) ** 2
  return reduce(loss, reduction, None, row_axes)
