"""What leaving the label's term out of the log-sum costs on XLA:CPU.

Integer-label `cross_entropy` sums exp(x_c - shift) over the classes other
than the label and adds the label's term back as expm1 (see
`jaxce/_stats.py`, `_label_log_sum`), so that a loss near 0 is accurate to a
few float32 ulps of itself rather than to an ulp of 1. XLA:CPU's fused
reductions take no select, so on CPU that exclusion is a block gather or an
arithmetic mask. This script times `value_and_grad` of the mean loss three
ways, interleaved in one process (the order shuffled each round):

- shipped: jaxce as it is;
- with_label: the same kernels with the CPU sum taken over every class,
  label included (the formula PyTorch and optax use; a counterfactual for
  this measurement only, patched in at trace time);
- optax: `softmax_cross_entropy_with_integer_labels(...).mean()`.

It prints the medians of the same-round ratios.

  PYTHONPATH=. python benchmarks/label_exclusion.py
  PYTHONPATH=. python benchmarks/label_exclusion.py --shapes 8192x1000 65536x100 --rounds 21
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce import _stats
from jaxce._log_softmax import row_shift
from jaxce._sum import total
from jaxce.benchmark.measure import paired_ratio, positive_int, round_order

SHAPES = ("64x1024", "4096x1024", "16384x1000", "65536x10", "65536x100", "2048x4096",
          "4096x32000", "512x50257")


def _with_label(xm, labels, shift, x_label, axis, exclude, blocks=None):  # type: ignore[no-untyped-def]
  """`_label_log_sum` with the label's term left in the CPU sum."""
  if exclude != "cpu":
    return _SHIPPED(xm, labels, shift, x_label, axis, exclude, blocks)
  if shift is None:
    shift = jnp.squeeze(row_shift(xm, (axis,)), axis)
  s = total(jnp.exp(xm.astype(shift.dtype) - jnp.expand_dims(shift, axis)), axis)
  inside = (labels >= 0) & (labels < xm.shape[axis])
  picked = jnp.where(inside, x_label.astype(shift.dtype) - shift, 0.0)
  return shift, jnp.where(s == 0, -jnp.inf, jnp.log(jnp.where(s == 0, 1.0, s))), picked


_SHIPPED = _stats._label_log_sum


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="NxC")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--rounds", type=positive_int, default=15)
  args = p.parse_args()
  import optax

  dt = jnp.dtype(args.dtype)
  print(f"# {jax.devices()[0].platform}, jax {jax.__version__}, optax {optax.__version__}, "
        f"{args.dtype}, {args.rounds} rounds")
  print("| N x C | shipped / optax | with_label / optax | shipped / with_label |")
  print("|---|---:|---:|---:|")
  for spec in args.shapes:
    n, c = (int(s) for s in spec.split("x"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, c)) * 3, dt)
    y = jnp.asarray(rng.integers(0, c, n), jnp.int32)
    compiled = {}
    for name in ("shipped", "with_label", "optax"):
      _stats._label_log_sum = _with_label if name == "with_label" else _SHIPPED
      jax.clear_caches()  # the kernels' inner jits cache traces
      if name == "optax":
        f = lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()
      else:
        f = lambda x, y: jaxce.cross_entropy(x, y)
      compiled[name] = jax.jit(jax.value_and_grad(f)).lower(x, y).compile()
    _stats._label_log_sum = _SHIPPED
    times: dict[str, list[float]] = {k: [] for k in compiled}
    reps = max(3, min(200, int(1e8 / (n * c))))
    names = list(compiled)
    for r in range(args.rounds):
      for k in round_order(names, r):
        t0 = time.perf_counter()
        for _ in range(reps):
          out = compiled[k](x, y)
        jax.block_until_ready(out)
        times[k].append((time.perf_counter() - t0) / reps)

    print(f"| {spec} | {_ratio(times, 'shipped', 'optax'):.2f} | "
          f"{_ratio(times, 'with_label', 'optax'):.2f} | "
          f"{_ratio(times, 'shipped', 'with_label'):.2f} |", flush=True)


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float | None:
  """The median of the same-round ratios a / b."""
  return paired_ratio(times[a], times[b])


if __name__ == "__main__":
  main()
