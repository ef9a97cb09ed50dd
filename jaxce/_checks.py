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
