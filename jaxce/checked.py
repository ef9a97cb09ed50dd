"""Checked integer-label losses: an out-of-range label raises an error that
names it, even under `jax.jit`.

The plain losses turn a label outside [0, C) (that is not `ignore_index`) into
a NaN loss for that position. These variants add a
:func:`jax.experimental.checkify.check` on the labels, so they must run under
:func:`jax.experimental.checkify.checkify`, or :func:`raising`, which does that
and raises::

    step = jaxce.checked.raising(jax.jit(train_step))  # train_step calls
    step(params, batch)                  # jaxce.checked.cross_entropy(...)

Called eagerly (no `jax.jit`), a failed check raises at once. Called under
`jax.jit` (or another staging transformation) without checkify, they raise a
``ValueError`` that says to wrap the function with :func:`raising`.

Labels are compared with the same rule as the plain losses: as integers,
whatever their dtype (a uint8 156 is never ``ignore_index=-100``), and, inside
`shard_map` with `class_axis_name`, against the global number of classes.
The error names the first bad label and its flat (row-major) position; under
`jax.vmap` the position counts over the whole batched labels, mapped axes
first, and inside `shard_map` within the device's own block of labels. Inside
`shard_map` without checkify, JAX's own error ("Cannot abstractly evaluate a
checkify.check") comes instead of the ``ValueError``; so it does under
`jax.jit` where JAX reuses a trace of the same function, at the same shapes,
made under checkify (`jax.jit(f)` after `raising(jax.jit(f))` has run).

`jax.eval_shape` traces like `jax.jit`, so it needs the wrapper too (or the
plain losses). With x64 disabled, `jax.jit` itself truncates host (numpy)
int64 / uint64 arguments to 32 bits before jaxce sees them; eager calls map
them exactly.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxce import _checks, _cross_entropy, _linear, _optax

__all__ = [
    "check_labels",
    "cross_entropy",
    "linear_cross_entropy",
    "nll_loss",
    "raising",
    "softmax_cross_entropy_with_integer_labels",
]

F = TypeVar("F", bound=Callable[..., Any])


def check_labels(
    labels: jax.typing.ArrayLike,
    num_classes: int,
    ignore_index: int | jax.typing.ArrayLike | None = -100,
    *,
    fn: str = "check_labels",
) -> None:
  """Adds a checkify check that every label is in [0, num_classes) or equals
  `ignore_index` (compared as integers, without wrap-around).

  The error message names the first bad label value and its flat position
  (under `jax.vmap`: its position in the whole batched labels, mapped axes
  first).

  Args:
    labels: Integer labels of any shape and integer dtype.
    num_classes: The number of classes (over all devices in `shard_map`).
    ignore_index: The label value that is skipped, or None.
    fn: The function named in the error message.
  """
  if isinstance(num_classes, bool | np.bool_) or not (
      _checks.static(num_classes) or jax.export.is_symbolic_dim(num_classes)):
    raise TypeError(f"jaxce.checked.{fn}: `num_classes` must be an int. Got {num_classes!r}.")
  if _checks.static(num_classes) and num_classes < 0:
    raise ValueError(
        f"jaxce.checked.{fn}: `num_classes` must be non-negative. Got {num_classes}.")
  ignored = "" if ignore_index is None else " and is not ignore_index"
  if isinstance(ignore_index, (int, np.integer)):
    ignored += f"={int(ignore_index)}"
  where = f"at flat position {{position}} is outside [0, {num_classes}){ignored}."
  message = f"jaxce.checked.{fn}: label {{value}} {where}"
  ignore = _checks.ignore_value(fn, ignore_index)
  labels = _checks.as_labels(f"jaxce.checked.{fn}", labels)  # Python ints beyond int32: numpy
  host = labels if (isinstance(labels, np.ndarray)
                    and jax.dtypes.canonicalize_dtype(labels.dtype) != labels.dtype) else None
  if host is not None and not isinstance(ignore, jax.Array) and _checks.static(num_classes):
    # Host labels JAX would truncate: checked on the host, where their values
    # are (a jax copy would hold truncated ones, and is not readable under
    # checkify's trace).
    flat_bad = (_checks.host_class_labels(host, num_classes, ignore)
                == _checks.OUT_OF_RANGE).ravel()
    position = int(np.argmax(flat_bad)) if flat_bad.size else 0
    value = host.ravel()[position] if flat_bad.size else 0
    _check(jnp.asarray(not flat_bad.any()), message.format(value=value, position=position), fn)
    return
  if host is not None:  # a traced ignore_index: the position only (a jax copy's
    # values are truncated)
    safe, _ = _checks.class_labels(fn, labels, num_classes, ignore_index)
    bad = safe == _checks.OUT_OF_RANGE
    position, _ = _first_bad(bad, jnp.zeros(bad.shape, jnp.int32))
    _check(~jnp.any(bad), f"jaxce.checked.{fn}: the label {where}", fn, position=position)
    return
  static = ignore_index is None or isinstance(ignore_index, (int, np.integer))
  args = (labels, None if static else ignore_index)
  options = _LabelCheck((ignore_index,) if static else None, num_classes, fn, message)
  if _under_checkify():
    # The check inside a jit: a checkify.check outside one made JAX compile
    # the loss's jit again on every eager call of raising(jax.grad(f)).
    _label_check_jit(*args, options, inside=True)
    return
  if not any(isinstance(a, jax.core.Tracer) for a in args):
    ok, values = _label_check_jit(*args, options, inside=False)  # (one dispatch eagerly)
  else:
    ok, values = _label_check(*args, options, inside=False)
  _check(ok, message, fn, **values)


class _LabelCheck(NamedTuple):
  """The static part of a label check (hashable: a jit's static argument).
  `ignore` holds a Python ignore_index, or is None where it is an array."""

  ignore: tuple[Any] | None
  num_classes: int
  fn: str
  message: str


def _label_check(labels: Any, traced_ignore: Any, static: _LabelCheck, *, inside: bool) -> Any:
  """Whether every label is in range, with the first bad one's value and
  position; with `inside`, checked here (returns None)."""
  ignore_index = traced_ignore if static.ignore is None else static.ignore[0]
  safe, _ = _checks.class_labels(static.fn, labels, static.num_classes, ignore_index)
  bad = safe == _checks.OUT_OF_RANGE
  position, value = _first_bad(bad, jnp.asarray(labels))
  values = {"value": value, "position": position}
  if inside:
    _check(~jnp.any(bad), static.message, static.fn, **values)
    return None
  return ~jnp.any(bad), values


_label_check_jit = jax.jit(_label_check, static_argnums=(2,), static_argnames=("inside",))


def _check(ok: jax.Array, message: str, fn: str, **values: Any) -> None:
  if _staged_without_checkify():
    raise ValueError(
        f"jaxce.checked.{fn} checks its labels with jax.experimental.checkify, and is"
        " being traced by jax.jit (or another staging transformation) that checkify"
        " does not wrap, so the check could not run. Wrap the jitted function:"
        " `jaxce.checked.raising(jax.jit(f))(...)` raises on bad labels, and"
        " `jax.experimental.checkify.checkify(jax.jit(f))(...)` returns the error as"
        " a value; or call the unchecked `jaxce` loss, which gives NaN at bad labels."
    )
  if not isinstance(ok, jax.core.Tracer) and bool(ok):
    return  # a known pass records nothing (eager checkify.check took 0.1 ms)
  checkify.check(ok, message, **values)


# Staging traces known to keep a link to the trace they run under. Others
# (shard_map, custom_vjp, ...) start a fresh chain: above them, checkify may
# or may not be, so the check is left to JAX.
_LINKED = frozenset({"jit", "scan", "cond", "switch", "while_body", "while_cond", "fori_loop",
                     "checkpoint / remat"})


def _trace_chain() -> list[tuple[bool, str | None]]:
  """(stages out code, what it traces for) of each trace from the current
  one outward. This reads JAX's trace chain, which is not public API: empty
  when unsure, or if that changes."""
  try:
    from jax._src import core

    chain, trace = [], core.trace_ctx.trace
    while trace is not None:
      debug_info = getattr(getattr(trace, "frame", None), "debug_info", None)
      chain.append((debug_info is not None, getattr(debug_info, "traced_for", None)))
      trace = getattr(trace, "parent_trace", None)
    return chain
  except Exception:
    return []


def _under_checkify() -> bool:
  """Whether checkify traces the current call, through any traces between."""
  return any(traced_for == "checkify" for _, traced_for in _trace_chain())


def _staged_without_checkify() -> bool:
  """Whether the current trace stages out code (jit, scan, ...) that surely
  has no checkify around it, where JAX would later fail to lower the check
  with "Cannot abstractly evaluate a checkify.check which was not
  functionalized". When unsure it answers False, and JAX's own error stays."""
  staged = False
  for stages, traced_for in _trace_chain():
    if traced_for == "checkify":
      return False
    if stages:
      if traced_for not in _LINKED:
        return False
      staged = True
  return staged


@jax.custom_batching.custom_vmap
def _first_bad(bad: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(flat position, value) of the first true entry of `bad` (0s if none).

  Under `jax.vmap` the batched arrays are searched whole, mapped axes first,
  so the position is not the one within a single example."""
  flat = bad.ravel()
  if not flat.size:
    return jnp.zeros((), jnp.int32), jnp.zeros((), values.dtype)
  position = jnp.argmax(flat).astype(jnp.int32)
  # A select and a sum rather than values[position]: an Explicit mesh has no
  # dynamic slice of one element from a sharded axis.
  at = jnp.arange(flat.size, dtype=jnp.int32) == position
  return position, jnp.where(at, values.ravel(), 0).sum(dtype=values.dtype)


@_first_bad.def_vmap
def _first_bad_vmap(
    axis_size: int, in_batched: tuple[bool, bool], bad: jax.Array, values: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], tuple[bool, bool]]:
  bad, values = (
      x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
      for x, batched in zip((bad, values), in_batched, strict=True))
  return _first_bad(bad, values), (False, False)


def _forward(loss: F) -> Callable[[F], F]:
  """functools.wraps, keeping the wrapper's own __module__ for doctest, with
  a first paragraph saying how the checked function differs."""

  def wrap(wrapper: F) -> F:
    wrapped = functools.wraps(loss)(wrapper)
    wrapped.__module__ = __name__
    ignores = "ignore_index" in inspect.signature(loss).parameters
    unless = " (other than `ignore_index`)" if ignores else ""
    wrapped.__doc__ = (
        f"Checked :func:`jaxce.{loss.__name__}`: labels outside [0, C){unless}\n"
        "  fail a `checkify` check (run it under\n"
        "  :func:`jaxce.checked.raising`; called eagerly, it raises at once)\n"
        "  where the text below says they give NaN.\n\n"
        f"  {loss.__doc__}")
    return cast(F, wrapped)

  return wrap


@_forward(_cross_entropy.cross_entropy)
def cross_entropy(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
                  **kwargs: Any) -> jax.Array:
  loss = _cross_entropy.cross_entropy(logits, labels, **kwargs)
  labels = _checks.as_labels("cross_entropy", labels)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    axis = kwargs.get("axis", -1)
    num_classes = _checks.global_classes(
        jnp.shape(logits)[axis], kwargs.get("class_axis_name"))
    check_labels(labels, num_classes, kwargs.get("ignore_index", -100), fn="cross_entropy")
  return loss


@_forward(_cross_entropy.nll_loss)
def nll_loss(log_probs: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
             **kwargs: Any) -> jax.Array:
  loss = _cross_entropy.nll_loss(log_probs, labels, **kwargs)
  num_classes = _checks.global_classes(
      jnp.shape(log_probs)[kwargs.get("axis", -1)], kwargs.get("class_axis_name"))
  check_labels(labels, num_classes, kwargs.get("ignore_index", -100), fn="nll_loss")
  return loss


@_forward(_linear.linear_cross_entropy)
def linear_cross_entropy(x: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike,
                         labels: jax.typing.ArrayLike, **kwargs: Any) -> jax.Array:
  loss = _linear.linear_cross_entropy(x, kernel, labels, **kwargs)
  num_classes = _checks.global_classes(jnp.shape(kernel)[1], kwargs.get("class_axis_name"))
  check_labels(labels, num_classes, kwargs.get("ignore_index", -100),
               fn="linear_cross_entropy")
  return loss


@_forward(_optax.softmax_cross_entropy_with_integer_labels)
def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1, where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  loss = _optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis, where)
  fn = "softmax_cross_entropy_with_integer_labels"
  axes = _optax._class_axes(fn, axis, jnp.ndim(logits), TypeError)  # (checked by the loss)
  shape = jnp.shape(logits)
  num_classes = math.prod(shape[a] for a in axes) if isinstance(axes, tuple) else shape[axes]
  check_labels(labels, num_classes, None, fn=fn)
  return loss


def raising(fn: F) -> F:
  """Wraps `fn` (jitted or not) so that failed label checks raise.

  The outermost wrapper: ``raising(jax.jit(step))``, not
  ``jax.jit(raising(step))`` (a staged program cannot raise; that gives a
  ValueError saying so). `jax.grad` and `jax.vmap` may go on either side.

  Returns a function with `fn`'s signature that runs it under
  :func:`checkify.checkify` and raises ``JaxRuntimeError`` naming the bad label
  if a check failed.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxce
    >>> loss = jaxce.checked.raising(jax.jit(jaxce.checked.cross_entropy))
    >>> print(loss(jnp.zeros((2, 3)), jnp.array([0, -100])))
    1.0986123
    >>> loss(jnp.zeros((2, 3)), jnp.array([0, 3]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    jax...JaxRuntimeError: jaxce.checked.cross_entropy: label 3 at flat position 1 is outside...
  """

  @functools.wraps(fn)
  def wrapper(*args: Any, **kwargs: Any) -> Any:
    err, out = checkify.checkify(fn)(*args, **kwargs)
    # Staged out (jax.jit(raising(fn))), err.throw() would fail later in JAX
    # ("a checkify.check which was not functionalized"). (Jaxpr tracers are
    # those of staging; grad's and vmap's wrap values that can raise.)
    if any(isinstance(leaf, jax.core.Tracer) and "Jaxpr" in type(leaf).__name__
           for leaf in jax.tree.leaves(err)):
      raise ValueError(
          "jaxce.checked.raising: the wrapped function is being staged out (by jax.jit,"
          " jax.lax.scan, ...), where nothing can raise on the host. Put raising"
          " outside: raising(jax.jit(step)); or run checkify.checkify(jax.jit(step)) and"
          " call err.throw() on the error it returns.")
    err.throw()
    return out

  return cast(F, wrapper)
