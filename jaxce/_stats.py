"""Per-position statistics of logits, each a lean `jax.custom_jvp`.

Every loss over a class axis is a cheap function of a few per-position numbers
(the log-sum of exponentials, the logit at the label, weighted sums of
logits). These kernels compute them in two reading passes over the logits
(the max, then the sums; one for integer labels on CPU, where the label's
logit is the shift), all relative to a per-position `shift` (outside
autodiff), so that no difference of two large numbers is ever formed: the
losses built on them (see `_reduction.py`) take ``log_sum - picked`` with
``picked = x_y - shift``, exact for logits far from 0.

Derivatives: each kernel is a `jax.custom_jvp` whose tangent recomputes the
softmax from (logits, shift, log_sum) inside
``jax.checkpoint(policy=nothing_saveable)`` and contracts it with the tangent
in one elementwise-plus-reduction pass (a comparison with the class index,
not a gather, for the label's entry). Forward mode, reverse mode (JAX
transposes the tangent: one fused elementwise pass) and any nesting of them
work. What reverse mode saves: the inputs as given (the caller holds them
anyway) and float32 per-position statistics; no softmax, no float32 copy of
the logits, no one-hot matrix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from jax.custom_derivatives import SymbolicZero
from jax.typing import DTypeLike

from jaxce import _checks
from jaxce._explicit import spec_of
from jaxce._log_softmax import (
  LONG_ROW,
  accelerator_probs,
  log_of_sum,
  long_row,
  masked,
  probs,
  remat,
  row_shift,
  shifted_stats,
  tangent_probs,
)
from jaxce._sum import block_shape, block_size, blocked_total, total
from jaxce._vma import vary_like

T = TypeVar("T")


class SmoothingSums(NamedTuple):
  """Label-smoothing sums over each position's active classes (inside
  `where`, logit above -inf)."""

  weighted_sum: jax.Array  # sum_c w_c (x_c - shift)
  weight_sum: jax.Array  # sum_c w_c
  num_active: jax.Array  # number of active classes (not `count`: tuple.count)


class LabelStats(NamedTuple):
  """Per-position statistics of integer-label losses (float32+)."""

  shift: jax.Array  # outside autodiff, finite (0 where no finite logit)
  log_sum: jax.Array | None  # log sum_c exp(x_c - shift) over active classes
  #                            (-inf if none); lse = shift + log_sum. None: NLL
  picked: jax.Array  # x_y - shift (0 for labels outside [0, C))
  smoothing: SmoothingSums | None
  # -log p_y = log_sum - picked as a statistic of its own, already 0 for
  # ignored labels and positions with no active class and NaN for labels
  # `_checks.OUT_OF_RANGE` (see `_row_nll`): an unweighted loss is then its
  # plain sum, whose cotangent is one scalar, and its gradient one select
  # (the softmax, or p_y - 1 at the label) with three per-row operands,
  # which XLA:TPU fuses into the matmuls that consume it. None where
  # statistics are combined over devices (`_collective.combine`) and for the
  # fused linear loss.
  nll: jax.Array | None = None


class TargetStats(NamedTuple):
  """Per-position statistics of probability-target losses (float32+)."""

  shift: jax.Array
  log_sum: jax.Array
  target_mass: jax.Array  # sum_c w_c t_c over classes inside `where`
  target_logits: jax.Array  # sum_c w_c t_c (x_c - shift); -inf if t_c > 0 at a
  #                           -inf logit inside `where`
  smoothing: SmoothingSums | None


def one_hot_at(labels: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
  """Boolean mask of `shape`, true where the class index equals the label.

  Labels outside [0, C) match nothing. An iota comparison (rather than a
  scatter) keeps tangents and their transposes elementwise, one fused pass
  that also works on logits sharded over the class axis.
  """
  labels = _int32(labels)
  iota = jax.lax.broadcasted_iota(labels.dtype, shape, axis)
  return iota == jnp.expand_dims(labels, axis)


def numbered_one_hot(labels: jax.Array, shape: tuple[int, ...], axis: int,
                     narrow: bool = True) -> jax.Array:
  """`one_hot_at` for XLA:CPU: 1 + labels against a constant [1, ..., C].

  XLA:CPU compares an iota in 64-bit vector lanes (the loop index), which
  doubles the time of an elementwise pass that also takes an exp: the
  integer-label gradient at [8192, 1000] takes 4.1 ms against 2.3 ms with
  32-bit class numbers loaded from memory. A constant starting at 0 would be
  folded back into an iota. Below 2^15 classes the numbers are int16: with
  int32 ones LLVM's vectorized loop of that gradient handled 8 logits an
  iteration, with int16 ones 16, and the pass took 0.81-1.00x the time of a
  bare exp pass against 1.12-1.32x (1024 x 1024 to 16384 x 1000, 65536 x
  100, 64 x 32000; `benchmarks/fresh_pages.py` shows the loop step); on an
  AVX2 CPU, 1.02-1.09x against 1.07-1.36x (int32) and 1.11-1.46x (iota),
  at 16384 x 1000, 4096 x 1024 and 1024 x 1024. Labels
  outside [0, C) match nothing (0, or 1 + labels wrapping at the int32
  maximum to a negative number). A symbolic C (`jax.export`) takes the iota.
  `narrow=False` keeps int32 numbers (`nll_loss`'s select-only gradient
  took 1.12x the time with int16 ones in bfloat16 at 8192 x 1000).
  """
  num_classes = shape[axis]
  if not _checks.static(num_classes):
    return one_hot_at(labels, shape, axis)
  numbers = _class_numbers(num_classes, narrow).reshape(
      [-1 if d == axis else 1 for d in range(len(shape))])
  labels = _int32(labels)
  if numbers.dtype == np.int16:
    codes = jnp.where((labels >= 0) & (labels < num_classes), labels + 1, 0).astype(jnp.int16)
  else:
    codes = labels + 1
  return jnp.asarray(numbers) == jnp.expand_dims(codes, axis)


@functools.cache
def _class_numbers(num_classes: int, narrow: bool) -> npt.NDArray[np.int16 | np.int32]:
  dtype = np.int16 if narrow and num_classes < 2**15 else np.int32
  return np.arange(1, num_classes + 1, dtype=dtype)


def wide_labels(labels: jax.Array) -> jax.Array:
  """Labels of a dtype narrower than 32 bits as int32, so that comparing
  them with C or ignore_index never wraps around."""
  return labels.astype(jnp.int32) if labels.dtype.itemsize < 4 else labels


_int32 = wide_labels


def take_at(x: jax.Array, labels: jax.Array, axis: int) -> jax.Array:
  """x at the label along `axis` (0 for labels outside [0, C)), in x's dtype.

  A gather: on CPU a masked sum over the class axis is not fused into the
  reduction and would materialize an N x C temporary.
  """
  num_classes = x.shape[axis]
  labels = _int32(labels)
  if num_classes == 0:
    return jnp.zeros_like(labels, dtype=x.dtype)  # (sharded as the labels)
  inside = (labels >= 0) & (labels < num_classes)
  idx = jnp.expand_dims(jnp.where(inside, labels, 0), axis)
  picked = jnp.squeeze(jnp.take_along_axis(x, idx, axis, mode="clip"), axis)
  return jnp.where(inside, picked, jnp.zeros((), x.dtype))


def _class_weights(
    weight: jax.Array | None, axis: int, ndim: int, dtype: DTypeLike
) -> jax.Array:
  """Class weights shaped to broadcast along `axis`, in `dtype` (1 if None)."""
  if weight is None:
    return jnp.ones((1,) * ndim, dtype)
  return _checks.expand_to_axis(weight.astype(dtype), axis, ndim)


def _shifted(xm: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(active, x - shift on active classes, else 0): finite, so products with
  it add no 0 * -inf = NaN to any derivative."""
  active = xm > -jnp.inf
  return active, jnp.where(active, xm.astype(shift.dtype) - shift, 0.0)


def _smoothing_terms(active: jax.Array, xs: jax.Array, w: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The summands of `SmoothingSums`' three sums."""
  return jnp.where(active, w * xs, 0.0), jnp.where(active, w, 0.0), active.astype(xs.dtype)


def _cpu_row_sums(
    axis: int, x: jax.Array, *others: jax.Array
) -> tuple[tuple[jax.Array, ...], Callable[[jax.Array], jax.Array]]:
  """((x, *others) in the view to sum over, the sum over classes) for
  XLA:CPU. Rows longer than `LONG_ROW` with a block divisor are summed in
  blocks and then across them, as `_log_softmax.shifted_stats` does:
  XLA:CPU's reductions over such rows are several times slower (the count
  of active classes at 512 x 65536, float32: 94 ms in one stage against 10
  in two, `_sum.blocked_total`). `others` broadcast against `x`, with `axis`
  of length C (targets, class weights) or 1 (a shift)."""
  num_classes = x.shape[axis]
  block = block_size(num_classes) if long_row(num_classes) else None
  if block is None:
    return (x, *others), lambda a: total(a, axis)
  views = tuple(v.reshape(block_shape(v.shape, axis, block)) if v.shape[axis] == num_classes
                else jnp.expand_dims(v, axis + 1) for v in (x, *others))
  return views, lambda a: blocked_total(a, axis)


def _smoothing_stats(
    xm: jax.Array, shift: jax.Array, weight: jax.Array | None, axis: int, masked: bool
) -> SmoothingSums:
  """`SmoothingSums` of `xm` about `shift` (its `axis` kept, length 1);
  `masked`: a class mask set -inf logits."""
  ct = shift.dtype
  w = _class_weights(weight, axis, xm.ndim, ct)

  def accelerator(xm: jax.Array, shift: jax.Array, w: jax.Array) -> SmoothingSums:
    # (TPU; GPU takes `_gpu_smoothed` / `_gpu_target_stats`.) `active` from
    # x - shift, so that every sum depends on the shift and shares the
    # log-sum's pass: XLA:GPU reduced the count and weight sum of x > -inf in
    # passes of their own (two more reads of the logits at [4096, 32768]).
    xs = xm.astype(ct) - shift
    active = xs > -jnp.inf
    xs = jnp.where(active, xs, 0.0)
    if weight is None:  # the weight sum is the count
      count = total(active.astype(ct), axis)
      return SmoothingSums(total(xs, axis), count, count)
    return SmoothingSums(*(total(t, axis) for t in _smoothing_terms(active, xs, w)))

  if weight is None:
    unweighted = _cpu_masked_sums if masked else _cpu_unweighted_sums
    cpu = lambda xm, shift, w: unweighted(xm, shift, axis)
  else:
    weighted = _cpu_masked_weighted_sums if masked else _cpu_weighted_sums
    # w varies along the logits' shard_map axes: `jax.vmap` of the passes'
    # `lax.cond` (`plain_first`) met a class-sharded w beside row-split
    # logits in a product, and JAX refused the unmatched axes.
    cpu = lambda xm, shift, w: weighted(xm, shift, vary_like(w, xm), axis)
  out: SmoothingSums = jax.lax.platform_dependent(xm, shift, w, cpu=cpu, default=accelerator)
  return out


def first_position_masked(logits: jax.Array, axis: int) -> jax.Array:
  """Whether the first position has a -inf logit: then a pass that handles
  -inf goes first (a masked vocabulary masks every position alike), not
  after a plain pass has given a non-finite sum. Either order gives the same
  value."""
  if logits.size == 0:
    return jnp.array(False)
  spec = spec_of(logits)
  if spec is not None and any(e is not None for d, e in enumerate(spec) if d != axis):
    # Positions split over an Explicit mesh: the first one's slice has no
    # sharded type (JAX rejects it); the plain pass goes first.
    return jnp.array(False)
  first = logits[tuple(slice(None) if d == axis else 0 for d in range(logits.ndim))]
  return jnp.any(first == -jnp.inf)


def plain_first(logits: jax.Array, axis: int, plain: Callable[[], T],
                fallback: Callable[[], T]) -> T:
  """plain() where all of it is finite, else fallback() (`lax.cond`), for a
  plain pass that is exact where the logits are finite and gives a
  non-finite value otherwise; fallback() alone where the first position has
  a -inf logit (`first_position_masked`)."""

  def try_plain() -> T:
    v = plain()
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(v)]))
    out: T = jax.lax.cond(finite, lambda: v, fallback)
    return out

  out: T = jax.lax.cond(first_position_masked(logits, axis), fallback, try_plain)
  return out


def _cpu_unweighted_sums(xm: jax.Array, shift: jax.Array, axis: int) -> SmoothingSums:
  """Smoothing sums without class weights for XLA:CPU. Where every logit is
  finite, the count is C and the weighted sum is sum(x - shift): one plain
  sum, no exp. A -inf logit, NaN or an overflow makes a sum non-finite, and
  `plain_first` hands the batch to `_cpu_masked_sums` (which a class mask
  calls directly). That one alone costs two exp passes: at [4096, 1024]
  float32 the forward took 2.4x the time of this one, value_and_grad 1.8x."""

  def plain() -> SmoothingSums:
    (x, col), row_sum = _cpu_row_sums(axis, xm.astype(shift.dtype), shift)
    weighted = row_sum(x - col)
    count = _zero(weighted) + xm.shape[axis]  # (keeps weighted's shard_map type)
    return SmoothingSums(weighted, count, count)

  return plain_first(xm, axis, plain, lambda: _cpu_masked_sums(xm, shift, axis))


def _cpu_masked_sums(xm: jax.Array, shift: jax.Array, axis: int) -> SmoothingSums:
  """Smoothing sums without class weights for XLA:CPU, whose fused reductions
  take no compare or select: `_smoothing_terms`' three `where`s materialize N x C
  arrays (7.4 vs 3.3 ms at [4096, 1024], float32). By arithmetic instead:
  exp(x + min(-x, big)) is 1 on a finite logit and 0 at -inf, and
  -min(shift - x, big) is x - shift there (exactly: IEEE subtraction is
  antisymmetric) and finite at -inf. The count writes the same indicator
  apart, as exp(x - max(x, -big)): XLA:CPU also materializes a subexpression,
  or a broadcast constant, that two fused reductions share."""
  (x, shift), row_sum = _cpu_row_sums(axis, xm.astype(shift.dtype), shift)
  big = float(np.finfo(shift.dtype).max)
  weighted = row_sum(-jnp.minimum(shift - x, big) * jnp.exp(x + jnp.minimum(-x, big)))
  count = row_sum(jnp.exp(x - jnp.maximum(x, -big)))
  return SmoothingSums(weighted, count, count)


def _cpu_weighted_sums(xm: jax.Array, shift: jax.Array, w: jax.Array, axis: int
                       ) -> SmoothingSums:
  """`_cpu_unweighted_sums` with class weights `w` (shaped to broadcast along
  `axis`): where every logit is finite, sum(w (x - shift)), the weights' sum
  and the count C; else `_cpu_masked_weighted_sums`. The three `where`s of
  `_smoothing_terms` made XLA:CPU write three N x C float32 arrays (forward
  temp 48 MiB at [4096, 1024] float32, optax's 16)."""

  def plain() -> SmoothingSums:
    (x, col, wc), row_sum = _cpu_row_sums(axis, xm.astype(shift.dtype), shift, w)
    weighted = row_sum(wc * (x - col))
    zero = _zero(weighted)  # (keeps weighted's shard_map type)
    return SmoothingSums(weighted, zero + jnp.sum(w), zero + xm.shape[axis])

  return plain_first(xm, axis, plain, lambda: _cpu_masked_weighted_sums(xm, shift, w, axis))


def _cpu_masked_weighted_sums(xm: jax.Array, shift: jax.Array, w: jax.Array, axis: int
                              ) -> SmoothingSums:
  """`_cpu_masked_sums` with class weights: the same arithmetic indicators of
  a finite logit, and a third for the count, exp(x/2 + min(-x/2, big)) (x/2
  is exact and its negation is too, so 1 on a finite logit and 0 at -inf),
  each written apart so that no two reductions share a subexpression."""
  # The weights' sum reads 2w (halved after): with w in both reductions,
  # XLA:CPU wrote w's N x C broadcast out (16 MiB at [4096, 1024]).
  (x, shift, w, w2), row_sum = _cpu_row_sums(axis, xm.astype(shift.dtype), shift, w, 2.0 * w)
  big = float(np.finfo(shift.dtype).max)
  # (w last: w * -big can overflow, -big * 0 at a -inf logit cannot)
  weighted = row_sum(w * (-jnp.minimum(shift - x, big) * jnp.exp(x + jnp.minimum(-x, big))))
  weight_sum = 0.5 * row_sum(w2 * jnp.exp(x - jnp.maximum(x, -big)))
  half = 0.5 * x
  count = row_sum(jnp.exp(half + jnp.minimum(-half, 0.5 * big)))
  return SmoothingSums(weighted, weight_sum, count)


def _zero(v: jax.Array) -> jax.Array:
  """A zero tangent for the finite array `v` that keeps its type, including
  the `shard_map` axes it varies along (which `zeros_like` drops)."""
  return v * 0


def _smoothing_tangent(
    active: jax.Array, xs: jax.Array, w: jax.Array, txc: jax.Array, tw: jax.Array | None,
    axis: int, shift: jax.Array,
) -> SmoothingSums:
  """The tangent of `SmoothingSums`; `shift` is the per-row shift (axis kept).

  On CPU the weighted sum goes through a per-row 1.0, as the label's term of
  `_cpu_label_terms` does: with class weights or probability targets at 5
  and 10 classes, XLA:CPU emitted the gradient's fusion as scalar code
  without it (value_and_grad with weights 0.66-0.69x the time at 65536 x
  10, float32 and bfloat16)."""
  zero = _zero(jnp.squeeze(shift, axis))
  t_sum = jnp.where(active, w * txc, 0.0)
  t_weight = zero
  if tw is not None:
    t_sum = t_sum + jnp.where(active, tw * xs, 0.0)
    t_weight = jnp.sum(jnp.where(active, tw, 0.0), axis)
  weighted: jax.Array = jax.lax.platform_dependent(
      jnp.sum(t_sum, axis), shift, cpu=lambda t, s: t / _per_row_unit(s, axis),
      default=lambda t, s: t)
  return SmoothingSums(weighted, t_weight, zero)


def given(t: Any, like: jax.Array | None = None) -> Any:
  """A tangent from a `symbolic_zeros` rule: None for an input that is not
  differentiated (so its terms are left out, not computed on zeros), or
  zeros like `like` where the rule needs an array."""
  if not isinstance(t, SymbolicZero):
    return t
  return None if like is None else jnp.zeros(like.shape, like.dtype)


def _col(v: jax.Array, axis: int) -> jax.Array:
  return jnp.expand_dims(v, axis)


# ---------------------------------------------------------------------------
# Integer labels: shift, log-sum, logit at the label, label-smoothing sums.


def _label_primal(
    logits: jax.Array, labels: jax.Array, weight: jax.Array | None, where: jax.Array | None,
    axis: int, smoothing: bool,
) -> LabelStats:
  xm = masked(logits, where)
  labels = _int32(labels)
  # Gathered from the input dtype: exact, and no upcast copy to gather from.
  x_label = take_at(xm, labels, axis)
  if where is not None:
    # A label outside `where` reads as a -inf logit (`label_stats`' rule
    # gives it the derivative of one), here too: this code is what the
    # rule's own derivative (second order) differentiates.
    x_label = jax.lax.stop_gradient(x_label) + derivative_of(take_at(logits, labels, axis))
  if smoothing:
    def apart(xm: jax.Array, labels: jax.Array, x_label: jax.Array) -> _SmoothedStats:
      shift, ls, picked = _label_shift(xm, labels, x_label, axis, where is not None)
      sums = _smoothing_stats(xm, _col(shift, axis), weight, axis, where is not None)
      return shift, ls, picked, sums

    gpu = functools.partial(_gpu_smoothed, weight=weight, axis=axis)
    shift, ls, picked, sums = jax.lax.platform_dependent(
        xm, labels, x_label, cuda=gpu, rocm=gpu, default=apart)
  else:
    shift, ls, picked = _label_shift(xm, labels, x_label, axis, where is not None)
    sums = None
  live, dead = _row_nll(labels, xm.shape[axis], ls)
  return LabelStats(shift, ls, picked, sums, jnp.where(live, _live_nll(live, ls, picked), dead))


_SmoothedStats = tuple[jax.Array, jax.Array, jax.Array, SmoothingSums]


def _gpu_smoothed(
    xm: jax.Array, labels: jax.Array, x_label: jax.Array, *, weight: jax.Array | None, axis: int
) -> _SmoothedStats:
  """(shift, log_sum, picked, smoothing sums) with label smoothing on GPU:
  the log-sum's terms and the smoothing's in one reduction over a trailing
  stack axis. As separate sums in one fusion, XLA:GPU's two-stage row
  reduction kept a [N, 128] float32 partial-sum buffer per sum, and with
  more than two of them (three unweighted, four weighted) the rest no longer
  fit in the output buffers it reuses: 1-2 MiB of temp memory above optax's
  at N=2048, D=512, C=32768 (H100), up to 7 MiB at C=50257; stacked, one
  buffer, and within 0.25 MiB of optax's. (On TPU a stack axis of 3 or 4
  would be the minor dimension, padded to 128 lanes: not there.)"""
  ct = _checks.compute_dtype(xm.dtype)
  axis = axis % xm.ndim
  shift = jnp.squeeze(row_shift(xm, (axis,)), axis)
  diff = xm.astype(ct) - _col(shift, axis)
  active = diff > -jnp.inf
  xs = jnp.where(active, diff, 0.0)
  terms = [jnp.where(one_hot_at(labels, xm.shape, axis), 0.0, jnp.exp(diff)), xs]
  if weight is None:  # the weight sum is the count
    terms.append(active.astype(ct))
  else:
    terms[1:] = _smoothing_terms(active, xs, _class_weights(weight, axis, xm.ndim, ct))
  others, weighted, *counts = _stacked_totals(terms, axis)
  inside = (labels >= 0) & (labels < xm.shape[axis])
  ls, picked = _log_sum_apart(others, x_label, inside, shift)
  return shift, ls, picked, SmoothingSums(weighted, counts[0], counts[-1])


def _stacked_totals(terms: list[jax.Array], axis: int) -> list[jax.Array]:
  """`total` over `axis` of each of `terms` (one shape), as one reduction
  over a trailing stack axis: on GPU one partial-sum buffer for all of them
  (see `_gpu_smoothed`)."""
  sums = total(jnp.stack(terms, -1), axis % terms[0].ndim)
  return [sums[..., i] for i in range(len(terms))]


def _log_sum_apart(
    others: jax.Array, x_label: jax.Array, inside: jax.Array, shift: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(log_sum, picked) from the sum of exp(x - shift) over the classes other
  than the label (see `_label_log_sum`)."""
  picked = jnp.where(inside, x_label.astype(shift.dtype) - shift, 0.0)
  s_minus_1 = others + jnp.where(inside, jnp.expm1(picked), -1.0)
  none = s_minus_1 == -1.0  # no class left: -inf, with finite derivatives
  log_sum = jnp.where(none, -jnp.inf, jnp.log1p(jnp.where(none, 0.0, s_minus_1)))
  return log_sum, picked


@jax.custom_jvp
def derivative_of(x: jax.Array) -> jax.Array:
  """0, with the derivative of `x` (whatever `x`'s value, inf and NaN
  included): adds a derivative to a value taken from elsewhere."""
  return jnp.where(jnp.isfinite(x), x, 0.0) * 0  # keeps x's shard_map axes


@derivative_of.defjvp
def _derivative_of_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]
                       ) -> tuple[jax.Array, jax.Array]:
  return derivative_of(primals[0]), tangents[0]


def _live_nll(live: jax.Array, log_sum: jax.Array, picked: jax.Array) -> jax.Array:
  """log_sum - picked where `live`, else 0: a row with no class left (-inf
  minus -inf) makes no NaN, even one that a select drops (which
  `checkify.float_checks` would report)."""
  return jnp.where(live, log_sum, 0.0) - jnp.where(live, picked, 0.0)


def _row_nll(
    labels: jax.Array, num_classes: int, log_sum: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(live, value elsewhere) of the `nll` statistic: live where the label is
  a class and some class is active; elsewhere 0 (an ignored label, or no
  class left) or NaN (a label `_checks.OUT_OF_RANGE`: never a plausible
  loss, nor gradient)."""
  live = (labels >= 0) & (labels < num_classes) & (log_sum != -jnp.inf)
  # (NaN with a NaN derivative there, also where the rules' own code is
  # differentiated (second order): a NaN constant's would be 0. Elsewhere
  # the derivative term is 0 * d log_sum, no NaN in either direction.)
  nan = jnp.where(labels == _checks.OUT_OF_RANGE, jnp.nan, 0.0).astype(log_sum.dtype)
  return live, nan + nan * derivative_of(log_sum)


def _label_log_sum(
    xm: jax.Array, labels: jax.Array, shift: jax.Array | None, x_label: jax.Array, axis: int,
    exclude: str, blocks: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(shift, log_sum, picked), axis dropped; the shift is the max if None.

  The label's own term is left out of the sum and added back as
  expm1(picked): log_sum = log1p(others + expm1(picked)). When the label
  dominates (p_y close to 1, picked = 0) this keeps log_sum, and so the loss
  log_sum - picked, accurate to its own magnitude, where the log of a
  rounded 1 + tiny is off by up to half a float32 ulp of 1 (6e-8, as in
  PyTorch and optax). `exclude` says how: "select" with the one-hot mask (one
  fused reduction on TPU and GPU); "cpu" in the blocks of `blocks` (the
  float32 block view, see `_others_in_blocks`), in `_in_row_chunks` where
  `_takes_row_chunks`, by columns on rows of at most `NARROW_ROW` classes
  (`_others_in_columns`), else by an arithmetic mask, since XLA:CPU's
  fused reductions take no compare or select: a one-hot select would
  materialize an N x C array and triple the time of the sum.
  """
  ct = _checks.compute_dtype(xm.dtype)
  num_classes = xm.shape[axis]
  if exclude == "cpu" and blocks is None and _takes_row_chunks(xm, axis):
    return _in_row_chunks(xm, labels, shift, x_label)
  inside = (labels >= 0) & (labels < num_classes)
  if blocks is not None:
    shift, others = _others_in_blocks(xm, labels, inside, shift, axis, blocks)
  elif exclude == "cpu" and _narrow_row(xm.shape, axis):
    shift, others = _others_in_columns(xm, labels, shift, axis)
  else:
    if shift is None:
      shift = jnp.squeeze(row_shift(xm, (axis,)), axis)
    z = jnp.exp(xm.astype(ct) - _col(shift, axis))
    if exclude == "cpu" and _checks.static(num_classes) and num_classes < 2**24:
      # (no blocks, `_cpu_block_size`; the mask's class numbers are exact)
      others = total(z * _apart_from(labels, xm.shape, axis, ct), axis)
    else:
      others = total(jnp.where(one_hot_at(labels, xm.shape, axis), 0.0, z), axis)
  log_sum, picked = _log_sum_apart(others, x_label, inside, shift)
  return shift, log_sum, picked


def _narrow_row(shape: tuple[int, ...], axis: int) -> bool:
  """Whether the class axis is known and at most `NARROW_ROW` long."""
  return _checks.static(shape[axis]) and 1 <= shape[axis] <= NARROW_ROW


def _others_in_columns(
    xm: jax.Array, labels: jax.Array, shift: jax.Array | None, axis: int
) -> tuple[jax.Array, jax.Array]:
  """(shift, sum_{c != y} exp(x_c - shift)) for XLA:CPU on rows of at most
  `NARROW_ROW` classes; the max if `shift` is None.

  Each class is one column (a slice along the class axis), and the max and
  the sum are elementwise over the columns: one loop fusion that XLA:CPU
  vectorizes across rows. Its reductions over rows this short ran slower:
  max and log-sum-exp at 65536 x 10 (float32) took 1.8x the columns' time.
  """
  ct = _checks.compute_dtype(xm.dtype)
  cols = [jax.lax.index_in_dim(xm, c, axis, keepdims=False).astype(ct)
          for c in range(xm.shape[axis])]
  if shift is None:
    m = functools.reduce(jnp.maximum, cols)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  # (Labels that are constants of the program, e.g. closed over under
  # `jax.jit`, would otherwise fold into one constant mask per column: 1.5-
  # 1.8x optax's value_and_grad time at 65536 x 32, against 0.93x.)
  labels = jax.lax.optimization_barrier(labels)
  others = functools.reduce(jnp.add, [
      jnp.where(labels == c, 0.0, jnp.exp(col - shift)) for c, col in enumerate(cols)])
  return shift, others


# Rows of at most this many classes take `_others_in_columns` on CPU.
# value_and_grad of integer-label `cross_entropy` at 65536 rows, by columns
# against the arithmetic mask (`benchmarks/against_commit.py 92e0443`, 21
# rounds, AVX2): 0.41x the time at 2 classes, 0.58x at 10, 0.85x at 16 and
# 0.80x at 32 (bfloat16: 0.67x at 10, 0.89x at 32; with `where`, smoothing,
# `jax.vmap` or a far label 0.45-0.70x at 10). At 48 and 64 classes it took
# 1.4-1.6x the mask's time.
NARROW_ROW = 32


def _takes_row_chunks(xm: jax.Array, axis: int) -> bool:
  """Whether `_in_row_chunks` takes `xm` (with no blocks): rows longer than
  `LONG_ROW` on the last axis, a static shape, and a process with one CPU
  device (`one_cpu_device`)."""
  return (_checks.static(*xm.shape) and xm.shape[axis] > LONG_ROW
          and axis == xm.ndim - 1 and one_cpu_device())


@functools.cache
def one_cpu_device() -> bool:
  """Whether this process has a single CPU device. With more, rows may be
  sharded, and the SPMD partitioner gathers the logits for a loop over row
  chunks (an all-gather of f32[64, 40009] on an Auto mesh of 8), while an
  Auto mesh's sharding is not known at trace time: those keep the mask."""
  try:
    return len(jax.devices("cpu")) == 1
  except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu)
    return False


def _in_row_chunks(
    xm: jax.Array, labels: jax.Array, shift: jax.Array | None, x_label: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`_label_log_sum` on XLA:CPU of rows longer than `LONG_ROW` (on the last
  axis) with no block divisor (primes such as 40009; 256206 = 6 x 42701), a
  few rows at a time (`ROW_CHUNK` logits) in a `fori_loop`, with the one-hot
  select.

  Over the whole array, each op fused into XLA:CPU's reduction costs about
  a pass over memory at such rows (the arithmetic mask's five: forward 2.4-
  4.7x slower than optax at 512 x 32771 to 2048 x 50021, float32), and the
  select writes an N x C array. A chunk's select output stays in cache, and
  its sums ran 3-6x faster than an unmasked sum over all rows at once.
  """
  num_classes = xm.shape[-1]
  rows = math.prod(xm.shape[:-1])
  chunk = min(_checks.even_block(rows, max(4, ROW_CHUNK // num_classes)), rows)
  x2 = xm.reshape(rows, num_classes)
  labels2, at_label = labels.reshape(rows), x_label.reshape(rows)
  shift2 = None if shift is None else shift.reshape(rows)
  ct = _checks.compute_dtype(xm.dtype)

  def body(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    # The logits ride in the carry behind a barrier: as a loop invariant,
    # XLA:CPU converted half-precision input to a float32 copy before the loop.
    x, *out = jax.lax.optimization_barrier(carry)
    # The last chunk ends at the last row, overlapping the one before (its
    # rows are computed twice, to the same values) rather than a slice copy.
    start = jnp.minimum(i * chunk, rows - chunk)

    def cut(v: jax.Array) -> jax.Array:
      return jax.lax.dynamic_slice_in_dim(v, start, chunk)

    got = _label_log_sum(cut(x), cut(labels2), None if shift2 is None else cut(shift2),
                         cut(at_label), 1, "select")
    put = jax.lax.dynamic_update_slice_in_dim
    return (x, *(put(o, g, start, 0) for o, g in zip(out, got, strict=True)))

  empty = tuple(jnp.zeros((rows,), ct) for _ in range(3))
  _, *out = jax.lax.fori_loop(0, -(-rows // chunk) if rows else 0, body, (x2, *empty))
  shift_out, log_sum, picked = (v.reshape(labels.shape) for v in out)
  return shift_out, log_sum, picked


# Logits per chunk (1 MiB of float32), and at least 4 rows: 1-8 MiB ran as
# fast (2048 x 50021 to 8192 x 40009); single rows of 256206 ran 5x slower.
ROW_CHUNK = 2**18


def _cpu_block_size(xm: jax.Array, axis: int, masked: bool = False) -> int | None:
  """The block length of the CPU log-sum (`_others_in_blocks`), or None for
  the arithmetic mask. Half-precision rows up to `LONG_ROW` classes take the
  mask: as fast there (0.78-1.10x the blocks' time, bf16 value_and_grad),
  and through `h @ W` the blocks' float32 view kept 5.5x the bf16 logits'
  bytes of temp memory against 2.5x. So do float32 rows of at most
  `SHORT_ROW` classes on the last axis with at least `MANY_LOGITS` logits:
  their blocks are short (64-100), which XLA:CPU reduces slowly, and the
  label's gathered block grows with N. In rounds of shuffled order, the
  forward took 0.69-0.83x the blocks' time at 16384x1000 to 65536x1000
  (1.02x at 8192x1000) and value_and_grad, whose time is mostly the
  gradient's fresh output pages there, 0.92-1.00x; temp memory 0.52 against
  1.9 MiB at 16384x1000 (optax: 0.50). Below that size the
  gather runs beside the block sums on a second core and the mask does not
  pay (1.00-1.09x at 256 to 4096 rows of 1024); on axis 1 of (N, C, H, W)
  logits the mask took 1.3-1.9x the forward's time.

  `masked` (a `where` mask): rows up to `LONG_ROW` take the arithmetic mask.
  The blocks' view of the masked logits is written out (XLA:CPU's block
  reductions do not fuse the select that masks them): value_and_grad kept
  1x the logits of temp memory, and took 1.11-1.82x optax's time on the
  same masked logits at 256 x 4096 to 4096 x 2048, against 1.03-1.17x
  with the mask."""
  num_classes = xm.shape[axis]
  if not _checks.static(num_classes):  # symbolic (jax.export): no blocks
    return None
  if (masked or jnp.dtype(xm.dtype).itemsize < 4) and num_classes <= LONG_ROW:
    return None
  many = _checks.static(xm.size) and xm.size >= MANY_LOGITS  # (symbolic N: blocks)
  if num_classes <= SHORT_ROW and many and axis == xm.ndim - 1:
    return None
  return block_size(num_classes)


SHORT_ROW = 1024
MANY_LOGITS = 2**23


def _others_in_blocks(
    xm: jax.Array, labels: jax.Array, inside: jax.Array, shift: jax.Array | None, axis: int,
    blocks: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """(shift, sum_{c != y} exp(x_c - shift)) for XLA:CPU; the max if `shift`
  is None.

  The class axis is split into blocks (a free reshape): fused reductions
  give each block's sum (and the max), then the label's block is gathered
  from the input (N x block values) and summed again without the label.
  XLA:CPU's reductions over long rows are also several times faster in two
  stages like this. `blocks`: that view in float32+, made once by the caller
  (XLA:CPU makes a float32 copy of half-precision input per view).
  """
  ct = _checks.compute_dtype(xm.dtype)
  block = blocks.shape[axis + 1]
  raw = xm.reshape(blocks.shape)
  if shift is None:
    shift = jnp.squeeze(row_shift(blocks, (axis, axis + 1)), (axis, axis + 1))
  sums = total(jnp.exp(blocks - _col(_col(shift, axis), axis)), axis + 1)  # (..., nblocks, ...)
  safe = jnp.where(inside, labels, 0)
  # (C's division: `//` and `%` add sign fixes that XLA:CPU recomputes at
  # every element of the fusions that use them)
  at = jax.lax.div(safe, np.array(block, safe.dtype))
  own_block = jnp.take_along_axis(raw, _col(_col(at, axis), axis), axis, mode="clip")
  own_block = jnp.squeeze(own_block, axis).astype(ct)  # (..., block, ...)
  hot = jax.lax.broadcasted_iota(jnp.int32, own_block.shape, axis) == _col(
      jax.lax.rem(safe, np.array(block, safe.dtype)), axis)
  # The label's entry masked before the exp (the shift is finite), not its
  # exp after: XLA:CPU then fuses the exp into the sum's kernel rather than
  # writing the block's exps out first.
  rest = total(jnp.exp(jnp.where(hot, -jnp.inf, own_block) - _col(shift, axis)), axis)
  # Labels outside [0, C) exclude nothing: every block is counted whole.
  at = jnp.where(inside, at, -1)
  at_label = jax.lax.broadcasted_iota(at.dtype, sums.shape, axis) == _col(at, axis)
  return shift, total(jnp.where(at_label, 0.0, sums), axis) + jnp.where(inside, rest, 0.0)


def _apart_from(
    labels: jax.Array, shape: tuple[int, ...], axis: int, dtype: DTypeLike
) -> jax.Array:
  """min(|c - y|, 1) over a float iota: 0 at the label, 1 elsewhere, by
  arithmetic that XLA:CPU keeps inside a fused reduction (exact for C < 2**24)."""
  iota = jax.lax.broadcasted_iota(dtype, shape, axis)
  return jnp.minimum(jnp.abs(iota - _col(labels.astype(dtype), axis)), 1.0)


ShiftStats = tuple[jax.Array, jax.Array, jax.Array]  # (shift, log_sum, picked)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _shift_stats(
    xm: jax.Array, labels: jax.Array, x_label: jax.Array, axis: int, masked: bool = False
) -> ShiftStats:
  """(shift, log_sum, picked) of integer-label stats, axis dropped.

  On CPU the shift is the label's logit, which saves the max's pass over
  the logits: any shift within ~80 of the max gives the same result, and
  the label's logit nearly always is one. If the sum overflows, or falls
  below the normal float range (a label far below the max, or none),
  anywhere, those rows are redone with the max under a `lax.cond` that runs
  only then: alone while they are few (`_redo_rows`), else the whole batch
  (under `jax.vmap`, one cond for the whole batch: `near`'s batching rule
  maps it to rows). Other platforms always take the
  max: on TPU a cond whose operand is the logits makes XLA build a float32
  copy of half-precision logits. The branch functions are cached per axis
  and the whole is one `jax.jit` (inlined under an outer jit), so eager
  calls, differentiated or not, reuse one executable. `masked`: `xm` is
  masked by `where` (see `_cpu_block_size`).

  Derivatives (needed from the second order on: `label_stats` has a rule of
  its own) by `_shift_stats_jvp`, not through the cond: reverse mode would
  send the rejected branch's zero cotangent through its exp(x - shift),
  and 0 * inf is NaN where that sum overflowed.
  """
  near, at_max = _shift_branches(axis, masked)
  out: ShiftStats = jax.lax.platform_dependent(
      xm, labels, x_label, cpu=near, default=at_max)
  return out


@_shift_stats.defjvp
def _shift_stats_jvp(
    axis: int, masked: bool, primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]
) -> tuple[ShiftStats, ShiftStats]:
  xm, labels, x_label = primals
  tx, _, t_label = tangents
  shift, ls, picked = _shift_stats(xm, labels, x_label, axis, masked)
  # The shift is outside autodiff; d log_sum = sum_c p_c dx_c; d picked = dx_y.
  p = probs(xm, _col(shift, axis), _col(ls, axis))
  t_ls = jnp.sum(p * tx.astype(p.dtype), axis)
  inside = (labels >= 0) & (labels < xm.shape[axis])
  t_picked = jnp.where(inside, t_label.astype(picked.dtype), 0.0)
  return (shift, ls, picked), (_zero(shift), t_ls, t_picked)


_label_shift = jax.jit(_shift_stats, static_argnums=(3, 4))


@functools.cache
def _shift_branches(
    axis: int, masked: bool = False
) -> tuple[Callable[..., ShiftStats], Callable[..., ShiftStats]]:
  # Every branch's values as varying along the `shard_map` axes of the
  # label's logit, those of the logits and of the labels: the max over
  # replicated logits does not vary where split labels do, and the cond and
  # the platform switch refused branches of different types.
  def at_max(
      xm: jax.Array, labels: jax.Array, x_label: jax.Array, exclude: str = "select"
  ) -> ShiftStats:
    return vary_like(_label_log_sum(xm, labels, None, x_label, axis, exclude), x_label)

  @jax.custom_batching.custom_vmap
  def near(xm: jax.Array, labels: jax.Array, x_label: jax.Array) -> ShiftStats:
    ct = _checks.compute_dtype(xm.dtype)
    shift = jax.lax.stop_gradient(x_label.astype(ct))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    # The float32 view that both branches read, made once: XLA:CPU converts
    # half-precision input to a float32 copy per view, and the cond's operand
    # in the input dtype would be one more (XLA:CPU computes the logits of a
    # bf16 matmul in float32 anyway).
    block = _cpu_block_size(xm, axis, masked)
    if block is None:
      # (row chunks convert their rows themselves)
      view = xm if _takes_row_chunks(xm, axis) else xm.astype(ct)
    else:
      view = xm.reshape(block_shape(xm.shape, axis, block)).astype(ct)
    flat = view.reshape(xm.shape)
    blocks = None if block is None else view
    _, ls, picked = _label_log_sum(flat, labels, shift, x_label, axis, "cpu", blocks)
    usable = jnp.all(_usable_rows(ls))
    out: ShiftStats = jax.lax.cond(
        usable, accept, fallback, view, labels, x_label, shift, ls, picked)
    return out

  @near.def_vmap
  def _near_vmap(
      axis_size: int, in_batched: tuple[bool, bool, bool], *args: jax.Array
  ) -> tuple[ShiftStats, tuple[bool, bool, bool]]:
    # The mapped axis as one more row axis, so that one cond decides for the
    # whole batch: vmap's own rule made the cond a select that ran both
    # branches (value_and_grad of 16 x 512 x 1000, float32: 1.4x the time).
    args = tuple(a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
                 for a, batched in zip(args, in_batched, strict=True))
    classes = axis % (args[0].ndim - 1) + 1  # (in the batched arrays)
    return _shift_branches(classes, masked)[0](*args), (True, True, True)

  def accept(
      view: jax.Array, labels: jax.Array, x_label: jax.Array, shift: jax.Array, ls: jax.Array,
      picked: jax.Array,
  ) -> ShiftStats:
    del view, labels
    return vary_like((shift, ls, picked), x_label)

  def fallback(
      view: jax.Array, labels: jax.Array, x_label: jax.Array, shift: jax.Array, ls: jax.Array,
      picked: jax.Array,
  ) -> ShiftStats:
    if view.ndim == x_label.ndim + 1:  # no blocks
      flat, blocks = view, None
    else:
      # (explicit length, not -1: an empty batch has no size to infer it from)
      flat = view.reshape((*view.shape[:axis], view.shape[axis] * view.shape[axis + 1],
                           *view.shape[axis + 2:]))
      blocks = view

    def every_row() -> ShiftStats:
      return vary_like(_label_log_sum(flat, labels, None, x_label, axis, "cpu", blocks), x_label)

    few = _few_rows(flat.shape, axis)
    if few is None:
      return every_row()

    bad = ~_usable_rows(ls)

    def those_rows() -> ShiftStats:
      return vary_like(_redo_rows(flat, labels, x_label, (shift, ls, picked), bad, axis),
                       x_label)

    out: ShiftStats = jax.lax.cond(jnp.sum(bad) <= few, those_rows, every_row)
    return out

  return near, at_max


def _usable_rows(log_sum: jax.Array) -> jax.Array:
  """Where the label-shifted sum neither overflowed nor fell below the
  normal range (`_shift_stats`)."""
  return jnp.isfinite(log_sum) & (log_sum > -60.0)


# `_shift_stats` redoes rows alone (`_redo_rows`) while there are at most
# this many, and at most 1/16 of the rows; with more, every row is redone.
FEW_ROWS = 64
# ... in batches of at least this many rows. With fewer, the program that
# holds the loop ran 1.07-1.19x the time of the one without it on every
# call, in bfloat16 (64 to 256 rows of 1024-32000 classes; float32 and 512+
# rows 0.99-1.01x), and the whole batch costs little to redo.
FEW_ROWS_FROM = 512


def _few_rows(shape: tuple[int, ...], axis: int) -> int | None:
  """How many rows `_redo_rows` may take, or None where it is not used: a
  symbolic shape, fewer than `FEW_ROWS_FROM` rows, or a process with more
  than one CPU device (a loop over dynamic rows of sharded logits would make
  the partitioner gather them)."""
  if not _checks.static(*shape) or not one_cpu_device():
    return None
  rows = math.prod(shape) // max(shape[axis], 1)
  return None if rows < max(FEW_ROWS_FROM, 16) else min(FEW_ROWS, rows // 16)


def _redo_rows(
    xm: jax.Array, labels: jax.Array, x_label: jax.Array, stats: ShiftStats, bad: jax.Array,
    axis: int,
) -> ShiftStats:
  """`stats` with the `bad` rows redone with their max, one row at a time.

  A single label far below its row's max made the label shift's fallback
  redo the whole batch: 1.9x the time of optax at 4096 x 1024. Any
  (shift, log_sum, picked) of one row describes the same softmax, so the
  other rows keep theirs. A `while_loop` over the bad rows, not a gather
  of them: `jnp.nonzero`'s compaction kept two int32 arrays of the rows as
  temp memory (0.53 -> 0.66 MiB at 16384 x 1000), and `lax.top_k` added
  0.26 ms to the forward at 4096 x 1024 (the loop, nothing measurable)."""
  shape, num_classes = labels.shape, xm.shape[axis]
  size = tuple(num_classes if d == axis else 1 for d in range(xm.ndim))

  def body(carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    # The logits ride in the carry behind a barrier (see `_in_row_chunks`).
    x, left, *out = jax.lax.optimization_barrier(carry)
    i = jnp.argmax(left)
    where = jnp.unravel_index(i, shape)
    row = jax.lax.dynamic_slice(x, (*where[:axis], 0, *where[axis:]), size)
    redone = _label_log_sum(row.reshape(1, num_classes), labels.reshape(-1)[i][None], None,
                            x_label.reshape(-1)[i][None], 1, "cpu")
    out = [o.at[i].set(r[0].astype(o.dtype)) for o, r in zip(out, redone, strict=True)]
    return (x, left.at[i].set(False), *out)

  # (inside `shard_map`, as one type: the barrier joins them)
  init = vary_like((xm, bad.reshape(-1), *(v.reshape(-1) for v in stats)),
                   xm, labels, x_label, *stats)
  _, _, *out = jax.lax.while_loop(lambda c: jnp.any(c[1]), body, init)
  return tuple(v.reshape(shape) for v in out)  # type: ignore[return-value]


class _NllRows(NamedTuple):
  """Per-row values of the `nll` statistic's tangent (see `_row_nll`)."""

  live: jax.Array
  dead: jax.Array  # nll where not live: 0 or NaN
  q_label: jax.Array  # p_y - 1 where live, else `dead`
  log_sum: jax.Array  # log_sum where live, else +inf (softmax 0) or NaN


def _per_row_unit(shift: jax.Array, axis: int) -> jax.Array:
  """1.0 per row, as exp(0 * shift) (the shift is finite), which XLA does
  not fold: a tangent divided by it is unchanged (x / 1.0 is exact), and its
  cotangent is multiplied by a per-row operand. See `_cpu_label_terms`."""
  return jnp.exp(0.0 * jnp.squeeze(shift, axis))


def _cpu_label_terms(
    axis: int, smoothing: bool, xm: jax.Array, labels: jax.Array, shift: jax.Array,
    ls: jax.Array, q_label: jax.Array, rows: _NllRows, txc: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(d log_sum, d label logit, d nll) of `_label_tangent` on XLA:CPU: one
  exp per logit serves all three, and the rows where nll is not live are
  set after the reduction (a per-row select, not a pass)."""
  hot = numbered_one_hot(labels, xm.shape, axis)
  q = jnp.where(hot, _col(q_label, axis), probs(xm, shift, ls))
  # d nll = sum_c q_c dx_c (q = p - onehot) and d log_sum = d nll + dx_y.
  t_label = jnp.sum(jnp.where(hot, txc, 0.0), axis)
  if smoothing:
    # Through a per-row 1.0 (`_per_row_unit`): with label smoothing at 2 to
    # 16 classes XLA:CPU emitted the gradient's fusion as scalar code
    # (`<1 x float>` throughout its LLVM IR) without it, 8 or 16 wide with
    # it: value_and_grad 0.53-0.64x the time at 65536 x 10 and x 16 (float32,
    # bfloat16). (Without smoothing the fusion was vectorized already.)
    t_label = t_label / _per_row_unit(shift, axis)
  t_q = jnp.sum(q * txc, axis)
  # (dead * t_q, not dead: reverse mode drops constants from a tangent)
  return t_q + t_label, t_label, jnp.where(rows.live, t_q, rows.dead * t_q)


def _label_terms(
    axis: int, xm: jax.Array, labels: jax.Array, shift: jax.Array, ls: jax.Array,
    q_label: jax.Array, rows: _NllRows, txc: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`_cpu_label_terms` on TPU and GPU, where d nll's reverse mode (a plain
  loss's gradient) must stay one select with few enough per-row operands
  (three, with the labels) for XLA:TPU to fuse it into the matmuls that
  consume it: compiled for a v6e chip at N=4096, D=1024, C=32768 in
  bfloat16, variants with four or five took 512 MiB of temp memory (the
  gradient written out) against 320 MiB. So the rows where nll is not live
  get no mask (their log_sum is +inf or NaN), and half-precision logits
  take one offset (`accelerator_probs`). d log_sum takes an exp of its own
  (live in forward mode, with z-loss or smoothing, and for classes sharded
  over devices)."""
  del q_label
  hot = one_hot_at(labels, xm.shape, axis)
  q = jnp.where(hot, _col(rows.q_label, axis),
                accelerator_probs(xm, shift, _col(rows.log_sum, axis)))
  t_label = jnp.sum(jnp.where(hot, txc, 0.0), axis)
  t_log_sum = jnp.sum(accelerator_probs(xm, shift, ls) * txc, axis)
  return t_log_sum, t_label, jnp.sum(q * txc, axis)


@remat(7, 8)
def _label_tangent(
    logits: jax.Array, labels: jax.Array, weight: jax.Array | None, where: jax.Array | None,
    stats: LabelStats, tx: jax.Array, tw: jax.Array | None, axis: int, smoothing: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, SmoothingSums | None]:
  stats = jax.lax.optimization_barrier(stats)
  assert stats.log_sum is not None  # label_stats always has one (None is NLL's)
  shift, ls = _col(stats.shift, axis), _col(stats.log_sum, axis)
  xm = masked(logits, where)
  # p - 1 at the label as expm1(log p_y): exact where p_y is close to 1. (A
  # row with no class has log_sum -inf: -inf - -inf would make a NaN that
  # the selects below drop, but `checkify.float_checks` reports.)
  no_class = stats.log_sum == -jnp.inf
  q_label = jnp.expm1(stats.picked - jnp.where(no_class, 0.0, stats.log_sum))
  live, dead = _row_nll(labels, xm.shape[axis], stats.log_sum)
  rows = _NllRows(live, dead, jnp.where(live, q_label, dead), jnp.where(
      live, stats.log_sum, jnp.where(jnp.isnan(dead), dead, jnp.inf)))
  # CPU's d log_sum = d nll + dx_y: -1 keeps it 0 on rows with no class.
  q_label = jnp.where(no_class, -1.0, q_label)
  txc = tx.astype(shift.dtype)
  t_log_sum, t_label, t_nll = jax.lax.platform_dependent(
      xm, labels, shift, ls, q_label, rows, txc,
      cpu=functools.partial(_cpu_label_terms, axis, smoothing),
      default=functools.partial(_label_terms, axis))
  sums = None
  if smoothing:
    active, xs = _shifted(xm, shift)
    w = _class_weights(weight, axis, xm.ndim, xs.dtype)
    tw = None if tw is None else _class_weights(tw, axis, xm.ndim, xs.dtype)
    sums = _smoothing_tangent(active, xs, w, txc, tw, axis, shift)
  return t_log_sum, t_label, t_nll, sums


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def label_stats(
    logits: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None,
    where: jax.Array | None,
    axis: int,
    smoothing: bool,
) -> LabelStats:
  """Per-position statistics for integer-target losses.

  Active classes are those inside `where` with a logit above -inf. `weight`
  (class weights) is used only by the smoothing sums, which are computed
  only when `smoothing` is true (otherwise `smoothing` is None).
  """
  return _label_primal(logits, labels, weight, where, axis, smoothing)


@functools.partial(label_stats.defjvp, symbolic_zeros=True)
def _label_stats_jvp(
    axis: int, smoothing: bool, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[LabelStats, LabelStats]:
  logits, labels, weight, where = primals
  tx, tw = given(tangents[0], logits), given(tangents[2])
  # (through the kernel, not its passes: a second derivative then takes this
  # rule again; through the smoothing sums' branches it kept N x C arrays)
  stats = label_stats(logits, labels, weight, where, axis, smoothing)
  t_log_sum, t_picked, t_nll, t_sums = _label_tangent(
      logits, labels, weight, where, stats._replace(smoothing=None, nll=None), tx,
      tw if weight is not None else None, axis, smoothing)
  return stats, LabelStats(_zero(stats.shift), t_log_sum, t_picked, t_sums, t_nll)


# ---------------------------------------------------------------------------
# Probability targets: shift, log-sum, target-weighted sums, smoothing sums.


def _target_primal(
    logits: jax.Array, targets: jax.Array, weight: jax.Array | None, where: jax.Array | None,
    axis: int, smoothing: bool,
) -> TargetStats:
  xm = masked(logits, where)
  ct = _checks.compute_dtype(xm.dtype)
  t = targets.astype(ct)
  if where is not None:
    t = jnp.where(where, t, 0.0)
  # Targets on -inf logits have no derivative in `target_stats`' rule; none
  # here either, where the rule's own derivative (second order) reads this
  # code. (To XLA the select is t itself.)
  t = jnp.where(xm > -jnp.inf, t, jax.lax.stop_gradient(t))
  w = _class_weights(weight, axis, xm.ndim, ct)

  def target_sums(cpu: bool, xm: jax.Array, t: jax.Array, w: jax.Array, shift: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    row_sum: Callable[[jax.Array], jax.Array] = lambda a: total(a, axis)
    if cpu:
      # The shift through a barrier, so that XLA:CPU does not share (and
      # materialize) one N x C broadcast or difference between the two sums;
      # elsewhere it cost a pass: on H100 the forward read the logits in one
      # more fusion (XLA:TPU fuses the same either way).
      shift = jax.lax.optimization_barrier(shift)
      (xm, t, w, shift), row_sum = _cpu_row_sums(axis, xm, t, w, shift)
    wt = w * t
    return row_sum(wt), row_sum(_mass_times(wt, xm.astype(ct) - shift))

  def apart(xm: jax.Array, t: jax.Array, w: jax.Array) -> TargetStats:
    shift, ls = shifted_stats(xm, (axis,))
    mass, target_logits = jax.lax.platform_dependent(
        xm, t, w, shift, cpu=functools.partial(target_sums, True),
        default=functools.partial(target_sums, False))
    sums = _smoothing_stats(xm, shift, weight, axis, where is not None) if smoothing else None
    return TargetStats(jnp.squeeze(shift, axis), jnp.squeeze(ls, axis), mass, target_logits, sums)

  gpu = functools.partial(_gpu_target_stats, axis=axis, weighted=weight is not None,
                          smoothing=smoothing)
  out: TargetStats = jax.lax.platform_dependent(xm, t, w, cuda=gpu, rocm=gpu, default=apart)
  return out


def _mass_times(wt: jax.Array, diff: jax.Array) -> jax.Array:
  """w t (x - shift), 0 where w t == 0 (no 0 * -inf = NaN, also at a class of
  weight 0); mass on a -inf logit gives -inf, so the loss is +inf."""
  return wt * jnp.where(wt == 0, 0.0, diff)


def _gpu_target_stats(xm: jax.Array, t: jax.Array, w: jax.Array, *, axis: int, weighted: bool,
                      smoothing: bool) -> TargetStats:
  """`TargetStats` on GPU: the log-sum's, the targets' and the smoothing's
  sums in one stacked reduction (`_stacked_totals`, as `_gpu_smoothed` does
  for integer labels). As three or more sums in one fusion they cost up to
  4 MiB of temp memory above optax's, whose program has fewer at a time
  (H100, bfloat16: 516.1 against 512.1 MiB at N=8192, D=1024, C=32768)."""
  shift = row_shift(xm, (axis,))
  diff = xm.astype(t.dtype) - shift
  wt = w * t
  terms = [jnp.exp(diff), wt, _mass_times(wt, diff)]
  if smoothing:
    active = diff > -jnp.inf
    xs = jnp.where(active, diff, 0.0)
    terms += _smoothing_terms(active, xs, w) if weighted else [xs, active.astype(xs.dtype)]
  exps, mass, target_logits, *rest = _stacked_totals(terms, axis)
  sums = None
  if smoothing:
    sums = SmoothingSums(rest[0], rest[1], rest[-1])
  return TargetStats(jnp.squeeze(shift, axis), log_of_sum(exps), mass, target_logits, sums)


@remat(8, 9)
def _target_tangent(
    logits: jax.Array, targets: jax.Array, weight: jax.Array | None, where: jax.Array | None,
    stats: TargetStats, tx: jax.Array, tt: jax.Array | None, tw: jax.Array | None, axis: int,
    smoothing: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, SmoothingSums | None]:
  stats = jax.lax.optimization_barrier(stats)
  shift, ls = _col(stats.shift, axis), _col(stats.log_sum, axis)
  ct = shift.dtype
  xm = masked(logits, where)
  t = targets.astype(ct)
  if where is not None:
    t = jnp.where(where, t, 0.0)
  w = _class_weights(weight, axis, xm.ndim, ct)
  tw = None if tw is None else _class_weights(tw, axis, xm.ndim, ct)
  txc = tx.astype(ct)
  # d(w t x): the logits' term needs no mask (t is 0 on masked classes, and
  # mass on a -inf logit makes the loss +inf anyway). Terms of inputs that
  # are not differentiated (None) are left out. A class with a -inf logit is
  # treated as a masked one: the targets there get a zero gradient (not
  # w * lse).
  t_logits = w * t * txc
  t_mass = _zero(stats.shift)
  t_wt = None if tt is None else w * tt.astype(ct)
  if tw is not None:
    t_wt = tw * t if t_wt is None else t_wt + tw * t
  if t_wt is not None or smoothing:
    active, xs = _shifted(xm, shift)
  if t_wt is not None:
    t_logits = t_logits + jnp.where(active, t_wt * xs, 0.0)
    t_mass = jnp.sum(jnp.where(active, t_wt, 0.0), axis)
  t_logits = jnp.sum(t_logits, axis)
  t_log_sum = jnp.sum(tangent_probs(xm, shift, ls) * txc, axis)
  sums = None
  if smoothing:
    sums = _smoothing_tangent(active, xs, w, txc, tw, axis, shift)
  return t_log_sum, t_mass, t_logits, sums


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def target_stats(
    logits: jax.Array,
    targets: jax.Array,
    weight: jax.Array | None,
    where: jax.Array | None,
    axis: int,
    smoothing: bool,
) -> TargetStats:
  """Per-position statistics for probability-target losses.

  Classes outside `where` are left out of every sum; so are classes whose
  logit is -inf, except that target mass on one makes `target_logits` -inf
  (the loss is +inf, as it should be). The smoothing sums run over the
  active classes, as in `label_stats`.
  """
  return _target_primal(logits, targets, weight, where, axis, smoothing)


@functools.partial(target_stats.defjvp, symbolic_zeros=True)
def _target_stats_jvp(
    axis: int, smoothing: bool, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[TargetStats, TargetStats]:
  logits, targets, weight, where = primals
  tx, tt, tw = given(tangents[0], logits), given(tangents[1]), given(tangents[2])
  stats = target_stats(logits, targets, weight, where, axis, smoothing)  # (as label_stats)
  t_log_sum, t_mass, t_logits, t_sums = _target_tangent(
      logits, targets, weight, where, stats._replace(smoothing=None), tx, tt,
      tw if weight is not None else None, axis, smoothing)
  return stats, TargetStats(_zero(stats.shift), t_log_sum, t_mass, t_logits, t_sums)


# ---------------------------------------------------------------------------
# Log-probabilities: the entry at the label (NLL).


@remat(3, 4)
def _pick_tangent(labels: jax.Array, whole: jax.Array, tx: jax.Array, axis: int,
                  dtype: DTypeLike) -> jax.Array:
  # (class numbers on CPU, as in `_cpu_label_terms`: against XLA:CPU's
  # iota comparison, nll_loss's value_and_grad took 0.79-0.81x the time in
  # bfloat16 at 4096 x 1024, 8192 x 1000 and 64 x 32000; float32 the same)
  hot: jax.Array = jax.lax.platform_dependent(
      labels, cpu=lambda y: numbered_one_hot(y, tx.shape, axis, narrow=False),
      default=lambda y: one_hot_at(y, tx.shape, axis))
  hot = hot | jnp.expand_dims(whole, axis)
  return jnp.sum(jnp.where(hot, tx.astype(dtype), 0.0), axis)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def pick(x: jax.Array, labels: jax.Array, whole: jax.Array, axis: int) -> jax.Array:
  """x at the label along `axis` (0 for labels outside [0, C)), in float32+.

  Reverse mode saves the labels and `whole`, and on CPU the `[1, C]` row of
  class numbers that the tangent compares with (`_pick_tangent`; an iota
  comparison elsewhere).
  Rows flagged `whole` (labels out of range, whose loss is NaN) take the
  tangent of the whole row, so that reverse mode, like forward mode, carries
  their NaN into the row's gradient rather than a plausible 0.
  """
  return take_at(x, labels, axis).astype(_checks.compute_dtype(x.dtype))


@functools.partial(pick.defjvp, symbolic_zeros=True)
def _pick_jvp(
    axis: int, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
  x, labels, whole = primals
  ct = _checks.compute_dtype(x.dtype)
  tx = given(tangents[0], x)
  return take_at(x, labels, axis).astype(ct), _pick_tangent(labels, whole, tx, axis, ct)
