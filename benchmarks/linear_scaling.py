"""linear_cross_entropy's default path against explicit chunk sizes and materialized logits.

value_and_grad with respect to x and kernel (mean reduction), interleaved in
one process (every variant once per round, the order shuffled), for
vocabularies up to 2**20 and token counts up to 32768. The table gives, per
shape and dtype, the median per-call time of the default (`chunk_size=None`,
`backward="auto"`), the same-round ratios default / best explicit chunk size
and default / materialized logits (optax on `x @ kernel`; skipped where the
float32 logits would exceed `--max-logits-gib`), and the compiled temp
memory of each.

  PYTHONPATH=. python benchmarks/linear_scaling.py                   # the default shapes
  PYTHONPATH=. python benchmarks/linear_scaling.py --shapes 512,64,1048576 --dtypes float32
  PYTHONPATH=. python benchmarks/linear_scaling.py --shapes 512,64,1048576 --chunks 1024,8192 \
      --max-logits-gib 0 --rounds 7    # the default against two chunks, no materialized logits
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce._linear_stats import cpu_chunk_size, default_chunk_size
from jaxce.benchmark.measure import paired_ratio, positive_int, round_order

SHAPES = ("512,64,1048576", "2048,256,262144", "8192,512,131072", "32768,256,32768",
          "4096,512,50257")
CHUNKS = (256, 512, 1024, 2048, 4096, 8192)


def _variants(n: int, v: int, max_logits: float, chunks: tuple[int, ...]) -> dict[str, object]:
  out: dict[str, object] = {"default": {}}
  for c in chunks:
    if c < v:
      out[f"chunk={c}"] = {"chunk_size": c}
  if n * v * 4 <= max_logits:
    out["materialized"] = None
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="N,D,V triples")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--rounds", type=positive_int, default=3)
  p.add_argument("--max-logits-gib", type=float, default=2.0,
                 help="time the materialized logits up to this size (0: never)")
  p.add_argument("--chunks", default=",".join(map(str, CHUNKS)),
                 help="explicit chunk sizes to time beside the default")
  args = p.parse_args()
  chunks = tuple(int(c) for c in args.chunks.split(",") if c)
  import optax

  print("| N | D | V | dtype | default chunk | default | default / best chunk (which) |"
        " default / materialized | temp MiB default / best chunk / materialized |"
        " each chunk / default |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for spec in args.shapes:
    n, d, v = (int(s) for s in spec.split(","))
    for dtype in args.dtypes.split(","):
      dt = jnp.dtype(dtype)
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.normal(size=(n, d)), dt)
      kernel = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dt)
      labels = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
      fns, temps = {}, {}
      for name, kw in _variants(n, v, args.max_logits_gib * 2**30, chunks).items():
        if kw is None:
          loss = lambda x, k, y: optax.softmax_cross_entropy_with_integer_labels(
              (x @ k).astype(jnp.float32), y).mean()
        else:
          loss = lambda x, k, y, kw=kw: jaxce.linear_cross_entropy(x, k, y, **kw)
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, kernel, labels).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
        jax.block_until_ready(compiled(x, kernel, labels))  # warm-up
        fns[name] = compiled
      times: dict[str, list[float]] = {k: [] for k in fns}
      names = list(fns)
      for r in range(args.rounds):
        for name in round_order(names, r):
          t0 = time.perf_counter()
          jax.block_until_ready(fns[name](x, kernel, labels))
          times[name].append(time.perf_counter() - t0)

      def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> float | None:
        return paired_ratio(times[a], times[b])

      chunks_run = [c for c in fns if c.startswith("chunk=")]
      best = (min(chunks_run, key=lambda c: statistics.median(times[c])) if chunks_run
              else None)
      best_txt = f"{ratio('default', best):.2f} ({best})" if best else "- (V <= every chunk)"
      mat = f"{ratio('default', 'materialized'):.2f}" if "materialized" in fns else "- (too big)"
      temp_best = f"{temps[best]:.0f}" if best else "-"
      each = ", ".join(f"{c[6:]}: {ratio(c, 'default'):.2f}" for c in chunks_run)
      rule = cpu_chunk_size if jax.default_backend() == "cpu" else default_chunk_size
      default = rule(n, v, column_bytes=d * dt.itemsize)
      print(f"| {n} | {d} | {v} | {dtype} | {default} |"
            f" {statistics.median(times['default']):.3f} s | {best_txt} | {mat} |"
            f" {temps['default']:.0f} / {temp_best} /"
            f" {temps.get('materialized', float('nan')):.0f} |"
            f" {each} |",
            flush=True)

if __name__ == "__main__":
  main()
