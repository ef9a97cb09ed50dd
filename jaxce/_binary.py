"""`binary_cross_entropy_with_logits`: sigmoid BCE with PyTorch's options."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxce import _checks, _dispatch, _explicit
from jaxce._barrier import on_cpu
from jaxce._narrow import flat_when_narrow
from jaxce._reduction import reduce
from jaxce._stats import given


def _softplus_pair(
    x: jax.Array, zero: jax.Array | float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(softplus(x), softplus(-x), sigmoid(x), sigmoid(-x)) from one exp and
  one log1p: log(1 + e^{+-x}) = max(+-x, 0) + log1p(e^{-|x|}), exact at
  both tails (no cancellation), finite for any finite x. `zero`: the 0 of
  the max (see `_forward_constants`)."""
  e = jnp.exp(-jnp.abs(x))
  shared = jnp.log1p(e)
  big, small = _sigmoids(e)
  pos = x >= 0
  return (jnp.maximum(x, zero) + shared, jnp.maximum(-x, zero) + shared,
          jnp.where(pos, big, small), jnp.where(pos, small, big))


def _sigmoids(e: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sigmoid(|x|), sigmoid(-|x|)) from e = exp(-|x|).

  CPU: one division, e * (1 / (1 + e)) for the second. With e / (1 + e),
  XLA:CPU wrote e and that quotient out as logits-sized arrays, three
  passes for the gradient: value_and_grad took 1.2-1.7x the time and 1x
  the logits (float32; bfloat16 2x) of temp memory, against none. TPU and
  GPU keep two divisions: for a v5e chip the one division made the
  bfloat16 program access 2.65 GB of HBM instead of 2.11, and for v5p the
  float32 one keep 512 MiB of temp memory instead of 256 (through h @ W,
  N=4096, D=4096, C=32768); H100 and H200 the same either way."""

  def one_division(e: jax.Array) -> tuple[jax.Array, jax.Array]:
    big = 1.0 / (1.0 + e)
    return big, e * big

  def two_divisions(e: jax.Array) -> tuple[jax.Array, jax.Array]:
    return 1.0 / (1.0 + e), e / (1.0 + e)

  out: tuple[jax.Array, jax.Array] = jax.lax.platform_dependent(
      e, cpu=one_division, default=two_divisions)
  return out


def _forward_constants(dtype: DTypeLike) -> tuple[jax.Array, jax.Array]:
  """1 and 0 for the forward's terms; on CPU behind an optimization barrier.

  As constants, XLA:CPU's CSE shared their logits-sized broadcasts (and
  1 - t) with the backward's, and its YNNPACK fusion of the forward's sum
  then took them as written-out arrays: value_and_grad at 2048 x 1024 kept
  24 MiB of temp memory in float32 and 32 in bfloat16, against 8 and 16
  as scalars it cannot see through. TPU and GPU programs keep the constants."""
  return on_cpu((jnp.ones((), dtype), jnp.zeros((), dtype)))


def _pos_weight(pos_weight: jax.Array | None, dtype: DTypeLike) -> jax.Array:
  return jnp.ones((), dtype) if pos_weight is None else pos_weight.astype(dtype)


@jax.custom_jvp
def _binary_terms(
    logits: jax.Array, targets: jax.Array, pos_weight: jax.Array | None
) -> jax.Array:
  # -[pw t log s(x) + (1 - t) log(1 - s(x))] = pw t sp(-x) + (1 - t) sp(x).
  ct = _checks.compute_dtype(logits.dtype)
  x, t = logits.astype(ct), targets.astype(ct)
  one, zero = _forward_constants(ct)
  sp_x, sp_neg_x, _, _ = _softplus_pair(x, zero)
  return _pos_weight(pos_weight, ct) * t * sp_neg_x + (one - t) * sp_x


def _kept_apart(
    logits: jax.Array, targets: jax.Array, pos_weight: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """The recomputation's inputs, behind an `optimization_barrier` where XLA
  would otherwise share the backward's exponentials with the forward's.

  CPU: all three (without, bf16 value_and_grad at N=1024, C=8192 took 168
  MiB temp instead of 104, and longer; in float32, once the forward's
  constants were opaque (`_forward_constants`), 0.93-1.46x the time and, with
  a `pos_weight`, twice the temp memory at 256 x 1024 to 16384 x 1000, with
  a logits-sized broadcast of pos_weight shared). GPU: the logits (without: H200
  materializes a shared float32 exp(-|x|)). TPU: none; XLA fuses the whole
  loss into the matmuls, and a barrier on the logits makes it write them out
  (v5e, bf16, N=2048, C=32768: 1.05 GB accessed instead of 0.78; on all
  three inputs, 256 MiB temp instead of 128)."""
  kept: tuple[jax.Array, jax.Array, jax.Array | None] = jax.lax.platform_dependent(
      logits, targets, pos_weight, cpu=_barrier_all, tpu=_barrier_none, default=_barrier_logits)
  return kept


Inputs = tuple[jax.Array, jax.Array, jax.Array | None]


def _barrier_all(*xs: jax.Array | None) -> Inputs:
  out: Inputs = jax.lax.optimization_barrier(xs)
  return out


def _barrier_none(*xs: jax.Array | None) -> Inputs:
  return xs  # type: ignore[return-value]  # always the three inputs


def _barrier_logits(x: jax.Array, *xs: jax.Array | None) -> Inputs:
  return (jax.lax.optimization_barrier(x), *xs)


# Reverse mode keeps the inputs only and recomputes the sigmoids. Not
# checkpoint's own barrier (prevent_cse=True): it also takes the cotangent,
# so XLA would materialize the mean's cotangent, broadcast to a float32
# logits-sized array, instead of fusing it into the elementwise backward.
@functools.partial(jax.checkpoint, prevent_cse=False)
def _binary_tangent(
    logits: jax.Array, targets: jax.Array, pos_weight: jax.Array | None, tx: jax.Array,
    tt: jax.Array | None, tpw: jax.Array | None,
) -> jax.Array:
  logits, targets, pos_weight = _kept_apart(logits, targets, pos_weight)
  ct = _checks.compute_dtype(logits.dtype)
  x, t = logits.astype(ct), targets.astype(ct)
  pw = _pos_weight(pos_weight, ct)
  sp_x, sp_neg_x, s_x, s_neg_x = _softplus_pair(x)
  out = tx.astype(ct) * ((1.0 - t) * s_x - pw * t * s_neg_x)
  if tt is not None:
    out = out + tt.astype(ct) * (pw * sp_neg_x - sp_x)
  if tpw is not None:
    out = out + tpw.astype(ct) * t * sp_neg_x
  return out


@functools.partial(_binary_terms.defjvp, symbolic_zeros=True)
def _binary_terms_jvp(
    primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
  logits, targets, pos_weight = primals
  tx, tt, tpw = given(tangents[0], logits), given(tangents[1]), given(tangents[2])
  return _binary_terms(*primals), _binary_tangent(logits, targets, pos_weight, tx, tt, tpw)


@_dispatch.jitted(static=("reduction",), constant_if_empty="logits")
def binary_cross_entropy_with_logits(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    reduction: _checks.Reduction = "mean",
) -> jax.Array:
  r"""Sigmoid binary cross-entropy on logits, as PyTorch's function of that name.

  .. math::
    \ell = -w \left[ p_w\, t \log \sigma(x) + (1 - t) \log (1 - \sigma(x)) \right]

  computed as :math:`w\,[p_w t\,\mathrm{softplus}(-x) + (1-t)\,\mathrm{softplus}(x)]`,
  finite for any finite logit. Differentiation: a `jax.custom_jvp` (forward
  and reverse mode, any order); reverse mode keeps only the inputs.

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
  targets = _checks.as_array(fn, "targets", targets)
  if targets.shape != logits.shape:
    raise ValueError(
        f"{fn}: `targets` must have the logits' shape {logits.shape}."
        f" Got {targets.shape}."
    )
  if jnp.issubdtype(targets.dtype, jnp.complexfloating):
    raise TypeError(f"{fn}: `targets` must be real (float, integer or bool). Got {targets.dtype}.")
  if not jnp.issubdtype(targets.dtype, jnp.floating):
    targets = targets.astype(_checks.compute_dtype(logits.dtype))
  targets = _explicit.like(logits, targets)
  if pos_weight is not None:
    pos_weight = _checks.float_array(fn, "pos_weight", pos_weight)
    pos_weight = _explicit.like(
        logits, _checks.broadcastable(fn, "pos_weight", pos_weight, logits.shape))
  if weight is not None:
    weight = _checks.float_array(fn, "weight", weight)
    weight = _explicit.like(logits, _checks.broadcastable(fn, "weight", weight, logits.shape))

  def loss(logits: jax.Array, targets: jax.Array, pos_weight: jax.Array | None,
           weight: jax.Array | None) -> jax.Array:
    out = _binary_terms(logits, targets, pos_weight)
    return reduce(out if weight is None else weight.astype(out.dtype) * out, reduction)

  return flat_when_narrow(loss, logits.shape, logits.shape if reduction == "none" else (),
                          logits, targets, pos_weight, weight)
