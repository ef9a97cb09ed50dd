"""Drop-ins for optax 0.2's classification losses: same signatures, same
per-example outputs, on jaxce's kernels.

Differences from optax 0.2.8:

* Half-precision logits give float32 losses (optax keeps the input dtype).
* -inf logits on classes with zero target mass give finite losses (optax's
  `softmax_cross_entropy` gives NaN there).
* An integer label on a class outside `where` gives +inf (that class has
  probability 0); optax returns the masked logsumexp minus the masked class's
  logit, a finite number.
* Integer labels outside [0, C) give NaN. optax gives NaN for labels >= C
  but reads negative labels from the end (-1 is the last class). Labels of
  any integer dtype are compared as integers.
* `axis=True` is refused (optax reads it as axis 1); a repeated axis in a
  tuple raises as in optax (TypeError for integer labels, ValueError for
  probabilities), with a message naming `axis`.
* A `where` that broadcasts to the logits is accepted with a tuple `axis`
  too (optax needs the logits' shape or the batch shape there).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _checks, _dispatch
from jaxce._binary import binary_cross_entropy_with_logits
from jaxce._cross_entropy import cross_entropy


def _class_axes(
    fn: str, axis: Any, ndim: int, duplicate_error: type[Exception]
) -> tuple[int, ...] | int:
  """optax's `axis`: an int, or a tuple (None: all axes) kept in the order
  given, since a tuple's order sets the flat class index. Repeated axes raise
  (`duplicate_error`: optax raises TypeError for integer labels, ValueError
  for probabilities)."""
  if axis is None:
    return tuple(range(ndim))
  if isinstance(axis, tuple):
    axes = tuple(_checks.canonical_axis(fn, a, ndim) for a in axis)
    if len(set(axes)) != len(axes):
      raise duplicate_error(f"{fn}: `axis` repeats an axis. Got {axis}.")
    return axes
  if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
    raise _checks.axis_error(fn, axis, "an int, a tuple of ints or None")
  return _checks.canonical_axis(fn, axis, ndim)


def _one_class_axis(
    fn: str, logits: jax.Array, where: Any, axis: Any, axes: tuple[int, ...] | int
) -> tuple[jax.Array, jax.Array | None, int]:
  """Moves `axes` (in their order) last and flattens them into one class
  axis, as optax does; a `where` of another rank than the logits is one per
  position, expanded over the class axes. Errors show the caller's shapes."""
  shape = logits.shape
  class_axes = (axes,) if isinstance(axes, int) else axes
  batch_axes = tuple(a for a in range(logits.ndim) if a not in class_axes)
  batch_shape = tuple(shape[a] for a in batch_axes)
  if where is not None:
    where = _checks.bool_array(fn, "where", where)
    expanded = where.shape if where.ndim == logits.ndim else _expanded(where.shape, axis)
    try:
      ok = expanded is not None and jnp.broadcast_shapes(expanded, shape) == shape
    except ValueError:
      ok = False
    if not ok or expanded is None:
      raise ValueError(
          f"{fn}: `where` must have the logits' rank and broadcast to their shape"
          f" {shape}, or broadcast to the positions' shape {batch_shape} (the logits'"
          f" shape without axis {axis}; a lower rank is one flag per position, as in"
          f" optax). Got {where.shape}."
      )
    where = where.reshape((1,) * (len(shape) - len(expanded)) + expanded)
  if isinstance(axes, int):
    return logits, where, axes

  def flat(v: jax.Array) -> jax.Array:
    # A `where` with 1s on every class axis stays one per position.
    if v is where and any(v.shape[a] != 1 for a in class_axes):
      v = jnp.broadcast_to(v, tuple(
          shape[a] if a in class_axes else v.shape[a] for a in range(len(shape))))
    v = jnp.transpose(v, batch_axes + class_axes)
    return v.reshape((*v.shape[:len(batch_axes)], math.prod(v.shape[len(batch_axes):])))

  return flat(logits), None if where is None else flat(where), -1


def _expanded(where_shape: tuple[int, ...], axis: Any) -> tuple[int, ...] | None:
  """The shape of optax's ``jnp.expand_dims(where, axis)``, or None."""
  try:
    return np.expand_dims(np.broadcast_to(False, where_shape), axis).shape
  except (ValueError, TypeError, np.exceptions.AxisError):
    return None


@_dispatch.jitted(static=("axis",), constant_if_empty="logits")
def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Drop-in for `optax.softmax_cross_entropy`: per-example
  :math:`-\sum_c t_c \log \mathrm{softmax}(x)_c`.

  Args:
    logits: Unnormalized log-probabilities.
    labels: Class probabilities of `logits`' shape. Integer or boolean
      labels (a one-hot, say) are taken in `logits`' dtype, as optax's
      product with the log-probabilities promotes them.
    axis: Class axis, tuple of axes, or None for all axes.
    where: Optional boolean mask of `logits`' shape or of the batch shape.

  Returns:
    The loss per example: `logits`' shape without `axis`.
  """
  fn = "softmax_cross_entropy"
  x = _checks.float_array(fn, "logits", logits)
  t = _checks.as_array(fn, "labels", labels)
  if jnp.issubdtype(t.dtype, jnp.integer) or t.dtype == jnp.bool_:
    t = t.astype(x.dtype)
  t = _checks.float_array(fn, "labels", t)
  if t.shape != x.shape:
    raise ValueError(
        f"{fn}: `labels` are class probabilities and must have the logits' shape"
        f" {x.shape}. Got {t.shape}."
    )
  axes = _class_axes(fn, axis, x.ndim, ValueError)
  flat_x, mask, class_axis = _one_class_axis(fn, x, where, axis, axes)
  if not isinstance(axes, int):
    t = jnp.transpose(t, tuple(a for a in range(t.ndim) if a not in axes) + axes)
    t = t.reshape(flat_x.shape)
  return cross_entropy(flat_x, t, reduction="none", axis=class_axis, where=mask)


@_dispatch.jitted(static=("axis",), constant_if_empty="logits")
def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Drop-in for `optax.softmax_cross_entropy_with_integer_labels`:
  per-example :math:`-\log \mathrm{softmax}(x)_y`.

  Labels outside [0, C) give NaN (no value is treated as ignored).

  Args:
    logits: Unnormalized log-probabilities.
    labels: Integer labels, `logits`' shape without `axis`; with a tuple
      `axis`, a flat index into those axes.
    axis: Class axis or tuple of axes.
    where: Optional boolean mask of `logits`' shape or of the batch shape.

  Returns:
    The loss per example: `labels`' shape.
  """
  fn = "softmax_cross_entropy_with_integer_labels"
  x = _checks.float_array(fn, "logits", logits)
  axes = _class_axes(fn, axis, x.ndim, TypeError)
  class_axes = (axes,) if isinstance(axes, int) else axes
  num_classes = math.prod(x.shape[a] for a in class_axes)
  y = _checks.as_labels(fn, labels)
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise TypeError(f"{fn}: `labels` must have an integer dtype. Got {y.dtype}.")
  want = tuple(n for a, n in enumerate(x.shape) if a not in class_axes)
  if y.shape != want:
    raise ValueError(
        f"{fn}: `labels` must have shape {want} (the logits' shape {x.shape}"
        f" without axis {axis}). Got {y.shape}."
    )
  y, _ = _checks.class_labels(fn, y, num_classes, None)
  flat_x, mask, class_axis = _one_class_axis(fn, x, where, axis, axes)
  return cross_entropy(
      flat_x, y, reduction="none", axis=class_axis, where=mask, ignore_index=None)


@_dispatch.jitted(static=(), constant_if_empty="logits")
def sigmoid_binary_cross_entropy(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> jax.Array:
  """Drop-in for `optax.sigmoid_binary_cross_entropy`: elementwise BCE.

  Args:
    logits: Logits of binary predictions.
    labels: Targets in [0, 1], broadcastable against `logits`.

  Returns:
    The elementwise loss, of the broadcast shape of both.
  """
  fn = "sigmoid_binary_cross_entropy"
  x = _checks.float_array(fn, "logits", logits)
  t = _checks.as_array(fn, "labels", labels)
  if jnp.issubdtype(t.dtype, jnp.complexfloating):
    raise TypeError(f"{fn}: `labels` must be real (float, integer or bool). Got {t.dtype}.")
  try:
    shape = jnp.broadcast_shapes(x.shape, t.shape)
  except ValueError:
    raise ValueError(f"{fn}: `labels` must be broadcastable against"
                     f" `logits`' shape {x.shape}. Got {t.shape}.") from None
  out: jax.Array = binary_cross_entropy_with_logits(
      jnp.broadcast_to(x, shape), jnp.broadcast_to(t, shape), reduction="none")
  return out
