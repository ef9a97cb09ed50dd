"""The `shard_map` axes along which an array varies, in its type."""

from __future__ import annotations

from typing import Any, TypeVar

import jax

T = TypeVar("T")


def varying_axes(x: Any) -> frozenset[str]:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # earlier releases


def vary_along(x: jax.Array, axes: frozenset[str]) -> jax.Array:
  """`x` marked as varying along `axes` too (a no-op where it already is)."""
  extra = tuple(sorted(axes - varying_axes(x)))
  if not extra:
    return x
  out: jax.Array = jax.lax.pcast(x, extra, to="varying")
  return out


def vary_like(tree: T, *refs: jax.Array | None) -> T:
  """Marks `tree` as varying along every `shard_map` axis that `refs` vary
  along (a no-op elsewhere): a fresh (e.g. zeros) loop carry, as `lax.scan`
  requires, or class weights beside row-split logits before a `lax.cond`
  that `jax.vmap` may batch."""
  axes = frozenset[str]().union(*(varying_axes(r) for r in refs if r is not None))
  mapped: T = jax.tree.map(lambda x: vary_along(x, axes), tree)
  return mapped
