"""Vocab parallelism inside `shard_map`: each device holds a slice of the
classes, and per-position statistics are combined over the mesh axis.

The custom_vjp kernels run on the local slice with labels shifted into local
indices (a label another device owns matches nothing here); the combination
below is ordinary JAX, so autodiff carries gradients back through
psum/pmax to each device's slice.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ClassSlice(NamedTuple):
  local_labels: jax.Array  # labels minus this device's first class
  num_classes: int  # over all devices
  axis_name: str | None


def class_slice(labels, num_local: int, axis_name) -> ClassSlice:
  """Where this device's classes sit among all of them."""
  if axis_name is None:
    return ClassSlice(labels, num_local, None)
  offset = jax.lax.axis_index(axis_name) * num_local
  return ClassSlice(labels - offset.astype(labels.dtype), num_local * jax.lax.axis_size(axis_name),
                    axis_name)


def label_weight(weight, where: ClassSlice):
  """w[y] per position (None without class weights). With a class axis,
  `weight` is this device's slice and the owner of each label supplies it."""
  if weight is None:
    return None
  num_local = weight.shape[0]
  w = jnp.take(weight, jnp.clip(where.local_labels, 0, num_local - 1))
  if where.axis_name is None:
    return w
  owned = (where.local_labels >= 0) & (where.local_labels < num_local)
  return jax.lax.psum(jnp.where(owned, w, jnp.zeros((), w.dtype)), where.axis_name)


def combine(stats, axis_name):
  """Global statistics from each device's: logsumexp of the logsumexps,
  sums of everything else (a label's logit comes from its owner alone)."""
  if axis_name is None:
    return stats
  lse = stats[0]
  m = jax.lax.pmax(jax.lax.stop_gradient(lse), axis_name)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  s = jax.lax.psum(jnp.exp(lse - m), axis_name)
  # A position with no class left anywhere: -inf, with a zero (not NaN)
  # derivative, as on one device.
  lse = jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)
  rest = (None if s is None else jax.lax.psum(s, axis_name) for s in stats[1:])
  return type(stats)(lse, *rest)


def match_vma(cotangent, primal):
  """Sums a custom_vjp cotangent over the `shard_map` axes along which it
  varies but its primal does not (a class weight shared by devices holding
  different rows gets the sum of their contributions); a no-op elsewhere."""
  if cotangent is None:
    return None
  extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
  return jax.lax.psum(cotangent, extra) if extra else cotangent


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # earlier releases


def vary_like(tree, *refs):
  """Marks a fresh (e.g. zeros) loop carry as varying along every `shard_map`
  axis that `refs` vary along, as `lax.scan` requires; a no-op elsewhere."""
  axes = frozenset().union(*(_varying_axes(r) for r in refs if r is not None))

  def vary(x):
    extra = tuple(sorted(axes - _varying_axes(x)))
    return jax.lax.pcast(x, extra, to="varying") if extra else x

  return jax.tree.map(vary, tree)
