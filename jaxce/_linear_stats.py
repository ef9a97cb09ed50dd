"""Per-token statistics of `x @ kernel + bias` streamed over vocabulary
chunks, never materializing the [N, V] logits: the kernels of
`linear_cross_entropy`.

Both kernels share one primal: it streams the chunks with an online
logsumexp (float32) and returns `_stats.LabelStats` (a stop-gradient shift,
the log-sum above it, the label's logit relative to it, the label-smoothing
sums), which `_collective.combine` and `_reduction.integer_target_loss`
turn into the loss as for every other loss. They differ in the derivative:

* `linear_label_stats_rev` (default): a `jax.custom_vjp` whose backward
  recomputes each chunk's logits, accumulates dx in float32 (in row blocks
  on XLA:CPU) and writes each chunk's dkernel / dbias columns in place.
  Reverse mode only.
* `linear_label_stats` (`forward_mode=True`): a `jax.custom_jvp` whose
  tangent recomputes each chunk's logits, takes their softmax from the
  saved (shift, log_sum) and contracts it with the chunk's tangent logits
  `dx @ W_c + x @ dW_c + db_c` (times the soft-cap's derivative). The
  tangent is rematerialized (`jax.checkpoint` saving nothing), so reverse
  mode, which JAX gets by transposing it, keeps the same residuals.

Residuals in both: x, kernel, bias, int32 labels, the class weight (label
smoothing only) and two float32 numbers per token (shift, log_sum); the
reduction after them keeps a few more per token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxce import _checks, _cpu_features
from jaxce._barrier import on_cpu
from jaxce._collective import match_vma
from jaxce._stats import LabelStats, SmoothingSums, take_at
from jaxce._vma import vary_like

# Elements of one float32 block (16 MiB): sets the default vocabulary chunk
# ([N, chunk] logits) and, on CPU, the row blocks of the dx accumulation
# ([rows, D]; `_add_rows_matmul`).
BLOCK_ELEMENTS = 2**22

# The vocabulary chunk of the recomputing backward off CPU (`_rev_bwd`): half
# the elements. (These figures were taken with dx in row blocks of the same
# size, which that backward no longer uses: see `_add_rows_matmul`.) At the
# Llama-3 head (N=8192, D=4096, bf16) the backward's float32 [N, D] dx
# accumulator is 128 MiB and every float32 [N, chunk] block the compilers keep
# beside it counts: XLA:GPU (H100, H200) kept 169 MiB of temp memory with
# 16 MiB blocks and 154 with 8 MiB ones, XLA:TPU v5p 185 and 157; v5e and v6e
# are unchanged (129). XLA:CPU keeps the larger blocks (fewer, larger matmuls).
ACCEL_BLOCK_ELEMENTS = BLOCK_ELEMENTS // 2

# Elements of XLA:CPU's float32 [N, chunk] block when `chunk_size=None`
# (4 MiB; `cpu_chunk_size`): the chunk's logits and dz are each read and
# written beside two matmuls, and blocks that stay in this machine's caches
# (2 MiB L2 per core, 32 MiB L3) pay. Measured at 16 MiB (BLOCK_ELEMENTS)
# against explicit chunks, value_and_grad, medians of 5 shuffled rounds:
# 512 x 64 x 262144 0.67x the time (float32) and 0.67x (bfloat16) with 4 MiB
# blocks, 2048 x 256 x 65536 0.84x and 0.75x; flat at D=1024. But chunks
# narrower than CPU_MIN_CHUNK columns make thin matmuls: at 8192 x 512 x 65536
# chunks of 128 took 1.10x (bfloat16) and 1.13x (float32) the time of 512.
CPU_BLOCK_ELEMENTS = 2**20
CPU_MIN_CHUNK = 512

# Bytes of one panel of the CPU backward's 16-bit dkernel (`_rev_bwd_loop`):
# at most this much more temp memory (the whole kernel when it is smaller).
CPU_PANEL_BYTES = 2**24

# The chunk when the number of tokens is symbolic (`jax.export`): the
# block-size rule below needs a number.
SYMBOLIC_CHUNK = 1024

C = TypeVar("C")


def default_chunk_size(num_tokens: Any, vocab: int, block_elements: int | None = None,
                       column_bytes: int | None = None) -> int:
  """The vocabulary chunk used when `chunk_size=None`.

  The power of two that makes one float32 [N, chunk] block about 16 MiB
  (`block_elements`, default `BLOCK_ELEMENTS` = 2**22 elements), at least 128
  (a TPU lane multiple) and at most V. A symbolic N (`jax.export`) gets
  `SYMBOLIC_CHUNK` columns; a symbolic V, all of it (one chunk: the loop
  needs a chunk known to fit in V).

  The whole vocabulary when a float32 [N, V] block takes no more bytes than
  the kernel (4 N <= `column_bytes`, the kernel's bytes per column: D times
  its itemsize) and at most four blocks: the kernel's gradient is that
  large anyway, while every chunk adds kernel-sized copies (its columns,
  their transpose, the write of its gradient). Measured on CPU at D=128,
  value_and_grad against materialized logits: float32 N=64, V=151936 1.41x
  in chunks, 1.00x whole; bfloat16 N=64, V=262144 0.94x in chunks, 0.70x
  whole, both at most the materialized logits' temp memory.
  """
  if not _checks.static(vocab):
    return vocab
  if not _checks.static(num_tokens):
    return max(1, min(vocab, SYMBOLIC_CHUNK))
  block = BLOCK_ELEMENTS if block_elements is None else block_elements
  n = int(num_tokens)
  if _whole_vocabulary(n, vocab, column_bytes, block):
    return max(1, vocab)
  target = block // max(n, 1)
  chunk = 1 << max(7, target.bit_length() - 1) if target >= 128 else 128
  return max(1, min(vocab, chunk))


def cpu_chunk_size(num_tokens: Any, vocab: int, column_bytes: int | None = None) -> int:
  """XLA:CPU's vocabulary chunk when `chunk_size=None`: `default_chunk_size`
  for a symbolic N, where that takes all of V for the kernel's sake, and
  where it is at most `CPU_MIN_CHUNK` (512) columns (N >= 8192); all of V
  in one chunk (no loop) when its block is at most twice
  `CPU_BLOCK_ELEMENTS`; else the power of two that makes a float32
  [N, chunk] block about `CPU_BLOCK_ELEMENTS` (4 MiB), but at least
  `CPU_MIN_CHUNK` columns (and at most V), narrowed to split V evenly
  (`_even_columns`). bfloat16 value_and_grad at
  D=128, V=1024: N=2048 in one chunk (8 MiB) took 0.77x the time of two,
  N=4096 in one (16 MiB) 1.44x."""
  if not _checks.static(num_tokens, vocab):
    return default_chunk_size(num_tokens, vocab)
  n = int(num_tokens)
  if (_whole_vocabulary(n, vocab, column_bytes, BLOCK_ELEMENTS)
      or n * vocab <= 2 * CPU_BLOCK_ELEMENTS):  # one chunk, no loop
    return max(1, vocab)
  small = default_chunk_size(n, vocab, CPU_BLOCK_ELEMENTS)
  return _even_columns(vocab, max(small, min(CPU_MIN_CHUNK, default_chunk_size(n, vocab))))


def _even_columns(vocab: int, chunk: int) -> int:
  """`chunk` narrowed to split V into as many chunks, evenly, in multiples
  of 128 columns: the loop shifts its last chunk back in bounds and computes
  the overlap twice (V = 50257 in chunks of 8192: 7 x 8192 = 57344
  columns, 14% more; 7 x 7296 = 51072). value_and_grad at N = 128, D = 128,
  bfloat16: 0.88x the time; N = 128 at V = 32000 and N = 256 at V = 50257,
  0.95x; unchanged (0.99-1.0x) where the chunks were even already."""
  if chunk >= vocab or chunk < 128:
    return chunk
  return min(chunk, -(-_checks.even_block(vocab, chunk) // 128) * 128)


def _whole_vocabulary(n: int, vocab: int, column_bytes: int | None, block: int) -> bool:
  # (a symbolic D, under jax.export: not known to be large enough)
  return (column_bytes is not None and _checks.static(column_bytes) and 4 * n <= column_bytes
          and n * vocab <= 4 * block)


def soft_cap(z: jax.Array, cap: float) -> tuple[jax.Array, jax.Array]:
  """(cap * tanh(z / cap), tanh(z / cap)); a -inf logit (from a -inf bias)
  stays -inf, so that class still takes no part."""
  t = jnp.tanh(z / cap)
  return jnp.where(z == -jnp.inf, -jnp.inf, cap * t), t


# The vocabulary is viewed as [G, V / G] groups (a free reshape) and each step
# handles one chunk of every group: on G devices with the kernel split over
# its vocabulary axis, XLA's partitioner then keeps every group where it lives
# instead of gathering the kernel. G is 1 on one device.


class Chunk(NamedTuple):
  z: jax.Array  # [N, G, c] float32 logits (soft-capped if asked)
  raw_tanh: jax.Array | None  # tanh(raw / softcap), for the softcap derivative
  cols: jax.Array  # [G, c] global class index of each column
  fresh: jax.Array  # [1, 1, c] columns first seen in this chunk (not the overlap)
  start: jax.Array  # first column of the slice within each group


def _grouped(v: jax.Array, groups: int) -> jax.Array:
  """[..., V] viewed as [..., G, V / G] (a free reshape)."""
  return v.reshape(*v.shape[:-1], groups, v.shape[-1] // groups)


def group_cols(v: jax.Array, start: jax.Array, size: int, groups: int) -> jax.Array:
  """[..., G, size]: columns start:start+size of each of the G equal slices
  of v's last axis. With one group no view is taken (see `_write_cols`)."""
  if groups == 1:
    return jnp.expand_dims(jax.lax.dynamic_slice_in_dim(v, start, size, axis=v.ndim - 1), -2)
  g = _grouped(v, groups)
  return jax.lax.dynamic_slice_in_dim(g, start, size, axis=g.ndim - 1)


@jax.custom_jvp
def _opaque_bits(v: jax.Array) -> jax.Array:
  """v, through an optimization barrier as its integer bits."""
  bits = jax.lax.optimization_barrier(jax.lax.bitcast_convert_type(v, jnp.uint32))
  return jax.lax.bitcast_convert_type(bits, v.dtype)


_opaque_bits.defjvp(lambda primals, tangents: (_opaque_bits(*primals), tangents[0]))


def kernel_cols(kernel: jax.Array, start: jax.Array, size: int, groups: int) -> jax.Array:
  """`group_cols` of a kernel inside a chunk loop. On TPU a float32 chunk
  passes a barrier as its bits: XLA:TPU's default-precision matmul reads
  float32 as bfloat16, and its bfloat16 propagation would narrow the whole
  loop-invariant kernel once, ahead of the loop, into a bf16 [D, V] copy
  (1002 MiB at the Llama-3 head). Integer bits it cannot narrow, so each
  chunk is converted where it is used."""
  cols = group_cols(kernel, start, size, groups)
  if cols.dtype != jnp.float32:
    return cols
  out: jax.Array = jax.lax.platform_dependent(cols, tpu=_opaque_bits, default=lambda c: c)
  return out


def matmul(a: jax.Array, b: jax.Array, contract_a: Sequence[int],
           contract_b: Sequence[int]) -> jax.Array:
  """a . b over the given axes, in the inputs' dtype, accumulated in float32
  (float64 for float64 inputs)."""
  dims = ((tuple(contract_a), tuple(contract_b)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=_checks.compute_dtype(a.dtype))


def mixed_matmul(a: jax.Array, b: jax.Array, contract_a: Sequence[int],
                 contract_b: Sequence[int], widen: bool = True) -> jax.Array:
  """`matmul` of a 16- or 32-bit input and an operand that may be a float32
  cotangent, both in the narrower dtype. On a CPU without bfloat16 dot
  instructions (`_cpu_features`), a program lowered for CPU widens 16-bit
  operands to float32 instead: there XLA:CPU runs bf16 x bf16 -> float32
  matmuls in a kernel that took 1.5x the time of a float32 one on
  converted copies (a [2048, 512] x [512, 512] chunk on AMD Zen 3: 12.3
  against 8.3 ms), and runs optax's bf16 matmuls on float32 copies too (the
  cotangent is then not rounded to 16 bits). In the recomputing path's
  chunk loops that took bfloat16 `value_and_grad` to 0.63-0.78x its time at
  N x D x V of 512-2048 x 128 x 65536-262144 and 2048 x 512 x 50257, for
  float32 copies of x and x.T that XLA hoists out of the loop (3-9 MiB more
  temp memory there; `benchmarks/against_commit.py`, the fused-loss guide),
  hence `_widened`. `widen=False` keeps 16-bit operands everywhere."""
  narrow = a.dtype if a.dtype.itemsize < b.dtype.itemsize else b.dtype
  if narrow.itemsize >= 4:
    return matmul(a, b, contract_a, contract_b)
  rounded: Callable[[jax.Array, jax.Array], jax.Array] = lambda a, b: matmul(
      a.astype(narrow), b.astype(narrow), contract_a, contract_b)
  if not widen or _cpu_features.native_bf16_dot(narrow):
    return rounded(a, b)
  ct = _checks.compute_dtype(narrow)
  out: jax.Array = jax.lax.platform_dependent(
      a, b, cpu=lambda a, b: matmul(a.astype(ct), b.astype(ct), contract_a, contract_b),
      default=rounded)
  return out


# At most this many bytes of float32 copies of x and x.T (8 N D) for
# `mixed_matmul`'s widened chunk products, as for the precomputing backward's
# float32 accumulator of a 16-bit kernel (one 64 MiB logits block): above
# it the 16-bit products keep the default's memory as it was (196 MiB of
# temp at N=8192, D=4096 in bfloat16, against 448 widened).
WIDEN_BYTES = 2**26


def _widened(x: jax.Array, chunk: Any, per_group: Any) -> bool:
  """Whether the chunk products may widen (`mixed_matmul`): the kernel is
  read in chunks of a loop (whole, its float32 copy would be a second
  kernel), and float32 copies of x and x.T fit in `WIDEN_BYTES`."""
  return (_checks.static(chunk, per_group, *x.shape) and chunk < per_group
          and 8 * math.prod(x.shape) <= WIDEN_BYTES)


def chunk_logits(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, i: jax.Array,
                 chunk: int, softcap: float | None, groups: int) -> Chunk:
  """Logits of chunk i of every group. The last chunk is shifted left to stay
  in bounds (no padded copy of the kernel); the columns it shares with the
  previous chunk are marked not `fresh`."""
  per_group = kernel.shape[-1] // groups
  start = jnp.minimum(i * chunk, per_group - chunk)
  z = mixed_matmul(x, kernel_cols(kernel, start, chunk, groups), (1,), (0,),
                   widen=_widened(x, chunk, per_group))
  if bias is not None:
    z = z + group_cols(bias, start, chunk, groups).astype(z.dtype)[None]
  t: jax.Array | None = None
  if softcap is not None:
    z, t = soft_cap(z, softcap)
  offsets = jnp.arange(groups, dtype=jnp.int32)[:, None] * per_group
  cols = offsets + start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
  fresh = (start + jnp.arange(chunk, dtype=jnp.int32) >= i * chunk)[None, None, :]
  return Chunk(z, t, cols, fresh, start)


def class_weights(weight: jax.Array | None, ch: Chunk) -> jax.Array:
  if weight is None:
    return jnp.ones((1, *ch.cols.shape), ch.z.dtype)
  groups, size = ch.cols.shape
  return group_cols(weight, ch.start, size, groups).astype(ch.z.dtype)[None]


def _cpu_barrier(kernel: jax.Array) -> jax.Array:
  """An optimization barrier on a 16-bit kernel carried through a chunk
  loop, on CPU only: XLA:CPU widens a bf16 dynamic-slice to float32 by
  converting its whole operand, and would hoist that [D, V] float32 copy out
  of a loop in which the kernel is invariant. Other backends slice in place
  and need no barrier."""
  return kernel if kernel.dtype.itemsize >= 4 else on_cpu(kernel)


def _cpu_loop_barrier(invariant: tuple[Any, ...], variant: tuple[Any, ...]
                      ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
  """`_cpu_barrier` for loop-invariant arrays that are not in the carry:
  behind one barrier with loop-variant values, they read as loop-variant, so
  XLA:CPU cannot hoist a float32 copy of them out of the loop. `variant` is
  the loop index for primals and the carry for tangents: JAX (0.11) cannot
  transpose a barrier that mixes a tangent with a primal ("has no attribute
  accum" in reverse mode over forward mode)."""
  if all(a is None or a.dtype.itemsize >= 4 for a in invariant):
    return invariant, variant
  # Inside shard_map (an Explicit mesh's vocabulary split included) the
  # barrier's outputs vary along the union of its operands' axes: the
  # variant ones too, so that both branches return the same types.
  return on_cpu(vary_like((invariant, variant), *invariant, *variant))


def _scan_chunks(step: Callable[[Any, jax.Array, jax.Array], Any], carry: Any,
                 kernel: jax.Array, chunk: int, per_group: int,
                 first: jax.Array | int = 0, count: int | None = None) -> Any:
  """carry after step(carry, kernel, i) over the chunks i (all of them, or
  `count` from `first`); the kernel rides in the loop carry (see
  `_cpu_barrier`)."""

  def body(state: tuple[C, jax.Array], i: jax.Array) -> tuple[tuple[C, jax.Array], None]:
    carry, kernel = state
    kernel = _cpu_barrier(kernel)
    return (step(carry, kernel, i), kernel), None

  n = -(-per_group // chunk) if count is None else count
  steps = first + jnp.arange(n, dtype=jnp.int32)
  (carry, _), _ = jax.lax.scan(body, (carry, kernel), steps)
  return carry


def _while_chunks(step: Callable[[Any, jax.Array, jax.Array], Any], carry: Any,
                  kernel: jax.Array, chunk: int, per_group: int) -> Any:
  """`_scan_chunks` over all chunks as a `lax.while_loop`, for the forward
  statistics, which JAX never differentiates through the loop (their custom
  rules give the derivatives). Under a user's `jax.checkpoint`, a scan
  whose outputs must be recomputed in the backward keeps what the policy
  allows of its body: `dots_saveable` kept every chunk's logits, the [N, V]
  array the fused loss exists to avoid. A while loop is recomputed whole.
  XLA compiles a scan to a while loop: the program is the same."""

  def body(state: tuple[jax.Array, Any, jax.Array]) -> tuple[jax.Array, Any, jax.Array]:
    i, carry, kernel = state
    kernel = _cpu_barrier(kernel)
    return i + 1, step(carry, kernel, i), kernel

  n = -(-per_group // chunk)
  _, carry, _ = jax.lax.while_loop(lambda state: state[0] < n, body,
                                   (jnp.zeros((), jnp.int32), carry, kernel))
  return carry


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7, 8))
def linear_label_stats(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                       labels: jax.Array, weight: jax.Array | None, chunk: int,
                       softcap: float | None, smoothing: bool, groups: int) -> LabelStats:
  """`LabelStats` of `x @ kernel + bias` ([N, D] x [D, V]; soft-capped if
  asked), streamed over chunks of `chunk` columns of each of `groups` equal
  slices of the vocabulary. `labels` are int32 [N]; `weight` ([V] or None)
  only enters the smoothing sums, computed when `smoothing` is true."""
  return _primal(x, kernel, bias, labels, weight, chunk, softcap, smoothing, groups)


def _finite(m: jax.Array) -> jax.Array:
  return jnp.where(jnp.isfinite(m), m, 0.0)


def _label_logit(z: jax.Array, ch: Chunk, labels: jax.Array, i: jax.Array,
                 chunk: int) -> jax.Array:
  """[N]: z at each row's label column where this chunk holds it first
  (`fresh`), else 0; exact, as one term. A select and a row sum, except on
  XLA:CPU with one group: there the select is a loop fusion of its own that
  writes an [N, chunk] float32 array beside the chunk's logits (forward temp
  32 MiB against the materialized logits' 16 at 64 x 128 x 65536), and a
  gather of N numbers takes its place."""

  def select() -> jax.Array:
    hot = (ch.cols[None] == labels[:, None, None]) & ch.fresh
    return jnp.sum(jnp.where(hot, z, 0.0), axis=(1, 2))

  if ch.cols.shape[0] != 1:  # groups: a gather would cross the split
    return select()

  def gather() -> jax.Array:
    # (0 outside the chunk; columns before i * chunk were seen before)
    got = take_at(z[:, 0], labels - ch.start, 1)
    return jnp.where(labels >= i * chunk, got, 0.0)

  out: jax.Array = jax.lax.platform_dependent(cpu=gather, default=select)
  return out


# The chunk loop's carry: running max, sum, label logit, smoothing sums.
PrimalCarry = tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]


def _primal(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, labels: jax.Array,
            weight: jax.Array | None, chunk: int, softcap: float | None, smoothing: bool,
            groups: int) -> LabelStats:
  ct = _checks.compute_dtype(x.dtype)
  n = x.shape[0]
  zeros = jnp.zeros((n,), ct)
  axes = (1, 2)

  def step(carry: PrimalCarry, kernel: jax.Array, i: jax.Array) -> PrimalCarry:
    m, s, picked, sums = carry  # m: running max (-inf until a class is active)
    ch = chunk_logits(x, kernel, bias, i, chunk, softcap, groups)
    z = jnp.where(ch.fresh, ch.z, -jnp.inf)  # count each class once
    m_new = jnp.maximum(m, jnp.max(z, axis=axes))
    shift = _finite(m_new)
    col = shift[:, None, None]
    s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - col), axis=axes)
    picked = picked + _label_logit(z, ch, labels, i, chunk)
    if smoothing:
      active = z > -jnp.inf
      w = class_weights(weight, ch)
      ws, wsum, count = sums
      # re-based on the new shift, so no sum ever holds a large logit
      ws = ws + wsum * (_finite(m) - shift) + jnp.sum(
          jnp.where(active, w * jnp.where(active, z - col, 0.0), 0.0), axis=axes)
      wsum = wsum + jnp.sum(jnp.where(active, w, 0.0), axis=axes)
      count = count + jnp.sum(active, axis=axes, dtype=ct)
      sums = (ws, wsum, count)
    return m_new, s, picked, sums

  init: PrimalCarry = (
      jnp.full((n,), -jnp.inf, ct), zeros, zeros, (zeros,) * 3 if smoothing else ())
  init = vary_like(init, x, kernel, bias, labels, weight)
  m, s, picked, sums = _while_chunks(step, init, kernel, chunk, kernel.shape[1] // groups)
  shift = _finite(m)
  inside = (labels >= 0) & (labels < kernel.shape[1])
  picked = jnp.where(inside, picked - shift, 0.0)
  return LabelStats(shift, jnp.log(s), picked, SmoothingSums(*sums) if smoothing else None)


def cpu_transposed(x: jax.Array) -> jax.Array:
  """x.T, materialized on CPU only: XLA:CPU has no native bf16 matmul that
  contracts both operands' first axes (it would upcast all of x, per chunk),
  and in float32 that matmul took 1.3-2.2x the time of a plain one from
  the transposed copy (N x D x V of 1024-4096 x 128-1024 x 4096-32000); the
  barrier keeps XLA from folding the transpose back into the matmul.
  Elsewhere a plain transpose, which XLA folds into the matmul."""
  out: jax.Array = jax.lax.platform_dependent(
      x, cpu=lambda x: jax.lax.optimization_barrier(x.T), default=lambda x: x.T)
  return out


def _rows_product(x_t: jax.Array, x: jax.Array, dz: jax.Array, widen: bool) -> jax.Array:
  """x^T . dz over the rows ([D, ...]): on CPU from `cpu_transposed`;
  elsewhere as (dz^T . x) moved to [D, ...], which reads x in its own
  layout. Written x^T . dz, XLA:TPU keeps a column-major copy of x for the
  loop and XLA:GPU a transposed one (64 MiB at the Llama-3 head; libtpu
  0.0.50 no longer places the TPU's in dx's output buffer). `widen`: see
  `mixed_matmul`."""
  def x_first(x_t: jax.Array, x: jax.Array, dz: jax.Array) -> jax.Array:
    return mixed_matmul(x_t, dz, (1,), (0,), widen)

  def dz_first(x_t: jax.Array, x: jax.Array, dz: jax.Array) -> jax.Array:
    return jnp.moveaxis(mixed_matmul(dz, x, (0,), (0,), widen), -1, 0)

  out: jax.Array = jax.lax.platform_dependent(x_t, x, dz, cpu=x_first, default=dz_first)
  return out


def _first_axes_product(x_t: jax.Array, cols: jax.Array) -> jax.Array:
  """x_t . cols over both first axes, accumulated in float32. On CPU
  half-precision operands are widened first: XLA:CPU (jaxlib 0.10) leaves
  this bf16 x bf16 -> f32 product to a runtime that does not implement it
  ("Unsupported element type for DotThunk"), so forward mode's `jax.jvp`
  failed to run in bfloat16. Elsewhere the inputs' dtype, as in `matmul`."""
  def widened(x_t: jax.Array, cols: jax.Array) -> jax.Array:
    ct = _checks.compute_dtype(x_t.dtype)
    return matmul(x_t.astype(ct), cols.astype(ct), (0,), (0,))

  out: jax.Array = jax.lax.platform_dependent(
      x_t, cols, cpu=widened, default=lambda x_t, cols: matmul(x_t, cols, (0,), (0,)))
  return out


def _zero(t: object) -> bool:
  return t is None or isinstance(t, SymbolicZero)


Tangents4 = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _tangent(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, labels: jax.Array,
             weight: jax.Array | None, shift: jax.Array, log_sum: jax.Array,
             dx: jax.Array | None, dkernel: jax.Array | None, dbias: jax.Array | None,
             dweight: jax.Array | None, chunk: int, softcap: float | None, smoothing: bool,
             groups: int) -> tuple[jax.Array, ...]:
  """Tangents of (log_sum, picked, weighted_sum, weight_sum) along
  (dx, dkernel, dbias, dweight) (None: zero), one chunk at a time."""
  ct = _checks.compute_dtype(x.dtype)
  n = x.shape[0]
  axes = (1, 2)
  cols_labels = labels[:, None, None]
  col: Callable[[jax.Array], jax.Array] = lambda v: v[:, None, None]
  # rows with no active class: p = exp(-inf - inf) = 0 rather than NaN
  base = col(shift + jnp.where(log_sum == -jnp.inf, jnp.inf, log_sum))
  dx = None if dx is None else dx.astype(ct)  # dx's cotangent accumulates in float32
  x_t = None if dkernel is None else cpu_transposed(x)

  # (prevent_cse: its barrier also keeps XLA:CPU from hoisting a float32
  # copy of a bf16 kernel out of the transposed loop: 424 vs 2412 MiB)
  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def step(carry: Tangents4, i: jax.Array) -> tuple[Tangents4, None]:
    (k,), (i,) = _cpu_loop_barrier((kernel,), (i,))
    dk = None
    if dkernel is not None:
      (dk,), carry = _cpu_loop_barrier((dkernel,), carry)
    ch = chunk_logits(x, k, bias, i, chunk, softcap, groups)
    dz = jnp.zeros((), ct)
    if dx is not None:
      dz = dz + matmul(dx, kernel_cols(k, ch.start, chunk, groups), (1,), (0,))
    if dkernel is not None:
      assert x_t is not None
      assert dk is not None
      # contracted against x transposed: reverse mode's transpose of this
      # product is then x_t @ dz, a plain matmul
      dz = dz + _first_axes_product(x_t, group_cols(dk, ch.start, chunk, groups))
    if dbias is not None:
      dz = dz + group_cols(dbias, ch.start, chunk, groups).astype(ct)[None]
    if softcap is not None:
      assert ch.raw_tanh is not None
      dz = dz * (1.0 - ch.raw_tanh**2)
    dz = jnp.where(ch.fresh, dz, 0.0)  # the overlap columns count once
    d_log_sum, d_picked, d_ws, d_wsum = carry
    d_log_sum = d_log_sum + jnp.sum(jnp.exp(ch.z - base) * dz, axis=axes)
    hot = ch.cols[None] == cols_labels
    d_picked = d_picked + jnp.sum(jnp.where(hot, dz, 0.0), axis=axes)
    if smoothing:
      active = ch.z > -jnp.inf
      d_ws = d_ws + jnp.sum(jnp.where(active, class_weights(weight, ch) * dz, 0.0), axis=axes)
      if dweight is not None:
        dw = jnp.where(active & ch.fresh, group_cols(dweight, ch.start, chunk, groups)
                       .astype(ct)[None], 0.0)
        d_ws = d_ws + jnp.sum(dw * jnp.where(active, ch.z - col(shift), 0.0),
                              axis=axes)
        d_wsum = d_wsum + jnp.sum(dw, axis=axes)
    return (d_log_sum, d_picked, d_ws, d_wsum), None

  zeros = jnp.zeros((n,), ct)
  init = vary_like((zeros,) * 4, x, kernel, bias, labels, weight, shift, log_sum, dx, dkernel,
                   dbias, dweight)
  steps = -(-(kernel.shape[1] // groups) // chunk)
  out: Tangents4 = jax.lax.scan(step, init, jnp.arange(steps, dtype=jnp.int32))[0]
  return out


# The whole tangent recomputes in reverse mode (x's transpose included):
# what the linearized program keeps is then the tangent's primal inputs.
_remat_tangent: Callable[..., Tangents4] = jax.checkpoint(
    _tangent, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(11, 12, 13, 14))


def _jvp(chunk: int, softcap: float | None, smoothing: bool, groups: int,
         primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[LabelStats, LabelStats]:
  x, kernel, bias, labels, weight = primals
  # (through the rule itself: differentiating the rule, e.g. grad of grad,
  # then takes this rule again rather than the while loop)
  stats = linear_label_stats(x, kernel, bias, labels, weight, chunk, softcap, smoothing, groups)
  dx, dkernel, dbias, _, dweight = (None if _zero(t) else t for t in tangents)
  zeros = jnp.zeros_like(stats.shift)
  if dx is None and dkernel is None and dbias is None and (dweight is None or not smoothing):
    d = (zeros,) * 4
  else:
    d = _remat_tangent(x, kernel, bias, labels, weight, stats.shift, stats.log_sum, dx, dkernel,
                       dbias, dweight if smoothing else None, chunk, softcap, smoothing, groups)
  sums = SmoothingSums(d[2], d[3], zeros) if smoothing else None
  return stats, LabelStats(zeros, d[0], d[1], sums)


linear_label_stats.defjvp(_jvp, symbolic_zeros=True)


# ---------------------------------------------------------------------------
# Reverse mode only (the default): a custom_vjp whose backward writes each
# chunk's dkernel columns in place and accumulates dx in float32.


class LinearResiduals(NamedTuple):
  x: jax.Array  # [N, D]
  kernel: jax.Array  # [D, V]
  bias: jax.Array | None  # [V]
  labels: jax.Array  # [N] int32
  weight: jax.Array | None  # [V], only with label smoothing
  shift: jax.Array  # [N] float32
  log_sum: jax.Array  # [N] float32


class Plan(NamedTuple):
  """How the reverse-mode kernel streams the vocabulary, per backend (static).

  XLA:CPU takes `chunk` columns of each of `groups` equal slices of the
  vocabulary per step: a free view there, which keeps a vocabulary split by
  XLA's partitioner where it lives. Other backends take one group (the grouped
  view is a relayout copy of the whole kernel in their tiled layouts: 1 GiB at
  the Llama-3 head on a TPU v5e slice), `forward` columns per step in the
  forward and `backward` in the backward, whose dx takes one product per
  chunk (no row blocks: `_add_rows_matmul`). Decided by the platform the
  program is lowered for (`lax.platform_dependent`), not by the host's."""

  chunk: int
  groups: int
  forward: int
  backward: int

  @classmethod
  def single(cls, chunk: int) -> Plan:
    """The same chunk and one group everywhere."""
    return cls(chunk, 1, chunk, chunk)


def _primal_planned(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                    labels: jax.Array, weight: jax.Array | None, plan: Plan,
                    softcap: float | None, smoothing: bool) -> LabelStats:
  """The statistics as `plan` streams them, with `linear_label_stats`'
  derivatives (taken only when the custom_vjp's forward is differentiated:
  grad of grad)."""
  def cpu() -> LabelStats:
    return linear_label_stats(x, kernel, bias, labels, weight, plan.chunk, softcap, smoothing,
                              plan.groups)

  if plan.groups == 1 and plan.forward == plan.chunk:
    return cpu()
  out: LabelStats = jax.lax.platform_dependent(
      cpu=cpu, default=lambda: linear_label_stats(x, kernel, bias, labels, weight, plan.forward,
                                                  softcap, smoothing, 1))
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def linear_label_stats_rev(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                           labels: jax.Array, weight: jax.Array | None, plan: Plan,
                           softcap: float | None, smoothing: bool) -> LabelStats:
  """`linear_label_stats` for reverse mode only, with a hand-written backward,
  streamed as `plan` says for the backend it is lowered for."""
  return _primal_planned(x, kernel, bias, labels, weight, plan, softcap, smoothing)


def _rev_fwd(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, labels: jax.Array,
             weight: jax.Array | None, plan: Plan, softcap: float | None,
             smoothing: bool) -> tuple[LabelStats, LinearResiduals]:
  stats = _primal_planned(x, kernel, bias, labels, weight, plan, softcap, smoothing)
  assert stats.log_sum is not None
  return stats, LinearResiduals(x, kernel, bias, labels, weight, stats.shift, stats.log_sum)


def _add_rows_matmul(acc: jax.Array, a: jax.Array, b: jax.Array,
                     block_elements: int | None, widen: bool) -> jax.Array:
  """acc + a . b over their last two axes (a float32; `mixed_matmul`).

  On CPU (`block_elements` given) in blocks of rows of about that many
  elements: XLA:CPU would keep a [N, D] float32 product beside the [N, D]
  float32 accumulator. Elsewhere (None) one product: XLA:TPU fuses the sum
  into the matmul and XLA:GPU into its GEMM, and row blocks (dynamic slices
  of the token axis) made XLA's partitioner replicate dx on a batch-sharded
  mesh: the whole float32 dx on every device and an all-gather of each
  chunk's dz (value_and_grad at the Llama-3 head on a v5p 2x2x1 slice, batch
  sharded: 145 MiB of temp memory with row blocks, 39 without)."""
  shape: tuple[Any, ...] = acc.shape  # a dim may be symbolic (jax.export)
  n, d = shape
  product: Callable[[jax.Array], jax.Array] = lambda rows: mixed_matmul(
      rows, b, (1, 2), (1, 2), widen)
  # one block off CPU, and for symbolic sizes (jax.export)
  if block_elements is None or not _checks.static(n, d):
    return acc + product(a)
  block = _checks.even_block(n, block_elements // max(d, 1))
  if block >= n:
    return acc + product(a)

  def body(acc: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
    start = jnp.minimum(j * block, n - block)  # last block shifted in bounds
    rows = jax.lax.dynamic_slice_in_dim(a, start, block, axis=0)
    fresh = start + jnp.arange(block) >= j * block
    rows = jnp.where(fresh[:, None, None], rows, 0.0)
    old = jax.lax.dynamic_slice_in_dim(acc, start, block, axis=0)
    return jax.lax.dynamic_update_slice_in_dim(acc, old + product(rows), start, axis=0), None

  out: jax.Array = jax.lax.scan(body, acc, jnp.arange(-(-n // block)))[0]
  return out


def _write_cols(acc: jax.Array, update: jax.Array, start: jax.Array, groups: int) -> jax.Array:
  """acc[..., g * V / G + start + j] = update[..., g, j]. Every column's
  gradient is complete within a chunk, so the overlap columns are rewritten
  with equal values. With one group no view is taken: XLA:CPU would copy a
  whole bf16 [D, V] array to update it through one (and a view is free
  elsewhere only when it is not needed)."""
  update = update.astype(acc.dtype)
  if groups == 1:
    return jax.lax.dynamic_update_slice_in_dim(acc, update[..., 0, :], start, acc.ndim - 1)
  grouped = jax.lax.dynamic_update_slice_in_dim(_grouped(acc, groups), update, start, acc.ndim)
  return grouped.reshape(acc.shape)


# The backward's carry: dx, dkernel, dbias, dweight.
RevCarry = tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]


def _rev_bwd(plan: Plan, softcap: float | None, smoothing: bool, res: LinearResiduals,
             g: LabelStats) -> tuple[jax.Array | None, ...]:
  def cpu() -> tuple[jax.Array | None, ...]:
    return _rev_bwd_loop(plan.chunk, BLOCK_ELEMENTS, softcap, smoothing, plan.groups, res, g,
                         panel_bytes=CPU_PANEL_BYTES)

  # Off CPU: one group, the backward's chunk and no row blocks (see `Plan`),
  # decided by the platform the program is lowered for.
  out: tuple[jax.Array | None, ...] = jax.lax.platform_dependent(
      cpu=cpu, default=lambda: _rev_bwd_loop(plan.backward, None, softcap, smoothing, 1, res,
                                             g))
  return out


def _panel_chunks(kernel: jax.Array, chunk: int, per_group: int, groups: int,
                  panel_bytes: int | None) -> int:
  """Chunks per panel of the CPU backward's 16-bit dkernel (see
  `_rev_bwd_loop`), at most all of them (one panel of the whole kernel when
  it fits), or 0 for direct writes: with fewer than two chunks a panel saves
  no pass. Symbolic shapes (`jax.export`) write directly."""
  if (panel_bytes is None or kernel.dtype.itemsize != 2
      or not _checks.static(*kernel.shape, chunk, per_group)):
    return 0
  n = -(-per_group // chunk)
  k = min(n, panel_bytes // (kernel.shape[0] * groups * chunk * 2))
  return k if k >= 2 else 0


def _bits(v: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(v, jnp.uint16)


def _rev_bwd_loop(chunk: int, block_elements: int | None, softcap: float | None,
                  smoothing: bool, groups: int, res: LinearResiduals,
                  g: LabelStats, panel_bytes: int | None = None) -> tuple[jax.Array | None, ...]:
  """The recomputing backward: per vocabulary chunk, the chunk's logits, dz,
  and its share of dx, dkernel, dbias and dweight.

  With `panel_bytes` (XLA:CPU) a 16-bit kernel's gradient is written in
  panels: XLA:CPU has no bfloat16 arithmetic and turns a bf16
  dynamic-update-slice into a float32 pass over the whole operand, so writing
  each chunk's columns into the [D, V] dkernel cost a pass over the kernel
  per chunk (43-50 ms at D * V = 2**26, more than the chunk's matmuls when
  V is large). The chunks of a panel (about `panel_bytes` of columns, or
  the whole kernel when it fits) are written as uint16 bits into a
  panel-sized buffer (an integer update is in place) and each panel into
  dkernel once: one pass over the kernel per panel.
  """
  x, kernel, bias, labels, weight, shift, log_sum = res
  ct = shift.dtype
  col: Callable[[jax.Array], jax.Array] = lambda v: v.astype(ct)[:, None, None]
  # rows with no active class: p = exp(-inf - inf) = 0 rather than NaN
  base = col(shift + jnp.where(log_sum == -jnp.inf, jnp.inf, log_sum))
  cols_labels = labels[:, None, None]
  x_t = cpu_transposed(x)

  def step(carry: RevCarry, kernel: jax.Array, i: jax.Array, origin: jax.Array | int = 0,
           bits: bool = False) -> RevCarry:
    # dkernel: the whole gradient, or a panel of it from column `origin` (as bits)
    dx, dkernel, dbias, dweight = carry
    ch = chunk_logits(x, kernel, bias, i, chunk, softcap, groups)
    # dz of every column of the slice: the overlap columns' values equal the
    # previous chunk's, so writing them again is harmless; dx counts them once.
    assert g.log_sum is not None
    dz = col(g.log_sum) * jnp.exp(ch.z - base)
    dz = dz + jnp.where(ch.cols[None] == cols_labels, col(g.picked), 0.0)
    if smoothing:
      assert g.smoothing is not None
      active = ch.z > -jnp.inf
      dz = dz + jnp.where(active, class_weights(weight, ch) * col(g.smoothing.weighted_sum), 0.0)
      if dweight is not None:
        rel = jnp.where(active, ch.z - col(shift), 0.0)
        dw = jnp.where(active, rel * col(g.smoothing.weighted_sum) + col(g.smoothing.weight_sum),
                       0.0)
        dweight = _write_cols(dweight, jnp.sum(dw, axis=0), ch.start, groups)
    if softcap is not None:
      assert ch.raw_tanh is not None
      dz = dz * (1.0 - ch.raw_tanh**2)
    w_chunk = kernel_cols(kernel, ch.start, chunk, groups)
    widen = _widened(x, chunk, per_group)
    dx = _add_rows_matmul(dx, jnp.where(ch.fresh, dz, 0.0), w_chunk, block_elements, widen)
    dk = _rows_product(x_t, x, dz, widen).astype(kernel.dtype)
    dkernel = _write_cols(dkernel, _bits(dk) if bits else dk, ch.start - origin, groups)
    if dbias is not None:
      dbias = _write_cols(dbias, jnp.sum(dz, axis=0), ch.start, groups)
    return dx, dkernel, dbias, dweight

  init: RevCarry = (
      jnp.zeros(x.shape, ct),
      jnp.zeros(kernel.shape, kernel.dtype),
      None if bias is None else jnp.zeros(bias.shape, ct),
      jnp.zeros(weight.shape, ct) if smoothing and weight is not None else None,
  )
  init = vary_like(init, x, kernel, bias, labels, weight, shift, log_sum, *jax.tree.leaves(g))
  per_group = kernel.shape[1] // groups
  k = _panel_chunks(kernel, chunk, per_group, groups, panel_bytes)
  if not k:
    dx, dkernel, dbias, dweight = _scan_chunks(step, init, kernel, chunk, per_group)
  else:
    width = min(k * chunk, per_group)  # columns per group of a panel

    def panel(carry: RevCarry, first: jax.Array, count: int) -> RevCarry:
      dx, dkernel, dbias, dweight = carry
      # shifted in bounds like the last chunk; columns no chunk of this panel
      # writes keep the values read here
      origin = jnp.minimum(first * chunk, per_group - width)
      cols = _bits(group_cols(dkernel, origin, width, groups))
      buf = cols.reshape(*cols.shape[:-2], cols.shape[-2] * cols.shape[-1])
      inner = functools.partial(step, origin=origin, bits=True)
      dx, buf, dbias, dweight = _scan_chunks(inner, (dx, buf, dbias, dweight), kernel, chunk,
                                             per_group, first, count)
      cols = jax.lax.bitcast_convert_type(buf, kernel.dtype).reshape(cols.shape)
      return dx, _write_cols(dkernel, cols, origin, groups), dbias, dweight

    n = -(-per_group // chunk)
    full, rest = divmod(n, k)
    carry, _ = jax.lax.scan(lambda c, p: (panel(c, p * k, k), None), init,
                            jnp.arange(full, dtype=jnp.int32))
    if rest:
      carry = panel(carry, jnp.int32(full * k), rest)
    dx, dkernel, dbias, dweight = carry
  # Inside shard_map, each device's partial dx / dkernel sums over the axes
  # it does not share with its primal (the Megatron all-reduce of dx).
  cast: Callable[[Any, jax.Array | None], jax.Array | None] = lambda v, like: (
      None if like is None else match_vma(v.astype(like.dtype), like))
  return cast(dx, x), cast(dkernel, kernel), cast(dbias, bias), None, cast(dweight, weight)


linear_label_stats_rev.defvjp(_rev_fwd, _rev_bwd)
