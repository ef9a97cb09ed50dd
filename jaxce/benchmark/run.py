"""Benchmark jaxce against optax, jax.nn and naive JAX.

    python -m jaxce.benchmark --quick    # smoke run first (see the README for its time)
    python -m jaxce.benchmark            # the default sweep
    python -m jaxce.benchmark --help

(`jaxce-benchmark` and, in the repository, `python benchmarks/run.py` are the
same.) Runs on whatever backend JAX finds (CPU, GPU, TPU) with no code change.
Writes a markdown table to stdout, and results.json, results.md and PNG plots
under --out. Every ratio is jaxce / peer: below 1, jaxce is faster (or uses
less memory). See benchmarks/README.md for what every column means.
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
from jaxce.benchmark.cases import BYTES_MODEL, CASES, IMPL_NOTES, SWEEPS, Case, Shape

REF_ROWS = 64  # rows (and dkernel columns) of the float64 gradient reference

# The largest error that passes, relative to max(1, |reference|) for the
# loss (or log_softmax's output) and to the largest reference entry for the
# gradient; a jaxce row above it makes the run exit with status 1. Over the
# default sweep of 2026-12-06 jaxce's errors were at most 2.2e-6 in float32
# and 3.8e-3 in bfloat16, whose outputs are rounded to 2^-8.
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
# ... and for the matmul cases (linear_ce) off CPU, where float32 matmuls at
# JAX's default precision round their operands (to bfloat16 on TPU, to
# TF32 on recent NVIDIA GPUs) in jaxce's program and the peer's alike. (No
# accelerator has run this check yet: the figure is the rounding's scale,
# 2^-8 of logits of a few units, not a measurement.)
MATMUL_TOLERANCE = 3e-2


def tolerance(case: Case, dtype_name: str, backend: str) -> float:
  tol = TOLERANCE[dtype_name]
  return max(tol, MATMUL_TOLERANCE) if case.flops is not None and backend != "cpu" else tol

# The LM vocabularies users run (Llama 2, GPT-2, Llama 3, Qwen 2, Gemma) and
# the powers of two of the earlier grid.
LM_VOCABS = "32000,50257,128256,151936,256000"
DEFAULTS = {
    "cases": None,  # every case (each in the sweeps it belongs to)
    "dtypes": "float32,bfloat16",
    "classes": "1024,4096,16384,32000,50257,65536,128256,151936,256000,262144",
    "tokens": "64,256,1024,4096,16384",
    "image_shapes": "65536x10,65536x100,16384x1000",
    "fixed_tokens": 64,
    "fixed_classes": 1024,
    "hidden": 128,
    "max_elements": 2**24,
    "ref_max_elements": 2**25,
    "repeats": 5,
    "warmup": 1,
}
QUICK = {
    "classes": "1024,32000",
    "tokens": "64",  # the class sweep's first point: no extra shape (compiles dominate)
    "image_shapes": "4096x10",
    "fixed_classes": 1024,
    "hidden": 64,
    "repeats": 3,
    "warmup": 0,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _default(key: str) -> str:
  """ "(default: x)" or "(default: x; --quick: y)" for a flag's help."""
  d = DEFAULTS[key]
  if key in ("max_elements", "ref_max_elements"):
    d = f"2^{int(d).bit_length() - 1}"
  q = f"; --quick: {QUICK[key]}" if key in QUICK and QUICK[key] != DEFAULTS[key] else ""
  return f"(default: {d}{q})"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m jaxce.benchmark",
      description=(
          "Benchmark jaxce's losses against optax, jax.nn and naive JAX: median forward and"
          " forward+backward (jax.value_and_grad) time over interleaved rounds, the"
          " same-round ratio jaxce/peer (< 1: jaxce is faster) with its spread, compiled"
          " temp memory, achieved bytes/s against a copy measured in the same run, and max"
          " abs error against a float64 NumPy reference. Three sweeps: the class counts of"
          " --classes at --fixed-tokens tokens, the token counts of --tokens at"
          " --fixed-classes classes, and the N x C pairs of --image-shapes (where the"
          " (N, C, H, W) layout with axis=1 is also measured)."
      ),
  )
  p.add_argument("--cases", default=None,
                 help=f"comma list of cases, from: {', '.join(CASES)} (default: all)")
  p.add_argument("--dtypes", default=None,
                 help=f"comma list of logits dtypes, from: {', '.join(DTYPES)}"
                      f" {_default('dtypes')}")
  p.add_argument("--classes", default=None,
                 help="comma list of class counts C (vocabulary V for linear_ce) of the"
                      f" class sweep; LM vocabularies: {LM_VOCABS}; '' for none"
                      f" {_default('classes')}")
  p.add_argument("--tokens", default=None,
                 help="comma list of token counts N of the token sweep; '' for none"
                      f" {_default('tokens')}")
  p.add_argument("--image-shapes", default=None,
                 help="comma list of NxC pairs of the image sweep (N examples, or positions"
                      " of the (N/256, C, 16, 16) layout); '' for none"
                      f" {_default('image_shapes')}")
  p.add_argument("--fixed-tokens", type=int, default=None,
                 help=f"N used by the class sweep {_default('fixed_tokens')}")
  p.add_argument("--fixed-classes", type=int, default=None,
                 help=f"C used by the token sweep {_default('fixed_classes')}")
  p.add_argument("--hidden", type=int, default=None,
                 help="hidden size D of linear_ce's x [N, D] and kernel [D, V]"
                      f" {_default('hidden')}")
  p.add_argument("--max-elements", type=int, default=None,
                 help="cap on N*C (N*V for linear_ce): a point above it runs with N lowered"
                      " to cap // C, but at least one row, or one image of 256 positions"
                      " for ce_nchw, so a C above the cap still runs (noted in the output)"
                      f" {_default('max_elements')}, i.e. 64 MiB of float32 logits")
  p.add_argument("--ref-max-elements", type=int, default=None,
                 help="largest N*C (linear_ce: N*V*D/128) whose errors are checked on the"
                      " full inputs; above it the implementations are run once more on the"
                      f" first {REF_ROWS} rows and checked there, to bound the host float64"
                      f" reference's time {_default('ref_max_elements')}")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed rounds; each round runs every implementation once, in an order"
                      f" shuffled each round (seeded by --seed) {_default('repeats')}")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed rounds before the timed ones, after one untimed checked call"
                      f" of each {_default('warmup')}")
  p.add_argument("--out", default="bench-results",
                 help="output folder for results.json, results.md and the PNG plots"
                      " (default: bench-results)")
  p.add_argument("--quick", action="store_true",
                 help="few small shapes and repeats, a smoke run; flags given explicitly"
                      " still win")
  p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the inputs and of each round's order (default: 0)")
  args = p.parse_args(argv)
  preset = {**DEFAULTS, **(QUICK if args.quick else {})}
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.cases is None:
    args.cases = ",".join(CASES)
  if args.repeats < 1 or args.warmup < 0:
    p.error("--repeats must be >= 1 and --warmup >= 0")
  for flag in ("fixed_tokens", "fixed_classes", "hidden", "max_elements", "ref_max_elements"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag.replace('_', '-')} must be positive")
  if not -2**63 <= args.seed < 2**63:
    p.error(f"--seed must fit in 64 bits. Got {args.seed}")
  return args


def _int_list(text: str, flag: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    sys.exit(f"{flag}: expected a comma list of integers, got {text!r}")
  if values and min(values) < 1:  # ('' for none)
    sys.exit(f"{flag}: expected positive integers, got {text!r}")
  return values


def _pairs(text: str, flag: str) -> list[tuple[int, int]]:
  out = []
  for item in (v.strip() for v in text.split(",")):
    if not item:
      continue
    try:
      n, c = (int(v) for v in item.lower().split("x"))
    except ValueError:
      sys.exit(f"{flag}: expected a comma list of NxC pairs such as 65536x10, got {text!r}")
    if min(n, c) < 1:
      sys.exit(f"{flag}: expected positive N and C, got {item!r}")
    out.append((n, c))
  return out


def plan(args) -> tuple[list[tuple[Case, str, Shape, tuple[str, ...]]], list[str]]:
  """Every (case, dtype, shape, sweeps) to run, and notes on adjusted shapes."""
  # (dict.fromkeys: a repeated name runs once)
  names = list(dict.fromkeys(c.strip() for c in args.cases.split(",") if c.strip()))
  unknown = [c for c in names if c not in CASES]
  if unknown or not names:
    sys.exit(f"--cases: {f'unknown {unknown}' if unknown else 'none given'};"
             f" choose from {list(CASES)}")
  dtypes = list(dict.fromkeys(t.strip() for t in args.dtypes.split(",") if t.strip()))
  bad = [t for t in dtypes if t not in DTYPES]
  if bad or not dtypes:
    sys.exit(f"--dtypes: {f'unknown {bad}' if bad else 'none given'};"
             f" choose from {list(DTYPES)}")
  wanted = {
      "classes": [(args.fixed_tokens, c) for c in _int_list(args.classes, "--classes")],
      "tokens": [(n, args.fixed_classes) for n in _int_list(args.tokens, "--tokens")],
      "image": _pairs(args.image_shapes, "--image-shapes"),
  }
  notes: list[str] = []

  def adjusted(case: Case, n: int, c: int, sweep: str) -> int:
    n2 = n
    if n2 * c > args.max_elements:
      n2 = max(1, args.max_elements // c)
      notes.append(f"{sweep} sweep: N={n} C={c} exceeds --max-elements"
                   f" {args.max_elements}; runs with N={n2}")
    per = case.positions_per_row
    if n2 % per:
      n3 = max(per, n2 // per * per)
      notes.append(f"{case.name}: N={n2} is not a multiple of {per} positions per image;"
                   f" runs with N={n3}")
      n2 = n3
    return n2

  configs = []
  for name in names:
    case = CASES[name]
    points: dict[tuple[int, int], set[str]] = {}
    for sweep in case.sweeps:
      for n, c in wanted[sweep]:
        points.setdefault((adjusted(case, n, c, sweep), c), set()).add(sweep)
    ordered = sorted(points.items(), key=lambda kv: (kv[0][0] * kv[0][1], kv[0]))
    for dt in dtypes:
      for (n, c), sweeps in ordered:
        d = args.hidden if name == "linear_ce" else None
        configs.append((case, dt, Shape(n, c, d), tuple(sorted(sweeps))))
  if not configs:
    sys.exit(f"nothing to run: the sweeps of --cases {','.join(names)}"
             f" ({', '.join(sorted({s for n in names for s in CASES[n].sweeps}))}) have no"
             " shapes; give --classes, --tokens or --image-shapes")
  return configs, sorted(set(notes))


def _tag(case: str, dtype: str, shape: Shape) -> int:
  return zlib.crc32(f"{case}/{dtype}/{shape}".encode())


def _key(seed: int, case: str, dtype: str, shape: Shape) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), _tag(case, dtype, shape))


def _round_seed(seed: int, case: str, dtype: str, shape: Shape) -> int:
  """The seed of a configuration's round orders: its own, so that no
  implementation takes the same place in the rounds of every shape."""
  return seed * 2**32 + _tag(case, dtype, shape)


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
  loss_scale = max(1.0, float(np.max(np.abs(ref_out), initial=0.0)))
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
      on_round=lambda r, total: phase(f"round {r + 1}/{total}"),
      seed=_round_seed(args.seed, case.name, dtype_name, shape))
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
      tol = tolerance(case, dtype_name, jax.default_backend())
      row.update(loss_abs_err=res["loss_abs_err"], grad_abs_err=res["grad_abs_err"],
                 grad_rel_err=res["grad_rel_err"], tolerance=tol,
                 accurate=bool(res["loss_abs_err"] <= tol * loss_scale
                               and res["grad_rel_err"] <= tol))
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
            # jaxce / this implementation, same-round ratios (< 1: jaxce faster);
            # None on jaxce's own row.
            "jaxce_over": None if base_ts is None or impl.name == base
            else measure.ratio_stats(base_ts, ts),
            "jaxce_over_medians": None if base_ts is None or impl.name == base
            else measure.median(base_ts) / med,
            "flops": fl,
            "gflops": None if fl is None else fl / med / 1e9,
        }
        row[mode] = m
    out_rows.append(row)
  jaxce_row = out_rows[0]
  for row in out_rows[1:]:  # compiled temp memory, jaxce / peer
    for mode in ("fwd", "fwd_bwd"):
      if mode in row and mode in jaxce_row:
        mine, theirs = jaxce_row[mode]["temp_bytes"], row[mode]["temp_bytes"]
        row[mode]["temp_jaxce_over"] = (
            None if mine is None or not theirs else mine / theirs)
  return out_rows


def _version(pkg: str) -> str | None:
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git_commit() -> str | None:
  """The commit of the checkout this jaxce comes from; None for an installed
  wheel (its folder is no jaxce checkout, whatever repository holds it)."""
  root = Path(__file__).resolve().parent.parent.parent
  if not (root / "pyproject.toml").is_file() or not (root / "benchmarks").is_dir():
    return None
  try:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "jaxce"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("+dirty(jaxce/)" if dirty else "")
  except Exception:
    return None


def _loadavg() -> list[float] | None:
  """The 1, 5 and 15 minute load averages (None where the OS has none)."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except (AttributeError, OSError):
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
      "loadavg_before": _loadavg(),
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "argv": sys.argv,
      "flags": {k: v for k, v in vars(args).items()},
      "shapes": sorted({(s.n, s.c) for _, _, s, _ in configs}),
      "sweeps": {sweep: sorted({(s.n, s.c) for _, _, s, sw in configs if sweep in sw})
                 for sweep in SWEEPS},
      "shape_notes": notes,
      "bytes_model": BYTES_MODEL,
      "impl_notes": IMPL_NOTES,
      "timing": (
          "jax.jit(f).lower(*args).compile() once per implementation and mode (the same"
          " executable gives memory_analysis()); one untimed call whose output is checked;"
          f" then {args.warmup} untimed and {args.repeats} timed rounds, each running every"
          " implementation (fwd and fwd+bwd) and both copies once, in an order shuffled each"
          " round (seeded by --seed), each"
          " call followed by block_until_ready. median_s: median over the timed rounds;"
          " jaxce_over (on each peer's row): the same-round ratios t_jaxce / t_peer, their"
          " median, min, max and quartiles (< 1: jaxce is faster); temp_jaxce_over: compiled"
          " temp bytes, jaxce / peer."
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
  out = report.output_folder(args.out)  # before the run, not after it
  meta = environment(args, configs, notes)
  for note in notes:
    print(f"note: {note}", file=sys.stderr)
  print(f"jaxce benchmarks on {report.device_label(meta)}: {len(configs)} configurations; load"
        f" average {meta['loadavg_before']} on {meta['cpu_count']} cores", file=sys.stderr)

  from tqdm import tqdm  # the bench extra; imported only when the benchmark runs

  # The folder holds one run: an earlier run's table and plots go now, so
  # that a run stopped early leaves no stale file beside its results.json.
  stale = [p for p in (out / "results.md", *report.plot_files(out)) if p.exists()]
  for path in stale:
    path.unlink()
  if stale:
    print(f"removed {len(stale)} files of an earlier run from {out}: "
          f"{', '.join(p.name for p in sorted(stale))}", file=sys.stderr)

  rows: list[dict] = []
  copies: dict = {}
  with tqdm(total=len(configs), unit="cfg", file=sys.stderr, dynamic_ncols=True) as bar:
    for case, dt, shape, sweeps in configs:
      bar.set_description(f"{case.name} {dt} {shape.label()}")

      def phase(text, bar=bar):
        bar.set_postfix_str(text, refresh=True)

      rows.extend(run_config(case, dt, shape, sweeps, args, copies, phase))
      bar.update(1)
      # The results after every configuration: a run stopped by a time limit
      # or an out-of-memory kill keeps what it measured ("complete": false).
      meta["total_wall_s"] = time.perf_counter() - t_start
      partial = {**meta, "complete": False}
      report.write_json(out / "results.json", partial, rows)
      report.write_text(out / "results.md", report.markdown(rows, partial))
  meta["total_wall_s"] = time.perf_counter() - t_start
  meta["loadavg_after"] = _loadavg()
  meta["complete"] = True

  table = report.markdown(rows, meta)
  written = [report.write_json(out / "results.json", meta, rows),
             report.write_text(out / "results.md", table)]
  if not args.no_plots:
    written += report.plots(rows, meta, out)
  print(table)
  print(f"wrote: {', '.join(str(p) for p in written)}", file=sys.stderr)
  print(f"total {meta['total_wall_s']:.0f} s", file=sys.stderr)
  failed = [r for r in rows if r["impl"] == "jaxce"
            and (r["error"] is not None or r.get("accurate") is False)]
  for r in failed:
    what = r["error"] or (f"loss err {r['loss_abs_err']:.2e}, grad rel {r['grad_rel_err']:.2e}"
                          f" (tolerance {r['tolerance']:g})")
    print(f"FAILED: jaxce {r['case']} {r['dtype']} {report.shape_text(r)}: {what}",
          file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
