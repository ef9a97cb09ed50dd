"""Drop-ins for optax 0.2's classification losses: same signatures, same
per-example outputs, on jaxce's kernels.

Differences: half-precision logits give float32 losses (optax keeps the input
dtype), and -inf logits on classes with zero target mass give finite losses
(optax's `softmax_cross_entropy` gives NaN there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce import _checks
from jaxce._binary import binary_cross_entropy_with_logits
from jaxce._cross_entropy import cross_entropy


def _one_class_axis(fn, logits, labels, where, axis, labels_have_classes):
  """optax accepts a tuple (or None) `axis`: those axes move last and are
  flattened into one class axis. A `where` of another rank than the logits is
  expanded over the class axes, as optax does."""
  logits = _checks.float_array(fn, "logits", logits)
  shape = logits.shape
  if where is not None:
    where = jnp.asarray(where)
    if where.ndim != logits.ndim:
      where = jnp.expand_dims(where, axis)
    where = _checks.class_mask(fn, where, shape)
  if isinstance(axis, int):
    return logits, labels, where, axis
  if axis is None:
    axis = tuple(range(logits.ndim))
  if not isinstance(axis, tuple):
    raise TypeError(
        f"{fn}: `axis` must be an int, a tuple of ints or None. Got"
        f" {type(axis).__name__}."
    )
  class_axes = tuple(sorted({_checks.canonical_axis(fn, a, logits.ndim) for a in axis}))
  batch_axes = tuple(a for a in range(logits.ndim) if a not in class_axes)
  lead = tuple(shape[a] for a in batch_axes)

  def flat(x):
    return jnp.transpose(x, batch_axes + class_axes).reshape((*lead, -1))

  if labels_have_classes:
    labels = flat(jnp.asarray(labels))
  return flat(logits), labels, None if where is None else flat(where), -1


def softmax_cross_entropy(logits, labels, axis=-1, where=None) -> jax.Array:
  r"""Drop-in for `optax.softmax_cross_entropy`: per-example
  :math:`-\sum_c t_c \log \mathrm{softmax}(x)_c`.

  Args:
    logits: Unnormalized log-probabilities.
    labels: Class probabilities of `logits`' shape.
    axis: Class axis, tuple of axes, or None for all axes.
    where: Optional boolean mask of `logits`' shape or of the batch shape.

  Returns:
    The loss per example: `logits`' shape without `axis`.
  """
  fn = "softmax_cross_entropy"
  labels = _checks.float_array(fn, "labels", labels)
  logits, labels, where, axis = _one_class_axis(fn, logits, labels, where, axis, True)
  return cross_entropy(logits, labels, reduction="none", axis=axis, where=where)


def softmax_cross_entropy_with_integer_labels(
    logits, labels, axis=-1, where=None
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
  labels = _checks.int_array(fn, "labels", labels)
  logits, labels, where, axis = _one_class_axis(fn, logits, labels, where, axis, False)
  return cross_entropy(
      logits, labels, reduction="none", axis=axis, where=where, ignore_index=None)


def sigmoid_binary_cross_entropy(logits, labels) -> jax.Array:
  """Drop-in for `optax.sigmoid_binary_cross_entropy`: elementwise BCE.

  Args:
    logits: Logits of binary predictions.
    labels: Targets in [0, 1], broadcastable against `logits`.

  Returns:
    The elementwise loss, of the broadcast shape of both.
  """
  logits = _checks.float_array("sigmoid_binary_cross_entropy", "logits", logits)
  labels = jnp.asarray(labels)
  shape = jnp.broadcast_shapes(logits.shape, labels.shape)
  return binary_cross_entropy_with_logits(
      jnp.broadcast_to(logits, shape), jnp.broadcast_to(labels, shape), reduction="none")
