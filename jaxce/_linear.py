"""`linear_cross_entropy`: cross-entropy of `x @ kernel + bias` that never
materializes the [N, V] logits.

The kernel is a `jax.custom_vjp` over vocabulary chunks. The forward streams
the chunks with an online logsumexp (float32), producing the same
per-position statistics as `_stats.label_stats`, so weights, ignore_index,
label smoothing, z-loss and reductions are shared with `cross_entropy`. The
backward recomputes each chunk's logits and accumulates dx (float32), and
writes dkernel / dbias chunk by chunk. Residuals (`LinearResiduals`): the
inputs and a per-position float32 logsumexp; the largest temporary is one
[N, chunk] block.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxce import _checks, _collective, _explicit
from jaxce._collective import match_vma, vary_like
from jaxce._reduction import integer_target_loss
from jaxce._stats import LabelStats

_F32 = jnp.float32
# Elements of one float32 block (16 MiB): sets the default vocabulary chunk
# ([N, chunk] logits) and the row blocks of the dx accumulation ([rows, D]).
BLOCK_ELEMENTS = 2**22


def default_chunk_size(num_tokens: int, vocab: int) -> int:
  """The vocabulary chunk used when `chunk_size=None`.

  The power of two that makes one float32 [N, chunk] block about 16 MiB
  (2**22 elements), at least 128 (a TPU lane multiple) and at most V.
  """
  target = BLOCK_ELEMENTS // max(num_tokens, 1)
  chunk = 1 << max(7, target.bit_length() - 1) if target >= 128 else 128
  return max(1, min(vocab, chunk))


class _Chunk(NamedTuple):
  z: jax.Array  # [N, c] float32 logits (soft-capped if asked)
  raw_tanh: jax.Array | None  # tanh(raw / softcap), for the softcap derivative
  cols: jax.Array  # [c] global class index of each column
  fresh: jax.Array  # [c] columns first seen in this chunk (not the overlap)
  start: jax.Array  # first column of the slice


def _chunk_logits(x, kernel, bias, i, chunk, softcap) -> _Chunk:
  """Logits of vocabulary chunk i. The last chunk is shifted left to stay in
  bounds (no padded copy of the kernel); the columns it shares with the
  previous chunk are marked not `fresh`."""
  vocab = kernel.shape[1]
  start = jnp.minimum(i * chunk, vocab - chunk)
  z = _matmul(x, _slice_cols(kernel, start, chunk), contract=(1, 0))
  if bias is not None:
    z = z + _slice_cols(bias, start, chunk).astype(_F32)[None, :]
  t = None
  if softcap is not None:
    t = jnp.tanh(z / softcap)
    z = softcap * t
  cols = start + jnp.arange(chunk)
  return _Chunk(z, t, cols, cols >= i * chunk, start)


def _matmul(a, b, contract):
  """a . b over one axis each, in the inputs' dtype with float32 accumulation."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _add_rows_matmul(acc, a, b):
  """acc + a @ b.T (a float32, cast to b's dtype), in blocks of rows.

  A [N, D] float32 product beside the [N, D] float32 accumulator would double
  the backward's largest buffer; blocks of about 16 MiB keep it small.
  """
  n, d = acc.shape
  block = max(1, min(n, BLOCK_ELEMENTS // max(d, 1)))
  if block == n:
    return acc + _matmul(a.astype(b.dtype), b, contract=(1, 1))

  def body(acc, j):
    start = jnp.minimum(j * block, n - block)  # last block shifted in bounds
    rows = jax.lax.dynamic_slice_in_dim(a, start, block, axis=0)
    fresh = start + jnp.arange(block) >= j * block
    rows = jnp.where(fresh[:, None], rows, 0.0).astype(b.dtype)
    old = jax.lax.dynamic_slice_in_dim(acc, start, block, axis=0)
    new = old + _matmul(rows, b, contract=(1, 1))
    return jax.lax.dynamic_update_slice_in_dim(acc, new, start, axis=0), None

  return jax.lax.scan(body, acc, jnp.arange(-(-n // block)))[0]


def _slice_cols(a, start, size):
  return jax.lax.dynamic_slice_in_dim(a, start, size, axis=a.ndim - 1)


def _write_cols(acc, update, start):
  """acc[..., start:start+c] = update. Every column's gradient is complete
  within a chunk, so the overlap columns are rewritten with equal values."""
  return jax.lax.dynamic_update_slice_in_dim(acc, update.astype(acc.dtype), start, acc.ndim - 1)


def _scan_chunks(step, carry, kernel, chunk):
  """Runs step(carry, kernel, i) over the vocabulary chunks.

  The kernel rides in the loop carry behind an optimization barrier: XLA's
  CPU backend widens a bf16 dynamic-slice to float32 by converting its whole
  operand, and would hoist that [D, V] float32 copy out of a loop in which
  the kernel is invariant.
  """

  def body(state, i):
    carry, kernel = state
    kernel = jax.lax.optimization_barrier(kernel)
    return (step(carry, kernel, i), kernel), None

  n = -(-kernel.shape[1] // chunk)
  (carry, _), _ = jax.lax.scan(body, (carry, kernel), jnp.arange(n))
  return carry


def _class_weights(weight, ch: _Chunk):
  if weight is None:
    return jnp.ones((1, ch.cols.shape[0]), _F32)
  return _slice_cols(weight, ch.start, ch.cols.shape[0]).astype(_F32)[None, :]


class LinearResiduals(NamedTuple):
  x: jax.Array  # [N, D]
  kernel: jax.Array  # [D, V]
  bias: jax.Array | None  # [V]
  labels: jax.Array  # [N]
  weight: jax.Array | None  # [V], only with label smoothing
  lse: jax.Array  # [N] float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def linear_label_stats(x, kernel, bias, labels, weight, chunk, softcap, smoothing):
  """`_stats.label_stats` of `x @ kernel + bias` (optionally soft-capped),
  streamed over vocabulary chunks of size `chunk`."""
  return _fwd(x, kernel, bias, labels, weight, chunk, softcap, smoothing)[0]


def _fwd(x, kernel, bias, labels, weight, chunk, softcap, smoothing):
  n = x.shape[0]
  zeros = jnp.zeros((n,), _F32)

  def step(carry, kernel, i):
    m, s, picked, sums = carry
    ch = _chunk_logits(x, kernel, bias, i, chunk, softcap)
    z = jnp.where(ch.fresh[None, :], ch.z, -jnp.inf)  # count each class once
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - shift[:, None]), axis=1)
    hot = (ch.cols[None, :] == labels[:, None]) & ch.fresh[None, :]
    picked = picked + jnp.sum(jnp.where(hot, z, 0.0), axis=1)
    if smoothing:
      active = z > -jnp.inf
      w = _class_weights(weight, ch)
      sums = (
          sums[0] + jnp.sum(jnp.where(active, w * z, 0.0), axis=1),
          sums[1] + jnp.sum(jnp.where(active, w, 0.0), axis=1),
          sums[2] + jnp.sum(active, axis=1, dtype=_F32),
      )
    return m_new, s, picked, sums

  init = (jnp.full((n,), -jnp.inf, _F32), zeros, zeros, (zeros,) * 3 if smoothing else ())
  init = vary_like(init, x, kernel, bias, labels, weight)
  m, s, picked, sums = _scan_chunks(step, init, kernel, chunk)
  lse = jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(s)
  stats = LabelStats(lse, picked, *(sums if smoothing else (None,) * 3))
  return stats, LinearResiduals(x, kernel, bias, labels, weight, lse)


def _bwd(chunk, softcap, smoothing, res, g):
  x, kernel, bias, labels, weight, lse = res
  lse_col = jnp.where(lse == -jnp.inf, jnp.inf, lse)[:, None]
  col = lambda v: v.astype(_F32)[:, None]
  # x transposed once: XLA's CPU backend has no native bf16 matmul that
  # contracts both operands' first axes, and would upcast all of x instead.
  x_t = x.T

  def step(carry, kernel, i):
    dx, dkernel, dbias, dweight = carry
    ch = _chunk_logits(x, kernel, bias, i, chunk, softcap)
    # dz of every column of the slice: the overlap columns' values equal the
    # previous chunk's, so writing them again is harmless; dx counts them once.
    dz = col(g.lse) * jnp.exp(ch.z - lse_col)
    dz = dz + jnp.where(ch.cols[None, :] == labels[:, None], col(g.picked), 0.0)
    if smoothing:
      active = ch.z > -jnp.inf
      dz = dz + jnp.where(active, _class_weights(weight, ch) * col(g.weighted_sum), 0.0)
      if dweight is not None:
        dw = jnp.where(active, ch.z * col(g.weighted_sum) + col(g.weight_sum), 0.0)
        dweight = _write_cols(dweight, jnp.sum(dw, axis=0), ch.start)
    if softcap is not None:
      dz = dz * (1.0 - ch.raw_tanh**2)
    dz_in = dz.astype(x.dtype)
    w_chunk = _slice_cols(kernel, ch.start, chunk)
    dx = _add_rows_matmul(dx, jnp.where(ch.fresh[None, :], dz, 0.0), w_chunk)
    dkernel = _write_cols(dkernel, _matmul(x_t, dz_in, contract=(1, 0)), ch.start)
    if dbias is not None:
      dbias = _write_cols(dbias, jnp.sum(dz, axis=0), ch.start)
    return dx, dkernel, dbias, dweight

  init = (
      jnp.zeros(x.shape, _F32),
      jnp.zeros(kernel.shape, kernel.dtype),
      None if bias is None else jnp.zeros(bias.shape, _F32),
      jnp.zeros(weight.shape, _F32) if smoothing and weight is not None else None,
  )
  init = vary_like(init, x, kernel, bias, labels, weight, *g)
  dx, dkernel, dbias, dweight = _scan_chunks(step, init, kernel, chunk)
  # Inside shard_map, each device's partial dx / dkernel sums over the axes
  # it does not share with its primal (the Megatron all-reduce of dx).
  cast = lambda v, like: None if like is None else match_vma(v.astype(like.dtype), like)
  return cast(dx, x), cast(dkernel, kernel), cast(dbias, bias), None, cast(dweight, weight)


linear_label_stats.defvjp(_fwd, _bwd)


def linear_cross_entropy(
    x,
    kernel,
    labels,
    *,
    bias=None,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    class_axis_name: str | None = None,
) -> jax.Array:
  r"""`cross_entropy(x @ kernel + bias, labels, ...)` without the [N, V] logits.

  Same options, reductions, ignore / all-ignored rules, dtypes and errors as
  :func:`jaxce.cross_entropy` (class axis last). With `softcap`, the logits
  are :math:`s \tanh(z / s)` before the softmax (Gemma 2).

  Memory: the forward streams vocabulary chunks with an online logsumexp; the
  backward recomputes each chunk's logits. What is kept for the backward is
  `x`, `kernel`, `bias`, `labels` and one float32 logsumexp per token; the
  largest temporary is a float32 [N, chunk] block (plus a float32 dx
  accumulator of `x`'s size).

  Args:
    x: Activations ``[..., D]``, any leading batch dims.
    kernel: ``[D, V]``, Flax `Dense` layout, same dtype as `x`. For tied
      ``[V, D]`` embeddings pass ``emb.T``.
    labels: Integer ``[...]``, `x`'s leading dims.
    bias: Optional ``[V]``. A -inf entry removes that class.
    weight: Optional per-class weights ``[V]``.
    ignore_index: Labels equal to this contribute nothing.
    reduction: "none" (per token, `x`'s leading shape), "mean" or "sum".
    label_smoothing: In [0, 1].
    z_loss: Weight of the squared logsumexp, >= 0.
    softcap: Optional positive logit soft-cap.
    chunk_size: Vocabulary chunk. None picks the power of two that makes a
      float32 [N, chunk] block about 16 MiB, within [128, V]. Any positive
      size works; the last chunk is shifted to stay in bounds and its overlap
      with the previous one is counted once.
    class_axis_name: Inside `shard_map`, the mesh axis over which the
      vocabulary is split: each device passes its [D, V / n] slice of
      `kernel` (and of `bias` and `weight`) and gets the loss over the whole
      vocabulary.

  Returns:
    float32 (float64 for float64 inputs) loss.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxce
    >>> x = jnp.ones((2, 3)); kernel = jnp.zeros((3, 5)); labels = jnp.array([0, 4])
    >>> print(jaxce.linear_cross_entropy(x, kernel, labels))
    1.609438
  """
  fn = "linear_cross_entropy"
  x = _checks.float_array(fn, "x", x)
  kernel = _checks.float_array(fn, "kernel", kernel)
  if x.ndim < 1 or kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
    raise ValueError(
        f"{fn}: `kernel` must have shape (D, V) with D = x.shape[-1]. Got x"
        f" {x.shape} and kernel {kernel.shape}."
    )
  if x.dtype != kernel.dtype:
    raise TypeError(
        f"{fn}: `x` and `kernel` must have the same dtype. Got {x.dtype} and"
        f" {kernel.dtype}."
    )
  reduction = _checks.reduction(fn, reduction)
  eps = _checks.static_float(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
  z = _checks.static_float(fn, "z_loss", z_loss, 0.0, math.inf)
  if softcap is not None:
    softcap = _checks.static_float(fn, "softcap", softcap, 0.0, math.inf)
    if softcap == 0.0:
      raise ValueError(f"{fn}: `softcap` must be positive. Got 0.0.")
  lead, vocab = x.shape[:-1], kernel.shape[1]
  labels = _checks.int_array(fn, "labels", labels)
  if labels.shape != lead:
    raise ValueError(
        f"{fn}: `labels` must have shape {lead} (x's shape {x.shape} without"
        f" the last axis). Got {labels.shape}."
    )
  weight = _checks.class_weight(fn, weight, vocab)
  if bias is not None:
    bias = _checks.float_array(fn, "bias", bias)
    if bias.shape != (vocab,):
      raise ValueError(f"{fn}: `bias` must have shape ({vocab},). Got {bias.shape}.")
  if chunk_size is not None:
    try:
      chunk_size = operator.index(chunk_size)
    except TypeError:
      raise TypeError(f"{fn}: `chunk_size` must be an int or None. Got {chunk_size!r}.") from None
    if chunk_size < 1:
      raise ValueError(f"{fn}: `chunk_size` must be positive. Got {chunk_size}.")

  def impl(x, kernel, labels, bias, weight, class_axis_name, row_axes=()):
    lead, (d, vocab) = x.shape[:-1], kernel.shape  # this device's share
    n = math.prod(lead)
    chunk = default_chunk_size(n, vocab) if chunk_size is None else min(chunk_size, vocab)
    flat_labels = labels.reshape(n)
    classes = _collective.class_slice(flat_labels, vocab, class_axis_name)
    stats = linear_label_stats(
        x.reshape(n, d), kernel, bias, classes.local_labels,
        weight if eps else None, chunk, softcap, bool(eps))
    stats = _collective.combine(stats, class_axis_name)
    loss = integer_target_loss(
        stats.lse,
        stats.picked,
        flat_labels,
        num_classes=classes.num_classes,
        label_weight=_collective.label_weight(weight, classes),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=eps,
        z_loss=z,
        smoothing_sums=stats[2:] if eps else None,
        row_axes=row_axes,
    )
    return loss.reshape(lead) if reduction == "none" else loss

  args = (x, kernel, labels, bias, weight)
  if class_axis_name is None:
    split = _explicit.linear_split(x, kernel, reduction)
    if split is not None:
      vocab_spec = split.class_spec[0]
      specs = (P(*split.row_spec, None), P(None, vocab_spec), split.row_spec, split.class_spec,
               split.class_spec)
      return _explicit.run(
          lambda *a: impl(*a, split.class_axis_name, split.row_axes), args, specs, split.out_spec)
  return impl(*args, class_axis_name)
