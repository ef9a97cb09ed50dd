"""Compile-only accelerator benchmark: jaxce's losses and their peers, compiled
for TPU and GPU targets on a machine with no accelerator.

    python -m jaxce.benchmark.aot              # default run: about 30 min on 2 CPU cores
    python -m jaxce.benchmark.aot --quick      # 12 pairs: about 1 min on 2 CPU cores
    python benchmarks/aot.py --targets h100,v5e --losses ce_int --dtypes bfloat16

Needs the TPU compiler (``libtpu``) and/or the CUDA plugin (``jax-cuda12-plugin``,
``jax-cuda12-pjrt``): ``pip install "jaxce[aot]"``. Targets whose compiler is missing
are skipped with a note. Nothing runs on a device: every figure is the compiler's,
read from ``jax.jit(f).trace(*specs).lower().compile()``:

* ``memory_analysis()``: temp, argument and output bytes per device;
* ``cost_analysis()["bytes accessed"]`` (TPU only; XLA:TPU counts a while-loop body
  once, so for looped programs such as ``linear_cross_entropy`` it is a lower bound;
  the GPU executable returns no cost analysis);
* the optimized HLO (``as_text()``), scanned for arrays of the logits' size (N x C
  elements, per device): how many the loss reads and writes outside matmuls (the
  floor for value_and_grad is 2 reads and 1 write: the forward's pass over the logits,
  the backward's, and the gradient), float32 ones in a bfloat16 program, and
  collectives the size of the logits or of the kernel.

Every program is ``jax.value_and_grad`` of a scalar loss w.r.t. (h, W) with
logits = h @ W (the fused loss takes (x, kernel) directly), at training-step shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce
from jaxce.benchmark import report
from jaxce.benchmark.measure import positive_ints

# libtpu takes a lock file so that one process owns the TPU; compiling needs no TPU,
# and without this a second compiling process (a test run beside a benchmark) fails.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

MiB = 2**20
TARGET_DIR = Path(__file__).resolve().parent / "targets"
AXIS = "x"

# ---------------------------------------------------------------------------
# Targets.


class Target(NamedTuple):
  name: str
  platform: str  # "tpu" or "cuda"
  topology: str  # TPU topology name, or the GPU target-config file's stem
  devices: int
  layout: str  # "single", "batch", "vocab", "vocab-explicit", "vocab-shard_map"
  chip: str  # human name of the chip


def _tpu_targets(gen: str, single: str, slice_: str, chip: str) -> list[Target]:
  out = [Target(gen, "tpu", single, 1, "single", chip)]
  for layout in ("batch", "vocab", "vocab-explicit", "vocab-shard_map"):
    out.append(Target(f"{gen}-4:{layout}", "tpu", slice_, 4, layout, chip))
  return out


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        *_tpu_targets("v5e", "v5e:1x1", "v5e:2x2", "TPU v5e"),
        *_tpu_targets("v6e", "v6e:1x1", "v6e:2x2", "TPU v6e"),
        *_tpu_targets("v5p", "v5p:1x1x1", "v5p:2x2x1", "TPU v5p"),
        Target("h100", "cuda", "h100", 1, "single", "NVIDIA H100 SXM 80 GB"),
        Target("h200", "cuda", "h200", 1, "single", "NVIDIA H200 SXM 141 GB"),
    ]
}


def compiler_missing(platform_name: str) -> str | None:
  """Why `platform_name`'s compiler cannot be used here (its packages are not
  installed), or None."""
  if platform_name == "tpu":
    try:
      importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
      return "the TPU compiler is not installed (pip install 'jaxce[aot]', or libtpu)"
    return None
  for dist in ("jax-cuda12-plugin", "jax-cuda12-pjrt"):
    try:
      importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      return f"the CUDA compiler plugin is not installed ({dist}; pip install 'jaxce[aot]')"
  return None


@functools.cache
def topology(platform_name: str, name: str) -> Any:
  """A `TopologyDescription` for a TPU topology name or a GPU target-config stem."""
  if platform_name == "tpu":
    dims = [int(d) for d in name.split(":")[1].split("x")]
    bounds = tuple(dims + [1] * (3 - len(dims)))
    return topologies.get_topology_desc(
        topology_name=name, platform="tpu", chips_per_host_bounds=bounds)
  config = (TARGET_DIR / f"{name}.txtpb").read_text()
  return topologies.get_topology_desc(
      topology_name="cuda", platform="cuda", target_config=config, topology="1x1x1")


def mesh_for(target: Target) -> Mesh:
  topo = topology(target.platform, target.topology)
  mesh = topologies.make_mesh(topo, (target.devices,), (AXIS,))
  if target.layout == "vocab-explicit":
    mesh = Mesh(mesh.devices, (AXIS,), axis_types=(AxisType.Explicit,))
  return mesh


# ---------------------------------------------------------------------------
# Cases: a jaxce loss and its peer, both scalar functions of (h, W, extra).


class Shape(NamedTuple):
  n: int  # tokens
  d: int  # hidden size
  c: int  # classes (vocabulary)

  def label(self) -> str:
    return f"N={self.n} D={self.d} C={self.c}"


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  title: str
  jaxce: Callable[..., jax.Array]  # (h, w, extra) -> scalar
  peer: Callable[..., jax.Array]
  peer_name: str
  extra: str  # "labels" (int32 [N]) or "dense" (logits-sized [N, C] input)
  fused: bool = False  # takes (x, kernel), no logits in the program's inputs
  # jaxce inside shard_map with class_axis_name (None: the loss has no such option).
  local: Callable[..., jax.Array] | None = None
  # jaxce on the Auto-mesh vocabulary layout, if it differs from `jaxce`: the
  # fused loss is told the kernel's vocabulary axis (class_axis_name), which an
  # Auto mesh keeps out of the array types.
  auto: Callable[..., jax.Array] | None = None


def _mean(f: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  return lambda h, w, e: jnp.mean(f(h @ w, e))


def _ct_dot(log_softmax: Callable[[jax.Array], jax.Array]) -> Callable[..., jax.Array]:
  # The scalar whose gradient is log_softmax's VJP with a dense cotangent.
  return lambda h, w, ct: jnp.sum((log_softmax(h @ w) * ct).astype(jnp.float32))


def _peer_nll(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
  log_probs = jax.nn.log_softmax(h @ w, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], -1).astype(jnp.float32))


def _local_ce(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
  return jaxce.cross_entropy(h @ w, y, class_axis_name=AXIS)


def _local_ce_prob(h: jax.Array, w: jax.Array, t: jax.Array) -> jax.Array:
  return jaxce.cross_entropy(h @ w, t, class_axis_name=AXIS)


def _local_nll(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
  # log_softmax over the sharded classes by hand: nll_loss itself only picks.
  z = h @ w
  m = jax.lax.pmax(jax.lax.stop_gradient(z.max(-1, keepdims=True)), AXIS)
  lse = m + jnp.log(jax.lax.psum(jnp.exp(z - m).sum(-1, keepdims=True), AXIS))
  return jaxce.nll_loss(z - lse, y, class_axis_name=AXIS)


def _local_linear(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
  return jaxce.linear_cross_entropy(h, w, y, class_axis_name=AXIS)


def _peer_vocab_parallel_ce(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
  """Plain-JAX vocabulary-parallel cross-entropy inside shard_map (Megatron style):
  the peer of jaxce's class_axis_name path, differentiated by JAX's autodiff."""
  z = h @ w
  c_local = z.shape[-1]
  m = jax.lax.pmax(jax.lax.stop_gradient(z.max(-1)), AXIS)
  lse = m + jnp.log(jax.lax.psum(jnp.exp(z - m[:, None]).sum(-1), AXIS))
  local = y - jax.lax.axis_index(AXIS) * c_local
  hit = (local >= 0) & (local < c_local)
  picked = jnp.take_along_axis(z, jnp.clip(local, 0, c_local - 1)[:, None], -1)[:, 0]
  picked = jax.lax.psum(jnp.where(hit, picked, 0), AXIS)
  return jnp.mean((lse - picked).astype(jnp.float32))


def _peer_vocab_parallel_prob(h: jax.Array, w: jax.Array, t: jax.Array) -> jax.Array:
  z = h @ w
  m = jax.lax.pmax(jax.lax.stop_gradient(z.max(-1, keepdims=True)), AXIS)
  lse = m + jnp.log(jax.lax.psum(jnp.exp(z - m).sum(-1, keepdims=True), AXIS))
  return jnp.mean(jax.lax.psum(jnp.sum(t * (lse - z), -1), AXIS).astype(jnp.float32))


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("ce_int", "cross_entropy, integer labels",
             _mean(jaxce.cross_entropy), _mean(optax.softmax_cross_entropy_with_integer_labels),
             "optax", "labels", local=_local_ce),
        Case("ce_prob", "cross_entropy, probability targets",
             _mean(jaxce.cross_entropy), _mean(optax.softmax_cross_entropy),
             "optax", "dense", local=_local_ce_prob),
        Case("nll", "nll_loss of jax.nn.log_softmax",
             lambda h, w, y: jaxce.nll_loss(jax.nn.log_softmax(h @ w, axis=-1), y),
             _peer_nll, "take_along_axis", "labels", local=_local_nll),
        Case("bce", "binary_cross_entropy_with_logits",
             _mean(jaxce.binary_cross_entropy_with_logits),
             _mean(optax.sigmoid_binary_cross_entropy), "optax", "dense"),
        Case("log_softmax", "log_softmax, dense cotangent",
             _ct_dot(jaxce.log_softmax), _ct_dot(jax.nn.log_softmax), "jax.nn", "dense"),
        Case("logsumexp", "logsumexp",
             lambda h, w, e: jnp.mean(jaxce.logsumexp(h @ w, axis=-1)),
             lambda h, w, e: jnp.mean(jax.nn.logsumexp(h @ w, axis=-1)), "jax.nn", "labels"),
        Case("optax_int", "softmax_cross_entropy_with_integer_labels (drop-in)",
             _mean(jaxce.softmax_cross_entropy_with_integer_labels),
             _mean(optax.softmax_cross_entropy_with_integer_labels), "optax", "labels"),
        Case("optax_prob", "softmax_cross_entropy (drop-in)",
             _mean(jaxce.softmax_cross_entropy), _mean(optax.softmax_cross_entropy),
             "optax", "dense"),
        Case("optax_bce", "sigmoid_binary_cross_entropy (drop-in)",
             _mean(jaxce.sigmoid_binary_cross_entropy),
             _mean(optax.sigmoid_binary_cross_entropy), "optax", "dense"),
        Case("linear_ce", "linear_cross_entropy vs optax on materialized x @ kernel",
             lambda x, k, y: jaxce.linear_cross_entropy(x, k, y),
             _mean(optax.softmax_cross_entropy_with_integer_labels),
             "optax(x @ kernel)", "labels", fused=True, local=_local_linear,
             auto=lambda x, k, y: jaxce.linear_cross_entropy(x, k, y, class_axis_name=AXIS)),
    ]
}


# Integer labels with the options LM training adds (label smoothing, z-loss, class
# weights), against optax with the same option written out. Not in the default run.
SMOOTHING, Z_LOSS = 0.1, 1e-4


def _class_weight(c: int) -> jax.Array:
  return jnp.linspace(0.5, 2.0, c, dtype=jnp.float32)


def _peer_smooth(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
  z = h @ w
  q = optax.smooth_labels(jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype), SMOOTHING)
  return jnp.mean(optax.softmax_cross_entropy(z, q))


def _peer_z_loss(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
  z = h @ w
  lse = jax.nn.logsumexp(z.astype(jnp.float32), axis=-1)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y) + Z_LOSS * lse**2)


def _peer_weighted(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
  z = h @ w
  wy = _class_weight(z.shape[-1])[y]
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(z, y) * wy) / jnp.sum(wy)


def _peer_weighted_smooth(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
  # PyTorch's weighted smoothing: targets (1 - eps) one_hot + eps / C, each
  # class's term weighted by its class weight; the mean divides by sum w_y.
  z = h @ w
  cw = _class_weight(z.shape[-1])
  q = optax.smooth_labels(jax.nn.one_hot(y, z.shape[-1], dtype=jnp.float32), SMOOTHING)
  return jnp.sum(optax.softmax_cross_entropy(z, q * cw)) / jnp.sum(cw[y])


OPTION_CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("ce_smooth", "cross_entropy, integer labels, label_smoothing=0.1",
             lambda h, w, y: jaxce.cross_entropy(h @ w, y, label_smoothing=SMOOTHING),
             _peer_smooth, "optax(smooth_labels)", "labels"),
        Case("ce_z_loss", "cross_entropy, integer labels, z_loss=1e-4",
             lambda h, w, y: jaxce.cross_entropy(h @ w, y, z_loss=Z_LOSS),
             _peer_z_loss, "optax + z-loss", "labels"),
        Case("ce_weight", "cross_entropy, integer labels, class weights",
             lambda h, w, y: jaxce.cross_entropy(h @ w, y, weight=_class_weight(w.shape[-1])),
             _peer_weighted, "optax, weighted mean", "labels"),
        Case("ce_weight_smooth", "cross_entropy, integer labels, class weights and"
             " label_smoothing=0.1",
             lambda h, w, y: jaxce.cross_entropy(h @ w, y, weight=_class_weight(w.shape[-1]),
                                                 label_smoothing=SMOOTHING),
             _peer_weighted_smooth, "optax(smooth_labels * weights)", "labels"),
    ]
}
DEFAULT_CASES = tuple(CASES)
CASES.update(OPTION_CASES)

PEER_SHARD_MAP = {"labels": _peer_vocab_parallel_ce, "dense": _peer_vocab_parallel_prob}


def input_specs(case: Case, shape: Shape, dtype: Any, target: Target,
                mesh: Mesh) -> tuple[tuple[jax.ShapeDtypeStruct, ...], dict[str, P]]:
  """ShapeDtypeStructs of (h, W, extra), sharded for the target's layout."""
  n, d, c = shape
  batch = target.layout == "batch"
  vocab = target.layout.startswith("vocab")
  row = P(AXIS) if batch else P()
  specs = {
      "h": P(AXIS, None) if batch else P(),
      "w": P(None, AXIS) if vocab else P(),
      "labels": row,
      "dense": P(AXIS, None) if batch else (P(None, AXIS) if vocab else P()),
  }

  def sds(shp: tuple[int, ...], dt: Any, spec: P) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shp, dt, sharding=NamedSharding(mesh, spec))

  extra = (sds((n,), jnp.int32, specs["labels"]) if case.extra == "labels"
           else sds((n, c), dtype, specs["dense"]))
  return (sds((n, d), dtype, specs["h"]), sds((d, c), dtype, specs["w"]), extra), specs


def program(case: Case, impl: str, target: Target, specs: dict[str, P],
            mesh: Mesh) -> Callable[..., Any]:
  """The function to compile: value_and_grad w.r.t. (h, W) of the scalar loss."""
  loss = case.jaxce if impl == "jaxce" else case.peer
  if impl == "jaxce" and target.layout == "vocab" and case.auto is not None:
    loss = case.auto
  if impl == "jaxce-unnamed":  # the Auto-mesh layout without class_axis_name
    loss = case.jaxce
  if target.layout == "vocab-shard_map":
    body = case.local if impl == "jaxce" else PEER_SHARD_MAP[case.extra]
    assert body is not None
    in_specs = (specs["h"], specs["w"], specs[case.extra])
    loss = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)
  return jax.value_and_grad(loss, argnums=(0, 1))


def supported(case: Case, target: Target) -> str | None:
  """Why (case, target) is not run, or None."""
  if target.layout == "vocab-shard_map" and case.local is None:
    return f"{case.name} has no class_axis_name option"
  return None


# ---------------------------------------------------------------------------
# The optimized HLO.

_SHAPE = re.compile(r"\b(pred|bf16|f16|f32|f64|s8|s16|s32|s64|u8|u16|u32|u64|f8\w*)\[([\d,]*)\]")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(calls|to_apply)=%?([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
                "reduce-scatter")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
               "after-all", "partition-id", "replica-id", "iota", "broadcast"}
_MATMULS = {"dot", "convolution", "ragged-dot"}

Shapes = list[tuple[str, tuple[int, ...]]]


class Instr(NamedTuple):
  comp: str
  name: str
  op: str
  result: Shapes
  operands: list[str]  # operand instruction names
  line: str


class Hlo(NamedTuple):
  instrs: list[Instr]
  shapes: dict[str, Shapes]  # instruction name -> result shapes
  callees: dict[str, list[str]]  # computation -> computations it calls
  inner: set[str]  # fused bodies and reducers: their values are never materialized
  frames: dict[int, tuple[str, int, str, int]]  # stack frame -> (file, line, function, parent)


def _shapes(text: str) -> Shapes:
  return [(m.group(1), tuple(int(v) for v in m.group(2).split(",") if v))
          for m in _SHAPE.finditer(text)]


def _close(text: str, depth: int = 0) -> int:
  """Index of the parenthesis that brings `depth` back to zero."""
  for i, ch in enumerate(text):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return i
  return len(text)


def _split_instr(line: str) -> tuple[str, str, str, str] | None:
  """(name, result type text, opcode, operand text) of an HLO instruction line."""
  if " = " not in line:
    return None
  lhs, rhs = line.split(" = ", 1)
  name = lhs.replace("ROOT", "").strip().lstrip("%")
  if rhs.startswith("("):  # tuple result
    i = _close(rhs)
    rtype, rest = rhs[: i + 1], rhs[i + 1:].lstrip()
  else:
    rtype, _, rest = rhs.partition(" ")
  op, paren, args = rest.partition("(")
  if not paren or " " in op.strip():
    return None
  return name, rtype, op.strip(), args[: _close(args, 1)]


def _frames(tables: dict[str, dict[int, str]]) -> dict[int, tuple[str, int, str, int]]:
  files, funcs = tables.get("FileNames", {}), tables.get("FunctionNames", {})
  locs: dict[int, tuple[str, int, str]] = {}
  for k, v in tables.get("FileLocations", {}).items():
    f = dict(re.findall(r"(\w+)=(\d+)", v))
    locs[k] = (files.get(int(f.get("file_name_id", 0)), "?").strip('"'),
               int(f.get("line", 0)), funcs.get(int(f.get("function_name_id", 0)), "?").strip('"'))
  out = {}
  for k, v in tables.get("StackFrames", {}).items():
    f = dict(re.findall(r"(\w+)=(\d+)", v))
    # The printed parent_frame_id is one more than the parent's printed id (0: none).
    out[k] = (*locs.get(int(f.get("file_location_id", 0)), ("?", 0, "?")),
              int(f.get("parent_frame_id", 0)) - 1)
  return out


def parse_hlo(text: str) -> Hlo:
  """The instructions of an HLO module's text, with what is needed to classify them."""
  instrs: list[Instr] = []
  shapes: dict[str, Shapes] = {}
  callees: dict[str, list[str]] = {}
  inner: set[str] = set()
  tables: dict[str, dict[int, str]] = {}
  table = comp = ""
  for raw in text.splitlines():
    line = raw.strip()
    if not line or line.startswith("//") or line.startswith("HloModule"):
      continue
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      table = line
      tables[table] = {}
      continue
    if table and not comp:
      row = _TABLE_ROW.match(line)
      if row:
        tables[table][int(row.group(1))] = row.group(2)
        continue
      table = ""
    if line == "}":
      comp = ""
      continue
    if not comp:
      m = _COMP.match(line)
      if m:
        comp = m.group(1)
        callees.setdefault(comp, [])
      continue
    parts = _split_instr(line)
    if parts is None:
      continue
    name, rtype, op, args = parts
    for kind, callee in _CALLS.findall(line):
      callees[comp].append(callee)
      if op == "fusion" or kind == "to_apply":
        inner.add(callee)
    shapes[name] = _shapes(rtype)
    instrs.append(Instr(comp, name, op, shapes[name], _OPERAND.findall(args), line))
  return Hlo(instrs, shapes, callees, inner, _frames(tables))


def _has_matmul(comp: str, ops: dict[str, set[str]], callees: dict[str, list[str]],
                seen: set[str]) -> bool:
  if comp in seen:
    return False
  seen.add(comp)
  if ops.get(comp, set()) & _MATMULS:
    return True
  return any(_has_matmul(c, ops, callees, seen) for c in callees.get(comp, []))


def _is_matmul(ins: Instr, ops: dict[str, set[str]], callees: dict[str, list[str]]) -> bool:
  if ins.op in _MATMULS:
    return True
  if ins.op == "custom-call" and re.search(r'custom_call_target="[^"]*(gemm|matmul|dot)',
                                           ins.line, re.I):
    return True
  if ins.op == "fusion":
    return any(_has_matmul(c, ops, callees, set()) for kind, c in _CALLS.findall(ins.line)
               if kind == "calls")
  return False


def where(ins: Instr, frames: dict[int, tuple[str, int, str, int]]) -> str:
  """`op name [jax op path] at file:line (function)`, the innermost jaxce frame
  outside the benchmark, else the innermost frame."""
  o = _OPNAME.search(ins.line)
  m = _FRAME.search(ins.line)
  chain: list[tuple[str, int, str, int]] = []
  k = int(m.group(1)) if m else 0
  while k in frames and len(chain) < 64:
    chain.append(frames[k])
    k = frames[k][3]
  pick = next((f for f in chain if "jaxce" in f[0] and "benchmark" not in f[0]),
              chain[0] if chain else None)
  src = "?" if pick is None else f"{'/'.join(Path(pick[0]).parts[-2:])}:{pick[1]} ({pick[2]})"
  return f"{ins.op} {ins.name} [{o.group(1) if o else '?'}] at {src}"


def analyse_hlo(text: str, nc: tuple[int, int], big: int, bf16: bool) -> dict[str, Any]:
  """Logits-sized traffic, float32 copies and large collectives in the HLO.

  Args:
    text: the optimized HLO module.
    nc: the per-device logits shape (N, C); an array with these dims in any order counts.
    big: element count from which a collective counts as logits- or kernel-sized.
    bf16: whether the program's logits are bfloat16 (float32 N x C arrays are flagged).

  Returns:
    `nc_reads` / `nc_writes`: logits-sized operands / results of materialized
    non-matmul instructions; `matmul_nc_reads` / `matmul_nc_writes`: the same for
    matmuls and fusions that contain one (XLA:TPU fuses the loss's backward into
    the dW and dh matmuls); `f32_nc`: where float32 N x C arrays are written (bf16
    programs only); `big_collectives`: collectives with a result of `big` elements
    or more.
  """
  hlo = parse_hlo(text)
  ops: dict[str, set[str]] = {}
  by_comp: dict[str, list[Instr]] = {}
  for ins in hlo.instrs:
    ops.setdefault(ins.comp, set()).add(ins.op)
    by_comp.setdefault(ins.comp, []).append(ins)
  want = sorted(nc)

  def is_nc(s: tuple[str, tuple[int, ...]]) -> bool:  # the logits' dims, any order
    return sorted(d for d in s[1] if d != 1) == want

  reads = writes = matmul_reads = matmul_writes = 0
  f32_copies: list[str] = []
  collectives: list[str] = []
  for ins in hlo.instrs:
    if any(ins.op.startswith(c) for c in _COLLECTIVES) and not ins.op.endswith("-done"):
      elems = max((math.prod(s[1]) for s in ins.result), default=0)
      if elems >= big:
        collectives.append(f"{where(ins, hlo.frames)}: {elems} elements")
    if ins.comp in hlo.inner or ins.op in _NO_TRAFFIC or ins.op.endswith("-done"):
      continue
    operand_shapes = [s for o in ins.operands for s in hlo.shapes.get(o, [])]
    n_in = sum(map(is_nc, operand_shapes))
    n_out = sum(map(is_nc, ins.result))
    if _is_matmul(ins, ops, hlo.callees):
      matmul_reads += n_in
      matmul_writes += n_out
    else:
      reads += n_in
      writes += n_out
    if bf16 and any(is_nc(s) and s[0] == "f32" for s in ins.result):
      # Inside a fusion, name the fused instruction that makes the float32 array
      # (a multi-output matmul fusion carries the dot's metadata, not the convert's).
      body = [i for c in (c for k, c in _CALLS.findall(ins.line) if k == "calls")
              for i in by_comp.get(c, []) if i.op not in _NO_TRAFFIC
              and any(is_nc(s) and s[0] == "f32" for s in i.result)]
      body.sort(key=lambda i: i.op != "convert")
      f32_copies.append(where(body[0] if body else ins, hlo.frames))
  return {
      "nc_reads": reads, "nc_writes": writes,
      "matmul_nc_reads": matmul_reads, "matmul_nc_writes": matmul_writes,
      "f32_nc": f32_copies, "big_collectives": collectives,
  }


# ---------------------------------------------------------------------------
# Compiling one program.


def fingerprint(module_text: str, target: Target) -> str:
  """What a compile's figures depend on: the lowered module (StableHLO, no
  locations), the target, the compilers' versions and libtpu's flags."""
  compilers = {d: v for d, v in _versions().items() if d not in ("jaxce", "optax")}
  key = json.dumps([module_text, target, compilers, os.environ.get("LIBTPU_INIT_ARGS")])
  return hashlib.sha256(key.encode()).hexdigest()[:32]


def compile_one(case: Case, impl: str, shape: Shape, dtype: Any, target: Target,
                keep_hlo: bool = False,
                known: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
  """Compile value_and_grad of one implementation for one target; its figures.

  Every result has the program's `fingerprint`. Where `known` has that
  fingerprint, its figures are returned (with "reused": True) and nothing is
  compiled: the same module for the same target with the same compilers
  compiles to the same program.
  """
  mesh = mesh_for(target)
  args, specs = input_specs(case, shape, dtype, target, mesh)
  f = program(case, impl, target, specs, mesh)
  t0 = time.perf_counter()
  if target.layout == "vocab-explicit":
    with jax.set_mesh(mesh):
      lowered = jax.jit(f).trace(*args).lower()
  else:
    lowered = jax.jit(f).trace(*args).lower()
  key = fingerprint(lowered.as_text(debug_info=False), target)
  if known is not None and key in known and not keep_hlo:
    return {**known[key], "impl": impl, "fingerprint": key, "reused": True}
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older JAX: one dict per device
    cost = cost[0] if cost else None
  hbm = None if not cost or "bytes accessed" not in cost else float(cost["bytes accessed"])
  n, d, c = shape
  k = target.devices
  local_nc = (n // k, c) if target.layout == "batch" else (
      (n, c // k) if target.layout.startswith("vocab") else (n, c))
  # A collective is logits- or kernel-sized from half the smaller of the two.
  big = min(n * c, d * c) // 2
  text = compiled.as_text()
  hlo = analyse_hlo(text, local_nc, big, jnp.dtype(dtype) == jnp.bfloat16)
  itemsize = jnp.dtype(dtype).itemsize
  out = {
      "impl": impl,
      "compile_s": seconds,
      "temp_bytes": int(mem.temp_size_in_bytes),
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "logits_bytes": local_nc[0] * local_nc[1] * itemsize,
      "hbm_bytes_accessed": hbm,
      **hlo,
      "fingerprint": key,
  }
  if keep_hlo:
    out["hlo"] = text
  return out


def _cpus() -> list[int]:
  return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def worker_count(workers: int | None, jobs: int) -> int:
  """Compile workers for `jobs` jobs: `workers`, or one per CPU this process
  may use, at most 8; never more than the jobs."""
  if workers is None:
    workers = min(len(_cpus()) or os.cpu_count() or 1, 8)
  return max(1, min(workers, jobs))


Job = tuple[str, str, str, str, Shape]  # (case, impl, target, dtype, shape)
_RESULT = "jaxce-aot-result "  # marks a worker's answer among whatever else it prints


def compile_jobs_parallel(
    jobs: Sequence[Job], workers: int | None = None,
    known: Mapping[str, dict[str, Any]] | None = None, *, keep_hlo: bool = False,
    xla_flags: str | None = None, on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
  """`compile_one` for each job, in worker processes; a dict, or the error's text.

  `known`: figures by fingerprint, reused where a program's fingerprint is in
  it. `keep_hlo`: each result also has the optimized HLO ("hlo"). `on_done(i,
  result)` is called (from a worker's thread) as job i finishes.

  The workers run with JAX_PLATFORMS=cpu (the CUDA plugin registers on a host
  without a GPU only then) and XLA_FLAGS=`xla_flags` (default: none). XLA_FLAGS
  is read once per process, and a test session sets it (8 CPU devices) for its
  CPU sharding tests; the figures are meant to be those of a process with no
  flags. (With --xla_force_host_platform_device_count=8, linear_cross_entropy at
  the Llama-3 head on v5e once compiled to 1131 MiB of temp instead of 129,
  because it read the host's device count; it now reads the target's mesh, and
  both give 129.)

  `workers` (default: one per CPU this process may use, at most 8) take jobs
  from one queue, TPU jobs first (they take 3-7 s each, GPU ones about 1 s).
  Each worker is pinned to its own share of the CPUs: XLA:TPU's compiler uses
  about 1.6 cores, and two unpinned workers on 2 cores contend (the 65 jobs of
  tests/test_aot.py: 201 s unpinned, 175 s pinned, in two static halves).
  The figures do not depend on it (all 65 compared equal).
  """
  import queue
  import subprocess
  import tempfile
  import threading

  if not jobs:
    return []
  cpus = _cpus()
  n = worker_count(workers, len(jobs))
  todo: queue.SimpleQueue[int] = queue.SimpleQueue()
  for i in sorted(range(len(jobs)), key=lambda i: TARGETS[jobs[i][2]].platform != "tpu"):
    todo.put(i)
  results: list[Any] = [None] * len(jobs)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  known_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # noqa: SIM115
  with known_file:
    json.dump(dict(known or {}), known_file)

  def work(w: int) -> None:
    share = cpus[w::n] if len(cpus) >= n else []
    # Pinned before JAX starts a thread: threads inherit the affinity.
    code = (f"import os\nif {share}:\n  os.sched_setaffinity(0, {share})\n"
            f"from jaxce.benchmark import aot\naot._serve_jobs({known_file.name!r}, {keep_hlo})")
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=err, env=env, text=True) as proc:
      assert proc.stdin is not None
      assert proc.stdout is not None
      while True:
        try:
          i = todo.get_nowait()
        except queue.Empty:
          break
        proc.stdin.write(json.dumps(jobs[i]) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
          if line.startswith(_RESULT):
            results[i] = json.loads(line[len(_RESULT):])
            break
        else:
          proc.wait()
          err.seek(0)
          results[i] = f"compile worker exited ({proc.returncode}):\n{err.read()[-3000:]}"
        if on_done is not None:
          on_done(i, results[i])
        if proc.returncode is not None:
          return
      proc.stdin.close()

  threads = [threading.Thread(target=work, args=(w,)) for w in range(n)]
  try:
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    os.unlink(known_file.name)
  missing = [jobs[i] for i, r in enumerate(results) if r is None]
  if missing:  # every worker died; the errors are in the results that have them
    errors = [r for r in results if isinstance(r, str)]
    raise RuntimeError(f"no compile worker left for {len(missing)} jobs: {errors[:1]}")
  return results


def _serve_jobs(known_path: str, keep_hlo: bool = False) -> None:
  """A worker of `compile_jobs_parallel`: one JSON job per line in, one result out."""
  known = json.loads(Path(known_path).read_text())
  for line in sys.stdin:
    case, impl, target, dtype, shape = json.loads(line)
    try:
      out: Any = compile_one(CASES[case], impl, Shape(*shape), DTYPES[dtype], TARGETS[target],
                             keep_hlo, known)
    except Exception as e:
      out = f"{type(e).__name__}: {e}"
    print(_RESULT + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------
# Acceptance figures (issue 8, item 2).

LINEAR_CAP = 160 * MiB  # linear_cross_entropy at N=8192, D=4096, V=128256 bf16
LLAMA3 = Shape(8192, 4096, 128256)


def violations(case: Case, shape: Shape, dtype: str, target: Target,
               jx: dict[str, Any], peer: dict[str, Any] | None) -> list[str]:
  """The acceptance figures that (case, shape, dtype, target) violates."""
  bad = []
  # Slack for per-row vectors (N float32 statistics): 1% of the logits' bytes.
  slack = 0.01 * jx["logits_bytes"]
  if peer is not None and jx["temp_bytes"] > peer["temp_bytes"] + slack:
    bad.append(f"temp {jx['temp_bytes'] / MiB:.0f} MiB > peer {peer['temp_bytes'] / MiB:.0f}")
  if case.name == "ce_int" and jx["temp_bytes"] > jx["logits_bytes"] + slack:
    bad.append(f"temp {jx['temp_bytes'] / jx['logits_bytes']:.2f}x logits > 1.0x")
  if case.fused and shape == LLAMA3 and dtype == "bfloat16" and jx["temp_bytes"] > LINEAR_CAP:
    bad.append(f"temp {jx['temp_bytes'] / MiB:.0f} MiB > 160 MiB")
  if jx["f32_nc"]:
    bad.append(f"{len(jx['f32_nc'])} float32 N x C array(s)")
  if target.layout.startswith("vocab") and jx["big_collectives"]:
    bad.append(f"{len(jx['big_collectives'])} logits/kernel-sized collective(s)")
  return bad


# ---------------------------------------------------------------------------
# The command line.

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The default run: every loss in bfloat16 on one chip of each TPU generation, the v5e
# 2x2 slice in its four layouts, and both GPUs (108 pairs, 6 of them not applicable:
# about 30 min on 2 shared CPU cores; --targets all --dtypes bfloat16,float32 compiles
# 408 pairs, about 4x that).
DEFAULTS = {
    "targets": "v5e,v5e-4:batch,v5e-4:vocab,v5e-4:vocab-explicit,v5e-4:vocab-shard_map,"
               "v6e,v5p,h100,h200",
    "losses": ",".join(DEFAULT_CASES),
    "dtypes": "bfloat16",
    "shape": "4096,4096,32768",  # N, D, C of the softmax losses
    "linear_vocab": "32768,128256,262144",  # V of linear_ce at N=8192, D=4096
}
QUICK = {
    "targets": "v5e,v5e-4:vocab,h100",
    "losses": "ce_int,ce_prob,log_softmax,linear_ce",
    "dtypes": "bfloat16",
    "linear_vocab": "128256",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m jaxce.benchmark.aot",
      description="Compile jaxce's losses and their peers (value_and_grad through"
                  " h @ W) for TPU and GPU targets with no accelerator, and report the"
                  " compiler's memory figures and what the optimized HLO shows."
                  " These are compiler figures, not timings.")
  p.add_argument("--targets", help=f"comma list from: {', '.join(TARGETS)}, or 'all'"
                                   f" [default: {DEFAULTS['targets']}]")
  p.add_argument("--losses", help=f"comma list from: {', '.join(CASES)}"
                                  f" [default: {','.join(DEFAULT_CASES)}]")
  p.add_argument("--dtypes", help=f"comma list from: {', '.join(DTYPES)}"
                                  f" [default: {DEFAULTS['dtypes']}]")
  p.add_argument("--shape", help="N,D,C of the softmax losses' h [N, D] @ W [D, C]"
                                 f" [default: {DEFAULTS['shape']}]")
  p.add_argument("--linear-vocab", help="comma list of V for linear_ce at N=8192, D=4096"
                                        f" [default: {DEFAULTS['linear_vocab']}]")
  p.add_argument("--quick", action="store_true",
                 help=f"targets {QUICK['targets']}, losses {QUICK['losses']}, bfloat16,"
                      " V=128256 (explicit flags still win)")
  p.add_argument("--out", default="aot-results", help="folder for results.json,"
                 " results.md and one PNG per target [default: aot-results]")
  p.add_argument("--workers", type=int, default=None,
                 help="compile processes, each pinned to its share of the CPUs [default:"
                      " one per CPU, at most 8; XLA:TPU's compiler uses about 1.6 cores]")
  p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--hlo", action="store_true", help="also write each optimized HLO module")
  p.add_argument("--from-json", nargs="+", metavar="RESULTS_JSON",
                 help="compile nothing: merge these results.json files (a later file's row"
                      " replaces an earlier one for the same target, loss, dtype and shape) and"
                      " write the tables and plots to --out")
  args = p.parse_args(argv)
  preset = {**DEFAULTS, **(QUICK if args.quick else {})}
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.workers is not None and args.workers < 1:
    p.error(f"--workers must be at least 1. Got {args.workers}.")
  for flag, key, form, count in (("--shape", "shape", "N,D,C", 3),
                                 ("--linear-vocab", "linear_vocab", "a comma list", None)):
    try:
      setattr(args, key, list(positive_ints(",", count)(getattr(args, key))))
    except argparse.ArgumentTypeError as e:
      p.error(f"{flag} must be {form}: {e}")
  if args.targets == "all":
    args.targets = ",".join(TARGETS)
  return args


def _pick(text: str, known: Iterable[str], flag: str) -> list[str]:
  # (dict.fromkeys: a repeated name compiles once, as in jaxce.benchmark)
  names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
  bad = [t for t in names if t not in known]
  if bad or not names:
    sys.exit(f"{flag}: {f'unknown {bad}' if bad else 'none given'};"
             f" choose from {', '.join(known)}")
  return names


def plan(args: argparse.Namespace) -> list[tuple[Case, Shape, str, Target]]:
  targets = [TARGETS[t] for t in _pick(args.targets, TARGETS, "--targets")]
  cases = [CASES[c] for c in _pick(args.losses, CASES, "--losses")]
  dtypes = _pick(args.dtypes, DTYPES, "--dtypes")
  n, d, c = args.shape
  vocab = args.linear_vocab
  jobs = []
  for target in targets:
    for case in cases:
      shapes = ([Shape(LLAMA3.n, LLAMA3.d, v) for v in vocab] if case.fused
                else [Shape(n, d, c)])
      for shape in shapes:
        for dtype in dtypes:
          jobs.append((case, shape, dtype, target))
  return jobs


def _mib(b: float | None) -> str:
  return "-" if b is None else f"{b / MiB:,.0f}" if b >= 10 * MiB else f"{b / MiB:,.1f}"


def markdown(rows: list[dict[str, Any]], targets: list[str]) -> str:
  """One table per target."""
  out = []
  for tname in targets:
    t = TARGETS[tname]
    mine = [r for r in rows if r["target"] == tname]
    if not mine:
      continue
    out.append(f"\n### {tname} ({t.chip}, {t.devices} chip{'s' * (t.devices > 1)},"
               f" {t.layout})\n")
    out.append("| loss | dtype | shape | temp MiB jaxce | temp MiB peer | jaxce/peer |"
               " temp/logits | args MiB | out MiB | HBM GB jaxce / peer |"
               " NxC reads+writes jaxce (matmuls) | peer | violations |")
    out.append("|" + "---|" * 13)
    for r in mine:
      if "skipped" in r:
        out.append(f"| {r['loss']} | {r['dtype']} | {r['shape']} | skipped: {r['skipped']}"
                   + " |" * 10)
        continue
      j, p = r["jaxce"], r.get("peer")
      perr = "error" if "peer_error" in r else "-"
      ratio = (f"{j['temp_bytes'] / p['temp_bytes']:.2f}" if p and p["temp_bytes"]
               else "-")
      hbm = "-" if j["hbm_bytes_accessed"] is None else (
          f"{j['hbm_bytes_accessed'] / 1e9:.2f} / "
          + ("-" if not p or p["hbm_bytes_accessed"] is None
             else f"{p['hbm_bytes_accessed'] / 1e9:.2f}"))
      traffic = (f"{j['nc_reads']}+{j['nc_writes']}"
                 f" ({j['matmul_nc_reads']}+{j['matmul_nc_writes']})")
      ptraffic = "-" if not p else (f"{p['nc_reads']}+{p['nc_writes']}"
                                    f" ({p['matmul_nc_reads']}+{p['matmul_nc_writes']})")
      out.append(
          f"| {r['loss']} | {r['dtype']} | {r['shape']} | {_mib(j['temp_bytes'])} |"
          f" {_mib(p['temp_bytes']) if p else perr} | {ratio} |"
          f" {j['temp_bytes'] / j['logits_bytes']:.2f} | {_mib(j['argument_bytes'])} |"
          f" {_mib(j['output_bytes'])} | {hbm} | {traffic} | {ptraffic} |"
          f" {'; '.join(r['violations']) or 'ok'} |")
    unnamed = [r for r in mine if "jaxce-unnamed" in r]
    errors = [r for r in mine if "peer_error" in r]
    if errors or unnamed:
      out.append("")
    out.extend(
        f"- {r['loss']} {r['dtype']} {r['shape']} called without class_axis_name (the Auto"
        f" mesh's split of the kernel is in no type): temp"
        f" {_mib(r['jaxce-unnamed']['temp_bytes'])} MiB,"
        f" {len(r['jaxce-unnamed']['big_collectives'])} logits/kernel-sized collective(s)"
        for r in unnamed)
    out.extend(f"- peer compile error, {r['loss']} {r['dtype']} {r['shape']}: {r['peer_error']}"
               for r in errors)
  return "\n".join(out)


def plot(rows: list[dict[str, Any]], tname: str, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  mine = [r for r in rows if r["target"] == tname and "jaxce" in r]
  if not mine:
    return
  short = {"bfloat16": "bf16", "float32": "f32"}
  labels = [f"{r['loss']}\n{short.get(r['dtype'], r['dtype'])}"
            + (f"\nV={r['shape'].split('C=')[1]}" if r["loss"] == "linear_ce" else "")
            for r in mine]
  jx = [r["jaxce"]["temp_bytes"] / MiB for r in mine]
  peer = [r["peer"]["temp_bytes"] / MiB if r.get("peer") else 0 for r in mine]
  x = np.arange(len(mine))
  fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(mine)), 4.5))
  ax.bar(x - 0.2, jx, 0.4, label="jaxce")
  ax.bar(x + 0.2, peer, 0.4, label="peer (optax / jax.nn / materialized logits;"
                                    " missing: peer did not compile)")
  ax.set_yscale("log")
  ax.set_ylabel("compiled temp memory per device (MiB, log)")
  ax.set_xticks(x, labels, fontsize=7, rotation=45, ha="right")
  t = TARGETS[tname]
  ax.set_title(f"value_and_grad temp memory, compiler figures: {tname} ({t.chip},"
               f" {t.devices} chip{'s' * (t.devices > 1)}, {t.layout})", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _versions() -> dict[str, str]:
  out = {}
  for dist in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "optax"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = "not installed"
  out["jaxce"] = f"{jaxce.__version__} ({Path(jaxce.__file__).parent})"
  return out


def run(args: argparse.Namespace) -> dict[str, Any]:
  import threading

  from tqdm import tqdm
  pairs = plan(args)
  out_dir = report.output_folder(args.out)
  rows: list[dict[str, Any]] = []
  jobs: list[Job] = []
  owner: list[tuple[dict[str, Any], str]] = []  # each job's row and impl
  for case, shape, dtype, target in pairs:
    row: dict[str, Any] = {"target": target.name, "loss": case.name, "dtype": dtype,
                           "shape": shape.label(), "peer_name": case.peer_name}
    rows.append(row)
    why = compiler_missing(target.platform) or supported(case, target)
    if why:
      row["skipped"] = why
      continue
    unnamed = ("jaxce-unnamed",) if target.layout == "vocab" and case.auto is not None else ()
    for impl in ("jaxce", "peer", *unnamed):
      jobs.append((case.name, impl, target.name, dtype, shape))
      owner.append((row, impl))
  load_before = os.getloadavg()
  started = time.perf_counter()
  bar = tqdm(total=len(jobs), desc="compiling", unit="program")
  lock = threading.Lock()

  def done(i: int, result: Any) -> None:
    with lock:
      bar.update(1)

  try:
    results = compile_jobs_parallel(jobs, args.workers, keep_hlo=args.hlo,
                                    xla_flags=os.environ.get("XLA_FLAGS"), on_done=done)
  finally:
    bar.close()
  for (row, impl), result, (case_name, _, target_name, dtype, shape) in zip(
      owner, results, jobs, strict=True):
    if isinstance(result, str):  # a compiler error is a result: report it, go on
      lines = result.strip().splitlines() or ["?"]
      died = lines[0].startswith("compile worker exited")
      row[f"{impl}_error"] = (f"{lines[0]} {lines[-1]}" if died else lines[0])[:300]
      continue
    row[impl] = result
    if args.hlo:
      stem = f"{target_name}-{case_name}-{dtype}-{shape.c}-{impl}".replace(":", "_")
      (out_dir / f"{stem}.hlo.txt").write_text(result.pop("hlo"))
  for row, (case, shape, dtype, target) in zip(rows, pairs, strict=True):
    if "skipped" in row:
      continue
    if "jaxce" in row:
      row["violations"] = violations(case, shape, dtype, target, row["jaxce"], row.get("peer"))
    else:
      row["skipped"] = f"jaxce: compile error: {row['jaxce_error']}"
  targets = list(dict.fromkeys(r["target"] for r in rows))
  table = markdown(rows, targets)
  elapsed = time.perf_counter() - started
  workers = worker_count(args.workers, len(jobs)) if jobs else 0
  header = (f"Compiled value_and_grad memory per device, jaxce vs peer. Compiler figures"
            f" (jax.jit(...).lower().compile() for each target on a host with no"
            f" accelerator), not timings. {len(pairs)} pairs ({len(jobs)} programs, {workers}"
            f" compile workers) in {elapsed / 60:.1f} min;"
            f" load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after."
            f" HBM GB: TPU cost_analysis 'bytes accessed' (a while-loop body counted"
            f" once); GPU gives none. NxC reads+writes: logits-sized operands/results"
            f" of the materialized non-matmul ops in the optimized HLO (floor for the"
            f" loss: 2 reads + 1 write), and in parentheses those of matmul fusions"
            f" (logits = h @ W writes 1; dh and dW read the gradient twice, or the"
            f" logits when XLA fuses the loss's backward into them).")
  result = {
      "command": " ".join(sys.argv),
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "host": platform.node(), "cpus": os.cpu_count(), "versions": _versions(),
      "elapsed_s": elapsed, "load_before": load_before, "load_after": os.getloadavg(),
      "xla_flags": os.environ.get("XLA_FLAGS"), "workers": workers, "rows": rows,
  }
  (out_dir / "results.json").write_text(json.dumps(result, indent=1))
  _report(out_dir, header, table, rows, targets, args.no_plots)
  return result


def _report(out_dir: Path, header: str, table: str, rows: list[dict[str, Any]],
            targets: list[str], no_plots: bool) -> None:
  """results.md, a plot per target (unless `no_plots`) and the table on stdout."""
  (out_dir / "results.md").write_text(header + "\n" + table + "\n")
  if not no_plots:
    for tname in targets:
      plot(rows, tname, out_dir / f"aot-{tname.replace(':', '-')}.png")
  print(header)
  print(table)


def merge(args: argparse.Namespace) -> None:
  """Re-render results.json files as one report."""
  rows: dict[tuple[str, ...], dict[str, Any]] = {}
  runs = []
  for path in args.from_json:
    try:
      run_ = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
      sys.exit(f"--from-json {path!r}: cannot read it ({getattr(e, 'strerror', None) or e})")
    if not isinstance(run_, dict) or "rows" not in run_:
      sys.exit(f"--from-json {path!r}: not a results.json of this benchmark (no \"rows\";"
               " `python -m jaxce.benchmark` writes another kind)")
    # A merged file lists its runs; merging it again keeps them.
    own = [{k: v for k, v in run_.items() if k != "rows"}]
    runs.extend(run_.get("runs", own))
    for row in run_["rows"]:
      if "jaxce" in row:  # re-judged with today's figures
        shape = Shape(*(int(f.split("=")[1]) for f in row["shape"].split()))
        row["violations"] = violations(CASES[row["loss"]], shape, row["dtype"],
                                       TARGETS[row["target"]], row["jaxce"], row.get("peer"))
      rows[row["target"], row["loss"], row["dtype"], row["shape"]] = row
  order = {t: i for i, t in enumerate(TARGETS)}
  merged = sorted(rows.values(), key=lambda r: order.get(r["target"], len(order)))
  targets = list(dict.fromkeys(r["target"] for r in merged))
  out_dir = report.output_folder(args.out)
  header = ("Compiled value_and_grad memory per device, jaxce vs peer: compiler figures, not"
            " timings. Merged from: " + "; ".join(
                f"`{r['command']}` ({r['date']}, {r['elapsed_s'] / 60:.0f} min, load"
                f" {r['load_before'][0]:.1f})" for r in runs))
  table = markdown(merged, targets)
  (out_dir / "results.json").write_text(json.dumps({"runs": runs, "rows": merged}, indent=1))
  _report(out_dir, header, table, merged, targets, args.no_plots)


def main(argv: Sequence[str] | None = None) -> None:
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # compile-only: no device is used
  args = parse_args(argv)
  if args.from_json:
    merge(args)
  else:
    run(args)


if __name__ == "__main__":
  main()
