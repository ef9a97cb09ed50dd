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

from jaxce import _checks, _collective, _explicit, _linear_grads
from jaxce._collective import match_vma, vary_like
from jaxce._linear_grads import soft_cap
from jaxce._reduction import integer_target_loss
from jaxce._stats import LabelStats

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


# The vocabulary is viewed as [G, V / G] groups (a free reshape) and each step
# handles one chunk of every group: on G devices with the kernel split over
# its vocabulary axis, XLA's partitioner then keeps every group where it lives
# instead of gathering the kernel. G is 1 on one device.


class _Chunk(NamedTuple):
  z: jax.Array  # [N, G, c] float32 logits (soft-capped if asked)
  raw_tanh: jax.Array | None  # tanh(raw / softcap), for the softcap derivative
  cols: jax.Array  # [G, c] global class index of each column
  fresh: jax.Array  # [1, 1, c] columns first seen in this chunk (not the overlap)
  start: jax.Array  # first column of the slice within each group


def _grouped(v, groups):
  """[..., V] viewed as [..., G, V / G] (a free reshape)."""
  return v.reshape(*v.shape[:-1], groups, v.shape[-1] // groups)


def _group_cols(v, start, size, groups):
  """[..., G, size]: columns start:start+size of each of the G equal slices
  of v's last axis."""
  if groups == 1:  # see _write_cols
    return jnp.expand_dims(_slice_cols(v, start, size), -2)
  return _slice_cols(_grouped(v, groups), start, size)


def _chunk_logits(x, kernel, bias, i, chunk, softcap, groups) -> _Chunk:
  """Logits of chunk i of every group. The last chunk is shifted left to stay
  in bounds (no padded copy of the kernel); the columns it shares with the
  previous chunk are marked not `fresh`."""
  per_group = kernel.shape[-1] // groups
  start = jnp.minimum(i * chunk, per_group - chunk)
  z = _matmul(x, _group_cols(kernel, start, chunk, groups), (1,), (0,))
  if bias is not None:
    z = z + _group_cols(bias, start, chunk, groups).astype(z.dtype)[None]
  t = None
  if softcap is not None:
    z, t = soft_cap(z, softcap)
  offsets = jnp.arange(groups, dtype=jnp.int32)[:, None] * per_group
  cols = offsets + start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
  fresh = (start + jnp.arange(chunk, dtype=jnp.int32) >= i * chunk)[None, None, :]
  return _Chunk(z, t, cols, fresh, start)


def _matmul(a, b, contract_a, contract_b):
  """a . b over the given axes, in the inputs' dtype, accumulated in float32
  (float64 for float64 inputs)."""
  dims = ((tuple(contract_a), tuple(contract_b)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=_checks.compute_dtype(a.dtype))


def _add_rows_matmul(acc, a, b):
  """acc + a . b over their last two axes (a float32, cast to b's dtype), in
  blocks of rows.

  A [N, D] float32 product beside the [N, D] float32 accumulator would double
  the backward's largest buffer; blocks of about 16 MiB keep it small.
  """
  n, d = acc.shape
  block = max(1, min(n, BLOCK_ELEMENTS // max(d, 1)))
  if n == 0:
    return acc
  product = lambda rows: _matmul(rows.astype(b.dtype), b, (1, 2), (1, 2))
  if block == n:
    return acc + product(a)

  def body(acc, j):
    start = jnp.minimum(j * block, n - block)  # last block shifted in bounds
    rows = jax.lax.dynamic_slice_in_dim(a, start, block, axis=0)
    fresh = start + jnp.arange(block) >= j * block
    rows = jnp.where(fresh[:, None, None], rows, 0.0)
    old = jax.lax.dynamic_slice_in_dim(acc, start, block, axis=0)
    return jax.lax.dynamic_update_slice_in_dim(acc, old + product(rows), start, axis=0), None

  return jax.lax.scan(body, acc, jnp.arange(-(-n // block)))[0]


def _slice_cols(a, start, size):
  return jax.lax.dynamic_slice_in_dim(a, start, size, axis=a.ndim - 1)


def _write_cols(acc, update, start, groups):
  """acc[..., g * V / G + start + j] = update[..., g, j]. Every column's
  gradient is complete within a chunk, so the overlap columns are rewritten
  with equal values. With one group no view is taken: XLA's CPU backend
  would copy a whole bf16 [D, V] array to update it through one."""
  update = update.astype(acc.dtype)
  if groups == 1:
    return jax.lax.dynamic_update_slice_in_dim(acc, update[..., 0, :], start, acc.ndim - 1)
  grouped = jax.lax.dynamic_update_slice_in_dim(_grouped(acc, groups), update, start, acc.ndim)
  return grouped.reshape(acc.shape)


def _scan_chunks(step, carry, kernel, chunk, per_group):
  """Runs step(carry, kernel, i) over the chunks.

  The kernel rides in the loop carry behind an optimization barrier: XLA's
  CPU backend widens a bf16 dynamic-slice to float32 by converting its whole
  operand, and would hoist that [D, V] float32 copy out of a loop in which
  the kernel is invariant.
  """

  def body(state, i):
    carry, kernel = state
    kernel = jax.lax.optimization_barrier(kernel)
    return (step(carry, kernel, i), kernel), None

  n = -(-per_group // chunk)
  (carry, _), _ = jax.lax.scan(body, (carry, kernel), jnp.arange(n, dtype=jnp.int32))
  return carry


def _class_weights(weight, ch: _Chunk):
  if weight is None:
    return jnp.ones((1, *ch.cols.shape), ch.z.dtype)
  groups, size = ch.cols.shape
  return _group_cols(weight, ch.start, size, groups).astype(ch.z.dtype)[None]


class LinearResiduals(NamedTuple):
  x: jax.Array  # [N, D]
  kernel: jax.Array  # [D, V]
  bias: jax.Array | None  # [V]
  labels: jax.Array  # [N]
  weight: jax.Array | None  # [V], only with label smoothing
  lse: jax.Array  # [N] float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def linear_label_stats(x, kernel, bias, labels, weight, chunk, softcap, smoothing, groups):
  """`_stats.label_stats` of `x @ kernel + bias` (optionally soft-capped),
  streamed over chunks of `chunk` columns of each of `groups` equal slices
  of the vocabulary."""
  return _fwd(x, kernel, bias, labels, weight, chunk, softcap, smoothing, groups)[0]


def _fwd(x, kernel, bias, labels, weight, chunk, softcap, smoothing, groups):
  ct = _checks.compute_dtype(x.dtype)
  n = x.shape[0]
  zeros = jnp.zeros((n,), ct)
  axes = (1, 2)
  labels = labels.astype(jnp.int32)[:, None, None]

  def step(carry, kernel, i):
    m, s, picked, sums = carry
    ch = _chunk_logits(x, kernel, bias, i, chunk, softcap, groups)
    z = jnp.where(ch.fresh, ch.z, -jnp.inf)  # count each class once
    m_new = jnp.maximum(m, jnp.max(z, axis=axes))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - shift[:, None, None]), axis=axes)
    hot = (ch.cols[None] == labels) & ch.fresh
    picked = picked + jnp.sum(jnp.where(hot, z, 0.0), axis=axes)
    if smoothing:
      active = z > -jnp.inf
      z_safe = jnp.where(active, z, 0.0)  # no 0 * -inf in higher derivatives
      w = _class_weights(weight, ch)
      sums = (
          sums[0] + jnp.sum(jnp.where(active, w * z_safe, 0.0), axis=axes),
          sums[1] + jnp.sum(jnp.where(active, w, 0.0), axis=axes),
          sums[2] + jnp.sum(active, axis=axes, dtype=ct),
      )
    return m_new, s, picked, sums

  init = (jnp.full((n,), -jnp.inf, ct), zeros, zeros, (zeros,) * 3 if smoothing else ())
  init = vary_like(init, x, kernel, bias, labels, weight)
  m, s, picked, sums = _scan_chunks(step, init, kernel, chunk, kernel.shape[1] // groups)
  lse = jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(s)
  stats = LabelStats(lse, picked, *(sums if smoothing else (None,) * 3))
  return stats, LinearResiduals(x, kernel, bias, labels[:, 0, 0], weight, lse)


def _bwd(chunk, softcap, smoothing, groups, res, g):
  x, kernel, bias, labels, weight, lse = res
  ct = lse.dtype
  col = lambda v: v.astype(ct)[:, None, None]
  lse_col = col(jnp.where(lse == -jnp.inf, jnp.inf, lse))
  labels = labels.astype(jnp.int32)[:, None, None]
  # x transposed once: XLA's CPU backend has no native bf16 matmul that
  # contracts both operands' first axes (it would upcast all of x, or, with a
  # single chunk, fail outright); the barrier keeps XLA from folding the
  # transpose back into the matmul.
  x_t = jax.lax.optimization_barrier(x.T)

  def step(carry, kernel, i):
    dx, dkernel, dbias, dweight = carry
    ch = _chunk_logits(x, kernel, bias, i, chunk, softcap, groups)
    # dz of every column of the slice: the overlap columns' values equal the
    # previous chunk's, so writing them again is harmless; dx counts them once.
    dz = col(g.lse) * jnp.exp(ch.z - lse_col)
    dz = dz + jnp.where(ch.cols[None] == labels, col(g.picked), 0.0)
    if smoothing:
      active = ch.z > -jnp.inf
      dz = dz + jnp.where(active, _class_weights(weight, ch) * col(g.weighted_sum), 0.0)
      if dweight is not None:
        z_safe = jnp.where(active, ch.z, 0.0)
        dw = jnp.where(active, z_safe * col(g.weighted_sum) + col(g.weight_sum), 0.0)
        dweight = _write_cols(dweight, jnp.sum(dw, axis=0), ch.start, groups)
    if softcap is not None:
      dz = dz * (1.0 - ch.raw_tanh**2)
    w_chunk = _group_cols(kernel, ch.start, chunk, groups)
    dx = _add_rows_matmul(dx, jnp.where(ch.fresh, dz, 0.0), w_chunk)
    dk = _matmul(x_t, dz.astype(x.dtype), (1,), (0,))
    dkernel = _write_cols(dkernel, dk, ch.start, groups)
    if dbias is not None:
      dbias = _write_cols(dbias, jnp.sum(dz, axis=0), ch.start, groups)
    return dx, dkernel, dbias, dweight

  init = (
      jnp.zeros(x.shape, ct),
      jnp.zeros(kernel.shape, kernel.dtype),
      None if bias is None else jnp.zeros(bias.shape, ct),
      jnp.zeros(weight.shape, ct) if smoothing and weight is not None else None,
  )
  init = vary_like(init, x, kernel, bias, labels, weight, *g)
  dx, dkernel, dbias, dweight = _scan_chunks(
      step, init, kernel, chunk, kernel.shape[1] // groups)
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
    ignore_index: int | jax.typing.ArrayLike | None = -100,
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

  One exception, for speed: a "mean" or "sum" loss of a 32-bit kernel with
  `chunk_size=None` computes its gradients in the forward, over blocks of
  tokens whose full-vocabulary logits are a float32 block of about 64 MiB
  (`_linear_grads.py`). The logits are then computed once (three matmuls,
  as on materialized logits, instead of four), and the backward keeps the
  gradients, which are the size of the inputs. A 16-bit kernel keeps the
  recomputing backward, where a float32 dkernel accumulator would double
  the kernel's memory.

  Args:
    x: Activations ``[..., D]``, any leading batch dims.
    kernel: ``[D, V]``, Flax `Dense` layout, same dtype as `x`. For tied
      ``[V, D]`` embeddings pass ``emb.T``.
    labels: Integer ``[...]``, `x`'s leading dims, of any integer dtype
      (uint16 token ids with a 64K vocabulary work).
    bias: Optional ``[V]``. A -inf entry removes that class.
    weight: Optional per-class weights ``[V]``.
    ignore_index: Labels equal to this contribute nothing: any Python int,
      an integer scalar array (traced too) or None, compared with the labels
      as integers, never through a wrap-around (as in :func:`cross_entropy`).
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
    if not 0.0 < softcap < math.inf:
      raise ValueError(f"{fn}: `softcap` must be positive and finite. Got {softcap}.")
  lead, vocab = x.shape[:-1], kernel.shape[1]
  labels = _checks.as_labels(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{fn}: `labels` must have an integer dtype. Got {labels.dtype}.")
  if labels.shape != lead:
    raise ValueError(
        f"{fn}: `labels` must have shape {lead} (x's shape {x.shape} without"
        f" the last axis). Got {labels.shape}."
    )
  labels, ignore_index = _checks.class_labels(
      fn, labels, _checks.global_classes(vocab, class_axis_name), ignore_index)
  weight = _checks.class_weight(fn, weight, vocab)
  if bias is not None:
    bias = _checks.float_array(fn, "bias", bias)
    if bias.shape != (vocab,):
      raise ValueError(f"{fn}: `bias` must have shape ({vocab},). Got {bias.shape}.")
  if chunk_size is not None:
    if isinstance(chunk_size, bool):
      raise TypeError(f"{fn}: `chunk_size` must be an int or None. Got {chunk_size!r}.")
    try:
      chunk_size = operator.index(chunk_size)
    except TypeError:
      raise TypeError(f"{fn}: `chunk_size` must be an int or None. Got {chunk_size!r}.") from None
    if chunk_size < 1:
      raise ValueError(f"{fn}: `chunk_size` must be positive. Got {chunk_size}.")

  def impl(x, kernel, labels, bias, weight, class_axis_name, row_axes=(), groups=1):
    lead, (d, vocab) = x.shape[:-1], kernel.shape  # this device's share
    n = math.prod(lead)
    chunk = default_chunk_size(n, vocab) if chunk_size is None else chunk_size
    per_group = vocab // groups
    chunk = min(max(1, chunk // groups), per_group)
    flat_labels = labels.reshape(n)
    classes = _collective.class_slice(flat_labels, vocab, class_axis_name)
    stats = linear_label_stats(
        x.reshape(n, d), kernel, bias, classes.local_labels,
        weight if eps else None, chunk, softcap, bool(eps), groups)
    stats = _collective.combine(stats, class_axis_name)
    loss = integer_target_loss(
        stats.lse,
        stats.picked,
        flat_labels,
        classes=classes,
        weight=weight,
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
  if class_axis_name is not None:
    return impl(*args, class_axis_name)
  if reduction != "none" and kernel.dtype.itemsize >= 4 and chunk_size is None:
    # 32-bit kernels: the dkernel accumulator costs no more than dkernel, so
    # the forward computes the gradients and the logits once (three matmuls).
    n = math.prod(lead)
    options = _linear_grads.Options(ignore_index, reduction, eps, z, softcap)
    return _linear_grads.linear_loss(
        x.reshape(n, x.shape[-1]), kernel, bias, labels.reshape(n), weight, options)
  # Under jit, a kernel that XLA's partitioner may have split over its
  # vocabulary axis: as many groups as possible up to one per device, so
  # that any mesh axis size dividing both V and the device count lines up.
  return impl(*args, None, groups=math.gcd(vocab, jax.device_count()))
