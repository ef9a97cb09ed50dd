"""Vocab parallelism inside `shard_map`: each device holds a slice of the
classes, and per-position statistics are combined over the mesh axis.

The custom_jvp kernels run on the local slice with labels shifted into local
indices (a label another device owns matches nothing here); the combination
below is ordinary JAX, so autodiff carries gradients back through
psum/pmax to each device's slice.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp

from jaxce._explicit import names
from jaxce._stats import LabelStats, SmoothingSums, TargetStats
from jaxce._vma import vary_along, varying_axes

# A `shard_map` axis name, or several (a class axis split over mesh axes).
AxisName = str | tuple[str, ...]


class ClassSlice(NamedTuple):
  local_labels: jax.Array  # labels minus this device's first class
  num_classes: int  # over all devices
  axis_name: AxisName | None
  owned: jax.Array | None = None  # labels this device holds (None: all of them)


def class_slice(labels: jax.Array, num_local: int, axis_name: AxisName | None) -> ClassSlice:
  """Where this device's classes sit among all of them."""
  if axis_name is None:
    return ClassSlice(labels, num_local, None)
  offset = jax.lax.axis_index(axis_name) * num_local
  local = labels - offset.astype(labels.dtype)
  owned = (local >= 0) & (local < num_local)
  return ClassSlice(local, num_local * jax.lax.axis_size(axis_name), axis_name, owned)


def label_weight(weight: jax.Array | None, where: ClassSlice) -> jax.Array | None:
  """w[y] per position (None without class weights). With a class axis,
  `weight` is this device's slice and the owner of each label supplies it."""
  if weight is None:
    return None
  num_local = weight.shape[0]
  if num_local == 0:
    # No class at all (a class axis splits evenly, so none anywhere): every
    # label not ignored is out of range, and its weight is NaN like its loss.
    w = jnp.full_like(where.local_labels, jnp.nan, dtype=weight.dtype)
    return w if where.axis_name is None else jax.lax.psum(w, where.axis_name)
  index = jnp.clip(where.local_labels, 0, num_local - 1)
  # Sharded as the labels (on an Explicit mesh a gather must be told).
  w = weight.at[index].get(out_sharding=jax.typeof(index).sharding)
  if where.axis_name is None:
    return w
  owned = (where.local_labels >= 0) & (where.local_labels < num_local)
  out: jax.Array = jax.lax.psum(jnp.where(owned, w, jnp.zeros((), w.dtype)), where.axis_name)
  return out


S = TypeVar("S", LabelStats, TargetStats)


def combine(stats: S, axis_name: AxisName | None, owned: jax.Array | None = None) -> S:
  """Global statistics from each device's slice of the classes.

  The global shift is the largest local one; each device's sums are moved
  onto it (``x - shift_global = (x - shift_local) + (shift_local -
  shift_global)``, both terms small or exact) before they are added up; the
  label's logit comes from its owner alone (`owned`, required for
  `LabelStats`). Ordinary JAX: autodiff transposes the collectives.
  """
  if axis_name is None:
    return stats
  assert stats.log_sum is not None  # NLL's statistics are never combined
  live = stats.log_sum > -jnp.inf
  local_shift = jax.lax.stop_gradient(stats.shift)
  shift = jax.lax.pmax(jax.lax.stop_gradient(jnp.where(live, local_shift, -jnp.inf)), axis_name)
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  delta = local_shift - shift
  s = jax.lax.psum(jnp.exp(jnp.where(live, stats.log_sum + delta, -jnp.inf)), axis_name)
  # A position with no class left anywhere: -inf, with a zero (not NaN)
  # derivative, as on one device.
  log_sum = jnp.where(s == 0, -jnp.inf, jnp.log(jnp.where(s == 0, 1.0, s)))
  smoothing = stats.smoothing
  if smoothing is not None:
    smoothing = SmoothingSums(
        jax.lax.psum(smoothing.weighted_sum + smoothing.weight_sum * delta, axis_name),
        jax.lax.psum(smoothing.weight_sum, axis_name),
        jax.lax.psum(smoothing.num_active, axis_name),
    )
  if isinstance(stats, LabelStats):
    if owned is None:
      raise ValueError("combine: LabelStats over a class axis need `owned`.")
    picked = jax.lax.psum(jnp.where(owned, stats.picked + delta, 0.0), axis_name)
    return LabelStats(shift, log_sum, picked, smoothing)
  return TargetStats(
      shift, log_sum, jax.lax.psum(stats.target_mass, axis_name),
      jax.lax.psum(stats.target_logits + stats.target_mass * delta, axis_name), smoothing)


def require_bound(fn: str, axis_name: AxisName | None, name: str = "logits",
                  auto_mesh: bool = False) -> None:
  """Refuses a `class_axis_name` that names no axis bound where the loss
  runs (outside `shard_map`, `pmap` and a named `vmap`), which would fail
  later inside JAX as "unbound axis name". `auto_mesh`: the loss runs its
  own `shard_map` where the axis is an Auto mesh's (the advice differs)."""
  for a in names(axis_name):
    try:
      jax.lax.axis_size(a)
    except NameError:
      if auto_mesh:  # the loss runs its own shard_map over an Auto mesh's axis
        outside = (f"under jax.jit alone, shard `{name}` over that axis of an Auto mesh"
                   " with a NamedSharding (the loss then runs per device itself), or use"
                   " an Explicit mesh and leave class_axis_name out.")
      else:
        outside = (f"under jax.jit alone, shard `{name}` with a NamedSharding and leave"
                   " class_axis_name out.")
      raise ValueError(
          f"{fn}: class_axis_name={axis_name!r} names an axis ({a!r}) that is not bound"
          " here. Call the loss inside jax.shard_map (or jax.pmap) over that mesh axis,"
          f" each device passing its slice of `{name}`; {outside}"
      ) from None
    except Exception:  # internals of another JAX release: no check
      return


def match_vma(cotangent: jax.Array | None, primal: jax.Array) -> jax.Array | None:
  """Sums a custom_vjp cotangent over the `shard_map` axes along which it
  varies but its primal does not (a class weight shared by devices holding
  different rows gets the sum of their contributions); a no-op elsewhere."""
  if cotangent is None:
    return None
  extra = tuple(sorted(varying_axes(cotangent) - varying_axes(primal)))
  if not extra:
    return cotangent
  out: jax.Array = jax.lax.psum(cotangent, extra)
  return out


def require_split(fn: str, name: str, x: jax.Array, axis_name: AxisName | None) -> None:
  """Inside `shard_map` (with its default check of varying axes), refuses an
  `x` that its type says is the same on every device of `axis_name`: each
  device must pass its own slice of the classes, and a replicated array
  would count every class once per device (a wrong loss, with no error).
  Elsewhere (no manual axis of that name, `check_vma=False`, `pmap`, or a
  JAX whose internals differ) nothing is checked."""
  if axis_name is None:
    return
  axes = names(axis_name)
  try:
    from jax._src import config

    tracked = bool(config._check_vma.value)
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)
  except Exception:  # internals of another JAX release: no check
    return
  if not tracked or not set(axes) <= manual:
    return
  same = [a for a in axes if a not in varying_axes(x)]
  if same:
    raise ValueError(
        f"{fn}: `{name}` must be this device's slice of the classes, split over"
        f" class_axis_name={axis_name!r}. Got an array that is the same on every"
        f" device of {', '.join(map(repr, same))} (its in_specs do not split it"
        f" there): give shard_map a spec that splits the class axis over"
        f" {axis_name!r}, or leave class_axis_name out.")


def vary_widened(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """`x` marked as varying along `axis_name`, so that reverse mode sums its
  cotangent over those axes; a half-precision cotangent is summed in float32
  on CPU. There XLA:CPU widens a bf16 all-reduce itself, and aborted the
  process ("Invalid binary instruction opcode copy") on the one that a
  `shard_map` leaving other mesh axes Auto emits (the fused loss with
  `class_axis_name` on an Auto mesh). The round trip through float32 is
  exact; on TPU and GPU the all-reduce stays in the input's dtype."""
  axes = frozenset((axis_name,) if isinstance(axis_name, str) else axis_name)

  def vary(x: jax.Array) -> jax.Array:
    return vary_along(x, axes)

  if x.dtype.itemsize >= 4 or not axes - varying_axes(x):
    return vary(x)

  def widened(x: jax.Array) -> jax.Array:
    return vary(x.astype(jnp.float32)).astype(x.dtype)

  out: jax.Array = jax.lax.platform_dependent(x, cpu=widened, default=vary)
  return out
