"""`linear_cross_entropy(..., backward="precompute")`: the forward computes
the gradients too, so every logit is computed once (three matmuls in all, as
on materialized logits, against the four of the recomputing backward of
`_linear_stats`).

The tokens are streamed in blocks of rows. Each block's full-vocabulary
logits are one float32 [rows, V] temporary; its statistics are
`_stats.label_stats` of them; the cotangent of those statistics comes from
autodiff of `_reduction.integer_target_loss` (the same function that forms
the loss), and autodiff of `label_stats` turns it into the block's logit
cotangent, from which dx (written per block), dkernel (accumulated in
float32, or float64 for a float64 kernel), dbias and dweight follow. The
custom_vjp keeps the gradients (`PrecomputedGrads`) and its backward scales
them by the cotangent: a kernel-sized array (twice the kernel's bytes for a
16-bit kernel) lives from the forward to the backward.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxce import _checks, _cpu_features
from jaxce._collective import ClassSlice
from jaxce._linear_stats import BLOCK_ELEMENTS, cpu_transposed, mixed_matmul, soft_cap
from jaxce._reduction import integer_target_loss
from jaxce._stats import LabelStats, SmoothingSums, label_stats

# One float32 [rows, V] logits block: 4 * BLOCK_ELEMENTS = 2**24 elements
# (64 MiB). Smaller blocks make each block's dkernel update (a read and a
# write of the [D, V] accumulator) weigh more against its matmuls.
ROW_BLOCK_ELEMENTS = 4 * BLOCK_ELEMENTS

# backward="auto" precomputes only when a block holds at least this many
# rows, i.e. V <= ROW_BLOCK_ELEMENTS / MIN_ROWS = 52428. Measured on CPU
# (benchmarks/linear_backward.py, float32 value_and_grad, precompute /
# recompute time), on the AVX-512 machine of 2026-12-06: 0.85-0.89 with
# 512-524 rows (V = 32000, 32768), about 0.86 with 333 (V = 50257),
# 0.86-1.41 with 256 (V = 65536), 1.18-1.49 with 128 (V = 131072) and
# 2.5-4.3 with 16 (V = 2**20). With the transposed dkernel product, on the
# AVX2 machine of 2026-12-07: 0.64-0.81 below the bound, 0.75 with 256
# rows, 0.89 with 128 and 3.8 with 16 (docs/guides/fused-linear.md).
MIN_ROWS = 320


class Options(NamedTuple):  # static: everything but the arrays
  ignore_index: int | None
  reduction: str  # "mean" or "sum"
  label_smoothing: float
  z_loss: float
  softcap: float | None


class PrecomputedGrads(NamedTuple):
  """What the forward keeps for the backward: the gradients of the loss,
  to be scaled by the cotangent (and cast to the inputs' dtypes)."""

  dx: jax.Array  # [N, D], x's dtype
  dkernel: jax.Array  # [D, V] float32 (float64): the accumulator, kernel-sized
  dbias: jax.Array | None  # [V]
  dweight: jax.Array | None  # [V]


def block_rows(num_tokens: int, vocab: int) -> int:
  """Rows of one [rows, V] logits block: at most about ROW_BLOCK_ELEMENTS
  elements, the N tokens split evenly (`_checks.even_block`). With the
  largest blocks instead, N=1024 at V=50257 ran 4 x 333 rows and took
  1.35x the time of 4 x 256."""
  return _checks.even_block(num_tokens, ROW_BLOCK_ELEMENTS // max(vocab, 1))


def auto_backward(
    kernel_shape: tuple[Any, ...],
    kernel_dtype: DTypeLike,
    num_tokens: object,
    *,
    reduction: str,
    forward_mode: bool,
    chunk_size: int | None,
    class_sharded: bool,
    groups: int,
    bias: bool = False,
) -> Literal["precompute", "recompute"]:
  """What `backward="auto"` runs where the platform allows it (see
  `platforms`): "precompute" or "recompute".

  Precompute when the reduction is "mean" or "sum" (the gradient must be
  known in the forward), forward mode is off, no `chunk_size` is given (a
  vocabulary chunk asks for the streamed path), the vocabulary is not split
  over devices (no `class_axis_name`, no Explicit-mesh split, and no number
  of devices (the mesh in the arrays' types, else the device count) sharing
  a factor with V, under which XLA may have split the kernel: `groups` ==
  1), the number of tokens is concrete, V > 0, there is no bias, and a row
  block holds at least `MIN_ROWS` rows (``V <= ROW_BLOCK_ELEMENTS /
  MIN_ROWS`` = 52428): with fewer, rereading and rewriting the [D, V]
  dkernel accumulator per block costs more than the matmul it saves. A
  16-bit kernel also needs ``D * V <= ROW_BLOCK_ELEMENTS`` (its float32
  accumulator, twice the kernel's bytes, at most one logits block, 64 MiB)
  or ``N >= 4 * D``: the accumulator and the matmuls' float32 copy of the
  kernel (on CPU, `mixed_matmul`) then take at most the bytes of the 16-bit
  [N, V] logits, and precompute's temp memory stayed below the materialized
  logits' (optax) at every such shape measured (the fused-loss guide). With a
  bias, XLA:CPU writes the block's biased logits out beside the matmul's
  (192 MiB of temp against 64 at N=1024, D=128, V=16384), and recompute was
  faster at every shape measured: precompute / recompute 1.03-2.49 in each
  round, N=256 to 4096, V=8192 to 50000 (`benchmarks/linear_backward.py
  --optax --bias`). Decided from static shapes and options only.
  """
  hidden, vocab = kernel_shape
  if (reduction == "none" or forward_mode
      or chunk_size is not None or class_sharded or groups != 1 or bias
      or not _checks.static(num_tokens, vocab) or vocab == 0):
    return "recompute"
  if np.dtype(kernel_dtype).itemsize < 4 and not (
      _checks.static(hidden)
      and (hidden * vocab <= ROW_BLOCK_ELEMENTS or 4 * hidden <= cast(int, num_tokens))):
    return "recompute"
  return "precompute" if ROW_BLOCK_ELEMENTS // vocab >= MIN_ROWS else "recompute"


def platforms(kernel_dtype: DTypeLike) -> tuple[str, ...]:
  """The platforms on which `backward="auto"` precomputes, when
  `auto_backward` allows it; the others recompute.

  32- and 64-bit kernels: CPU and GPU (CUDA, ROCm), not TPU, where XLA:TPU's
  default-precision matmuls read a float32 kernel as bfloat16, and a token
  block loop that reads all of it every block gets a bf16 [D, V] copy of it
  ahead of the loop (256 MiB at D=4096, V=32768: more than a batch-sharded
  slice's logits).

  16-bit kernels: CPU only. Their dkernel accumulates in float32 (twice the
  kernel's bytes, the residual), and on CPU the matmuls take float32
  operands (`_linear_stats.mixed_matmul`). On a CPU without bfloat16 dot
  instructions (AMD Zen 3, AVX2) that took less temp memory than optax on
  the materialized logits, and 0.70-0.78x the time of the recomputing path
  (whose chunk products take float32 operands there too) at 2048-4096 x
  512-1024 x 32000-50257 in bfloat16 (0.50-0.93x at 12 of 13 shapes with
  D of 128 to 1024 before that path's float32 operands;
  `benchmarks/linear_backward.py --optax --dtype bfloat16`;
  docs/guides/fused-linear.md). A bfloat16 kernel on a host that has them
  (`_cpu_features.native_bf16_dot`) recomputes everywhere: there XLA:CPU's
  bf16 matmuls are the fast ones, and precompute took 1.27-1.48x
  recompute's time at 5 shapes (AMD Zen 4, measured before the transposed
  dkernel product; the guide's "Speed notes"). On GPU and TPU the doubled
  kernel was not measured against the matmul it saves.
  """
  dtype = np.dtype(kernel_dtype)
  if dtype.itemsize < 4:
    return () if _cpu_features.native_bf16_dot(dtype) else ("cpu",)
  return ("cpu", "cuda", "rocm")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def precomputed_loss(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, labels: jax.Array,
                     weight: jax.Array | None, options: Options) -> jax.Array:
  """The reduced loss of `x @ kernel + bias` ([N, D] x [D, V], V > 0), with
  `labels` int32 codes from `_checks.class_labels`."""
  loss: jax.Array = _run(x, kernel, bias, labels, weight, options, grads=False)[0]
  return loss


# One jit (inlined under an outer one), so that eager calls reuse one
# executable rather than tracing a fresh scan body each time.
@functools.partial(jax.jit, static_argnames=("options", "grads"))
def _run(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, labels: jax.Array,
         weight: jax.Array | None, options: Options,
         grads: bool) -> tuple[jax.Array, PrecomputedGrads | None]:
  n = x.shape[0]
  vocab = kernel.shape[1]
  ct = _checks.compute_dtype(x.dtype)
  rows = block_rows(n, vocab)
  smoothing = bool(options.label_smoothing)
  smoothing_weight = weight if smoothing else None

  def loss_of(stats: LabelStats, weight: jax.Array | None) -> jax.Array:
    return integer_target_loss(
        stats, labels, classes=ClassSlice(labels, vocab, None), weight=weight,
        ignore_index=options.ignore_index, reduction=options.reduction,
        label_smoothing=options.label_smoothing, z_loss=options.z_loss)

  def stats_of(raw: jax.Array, labels_rows: jax.Array, w: jax.Array | None) -> LabelStats:
    z = raw if options.softcap is None else soft_cap(raw, options.softcap)[0]
    return label_stats(z, labels_rows, w, None, 1, smoothing)

  def put(all_stats: LabelStats, block: LabelStats, start: jax.Array) -> LabelStats:
    out: LabelStats = jax.tree.map(
        lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, start, 0), all_stats, block)
    return out

  def step(carry: tuple[LabelStats, Any], j: jax.Array) -> tuple[tuple[LabelStats, Any], None]:
    all_stats, acc = carry
    start = jnp.minimum(j * rows, n - rows)  # the last block shifted in bounds
    fresh = start + jnp.arange(rows, dtype=jnp.int32) >= j * rows
    x_rows = jax.lax.dynamic_slice_in_dim(x, start, rows)
    y_rows = jax.lax.dynamic_slice_in_dim(labels, start, rows)
    raw = mixed_matmul(x_rows, kernel, (1,), (0,))  # [rows, V] float32
    if bias is not None:
      raw = raw + bias.astype(ct)[None]
    if not grads:
      return (put(all_stats, stats_of(raw, y_rows, smoothing_weight), start), acc), None
    block, stats_vjp = jax.vjp(lambda r, w: stats_of(r, y_rows, w), raw, smoothing_weight)
    all_stats = put(all_stats, block, start)
    # The loss depends on a row's statistics through that row's term alone
    # (the "mean" denominator needs no logits), so the cotangent of this
    # block's rows is exact whatever the rows of later blocks hold yet. (An
    # elementwise pass over N per block, against the block's matmuls.)
    _, loss_vjp = jax.vjp(lambda s: loss_of(put(all_stats, s, start), weight), block)
    (g,) = loss_vjp(jnp.ones((), ct))
    # Rows shared with the previous block (the last block's overlap) count once.
    g = jax.tree.map(lambda v: jnp.where(fresh, v, 0.0), g)
    dz, dw = stats_vjp(g)
    dx, dkernel, dbias, dweight = acc
    dx_rows = mixed_matmul(dz, kernel, (1,), (1,)).astype(dx.dtype)
    old = jax.lax.dynamic_slice_in_dim(dx, start, rows)
    dx = jax.lax.dynamic_update_slice_in_dim(dx, jnp.where(fresh[:, None], dx_rows, old), start, 0)
    # x_rows^T . dz from a transposed copy of the block's rows on CPU: XLA:CPU's
    # matmul contracting both first axes took 1.3-2.2x the time of this
    # plain one (4096 x 512 x 8192, 1024 x 128 x 16384, ...); elsewhere the
    # transpose folds into the matmul.
    x_t = cpu_transposed(x_rows)
    dkernel = dkernel + mixed_matmul(x_t, dz, (1,), (0,)).astype(dkernel.dtype)
    if dbias is not None:
      dbias = dbias + jnp.sum(dz, axis=0)
    if dweight is not None and dw is not None:
      dweight = dweight + dw.astype(ct)
    return (all_stats, (dx, dkernel, dbias, dweight)), None

  zeros = jnp.zeros((n,), ct)
  sums = (zeros,) * 3 if smoothing else None
  init_stats = LabelStats(zeros, zeros, zeros, None if sums is None else SmoothingSums(*sums),
                          zeros)
  acc: tuple[Any, ...] = ()
  if grads:
    # A 16-bit kernel's gradient accumulates in float32 across the blocks.
    acc = (jnp.zeros(x.shape, x.dtype), jnp.zeros(kernel.shape, ct),
           None if bias is None else jnp.zeros(bias.shape, ct),
           None if weight is None else jnp.zeros(weight.shape, ct))
  all_stats = init_stats
  if n:  # (no tokens: no block to slice)
    (all_stats, acc), _ = jax.lax.scan(step, (init_stats, acc),
                                       jnp.arange(-(-n // rows), dtype=jnp.int32))
  if not grads:
    return loss_of(all_stats, weight), None
  dx, dkernel, dbias, dweight = acc
  if weight is None:
    loss = loss_of(all_stats, weight)
  else:  # the class weight's own terms: the label's weight and the denominator
    loss, loss_vjp = jax.vjp(lambda w: loss_of(all_stats, w), weight)
    dweight = dweight + loss_vjp(jnp.ones((), loss.dtype))[0].astype(ct)

  def cast(v: jax.Array, like: jax.Array | None) -> jax.Array | None:
    return None if like is None else v.astype(like.dtype)

  return loss, PrecomputedGrads(dx, dkernel, cast(dbias, bias), cast(dweight, weight))


def _fwd(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, labels: jax.Array,
         weight: jax.Array | None, options: Options) -> tuple[jax.Array, PrecomputedGrads | None]:
  out: tuple[jax.Array, PrecomputedGrads | None] = _run(
      x, kernel, bias, labels, weight, options, grads=True)
  return out


def _bwd(options: Options, res: PrecomputedGrads, g: jax.Array) -> tuple[jax.Array | None, ...]:
  del options
  def scaled(v: jax.Array | None, dtype: DTypeLike | None = None) -> jax.Array | None:
    # (in the loss's dtype: a 16-bit dx or dbias is widened, not promoted)
    if v is None:
      return None
    return (g * v.astype(g.dtype)).astype(v.dtype if dtype is None else dtype)

  # (x and kernel share a dtype, `_checks`: the kernel's is dx's.)
  return (scaled(res.dx), scaled(res.dkernel, res.dx.dtype), scaled(res.dbias), None,
          scaled(res.dweight))


precomputed_loss.defvjp(_fwd, _bwd)
