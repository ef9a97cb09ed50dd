"""Class-sharded inputs under `jax.jit` on an Explicit mesh.

With `AxisType.Explicit`, an array's sharding is part of its type, so the
losses can see that the class axis of the logits (or the vocabulary axis of
the kernel) is split over mesh axes. They then run the per-device
computation in `shard_map`, with those axes as `class_axis_name` and the axes
that split the rows reduced with psum: no device ever gathers the logits or
the kernel. (Under `AxisType.Auto` XLA's partitioner does the same for
`cross_entropy` and `nll_loss` on its own.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar, cast

import jax
from jax.sharding import AxisType, PartitionSpec

Names = tuple[str, ...]
T = TypeVar("T")


def spec_of(x: Any) -> PartitionSpec | None:
  """`x`'s PartitionSpec (one entry per dim) when it lives on an Explicit mesh."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
    return None
  assert sharding is not None  # it has a mesh
  spec = tuple(sharding.spec)
  return PartitionSpec(*spec, *(None,) * (x.ndim - len(spec)))


def spec_for_shape(spec: PartitionSpec, shape: Sequence[int]) -> PartitionSpec:
  """`spec` for an array broadcast against it: its size-1 dims unsplit."""
  return PartitionSpec(*(None if n == 1 else e for e, n in zip(spec, shape, strict=True)))


def like(ref: Any, value: T, spec: PartitionSpec | None = None) -> T:
  """`value` resharded to go with `ref` on ref's Explicit mesh: to `spec`, by
  default ref's own (value broadcastable to ref, of its rank; its size-1 dims
  unsplit). Labels, weights, targets and masks given with another sharding
  than the logits' (replicated labels beside batch-split logits, say) would
  otherwise meet them in ops that an Explicit mesh rejects. As is when `ref`
  is on no Explicit mesh or `value` already has that spec."""
  ref_spec = spec_of(ref)
  if value is None or ref_spec is None:
    return value
  v: Any = value
  spec = spec_for_shape(ref_spec, v.shape) if spec is None else spec
  if spec_of(v) == spec:
    return value
  mesh = jax.typeof(ref).sharding.mesh
  with jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh)):
    return cast(T, jax.sharding.reshard(v, spec))


def without(spec: PartitionSpec | None, axis: int) -> PartitionSpec | None:
  """`spec` of an array without its dim `axis` (the positions of the logits)."""
  return None if spec is None else PartitionSpec(*(e for d, e in enumerate(spec) if d != axis))


def names(entry: str | Sequence[str] | None) -> Names:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def entry(axis_names: Names) -> str | Names | None:
  return None if not axis_names else axis_names[0] if len(axis_names) == 1 else axis_names


def run(
    body: Callable[..., Any],
    args: Sequence[Any],
    specs: Sequence[PartitionSpec | None],
    out_spec: PartitionSpec,
) -> Any:
  """`body(*local_args)` on every device of the Explicit mesh, each argument
  first resharded to its spec (labels and weights are small; the logits and
  kernel already have theirs). None arguments pass through."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:  # no `jax.set_mesh`: the mesh of the (class-sharded) inputs
    mesh = next(m for a in args if a is not None
                if not (m := jax.typeof(a).sharding.mesh).empty)
    mesh = getattr(mesh, "abstract_mesh", mesh)
  # The specs name that mesh's axes: reshard needs it as the context.
  with jax.sharding.use_abstract_mesh(mesh):
    resharded = [None if a is None else jax.sharding.reshard(a, s)
                 for a, s in zip(args, specs, strict=True)]
  return _shard_map_given(body, mesh, resharded, specs, out_spec)


def _shard_map_given(body: Callable[..., Any], mesh: Any, args: Sequence[Any],
                     specs: Sequence[PartitionSpec | None], out_spec: PartitionSpec,
                     **kwargs: Any) -> Any:
  """`jax.shard_map` of `body` over the arguments that are not None (those
  that are pass through as None)."""
  present = [i for i, a in enumerate(args) if a is not None]

  def local(*xs: Any) -> Any:
    full = list(args)
    for i, v in zip(present, xs, strict=True):
      full[i] = v
    return body(*full)

  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs[i] for i in present),
                       out_specs=out_spec, **kwargs)(*(args[i] for i in present))


class Split(NamedTuple):
  spec: PartitionSpec  # of the array that carries the classes
  row_spec: PartitionSpec  # of per-position arrays (labels, loss "none")
  class_spec: PartitionSpec  # of per-class vectors (weight, bias)
  out_spec: PartitionSpec
  class_axis_name: str | Names | None  # None: only the rows are split
  row_axes: Names


def run_split(
    impl: Callable[..., jax.Array],
    split: Split,
    args: Sequence[Any],
    specs: Sequence[PartitionSpec | None],
) -> jax.Array:
  """``impl(*local_args, split.class_axis_name, split.row_axes)`` on every
  device of the Explicit mesh: the one dispatch of every class-sharded loss.
  `specs` gives each argument's spec (None arguments pass through)."""
  out: jax.Array = run(
      functools.partial(_with_axes, impl, split.class_axis_name, split.row_axes),
      args, specs, split.out_spec)
  return out


def _with_axes(
    impl: Callable[..., jax.Array], class_axis_name: str | Names | None, row_axes: Names,
    *args: Any,
) -> jax.Array:
  return impl(*args, class_axis_name, row_axes)


def class_split(
    x: jax.Array, class_dim: int, reduction: str, rows: jax.Array | None = None
) -> Split | None:
  """How to split a loss whose class dim of `x` is sharded on an Explicit
  mesh (None when it is not). `rows`: the array whose other dims are the
  positions, if not `x` itself (the activations, for the fused loss)."""
  spec = spec_of(x)
  if spec is None or spec[class_dim] is None or x.shape[class_dim] == 0:
    return None  # (no class to split: the unsplit loss is defined at C = 0)
  if rows is None:
    row_entries = [spec[d] for d in range(x.ndim) if d != class_dim]
  else:
    row_spec_full = spec_of(rows) or PartitionSpec(*(None,) * rows.ndim)
    row_entries = list(row_spec_full)[:-1]
  row_spec = PartitionSpec(*row_entries)
  row_axes = tuple(n for e in row_entries for n in names(e))
  return Split(
      spec=spec,
      row_spec=row_spec,
      class_spec=PartitionSpec(spec[class_dim]),
      out_spec=row_spec if reduction == "none" else PartitionSpec(),
      class_axis_name=entry(names(spec[class_dim])),
      row_axes=row_axes,
  )


def auto_class_mesh(class_axis_name: Any, *arrays: Any) -> Any:
  """The mesh in the arrays' types when every axis of `class_axis_name` is one
  of its Auto axes (so the caller names the vocabulary axis outside
  `shard_map`, where an Auto axis's split is not part of any type); None
  otherwise (inside `shard_map` the axis is Manual)."""
  axes = names(class_axis_name)
  for a in arrays:
    mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty:
      continue
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if axes and all(types.get(n) == AxisType.Auto for n in axes):
      return mesh
  return None


def run_auto(body: Callable[..., Any], mesh: Any, class_axis_name: Any, args: Sequence[Any],
             specs: Sequence[PartitionSpec | None], out_spec: PartitionSpec) -> Any:
  """`body(*local_args)` in `shard_map` over the class axes of an Auto mesh
  (the mesh's other axes stay Auto: XLA's partitioner splits the rows over
  them as before). None arguments pass through."""
  return _shard_map_given(body, mesh, args, specs, out_spec,
                          axis_names=set(names(class_axis_name)))


def linear_split(fn: str, x: jax.Array, kernel: jax.Array, reduction: str) -> Split | None:
  """`class_split` for the fused loss: the vocabulary is the kernel's dim 1
  and the positions are `x`'s leading dims. Also used when only the rows
  are sharded, or only the features (x's last dim or the kernel's first:
  gathered, since the chunk loop's matmuls would otherwise contract a split
  dim), so that it runs on local arrays."""
  kernel_spec = spec_of(kernel)
  x_spec = spec_of(x)
  if kernel_spec is None and x_spec is None:
    return None
  kernel_spec = kernel_spec or PartitionSpec(None, None)
  x_spec = x_spec or PartitionSpec(*(None,) * x.ndim)
  row_entries = list(x_spec)[:-1]
  row_spec = PartitionSpec(*row_entries)
  if kernel_spec == PartitionSpec(None, None) and not any(x_spec):
    return None
  row_axes = tuple(n for e in row_entries for n in names(e))
  shared = [n for n in names(kernel_spec[1]) if n in row_axes]
  if shared:
    # Each device would hold some rows and some classes, but not the classes
    # of its rows: `x @ kernel` itself is rejected so on an Explicit mesh.
    raise ValueError(
        f"{fn}: mesh axis {shared[0]!r} splits both the positions of `x`"
        f" ({x_spec}) and the vocabulary of `kernel` ({kernel_spec})."
        " Reshard one of them so that no axis splits both, e.g."
        f" `jax.sharding.reshard(kernel, P(None, None))`.")
  return Split(
      spec=kernel_spec,
      row_spec=row_spec,
      class_spec=PartitionSpec(kernel_spec[1]),
      out_spec=row_spec if reduction == "none" else PartitionSpec(),
      class_axis_name=entry(names(kernel_spec[1])),
      row_axes=row_axes,
  )
