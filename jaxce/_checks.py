"""Argument checks shared by every loss.

Every check runs while tracing, on shapes and dtypes only, and raises an error
that names the function, the argument and what was expected and got.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "mean", "sum")


def float_array(fn: str, name: str, x) -> jax.Array:
  """`x` as an array with a floating dtype."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{fn}: `{name}` must have a floating dtype. Got {x.dtype}."
    )
  return x


def int_array(fn: str, name: str, x) -> jax.Array:
  """`x` as an array with an integer dtype."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(
        f"{fn}: `{name}` must have an integer dtype. Got {x.dtype}."
    )
  return x


def compute_dtype(dtype) -> np.dtype:
  """At least float32: half-precision inputs are reduced in float32."""
  dtype = np.dtype(dtype)
  return dtype if dtype.itemsize > 4 else np.dtype(np.float32)


def canonical_axis(fn: str, axis, ndim: int) -> int:
  try:
    axis = operator.index(axis)
  except TypeError:
    raise TypeError(
        f"{fn}: `axis` must be an int. Got {type(axis).__name__}."
    ) from None
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"{fn}: `axis` must be in [{-ndim}, {ndim}) for logits of rank {ndim}."
        f" Got {axis}."
    )
  return axis % ndim


def reduction(fn: str, value) -> str:
  if value not in REDUCTIONS:
    raise ValueError(
        f"{fn}: `reduction` must be one of {REDUCTIONS}. Got {value!r}."
    )
  return value


def static_float(fn: str, name: str, value, lo: float, hi: float) -> float:
  """A Python float in [lo, hi]; traced values are refused (they pick code)."""
  try:
    value = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(
        f"{fn}: `{name}` must be a static Python float. Got {value!r}."
    ) from None
  if not lo <= value <= hi:
    raise ValueError(f"{fn}: `{name}` must be in [{lo}, {hi}]. Got {value}.")
  return value


def positions_shape(shape: Sequence[int], axis: int) -> tuple[int, ...]:
  return tuple(shape[:axis]) + tuple(shape[axis + 1:])


def integer_labels(fn: str, labels, logits_shape, axis: int) -> jax.Array:
  """Integer class indices with the logits' shape without the class axis."""
  labels = int_array(fn, "labels", labels)
  want = positions_shape(logits_shape, axis)
  if labels.shape != want:
    raise ValueError(
        f"{fn}: `labels` must have shape {want} (the logits' shape"
        f" {tuple(logits_shape)} without axis {axis}). Got {labels.shape}."
    )
  return labels


def class_weight(fn: str, weight, num_classes: int) -> jax.Array | None:
  if weight is None:
    return None
  weight = float_array(fn, "weight", weight)
  if weight.shape != (num_classes,):
    raise ValueError(
        f"{fn}: `weight` must have shape ({num_classes},), one weight per"
        f" class. Got {weight.shape}."
    )
  return weight


def broadcastable(fn: str, name: str, x, shape) -> jax.Array:
  """`x` with `shape`'s rank (leading 1s added, nothing copied), or an error
  naming both shapes if it does not broadcast to `shape`. Kept unbroadcast so
  that a custom_vjp saving it saves only its own size."""
  x = jnp.asarray(x)
  try:
    ok = jnp.broadcast_shapes(x.shape, tuple(shape)) == tuple(shape)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
        f"{fn}: `{name}` must be broadcastable to the logits' shape"
        f" {tuple(shape)}. Got {x.shape}."
    )
  return x.reshape((1,) * (len(shape) - x.ndim) + x.shape)


def class_mask(fn: str, where, shape) -> jax.Array | None:
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"{fn}: `where` must be boolean. Got {where.dtype}.")
  return broadcastable(fn, "where", where, shape)


def expand_to_axis(x: jax.Array, axis: int, ndim: int) -> jax.Array:
  """A [C] vector shaped to broadcast along `axis` of an ndim array."""
  shape = [1] * ndim
  shape[axis] = x.shape[0]
  return x.reshape(shape)


# ---------------------------------------------------------------------------
# linear_cross_entropy's own arguments.


def linear_operands(fn: str, x: object, kernel: object) -> tuple[jax.Array, jax.Array]:
  """`x` [..., D] and `kernel` [D, V], floating, of one dtype."""
  x = float_array(fn, "x", x)
  kernel = float_array(fn, "kernel", kernel)
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
  return x, kernel


def token_labels(fn: str, labels: object, lead: tuple[int, ...], x_shape) -> jax.Array:
  """Integer labels of shape `lead` (x's shape without its last axis)."""
  labels = int_array(fn, "labels", labels)
  if labels.shape != lead:
    raise ValueError(
        f"{fn}: `labels` must have shape {lead} (x's shape {tuple(x_shape)} without"
        f" the last axis). Got {labels.shape}."
    )
  return labels


def linear_bias(fn: str, bias: object, vocab: int) -> jax.Array | None:
  if bias is None:
    return None
  bias = float_array(fn, "bias", bias)
  if bias.shape != (vocab,):
    raise ValueError(f"{fn}: `bias` must have shape ({vocab},). Got {bias.shape}.")
  return bias


def softcap(fn: str, value: object) -> float | None:
  """None, or a positive finite static float."""
  if value is None:
    return None
  cap = static_float(fn, "softcap", value, 0.0, float("inf"))
  if not 0.0 < cap < float("inf"):
    raise ValueError(f"{fn}: `softcap` must be positive and finite. Got {cap}.")
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
