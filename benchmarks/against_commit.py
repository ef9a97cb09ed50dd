"""This tree's kernels against an earlier commit's, value_and_grad on CPU
(the forward alone with --forward).

The package as it was at COMMIT (`git archive`, its imports renamed to
`jaxce_base`) and this tree's `jaxce` are timed in one process,
interleaved (the order shuffled each round), every input an argument.
The table gives the median of the same-round ratios this / base.

  PYTHONPATH=. python benchmarks/against_commit.py 1b96716
  PYTHONPATH=. python benchmarks/against_commit.py 1b96716 --specs int:16384:1000:f32 --rounds 31
  PYTHONPATH=. python benchmarks/against_commit.py 71ac2d0 --forward --specs probs:16384:1000:bf16

A spec is kind:N:C:dtype, kind one of int, int_smooth, int_smooth_masked
(the last 8 classes' logits -inf, no label on them), int_where and
int_smooth_where (the last 8 classes outside `where=`, no label on them),
int_vmap (`jax.vmap` over 16 groups of N / 16 rows), int_far (row 0's
label 190+ below its max), int_producer (the logits divided by 0.7 in the
same jit), int_smooth_weight (with class weights), int_z, probs,
probs_masked (the last 8 classes' logits -inf, their targets 0),
probs_smooth, nll, log_softmax, log_softmax_where (the last 8 classes
outside `where=`, their cotangent 0), logsumexp, bce, bce_pw (with a
`pos_weight`), linear (`linear_cross_entropy` of x [N, D] and a kernel
[D, C], D = --hidden, 128 by default, value_and_grad over both); dtype f32
or bf16. (1b96716 is the last commit before the losses became custom_jvp
kernels.)
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxce.benchmark.measure import paired_ratio, positive_int, round_order

SPECS = ("int:64:1024:f32", "int:64:32000:f32", "int:1024:1024:f32", "int:8192:1000:f32",
         "int:16384:1000:f32", "int:65536:100:f32", "int:64:32000:bf16", "int:4096:1024:bf16",
         "int_smooth:4096:1024:bf16", "probs:4096:1024:f32", "nll:4096:1024:f32",
         "log_softmax:4096:1024:f32", "logsumexp:4096:1024:f32", "bce:4096:1024:f32")


def load_base(commit: str, root: pathlib.Path) -> Any:
  """`jaxce` at `commit`, importable as `jaxce_base`."""
  tar = subprocess.run(["git", "-C", str(root), "archive", commit, "jaxce"],
                       check=True, capture_output=True).stdout
  where = pathlib.Path(tempfile.mkdtemp(prefix="jaxce_base_"))
  with tarfile.open(fileobj=io.BytesIO(tar)) as t:
    t.extractall(where, filter="data")
  (where / "jaxce").rename(where / "jaxce_base")
  for py in (where / "jaxce_base").rglob("*.py"):
    py.write_text(re.sub(r"\bjaxce\b", "jaxce_base", py.read_text()))
  sys.path.insert(0, str(where))
  atexit.register(shutil.rmtree, where, ignore_errors=True)  # (imported by then)
  return importlib.import_module("jaxce_base")


def loss(kind: str, m: Any) -> Callable[..., jax.Array]:
  """The scalar loss of (logits, labels, targets) that `kind` times."""
  if kind == "int_producer":
    return lambda x, y, t: m.cross_entropy(x / 0.7, y)
  if kind in ("int", "int_far"):
    return lambda x, y, t: m.cross_entropy(x, y)
  if kind in ("int_smooth", "int_smooth_masked"):
    return lambda x, y, t: m.cross_entropy(x, y, label_smoothing=0.1)
  if kind in ("int_where", "int_smooth_where"):
    smoothing = 0.1 if kind == "int_smooth_where" else 0.0
    return lambda x, y, t: m.cross_entropy(
        x, y, label_smoothing=smoothing, where=jnp.arange(x.shape[-1]) < x.shape[-1] - 8)
  if kind == "int_smooth_weight":
    return lambda x, y, t: m.cross_entropy(x, y, label_smoothing=0.1,
                                           weight=jnp.linspace(0.5, 1.5, x.shape[-1]))
  if kind == "int_vmap":
    def grouped(x: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
      split = lambda a: a.reshape(16, -1, *a.shape[1:])
      return jnp.mean(jax.vmap(m.cross_entropy)(split(x), split(y)))
    return grouped
  if kind == "int_z":
    return lambda x, y, t: m.cross_entropy(x, y, z_loss=1e-4)
  if kind in ("probs", "probs_masked"):
    return lambda x, y, t: m.cross_entropy(x, t)
  if kind == "probs_smooth":
    return lambda x, y, t: m.cross_entropy(x, t, label_smoothing=0.1)
  if kind == "nll":
    return lambda x, y, t: m.nll_loss(x, y)
  if kind == "log_softmax":
    return lambda x, y, t: jnp.sum((m.log_softmax(x) * t).astype(jnp.float32))
  if kind == "log_softmax_where":
    return lambda x, y, t: jnp.sum((m.log_softmax(
        x, where=jnp.arange(x.shape[-1]) < x.shape[-1] - 8) * t).astype(jnp.float32))
  if kind == "logsumexp":
    return lambda x, y, t: jnp.sum(m.logsumexp(x).astype(jnp.float32))
  if kind == "bce":
    return lambda x, y, t: m.binary_cross_entropy_with_logits(x, t)
  if kind == "bce_pw":
    return lambda x, y, t: m.binary_cross_entropy_with_logits(
        x, t, pos_weight=jnp.linspace(0.5, 2.0, x.shape[-1]).astype(x.dtype))
  if kind == "linear":  # (x, labels, kernel)
    return lambda x, y, t: m.linear_cross_entropy(x, t, y)
  raise ValueError(f"unknown kind {kind!r}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("commit")
  p.add_argument("--specs", nargs="+", default=list(SPECS))
  p.add_argument("--rounds", type=positive_int, default=15)
  p.add_argument("--forward", action="store_true", help="time the loss alone, not value_and_grad")
  p.add_argument("--hidden", type=positive_int, default=128, help="D of the linear kind")
  args = p.parse_args()
  import jaxce

  for spec in args.specs:
    parts = spec.split(":")
    try:
      loss(parts[0], jaxce)
      ok = len(parts) == 4 and min(int(parts[1]), int(parts[2])) > 0
    except (ValueError, IndexError):
      ok = False
    if not ok or parts[3] not in ("f32", "bf16"):
      p.error(f"--specs: expected kind:N:C:f32|bf16 with a kind that `loss` names. Got {spec!r}")
  try:
    base = load_base(args.commit, pathlib.Path(__file__).resolve().parents[1])
  except subprocess.CalledProcessError as e:
    p.error(f"commit {args.commit!r}: {e.stderr.decode().strip()}")
  what = "forward" if args.forward else "value_and_grad"
  print(f"# cpu, jax {jax.__version__}, this tree / {args.commit}, {what}, {args.rounds} rounds")
  print("| kind | N x C | dtype | this / base | base | this | temp MiB base | temp MiB this |")
  print("|---|---|---|---:|---:|---:|---:|---:|")
  for spec in args.specs:
    kind, n, c, d = spec.split(":")
    n, c = int(n), int(c)
    dt = {"f32": jnp.float32, "bf16": jnp.bfloat16}[d]
    k = jax.random.split(jax.random.key(0), 3)
    x = (jax.random.normal(k[0], (n, c)) * 3).astype(dt)
    y = jax.random.randint(k[1], (n,), 0, c)
    t = jax.nn.softmax(jax.random.normal(k[2], (n, c))).astype(dt)
    if kind in ("bce", "bce_pw"):
      t = jax.random.uniform(k[2], (n, c)).astype(dt)
    if kind == "probs_masked":
      x, t = x.at[:, -8:].set(-jnp.inf), t.at[:, -8:].set(0)
    if kind == "int_smooth_masked":
      x, y = x.at[:, -8:].set(-jnp.inf), y % (c - 8)
    if kind in ("int_where", "int_smooth_where"):
      y = y % (c - 8)
    if kind == "log_softmax_where":
      t = t.at[:, -8:].set(0)
    if kind == "int_far":
      x = x.at[0, (y[0] + 1) % c].set(200.0)
    argnums: int | tuple[int, ...] = 0
    if kind == "linear":
      hidden = args.hidden
      x = jax.random.normal(k[0], (n, hidden)).astype(dt)
      t = (jax.random.normal(k[2], (hidden, c)) / hidden**0.5).astype(dt)
      argnums = (0, 2)
    fs = {name: jax.jit(loss(kind, m) if args.forward
                        else jax.value_and_grad(loss(kind, m), argnums=argnums))
          .lower(x, y, t).compile()
          for name, m in (("base", base), ("this", jaxce))}
    temp = {name: f.memory_analysis().temp_size_in_bytes / 2**20 for name, f in fs.items()}
    reps = max(1, min(100, int(3e7 / (n * c))))
    ts: dict[str, list[float]] = {name: [] for name in fs}
    for r in range(args.rounds):
      for name in round_order(list(fs), r):
        t0 = time.perf_counter()
        for _ in range(reps):
          out = fs[name](x, y, t)
        jax.block_until_ready(out)
        ts[name].append((time.perf_counter() - t0) / reps)
    ratio = paired_ratio(ts["this"], ts["base"])
    print(f"| {kind} | {n}x{c} | {d} | {ratio:.3f} | {statistics.median(ts['base']) * 1e3:.2f} ms"
          f" | {statistics.median(ts['this']) * 1e3:.2f} ms"
          f" | {temp['base']:.2f} | {temp['this']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
