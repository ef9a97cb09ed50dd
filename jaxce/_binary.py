"""`binary_cross_entropy_with_logits`: sigmoid BCE with PyTorch's options."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _checks
from jaxce._collective import match_vma
from jaxce._reduction import reduce


class BinaryResiduals(NamedTuple):
  logits: jax.Array  # as given
  targets: jax.Array  # as given
  pos_weight: jax.Array | None  # in its own (unbroadcast) shape


def _unbroadcast(d: jax.Array, shape) -> jax.Array:
  """Sums a cotangent of a broadcast result back to the operand's `shape`."""
  lead = d.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      lead + i for i, n in enumerate(shape) if n == 1 and d.shape[lead + i] != 1)
  return jnp.sum(d, axes, keepdims=True).reshape(shape)


@jax.custom_vjp
def _binary_terms(logits, targets, pos_weight):
  return _binary_terms_fwd(logits, targets, pos_weight)[0]


def _softplus_pair(x):
  """(softplus(x), softplus(-x), sigmoid(x), sigmoid(-x)) from one exp and
  one log1p: log(1 + e^{+-x}) = max(+-x, 0) + log1p(e^{-|x|}), exact at
  both tails (no cancellation), finite for any finite x."""
  e = jnp.exp(-jnp.abs(x))
  shared = jnp.log1p(e)
  big, small = 1.0 / (1.0 + e), e / (1.0 + e)  # sigmoid(|x|), sigmoid(-|x|)
  pos = x >= 0
  return (jnp.maximum(x, 0.0) + shared, jnp.maximum(-x, 0.0) + shared,
          jnp.where(pos, big, small), jnp.where(pos, small, big))


def _pos_weight(pos_weight, x):
  if pos_weight is None:
    return jnp.ones((), x.dtype)
  return jnp.broadcast_to(pos_weight.astype(x.dtype), x.shape)


def _binary_terms_fwd(logits, targets, pos_weight):
  # -[pw t log s(x) + (1 - t) log(1 - s(x))] = pw t sp(-x) + (1 - t) sp(x).
  ct = _checks.compute_dtype(logits.dtype)
  x, t = logits.astype(ct), targets.astype(ct)
  sp_x, sp_neg_x, _, _ = _softplus_pair(x)
  loss = _pos_weight(pos_weight, x) * t * sp_neg_x + (1.0 - t) * sp_x
  return loss, BinaryResiduals(logits, targets, pos_weight)


def _binary_terms_bwd(res, g):
  ct = g.dtype
  x, t = res.logits.astype(ct), res.targets.astype(ct)
  pw = _pos_weight(res.pos_weight, x)
  sp_x, sp_neg_x, s_x, s_neg_x = _softplus_pair(x)
  dx = g * ((1.0 - t) * s_x - pw * t * s_neg_x)
  dt = g * (pw * sp_neg_x - sp_x)
  dpw = None
  if res.pos_weight is not None:
    dpw = _unbroadcast(g * t * jax.nn.softplus(-x), res.pos_weight.shape)
    dpw = match_vma(dpw.astype(res.pos_weight.dtype), res.pos_weight)
  return dx.astype(res.logits.dtype), dt.astype(res.targets.dtype), dpw


_binary_terms.defvjp(_binary_terms_fwd, _binary_terms_bwd)


def binary_cross_entropy_with_logits(
    logits,
    targets,
    *,
    weight=None,
    pos_weight=None,
    reduction: str = "mean",
) -> jax.Array:
  r"""Sigmoid binary cross-entropy on logits, as PyTorch's function of that name.

  .. math::
    \ell = -w \left[ p_w\, t \log \sigma(x) + (1 - t) \log (1 - \sigma(x)) \right]

  computed as :math:`w\,[p_w t\,\mathrm{softplus}(-x) + (1-t)\,\mathrm{softplus}(x)]`,
  finite for any finite logit. The gradient is a custom VJP that keeps only
  the inputs.

  Args:
    logits: Floating logits of any shape.
    targets: Targets in [0, 1] of `logits`' shape (bool and integer targets
      are cast).
    weight: Optional rescaling broadcastable to `logits`.
    pos_weight: Optional weight of positive examples, broadcast right-aligned
      against `logits` (one per class on the last axis, like PyTorch).
    reduction: "none", "mean" (over all elements) or "sum".

  Returns:
    float32 (float64 for float64 logits), elementwise for ``reduction="none"``.

  Examples:
    >>> import jax.numpy as jnp, jaxce
    >>> x = jnp.array([2.0, -1.0]); t = jnp.array([1.0, 0.0])
    >>> print(jaxce.binary_cross_entropy_with_logits(x, t, reduction="none"))
    [0.126928  0.3132617]
  """
  fn = "binary_cross_entropy_with_logits"
  logits = _checks.float_array(fn, "logits", logits)
  reduction = _checks.reduction(fn, reduction)
  targets = jnp.asarray(targets)
  if targets.shape != logits.shape:
    raise ValueError(
        f"{fn}: `targets` must have the logits' shape {logits.shape}."
        f" Got {targets.shape}."
    )
  if not jnp.issubdtype(targets.dtype, jnp.floating):
    targets = targets.astype(_checks.compute_dtype(logits.dtype))
  if pos_weight is not None:
    pos_weight = _checks.float_array(fn, "pos_weight", pos_weight)
    _checks.broadcastable(fn, "pos_weight", pos_weight, logits.shape)
  loss = _binary_terms(logits, targets, pos_weight)
  if weight is not None:
    weight = _checks.float_array(fn, "weight", weight)
    loss = _checks.broadcastable(fn, "weight", weight, logits.shape).astype(loss.dtype) * loss
  return reduce(loss, reduction)
