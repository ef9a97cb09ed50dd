"""jaxce against its peers on rows with many classes and no block divisor.

On XLA:CPU a fused reduction over rows of more than 32,768 floats costs
about one more pass over memory per fused op, and jaxce sums such rows in
blocks only where the row length has a divisor in [64, 2048] (see
benchmarks/README.md, "Long rows whose length has no block divisor").
Vocabularies such as cl100k's (100277 = 17 x 5899) have none. This script
times `value_and_grad` of four losses and their peers on such shapes,
interleaved in one process (the order shuffled each round, after one untimed round), and prints the
medians of the same-round ratios with the compiled temp memory:

- log_softmax against `jax.nn.log_softmax` (contracted with a fixed row);
- probability targets against `optax.softmax_cross_entropy`;
- label_smoothing=0.1 against optax on `smooth_labels` of a one-hot;
- integer labels against `optax.softmax_cross_entropy_with_integer_labels`.

  PYTHONPATH=. python benchmarks/long_rows.py
  PYTHONPATH=. python benchmarks/long_rows.py --shapes 64x256206 --dtype bfloat16 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce.benchmark.measure import paired_ratio, positive_int, positive_ints, round_robin

SHAPES = ("512x100277", "64x100277")


def cases(c: int) -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
  """name -> (jaxce's scalar loss, the peer's) of (logits, labels, targets)."""
  import optax

  row = jnp.asarray(np.random.default_rng(9).normal(size=c), jnp.float32)
  return {
      "log_softmax": (lambda x, y, t: jnp.sum(jaxce.log_softmax(x) * row),
                      lambda x, y, t: jnp.sum(jax.nn.log_softmax(x.astype(jnp.float32)) * row)),
      "probability targets": (lambda x, y, t: jaxce.cross_entropy(x, t),
                              lambda x, y, t: optax.softmax_cross_entropy(x, t).mean()),
      "label smoothing": (
          lambda x, y, t: jaxce.cross_entropy(x, y, label_smoothing=0.1),
          lambda x, y, t: optax.softmax_cross_entropy(
              x, optax.smooth_labels(jax.nn.one_hot(y, c), 0.1)).mean()),
      "integer labels": (
          lambda x, y, t: jaxce.cross_entropy(x, y),
          lambda x, y, t: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", nargs="+", type=positive_ints("x", 2),
                 default=[positive_ints("x", 2)(s) for s in SHAPES], help="NxC")
  p.add_argument("--dtype", default="float32", help="of the logits (targets: float32)")
  p.add_argument("--rounds", type=positive_int, default=7)
  args = p.parse_args()
  import optax

  dt = jnp.dtype(args.dtype)
  print(f"# {jax.devices()[0].platform} x {jax.device_count()}, jax {jax.__version__}, "
        f"optax {optax.__version__}, {args.dtype}, {args.rounds} rounds, value_and_grad")
  print("| N x C | loss | jaxce | peer | jaxce / peer | temp MiB jaxce / peer |")
  print("|---|---|---:|---:|---:|---:|")
  for n, c in args.shapes:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, c)) * 3, dt)
    y = jnp.asarray(rng.integers(0, c, n), jnp.int32)
    t = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, c)), jnp.float32))
    units, temp = {}, {}
    for name, pair in cases(c).items():
      for impl, f in zip(("jaxce", "peer"), pair, strict=True):
        exe = jax.jit(jax.value_and_grad(f)).lower(x, y, t).compile()
        units[f"{name}/{impl}"] = (exe, (x, y, t))
        temp[name, impl] = exe.memory_analysis().temp_size_in_bytes / 2**20
    times = round_robin(units, warmup=1, repeats=args.rounds)
    for name in cases(c):
      mine, peer = times[f"{name}/jaxce"], times[f"{name}/peer"]
      print(f"| {n}x{c} | {name} | {statistics.median(mine) * 1e3:.1f} ms | "
            f"{statistics.median(peer) * 1e3:.1f} ms | {paired_ratio(mine, peer):.2f} | "
            f"{temp[name, 'jaxce']:.1f} / {temp[name, 'peer']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
