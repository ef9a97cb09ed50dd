"""Float32 accuracy of the integer-label gradient against float64, jaxce and optax.

On CPU jaxce shifts each row by its label's logit (no pass for the max; see
`jaxce/_stats.py`, `_shift_stats`), so a row whose label lies D below its
max has every exponent x_c - shift, and the log-sum, rounded at the scale of
D. This script draws logits of a few standard deviations, takes the
gradient of the mean loss from both libraries (float32, under `jax.jit`)
and from the benchmark's float64 reference, and prints, per scale, the largest error
of any row in float32 ulps of that row's largest gradient entry, with the
largest D among the rows. The bound jaxce states is (D + 16) ulps (see
`cross_entropy`'s docstring; `tests/test_numerics.py` holds it).

  PYTHONPATH=. python benchmarks/gradient_accuracy.py
  PYTHONPATH=. python benchmarks/gradient_accuracy.py --classes 32000 --rows 64 --trials 5
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce
from jaxce.benchmark.cases import _ref_ce_int
from jaxce.benchmark.measure import positive_int

SCALES = (1.0, 3.0, 5.0, 10.0, 20.0)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=positive_int, default=128)
  parser.add_argument("--classes", type=positive_int, default=1000)
  parser.add_argument("--trials", type=positive_int, default=3, help="draws per scale")
  parser.add_argument("--seed", type=int, default=1)
  args = parser.parse_args(argv)

  jaxce_grad = jax.jit(jax.grad(lambda x, y: jaxce.cross_entropy(x, y)))
  optax_grad = jax.jit(jax.grad(
      lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()))
  rng = np.random.default_rng(args.seed)
  n, c = args.rows, args.classes
  print(f"# {jax.default_backend()}, jax {jax.__version__}, {n} x {c}, float32, "
        f"{args.trials} draws a scale; error in float32 ulps of each row's largest entry")
  print("| logits' std | largest D | jaxce | optax |")
  print("|---:|---:|---:|---:|")
  for scale in SCALES:
    worst = {"jaxce": 0.0, "optax": 0.0}
    d_max = 0.0
    for _ in range(args.trials):
      x = (rng.standard_normal((n, c)) * scale).astype(np.float32)
      y = rng.integers(0, c, n).astype(np.int32)
      _, (ref,) = _ref_ce_int((x, y), n)  # float64, every row
      unit = np.abs(ref).max(-1, keepdims=True) * 2.0**-23
      for name, grad in (("jaxce", jaxce_grad), ("optax", optax_grad)):
        g = np.asarray(grad(jnp.asarray(x), jnp.asarray(y)), np.float64)
        worst[name] = max(worst[name], float(np.max(np.abs(g - ref) / unit)))
      d_max = max(d_max, float(np.max(x.max(-1) - x[np.arange(n), y])))
    print(f"| {scale:g} | {d_max:.0f} | {worst['jaxce']:.1f} | {worst['optax']:.1f} |")


if __name__ == "__main__":
  main()
