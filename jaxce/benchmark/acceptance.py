"""The acceptance figures of the core and fused-linear issues, in one run.

    python -m jaxce.benchmark.acceptance [--repeats 9] [--skip-speed] [--out FILE.json]

(in a clone, `python benchmarks/targets.py` is the same program).

1. `jax.value_and_grad` of the mean integer-target `cross_entropy` on
   [4096, 32000] logits vs `optax.softmax_cross_entropy_with_integer_labels(...)
   .mean()`, float32 and bfloat16: median time of interleaved rounds and the
   median same-round ratio.
2. Compiled temp memory of value_and_grad w.r.t. (h, W) through logits = h @ W,
   N=2048, D=512, V=32768, float32 and bfloat16, as a multiple of the logits'
   bytes, jaxce vs optax.
3. `linear_cross_entropy`: compiled temp memory (compile only) of
   value_and_grad w.r.t. (x, kernel) in bfloat16 at N=8192, D=4096, V=128256,
   and a table over three N and three V; CPU time at N=2048, D=512, V=32768
   float32 vs optax on materialized logits.

Each figure is also checked (`checks` in the output): jaxce at most its
peer in time and memory, the fused loss's memory flat in V (within 5%
from V=32768 to 262144), and jaxce's loss and gradients equal to the
peer's on the timed inputs, within the benchmark's tolerance
(`run.tolerance`: 1e-4 of the loss, relative, and of the largest gradient
entry in float32; 1e-2 in bfloat16, where optax computes in bfloat16; 3e-2
for the fused loss off CPU, whose matmuls round their operands there).
The command exits with status 1 when a check fails; `main` returns the
figures with `checks` and `passed`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce
from jaxce.benchmark import report, run
from jaxce.benchmark.cases import CASES
from jaxce.benchmark.measure import compile_jit, median, paired_ratio, positive_int, round_robin

MiB = 2**20


def _optax_int(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def temp_bytes(f, *args) -> int:
  return compile_jit(f, args).memory["temp_bytes"]


def values_agree(ours, theirs, args, tol: float) -> bool:
  """Whether two value_and_grad programs give the same loss (within `tol`,
  relative) and gradients (within `tol` of the largest entry)."""
  (a, ga), (b, gb) = ours(*args), theirs(*args)
  if not abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b))):
    return False
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not np.max(np.abs(x - y)) <= tol * np.max(np.abs(y)):
      return False
  return True


def _tol(case: str, dt) -> float:
  return run.tolerance(CASES[case], jnp.dtype(dt).name, jax.default_backend())


def core_speed(repeats: int) -> dict:
  out = {}
  n, c = 4096, 32000
  for dt in (jnp.float32, jnp.bfloat16):
    x = (jax.random.normal(jax.random.key(0), (n, c), jnp.float32) * 3).astype(dt)
    y = jax.random.randint(jax.random.key(1), (n,), 0, c)
    units = {
        "jaxce": (compile_jit(jax.value_and_grad(jaxce.cross_entropy), (x, y)).fn, (x, y)),
        "optax": (compile_jit(jax.value_and_grad(_optax_int), (x, y)).fn, (x, y)),
    }
    t = round_robin(units, warmup=2, repeats=repeats)
    out[jnp.dtype(dt).name] = {
        "jaxce_ms": median(t["jaxce"]) * 1e3,
        "optax_ms": median(t["optax"]) * 1e3,
        "jaxce_over_optax": paired_ratio(t["jaxce"], t["optax"]),
        "values_agree": values_agree(units["jaxce"][0], units["optax"][0], (x, y),
                                     _tol("ce_int", dt)),
    }
  return out


def core_memory() -> dict:
  out = {}
  n, d, v = 2048, 512, 32768
  for dt in (jnp.float32, jnp.bfloat16):
    h = jax.ShapeDtypeStruct((n, d), dt)
    w = jax.ShapeDtypeStruct((d, v), dt)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    logits_bytes = n * v * jnp.dtype(dt).itemsize
    ours = temp_bytes(jax.value_and_grad(
        lambda h, w, y: jaxce.cross_entropy(h @ w, y), argnums=(0, 1)), h, w, y)
    theirs = temp_bytes(jax.value_and_grad(
        lambda h, w, y: _optax_int(h @ w, y), argnums=(0, 1)), h, w, y)
    out[jnp.dtype(dt).name] = {
        "jaxce_x_logits": ours / logits_bytes,
        "optax_x_logits": theirs / logits_bytes,
        "jaxce_over_optax": ours / theirs,
    }
  return out


def linear_memory() -> dict:
  def temp(n, d, v, dt=jnp.bfloat16, materialized=False):
    x = jax.ShapeDtypeStruct((n, d), dt)
    k = jax.ShapeDtypeStruct((d, v), dt)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    loss = (lambda x, k, y: _optax_int(x @ k, y)) if materialized else jaxce.linear_cross_entropy
    return temp_bytes(jax.value_and_grad(loss, argnums=(0, 1)), x, k, y) / MiB

  table = {
      "by_tokens (D=4096, V=128256)": {n: temp(n, 4096, 128256) for n in (2048, 8192, 32768)},
      "by_vocab (N=8192, D=4096)": {v: temp(8192, 4096, v) for v in (32768, 128256, 262144)},
  }
  return {
      "target_MiB (N=8192, D=4096, V=128256, bf16)": temp(8192, 4096, 128256),
      "materialized_optax_MiB": temp(8192, 4096, 128256, materialized=True),
      "table_MiB": table,
  }


def linear_speed(repeats: int) -> dict:
  n, d, v = 2048, 512, 32768
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (n, d))
  w = jax.random.normal(k[1], (d, v)) * 0.05
  y = jax.random.randint(k[2], (n,), 0, v)
  args = (x, w, y)
  units = {
      "jaxce": (compile_jit(jax.value_and_grad(jaxce.linear_cross_entropy, (0, 1)), args).fn, args),
      "optax": (compile_jit(jax.value_and_grad(
          lambda x, w, y: _optax_int(x @ w, y), (0, 1)), args).fn, args),
  }
  t = round_robin(units, warmup=1, repeats=repeats)
  return {
      "jaxce_ms": median(t["jaxce"]) * 1e3,
      "optax_ms": median(t["optax"]) * 1e3,
      "jaxce_over_optax": paired_ratio(t["jaxce"], t["optax"]),
      "values_agree": values_agree(units["jaxce"][0], units["optax"][0], args,
                                   _tol("linear_ce", jnp.float32)),
  }


def checks(results: dict) -> list[dict]:
  """Each acceptance check: what, the figure, its limit, and whether it holds."""
  out = []

  def at_most(what: str, value: float, limit: float) -> None:
    out.append({"what": what, "value": value, "limit": limit, "ok": bool(value <= limit)})

  for dt, m in results["core_memory"].items():
    at_most(f"cross_entropy temp memory through h @ W, {dt}, jaxce / optax",
            m["jaxce_over_optax"], 1.0)
  lin = results["linear_memory"]
  at_most("linear_cross_entropy temp memory, jaxce / materialized optax",
          lin["target_MiB (N=8192, D=4096, V=128256, bf16)"] / lin["materialized_optax_MiB"], 1.0)
  by_vocab = list(lin["table_MiB"]["by_vocab (N=8192, D=4096)"].values())
  at_most("linear_cross_entropy temp memory, largest / smallest over V", max(by_vocab)
          / min(by_vocab), 1.05)
  speeds = [(f"cross_entropy value_and_grad, {dt}", s)
            for dt, s in results.get("core_speed", {}).items()]
  if "linear_speed" in results:
    speeds.append(("linear_cross_entropy value_and_grad, float32", results["linear_speed"]))
  for what, s in speeds:
    at_most(f"{what}: time, jaxce / optax", s["jaxce_over_optax"], 1.0)
    out.append({"what": f"{what}: loss and gradients equal optax's", "value": s["values_agree"],
                "limit": True, "ok": bool(s["values_agree"])})
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m jaxce.benchmark.acceptance",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=positive_int, default=9,
                      help="timed interleaved rounds (default: 9)")
  parser.add_argument("--skip-speed", action="store_true", help="compile-only figures")
  parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be positive. Got {args.repeats}")
  if args.out:
    args.out = report.output_file(args.out)  # before the run, not after it
  results = {"backend": jax.default_backend(), "jax": jax.__version__,
             "core_memory": core_memory(), "linear_memory": linear_memory()}
  if not args.skip_speed:
    results["core_speed"] = core_speed(args.repeats)
    results["linear_speed"] = linear_speed(max(3, args.repeats // 2))
  results["checks"] = checks(results)
  results["passed"] = all(c["ok"] for c in results["checks"])
  text = json.dumps(results, indent=2, default=float)
  print(text)
  if args.out:
    args.out.write_text(text + "\n")
  for c in results["checks"]:
    if not c["ok"]:
      print(f"MISSED: {c['what']}: {c['value']} (limit {c['limit']})", file=sys.stderr)
  return results


if __name__ == "__main__":
  sys.exit(0 if main()["passed"] else 1)
