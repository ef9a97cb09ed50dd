"""Markdown table, results.json and PNG plots.

One ratio convention everywhere: jaxce / peer, from the same timed round;
below 1, jaxce is faster (or, for memory, uses less).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

IMPL_ORDER = ("jaxce", "optax", "naive", "jax.nn")
COLORS = {"jaxce": "C0", "optax": "C1", "naive": "C2", "jax.nn": "C3"}
MEM_FLOOR = 1024.0  # bytes: temp memory below this is drawn at this value on log axes
RATIO_NOTE = "jaxce/peer: < 1 means jaxce is faster (or uses less memory)"
SWEEP_TITLES = {"classes": "class count", "tokens": "token count", "image": "image shapes"}


# ---------------------------------------------------------------------------
# Formatting.


def output_folder(path: str | Path) -> Path:
  """`--out` as a folder, created and checked writable before anything is
  measured: a bad path fails at once, not after the run. An empty one is
  refused (it would write into, and clear old results from, the current
  folder)."""
  if not str(path).strip():
    sys.exit("--out: give a folder name (it was empty); '.' for the current folder")
  out = Path(path)
  try:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out):
      pass
  except OSError as e:
    sys.exit(f"--out {str(path)!r}: cannot write a folder there ({e.strerror or e})")
  return out


def output_file(path: str | Path) -> Path:
  """`--out` as a file: its folder created, the file checked writable first."""
  out = Path(path)
  if out.is_dir():
    sys.exit(f"--out {str(path)!r} is a folder; give a file path such as"
             f" {str(out / 'acceptance.json')!r}")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    existed = out.exists()
    with open(out, "a"):
      pass
    if not existed:
      os.remove(out)
  except OSError as e:
    sys.exit(f"--out {str(path)!r}: cannot write there ({e.strerror or e})")
  return out


def plot_files(out: Path) -> list[Path]:
  """The PNG files `plots` writes into `out`, from this run or an earlier one."""
  names = [p for p in out.glob("ratio_*.png")]
  for kind in ("time", "memory"):
    names += out.glob(f"{kind}_vs_*_*.png")
  return sorted(names)


def _time(s) -> str:
  """Seconds, in the unit that suits the value: 52.6 us, 3.79 ms, 1.2 s."""
  if s is None:
    return "-"
  for unit, scale in (("s", 1.0), ("ms", 1e-3)):
    if s >= scale:
      return f"{s / scale:.3g} {unit}"
  return f"{s / 1e-6:.3g} us"


def _ratio(r) -> str:
  return "-" if r is None else f"{r:.2f}"


def _spread(st) -> str:
  """'0.93 [0.88, 1.02]': the median same-round ratio, and its min and max."""
  if not st:
    return "-"
  return f"{st['median']:.2f} [{st['min']:.2f}, {st['max']:.2f}]"


def _bytes(b) -> str:
  if b is None:
    return "-"
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if b >= scale:
      return f"{b / scale:.3g} {unit}"
  return f"{b} B"


def _pct(f) -> str:
  if f is None:
    return "-"
  return "<1%" if f < 0.01 else f"{100 * f:.0f}%"


def _sci(x) -> str:
  if x is None:
    return "-"
  if isinstance(x, float) and math.isnan(x):
    return "nan"
  return "0" if x == 0 else f"{x:.1e}"


def _num(x, digits=3) -> str:
  return "-" if x is None else f"{x:.{digits}g}"


def _impl_key(row):
  name = row["impl"]
  return IMPL_ORDER.index(name) if name in IMPL_ORDER else len(IMPL_ORDER)


def _grouped(rows):
  groups = defaultdict(list)
  for r in rows:
    groups[(r["case"], r["dtype"])].append(r)
  for key in groups:
    groups[key].sort(key=lambda r: (r["n"] * r["c"], r["n"], _impl_key(r)))
  return groups


def _get(row, mode, field):
  m = row.get(mode)
  return None if m is None else m.get(field)


def _median_ratio(row, mode):
  st = _get(row, mode, "jaxce_over")
  return None if not st else st["median"]


def device_label(meta) -> str:
  """'cpu x 1', or 'gpu (NVIDIA H100) x 8': the device kind only where it says more."""
  kind = str(meta["device_kind"])
  if kind.lower() == str(meta["backend"]).lower():
    return f"{meta['backend']} x {meta['device_count']}"
  return f"{meta['backend']} ({kind}) x {meta['device_count']}"


def shape_text(r) -> str:
  return f"N={r['n']} C={r['c']}" if r["d"] is None else f"N={r['n']} D={r['d']} V={r['c']}"


# ---------------------------------------------------------------------------
# Markdown.


def _header(meta) -> list[str]:
  f = meta["flags"]
  load = meta.get("loadavg_before"), meta.get("loadavg_after")
  wall = meta.get("total_wall_s")
  lines = [
      "# jaxce benchmarks",
      "",
      f"**Ratios are jaxce / peer, from the same timed round: < 1 means jaxce is faster (or"
      f" uses less memory).** Shown as the median [min, max] over the {f['repeats']}"
      f" round{'s' * (f['repeats'] != 1)}.",
      "",
      f"- device: **{device_label(meta)}**, jax {meta['jax_version']}, jaxlib"
      f" {meta['jaxlib_version']}, optax {meta['optax_version']}, python"
      f" {meta['python_version']}, {meta['date']}"
      + (f", {wall / 60:.1f} min" if wall is not None else ""),
      f"- load average (1, 5, 15 min) on {meta.get('cpu_count')} cores: before {load[0]},"
      f" after {load[1]} (a load above the core count means other processes shared them)",
      f"- flags: cases={f['cases']} dtypes={f['dtypes']} classes={f['classes']}"
      f" (N={f['fixed_tokens']}) tokens={f['tokens']} (C={f['fixed_classes']})"
      f" image_shapes={f.get('image_shapes')} hidden={f['hidden']}"
      f" max_elements={f['max_elements']} ref_max_elements={f.get('ref_max_elements')}"
      f" repeats={f['repeats']} warmup={f['warmup']} seed={f['seed']}"
      f"{' quick' if f['quick'] else ''}",
      "- times: median over interleaved rounds (each round runs every implementation"
      " once, in an order shuffled each round), in the unit that suits the value.",
      "- temp: compiled `memory_analysis().temp_size_in_bytes` of the forward / of"
      " `jax.value_and_grad`.",
      "- %copy: achieved bytes/s (bytes model below) / `copy GB/s`, the faster of two copies"
      " of the logits timed in the same rounds: in place (jitted `-x`, argument donated) and"
      " `alloc copy` (jitted `x * 2` into a fresh buffer, as the losses' gradients are).",
      f"- errors: max abs error vs a float64 NumPy reference from the same rounded inputs;"
      f" loss over all rows, gradient on the first {meta.get('ref_rows', 64)} rows"
      " (log_softmax `loss err` is its output's error on those rows; linear_ce's gradient"
      " is dx on those rows and dkernel on as many columns); `grad rel` = grad err / max"
      " |reference gradient|. Errors marked * were checked on a second run over the first"
      f" {meta.get('ref_rows', 64)} rows only (N*C above --ref-max-elements). **Bold**"
      " errors: above the tolerance (loss err / max(1, |reference|), and grad rel: 1e-4 in"
      " float32, 1e-2 in bfloat16 and float16, 3e-2 for linear_ce off CPU, whose matmuls"
      " round their operands there); a jaxce row above it makes the run exit"
      " with status 1.",
      "- precision: jaxce reduces half-precision input in float32 (a float32 loss); optax"
      " and jax.nn compute in the input's dtype (bfloat16 in bfloat16), as their users"
      " get them, hence their larger errors there; naive casts to float32.",
  ]
  for note in meta.get("shape_notes", []):
    lines.append(f"- note: {note}")
  if meta.get("complete") is False:  # results.json of a run that was stopped
    lines.append("- **incomplete**: the run stopped before its last configuration; these"
                 " are the configurations it finished")
  lines += ["", "Bytes model (S = N*C*itemsize, L = 4N):", ""]
  for case, model in meta["bytes_model"].items():
    lines.append(f"- {case}: fwd {model['fwd']}; fwd+bwd {model['fwd_bwd']}")
  return lines


def markdown(rows, meta) -> str:
  from jaxce.benchmark.cases import CASES

  lines = _header(meta)
  lines += ["", *summary(rows)]
  for (case, dtype), group in _grouped(rows).items():
    title = CASES[case].title if case in CASES else case
    linear = group[0]["d"] is not None
    lines += ["", f"## {case}: {title} ({dtype})", ""]
    note = meta["impl_notes"].get(case)
    if note:
      lines += [f"{note}", ""]
    shape_head = ["N", "D", "V"] if linear else ["N", "C"]
    head = [*shape_head, "impl", "fwd time", "f+b time", "fwd jaxce/peer [min, max]",
            "f+b jaxce/peer [min, max]", "fwd temp", "f+b temp", "f+b temp jaxce/peer"]
    if linear:
      head += ["fwd GFLOP/s", "f+b GFLOP/s"]
    else:
      head += ["fwd %copy", "f+b %copy", "copy GB/s", "alloc copy GB/s"]
    head += ["loss err", "grad err", "grad rel"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if h == "impl" else "---:" for h in head) + "|")
    for r in group:
      shape = [str(r["n"]), str(r["d"]), str(r["c"])] if linear else [str(r["n"]), str(r["c"])]
      if r["error"] is not None:
        cells = [*shape, r["impl"], "error: " + r["error"].replace("|", "/")[:120]]
        cells += [""] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
        continue
      cells = [
          *shape, r["impl"],
          _time(_get(r, "fwd", "median_s")), _time(_get(r, "fwd_bwd", "median_s")),
          _spread(_get(r, "fwd", "jaxce_over")), _spread(_get(r, "fwd_bwd", "jaxce_over")),
          _bytes(_get(r, "fwd", "temp_bytes")), _bytes(_get(r, "fwd_bwd", "temp_bytes")),
          _ratio(_get(r, "fwd_bwd", "temp_jaxce_over")),
      ]
      if linear:
        cells += [_num(_get(r, "fwd", "gflops")), _num(_get(r, "fwd_bwd", "gflops"))]
      else:
        copy = r.get("copy")
        cells += [_pct(_get(r, "fwd", "copy_fraction")),
                  _pct(_get(r, "fwd_bwd", "copy_fraction")),
                  _num(None if copy is None else copy["gbps"]),
                  _num(None if copy is None else copy["fresh"]["gbps"])]
      mark = "" if r.get("checked_on", "all rows") == "all rows" else " *"
      errs = [_sci(r.get(k)) + mark for k in ("loss_abs_err", "grad_abs_err", "grad_rel_err")]
      if r.get("accurate") is False:
        errs = [f"**{e}**" for e in errs]
      cells += errs
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _geomean(xs):
  xs = [x for x in xs if x is not None and x > 0]
  return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary_rows(rows) -> list[dict]:
  """Per case, dtype and peer: geometric means over the shapes of the median
  same-round ratios jaxce/peer, their range over the shapes, the shape where
  jaxce does worst (fwd+bwd), and the largest temp memory ratio."""
  out = []
  for (case, dtype), group in _grouped(rows).items():
    ok = [r for r in group if r["error"] is None]
    jaxce_shapes = {(r["n"], r["c"]) for r in ok if r["impl"] == "jaxce"}
    peers = sorted({r["impl"] for r in ok} - {"jaxce"},
                   key=lambda n: IMPL_ORDER.index(n) if n in IMPL_ORDER else 99)
    for impl in peers:
      mine = [r for r in ok if r["impl"] == impl and (r["n"], r["c"]) in jaxce_shapes]
      fb = [(_median_ratio(r, "fwd_bwd"), r) for r in mine if _median_ratio(r, "fwd_bwd")]
      if not fb:
        continue
      worst_ratio, worst = max(fb, key=lambda t: t[0])
      temps = [t for t in (_get(r, "fwd_bwd", "temp_jaxce_over") for r in mine)
               if t is not None]
      out.append({
          "case": case, "dtype": dtype, "peer": impl, "shapes": len(mine),
          "fwd_geomean": _geomean([_median_ratio(r, "fwd") for r in mine]),
          "fwd_bwd_geomean": _geomean([t for t, _ in fb]),
          "fwd_bwd_min": min(t for t, _ in fb),
          "fwd_bwd_max": worst_ratio,
          "worst_shape": shape_text(worst),
          "temp_max": max(temps) if temps else None,
      })
  return out


def summary(rows) -> list[str]:
  lines = [
      "## Summary: jaxce / peer (< 1 means jaxce is faster or uses less memory)",
      "",
      "Geometric mean over the shapes of each shape's median same-round ratio; the"
      " per-shape ratios are in the tables below.",
      "",
      "| case | dtype | peer | shapes | fwd time, geomean | f+b time, geomean"
      " | f+b time, range over shapes | f+b worst shape | f+b temp, max over shapes |",
      "|---|---|---|---:|---:|---:|---:|---|---:|",
  ]
  for s in summary_rows(rows):
    lines.append(
        f"| {s['case']} | {s['dtype']} | {s['peer']} | {s['shapes']}"
        f" | {_ratio(s['fwd_geomean'])} | **{_ratio(s['fwd_bwd_geomean'])}**"
        f" | {_ratio(s['fwd_bwd_min'])} to {_ratio(s['fwd_bwd_max'])} | {s['worst_shape']}"
        f" | {_ratio(s['temp_max'])} |")
  return lines


# ---------------------------------------------------------------------------
# JSON.


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else str(x)
  if x is None or isinstance(x, (str, int, bool)):
    return x
  return str(x)


def write_json(path: Path, meta, rows) -> Path:
  return write_text(path, json.dumps(_jsonable({"meta": meta, "results": rows}), indent=1) + "\n")


def write_text(path: Path, text: str) -> Path:
  """Written beside `path` and renamed over it: a run killed while writing
  (the benchmark rewrites its results after every configuration) leaves the
  previous complete file, never a truncated one."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
  return path


# ---------------------------------------------------------------------------
# Plots.

TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6))
BYTE_UNITS = (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0))


def _unit(values, units):
  """The largest unit in which the largest value is at least 1."""
  top = max(values, default=0.0)
  for name, scale in units:
    if top >= scale:
      return name, scale
  return units[-1]


def _short(v) -> str:
  """1024 -> 1k, 262144 -> 256k (powers of two only), 50257 -> 50257, 256000 -> 256000."""
  v = round(v)
  if v >= 1024 and v & (v - 1) == 0:
    return f"{v // 1024}k"
  return f"{v}"


def _order(names):
  return sorted(names, key=lambda n: (IMPL_ORDER.index(n) if n in IMPL_ORDER else 99, n))


def _style(impl):
  # jaxce drawn wide and translucent under the others, so that identical
  # curves stay visible as a halo instead of hiding each other.
  if impl == "jaxce":
    return {"color": COLORS["jaxce"], "linewidth": 4.0, "markersize": 9, "alpha": 0.55,
            "zorder": 1}
  return {"color": COLORS.get(impl), "linewidth": 1.5, "markersize": 5, "zorder": 2}


def _points(group, sweep):
  """The (N, C) points of one sweep, in order: by C for the class sweep, by N
  for the token sweep, by N*C for the image sweep."""
  pts = {(r["n"], r["c"]) for r in group if sweep in r["sweeps"]}
  key = {"classes": lambda p: (p[1], p[0]), "tokens": lambda p: p}.get(
      sweep, lambda p: (p[0] * p[1], p))
  return sorted(pts, key=key)


def _values(group, sweep, mode, field):
  """impl -> {(N, C): value} over the rows of one sweep."""
  out = defaultdict(dict)
  for r in group:
    if r["error"] is None and sweep in r["sweeps"]:
      y = _get(r, mode, field)
      if y is not None:
        out[r["impl"]][(r["n"], r["c"])] = y
  return out


def _peer_label(group, sweep, impl):
  """'optax (jaxce/optax f+b 0.93)': the geomean ratio over this sweep's points."""
  if impl == "jaxce":
    return impl
  ratios = [_median_ratio(r, "fwd_bwd") for r in group
            if r["impl"] == impl and r["error"] is None and sweep in r["sweeps"]]
  g = _geomean(ratios)
  return impl if g is None else f"{impl} (jaxce/{impl} {g:.2f})"


def _draw_bars(ax, points, series, labels, scale):
  """Grouped bars: one group per shape, one bar per implementation."""
  impls = _order(series)
  width = 0.8 / max(1, len(impls))
  x = np.arange(len(points))
  values = [v / scale for impl in impls for v in series[impl].values()]
  for i, impl in enumerate(impls):
    ys = [series[impl].get(p, np.nan) / scale for p in points]
    ax.bar(x + (i - (len(impls) - 1) / 2) * width, ys, width, label=labels[impl],
           color=COLORS.get(impl))
  # Bars start at 0 on a linear axis; values that span decades need a log one.
  _log_y(ax)
  if values and ax.get_yscale() == "log":
    ax.set_ylim(bottom=min(values) / 2)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{_short(n)}x{_short(c)}" for n, c in points], fontsize=8)


def _draw_lines(ax, points, x_of, series, labels, scale, style="o-", suffix=""):
  from matplotlib.ticker import FuncFormatter, NullFormatter

  for impl in _order(series):
    pts = [(x_of(p), series[impl][p] / scale) for p in points if p in series[impl]]
    if pts:
      xs, ys = zip(*pts, strict=True)
      ax.plot(xs, ys, style, label=labels[impl] + suffix, **_style(impl))
  ax.set_xscale("log", base=2)
  xs = sorted({x_of(p) for p in points})
  # A tick label per point, except where two points nearly coincide on the log
  # axis (256000 and 262144): the later one keeps a tick without a label.
  labelled, last = set(), None
  for x in xs:
    if last is None or np.log2(x / last) > 0.2:
      labelled.add(x)
      last = x
  ax.set_xticks(xs)
  ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _short(v) if v in labelled else ""))
  ax.xaxis.set_minor_formatter(NullFormatter())
  if len(xs) > 6:
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)


def _log_y(ax):
  """A log y axis with labelled ticks; a linear one from 0 where the data span
  less than a decade (a log axis would show one tick label or none)."""
  from matplotlib.ticker import FuncFormatter, LogLocator

  values = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), float)
            if np.isfinite(y) and y > 0]
  values += [patch.get_height() for patch in ax.patches if patch.get_height() > 0]
  if values and max(values) / min(values) < 10:
    ax.set_ylim(bottom=0, top=max(values) * 1.1)
    return
  ax.set_yscale("log")
  ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _panel(ax, case, group, sweep, kind):
  """One case's panel; False if it has nothing to draw."""
  points = _points(group, sweep)
  if not points:
    return False
  linear = group[0]["d"] is not None
  bars = sweep == "image" or len(points) == 1
  if sweep == "classes":
    x_of, xlabel = (lambda p: p[1]), "vocabulary V" if linear else "classes C"
    fixed = f"N={'/'.join(sorted({str(n) for n, _ in points}, key=int))}"
  elif sweep == "tokens":
    x_of, xlabel = (lambda p: p[0]), "tokens N"
    fixed = f"{'V' if linear else 'C'}={'/'.join(sorted({str(c) for _, c in points}, key=int))}"
  else:
    x_of, xlabel, fixed = None, "N x V" if linear else "N x C", ""
  if linear:
    fixed += f", D={group[0]['d']}"
  if kind == "time":
    series = _values(group, sweep, "fwd_bwd", "median_s")
    unit, scale = _unit([v for s in series.values() for v in s.values()], TIME_UNITS)
    labels = {impl: _peer_label(group, sweep, impl) for impl in series}
    if bars:
      _draw_bars(ax, points, series, labels, scale)
    else:
      _draw_lines(ax, points, x_of, series, labels, scale)
      _log_y(ax)
    ax.set_ylabel(f"value_and_grad median time ({unit})")
    drawn = bool(series)
  else:
    fb = _values(group, sweep, "fwd_bwd", "temp_bytes")
    fw = _values(group, sweep, "fwd", "temp_bytes")
    for s in (fb, fw):
      for impl in s:
        s[impl] = {p: max(v, MEM_FLOOR) for p, v in s[impl].items()}
    unit, scale = _unit([v for s in (fb, fw) for d in s.values() for v in d.values()],
                        BYTE_UNITS)
    labels = {impl: impl for impl in {*fb, *fw}}
    if bars:
      _draw_bars(ax, points, fb, labels, scale)
    else:
      _draw_lines(ax, points, x_of, fb, labels, scale, "o-", " value_and_grad")
      _draw_lines(ax, points, x_of, fw, labels, scale, "x--", " forward")
      _log_y(ax)
    ax.set_ylabel(f"compiled temp memory ({unit})")
    drawn = bool(fb or fw)
  ax.set_xlabel(xlabel)
  ax.set_title(f"{case} ({fixed})" if fixed else case, fontsize=10)
  ax.grid(True, which="major", alpha=0.4)
  failed = defaultdict(int)
  for r in group:
    if sweep in r["sweeps"] and r["error"] is not None:
      failed[r["impl"]] += 1
  if failed:
    text = "; ".join(f"{k} failed at {v}/{len(points)} points (see table)"
                     for k, v in failed.items())
    ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=8, color="red")
  if drawn:
    ax.legend(fontsize=7)
  return drawn


def _ratio_panel(ax, case, group):
  """jaxce/peer value_and_grad time at every shape of the case, median and
  min-max whiskers of the same-round ratios, one marker per peer."""
  shapes = sorted({(r["n"], r["c"]) for r in group}, key=lambda p: (p[0] * p[1], p))
  peers = _order({r["impl"] for r in group if r["impl"] != "jaxce" and r["error"] is None})
  x = np.arange(len(shapes))
  drawn = False
  for i, impl in enumerate(peers):
    rows = {(r["n"], r["c"]): r for r in group if r["impl"] == impl and r["error"] is None}
    xs, med, lo, hi = [], [], [], []
    for j, p in enumerate(shapes):
      st = _get(rows[p], "fwd_bwd", "jaxce_over") if p in rows else None
      if st:
        xs.append(x[j] + (i - (len(peers) - 1) / 2) * 0.2)
        med.append(st["median"])
        lo.append(st["median"] - st["min"])
        hi.append(st["max"] - st["median"])
    if xs:
      g = _geomean(med)
      ax.errorbar(xs, med, yerr=[lo, hi], fmt="o", capsize=3, color=COLORS.get(impl),
                  label=f"jaxce/{impl} (geomean {g:.2f})")
      drawn = True
  ax.set_xlim(-0.5, len(shapes) - 0.5)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{_short(n)}x{_short(c)}" for n, c in shapes], fontsize=7,
                     rotation=45 if len(shapes) > 4 else 0, ha="right" if len(shapes) > 4
                     else "center")
  _log_y(ax)
  if ax.get_yscale() == "linear":
    ax.set_ylim(bottom=0, top=max(1.1, ax.get_ylim()[1]))
  ax.axhline(1.0, color="black", linewidth=0.8)
  ax.set_xlabel("N x C" if group[0]["d"] is None else f"N x V (D={group[0]['d']})")
  ax.set_ylabel("jaxce / peer, value_and_grad time")
  ax.set_title(f"{case}: < 1 means jaxce is faster", fontsize=10)
  ax.grid(True, which="major", alpha=0.4)
  if drawn:
    ax.legend(fontsize=7)
  return drawn


def _figure(groups, dtype, meta, title, draw, path, applies=lambda group: True, note=""):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cases = [case for (case, dt) in groups if dt == dtype and applies(groups[(case, dt)])]
  if not cases:
    return None
  cols = min(3, len(cases))
  nrows = math.ceil(len(cases) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(5.4 * cols, 4.2 * nrows), squeeze=False)
  used = 0
  for case in cases:
    ax = axes.flat[used]
    if draw(ax, case, groups[(case, dtype)]):
      used += 1
    else:
      ax.clear()
  for ax in list(axes.flat)[used:]:
    ax.set_visible(False)
  if used:
    fig.suptitle(f"{title}, {dtype}, {device_label(meta)}\n{RATIO_NOTE}{note}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
  plt.close(fig)
  return path if used else None


def plots(rows, meta, out: Path) -> list[Path]:
  groups = _grouped(rows)
  written = []
  for dtype in sorted({dt for (_, dt) in groups}):
    p = _figure(groups, dtype, meta, "jaxce / peer value_and_grad time at every shape",
                _ratio_panel, out / f"ratio_{dtype}.png")
    if p is not None:
      written.append(p)
    for sweep in ("classes", "tokens", "image"):
      for kind in ("time", "memory"):
        if kind == "memory" and sweep == "tokens":
          continue
        what = "value_and_grad time" if kind == "time" else "compiled temp memory"
        note = (f"; values under {MEM_FLOOR / 1024:.0f} KiB drawn at {MEM_FLOOR / 1024:.0f}"
                " KiB" if kind == "memory" else "")
        p = _figure(groups, dtype, meta, f"{what} vs {SWEEP_TITLES[sweep]}",
                    lambda ax, case, group, sweep=sweep, kind=kind:
                    _panel(ax, case, group, sweep, kind),
                    out / f"{kind}_vs_{sweep}_{dtype}.png",
                    applies=lambda group, sweep=sweep: bool(_points(group, sweep)), note=note)
        if p is not None:
          written.append(p)
  return written
