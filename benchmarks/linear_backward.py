"""backward="precompute" against "recompute" for `jaxce.linear_cross_entropy`.

value_and_grad with respect to x and kernel (float32 unless `--dtype` says
otherwise), at the shapes behind the `backward="auto"` rule
(`jaxce._linear_precompute.MIN_ROWS` and `platforms`). The two paths
run interleaved in one process (A B A B ...) and the table shows the ratio
of each round, so that a loaded machine slows both alike; also the compiled
temp memory and the rows of a precompute block.

  PYTHONPATH=. python benchmarks/linear_backward.py        # the five shapes, 3 rounds
  PYTHONPATH=. python benchmarks/linear_backward.py --optax --shapes 2048,512,32768
  PYTHONPATH=. python benchmarks/linear_backward.py --optax --bias --shapes 1024,128,16384
  PYTHONPATH=. python benchmarks/linear_backward.py --optax --dtype bfloat16 --rounds 7

(`--optax` adds optax's softmax_cross_entropy_with_integer_labels on the
materialized logits x @ kernel to each round; `--bias` adds a [V] bias to
every loss, and differentiates it too; `--forward-mode` adds
`forward_mode=True`, timed against recompute; `--softcap S` caps every
loss's logits, optax's too.)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce import _linear_precompute
from jaxce.benchmark.measure import positive_int

SHAPES = ((2048, 512, 32768), (4096, 512, 50257), (512, 64, 2**20), (2048, 256, 131072),
          (8192, 1024, 32000))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=positive_int, default=3)
  parser.add_argument("--calls", type=positive_int, default=1,
                      help="calls timed together in a round (for small shapes)")
  parser.add_argument("--shapes", nargs="+", default=None, help="N,D,V triples")
  parser.add_argument("--optax", action="store_true", help="add materialized logits + optax")
  parser.add_argument("--bias", action="store_true", help="a [V] bias in every loss")
  parser.add_argument("--forward-mode", action="store_true", help="add forward_mode=True")
  parser.add_argument("--softcap", type=float, default=None, help="softcap of every loss")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="dtype of x, kernel and bias")
  args = parser.parse_args()
  shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes]
  optax_head = " optax s | pre/optax, re/optax per round |" if args.optax else ""
  fm_head = " forward_mode/re per round |" if args.forward_mode else ""
  print("| N | D | V | rows/block | precompute s | recompute s | ratio per round (pre/re) |"
        " temp MiB pre / re |" + optax_head + fm_head)
  print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.optax else "")
        + ("---|" if args.forward_mode else ""))
  cap = args.softcap
  for n, d, v in shapes:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, d)), args.dtype)
    kernel = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), args.dtype)
    labels = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
    bias = jnp.asarray(rng.normal(size=(v,)), args.dtype) if args.bias else None
    fns, temps = {}, {}
    losses = {b: lambda x, k, y, c, b=b: jaxce.linear_cross_entropy(
        x, k, y, bias=c, softcap=cap, backward=b) for b in ("precompute", "recompute")}
    if args.optax:
      import optax

      def materialized(x: jax.Array, k: jax.Array, y: jax.Array, c: jax.Array | None
                       ) -> jax.Array:
        logits = x @ k if c is None else x @ k + c
        if cap is not None:
          logits = cap * jnp.tanh(logits / cap)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

      losses["optax"] = materialized
    if args.forward_mode:
      losses["forward_mode"] = lambda x, k, y, c: jaxce.linear_cross_entropy(
          x, k, y, bias=c, softcap=cap, forward_mode=True)
    inputs = (x, kernel, labels, bias)
    for backward, loss in losses.items():
      f = jax.jit(jax.value_and_grad(loss, (0, 1) if bias is None else (0, 1, 3)))
      compiled = f.lower(*inputs).compile()
      temps[backward] = compiled.memory_analysis().temp_size_in_bytes / 2**20
      jax.block_until_ready(compiled(*inputs))  # warm-up
      fns[backward] = compiled
    times = {b: [] for b in fns}
    for _ in range(args.rounds):
      for b, f in fns.items():
        t0 = time.perf_counter()
        for _ in range(args.calls):
          jax.block_until_ready(f(*inputs))
        times[b].append((time.perf_counter() - t0) / args.calls)
    ratios = [p / r for p, r in zip(times["precompute"], times["recompute"], strict=True)]
    print(f"| {n} | {d} | {v} | {_linear_precompute.block_rows(n, v)} |"
          f" {min(times['precompute']):.2f} | {min(times['recompute']):.2f} |"
          f" {', '.join(f'{r:.2f}' for r in ratios)} (median {np.median(ratios):.2f}) |"
          f" {temps['precompute']:.0f} / {temps['recompute']:.0f} |" + _optax_cols(times)
          + _forward_mode_cols(times), flush=True)


def _forward_mode_cols(times: dict[str, list[float]]) -> str:
  if "forward_mode" not in times:
    return ""
  rounds = zip(times["forward_mode"], times["recompute"], strict=True)
  return f" {', '.join(f'{f / r:.2f}' for f, r in rounds)} |"


def _optax_cols(times: dict[str, list[float]]) -> str:
  if "optax" not in times:
    return ""
  rounds = zip(times["precompute"], times["recompute"], times["optax"], strict=True)
  pairs = [(p / o, r / o) for p, r, o in rounds]
  medians = np.median(np.asarray(pairs), axis=0)
  return (f" {min(times['optax']):.2f} |"
          f" {', '.join(f'{p:.2f}/{r:.2f}' for p, r in pairs)}"
          f" (median {medians[0]:.2f}/{medians[1]:.2f}) |")


if __name__ == "__main__":
  main()
