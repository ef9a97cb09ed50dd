"""The fused loss and optax on materialized logits against their matmuls alone.

value_and_grad of `linear_cross_entropy` and of optax on `x @ kernel` (with
respect to x and kernel, mean reduction), beside the three matmuls of a
materialized forward+backward (`x @ W`, `g @ W^T`, `x^T @ g`) and those three
plus the logits once more (the fourth matmul of the `"recompute"` backward),
each jitted without a loss. Interleaved in one process, every variant once
per round in a shuffled order after one untimed round; the table gives
median times and the median same-round ratios.

  PYTHONPATH=. python benchmarks/linear_matmuls.py
  PYTHONPATH=. python benchmarks/linear_matmuls.py --shapes 64,128,65536 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce
from jaxce.benchmark.measure import paired_ratio, positive_int, positive_ints, round_robin

SHAPES = ("64,128,32000", "64,128,65536", "64,128,256000")


def _row(n: int, d: int, v: int, dt: jnp.dtype, rounds: int) -> str:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, d)), dt)
  kernel = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dt)
  labels = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
  g = jnp.asarray(rng.normal(size=(n, v)), dt)
  grad = lambda loss: jax.jit(jax.value_and_grad(loss, (0, 1)))
  jaxce_vg = grad(lambda x, k: jaxce.linear_cross_entropy(x, k, labels))
  optax_vg = grad(lambda x, k: optax.softmax_cross_entropy_with_integer_labels(
      (x @ k).astype(jnp.float32), labels).mean())
  three = jax.jit(lambda x, k, g: (x @ k, g @ k.T, x.T @ g))
  # The logits again from a copy of x passed as its own argument: XLA merges
  # a second x @ k into the first (also through an optimization barrier).
  four = jax.jit(lambda x, x2, k, g: (x @ k, x2 @ k, g @ k.T, x.T @ g))
  times = round_robin({"jaxce": (jaxce_vg, (x, kernel)), "optax": (optax_vg, (x, kernel)),
                       "3 matmuls": (three, (x, kernel, g)),
                       "4 matmuls": (four, (x, x.copy(), kernel, g))},
                      warmup=1, repeats=rounds)

  ratio = lambda a, b: paired_ratio(times[a], times[b])
  ms = {name: f"{statistics.median(t) * 1e3:.1f} ms" for name, t in times.items()}
  return (f"| {n} | {d} | {v} | {ms['jaxce']} | {ms['optax']} | {ms['3 matmuls']} |"
          f" {ms['4 matmuls']} | {ratio('jaxce', 'optax'):.2f} |"
          f" {ratio('optax', '3 matmuls'):.2f} | {ratio('4 matmuls', '3 matmuls'):.2f} |")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", nargs="+", type=positive_ints(",", 3),
                 default=[positive_ints(",", 3)(s) for s in SHAPES], help="N,D,V triples")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--rounds", type=positive_int, default=9)
  args = p.parse_args()
  print(f"# {jax.default_backend()}, jax {jax.__version__}, {args.dtype}, {args.rounds} rounds")
  print("| N | D | V | jaxce | optax | 3 matmuls | 4 matmuls | jaxce / optax |"
        " optax / 3 matmuls | 4 / 3 matmuls |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
  for n, d, v in args.shapes:
    print(_row(n, d, v, jnp.dtype(args.dtype), args.rounds), flush=True)


if __name__ == "__main__":
  main()
