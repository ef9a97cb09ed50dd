"""`log_softmax` and `logsumexp`, and the shifted log-sum every loss shares.

Every softmax here is computed from two per-row numbers: a `shift` (the row
max, outside autodiff) and ``log_sum = log sum exp(x - shift)``, both in
float32 (float64 for float64 input). Keeping them apart, rather than adding
them into one logsumexp, keeps differences such as ``log p = (x - shift) -
log_sum`` exact for logits far from 0.

Both public functions are `jax.custom_jvp`s. Their tangent rules recompute
the softmax from (x, shift, log_sum) inside
``jax.checkpoint(policy=nothing_saveable)``, so reverse mode (JAX transposes
the tangent rule) saves only the input and the two per-row numbers, and
forward mode, reverse-over-forward and higher orders work as for any JAX
function.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxce import _checks, _dispatch, _explicit
from jaxce._barrier import on_cpu
from jaxce._sum import block_shape, block_size, blocked_total, column_total, total

Axes = tuple[int, ...]
F = TypeVar("F", bound=Callable[..., Any])


def remat(*static_argnums: int) -> Callable[[F], F]:
  """`jax.checkpoint` of a tangent rule: reverse mode recomputes everything
  it computes from its inputs (the softmax, the one-hot) instead of saving
  it. Common subexpressions with the forward pass are kept apart by an
  `optimization_barrier` on the per-row statistics inside each rule, not on
  every input (`prevent_cse`): a barrier on the logits would force
  half-precision logits that XLA computes on the fly (e.g. the converted
  output of a float32 matmul) to be materialized."""
  return cast(Callable[[F], F], functools.partial(
      jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False,
      static_argnums=static_argnums))


def masked(x: jax.Array, where: jax.Array | None) -> jax.Array:
  """Classes outside `where` become -inf: they take no part in the softmax."""
  return x if where is None else jnp.where(where, x, -jnp.inf)


def row_shift(x: jax.Array, axes: Axes) -> jax.Array:
  """The max over `axes` (kept) of a masked array, in float32+, outside
  autodiff; 0 where it is not finite (no finite entry, or +inf / NaN).

  The conversion of half-precision input is fused into the reduction (no
  float32 copy is made); `initial` makes empty axes give 0.
  """
  m = _row_max(x, axes)
  return jnp.where(jnp.isfinite(m), m, 0.0)


def _row_max(x: jax.Array, axes: Axes) -> jax.Array:
  x = x.astype(_checks.compute_dtype(x.dtype))
  return jax.lax.stop_gradient(jnp.max(x, axes, keepdims=True, initial=-jnp.inf))


def log_sum(x: jax.Array, shift: jax.Array, axes: Axes) -> jax.Array:
  """log sum exp(x - shift) over `axes` (kept), in `shift`'s dtype: -inf for
  a row with no entry above -inf, with finite (zero) derivatives there."""
  return log_of_sum(jnp.expand_dims(total(jnp.exp(x.astype(shift.dtype) - shift), axes), axes))


def log_of_sum(s: jax.Array) -> jax.Array:
  """log of a sum of exps: -inf for 0, with finite (zero) derivatives."""
  return jnp.where(s == 0, -jnp.inf, jnp.log(jnp.where(s == 0, 1.0, s)))


def probs(x: jax.Array, shift: jax.Array, log_sum: jax.Array) -> jax.Array:
  """exp((x - shift) - log_sum) in `shift`'s dtype: the softmax, 0 (not NaN)
  on rows whose log_sum is -inf."""
  ls = jnp.where(log_sum == -jnp.inf, jnp.inf, log_sum)
  return jnp.exp((x.astype(shift.dtype) - shift) - ls)


def tangent_probs(x: jax.Array, shift: jax.Array, log_sum: jax.Array) -> jax.Array:
  """`probs` for the tangent rules: `accelerator_probs` on TPU and GPU."""
  if jnp.dtype(x.dtype).itemsize >= 4:
    return probs(x, shift, log_sum)
  out: jax.Array = jax.lax.platform_dependent(
      x, shift, log_sum, cpu=probs, default=accelerator_probs)
  return out


def accelerator_probs(x: jax.Array, shift: jax.Array, log_sum: jax.Array) -> jax.Array:
  """`probs`, for half-precision `x` with one offset: exp(x - (shift +
  log_sum)). A gradient fusion then has one per-row operand fewer, which
  decides whether XLA:TPU fuses it into the matmuls that consume it (see
  `_stats._label_terms`). The offset's float32 rounding, 2**-24 of |lse|,
  is 2**-15 of what half an ulp of bfloat16 logits changes."""
  if jnp.dtype(x.dtype).itemsize >= 4:
    return probs(x, shift, log_sum)
  ls = jnp.where(log_sum == -jnp.inf, jnp.inf, log_sum)
  return jnp.exp(x.astype(shift.dtype) - (shift + ls))


def shifted_stats(
    x: jax.Array, axes: Axes, plain: bool = False
) -> tuple[jax.Array, jax.Array]:
  """(shift, log_sum) of a masked array, axes kept.

  On CPU, rows longer than `LONG_ROW` are reduced in two stages over a free
  reshape into blocks (`block_size`): XLA:CPU's reductions over such rows
  run 1.6-5x slower than over the blocks and then across them.

  `plain`: without a select (`_plain_shift`, `_plain_log`), for
  `log_softmax`. A row with no entry above -inf then has shift -finfo.max
  and a finite log_sum (log of the smallest normal number) rather than 0
  and -inf, and (x - shift) - log_sum is -inf there all the same.
  """
  block = block_size(x.shape[axes[0]]) if len(axes) == 1 else None
  if block is not None and long_row(x.shape[axes[0]]):
    out: tuple[jax.Array, jax.Array] = jax.lax.platform_dependent(
        x, cpu=functools.partial(_blocked_stats, axes[0], block, plain),
        default=functools.partial(_flat_stats, axes, plain))
    return out
  return _flat_stats(axes, plain, x)


LONG_ROW = 32768


def long_row(num_classes: Any) -> bool:
  """Whether a class count is known and above `LONG_ROW` (a symbolic one,
  under `jax.export`, takes the one-stage path)."""
  return _checks.static(num_classes) and num_classes > LONG_ROW


def _flat_stats(axes: Axes, plain: bool, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  if not plain:
    shift = row_shift(x, axes)
    return shift, log_sum(x, shift, axes)
  shift = _plain_shift(_row_max(x, axes))
  row = math.prod(x.shape[a] for a in axes)
  apart = _sum_shift(shift) if _checks.static(row) and row >= APART_ROW else shift
  return shift, _plain_log(total(jnp.exp(x.astype(shift.dtype) - apart), axes), axes)


def row_sum(a: jax.Array, axes: Axes, dtype: Any) -> jax.Array:
  """`jnp.sum(a, axes, keepdims=True)` in the tangent rule of an input of
  `dtype`: on CPU, for at least `COLUMN_ROWS` float32+ rows of at most
  `COLUMN_ROW` entries, by columns (`column_total`)."""
  if (len(axes) == 1 and _checks.static(*a.shape) and 1 <= a.shape[axes[0]] <= COLUMN_ROW
      and a.size >= COLUMN_ROWS * a.shape[axes[0]] and jnp.dtype(dtype).itemsize >= 4):
    out: jax.Array = jax.lax.platform_dependent(
        a, cpu=functools.partial(column_total, axis=axes[0]),
        default=lambda a: jnp.sum(a, axes, keepdims=True))
    return out
  return jnp.sum(a, axes, keepdims=True)


# `log_softmax`'s float32 tangent sums rows of at most COLUMN_ROW entries by
# columns on CPU where there are at least COLUMN_ROWS rows, and reverse mode
# (its transpose) then broadcasts the cotangent's row sum back by columns:
# XLA:CPU makes the gradient a loop fusion rather than a YNNPACK one that
# reduces and broadcasts inside. value_and_grad against the row reduction
# (`benchmarks/against_commit.py`, 15-25 rounds, AVX2): 0.81-0.95x the time
# at 4096 and 16384 x 10, 0.87-0.94x at 65536 x 10 (three runs), 0.70-0.82x
# at 65536 x 2 and 4, and with `where` at 65536 x 10 0.77-0.80x, with 3.0
# MiB of temp memory against 5.5. Not taken: 1024 rows (1.29x), 12 to 32
# classes (1.29-2.5x), bfloat16 (1.54x at 65536 x 10); the forward's max
# and exp-sum by columns too (its output, consumed in the same program, was
# written out three times: 7.5 MiB of temp at 65536 x 10, against none).
COLUMN_ROW = 10
COLUMN_ROWS = 4096


def _sum_shift(shift: jax.Array) -> jax.Array:
  """The shift of `log_softmax`'s exp-sum, on CPU behind an optimization
  barrier: XLA's CSE otherwise shares x - shift with the output's, and where
  a consumer of the output also sums it (sum(log_softmax(x) * t)), XLA:CPU's
  YNNPACK fusions took it as a written-out N x C array (value_and_grad at
  2048 x 1024, float32: 8 MiB of temp memory, now 0.03). Elsewhere the plain
  shift: XLA:GPU fuses max, exp-sum and output into one softmax kernel."""
  return on_cpu(shift)


# Rows of at least this many entries take `_sum_shift`'s barrier: at 65536 x
# 10 it cost 5% of value_and_grad's time (XLA:CPU wrote nothing out there).
APART_ROW = 64


def _blocked_stats(
    axis: int, block: int, plain: bool, x: jax.Array
) -> tuple[jax.Array, jax.Array]:
  # One view for the max and the sums: XLA:CPU converts half-precision
  # input to a float32 copy per view.
  xb = x.reshape(block_shape(x.shape, axis, block))
  shift = _plain_shift(_row_max(xb, (axis, axis + 1))) if plain else row_shift(
      xb, (axis, axis + 1))
  s = blocked_total(jnp.exp(xb.astype(shift.dtype) - shift), axis)
  if plain:
    return jnp.squeeze(shift, axis + 1), _plain_log(s, (axis,))
  return jnp.squeeze(shift, axis + 1), log_of_sum(jnp.expand_dims(s, axis))


def _plain_shift(m: jax.Array) -> jax.Array:
  """The row max `m` as a shift, -finfo.max for -inf (a row with no entry),
  so that x - shift is never -inf - -inf. max(), not `row_shift`'s select:
  XLA:CPU fuses no select into its (YNNPACK) fusions. +inf and NaN stay,
  and make the row NaN (as in jax.nn and PyTorch). (No upper clamp: XLA
  rewrites the pair into a clamp, which it does not fuse either.)"""
  return jnp.maximum(m, float(np.finfo(m.dtype).min))


def _plain_log(s: jax.Array, axes: Axes) -> jax.Array:
  """log of a sum of exps about `_plain_shift`, axes restored. The sum is at
  least 1 on a row with a finite entry (its max gives exp(0)); 0 on a row
  with none, where the smallest normal number keeps the log and its
  derivative finite (the derivative of the max is 0 there), in place of
  `log_of_sum`'s two selects."""
  return jnp.expand_dims(jnp.log(jnp.maximum(s, float(np.finfo(s.dtype).tiny))), axes)


# ---------------------------------------------------------------------------
# log_softmax


def _log_softmax_out(xm: jax.Array, shift: jax.Array, ls: jax.Array) -> jax.Array:
  """(x - shift) - log_sum of `shifted_stats(..., plain=True)`: -inf on a
  row with no entry, with no select. The whole forward is then one
  XLA:CPU fusion, as jax.nn's is: with a -inf select here and those of
  `row_shift` and `log_of_sum`, XLA:CPU wrote x - shift out as an N x C
  array and read it back (forward 1.2-1.75x jax.nn's time at 4096 x 1024
  to 65536 x 100, float32)."""
  return (xm.astype(shift.dtype) - shift) - ls


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _log_softmax(x: jax.Array, where: jax.Array | None, axes: Axes) -> jax.Array:
  xm = masked(x, where)
  shift, ls = shifted_stats(xm, axes, plain=True)
  return _log_softmax_out(xm, shift, ls).astype(x.dtype)


@remat(5)
def _log_softmax_tangent(
    x: jax.Array, where: jax.Array | None, shift: jax.Array, ls: jax.Array, tx: jax.Array,
    axes: Axes,
) -> jax.Array:
  shift, ls = jax.lax.optimization_barrier((shift, ls))
  # d(x_i - lse) = tx_i - sum_j p_j tx_j, as jax.nn's: outputs outside
  # `where` are constant -inf (tangent 0, so reverse mode drops their
  # cotangent) and inputs outside it take no part (a non-finite tangent
  # there would give 0 * inf = NaN). A -inf input is an ordinary one (p_j =
  # 0 there, so the sum drops it; its own output's derivative is 1). With
  # no `where`, no select: XLA:CPU then fuses the whole gradient into one
  # (YNNPACK) fusion; a -inf output mask by select wrote the gradient out
  # and selected again (as a multiply by an indicator: 1.0-1.4x the time).
  xm = masked(x, where)
  tx = _masked_tangent(tx.astype(shift.dtype), where)
  p = tangent_probs(xm, shift, ls)
  return _masked_tangent(tx - row_sum(p * tx, axes, x.dtype), where).astype(x.dtype)


def _masked_tangent(t: jax.Array, where: jax.Array | None) -> jax.Array:
  """A tangent with 0 outside `where`."""
  return t if where is None else jnp.where(where, t, 0.0)


@_log_softmax.defjvp
def _log_softmax_jvp(
    axes: Axes, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
  x, where = primals
  tx = tangents[0]
  xm = masked(x, where)
  shift, ls = shifted_stats(xm, axes, plain=True)
  out = _log_softmax_out(xm, shift, ls).astype(x.dtype)
  return out, _log_softmax_tangent(x, where, shift, ls, tx, axes)


# ---------------------------------------------------------------------------
# logsumexp


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _logsumexp(x: jax.Array, where: jax.Array | None, axes: Axes) -> jax.Array:
  shift, ls = shifted_stats(masked(x, where), axes)
  return jnp.squeeze(shift + ls, axes).astype(x.dtype)


@remat(5)
def _logsumexp_tangent(
    x: jax.Array, where: jax.Array | None, shift: jax.Array, ls: jax.Array, tx: jax.Array,
    axes: Axes,
) -> jax.Array:
  shift, ls = jax.lax.optimization_barrier((shift, ls))
  p = tangent_probs(masked(x, where), shift, ls)
  return jnp.sum(p * tx.astype(shift.dtype), axes).astype(x.dtype)


@_logsumexp.defjvp
def _logsumexp_jvp(
    axes: Axes, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
  x, where = primals
  shift, ls = shifted_stats(masked(x, where), axes)
  out = jnp.squeeze(shift + ls, axes).astype(x.dtype)
  return out, _logsumexp_tangent(x, where, shift, ls, tangents[0], axes)


# ---------------------------------------------------------------------------
# Public functions


def _axes(fn: str, axis: int | Sequence[int] | None, ndim: int) -> Axes:
  """`axis` as jax.nn takes it (an int, a sequence of ints, or None for all
  axes) as sorted, distinct non-negative axes."""
  if axis is None:
    return tuple(range(ndim))
  if isinstance(axis, bool):
    raise TypeError(f"{fn}: `axis` must be an int, a tuple of ints or None. Got bool.")
  try:
    # A sequence raises TypeError here and is handled below.
    return (_checks.canonical_axis(fn, operator.index(axis), ndim, "x"),)  # type: ignore[arg-type]
  except TypeError:
    pass
  if not isinstance(axis, (tuple, list)) or any(isinstance(a, bool) for a in axis):
    raise _checks.axis_error(fn, axis, "an int, a tuple of ints or None")
  axes = [_checks.canonical_axis(fn, a, ndim, "x") for a in axis]
  if len(set(axes)) != len(axes):
    raise ValueError(f"{fn}: `axis` has repeated axes. Got {tuple(axis)}.")
  return tuple(sorted(axes))


@_dispatch.jitted(static=("axis",), constant_if_empty="x")
def log_softmax(
    x: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
  r"""Log-softmax over one or more axes, with an optional mask.

  .. math::
    \mathrm{log\_softmax}(x)_i = x_i - \log \sum_{j \in \text{where}} e^{x_j}

  A drop-in for :func:`jax.nn.log_softmax`: the same arguments (`axis` an
  int, a tuple of ints or None for all axes), defaults and output dtype;
  computed in float32 for half-precision inputs. Outputs outside `where` are
  -inf and carry no cotangent, as jax.nn's do (``torch.masked`` passes it
  through); a slice with no entry left, or of -inf entries only, is all
  -inf (jax.nn: NaN for the latter), and a slice with a +inf or NaN entry
  is all NaN, as in PyTorch (jax.nn: NaN inside `where`, -inf outside; the
  select that would give that took 1.8x the `value_and_grad` time at
  4096 x 1024 on CPU). Differences of logits stay exact however far the
  logits are from 0: the max shift is kept apart from the log-sum.

  Differentiation: a `jax.custom_jvp` whose tangent recomputes the softmax,
  so `jax.jvp`, `jax.jacfwd`, `jax.linearize`, `jax.grad`, `jax.hessian` and
  any nesting of them work; reverse mode saves only `x` and two float32
  numbers per slice. The derivatives are jax.nn's, a -inf input included
  (that of its own output is 1).

  Args:
    x: Logits, any floating dtype.
    axis: The axis or axes to normalize over; None for all of them.
    where: Optional boolean mask broadcastable to `x`: the entries that take
      part. Masked entries get -inf and zero gradient. The cotangent at masked
      outputs is dropped, as in :func:`jax.nn.log_softmax`;
      `torch.masked.log_softmax` differs: it adds it into the unmasked inputs'
      gradient (:math:`g_j - p_j \sum_i g_i` over all outputs, masked ones
      included).

  Returns:
    An array of `x`'s shape and dtype.

  Examples:
    >>> import jax.numpy as jnp, jaxce
    >>> jaxce.log_softmax(jnp.array([0.0, 0.0])).tolist()
    [-0.6931471824645996, -0.6931471824645996]
    >>> jaxce.log_softmax(jnp.zeros((2, 2)), axis=None).tolist()
    [[-1.3862943649291992, -1.3862943649291992], [-1.3862943649291992, -1.3862943649291992]]
  """
  x = _checks.float_array("log_softmax", "x", x)
  axes = _axes("log_softmax", axis, x.ndim)
  mask = _explicit.like(x, _checks.class_mask("log_softmax", where, x.shape, of="x"))
  return _log_softmax(x, mask, axes)


@_dispatch.jitted(static=("axis", "keepdims"), constant_if_empty="x")
def logsumexp(
    x: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
    keepdims: bool = False,
) -> jax.Array:
  r"""Numerically stable :math:`\log \sum_{j \in \text{where}} e^{x_j}`.

  Like :func:`jax.nn.logsumexp` (`axis` an int, a tuple of ints or None for
  all axes; the reduced axes are removed unless `keepdims`; the input's dtype
  is kept, with float32 internal math for half precision), with two
  differences: the default `axis` is -1 (jax.nn's is None, a full
  reduction), and there is no `b` or `return_sign`. Slices whose entries are
  all -inf (or all masked), and empty slices, give -inf, with zero gradient.

  Differentiation: a `jax.custom_jvp` (forward and reverse mode, any order);
  reverse mode saves only `x` and two float32 numbers per slice.

  Args:
    x: Any floating array.
    axis: The axis or axes to reduce; None for all of them.
    where: Optional boolean mask broadcastable to `x`: the entries that take
      part.
    keepdims: Keep the reduced axes, with size 1 (broadcastable against `x`).

  Returns:
    `x`'s shape without `axis` (with size-1 axes there if `keepdims`), in
    `x`'s dtype.

  Examples:
    >>> import jax.numpy as jnp, jaxce
    >>> float(jaxce.logsumexp(jnp.array([1000.0, 1000.0])))
    1000.6931762695312
    >>> float(jaxce.logsumexp(jnp.zeros((2, 2)), axis=None))
    1.3862943649291992
  """
  x = _checks.float_array("logsumexp", "x", x)
  axes = _axes("logsumexp", axis, x.ndim)
  if not isinstance(keepdims, (bool, np.bool_)):
    raise TypeError(f"logsumexp: `keepdims` must be a bool. Got {type(keepdims).__name__}.")
  mask = _explicit.like(x, _checks.class_mask("logsumexp", where, x.shape, of="x"))
  out = _logsumexp(x, mask, axes)
  return jnp.expand_dims(out, axes) if keepdims else out
