"""`linear_cross_entropy` for 32-bit kernels with a "mean" or "sum"
reduction: the forward computes the gradients too, so the logits are
computed once (three matmuls in all, as on materialized logits, instead of
the four of a backward that recomputes them).

The tokens are streamed in blocks: each block's full-vocabulary logits are a
float32 [rows, V] temporary; the block's gradient comes from
`cross_entropy`'s own custom VJP; dx is written per block and dkernel
accumulates in the kernel's (32-bit) dtype, so its accumulator costs no more
than the gradient itself. What the backward keeps (`GradResiduals`) is the
gradients, scaled by the cotangent there; nothing of size N x V.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _checks
from jaxce._collective import ClassSlice, label_weight
from jaxce._cross_entropy import cross_entropy

BLOCK_ELEMENTS = 2**24  # one float32 [rows, V] block: 64 MiB (smaller blocks run slower matmuls)


class Options(NamedTuple):  # static: everything but the arrays
  ignore_index: int
  reduction: str  # "mean" or "sum"
  label_smoothing: float
  z_loss: float
  softcap: float | None


class GradResiduals(NamedTuple):
  dx: jax.Array  # [N, D]
  dkernel: jax.Array  # [D, V]
  dbias: jax.Array | None  # [V]
  dweight: jax.Array | None  # [V]


def soft_cap(z, cap):
  """(cap * tanh(z / cap), tanh(z / cap)); a -inf logit (from a -inf bias)
  stays -inf, so that class still takes no part."""
  t = jnp.tanh(z / cap)
  return jnp.where(z == -jnp.inf, -jnp.inf, cap * t), t


def block_rows(num_tokens: int, vocab: int) -> int:
  return max(1, min(num_tokens, BLOCK_ELEMENTS // max(vocab, 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def linear_loss(x, kernel, bias, labels, weight, options: Options):
  """The reduced loss of `x @ kernel + bias` ([N, D] x [D, V])."""
  return _fwd(x, kernel, bias, labels, weight, options)[0]


def _logits(x_rows, kernel, bias, softcap):
  ct = _checks.compute_dtype(x_rows.dtype)
  z = jax.lax.dot_general(x_rows, kernel, (((1,), (0,)), ((), ())), preferred_element_type=ct)
  if bias is not None:
    z = z + bias.astype(ct)[None, :]
  return z


def _fwd(x, kernel, bias, labels, weight, options: Options):
  n, vocab = x.shape[0], kernel.shape[1]
  ct = _checks.compute_dtype(x.dtype)
  rows = block_rows(n, vocab)
  valid = labels != options.ignore_index
  # The "mean" denominator, sum_n w[y_n] v_n, needs no logits.
  inside = (labels >= 0) & (labels < vocab)
  w_y = label_weight(weight, ClassSlice(labels, vocab, None))
  w_y = jnp.ones((n,), ct) if w_y is None else w_y.astype(ct)
  denominator = jnp.sum(jnp.where(valid, w_y, 0.0))
  safe_den = jnp.where(denominator == 0, 1.0, denominator)
  scale = 1.0 / safe_den if options.reduction == "mean" else jnp.ones((), ct)

  def per_row(z, y, w):
    if options.softcap is not None:
      z, _ = soft_cap(z, options.softcap)
    return cross_entropy(z, y, weight=w, ignore_index=options.ignore_index, reduction="none",
                         label_smoothing=options.label_smoothing, z_loss=options.z_loss)

  def step(carry, j):
    total, dx, dkernel, dbias, dweight = carry
    start = jnp.minimum(j * rows, n - rows)  # last block shifted in bounds
    fresh = start + jnp.arange(rows, dtype=jnp.int32) >= j * rows
    x_rows = jax.lax.dynamic_slice_in_dim(x, start, rows)
    y_rows = jax.lax.dynamic_slice_in_dim(labels, start, rows)
    z = _logits(x_rows, kernel, bias, options.softcap)
    losses, vjp = jax.vjp(per_row, z, y_rows, weight)
    # The last block may overlap the previous one: its overlap rows count
    # once (zero cotangent here) and keep the dx rows already written.
    dz, _, dw = vjp(jnp.where(fresh, scale, 0.0).astype(ct))
    total = total + jnp.sum(jnp.where(fresh, losses, 0.0))
    dx_rows = jax.lax.dot_general(dz.astype(kernel.dtype), kernel, (((1,), (1,)), ((), ())),
                                  preferred_element_type=ct).astype(dx.dtype)
    old = jax.lax.dynamic_slice_in_dim(dx, start, rows)
    dx = jax.lax.dynamic_update_slice_in_dim(dx, jnp.where(fresh[:, None], dx_rows, old), start, 0)
    dkernel = dkernel + jax.lax.dot_general(
        x_rows, dz.astype(x.dtype), (((0,), (0,)), ((), ())), preferred_element_type=ct
    ).astype(dkernel.dtype)
    if dbias is not None:
      dbias = dbias + jnp.sum(dz, axis=0).astype(dbias.dtype)
    if dweight is not None:
      dweight = dweight + dw.astype(dweight.dtype)
    return (total, dx, dkernel, dbias, dweight), None

  init = (
      jnp.zeros((), ct),
      jnp.zeros(x.shape, x.dtype),
      jnp.zeros(kernel.shape, kernel.dtype),
      None if bias is None else jnp.zeros(bias.shape, ct),
      None if weight is None else jnp.zeros(weight.shape, ct),
  )
  num_blocks = -(-n // rows) if n else 0
  (total, dx, dkernel, dbias, dweight), _ = jax.lax.scan(
      step, init, jnp.arange(num_blocks, dtype=jnp.int32))
  loss = total * scale
  if dweight is not None and options.reduction == "mean":
    # The denominator depends on the weights too: d(total / den) / dw_c
    # adds -total / den^2 * (number of non-ignored labels equal to c).
    counts = jnp.zeros((vocab,), ct).at[jnp.where(valid & inside, labels, vocab)].add(
        1.0, mode="drop")
    dweight = dweight - total * scale**2 * counts
  cast = lambda v, like: None if like is None else v.astype(like.dtype)
  return loss, GradResiduals(dx, dkernel, cast(dbias, bias), cast(dweight, weight))


def _bwd(options, res: GradResiduals, g):
  scaled = lambda v: None if v is None else (g * v).astype(v.dtype)
  return scaled(res.dx), scaled(res.dkernel), scaled(res.dbias), None, scaled(res.dweight)


linear_loss.defvjp(_fwd, _bwd)
