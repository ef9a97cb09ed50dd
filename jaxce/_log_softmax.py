"""`log_softmax` and `logsumexp`, and the stable logsumexp every loss shares.

Both public functions are `jax.custom_vjp`s that save the input (which the
caller holds anyway) and a per-row logsumexp in float32 (float64 for float64
input); the backward recomputes the softmax from them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _checks


def masked(x: jax.Array, where: jax.Array | None) -> jax.Array:
  """Classes outside `where` become -inf: they take no part in the softmax."""
  return x if where is None else jnp.where(where, x, -jnp.inf)


def stable_logsumexp(x: jax.Array, axis: int) -> jax.Array:
  """logsumexp over `axis` (kept) of an already masked array, in float32+.

  A row of -inf gives -inf, never NaN. The max shift goes through
  `stop_gradient`: it cancels mathematically, so derivatives taken through a
  custom_vjp's forward (grad-of-grad, hessian) need not see it.
  """
  x = x.astype(_checks.compute_dtype(x.dtype))
  return _shifted_logsumexp(x, jax.lax.stop_gradient(jnp.max(x, axis, keepdims=True)), axis)


def _shifted_logsumexp(x, shift, axis):
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  return shift + jnp.log(jnp.sum(jnp.exp(x - shift), axis, keepdims=True))


def logsumexp_near(x: jax.Array, guess: jax.Array, axis: int) -> jax.Array:
  """`stable_logsumexp`, shifted by a per-row `guess` (axis kept) instead of
  the row max: this saves the max's pass over x.

  Any shift within ~80 of the max gives the same result, and the label's
  logit nearly always is one. If the sum overflows, or falls below the
  normal float range (a guess far above the max), anywhere, the batch is
  redone with the max under a `lax.cond` that runs only then. (Under
  `jax.vmap` a cond runs both branches, so the forward does one extra pass.)
  """
  x = x.astype(_checks.compute_dtype(x.dtype))
  shift = jax.lax.stop_gradient(guess.astype(x.dtype))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  log_s = jnp.log(jnp.sum(jnp.exp(x - shift), axis, keepdims=True))
  usable = jnp.all(jnp.isfinite(log_s) & (log_s > -80.0))
  return jax.lax.cond(usable, lambda: shift + log_s, lambda: stable_logsumexp(x, axis))


def softmax_from_lse(x: jax.Array, lse: jax.Array) -> jax.Array:
  """exp(x - lse), with 0 (not NaN) on rows whose lse is -inf."""
  return jnp.exp(x - jnp.where(lse == -jnp.inf, jnp.inf, lse))


class Residuals(NamedTuple):
  x: jax.Array  # the input, as given
  where: jax.Array | None  # the class mask, if any
  lse: jax.Array  # per row, float32 (float64 for float64 input), axis kept


def _forward(x, where, axis):
  lse = stable_logsumexp(masked(x, where), axis)
  return masked(x.astype(lse.dtype), where), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _logsumexp(x, where, axis):
  return _logsumexp_fwd(x, where, axis)[0]


def _logsumexp_fwd(x, where, axis):
  _, lse = _forward(x, where, axis)
  return jnp.squeeze(lse, axis).astype(x.dtype), Residuals(x, where, lse)


def _logsumexp_bwd(axis, res, g):
  x_ct = masked(res.x.astype(res.lse.dtype), res.where)
  g = jnp.expand_dims(g.astype(res.lse.dtype), axis)
  return (g * softmax_from_lse(x_ct, res.lse)).astype(res.x.dtype), None


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _log_softmax(x, where, axis):
  return _log_softmax_fwd(x, where, axis)[0]


def _log_softmax_fwd(x, where, axis):
  x_ct, lse = _forward(x, where, axis)
  out = jnp.where(lse == -jnp.inf, -jnp.inf, x_ct - lse)  # a row with no class: -inf
  return out.astype(x.dtype), Residuals(x, where, lse)


def _log_softmax_bwd(axis, res, g):
  # d/dx_j sum_i g_i (x_i - lse) = g_j - p_j * sum_i g_i, over unmasked classes.
  # Masked and -inf classes are constant -inf outputs: their g is dropped.
  x_ct = masked(res.x.astype(res.lse.dtype), res.where)
  g = jnp.where(x_ct > -jnp.inf, g.astype(res.lse.dtype), 0.0)
  p = softmax_from_lse(x_ct, res.lse)
  dx = g - p * jnp.sum(g, axis, keepdims=True)
  return dx.astype(res.x.dtype), None


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


def log_softmax(x, axis: int = -1, where=None) -> jax.Array:
  r"""Log-softmax over a class axis, with an optional class mask.

  .. math::
    \mathrm{log\_softmax}(x)_i = x_i - \log \sum_{j \in \text{where}} e^{x_j}

  Computed in float32 for half-precision inputs and returned in the input's
  dtype, like :func:`jax.nn.log_softmax`. Its gradient is a custom VJP that
  saves only `x` and a per-row logsumexp.

  Args:
    x: Logits, any floating dtype.
    axis: The class axis.
    where: Optional boolean mask broadcastable to `x`: the classes that take
      part. Masked classes get -inf and zero gradient; a row with no class
      left is all -inf. The cotangent at masked outputs is dropped, as in
      :func:`jax.nn.log_softmax`; `torch.masked.log_softmax` differs: it
      adds it into the unmasked inputs' gradient (:math:`g_j - p_j \sum_i
      g_i` over all outputs, masked ones included).

  Returns:
    An array of `x`'s shape and dtype.

  Examples:
    >>> import jax.numpy as jnp, jaxce
    >>> jaxce.log_softmax(jnp.array([0.0, 0.0])).tolist()
    [-0.6931471824645996, -0.6931471824645996]
  """
  x = _checks.float_array("log_softmax", "x", x)
  axis = _checks.canonical_axis("log_softmax", axis, x.ndim)
  where = _checks.class_mask("log_softmax", where, x.shape)
  return _log_softmax(x, where, axis)


def logsumexp(x, axis: int = -1, where=None) -> jax.Array:
  r"""Numerically stable :math:`\log \sum_{j \in \text{where}} e^{x_j}`.

  Computed in float32 for half-precision inputs and returned in the input's
  dtype, like :func:`jax.nn.logsumexp`. Rows whose entries are all -inf (or
  all masked) give -inf, with zero gradient.

  Args:
    x: Any floating array.
    axis: The axis to reduce.
    where: Optional boolean mask broadcastable to `x`: the entries that take
      part.

  Returns:
    `x`'s shape without `axis`, in `x`'s dtype.

  Examples:
    >>> import jax.numpy as jnp, jaxce
    >>> float(jaxce.logsumexp(jnp.array([1000.0, 1000.0])))
    1000.6931762695312
  """
  x = _checks.float_array("logsumexp", "x", x)
  axis = _checks.canonical_axis("logsumexp", axis, x.ndim)
  where = _checks.class_mask("logsumexp", where, x.shape)
  return _logsumexp(x, where, axis)
