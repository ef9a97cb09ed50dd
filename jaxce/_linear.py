"""`linear_cross_entropy`: cross-entropy of `x @ kernel + bias` that never
materializes the [N, V] logits.

The per-token statistics come from `_linear_stats` (vocabulary chunks, an
online logsumexp, a recomputing derivative); weights, ignore_index, label
smoothing, z-loss and the reduction are `_reduction.integer_target_loss`,
as for `cross_entropy`.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxce import _checks, _collective, _dispatch, _explicit, _linear_precompute
from jaxce._linear_stats import (
    ACCEL_BLOCK_ELEMENTS,
    Plan,
    cpu_chunk_size,
    default_chunk_size,
    linear_label_stats,
    linear_label_stats_rev,
)
from jaxce._reduction import integer_target_loss
from jaxce._stats import LabelStats, SmoothingSums

# The chunk kernels under one jit each (inlined under an outer jit), so that
# eager calls reuse one executable rather than tracing a fresh scan body.
# (static: chunk, softcap, smoothing, groups / plan, softcap, smoothing)
_STATS_JIT = {True: jax.jit(linear_label_stats, static_argnums=(5, 6, 7, 8)),
              False: jax.jit(linear_label_stats_rev, static_argnums=(5, 6, 7))}


def _empty_stats(n: int, ct: np.dtype, smoothing: bool) -> LabelStats:
  """The statistics of no logits (V = 0, or N = 0): no class is active."""
  zeros = jnp.zeros((n,), ct)
  sums = SmoothingSums(zeros, zeros, zeros) if smoothing else None
  return LabelStats(zeros, jnp.full((n,), -jnp.inf, ct), zeros, sums)


def _devices(*arrays: jax.Array) -> int:
  """The devices the computation may be split over: the size of the mesh in
  the arrays' types (under `jax.jit` with sharded arguments: the target's
  mesh, also when compiling ahead of time for a TPU slice on a host with one
  CPU device), else the default backend's device count."""
  sizes = [getattr(getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None), "size", 0)
           for a in arrays]
  return max([s for s in sizes if s] or [jax.device_count()])


def _pad_vocabulary(kernel: jax.Array, bias: jax.Array | None, weight: jax.Array | None,
                    pad: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """The kernel with `pad` zero columns whose bias is -inf, so that a mesh
  axis divides its vocabulary. A -inf logit is a masked class: it takes no
  part in the loss (label smoothing's sums included) nor in any gradient.
  The cost is a padded copy of the kernel (and of its gradient). `bias` and
  `weight` are checked against the kernel's vocabulary by the caller."""
  vocab = kernel.shape[1]
  return (jnp.pad(kernel, ((0, 0), (0, pad))),
          jnp.pad(jnp.zeros((vocab,), jnp.float32) if bias is None else bias, (0, pad),
                  constant_values=-jnp.inf),
          None if weight is None else jnp.pad(weight, (0, pad)))


@_dispatch.jitted(
    static=("reduction", "label_smoothing", "z_loss", "softcap", "chunk_size", "forward_mode",
            "class_axis_name", "backward"),
    static_if_python=("ignore_index",))
def linear_cross_entropy(
    x: ArrayLike,
    kernel: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    ignore_index: int | ArrayLike | None = -100,
    reduction: _checks.Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    forward_mode: bool = False,
    class_axis_name: str | tuple[str, ...] | None = None,
    backward: Literal["auto", "recompute", "precompute"] = "auto",
) -> jax.Array:
  r"""`cross_entropy(x @ kernel + bias, labels, ...)` without the [N, V] logits.

  Same options, reductions, ignore / all-ignored rules, dtypes and errors as
  :func:`jaxce.cross_entropy` (class axis last). With `softcap`, the logits
  are :math:`s \tanh(z / s)` before the softmax (Gemma 2):

  .. math::
    z_{n} = s \tanh\big((x_n W + b) / s\big), \qquad
    \ell_n = \mathrm{CE}(z_n, y_n).

  Two backward passes, one loss (both end in the same reduction code):

  * ``backward="recompute"``: the forward streams vocabulary chunks with an
    online logsumexp; the derivative recomputes each chunk's logits (four
    matmuls in all). What is kept for the backward is `x`, `kernel`, `bias`,
    `labels` (the class weight with label smoothing) and a few float32
    numbers per token (a shift, the log-sum-exp above it, the label's logit
    and the reduction's weights); the largest
    temporaries are a few float32 [N, chunk] blocks and a float32 dx
    accumulator of `x`'s size. Nothing grows with V.
  * ``backward="precompute"``: the forward streams blocks of tokens, computes
    each block's full-vocabulary logits once (a float32 [rows, V] block of
    about 64 MiB) and the gradients with them (three matmuls in all, as on
    materialized logits). What is kept for the backward is the gradients:
    dx, dbias, dweight and **a dkernel as large as the kernel** (float32
    for a 16-bit kernel: twice its bytes), from the forward until the
    backward (all of them whenever the loss is differentiated, even with
    respect to `x` alone); each block rereads and rewrites that dkernel.
  * ``backward="auto"`` (default) picks precompute with "mean" or "sum",
    without `bias`, `forward_mode`, `chunk_size` or a vocabulary split over
    devices, when V <= 52428 (a block then holds at least 320 rows), for
    float32 and float64 kernels on CPU and GPU and for 16-bit kernels with
    D * V <= 2**24 or N >= 4 * D on CPU; recompute otherwise (see `backward`
    below).

  Under `jax.vmap` over examples that share the kernel, JAX batches the
  backward, and a dkernel is computed per mapped example before they are
  summed: compiled temp memory grows with the batch times the kernel
  (bfloat16, N=128, D=512, V=32768 on XLA:CPU: 385 / 706 MiB for 4 / 8
  examples, against 129 / 258 MiB for the same tokens as leading dims of
  `x`, with the precomputing backward that "auto" takes there; 128 / 224
  against 28 with ``backward="recompute"``).
  Put the examples in `x`'s leading dims instead (``reduction="none"``
  and a mean per example where each needs its own). A NaN anywhere in
  `x`, an ignored row included, makes the whole dkernel NaN (x^T dz
  multiplies it by 0), as on materialized logits and in PyTorch.

  Args:
    x: Activations ``[..., D]``, any leading batch dims.
    kernel: ``[D, V]``, Flax `Dense` layout, same dtype as `x`. For tied
      ``[V, D]`` embeddings pass ``emb.T``.
    labels: Integer ``[...]``, `x`'s leading dims, of any integer dtype
      (compared by value: uint16 token ids with V = 65536 work, and a uint8
      156 never equals -100).
    bias: Optional ``[V]``. A -inf entry removes that class.
    weight: Optional per-class weights ``[V]``.
    ignore_index: Labels equal to this contribute nothing: any Python int
      (static: a new value compiles again), an integer scalar array (traced
      too) or None, compared with the labels as integers, never through a
      wrap-around (as in :func:`cross_entropy`).
    reduction: "none" (per token, `x`'s leading shape), "mean" or "sum".
    label_smoothing: In [0, 1].
    z_loss: Weight of the squared logsumexp, in [0, 3.4e38] (finite in float32).
      `label_smoothing`, `z_loss` and `softcap` are static floats: a new
      value compiles again.
    softcap: Optional logit soft-cap s in [2**-126, 2**102] (1.2e-38 to
      5.1e30; beyond, XLA:CPU flushes z / s to 0 for small logits, and for
      every logit from 2**126 on): each logit z
      becomes s tanh(z / s), except that a class removed by a -inf `bias`
      entry stays removed (its logit stays -inf rather than becoming -s).
    chunk_size: Vocabulary chunk. None picks the power of two that makes a
      float32 [N, chunk] block about 16 MiB on TPU and GPU (8 MiB in their
      backward) and 4 MiB on CPU but at least 512 columns there unless the
      16 MiB rule gives fewer, and all of V when that is at most 8 MiB
      (16 MiB everywhere with `forward_mode`),
      within [128, V] (1024 columns when N is symbolic under
      `jax.export`), or all of V when a float32 [N, V] block
      is no larger than the kernel (4 N <= D times the kernel's itemsize)
      nor than 64 MiB: chunks would then only add kernel-sized copies. Any
      positive size works; the last chunk is shifted to stay in bounds and
      its overlap with the previous one is counted once.
    forward_mode: False (default): a `jax.custom_vjp` with a hand-written
      backward, for reverse mode (`jax.grad`, `jax.vjp`, grad-of-grad);
      `jax.jvp` raises. True: a `jax.custom_jvp` with a chunked,
      rematerialized tangent, so `jax.jvp`, `jax.jacfwd`, `jax.linearize`,
      `jax.hessian` and forward-over-reverse work too, with the same saved
      residuals and memory flat in V. Reverse mode then comes from JAX
      transposing that tangent, which costs more: on XLA:CPU at N=8192,
      D=4096, V=128256, `value_and_grad` takes 312 MiB of compiled temp
      memory in bfloat16 (default: 196) and 296 MiB in float32 (default:
      186), the extra being an unblocked float32 [N, D] product per chunk;
      and 1.27-2.16x the time of `backward="recompute"` (float32, N=1024 to
      4096, D=64 to 512; more with `softcap`).
      `jax.jvp` itself takes 324 MiB (bfloat16, a float32 copy of x on
      CPU) and 200 MiB (float32).
    class_axis_name: Inside `shard_map`, the mesh axis (or a tuple of axes)
      over which the vocabulary is split: each device passes its [D, V / n]
      slice of `kernel` (and of `bias` and `weight`) and gets the loss over
      the whole vocabulary (a kernel that `shard_map`'s types show whole on
      every device of the axis raises a ValueError). Under `jax.jit` on an
      **Auto** mesh, where an array's type does not say how XLA splits it,
      name the kernel's vocabulary axis (an Auto axis of the mesh in the
      arrays' types) to run the same per-device loop in `shard_map` over
      it; pass the whole arrays. Without it a vocabulary-sharded kernel is
      all-gathered by XLA's partitioner on TPU and GPU. A vocabulary that
      the axis does not divide is padded with -inf-logit columns (a padded
      copy of the kernel and of its gradient per device). (Explicit meshes
      need no name: the split is in the type.)
    backward: "recompute", "precompute" or "auto" (see above). "precompute"
      needs reduction "mean" or "sum", a concrete number of tokens, and no
      `forward_mode`, `chunk_size`, `class_axis_name` or Explicit-mesh
      sharding (ValueError otherwise); it keeps a gradient of the kernel's
      size (float32 for a 16-bit kernel, whose gradient accumulates in
      float32 over the token blocks; on CPU its matmuls also read a float32
      copy of such a kernel), plus x's, bias's and weight's, from the
      forward to the backward. "auto" decides at trace time from static
      shapes and dtypes: precompute when all of those hold, the number of
      devices (the size of the mesh in the arrays' types, else the device
      count) shares no factor with V (a kernel XLA may have split over its
      vocabulary axis), there is no `bias`, and ``V <= 2**24 / 320``, and
      for a 16-bit kernel ``D * V <= 2**24`` (its float32 accumulator at
      most 64 MiB) or ``N >= 4 * D`` (the accumulator and a float32 copy of
      the kernel at most the bytes of the 16-bit logits); recompute
      otherwise. The platform the program is lowered for decides too. On
      TPU "auto" always recomputes: XLA:TPU's
      default-precision matmuls read a float32 kernel as bfloat16, and since
      precompute's token blocks each read the whole kernel, it keeps a
      bfloat16 copy of it (D * V * 2 bytes), as an explicit "precompute"
      does there. 16-bit kernels precompute on CPU only, where it was
      measured (with float32 matmuls there, 0.50-0.93x recompute's time at
      12 of 13 bfloat16 shapes, 1.08x at 64 x 128 x 50257; on GPU the
      float32 accumulator is not measured against the matmul it saves),
      and bfloat16 ones not on CPUs with bfloat16 dot instructions
      (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo), where XLA:CPU's
      bfloat16 matmuls are faster and precompute took 1.27-1.48x
      recompute's time (AMD Zen 4, before precompute's transposed dkernel
      product; not remeasured there).

  Returns:
    float32 (float64 for float64 inputs) loss.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxce
    >>> x = jnp.ones((2, 3)); kernel = jnp.zeros((3, 5)); labels = jnp.array([0, 4])
    >>> print(jaxce.linear_cross_entropy(x, kernel, labels))
    1.609438
    >>> grad = lambda b: jax.grad(jaxce.linear_cross_entropy, 1)(x, kernel, labels, backward=b)
    >>> print(jnp.allclose(grad("precompute"), grad("recompute")))
    True
    >>> loss = lambda k: jaxce.linear_cross_entropy(x, k, labels, forward_mode=True)
    >>> tangent = jnp.zeros((3, 5)).at[:, 0].set(1.0)  # raise class 0's logits
    >>> print(f"{jax.jvp(loss, (kernel,), (tangent,))[1]:.4f}")
    -0.9000
  """
  fn = "linear_cross_entropy"
  class_axis_name = _checks.class_axis_name(fn, class_axis_name)
  x, kernel = _checks.linear_operands(fn, x, kernel)
  _collective.require_split(fn, "kernel", kernel, class_axis_name)
  auto_mesh = None if class_axis_name is None else _explicit.auto_class_mesh(
      class_axis_name, x, kernel)
  if auto_mesh is not None and math.prod(
      auto_mesh.shape[a] for a in _explicit.names(class_axis_name)) == 1:
    # A vocabulary axis of size 1 splits nothing: the plain loss. (In a
    # shard_map over it that leaves other axes Auto, XLA's partitioner
    # rejected the psums: "Cross-partition allreduce must be in (partial)
    # manual partitioning mode".)
    auto_mesh, class_axis_name = None, None
  if auto_mesh is not None:
    assert class_axis_name is not None
    # Outside shard_map, on an Auto mesh: run per device over the named axes.
    # The labels are checked against V here (the kernel may be padded below),
    # and the local calls get them with a static ignore_index.
    labels, ignore_index = _checks.class_labels(
        fn, _checks.as_labels(fn, labels), kernel.shape[1], ignore_index)
    # (checked against the whole vocabulary here: the local calls see slices)
    bias = _checks.linear_bias(fn, bias, kernel.shape[1])
    weight = _checks.class_weight(fn, weight, kernel.shape[1])
    split = math.prod(auto_mesh.shape[a] for a in _explicit.names(class_axis_name))
    if _checks.static(kernel.shape[1]) and kernel.shape[1] % split:
      kernel, bias, weight = _pad_vocabulary(kernel, bias, weight, -kernel.shape[1] % split)

    def local(x: jax.Array, kernel: jax.Array, labels: jax.Array, bias: jax.Array | None,
              weight: jax.Array | None) -> jax.Array:
      return linear_cross_entropy(
          _collective.vary_widened(x, class_axis_name), kernel, labels, bias=bias, weight=weight,
          ignore_index=ignore_index, reduction=reduction,
          label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
          chunk_size=chunk_size, forward_mode=forward_mode, class_axis_name=class_axis_name,
          backward=backward)

    vocab_spec = P(class_axis_name)
    auto_specs = (P(), P(None, class_axis_name), P(), vocab_spec, vocab_spec)
    out: jax.Array = _explicit.run_auto(local, auto_mesh, class_axis_name,
                                        (x, kernel, labels, bias, weight), auto_specs, P())
    return out
  reduction = _checks.reduction(fn, reduction)
  eps = _checks.static_float(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
  z = _checks.z_loss(fn, z_loss)
  softcap = _checks.softcap(fn, softcap)
  chunk_size = _checks.chunk_size(fn, chunk_size)
  forward_mode = _checks.static_bool(fn, "forward_mode", forward_mode)
  backward = _checks.backward(fn, backward, reduction=reduction,
                              forward_mode=forward_mode, chunk_size=chunk_size,
                              class_axis_name=class_axis_name)
  _collective.require_bound(fn, class_axis_name, "kernel", auto_mesh=True)
  lead, vocab = x.shape[:-1], kernel.shape[1]
  labels = _checks.token_labels(fn, labels, lead, x.shape)
  labels, ignore_index = _checks.class_labels(
      fn, labels, _checks.global_classes(vocab, class_axis_name), ignore_index)
  weight = _checks.class_weight(fn, weight, vocab)
  bias = _checks.linear_bias(fn, bias, vocab)

  def impl(x: jax.Array, kernel: jax.Array, labels: jax.Array, bias: jax.Array | None,
           weight: jax.Array | None, class_axis_name: str | tuple[str, ...] | None,
           row_axes: tuple[str, ...] = (), groups: int = 1) -> jax.Array:
    lead, (d, vocab) = x.shape[:-1], kernel.shape  # this device's share
    n = math.prod(lead)
    codes = labels.reshape(n)
    classes = _collective.class_slice(codes, vocab, class_axis_name)
    ct = _checks.compute_dtype(x.dtype)
    # V = 0: what cross_entropy gives for C = 0. N = 0: no chunk loop (over
    # zero rows, its branches differed in type inside shard_map, and with
    # `softcap` JAX batched the tangent of `jax.jvp(jax.vmap(...))` twice).
    if vocab == 0 or n == 0:
      stats = _empty_stats(n, ct, bool(eps))
    else:
      column_bytes = d * kernel.dtype.itemsize
      if chunk_size is not None and not _checks.static(vocab):
        raise ValueError(
            f"{fn}: `chunk_size` needs a concrete vocabulary size. Got kernel of shape"
            f" {kernel.shape}; pass chunk_size=None (one chunk of the whole vocabulary"
            " under jax.export with a symbolic one).")
      whole = (default_chunk_size(n, vocab, column_bytes=column_bytes) if chunk_size is None
               else min(chunk_size, vocab))

      def per_group(c: int) -> int:
        if not _checks.static(vocab):  # symbolic: one group, one chunk
          return vocab
        return min(max(1, c // groups), vocab // groups)

      operands = (x.reshape(n, d), kernel, bias, classes.local_labels, weight if eps else None)
      if forward_mode:  # the same chunk on every platform
        stats = _STATS_JIT[True](*operands, per_group(whole), softcap, bool(eps), groups)
      else:
        # XLA:CPU takes smaller blocks (`cpu_chunk_size`); off CPU, one
        # group, and the backward's chunk is half the default block (an
        # explicit chunk_size is kept everywhere).
        cpu_whole = whole if chunk_size is not None else cpu_chunk_size(n, vocab, column_bytes)
        backward_chunk = whole if chunk_size is not None else default_chunk_size(
            n, vocab, ACCEL_BLOCK_ELEMENTS, column_bytes)
        plan = Plan(per_group(cpu_whole), groups, whole, backward_chunk)
        stats = _STATS_JIT[False](*operands, plan, softcap, bool(eps))
    stats = _collective.combine(stats, class_axis_name, classes.owned)
    loss = integer_target_loss(
        stats,
        codes,
        classes=classes,
        weight=weight if vocab else None,  # V = 0: every label is ignored or NaN
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=eps,
        z_loss=z,
        row_axes=row_axes,
    )
    return loss.reshape(lead) if reduction == "none" else loss

  args = (x, kernel, labels, bias, weight)
  if class_axis_name is not None:
    return impl(*args, class_axis_name)
  split = _explicit.linear_split(fn, x, kernel, reduction)
  if split is not None:
    if backward == "precompute":
      raise ValueError(
          f'{fn}: `backward`="precompute" cannot run on arrays sharded on an Explicit mesh'
          f" (x {jax.typeof(x).sharding.spec}, kernel {jax.typeof(kernel).sharding.spec});"
          ' use backward="recompute" or "auto".')
    specs = (P(*split.row_spec, None), P(None, split.class_spec[0]), split.row_spec,
             split.class_spec, split.class_spec)
    return _explicit.run_split(impl, split, args, specs)
  ref = x if _explicit.spec_of(x) is not None else kernel
  if _explicit.spec_of(ref) is not None:  # x and kernel unsplit on an Explicit mesh
    labels = _explicit.like(ref, labels, P(*(None,) * len(lead)))
    bias = _explicit.like(ref, bias, P(None))
    weight = _explicit.like(ref, weight, P(None))
    args = (x, kernel, labels, bias, weight)
  # Under jit, a kernel that XLA's partitioner may have split over its
  # vocabulary axis: as many groups as possible up to one per device, so
  # that any mesh axis size dividing both V and the device count lines up
  # (on XLA:CPU; other backends run one group, see `_linear_stats.Plan`).
  groups = max(1, math.gcd(vocab, _devices(x, kernel))) if _checks.static(vocab) else 1
  n = math.prod(lead)

  def recompute(x: jax.Array, kernel: jax.Array, labels: jax.Array, bias: jax.Array | None,
                weight: jax.Array | None) -> jax.Array:
    return impl(x, kernel, labels, bias, weight, None, groups=groups)

  auto = backward == "auto"
  if auto:
    backward = _linear_precompute.auto_backward(
        kernel.shape, kernel.dtype, n, reduction=reduction, forward_mode=forward_mode,
        chunk_size=chunk_size, class_sharded=False, groups=groups, bias=bias is not None)
  if backward != "precompute" or vocab == 0:  # (V = 0: no logits, nothing to precompute)
    return recompute(*args)
  if not _checks.static(n, vocab):
    raise ValueError(
        f'{fn}: `backward`="precompute" needs a concrete number of tokens and vocabulary'
        f' size. Got x of shape {x.shape} and kernel of shape {kernel.shape}; use'
        ' backward="recompute" or "auto" under jax.export.')
  options = _linear_precompute.Options(ignore_index, reduction, eps, z, softcap)

  def precompute(x: jax.Array, kernel: jax.Array, labels: jax.Array, bias: jax.Array | None,
                 weight: jax.Array | None) -> jax.Array:
    return _linear_precompute.precomputed_loss(
        x.reshape(n, x.shape[-1]), kernel, bias, labels.reshape(n), weight, options)

  if not auto:
    return precompute(*args)
  # Where "auto" precomputes depends on the platform the program is lowered
  # for (`_linear_precompute.platforms`), decided at lowering.
  branches = dict.fromkeys(_linear_precompute.platforms(kernel.dtype), precompute)
  if not branches:
    return recompute(*args)
  chosen: jax.Array = jax.lax.platform_dependent(*args, **branches, default=recompute)
  return chosen

