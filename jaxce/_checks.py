"""Argument checks shared by every loss.

Every check runs while tracing, on shapes and dtypes only, and raises an error
that names the function, the argument and what was expected and got.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

# The `reduction` argument's values, for type checkers.
Reduction = Literal["none", "mean", "sum"]
REDUCTIONS = ("none", "mean", "sum")
_INT32 = np.iinfo(np.int32)
_F32 = np.finfo(np.float32)


def static(*dims: object) -> bool:
  """Whether every dimension is a number. Under `jax.export` with symbolic
  shapes one may not be; the shape-dependent layouts (CPU blocks, chunk
  sizes) then take their generic path."""
  return all(isinstance(d, int | np.integer) for d in dims)


def even_block(count: int, most: int) -> int:
  """The block length that covers `count` items in the fewest blocks of at
  most `most`, split as evenly as it can (at least 1). The loops over row
  blocks shift their last block back in bounds and compute its overlap with
  the one before twice: 1024 rows in blocks of 333 computed 1332."""
  most = max(1, min(count, most))
  blocks = -(-count // most)
  return -(-count // blocks) if blocks else most


def as_array(fn: str, name: str, value: Any) -> jax.Array:
  """`value` as a JAX array, or an error naming `fn` and the argument where
  it is not one (None, a string, a ragged nested list)."""
  if value is None:
    raise TypeError(f"{fn}: `{name}` must be an array. Got None.")
  try:
    return jnp.asarray(value)
  except (TypeError, ValueError) as e:
    raise type(e)(
        f"{fn}: `{name}` must be an array of numbers. Got {type(value).__name__}: {e}"
    ) from None
  except OverflowError as e:  # Python ints beyond the default integer dtype
    raise ValueError(
        f"{fn}: `{name}` holds a Python int beyond JAX's integer dtype: {e}") from None


def float_array(fn: str, name: str, x: ArrayLike) -> jax.Array:
  """`x` as an array with a floating dtype."""
  x = as_array(fn, name, x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{fn}: `{name}` must have a floating dtype. Got {x.dtype}."
    )
  return x


def int_array(fn: str, name: str, x: ArrayLike) -> jax.Array:
  """`x` as an array with an integer dtype."""
  x = as_array(fn, name, x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(
        f"{fn}: `{name}` must have an integer dtype. Got {x.dtype}."
    )
  return x


def bool_array(fn: str, name: str, x: Any) -> jax.Array:
  """`x` as a boolean array (a mask)."""
  mask = as_array(fn, name, x)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{fn}: `{name}` must be boolean. Got {mask.dtype}.")
  return mask


def compute_dtype(dtype: DTypeLike) -> np.dtype[Any]:
  """At least float32: half-precision inputs are reduced in float32."""
  dt = np.dtype(dtype)
  return dt if dt.itemsize > 4 else np.dtype(np.float32)


def axis_error(fn: str, axis: Any, kinds: str) -> TypeError:
  """The error for an `axis` that is not one of `kinds`; a traced one (a
  `jax.jit` without `static_argnames`) is told it must be static."""
  if isinstance(axis, jax.core.Tracer):
    return TypeError(f"{fn}: `axis` must be static ({kinds}): it picks the program, and"
                     " it was traced. Under jax.jit, pass static_argnames=\"axis\".")
  return TypeError(f"{fn}: `axis` must be {kinds}. Got {type(axis).__name__}.")


def canonical_axis(fn: str, axis: Any, ndim: int, name: str = "logits") -> int:
  """`axis` as an index in [0, ndim); bools are refused (True is not axis 1)."""
  try:
    if isinstance(axis, (bool, np.bool_)):
      raise TypeError
    index = operator.index(axis)
  except TypeError:
    raise axis_error(fn, axis, "an int") from None
  if ndim == 0:
    raise ValueError(
        f"{fn}: `{name}` must have at least one axis (the class axis). Got a 0-d"
        " array (rank 0)."
    )
  if not -ndim <= index < ndim:
    raise ValueError(
        f"{fn}: `axis` must be in [{-ndim}, {ndim}) for `{name}` of rank {ndim}."
        f" Got {index}."
    )
  return index % ndim


def reduction(fn: str, value: object) -> Reduction:
  if not isinstance(value, str) or value not in REDUCTIONS:
    raise ValueError(
        f"{fn}: `reduction` must be one of {REDUCTIONS}. Got {value!r}."
    )
  return cast(Reduction, value)


def static_number(fn: str, name: str, value: Any) -> float:
  """A Python float; traced values (they pick code), strings and bools are
  refused."""
  try:
    if isinstance(value, str | bytes | bool | np.bool_):
      raise TypeError
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(
        f"{fn}: `{name}` must be a static Python float. Got {value!r}."
    ) from None
  except OverflowError:  # an int beyond any float
    raise ValueError(
        f"{fn}: `{name}` must be a finite float. Got an int of {len(str(abs(value)))}"
        " digits, beyond float64's range.") from None


def static_float(fn: str, name: str, value: Any, lo: float, hi: float) -> float:
  """A Python float in [lo, hi]; traced values are refused (they pick code)."""
  number = static_number(fn, name, value)
  if not lo <= number <= hi:
    raise ValueError(f"{fn}: `{name}` must be in [{lo}, {hi}]. Got {number}.")
  return number


def z_loss(fn: str, value: Any) -> float:
  """A static float in [0, float32's largest]: an infinite weight (also one
  that only float32, the losses' compute dtype at least, rounds to inf)
  gives ignored positions (0 * inf) NaN."""
  z = static_number(fn, "z_loss", value)
  if not 0.0 <= z <= float(_F32.max):
    why = ": an infinite weight makes ignored positions NaN" if z > 0.0 else ""
    raise ValueError(f"{fn}: `z_loss` must be in [0, 3.4e38], finite in float32. Got {z}{why}.")
  return z


def positions_shape(shape: Sequence[int], axis: int) -> tuple[int, ...]:
  return tuple(shape[:axis]) + tuple(shape[axis + 1:])


def as_labels(fn: str, labels: Any) -> jax.Array | np.ndarray:
  """`labels` as an array, except host arrays of a 64-bit dtype that JAX
  would truncate (x64 disabled): those stay numpy for `class_labels`, as do
  Python ints (and lists of them) beyond int32."""
  if isinstance(labels, int | list | tuple) and not isinstance(labels, bool):
    try:
      host = np.asarray(labels)
    except (TypeError, ValueError, OverflowError):  # ragged: as_array's error below
      host = None
    if host is not None and host.dtype == object:
      raise TypeError(f"{fn}: `labels` must be an array of numbers; Python ints beyond"
                      " 64 bits are not.")
    if host is not None and np.issubdtype(host.dtype, np.integer):
      labels = host
  if (isinstance(labels, (np.ndarray, np.generic))
      and jax.dtypes.canonicalize_dtype(labels.dtype) != labels.dtype):
    return np.asarray(labels)
  return as_array(fn, "labels", labels)


def integer_labels(
    fn: str, labels: Any, logits_shape: Sequence[int], axis: int, num_classes: int,
    ignore_index: Any = None, of: str = "logits",
) -> tuple[jax.Array, int | None]:
  """Integer class indices with the logits' shape without the class axis, as
  `class_labels` returns them: ``(int32 labels, ignore_index to pass on)``."""
  labels = as_labels(fn, labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{fn}: `labels` must have an integer dtype. Got {labels.dtype}.")
  want = positions_shape(logits_shape, axis)
  if labels.shape != want:
    hint = ""
    if axis != 1 and len(logits_shape) > 2 and labels.shape == positions_shape(logits_shape, 1):
      hint = (f" They match the shape of `{of}` without axis 1: for PyTorch's (N, C, ...)"
              " layout, pass axis=1.")
    raise ValueError(
        f"{fn}: `labels` must have shape {want} (`{of}` of shape"
        f" {tuple(logits_shape)} without axis {axis}). Got {labels.shape}.{hint}"
    )
  return class_labels(fn, labels, num_classes, ignore_index)


def class_axis_name(fn: str, value: object) -> str | tuple[str, ...] | None:
  """None, a mesh axis name, or a tuple of distinct ones (a list is taken as
  a tuple: the name is a static option and goes on into JAX's collectives)."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, tuple | list) and value and all(isinstance(a, str) for a in value):
    axes = tuple(value)
    if len(set(axes)) != len(axes):
      raise ValueError(f"{fn}: `class_axis_name` must name each mesh axis once. Got {value!r}.")
    return axes
  raise TypeError(f"{fn}: `class_axis_name` must be a mesh axis name (a str) or a"
                  f" tuple of them. Got {value!r}.")


def global_classes(num_local: int, class_axis_name: str | tuple[str, ...] | None) -> int:
  """The number of classes over all devices of `class_axis_name` inside
  shard_map; `num_local` without a name or where the axis is not bound
  (`linear_cross_entropy` naming an Auto mesh's axis under `jax.jit`: the
  kernel is whole there)."""
  if class_axis_name is None:
    return num_local
  try:
    size = jax.lax.axis_size(class_axis_name)
  except NameError:
    return num_local
  return num_local * int(size)


# After `class_labels`, the label values that stand for "ignored" and for
# "outside [0, C)": both negative, so no valid class (nor, in shard_map, any
# device's local class) can equal them.
IGNORED = -1
OUT_OF_RANGE = -2


def ignore_value(fn: str, ignore_index: Any) -> int | jax.Array | None:
  """`ignore_index` as None, a Python int of any size, or an integer scalar
  array (traced values allowed)."""
  if ignore_index is None:
    return None
  if isinstance(ignore_index, (bool, np.bool_)):
    raise TypeError(f"{fn}: `ignore_index` must be an int or None. Got {ignore_index!r}.")
  if isinstance(ignore_index, (int, np.integer)):
    return int(ignore_index)
  if (isinstance(ignore_index, np.ndarray) and ignore_index.shape == ()
      and np.issubdtype(ignore_index.dtype, np.integer)):
    return int(ignore_index)  # a host value: as a Python int, never cut to 32 bits
  got = type(ignore_index).__name__
  if isinstance(ignore_index, (jax.Array, np.ndarray, np.generic)):
    value = jnp.asarray(ignore_index)
    if jnp.issubdtype(value.dtype, jnp.integer) and value.shape == ():
      return value
    # (a host value's own dtype: jnp.asarray narrows float64 to float32)
    given = value if isinstance(ignore_index, jax.Array) else np.asarray(ignore_index)
    got = f"{given.dtype} of shape {value.shape}"
  raise TypeError(
      f"{fn}: `ignore_index` must be an int, an integer scalar array or None. Got {got}.")


def class_labels(
    fn: str, labels: Any, num_classes: int, ignore_index: Any = None
) -> tuple[jax.Array, int | None]:
  """Integer labels of any dtype as int32 values compared without wrap-around.

  Returns ``(labels, ignore_index)`` to pass on: a label whose value equals
  `ignore_index` (as integers, whatever the two dtypes) becomes `IGNORED`,
  and the returned ignore_index is `IGNORED` (None if `ignore_index` is None);
  a label outside [0, num_classes) that is not ignored becomes `OUT_OF_RANGE`;
  a valid class keeps its value. So uint8 156 is never ignore_index=-100, and
  uint32 4294967196 never becomes -100. Host (numpy) labels of a 64-bit dtype
  that JAX would truncate to 32 bits (x64 disabled) are mapped on the host.
  """
  ignore = ignore_value(fn, ignore_index)
  host = isinstance(labels, (np.ndarray, np.generic))
  if host and jax.dtypes.canonicalize_dtype(labels.dtype) != labels.dtype:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
      raise TypeError(f"{fn}: `labels` must have an integer dtype. Got {labels.dtype}.")
    if not isinstance(ignore, jax.Array):
      if not static(num_classes):  # symbolic: the bound is compared on device
        out = jnp.asarray(host_class_labels(labels, _INT32.max + 1, ignore))
        return class_labels(fn, out, num_classes, _passed_on(ignore))
      return jnp.asarray(host_class_labels(labels, num_classes, ignore)), _passed_on(ignore)
    # A traced ignore_index has at most 32 bits here (x64 is off): compare
    # the values that int32 holds, and those only uint32 holds, separately.
    i32, u32 = np.iinfo(np.int32), np.iinfo(np.uint32)
    low = (labels >= i32.min) & (labels <= i32.max)
    high = ~low & (labels >= 0) & (labels <= u32.max)
    out, passed_on = class_labels(fn, np.where(low, labels, 0).astype(np.int32), num_classes,
                                  ignore)
    out = jnp.where(low, out, OUT_OF_RANGE)
    high_ignored = _equals(jnp.asarray(np.where(high, labels, 0).astype(np.uint32)), ignore)
    return jnp.where(high & high_ignored, IGNORED, out), passed_on
  labels = int_array(fn, "labels", labels)
  valid = labels >= 0
  if not static(num_classes):
    # A symbolic class count (jax.export), taken to fit int32. Compared as
    # unsigned, where it and every label that passed `valid` are exact.
    wide = jnp.uint64 if labels.dtype.itemsize > 4 else jnp.uint32
    valid = valid & (labels.astype(wide) < jnp.asarray(num_classes).astype(wide))
    out_dtype: Any = jnp.int32
  else:
    x64 = jax.dtypes.canonicalize_dtype(np.int64) == np.int64
    if num_classes > _INT32.max and not x64:
      raise ValueError(
          f"{fn}: {num_classes} classes need 64-bit labels; enable jax_enable_x64.")
    out_dtype = jnp.int32 if num_classes <= _INT32.max else jnp.int64
    if num_classes <= int_range(labels.dtype)[1]:
      valid = valid & (labels < np.asarray(num_classes, labels.dtype))
  out = jnp.where(valid, labels.astype(out_dtype), OUT_OF_RANGE)
  ignored = _equals(labels, ignore)
  if ignored is not None:
    out = jnp.where(ignored, IGNORED, out)
  return out, _passed_on(ignore)


def _passed_on(ignore: int | jax.Array | None) -> int | None:
  return None if ignore is None else IGNORED


def int_range(dtype: Any) -> tuple[int, int]:
  """(min, max) of an integer dtype; jnp.iinfo, since numpy's does not know
  the sub-byte dtypes (int4, uint2, ...) that JAX arrays take."""
  info = jnp.iinfo(dtype)  # type: ignore[no-untyped-call]
  return int(info.min), int(info.max)


def _equals(labels: jax.Array, ignore: int | jax.Array | None) -> jax.Array | None:
  """labels == ignore as integers: never true through a wrap-around."""
  if ignore is None:
    return None
  low, high = int_range(labels.dtype)
  if not isinstance(ignore, jax.Array):
    if not low <= ignore <= high:
      return jnp.zeros_like(labels, bool)
    return labels == np.asarray(ignore, labels.dtype)
  # Traced: ignore is a value of labels' dtype iff the cast round-trips and
  # keeps its sign.
  cast = ignore.astype(labels.dtype)
  fits = (cast.astype(ignore.dtype) == ignore) & ((cast < 0) == (ignore < 0))
  return fits & (labels == cast)


def host_class_labels(labels: np.ndarray, num_classes: int, ignore: int | None) -> np.ndarray:
  low, high = int_range(labels.dtype)
  valid = (labels >= 0) & (labels < num_classes) if num_classes <= high else labels >= 0
  out = np.where(valid, labels, 0).astype(np.int32)
  out = np.where(valid, out, np.int32(OUT_OF_RANGE))
  if ignore is not None and low <= ignore <= high:
    out = np.where(labels == np.asarray(ignore, labels.dtype), np.int32(IGNORED), out)
  return out


def class_weight(fn: str, weight: ArrayLike | None, num_classes: int) -> jax.Array | None:
  if weight is None:
    return None
  weight = float_array(fn, "weight", weight)
  if weight.shape != (num_classes,):
    raise ValueError(
        f"{fn}: `weight` must have shape ({num_classes},), one weight per"
        f" class. Got {weight.shape}."
    )
  return weight


def broadcastable(
    fn: str, name: str, x: ArrayLike, shape: Sequence[int], of: str = "logits"
) -> jax.Array:
  """`x` with `shape`'s rank (leading 1s added, nothing copied), or an error
  naming both shapes if it does not broadcast to `shape`. Kept unbroadcast so
  that a custom_vjp saving it saves only its own size."""
  x = as_array(fn, name, x)
  try:
    ok = jnp.broadcast_shapes(x.shape, tuple(shape)) == tuple(shape)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
        f"{fn}: `{name}` must be broadcastable to `{of}` of shape"
        f" {tuple(shape)}. Got {x.shape}."
    )
  return x.reshape((1,) * (len(shape) - x.ndim) + x.shape)


def class_mask(
    fn: str, where: Any, shape: Sequence[int], axis: int | None = None, of: str = "logits"
) -> jax.Array | None:
  """A boolean `where` broadcastable to `shape` (NumPy's rules: aligned at the
  last axis). With a class `axis` other than the last, a 1-D `where` is
  refused: it would silently apply to the last axis, while a 1-D `weight`
  applies to the class axis."""
  if where is None:
    return None
  where = bool_array(fn, "where", where)
  if axis is not None and where.ndim == 1 and len(shape) > 1 and axis != len(shape) - 1:
    hint = (len(shape) - 1 - axis) * ", None"
    raise ValueError(
        f"{fn}: a 1-D `where` of shape {where.shape} would broadcast along the"
        f" last axis of `{of}`, not the class axis {axis} (`{of}` of shape"
        f" {tuple(shape)}). For a mask over the classes pass `where[:{hint}]`;"
        f" otherwise give `where` the rank of `{of}`."
    )
  return broadcastable(fn, "where", where, shape, of)


def expand_to_axis(x: jax.Array, axis: int, ndim: int) -> jax.Array:
  """A [C] vector shaped to broadcast along `axis` of an ndim array."""
  shape = [1] * ndim
  shape[axis] = x.shape[0]
  return x.reshape(shape)


# ---------------------------------------------------------------------------
# linear_cross_entropy's own arguments.


def linear_operands(fn: str, x: ArrayLike, kernel: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """`x` [..., D] and `kernel` [D, V], floating, of one dtype."""
  x = float_array(fn, "x", x)
  kernel = float_array(fn, "kernel", kernel)
  if x.ndim < 1:
    raise ValueError(
        f"{fn}: `x` must have at least one axis (the features, last). Got a 0-d array"
        " (rank 0).")
  if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
    raise ValueError(
        f"{fn}: `kernel` must have shape (D, V) with D = x.shape[-1]. Got x"
        f" {x.shape} and kernel {kernel.shape}."
    )
  if x.dtype != kernel.dtype:
    raise TypeError(
        f"{fn}: `x` and `kernel` must have the same dtype. Got {x.dtype} and"
        f" {kernel.dtype}."
    )
  return x, kernel


def token_labels(
    fn: str, labels: Any, lead: tuple[int, ...], x_shape: Sequence[int]
) -> jax.Array | np.ndarray:
  """Integer labels of shape `lead` (x's shape without its last axis), as
  `as_labels` gives them (wide host labels stay numpy for `class_labels`)."""
  out = as_labels(fn, labels)
  if not jnp.issubdtype(out.dtype, jnp.integer):
    raise TypeError(f"{fn}: `labels` must have an integer dtype. Got {out.dtype}.")
  if out.shape != lead:
    raise ValueError(
        f"{fn}: `labels` must have shape {lead} (x's shape {tuple(x_shape)} without"
        f" the last axis). Got {out.shape}."
    )
  return out


def linear_bias(fn: str, bias: ArrayLike | None, vocab: int) -> jax.Array | None:
  if bias is None:
    return None
  bias = float_array(fn, "bias", bias)
  if bias.shape != (vocab,):
    raise ValueError(f"{fn}: `bias` must have shape ({vocab},). Got {bias.shape}.")
  return bias


SOFTCAP_RANGE = (2.0**-126, 2.0**102)


def softcap(fn: str, value: object) -> float | None:
  """None, or a static float in [2**-126, 2**102]. Below, float32 (the
  logits' compute dtype at least) flushes the cap to 0 on XLA:CPU, and a
  zero logit gave 0 / 0. Above, XLA:CPU flushes z / cap to 0 for logits
  smaller than cap * 2**-126 in magnitude (from 2**126 on, for every logit:
  the loss was log V with zero gradients); at 2**102 that is under 6e-8, a
  rounding error of float32 logits near 1. Such a cap changes no logit:
  `None` is the uncapped loss."""
  if value is None:
    return None
  cap = static_number(fn, "softcap", value)
  if not SOFTCAP_RANGE[0] <= cap <= SOFTCAP_RANGE[1]:
    why = ("" if not cap > 0.0 else
           " (below float32's smallest normal number)" if cap < SOFTCAP_RANGE[0] else
           " (XLA flushes z / softcap to 0 for small logits; pass None for no cap)")
    raise ValueError(
        f"{fn}: `softcap` must be in [1.2e-38, 5.1e30] (2**-126 to 2**102). Got {cap}{why}.")
  return cap


def chunk_size(fn: str, value: object) -> int | None:
  """None, or a positive Python int."""
  if value is None:
    return None
  if isinstance(value, bool):
    raise TypeError(f"{fn}: `chunk_size` must be an int or None. Got {value!r}.")
  try:
    size = operator.index(value)  # type: ignore[arg-type]
  except TypeError:
    raise TypeError(f"{fn}: `chunk_size` must be an int or None. Got {value!r}.") from None
  if size < 1:
    raise ValueError(f"{fn}: `chunk_size` must be positive. Got {size}.")
  return size


def static_bool(fn: str, name: str, value: object) -> bool:
  if not isinstance(value, bool | np.bool_):
    raise TypeError(f"{fn}: `{name}` must be a Python bool. Got {value!r}.")
  return bool(value)


# linear_cross_entropy's `backward` values, for type checkers.
Backward = Literal["auto", "recompute", "precompute"]
BACKWARDS = ("auto", "recompute", "precompute")


def backward(
    fn: str,
    value: object,
    *,
    reduction: str,
    forward_mode: bool,
    chunk_size: int | None,
    class_axis_name: object,
) -> Backward:
  """`backward` of the fused loss, and the options `"precompute"` excludes."""
  if not isinstance(value, str) or value not in BACKWARDS:
    raise ValueError(f"{fn}: `backward` must be one of {BACKWARDS}. Got {value!r}.")
  if value != "precompute":
    return cast(Backward, value)
  clash = None
  if reduction == "none":
    clash = 'reduction="none" (the gradient must be known in the forward: use "mean" or "sum")'
  elif forward_mode:
    clash = "forward_mode=True (a custom_vjp has no forward mode)"
  elif chunk_size is not None:
    clash = f"chunk_size={chunk_size} (the vocabulary chunk of backward=\"recompute\")"
  elif class_axis_name is not None:
    clash = f"class_axis_name={class_axis_name!r} (a vocabulary split over devices)"
  if clash is not None:
    raise ValueError(
        f'{fn}: `backward`="precompute" cannot be combined with {clash}; use'
        ' backward="recompute" or "auto".')
  return cast(Backward, value)
