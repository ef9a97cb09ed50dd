"""Public functions run as one cached `jax.jit`, so eager calls cost one dispatch.

Called eagerly, a loss would otherwise run its argument handling and its
reduction op by op (about 10x optax's per-call time at small shapes). Under
an outer `jax.jit`, `jax.vmap`, `shard_map` or autodiff the inner jit is
inlined: nothing changes for traced calls.

Options named `static` are static arguments (Python values: a new value
compiles once more); options named in `static_if_python` are static when
given as Python scalars or None and traced otherwise (`ignore_index` may be
an array). A call with anything jit cannot take (an unhashable option, a
list, a string where an array goes) runs the function directly, so its own
checks raise their usual errors; so does a host (NumPy) array of a dtype
that jit would narrow (64-bit labels with x64 off).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import jax
import numpy as np

P = ParamSpec("P")
R = TypeVar("R")

_SCALARS = (bool, int, float, complex, np.generic)


def _traceable(v: Any) -> bool:
  if isinstance(v, (np.ndarray, np.generic)):
    # A host array that jit would narrow (int64 with x64 off): the function
    # maps such labels on the host, without wrap-around.
    return bool(jax.dtypes.canonicalize_dtype(v.dtype) == v.dtype)
  return v is None or isinstance(v, (jax.Array, *_SCALARS))


def jitted(
    static: tuple[str, ...], static_if_python: tuple[str, ...] = ()
) -> Callable[[Callable[P, R]], Callable[P, R]]:
  def decorate(fn: Callable[P, R]) -> Callable[P, R]:
    signature = inspect.signature(fn)

    @functools.partial(jax.jit, static_argnums=(1,))
    def run(arrays: dict[str, Any], options: tuple[tuple[str, type, Any], ...]) -> Any:
      return fn(**arrays, **{name: value for name, _, value in options})  # type: ignore[call-arg]

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
      try:
        bound = signature.bind(*args, **kwargs)
      except TypeError:
        return fn(*args, **kwargs)  # its own error
      arrays, options = {}, []
      for name, value in bound.arguments.items():
        if name in static or (name in static_if_python and (
            value is None or isinstance(value, _SCALARS))):
          # With the type: 1 == True == 1.0 would share one compiled entry.
          options.append((name, type(value), value))
        else:
          arrays[name] = value
      try:
        hash(tuple(options))
      except TypeError:
        return fn(*args, **kwargs)
      if not all(_traceable(v) for v in arrays.values()):
        return fn(*args, **kwargs)
      out: R = run(arrays, tuple(options))
      return out

    return wrapper

  return decorate
