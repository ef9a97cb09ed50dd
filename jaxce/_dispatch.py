"""Public functions run as one cached `jax.jit`, so eager calls cost one dispatch.

Called eagerly, a loss would otherwise run its argument handling and its
reduction op by op (about 10x optax's per-call time at small shapes). Under
an outer `jax.jit`, `jax.vmap`, `shard_map` or autodiff the inner jit is
inlined: nothing changes for traced calls.

Options named `static` are static arguments (Python values: a new value
compiles once more); options named in `static_if_python` are static when
given as Python scalars or None and traced otherwise (`ignore_index` may be
an array). A static option that is a list or a concrete array (`axis=[0, 1]`,
`label_smoothing=jnp.float32(0.1)`) is keyed by its value and reaches the
function as given. Defaults count as given: spelling one out compiles
nothing new. Objects with `__jax_array__` (`flax.nnx.Param`) go in as the
jax arrays they hold. Lists where arrays go, and host (NumPy) arrays, go in as
NumPy arrays: jit narrows 64-bit floats as `jnp.asarray` would with x64 off,
and 64-bit integers (NumPy's default labels) whose values all fit in int32
are cast to it on the host, which keeps every value. Anything else jit
cannot take (a label beyond int32, a string, a tracer where a static option
goes) runs the function directly, so that its own checks and its host-side
label mapping apply (op by op: such calls compile again each time).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

P = ParamSpec("P")
R = TypeVar("R")

_SCALARS = (bool, int, float, complex, np.generic)
_INT32 = np.iinfo(np.int32)


class _Direct(Exception):
  """An argument that jit cannot take as it is: run the function directly."""


def _host_array(value: Any) -> Any:
  """An array argument as jit takes it: jax arrays, scalars and None as they
  are; lists and NumPy arrays as NumPy arrays, 64-bit integers cast to int32
  where every value fits (jit would wrap the others)."""
  if isinstance(value, int) and not isinstance(value, bool) and not (
      _INT32.min <= value <= _INT32.max):
    raise _Direct  # (jit would overflow; the function's host path keeps it)
  if value is None or isinstance(value, (jax.Array, bool, int, float, complex)):
    return value
  if hasattr(type(value), "__jax_array__"):  # e.g. flax.nnx.Param
    return jnp.asarray(value)
  if not isinstance(value, (np.ndarray, np.generic, list, tuple)):
    raise _Direct
  try:
    array = np.asarray(value)
  except Exception:  # ragged, tracers inside a list, ...: the function's own error
    raise _Direct from None
  if not (jnp.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
    raise _Direct  # (bfloat16 and the other ml_dtypes are numbers here)
  if (jnp.issubdtype(array.dtype, np.integer)
      and jax.dtypes.canonicalize_dtype(array.dtype) != array.dtype):
    if array.size and (array.min() < _INT32.min or array.max() > _INT32.max):
      raise _Direct
    array = array.astype(np.int32)
  return array


def _key(value: Any) -> Any:
  """A hashable key for a static option's value."""
  if isinstance(value, (list, tuple)):
    return type(value), tuple(_key(v) for v in value)
  if isinstance(value, (np.ndarray, jax.Array)):
    if isinstance(value, jax.core.Tracer):
      raise _Direct
    array = np.asarray(value)
    return type(value), array.dtype.str, array.shape, array.tobytes()
  try:
    hash(value)
  except TypeError:
    raise _Direct from None
  return type(value), value


class _Static:
  """A static option, hashed by `_key` and passed on unchanged."""

  def __init__(self, value: Any) -> None:
    self.value = value
    self.key = _key(value)

  def __hash__(self) -> int:
    return hash(self.key)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Static) and self.key == other.key


def jitted(
    static: tuple[str, ...], static_if_python: tuple[str, ...] = (),
    constant_if_empty: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
  """`constant_if_empty`: the argument (the logits) without which the
  function's value is a constant: when it has no element, the arguments go
  in through `jax.lax.stop_gradient`. Their derivatives are zero then
  anyway, and with the custom_jvp kernels left undifferentiated JAX can
  differentiate the function under `jax.vmap`: with empty arrays some
  kernels' values come out unbatched (`jnp.where` returns an empty operand
  as it is) while their tangents are batched, and `jax.jvp` or `jax.grad`
  of the batched jit failed on the mismatch (a rank error)."""
  def decorate(fn: Callable[P, R]) -> Callable[P, R]:
    signature = inspect.signature(fn)

    @functools.partial(jax.jit, static_argnums=(1,))
    def run(arrays: dict[str, Any], options: tuple[tuple[str, _Static], ...]) -> Any:
      if constant_if_empty is not None and getattr(arrays.get(constant_if_empty), "size", 1) == 0:
        arrays = jax.tree.map(jax.lax.stop_gradient, arrays)
      return fn(**arrays, **{name: option.value for name, option in options})  # type: ignore[call-arg]

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
      try:
        bound = signature.bind(*args, **kwargs)
      except TypeError:
        return fn(*args, **kwargs)  # its own error
      bound.apply_defaults()  # (`reduction="mean"` spelled out is the same program)
      arrays, options = {}, []
      try:
        for name, value in bound.arguments.items():
          if name in static or (name in static_if_python and (
              value is None or isinstance(value, _SCALARS))):
            options.append((name, _Static(value)))
          else:
            arrays[name] = _host_array(value)
      except _Direct:
        return fn(*args, **kwargs)
      out: R = run(arrays, tuple(options))
      return out

    return wrapper

  return decorate
