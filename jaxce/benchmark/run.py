"""Benchmark jaxce against optax and naive JAX baselines.

    python benchmarks/run.py             # default sweep (4-8 min on 2 shared CPU cores)
    python benchmarks/run.py --quick     # smoke run (under 2 min on 2 CPU cores)
    python benchmarks/run.py --help

Runs on whatever backend JAX finds (CPU, GPU, TPU) with no code change.
Writes a markdown table to stdout, and results.json, results.md and PNG plots
under --out. See benchmarks/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxce.benchmark import measure, report
from jaxce.benchmark.cases import BYTES_MODEL, CASES, IMPL_NOTES, Case, Shape

REF_ROWS = 64  # rows (and dkernel columns) of the float64 gradient reference

DEFAULTS = {
    "cases": ",".join(CASES),
    "dtypes": "float32,bfloat16",
    "classes": "1024,4096,16384,65536,262144",
    "tokens": "64,256,1024",
    "fixed_tokens": 64,
    "fixed_classes": 16384,
    "hidden": 128,
    "max_elements": 2**24,
    "ref_max_elements": 2**25,
    "repeats": 5,
    "warmup": 1,
}
QUICK = {
    "classes": "1024,8192",
    "tokens": "64",  # the class sweep's N: no extra shape (compiles dominate --quick)
    "fixed_tokens": 64,
    "fixed_classes": 8192,
    "hidden": 64,
    "repeats": 3,
    "warmup": 0,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=(
          "Benchmark jaxce's losses against optax and naive JAX: median forward and"
          " forward+backward (jax.value_and_grad) time over interleaved repeats,"
          " compiled temp memory, achieved bytes/s against a copy measured in the same"
          " run, and max abs error against a float64 NumPy reference. Two sweeps: the"
          " class counts of --classes at --fixed-tokens tokens, and the token counts of"
          " --tokens at --fixed-classes classes."
      ),
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  d = DEFAULTS
  p.add_argument("--cases", default=None,
                 help=f"comma list of cases, from: {', '.join(CASES)} (default: all)")
  p.add_argument("--dtypes", default=None,
                 help=f"comma list of logits dtypes, from: {', '.join(DTYPES)}"
                      f" (default: {d['dtypes']})")
  p.add_argument("--classes", default=None,
                 help=f"comma list of class counts C (vocabulary V for linear_ce) of the"
                      f" class sweep (default: {d['classes']}; --quick: {QUICK['classes']})")
  p.add_argument("--tokens", default=None,
                 help=f"comma list of token counts N of the token sweep (default:"
                      f" {d['tokens']}; --quick: {QUICK['tokens']})")
  p.add_argument("--fixed-tokens", type=int, default=None,
                 help=f"N used by the class sweep (default: {d['fixed_tokens']})")
  p.add_argument("--fixed-classes", type=int, default=None,
                 help=f"C used by the token sweep (default: {d['fixed_classes']};"
                      f" --quick: {QUICK['fixed_classes']})")
  p.add_argument("--hidden", type=int, default=None,
                 help=f"hidden size D of linear_ce's x [N, D] and kernel [D, V] (default:"
                      f" {d['hidden']}; --quick: {QUICK['hidden']})")
  p.add_argument("--max-elements", type=int, default=None,
                 help=f"cap on N*C (N*V for linear_ce): a point above it runs with N"
                      f" lowered to cap // C (default: {d['max_elements']}, i.e. 64 MiB of"
                      f" float32 logits)")
  p.add_argument("--ref-max-elements", type=int, default=None,
                 help=f"largest N*C (linear_ce: N*V*D/128) whose errors are checked on the"
                      f" full inputs; above it the implementations are run once more on the"
                      f" first {REF_ROWS} rows and checked there, to bound the host float64"
                      f" reference's time (default: {d['ref_max_elements']})")
  p.add_argument("--repeats", type=int, default=None,
                 help=f"timed rounds; each round runs every implementation once, in"
                      f" rotating order (default: {d['repeats']}; --quick: {QUICK['repeats']})")
  p.add_argument("--warmup", type=int, default=None,
                 help=f"untimed rounds before the timed ones, after one untimed checked call"
                      f" of each (default: {d['warmup']}; --quick: {QUICK['warmup']})")
  p.add_argument("--out", default="bench-results",
                 help="output folder for results.json, results.md and the PNG plots")
  p.add_argument("--quick", action="store_true",
                 help="small sizes and few repeats (under 2 minutes on 2 CPU cores); flags"
                      " given explicitly still win")
  p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--seed", type=int, default=0, help="PRNG seed of the inputs")
  args = p.parse_args(argv)
  preset = {**DEFAULTS, **(QUICK if args.quick else {})}
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.repeats < 1 or args.warmup < 0:
    p.error("--repeats must be >= 1 and --warmup >= 0")
  for flag in ("fixed_tokens", "fixed_classes", "hidden", "max_elements", "ref_max_elements"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag.replace('_', '-')} must be positive")
  return args


def _int_list(text: str, flag: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    sys.exit(f"{flag}: expected a comma list of integers, got {text!r}")
  if not values or min(values) < 1:
    sys.exit(f"{flag}: expected positive integers, got {text!r}")
  return values


def plan(args) -> tuple[list[tuple[Case, str, Shape, tuple[str, ...]]], list[str]]:
  """Every (case, dtype, shape, sweeps) to run, and notes on capped shapes."""
  names = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = [c for c in names if c not in CASES]
  if unknown:
    sys.exit(f"--cases: unknown {unknown}; choose from {list(CASES)}")
  dtypes = [t.strip() for t in args.dtypes.split(",") if t.strip()]
  bad = [t for t in dtypes if t not in DTYPES]
  if bad:
    sys.exit(f"--dtypes: unknown {bad}; choose from {list(DTYPES)}")
  classes = _int_list(args.classes, "--classes")
  tokens = _int_list(args.tokens, "--tokens")
  notes: list[str] = []

  def capped(n, c, sweep):
    if n * c > args.max_elements:
      n2 = max(1, args.max_elements // c)
      notes.append(f"{sweep} sweep: N={n} C={c} exceeds --max-elements"
                   f" {args.max_elements}; runs with N={n2}")
      return n2
    return n

  points: dict[tuple[int, int], set[str]] = {}
  for c in classes:
    points.setdefault((capped(args.fixed_tokens, c, "class"), c), set()).add("classes")
  for n in tokens:
    c = args.fixed_classes
    points.setdefault((capped(n, c, "token"), c), set()).add("tokens")
  ordered = sorted(points.items(), key=lambda kv: (kv[0][0] * kv[0][1], kv[0]))
  configs = []
  for name in names:
    case = CASES[name]
    for dt in dtypes:
      for (n, c), sweeps in ordered:
        d = args.hidden if name == "linear_ce" else None
        configs.append((case, dt, Shape(n, c, d), tuple(sorted(sweeps))))
  return configs, sorted(set(notes))


def _key(seed: int, case: str, dtype: str, shape: Shape) -> jax.Array:
  tag = zlib.crc32(f"{case}/{dtype}/{shape}".encode())
  return jax.random.fold_in(jax.random.key(seed), tag)


def run_config(case: Case, dtype_name: str, shape: Shape, sweeps, args, copies, phase):
  """Measures every implementation of one case at one shape and dtype."""
  dtype = DTYPES[dtype_name]
  itemsize = jnp.dtype(dtype).itemsize
  phase("inputs")
  inputs = jax.block_until_ready(case.make_inputs(shape, dtype, _key(args.seed, case.name,
                                                                      dtype_name, shape)))
  rows = min(REF_ROWS, shape.n)
  full_ref = case.ref_work(shape) <= args.ref_max_elements
  checked = inputs if full_ref else case.head(inputs, rows)
  phase("float64 reference")
  t0 = time.perf_counter()
  host = tuple(np.asarray(a) for a in checked)
  ref_out, ref_grads = case.reference(host, rows)
  ref_s = time.perf_counter() - t0
  del host

  units: dict[str, tuple] = {}
  results: dict[str, dict] = {}
  for impl in case.impls:
    res = results[impl.name] = {"error": None}
    try:
      phase(f"compile {impl.name}")
      loss_vg = measure.value_and_grad(impl.loss, case.argnums)
      fwd = measure.compile_jit(impl.fwd, inputs)
      vg = measure.compile_jit(loss_vg, inputs)
      phase(f"check {impl.name}")
      out, first_fwd = measure.run_once(fwd.fn, inputs)
      if not full_ref:  # the timed call is only a warm-up; check on the first rows
        out = jax.jit(impl.fwd)(*checked)
      res["loss_abs_err"] = measure.max_abs_err(case.out_view(out, rows), ref_out)
      del out
      (_, grads), first_vg = measure.run_once(vg.fn, inputs)
      if not full_ref:
        _, grads = jax.jit(loss_vg)(*checked)
      res["grad_abs_err"], res["grad_rel_err"] = measure.grad_errors(
          case.grad_view(grads, rows), ref_grads)
      del grads
    except Exception as e:  # report it, keep benchmarking the others
      res["error"] = f"{type(e).__name__}: {e}"[:500]
      continue
    res["compiled"] = {"fwd": fwd, "fwd_bwd": vg}
    res["first_call_s"] = {"fwd": first_fwd, "fwd_bwd": first_vg}
    units[f"{impl.name}/fwd"] = (fwd.fn, inputs)
    units[f"{impl.name}/fwd_bwd"] = (vg.fn, inputs)
  del checked

  copy_bytes = None
  if case.copy_arg is not None:
    arg = inputs[case.copy_arg]
    ck = (arg.shape, str(arg.dtype))
    if ck not in copies:
      phase("compile copy")
      copies[ck] = (measure.compile_jit(measure.copy_fn, (arg,)),
                    measure.compile_donated(measure.copy_inplace_fn, arg))
    fresh, inplace = copies[ck]
    measure.run_once(fresh.fn, (arg,))
    units["copy"] = (fresh.fn, (arg,))
    units["copy_inplace"] = (measure.InPlaceCopy(inplace, arg), ())
    units["copy_inplace"][0]()
    copy_bytes = 2 * arg.size * arg.dtype.itemsize

  times = measure.round_robin(
      units, args.warmup, args.repeats,
      on_round=lambda r, total: phase(f"round {r + 1}/{total}"))
  del units, inputs

  copy = None
  if copy_bytes is not None:
    copy = {"bytes": copy_bytes}
    for unit, label in (("copy", "fresh"), ("copy_inplace", "inplace")):
      med = measure.median(times[unit])
      copy[label] = {"median_s": med, "times_s": times[unit], "gbps": copy_bytes / med / 1e9}
    # The roofline: the faster of the two copies (in place, unless the backend
    # cannot donate).
    copy["gbps"] = max(copy["fresh"]["gbps"], copy["inplace"]["gbps"])
  flops = case.flops(shape) if case.flops else (None, None)
  model = {"fwd": case.fwd_bytes(shape, itemsize),
           "fwd_bwd": case.fwd_bwd_bytes(shape, itemsize)}
  base = case.impls[0].name
  out_rows = []
  for impl in case.impls:
    res = results[impl.name]
    row = {
        "case": case.name, "dtype": dtype_name, "n": shape.n, "c": shape.c, "d": shape.d,
        "sweeps": list(sweeps), "impl": impl.name, "error": res["error"],
        "reference_s": ref_s, "ref_rows": rows,
        "checked_on": "all rows" if full_ref else f"first {rows} rows", "copy": copy,
    }
    if res["error"] is None:
      row.update(loss_abs_err=res["loss_abs_err"], grad_abs_err=res["grad_abs_err"],
                 grad_rel_err=res["grad_rel_err"])
      for mode, fl in zip(("fwd", "fwd_bwd"), flops, strict=True):
        comp: measure.Compiled = res["compiled"][mode]
        ts = times[f"{impl.name}/{mode}"]
        med = measure.median(ts)
        base_ts = times.get(f"{base}/{mode}")
        m = {
            "median_s": med,
            "times_s": ts,
            "first_call_s": res["first_call_s"][mode],
            "compile_s": comp.compile_s,
            "memory": comp.memory,
            "temp_bytes": None if comp.memory is None else comp.memory.get("temp_bytes"),
            "bytes_model": model[mode],
            "gbps": model[mode] / med / 1e9,
            "copy_fraction": None if copy is None else (model[mode] / med / 1e9) / copy["gbps"],
            "ratio_vs_jaxce": None if base_ts is None else measure.paired_ratio(ts, base_ts),
            "ratio_of_medians_vs_jaxce":
                None if base_ts is None else med / measure.median(base_ts),
            "flops": fl,
            "gflops": None if fl is None else fl / med / 1e9,
        }
        row[mode] = m
    out_rows.append(row)
  return out_rows


def _version(pkg: str) -> str | None:
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git_commit() -> str | None:
  try:
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "jaxce"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("+dirty(jaxce/)" if dirty else "")
  except Exception:
    return None


def environment(args, configs, notes) -> dict:
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "devices": [str(d) for d in jax.devices()],
      "jax_version": jax.__version__,
      "jaxlib_version": _version("jaxlib"),
      "optax_version": _version("optax"),
      "jaxce_version": _version("jaxce"),
      "jaxce_git": _git_commit(),
      "numpy_version": np.__version__,
      "python_version": platform.python_version(),
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "argv": sys.argv,
      "flags": {k: v for k, v in vars(args).items()},
      "shapes": sorted({(s.n, s.c) for _, _, s, _ in configs}),
      "shape_notes": notes,
      "bytes_model": BYTES_MODEL,
      "impl_notes": IMPL_NOTES,
      "timing": (
          "jax.jit(f).lower(*args).compile() once per implementation and mode (the same"
          " executable gives memory_analysis()); one untimed call whose output is checked;"
          f" then {args.warmup} untimed and {args.repeats} timed rounds, each running every"
          " implementation (fwd and fwd+bwd) and both copies once, in rotating order, each"
          " call followed by block_until_ready. median_s: median over the timed rounds;"
          " ratio_vs_jaxce: median over rounds of t_impl / t_jaxce (same round)."
      ),
      "reference": (
          "float64 NumPy from the same rounded inputs. loss_abs_err: |loss - ref| with the"
          " reference over all rows (log_softmax: max abs error of the output on the first"
          f" {REF_ROWS} rows). grad_abs_err: max abs error of the gradient on the first"
          f" {REF_ROWS} rows (linear_ce: dx on the first {REF_ROWS} rows and dkernel on the"
          f" first {REF_ROWS} columns); grad_rel_err divides it by the max |reference|."
          " Rows with checked_on = 'first 64 rows' (N*C above --ref-max-elements) ran the"
          " implementations once more on inputs cut to their first 64 rows and compared"
          " those (loss over those rows, 1/64 in the gradient)."
      ),
      "ref_rows": REF_ROWS,
      "copy": (
          "two copies of the first argument (the logits), timed in the same rounds, bytes ="
          " 2 * size * itemsize: 'fresh' = jitted x * 2 into a new output buffer, 'inplace' ="
          " jitted -x with the argument donated (output reuses the input buffer, no"
          " allocation); copy.gbps, the roofline of copy_fraction, is the faster of the two"
      ),
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  t_start = time.perf_counter()
  configs, notes = plan(args)
  meta = environment(args, configs, notes)
  for note in notes:
    print(f"note: {note}", file=sys.stderr)
  print(f"jaxce benchmarks on {meta['backend']} ({meta['device_kind']} x"
        f" {meta['device_count']}): {len(configs)} configurations", file=sys.stderr)

  from tqdm import tqdm  # the bench extra; imported only when the benchmark runs

  rows: list[dict] = []
  copies: dict = {}
  with tqdm(total=len(configs), unit="cfg", file=sys.stderr, dynamic_ncols=True) as bar:
    for case, dt, shape, sweeps in configs:
      bar.set_description(f"{case.name} {dt} {shape.label()}")

      def phase(text, bar=bar):
        bar.set_postfix_str(text, refresh=True)

      rows.extend(run_config(case, dt, shape, sweeps, args, copies, phase))
      bar.update(1)
  meta["total_wall_s"] = time.perf_counter() - t_start

  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  table = report.markdown(rows, meta)
  print(table)
  written = [report.write_json(out / "results.json", meta, rows)]
  (out / "results.md").write_text(table)
  written.append(out / "results.md")
  if not args.no_plots:
    written += report.plots(rows, meta, out)
  print(f"wrote: {', '.join(str(p) for p in written)}", file=sys.stderr)
  print(f"total {meta['total_wall_s']:.0f} s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
