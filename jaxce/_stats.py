"""Per-position statistics of logits, each a lean `jax.custom_vjp`.

Every loss over a class axis is a cheap function of a few per-position numbers
(the logsumexp, the logit at the label, a weighted sum of logits). These
kernels compute those numbers in two reading passes over the logits (the max,
then the sums) and differentiate them in one elementwise pass, so the losses
built on them (see `_reduction.py`) get exact gradients for weights, label
smoothing, z-loss and reductions from ordinary autodiff on arrays without a
class axis.

What each backward keeps (`*Residuals` below): the inputs as given (the caller
holds them anyway) and a per-position float32 logsumexp. No softmax, no
float32 copy of the logits and no one-hot matrix is saved.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _checks
from jaxce._collective import match_vma
from jaxce._log_softmax import logsumexp_near, masked, softmax_from_lse, stable_logsumexp


def one_hot_at(labels: jax.Array, shape, axis: int) -> jax.Array:
  """Boolean mask of `shape`, true where the class index equals the label.

  Labels outside [0, C) match nothing. Used by the backward passes: an iota
  comparison (rather than a scatter) keeps them elementwise, one fused pass
  that also works on logits sharded over the class axis.
  """
  iota = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
  return iota == jnp.expand_dims(labels.astype(jnp.int32), axis)


def take_at(x: jax.Array, labels: jax.Array, axis: int) -> jax.Array:
  """x at the label along `axis`; 0 for labels outside [0, C).

  A gather: on CPU a masked sum over the class axis is not fused into the
  reduction and would materialize an N x C temporary.
  """
  num_classes = x.shape[axis]
  inside = (labels >= 0) & (labels < num_classes)
  idx = jnp.expand_dims(jnp.where(inside, labels, 0), axis)
  picked = jnp.squeeze(jnp.take_along_axis(x, idx, axis, mode="clip"), axis)
  return jnp.where(inside, picked, jnp.zeros((), x.dtype))


def _per_class_along(weight, axis, x):
  """Class weights shaped to broadcast against `x` along `axis`, in its dtype."""
  if weight is None:
    return jnp.ones((1,) * x.ndim, x.dtype)
  return _checks.expand_to_axis(weight.astype(x.dtype), axis, x.ndim)


def _sum_to_class(x, axis):
  return jnp.sum(x, tuple(a for a in range(x.ndim) if a != axis))


def _finite_part(x):
  """x where it is above -inf, else 0: products with it stay finite, so a
  masked class adds no 0 * -inf = NaN to higher-order derivatives."""
  return jnp.where(x > -jnp.inf, x, 0.0)


def _smoothing_sums(x, w, axis):
  """(sum_c w_c x_c, sum_c w_c, count) over the active classes (x > -inf)."""
  active = x > -jnp.inf
  return (
      jnp.sum(jnp.where(active, w * _finite_part(x), 0.0), axis),
      jnp.sum(jnp.where(active, w, 0.0), axis),
      jnp.sum(active, axis, dtype=x.dtype),
  )


def _smoothing_sums_bwd(x, w, g, col):
  """Cotangents of `_smoothing_sums` for x and (unreduced) for w."""
  active = x > -jnp.inf
  dx = jnp.where(active, w * col(g.weighted_sum), 0.0)
  dw = jnp.where(active, _finite_part(x) * col(g.weighted_sum) + col(g.weight_sum), 0.0)
  return dx, dw


# ---------------------------------------------------------------------------
# Integer labels: lse, logit at the label, and label-smoothing sums.


class LabelStats(NamedTuple):
  lse: jax.Array  # logsumexp over the active classes (-inf if none)
  picked: jax.Array  # logit at the label; 0 for labels outside [0, C)
  weighted_sum: jax.Array | None  # sum_c w_c x_c over active classes
  weight_sum: jax.Array | None  # sum_c w_c over active classes
  count: jax.Array | None  # number of active classes


class LabelResiduals(NamedTuple):
  logits: jax.Array
  labels: jax.Array
  weight: jax.Array | None  # only when smoothing
  where: jax.Array | None
  lse: jax.Array  # float32 per position, class axis kept


def label_stats(logits, labels, weight, where, axis: int, smoothing: bool):
  """Per-position statistics for integer-target losses.

  Active classes are those inside `where` with a logit above -inf. The three
  smoothing sums are only computed (and only `weight` is only used) when
  `smoothing` is true; otherwise they are None.
  """
  return _label_stats(logits, labels, weight, where, axis, smoothing)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _label_stats(logits, labels, weight, where, axis, smoothing):
  return _label_stats_fwd(logits, labels, weight, where, axis, smoothing)[0]


def _label_stats_fwd(logits, labels, weight, where, axis, smoothing):
  # Gathered from the input dtype: exact, and no upcast copy to gather from.
  picked = take_at(masked(logits, where), labels, axis)
  lse = logsumexp_near(masked(logits, where), jnp.expand_dims(picked, axis), axis)
  picked = picked.astype(lse.dtype)
  x = masked(logits.astype(lse.dtype), where)
  sums = _smoothing_sums(x, _per_class_along(weight, axis, x), axis) if smoothing else (None,) * 3
  stats = LabelStats(jnp.squeeze(lse, axis), picked, *sums)
  return stats, LabelResiduals(logits, labels, weight, where, lse)


def _label_stats_bwd(axis, smoothing, res, g):
  ct = res.lse.dtype
  x = masked(res.logits.astype(ct), res.where)
  hot = one_hot_at(res.labels, x.shape, axis)
  col = lambda v: jnp.expand_dims(v.astype(ct), axis)
  dx = col(g.lse) * softmax_from_lse(x, res.lse) + jnp.where(hot, col(g.picked), 0.0)
  dweight = None
  if smoothing:
    dx_s, dw = _smoothing_sums_bwd(x, _per_class_along(res.weight, axis, x), g, col)
    dx = dx + dx_s
    if res.weight is not None:
      dweight = match_vma(_sum_to_class(dw, axis).astype(res.weight.dtype), res.weight)
  return dx.astype(res.logits.dtype), None, dweight, None


_label_stats.defvjp(_label_stats_fwd, _label_stats_bwd)


# ---------------------------------------------------------------------------
# Probability targets: lse, target-weighted sums, and label-smoothing sums.


class TargetStats(NamedTuple):
  lse: jax.Array  # logsumexp over the classes inside `where` (-inf if none)
  target_mass: jax.Array  # sum_c w_c t_c over classes inside `where`
  target_logits: jax.Array  # sum_c w_c t_c x_c (0 * -inf counts as 0)
  weighted_sum: jax.Array | None  # as in LabelStats (smoothing only)
  weight_sum: jax.Array | None
  count: jax.Array | None


class TargetResiduals(NamedTuple):
  logits: jax.Array
  targets: jax.Array
  weight: jax.Array | None
  where: jax.Array | None
  lse: jax.Array  # float32 per position, class axis kept


def target_stats(logits, targets, weight, where, axis: int, smoothing: bool):
  """Per-position statistics for probability-target losses.

  Classes outside `where` are left out of every sum. The smoothing sums run
  over the active classes (inside `where`, logit above -inf), as in
  `label_stats`. Target mass on a -inf logit makes `target_logits` -inf, so
  the loss is +inf, as it should be.
  """
  return _target_stats(logits, targets, weight, where, axis, smoothing)


def _in_mask(v, where):
  return v if where is None else jnp.where(where, v, 0.0)


def _logits_times_targets(x, t, where):
  """x where it meets target mass; 0 for classes outside `where` and where
  t == 0 meets x == -inf, so no 0 * -inf = NaN reaches any derivative."""
  drop = (t == 0) & (x == -jnp.inf)
  if where is not None:
    drop = drop | ~where
  return jnp.where(drop, 0.0, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _target_stats(logits, targets, weight, where, axis, smoothing):
  return _target_stats_fwd(logits, targets, weight, where, axis, smoothing)[0]


def _target_stats_fwd(logits, targets, weight, where, axis, smoothing):
  lse = stable_logsumexp(masked(logits, where), axis)
  x = masked(logits.astype(lse.dtype), where)
  t = targets.astype(lse.dtype)
  w = _per_class_along(weight, axis, x)
  stats = TargetStats(
      jnp.squeeze(lse, axis),
      jnp.sum(_in_mask(w * t, where), axis),
      jnp.sum(_in_mask(w * t * _logits_times_targets(x, t, where), where), axis),
      *(_smoothing_sums(x, w, axis) if smoothing else (None,) * 3),
  )
  return stats, TargetResiduals(logits, targets, weight, where, lse)


def _target_stats_bwd(axis, smoothing, res, g):
  ct = res.lse.dtype
  x = masked(res.logits.astype(ct), res.where)
  t = res.targets.astype(ct)
  col = lambda v: jnp.expand_dims(v.astype(ct), axis)
  w = _per_class_along(res.weight, axis, x)
  xt = _logits_times_targets(x, t, res.where)
  dx = col(g.lse) * softmax_from_lse(x, res.lse) + _in_mask(w * t * col(g.target_logits), res.where)
  # d/dt_c of (target_mass, target_logits) is w_c * (g_mass + g_logits * x_c).
  dt = _in_mask(w * (col(g.target_mass) + col(g.target_logits) * xt), res.where)
  dw = _in_mask(t * (col(g.target_mass) + col(g.target_logits) * xt), res.where)
  if smoothing:
    dx_s, dw_s = _smoothing_sums_bwd(x, w, g, col)
    dx, dw = dx + dx_s, dw + dw_s
  dweight = None
  if res.weight is not None:
    dweight = match_vma(_sum_to_class(dw, axis).astype(res.weight.dtype), res.weight)
  return dx.astype(res.logits.dtype), dt.astype(res.targets.dtype), dweight, None


_target_stats.defvjp(_target_stats_fwd, _target_stats_bwd)


# ---------------------------------------------------------------------------
# Log-probabilities: the entry at the label (NLL).


class PickResiduals(NamedTuple):
  labels: jax.Array  # all the backward needs, besides static shape and dtype


def pick(x, labels, axis: int):
  """x at the label along `axis` (0 for labels outside [0, C)), in float32+."""
  return _pick(x, labels, axis, x.shape, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pick(x, labels, axis, shape, dtype):
  return _pick_fwd(x, labels, axis, shape, dtype)[0]


def _pick_fwd(x, labels, axis, shape, dtype):
  out = take_at(x, labels, axis).astype(_checks.compute_dtype(dtype))
  return out, PickResiduals(labels)


def _pick_bwd(axis, shape, dtype, res, g):
  hot = one_hot_at(res.labels, shape, axis)
  return jnp.where(hot, jnp.expand_dims(g, axis), 0.0).astype(dtype), None


_pick.defvjp(_pick_fwd, _pick_bwd)
