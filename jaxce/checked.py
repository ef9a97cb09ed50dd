"""Checked integer-label losses: an out-of-range label raises an error that
names it, even under `jax.jit`.

The plain losses turn a label outside [0, C) (that is not `ignore_index`) into
a NaN loss for that position. These variants add a
:func:`jax.experimental.checkify.check` on the labels, so they must run under
:func:`jax.experimental.checkify.checkify`, or :func:`raising`, which does that
and raises::

    step = jaxce.checked.raising(jax.jit(train_step))  # train_step calls
    step(params, batch)                  # jaxce.checked.cross_entropy(...)

Called under plain `jax.jit` without checkify, a check raises JAX's
"Cannot abstractly evaluate a checkify.check which was not functionalized".
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import checkify

from jaxce import _cross_entropy

__all__ = ["check_labels", "cross_entropy", "nll_loss", "raising"]


def check_labels(labels, num_classes: int, ignore_index: int | None = -100) -> None:
  """Adds a checkify check that every label is in [0, num_classes) or ignored.

  The error message names the first bad label value and its flat position.
  """
  labels = jnp.asarray(labels)
  bad = (labels < 0) | (labels >= num_classes)
  if ignore_index is not None:
    bad = bad & (labels != ignore_index)
  first = jnp.argmax(bad.ravel()) if labels.size else 0
  checkify.check(
      ~jnp.any(bad),
      "jaxce: label {value} at flat position {position} is outside [0, "
      f"{num_classes}) and is not ignore_index={ignore_index}.",
      value=labels.ravel()[first] if labels.size else 0,
      position=first,
  )


def _num_classes(logits, axis: int) -> int:
  return jnp.shape(logits)[axis]


@functools.wraps(_cross_entropy.cross_entropy)
def cross_entropy(logits, labels, **kwargs):
  labels = jnp.asarray(labels)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    check_labels(labels, _num_classes(logits, kwargs.get("axis", -1)),
                 kwargs.get("ignore_index", -100))
  return _cross_entropy.cross_entropy(logits, labels, **kwargs)


@functools.wraps(_cross_entropy.nll_loss)
def nll_loss(log_probs, labels, **kwargs):
  check_labels(labels, _num_classes(log_probs, kwargs.get("axis", -1)),
               kwargs.get("ignore_index", -100))
  return _cross_entropy.nll_loss(log_probs, labels, **kwargs)


def raising(fn):
  """Wraps `fn` (jitted or not) so that failed label checks raise.

  Returns a function with `fn`'s signature that runs it under
  :func:`checkify.checkify` and raises ``JaxRuntimeError`` naming the bad label
  if a check failed.
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    err, out = checkify.checkify(fn)(*args, **kwargs)
    err.throw()
    return out

  return wrapper

