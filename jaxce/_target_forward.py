"""Probability-target cross-entropy (no class mask) as one `jax.custom_jvp`
whose value on XLA:CPU takes one fused pass.

XLA:CPU fuses nested row reductions (the max, the log-sum that uses it, and
a sum that uses both) into one YNNPACK kernel over tiles of rows, as it
fuses optax's whole forward. It does not fuse sibling row sums that are
combined afterwards (`_stats.TargetStats`' target mass and target logits),
nor a select (the zero-target rule of `_stats._mass_times`, which writes an
N x C float32 array): from those statistics the forward took 2-8x optax's
time, with that temporary (twice it for bfloat16 logits). Here the value is
one sum per position,

    sum_c w_c t_c (log_sum - (x_c - shift)),

of terms that are non-negative for non-negative targets and weights.
Where it is not finite, a `lax.cond` hands the batch to the next stage: a
zero target at a -inf logit (a masked vocabulary) to the same pass with
terms that keep such classes finite (`_fused`, `neg_inf`), and what that
one leaves infinite or NaN (target mass at a -inf logit, a row with no
finite logit, NaN or +inf input, target weights w t below -2) to
`_exact_rows`, five passes with no select. (A +inf
logit gives NaN there, as in optax and PyTorch; the statistics path gives
+inf where no target mass sits on it.) No stage keeps an N x C temporary,
except for half-precision rows of more than 32768 classes, where optax's
forward keeps one too; float32 ones are summed in blocks
(`_long_row_block`). The derivative rule is the jvp of the loss from
`target_stats` (`_exact`): every derivative, and what reverse mode saves,
are its. Other platforms take `_exact` for the value too.

With label smoothing the pass takes the smoothed targets (1 - eps) t + eps / C
(`_cpu_smoothed`) and hands any non-finite value to `_exact`: a -inf logit
takes its class out of the uniform part there. That fallback keeps the
statistics path's N x C temporaries in the compiled forward (as before).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxce import _checks, _log_softmax, _stats
from jaxce._log_softmax import row_shift
from jaxce._reduction import reduce, target_loss
from jaxce._sum import block_shape, block_size, blocked_total, total
from jaxce._vma import vary_like


def takes(num_classes: int, where: Any) -> bool:
  """Whether `cross_entropy`'s probability targets take this loss (on one
  device's classes, which the caller checks)."""
  return num_classes > 0 and where is None


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6))
def target_cross_entropy(
    logits: jax.Array, targets: jax.Array, weight: jax.Array | None, axis: int,
    reduction: str, z_loss: float, label_smoothing: float,
) -> jax.Array:
  """`cross_entropy` of probability targets (see the module docstring)."""
  out: jax.Array = jax.lax.platform_dependent(
      logits, targets, weight,
      cpu=functools.partial(_cpu_value, axis, reduction, z_loss, label_smoothing),
      default=functools.partial(_exact, axis, reduction, z_loss, label_smoothing))
  return out


@functools.partial(target_cross_entropy.defjvp, symbolic_zeros=True)
def _target_cross_entropy_jvp(
    axis: int, reduction: str, z_loss: float, label_smoothing: float, primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
) -> tuple[jax.Array, jax.Array]:
  live = [t is not None and not isinstance(t, SymbolicZero) for t in tangents]

  def exact(*differentiated: jax.Array) -> jax.Array:
    given = iter(differentiated)
    args = [next(given) if d else p for p, d in zip(primals, live, strict=True)]
    return _exact(axis, reduction, z_loss, label_smoothing, *args)

  # Inputs that are not differentiated are closed over, so `target_stats`
  # leaves their terms out (not computed on zeros).
  out: tuple[jax.Array, jax.Array] = jax.jvp(
      exact, tuple(p for p, d in zip(primals, live, strict=True) if d),
      tuple(t for t, d in zip(tangents, live, strict=True) if d))
  return out


def _exact(axis: int, reduction: str, z_loss: float, label_smoothing: float,
           logits: jax.Array, targets: jax.Array, weight: jax.Array | None) -> jax.Array:
  stats = _stats.target_stats(logits, targets, weight, None, axis, bool(label_smoothing))
  return target_loss(stats, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)


def _cpu_value(axis: int, reduction: str, z_loss: float, label_smoothing: float,
               logits: jax.Array, targets: jax.Array, weight: jax.Array | None) -> jax.Array:
  if logits.size == 0:  # nothing to fuse; and a sum of no terms is +0 there, not -0
    return _exact(axis, reduction, z_loss, label_smoothing, logits, targets, weight)
  if weight is not None:
    # Varying along the logits' shard_map axes before the `lax.cond`s below:
    # batched by `jax.vmap`, a branch's automatic `pvary` of the weights met
    # them varying already, and JAX refused it.
    weight = vary_like(weight, logits)
  if label_smoothing:
    return _cpu_smoothed(axis, reduction, z_loss, label_smoothing, logits, targets, weight)

  def stage(neg_inf: bool, then: Any) -> Any:
    def value(logits: jax.Array, targets: jax.Array, weight: jax.Array | None) -> jax.Array:
      v = _fused(logits, targets, weight, axis, reduction, z_loss, neg_inf)
      # Not only NaN: XLA:CPU's optimized code summed +inf and -inf terms
      # (mass of both signs at -inf logits) to one of the two infinities, by
      # class order (NaN at LLVM -O0); `_exact_rows` keeps the signs apart.
      out: jax.Array = jax.lax.cond(
          jnp.any(~jnp.isfinite(v)), then, lambda *args: v, logits, targets, weight)
      return out
    return value

  def exact(logits: jax.Array, targets: jax.Array, weight: jax.Array | None) -> jax.Array:
    out: jax.Array = reduce(_exact_rows(logits, targets, weight, axis, z_loss), reduction)
    return out

  masked_first = stage(True, exact)
  out: jax.Array = jax.lax.cond(
      _stats.first_position_masked(logits, axis), masked_first, stage(False, masked_first),
      logits, targets, weight)
  return out


def _cpu_smoothed(axis: int, reduction: str, z_loss: float, label_smoothing: float,
                  logits: jax.Array, targets: jax.Array, weight: jax.Array | None) -> jax.Array:
  """With label smoothing: where every logit is finite, the smoothed targets
  q = (1 - eps) t + eps / C in the plain pass. A -inf logit takes its class
  out of the uniform part (K active classes, not C), and a non-finite value
  (that, NaN, an overflow) hands the batch to `_exact` (`_stats.plain_first`:
  first, when the first position has a -inf logit)."""
  return _stats.plain_first(
      logits, axis,
      lambda: _fused(logits, targets, weight, axis, reduction, z_loss, False, label_smoothing),
      lambda: _exact(axis, reduction, z_loss, label_smoothing, logits, targets, weight))


def _weighted(targets: jax.Array, weight: jax.Array | None, axis: int, dtype: Any,
              label_smoothing: float = 0.0) -> jax.Array:
  """w t, or w q with the smoothed targets q = (1 - eps) t + eps / C (at
  eps = 1, q = 1 / C: the targets take no part, as in `target_loss`)."""
  t = targets.astype(dtype)
  if label_smoothing:
    uniform = label_smoothing / targets.shape[axis]
    t = (jnp.full(t.shape, uniform, dtype) if label_smoothing == 1.0
         else (1.0 - label_smoothing) * t + uniform)
  return t if weight is None else t * _checks.expand_to_axis(weight.astype(dtype), axis, t.ndim)


def _fused(logits: jax.Array, targets: jax.Array, weight: jax.Array | None, axis: int,
           reduction: str, z_loss: float, neg_inf: bool,
           label_smoothing: float = 0.0) -> jax.Array:
  """The loss in one fused pass, exact wherever it is finite. No select and
  no `where`-guarded shift: either would split XLA:CPU's kernel (and write
  out x - shift); a row with no finite max gives NaN. Reduced: one sum over
  all axes, as optax's (over the classes and then the positions it took up
  to 1.7x the time at 65536 x 100), except over blocks (`_long_row_block`).

  Without `neg_inf`, a zero target at a -inf logit gives 0 x inf = NaN.
  With it (the masked vocabulary's case, at about 1.5x the pass's time),
  the term is w t (log_sum - max(d, -big)) + g(w t) [d = -inf] big, where
  g(v) = min(v 2^127, 2) (float32; 2^1023 in float64) is 0 at v = 0 and at
  least 2 for any other non-negative v (XLA:CPU flushes subnormals to 0),
  so that the second part is 0 or overflows to +inf; and -inf for
  -2 <= v < 0. It is NaN at a finite d only for v < -2; that, and any
  infinite row, the exact fallback then takes."""
  ct = _checks.compute_dtype(logits.dtype)
  x = logits.astype(ct)
  wt = _weighted(targets, weight, axis, ct, label_smoothing)
  block = _long_row_block(logits, axis)
  if block is None:
    shift = jnp.max(x, axis, keepdims=True)
    log_sum = jnp.expand_dims(jnp.log(total(jnp.exp(x - shift), axis)), axis)
    row_sum: Callable[[jax.Array], jax.Array] = functools.partial(total, axis=axis)
  else:
    # The statistics over blocks, then one blocked sum. (Their per-row
    # selects stay behind the barrier, out of the sum's kernel; a row with
    # no finite logit still gives NaN below: -inf - -inf.)
    shift, log_sum = (jnp.expand_dims(v, axis + 1) for v in jax.lax.optimization_barrier(
        _log_softmax.shifted_stats(x, (axis,))))
    x, wt = (v.reshape(block_shape(v.shape, axis, block)) for v in (x, wt))
    row_sum = functools.partial(blocked_total, axis=axis)
  d = x - shift
  if neg_inf:
    info = np.finfo(ct)
    big = float(info.max)
    # (2 ** (1 - minexp): the smallest normal number times it is 2)
    terms = (wt * (log_sum - jnp.maximum(d, -big))
             + jnp.minimum(wt * 2.0 ** (1 - info.minexp), 2.0) * _at_neg_inf(d, -big, big))
  else:
    terms = wt * (log_sum - d)
  log_sum = log_sum.reshape(log_sum.shape[:axis] + log_sum.shape[axis + 1 + (block is not None):])
  z = None if not z_loss else z_loss * (shift.reshape(log_sum.shape) + log_sum) ** 2
  if reduction == "none":
    return row_sum(terms) if z is None else row_sum(terms) + z
  everything = tuple(range(logits.ndim - 1))
  out = total(terms, tuple(range(x.ndim))) if block is None else total(row_sum(terms), everything)
  if z is not None:
    out = out + total(z, everything)
  if reduction == "mean":
    out = out / (logits.size // logits.shape[axis])  # (an empty batch: NaN, then the exact 0)
  return out


def _at_neg_inf(d: jax.Array, lowest: Any, value: Any) -> jax.Array:
  """`value` where d = -inf, 0 where d is finite (NaN at NaN or +inf), by
  arithmetic that XLA:CPU keeps inside a fused reduction (no compare or
  select); `lowest` is the dtype's lowest finite number."""
  return jnp.minimum(jnp.maximum(d, lowest) - d, value)


def _long_row_block(logits: jax.Array, axis: int) -> int | None:
  """The block length for float32+ rows longer than `LONG_ROW` with a block
  divisor, else None. XLA:CPU fuses the chain over such rows for neither
  jaxce nor optax (both write an N x C float32 array) and reduces them
  slowly; in blocks (`_log_softmax.shifted_stats`, `_sum.blocked_total`)
  the forward took 0.23-0.55x optax's time at 64 x 256000, 512 x 50257,
  512 x 65536 and 2048 x 40000, with no temporary. Half-precision rows
  stay flat: their blocks' float32 views were written out (twice optax's
  temp memory, and slower)."""
  num_classes = logits.shape[axis]
  if jnp.dtype(logits.dtype).itemsize < 4 or not _log_softmax.long_row(num_classes):
    return None
  return block_size(num_classes)


def _exact_rows(logits: jax.Array, targets: jax.Array, weight: jax.Array | None, axis: int,
                z_loss: float) -> jax.Array:
  """`_exact`'s loss per position, in fused passes with no select inside:
  the terms of classes whose logit is -inf (d = x - shift) are clamped
  finite (w t (log_sum + big): 0 at a zero target), and the target weight on
  them, positive and negative apart, decides +inf, -inf or NaN afterwards
  (`_stats.TargetStats.target_logits`' rule)."""
  ct = _checks.compute_dtype(logits.dtype)
  # Each pass reads its own view of the inputs, and each sum gets its own
  # shift and constants as per-row arrays, all behind a barrier (0 * shift
  # is 0: the shift is finite). XLA:CPU writes out an N x C operand that two
  # of its fused reductions share: the float32 conversion of half-precision
  # input, x - shift, or the broadcast of a scalar constant.
  xs = jax.lax.optimization_barrier((logits,) * 5)
  ts = jax.lax.optimization_barrier((targets,) * 3)
  shift = row_shift(xs[0], (axis,))
  log_sum = _log_softmax.log_sum(xs[1], shift, (axis,))
  keep = log_sum != -jnp.inf
  big = float(np.finfo(ct).max)
  zero = shift * 0.0
  (s0, s1, s2, lo0, lo1, lo2, one1, one2, zero1, zero2, log_sum0
   ) = jax.lax.optimization_barrier(
       (shift,) * 3 + (zero - big,) * 3 + (zero + 1.0,) * 2 + (zero,) * 2
       + (jnp.where(keep, log_sum, 0.0),))
  clamped = total(_weighted(ts[0], weight, axis, ct)
                  * (log_sum0 - jnp.maximum(xs[2].astype(ct) - s0, lo0)), axis)

  def weight_at_neg_inf(part: jax.Array, x: jax.Array, shift: jax.Array, lo: jax.Array,
                        one: jax.Array) -> jax.Array:
    return total(part * _at_neg_inf(x.astype(ct) - shift, lo, one), axis)

  above = weight_at_neg_inf(jnp.maximum(_weighted(ts[1], weight, axis, ct), zero1), xs[3], s1,
                            lo1, one1)
  below = weight_at_neg_inf(jnp.minimum(_weighted(ts[2], weight, axis, ct), zero2), xs[4], s2,
                            lo2, one2)
  keep, shift, log_sum = (jnp.squeeze(v, axis) for v in (keep, shift, log_sum))
  rows = (jnp.where(keep, clamped, 0.0) + jnp.where(above > 0, jnp.inf, 0.0)
          + jnp.where(below < 0, -jnp.inf, 0.0))
  rows = jnp.where(jnp.isnan(above + below), jnp.nan, rows)
  if z_loss:
    rows = rows + z_loss * jnp.where(keep, shift + log_sum, 0.0) ** 2
  return rows
