"""What the backward of integer-label `cross_entropy` costs, against optax's.

jaxce's backward recomputes the softmax from the logits and one log-sum per
row (nothing N x C is kept between forward and backward), so its gradient
pass computes exp(x - lse) again; optax's autodiff keeps the softmax from
the forward and only scales it. On XLA:CPU an exp pass is what a pass over
the logits costs, so at shapes whose logits stay in cache jaxce's
`value_and_grad` takes longer than optax's by about one exp pass.

Per shape this script times, interleaved in one process (the order shuffled
each round): each loss's forward and `value_and_grad` (jitted, mean
reduction), and one bare exp pass, exp(x - c) for a per-row c, written to a
fresh buffer. It prints the medians of same-round ratios:

- vg / optax vg (fwd / optax fwd): jaxce's `value_and_grad` (forward) time
  over optax's;
- (vg - fwd) / exp: what `value_and_grad` adds to the forward, in exp passes;
- exp sum / exp: a row sum of the same exps (nothing written, as jaxce's
  forward takes it), over the exp pass. jaxce's `value_and_grad` takes one
  of each where optax's takes one exp pass and cheaper ones: below 1, the
  sum is the cheaper; not so on every CPU (benchmarks/README.md).

  PYTHONPATH=. python benchmarks/backward_cost.py
  PYTHONPATH=. python benchmarks/backward_cost.py --shapes 1024x1024 65536x10 --rounds 31
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce.benchmark.measure import paired_ratio, positive_int, round_robin

SHAPES = ("256x1024", "1024x1024", "4096x1024", "16384x1000", "65536x10", "65536x100",
          "64x32000", "512x50257")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="NxC")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--rounds", type=positive_int, default=21)
  args = p.parse_args()
  import optax

  dt = jnp.dtype(args.dtype)
  print(f"# {jax.devices()[0].platform}, jax {jax.__version__}, optax {optax.__version__}, "
        f"{args.dtype}, {args.rounds} rounds")
  print("| N x C | jaxce vg / optax vg | jaxce fwd / optax fwd | jaxce (vg - fwd) / exp "
        "| optax (vg - fwd) / exp | exp pass | exp sum / exp |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for spec in args.shapes:
    n, c = (int(s) for s in spec.split("x"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, c)) * 3, dt)
    y = jnp.asarray(rng.integers(0, c, n), jnp.int32)
    shift = jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)

    def ours(x, y):  # type: ignore[no-untyped-def]
      return jaxce.cross_entropy(x, y)

    def theirs(x, y):  # type: ignore[no-untyped-def]
      return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

    def exp_pass(x, y, shift=shift):  # type: ignore[no-untyped-def]
      return jnp.exp(x.astype(jnp.float32) - shift[:, None]).astype(x.dtype)

    def exp_sum(x, y, shift=shift):  # type: ignore[no-untyped-def]
      return jnp.sum(jnp.exp(x.astype(jnp.float32) - shift[:, None]), axis=-1)

    fns = {"jaxce_fwd": ours, "jaxce_vg": jax.value_and_grad(ours),
           "optax_fwd": theirs, "optax_vg": jax.value_and_grad(theirs), "exp": exp_pass,
           "exp_sum": exp_sum}
    units = {k: (jax.jit(f).lower(x, y).compile(), (x, y)) for k, f in fns.items()}
    times = round_robin(units, warmup=1, repeats=args.rounds)
    print(f"| {spec} | {paired_ratio(times['jaxce_vg'], times['optax_vg']):.2f} | "
          f"{paired_ratio(times['jaxce_fwd'], times['optax_fwd']):.2f} | "
          f"{_added(times, 'jaxce'):.2f} | {_added(times, 'optax'):.2f} | "
          f"{1e6 * statistics.median(times['exp']):.0f} us | "
          f"{paired_ratio(times['exp_sum'], times['exp']):.2f} |", flush=True)


def _added(times: dict[str, list[float]], who: str) -> float:
  """Median over rounds of (value_and_grad - forward) / exp pass."""
  vg, fwd, e = times[f"{who}_vg"], times[f"{who}_fwd"], times["exp"]
  return statistics.median((a - b) / d for a, b, d in zip(vg, fwd, e, strict=True))


if __name__ == "__main__":
  main()
