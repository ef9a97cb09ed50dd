"""`binary_cross_entropy`: BCE on probabilities, as PyTorch's `BCELoss`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxce import _checks, _dispatch, _explicit
from jaxce._narrow import flat_when_narrow
from jaxce._reduction import reduce

# PyTorch's clamp of both log terms (so p = 0 or 1 gives a finite loss) and
# the floor of p (1 - p) in its backward: a float constant, 1e-12 rounded to
# float32, in float64 too (as torch's CPU kernel gives).
LOG_FLOOR = -100.0
EPSILON = float(np.float32(1e-12))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _terms(probs: jax.Array, targets: jax.Array, ct: np.dtype) -> jax.Array:
  """-[t max(log p, -100) + (1 - t) max(log(1 - p), -100)], elementwise in
  `ct`. Inputs arrive in their own dtypes, so reverse mode keeps them as
  given (a bf16 input stays bf16)."""
  p, t = probs.astype(ct), targets.astype(ct)
  log_p = jnp.maximum(jnp.log(p), LOG_FLOOR)
  log_not_p = jnp.maximum(jnp.log1p(-p), LOG_FLOOR)
  return (t - 1.0) * log_not_p - t * log_p


def _terms_jvp(
    ct: np.dtype, primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]
) -> tuple[jax.Array, jax.Array]:
  # PyTorch's derivatives, not those of the clamped forward: d/dp is
  # (p - t) / max(p (1 - p), 1e-12) and d/dt is -logit(p) (both unclamped).
  # They are ordinary JAX, so higher derivatives come from differentiating
  # them. A zero tangent (an input not differentiated) stays symbolic, so
  # that no array of zeros is made or kept.
  probs, targets = primals
  d_probs, d_targets = (None if isinstance(d, SymbolicZero) else d for d in tangents)
  if d_probs is None and d_targets is None:
    tangent = jnp.zeros(jnp.shape(probs), ct)
  else:
    tangent = _tangent(probs, targets, d_probs, d_targets, ct)
  return _terms(probs, targets, ct), tangent


_terms.defjvp(_terms_jvp, symbolic_zeros=True)


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _tangent(
    probs: jax.Array, targets: jax.Array, d_probs: jax.Array | None,
    d_targets: jax.Array | None, ct: np.dtype,
) -> jax.Array:
  """Reverse mode saves the inputs and recomputes these coefficients."""
  p, t = probs.astype(ct), targets.astype(ct)
  out = jnp.zeros(p.shape, ct)
  if d_probs is not None:
    out = out + (p - t) / jnp.maximum(p * (1.0 - p), EPSILON) * d_probs.astype(ct)
  if d_targets is not None:
    out = out + (jnp.log1p(-p) - jnp.log(p)) * d_targets.astype(ct)
  return out


@_dispatch.jitted(static=("reduction",), constant_if_empty="probs")
def binary_cross_entropy(
    probs: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    weight: jax.typing.ArrayLike | None = None,
    reduction: _checks.Reduction = "mean",
) -> jax.Array:
  r"""Binary cross-entropy on probabilities, as
  `torch.nn.functional.binary_cross_entropy` (`torch.nn.BCELoss`).

  .. math::
    \ell = -w \left[ t \max(\log p, -100) + (1 - t) \max(\log(1 - p), -100) \right]

  The log terms are clamped at -100 as in PyTorch, so :math:`p = 0` or
  :math:`p = 1` gives a finite loss (100 per element for a wrong certain
  prediction). The derivatives are PyTorch's: with respect to `probs`
  :math:`w\,(p - t) / \max(p (1 - p), \epsilon)` (times 1/n for "mean";
  :math:`\epsilon` is :math:`10^{-12}` rounded to float32, in float64 too,
  as in PyTorch's CPU kernel), with respect to `targets`
  :math:`w \log((1 - p) / p)`, and with respect to `weight` the
  elementwise loss. They are a `jax.custom_jvp`, so `jax.grad`,
  `jax.jvp`, `jax.jacfwd` and higher derivatives all work, and reverse mode
  keeps only input-sized arrays.

  Prefer :func:`binary_cross_entropy_with_logits` whenever the logits are at
  hand: :math:`\sigma(x)` rounds to exactly 1 in float32 once :math:`x`
  exceeds about 17 (float64: about 37), after which a target below 1 sees a
  clamped -100 instead of the true loss; below :math:`x \approx -27.6`,
  :math:`p (1 - p)` is under the :math:`10^{-12}` floor, so the gradient is
  too small (the loss stays exact until :math:`p` underflows to 0, near -88
  in float32 and -745 in float64), while the logits version computes
  :math:`\mathrm{softplus}(\pm x)` exactly for any finite logit and its
  gradient :math:`\sigma(x) - t` never saturates. Use this function when the
  model outputs probabilities (or to match a PyTorch `BCELoss` exactly).

  Differences from PyTorch: `probs` outside [0, 1] give NaN (PyTorch raises
  a runtime error), and half-precision inputs give a float32 loss (PyTorch
  keeps the input dtype); the loss is computed in float32 for float16 and
  bfloat16 inputs.

  Args:
    probs: Probabilities in [0, 1], floating, any shape.
    targets: Targets in [0, 1] of `probs`' shape, floating (like PyTorch,
      integer and boolean targets are refused: cast them).
    weight: Optional rescaling weight, broadcastable to `probs`' shape.
    reduction: "none", "mean" (over all elements) or "sum".

  Returns:
    float32 (float64 for float64 inputs): a scalar, or elementwise values of
    `probs`' shape for ``reduction="none"``.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxce
    >>> p = jnp.array([0.9, 0.2, 0.0]); t = jnp.array([1.0, 0.0, 1.0])
    >>> print(jaxce.binary_cross_entropy(p, t, reduction="none"))
    [  0.10536055   0.22314355 100.        ]
    >>> print(jax.grad(jaxce.binary_cross_entropy)(p, t))
    [-3.7037039e-01  4.1666663e-01 -3.3333333e+11]
  """
  fn = "binary_cross_entropy"
  probs = _checks.float_array(fn, "probs", probs)
  reduction = _checks.reduction(fn, reduction)
  targets = _checks.as_array(fn, "targets", targets)
  if not jnp.issubdtype(targets.dtype, jnp.floating):
    raise TypeError(
        f"{fn}: `targets` must be floating probabilities in [0, 1], as in PyTorch. Got"
        f" {targets.dtype}; cast integer or boolean targets to a float dtype."
    )
  if targets.shape != probs.shape:
    raise ValueError(
        f"{fn}: `targets` must have the probs' shape {probs.shape}. Got {targets.shape}."
    )
  wide = np.dtype(np.float64) in (probs.dtype, targets.dtype)
  ct = np.dtype(np.float64) if wide else _checks.compute_dtype(probs.dtype)
  if weight is not None:
    weight = _checks.float_array(fn, "weight", weight)
    weight = _explicit.like(
        probs, _checks.broadcastable(fn, "weight", weight, probs.shape, of="probs"))

  def loss(probs: jax.Array, targets: jax.Array, weight: jax.Array | None) -> jax.Array:
    out = _terms(probs, targets, ct)
    return reduce(out if weight is None else weight.astype(ct) * out, reduction)

  return flat_when_narrow(loss, probs.shape, probs.shape if reduction == "none" else (),
                          probs, _explicit.like(probs, targets), weight)
