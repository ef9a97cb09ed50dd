"""backward="precompute" against "recompute" for `jaxce.linear_cross_entropy`.

float32 value_and_grad with respect to x and kernel, at the shapes behind the
`backward="auto"` rule (`jaxce._linear_precompute.MIN_ROWS`). The two paths
run interleaved in one process (A B A B ...) and the table shows the ratio
of each round, so that a loaded machine slows both alike; also the compiled
temp memory and the rows of a precompute block.

  python benchmarks/linear_backward.py              # the five shapes, 3 rounds
  python benchmarks/linear_backward.py --rounds 2 --shapes 2048,512,32768
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce import _linear_precompute

SHAPES = ((2048, 512, 32768), (4096, 512, 50257), (512, 64, 2**20), (2048, 256, 131072),
          (8192, 1024, 32000))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--shapes", nargs="*", default=None, help="N,D,V triples")
  args = parser.parse_args()
  shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes]
  print("| N | D | V | rows/block | precompute s | recompute s | ratio per round (pre/re) |"
        " temp MiB pre / re |")
  print("|---|---|---|---|---|---|---|---|")
  for n, d, v in shapes:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
    fns, temps = {}, {}
    for backward in ("precompute", "recompute"):
      f = jax.jit(jax.value_and_grad(
          lambda x, k, y, b=backward: jaxce.linear_cross_entropy(x, k, y, backward=b), (0, 1)))
      compiled = f.lower(x, kernel, labels).compile()
      temps[backward] = compiled.memory_analysis().temp_size_in_bytes / 2**20
      jax.block_until_ready(compiled(x, kernel, labels))  # warm-up
      fns[backward] = compiled
    times = {b: [] for b in fns}
    for _ in range(args.rounds):
      for b, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, kernel, labels))
        times[b].append(time.perf_counter() - t0)
    ratios = [p / r for p, r in zip(times["precompute"], times["recompute"], strict=True)]
    print(f"| {n} | {d} | {v} | {_linear_precompute.block_rows(n, v)} |"
          f" {min(times['precompute']):.2f} | {min(times['recompute']):.2f} |"
          f" {', '.join(f'{r:.2f}' for r in ratios)} |"
          f" {temps['precompute']:.0f} / {temps['recompute']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
