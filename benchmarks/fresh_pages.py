"""What a gradient-shaped pass costs when its output is fresh pages, on CPU.

The integer-label gradient is one elementwise pass over the logits: the
softmax exp(x - lse), the label's entry replaced by p_y - 1, times the row's
cotangent. optax's exp pass writes the softmax alone. At 64 MB (16384 x
1000 float32) the output is fresh pages on every call (glibc serves blocks
above its 32 MiB mmap threshold with new pages), so both programs take the
same page faults; this script times passes of that shape alone, with the
process's CPU time and page faults per call, to show what the faults do to
each kind of pass:

- `exp`: exp(x - lse[:, None])
- `exp * g`: the same, times a per-row factor
- `exp * g + 0 * x`: two more operations per element, no comparison
- `label select * g`: jaxce's CPU form, the label found by comparing
  constant class numbers 1..C with y + 1 (`_stats.numbered_one_hot`), int16
  below 2^15 classes
- `label select (int32) * g`: the same with int32 class numbers
- `label select (iota) * g`: the same with an iota comparison

With `--ir` it also compiles each pass with XLA's dump on (in a subprocess)
and prints how many elements the vectorized inner loop of its LLVM IR
handles per iteration (LLVM's vector width times its interleave count).

  PYTHONPATH=. python benchmarks/fresh_pages.py
  PYTHONPATH=. python benchmarks/fresh_pages.py --shapes 16384x1000 4096x1024 --rounds 21 --ir
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _stats
from jaxce.benchmark.measure import positive_int, positive_ints, round_order

Pass = Callable[..., jax.Array]


def _selected(hot: jax.Array, x: jax.Array, lse: jax.Array, q: jax.Array,
              g: jax.Array) -> jax.Array:
  return jnp.where(hot, q[:, None], jnp.exp(x - lse[:, None])) * g[:, None]


def passes(num_classes: int) -> dict[str, Pass]:
  """The passes by name; the label selects find the label with jaxce's own
  one-hot helpers (`_stats.numbered_one_hot`, `_stats.one_hot_at`)."""

  def exp_pass(x: jax.Array, lse: jax.Array, y: jax.Array, q: jax.Array,
               g: jax.Array) -> jax.Array:
    return jnp.exp(x - lse[:, None])

  def exp_times_g(x: jax.Array, lse: jax.Array, y: jax.Array, q: jax.Array,
                  g: jax.Array) -> jax.Array:
    return jnp.exp(x - lse[:, None]) * g[:, None]

  def exp_times_g_plus_zero(x: jax.Array, lse: jax.Array, y: jax.Array, q: jax.Array,
                            g: jax.Array) -> jax.Array:
    return jnp.exp(x - lse[:, None]) * g[:, None] + 0.0 * x

  def label_select(x: jax.Array, lse: jax.Array, y: jax.Array, q: jax.Array,
                   g: jax.Array) -> jax.Array:
    return _selected(_stats.numbered_one_hot(y, x.shape, 1), x, lse, q, g)

  def label_select_int32(x: jax.Array, lse: jax.Array, y: jax.Array, q: jax.Array,
                         g: jax.Array) -> jax.Array:
    return _selected(_stats.numbered_one_hot(y, x.shape, 1, narrow=False), x, lse, q, g)

  def label_select_iota(x: jax.Array, lse: jax.Array, y: jax.Array, q: jax.Array,
                        g: jax.Array) -> jax.Array:
    return _selected(_stats.one_hot_at(y, x.shape, 1), x, lse, q, g)

  return {"exp": exp_pass, "exp * g": exp_times_g, "exp * g + 0 * x": exp_times_g_plus_zero,
          "label select * g": label_select, "label select (int32) * g": label_select_int32,
          "label select (iota) * g": label_select_iota}


def inputs(n: int, c: int) -> tuple[jax.Array, ...]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, c), np.float32))
  lse = jax.nn.logsumexp(x, axis=1)
  y = jnp.asarray(rng.integers(0, c, n, dtype=np.int32))
  q = jnp.exp(jnp.take_along_axis(x, y[:, None], 1)[:, 0] - lse) - 1.0
  g = jnp.full((n,), 1.0 / n, jnp.float32)
  return jax.block_until_ready((x, lse, y, q, g))


def time_passes(n: int, c: int, rounds: int, seed: int) -> dict[str, dict[str, list[float]]]:
  args = inputs(n, c)
  fns = {name: jax.jit(f) for name, f in passes(c).items()}
  for f in fns.values():  # compile, and one untimed call each
    jax.block_until_ready(f(*args))
  out: dict[str, dict[str, list[float]]] = {
      name: {"wall": [], "user": [], "sys": [], "faults": []} for name in fns}
  for r in range(rounds):
    for name in round_order(list(fns), r, seed):
      before = resource.getrusage(resource.RUSAGE_SELF)
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name](*args))
      wall = time.perf_counter() - t0
      after = resource.getrusage(resource.RUSAGE_SELF)
      rec = out[name]
      rec["wall"].append(wall)
      rec["user"].append(after.ru_utime - before.ru_utime)
      rec["sys"].append(after.ru_stime - before.ru_stime)
      rec["faults"].append(float(after.ru_minflt - before.ru_minflt))
  return out


def loop_widths(n: int, c: int) -> dict[str, list[int]]:
  """Elements per iteration of each pass's vectorized inner loop(s), from
  the LLVM IR that XLA:CPU dumps (compiled in a subprocess with the dump on)."""
  with tempfile.TemporaryDirectory() as d:
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={d}", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, __file__, "--compile-only", f"{n}x{c}"], env=env,
                   check=True, capture_output=True)
    widths: dict[str, list[int]] = {}
    for name, f in passes(c).items():
      files = glob.glob(f"{d}/*jit_{f.__name__}.*ir-with-opt.ll")
      steps: list[int] = []
      for path in files:
        with open(path) as fh:
          steps += [int(s) for s in re.findall(r"%index\.next = add nuw i64 %index, (\d+)",
                                               fh.read())]
      widths[name] = sorted(set(steps), reverse=True)
    return widths


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", nargs="+", type=positive_ints("x"),
                 default=[(16384, 1000), (4096, 1024)], help="NxC of float32 logits")
  p.add_argument("--rounds", type=positive_int, default=15, help="interleaved timed rounds")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ir", action="store_true",
                 help="also print each pass's LLVM loop step (elements per iteration)")
  p.add_argument("--compile-only", type=positive_ints("x"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.compile_only:
    n, c = args.compile_only
    structs = (jax.ShapeDtypeStruct((n, c), jnp.float32),
               *(jax.ShapeDtypeStruct((n,), t) for t in (jnp.float32, jnp.int32, jnp.float32,
                                                         jnp.float32)))
    for f in passes(c).values():
      jax.jit(f).lower(*structs).compile()
    return
  print(f"# {jax.default_backend()}, jax {jax.__version__}, float32, {args.rounds} rounds;"
        " per call: median wall time, its same-round ratio to `exp`, and the process's"
        " CPU time (all threads) and minor page faults")
  for n, c in args.shapes:
    times = time_passes(n, c, args.rounds, args.seed)
    widths = loop_widths(n, c) if args.ir else {}
    print(f"\n## {n} x {c} ({n * c * 4 / 2**20:.0f} MiB out)\n")
    head = "| pass | wall ms | / exp | user ms | sys ms | faults |"
    print(head + (" loop step |" if args.ir else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if args.ir else ""))
    base = times["exp"]["wall"]
    for name, rec in times.items():
      ratio = statistics.median(a / b for a, b in zip(rec["wall"], base, strict=True))
      user, sys_, faults = (statistics.median(rec[k]) for k in ("user", "sys", "faults"))
      row = (f"| {name} | {statistics.median(rec['wall']) * 1e3:.2f} | {ratio:.2f} |"
             f" {user * 1e3:.1f} | {sys_ * 1e3:.1f} | {faults:.0f} |")
      if args.ir:
        row += f" {', '.join(map(str, widths.get(name, []))) or '-'} |"
      print(row, flush=True)


if __name__ == "__main__":
  main()
