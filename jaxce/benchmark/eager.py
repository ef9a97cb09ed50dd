"""Eager (un-jitted) per-call time of every public loss against its peer.

    python -m jaxce.benchmark.eager            # small shapes, value and grad
    python -m jaxce.benchmark.eager --help

Users call losses eagerly in notebooks, evaluation loops and tests. Each case
is called once to warm every cache (jaxce's kernels are cached `jax.jit`s, so
a later call with new arrays of the same shape compiles nothing), then the
jaxce call and its peer's (optax / jax.nn / materialized logits / PyTorch's
formula; for `jaxce.checked`, the peer after an eager check of the labels,
as a user would write it) alternate
for `--rounds` rounds. The table gives median per-call times and the median
of same-round ratios jaxce/peer (< 1: jaxce is faster), and the number of
compilations seen after the warm-up (0 for every case).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce.benchmark import measure, report

Case = tuple[str, Callable[..., Any], Callable[..., Any], Callable[[np.random.Generator], tuple]]


def _cases(n: int, c: int, d: int) -> list[Case]:
  import optax

  def logits(rng: np.random.Generator) -> tuple:
    return (jnp.asarray(rng.normal(size=(n, c)), jnp.float32),
            jnp.asarray(rng.integers(0, c, size=n), jnp.int32))

  def dense(rng: np.random.Generator) -> tuple:
    x, _ = logits(rng)
    return x, jax.nn.softmax(jnp.asarray(rng.normal(size=(n, c)), jnp.float32))

  def binary(rng: np.random.Generator) -> tuple:
    x, _ = logits(rng)
    return x, jnp.asarray(rng.random(size=(n, c)) > 0.5, jnp.float32)

  def probabilities(rng: np.random.Generator) -> tuple:
    x, t = binary(rng)
    return jax.nn.sigmoid(x), t

  def torch_bce(p: jax.Array, t: jax.Array) -> jax.Array:
    # PyTorch's formula: each log clamped at -100
    return -jnp.mean(t * jnp.maximum(jnp.log(p), -100.0)
                     + (1 - t) * jnp.maximum(jnp.log1p(-p), -100.0))

  def fused(rng: np.random.Generator) -> tuple:
    return (jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(d, c)) * 0.1, jnp.float32),
            jnp.asarray(rng.integers(0, c, size=n), jnp.int32))

  def mean(f: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *a: jnp.mean(f(*a))

  def label_checked(f: Callable[..., Any]) -> Callable[..., Any]:
    # The checked losses' peer checks the labels as a user would, eagerly
    # (a read of the result back to the host, as the checked call's check).
    def call(x: Any, y: Any) -> Any:
      if not bool(jnp.all((y >= 0) & (y < x.shape[-1]))):
        raise ValueError("a label is outside [0, C)")
      return f(x, y)
    return call

  def naive_nll(x: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x), y[:, None], 1))

  return [
      ("cross_entropy (labels)", jaxce.cross_entropy,
       mean(optax.softmax_cross_entropy_with_integer_labels), logits),
      ("cross_entropy (probs)", jaxce.cross_entropy, mean(optax.softmax_cross_entropy), dense),
      ("nll_loss", lambda x, y: jaxce.nll_loss(jax.nn.log_softmax(x), y), naive_nll, logits),
      ("log_softmax", lambda x, y: jnp.sum(jaxce.log_softmax(x)),
       lambda x, y: jnp.sum(jax.nn.log_softmax(x)), logits),
      ("logsumexp", lambda x, y: jnp.sum(jaxce.logsumexp(x)),
       lambda x, y: jnp.sum(jax.nn.logsumexp(x, axis=-1)), logits),
      ("binary_cross_entropy_with_logits", jaxce.binary_cross_entropy_with_logits,
       mean(optax.sigmoid_binary_cross_entropy), binary),
      ("binary_cross_entropy", jaxce.binary_cross_entropy, torch_bce, probabilities),
      ("softmax_cross_entropy_with_integer_labels (optax drop-in)",
       mean(jaxce.softmax_cross_entropy_with_integer_labels),
       mean(optax.softmax_cross_entropy_with_integer_labels), logits),
      ("softmax_cross_entropy (optax drop-in)", mean(jaxce.softmax_cross_entropy),
       mean(optax.softmax_cross_entropy), dense),
      ("sigmoid_binary_cross_entropy (optax drop-in)", mean(jaxce.sigmoid_binary_cross_entropy),
       mean(optax.sigmoid_binary_cross_entropy), binary),
      ("checked.cross_entropy", jaxce.checked.cross_entropy,
       label_checked(mean(optax.softmax_cross_entropy_with_integer_labels)), logits),
      ("checked.nll_loss", lambda x, y: jaxce.checked.nll_loss(jax.nn.log_softmax(x), y),
       label_checked(naive_nll), logits),
      ("linear_cross_entropy", jaxce.linear_cross_entropy,
       lambda x, w, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, y)),
       fused),
  ]


def _grad(f: Callable[..., Any], nargs: int) -> Callable[..., Any]:
  # Gradients with respect to every floating-point argument but the last.
  return jax.grad(f, argnums=tuple(range(nargs - 1)))


class _Compiles:
  def __init__(self) -> None:
    self.count = 0

  def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


def run(n: int, c: int, d: int, rounds: int, seed: int = 0) -> list[dict[str, Any]]:
  rng = np.random.default_rng(seed)
  rows = []
  compiles = _Compiles()
  jax.monitoring.register_event_duration_secs_listener(compiles)
  try:
    for name, ours, theirs, make in _cases(n, c, d):
      for mode in ("value", "grad"):
        args = make(rng)
        fs = {"jaxce": ours, "peer": theirs}
        if mode == "grad":
          fs = {k: _grad(f, len(args)) for k, f in fs.items()}
        for f in fs.values():  # warm-up: compile whatever each needs
          jax.block_until_ready(f(*make(rng)))
        before = compiles.count
        times: dict[str, list[float]] = {k: [] for k in fs}
        for r in range(rounds):
          # new arrays, same shape, computed before any call's clock starts
          fresh = jax.block_until_ready(make(rng))
          for k in measure.round_order(list(fs), r):
            dt = measure.run_once(fs[k], fresh)[1]
            times[k].append(dt)
        rows.append({
            "loss": name, "mode": mode,
            "shape": [n, d, c] if name == "linear_cross_entropy" else [n, c],
            "jaxce_s": measure.median(times["jaxce"]), "peer_s": measure.median(times["peer"]),
            "ratio": measure.ratio_stats(times["jaxce"], times["peer"]),
            "compiles_after_warmup": compiles.count - before,
        })
  finally:
    jax.monitoring.unregister_event_duration_listener(compiles)
  return rows


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
  out = [f"Eager per-call time (no jax.jit), {meta['rounds']} interleaved rounds, {meta['device']};"
         f" load average {meta['load_before']} before, {meta['load_after']} after."
         " Ratio: median of same-round jaxce/peer (< 1: jaxce is faster), [min, max].", "",
         "| loss | mode | shape | jaxce | peer | jaxce/peer | compiles after warm-up |",
         "|---|---|---|---|---|---|---|"]
  for r in rows:
    st = r["ratio"] or {}
    shape = "x".join(map(str, r["shape"]))
    out.append(f"| {r['loss']} | {r['mode']} | {shape} | {r['jaxce_s'] * 1e3:.2f} ms |"
               f" {r['peer_s'] * 1e3:.2f} ms | {st.get('median', float('nan')):.2f}"
               f" [{st.get('min', float('nan')):.2f}, {st.get('max', float('nan')):.2f}] |"
               f" {r['compiles_after_warmup']} |")
  return "\n".join(out)


def _load() -> str:
  try:
    return f"{os.getloadavg()[0]:.2f}"
  except OSError:
    return "n/a"


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m jaxce.benchmark.eager", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="8,100", help="N,C of the logits (default: 8,100)")
  p.add_argument("--hidden", type=int, default=16, help="D of linear_cross_entropy (default: 16)")
  p.add_argument("--rounds", type=int, default=51, help="interleaved rounds (default: 51)")
  p.add_argument("--out", default="eager-results", help="output folder (default: eager-results)")
  args = p.parse_args(argv)
  try:
    n, c = (int(v) for v in args.shape.split(","))
  except ValueError:
    p.error(f"--shape must be N,C (two integers). Got {args.shape!r}")
  if min(n, c, args.hidden, args.rounds) < 1:
    p.error("--shape's N and C, --hidden and --rounds must be positive."
            f" Got --shape {args.shape} --hidden {args.hidden} --rounds {args.rounds}")
  out = report.output_folder(args.out)
  load_before = _load()
  t0 = time.perf_counter()
  rows = run(n, c, args.hidden, args.rounds)
  meta = {"rounds": args.rounds, "device": jax.devices()[0].device_kind,
          "load_before": load_before, "load_after": _load(),
          "seconds": round(time.perf_counter() - t0, 1),
          "jax": jax.__version__, "jaxce": jaxce.__version__}
  text = markdown(rows, meta)
  print(text)
  (out / "results.md").write_text(text + "\n")
  (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
  main()
