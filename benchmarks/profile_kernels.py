"""Where the time of one loss's `value_and_grad` goes, jaxce against its peer.

For one case of the benchmark (`jaxce.benchmark.cases`) and one shape, this
script jits `value_and_grad` of each implementation (jaxce's and the peer's,
as the sweep runs them), traces `--calls` calls of each with
`jax.profiler`, and prints, per implementation, the events with the most
time per call: on CPU the compiled program's kernels (fusions, YNNPACK
kernels, scatters) beside the runtime's own events (`ThunkExecutor`, the
wait in `block_until_ready`); on GPU and TPU the device's kernels. Events
named after Python functions (`$...`) are left out.

It answers what a ratio in the sweep cannot: which pass is slower, and
whether a gap is the kernels or the call around them (see
benchmarks/README.md, "Where jaxce is slower than its peer on CPU, and
why"). A trace is one process on a shared machine: compare the kernels of
one run with each other, not with another run's.

  PYTHONPATH=. python benchmarks/profile_kernels.py --case ce_int --shape 16384x1000
  PYTHONPATH=. python benchmarks/profile_kernels.py --case nll --shape 64x1024 --top 8
  PYTHONPATH=. python benchmarks/profile_kernels.py --case ce_int --shape 1024x1024 --forward
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from jaxce.benchmark.cases import CASES, Shape
from jaxce.benchmark.measure import positive_int, positive_ints


def kernel_times(trace_dir: str, calls: int) -> list[tuple[float, float, str]]:
  """(microseconds per call, events per call, name) of the trace's complete
  events, most time first; Python-function events (`$...`) left out."""
  files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
  if len(files) != 1:
    raise RuntimeError(f"expected one trace file under {trace_dir}, found {len(files)}")
  with gzip.open(files[0]) as f:
    events = json.load(f)["traceEvents"]
  durations: dict[str, list[float]] = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and not str(e.get("name", "")).startswith("$"):
      durations[e["name"]].append(float(e.get("dur", 0.0)))
  rows = [(sum(d) / calls, len(d) / calls, name) for name, d in durations.items()]
  return sorted(rows, reverse=True)


def profile(fn: Any, args: tuple[Any, ...], calls: int) -> list[tuple[float, float, str]]:
  for _ in range(3):  # compile and warm up outside the trace
    jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    return kernel_times(d, calls)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--case", choices=sorted(CASES), default="ce_int")
  p.add_argument("--shape", type=positive_ints("x"), default=(16384, 1000),
                 help="NxC (NxDxV for linear_ce)")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--calls", type=positive_int, default=20, help="traced calls per implementation")
  p.add_argument("--top", type=positive_int, default=12, help="events shown per implementation")
  p.add_argument("--forward", action="store_true", help="the forward alone, not value_and_grad")
  args = p.parse_args()
  case = CASES[args.case]
  dims = args.shape
  if len(dims) == 3:
    if case.name != "linear_ce":
      p.error("an NxDxV shape is for --case linear_ce")
    shape = Shape(dims[0], dims[2], dims[1])
  elif len(dims) == 2:
    if case.name == "linear_ce":
      p.error("--case linear_ce takes an NxDxV shape")
    shape = Shape(*dims)
  else:
    p.error(f"expected NxC or NxDxV, got {'x'.join(map(str, dims))}")
  inputs = case.make_inputs(shape, jnp.dtype(args.dtype), jax.random.PRNGKey(0))
  mode = "forward" if args.forward else "value_and_grad"
  print(f"# {case.title}, {shape.label()}, {args.dtype}, {mode}, {args.calls} calls, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}")
  for impl in case.impls:
    fn = jax.jit(impl.loss if args.forward else jax.value_and_grad(impl.loss, argnums=case.argnums))
    rows = profile(fn, inputs, args.calls)
    print(f"\n## {impl.name}\n\n| us per call | per call | event |\n|---:|---:|---|")
    for us, count, name in rows[:args.top]:
      print(f"| {us:.1f} | {count:g} | `{name[:100]}` |")


if __name__ == "__main__":
  main()
