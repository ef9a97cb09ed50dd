"""Markdown table, results.json and PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

IMPL_ORDER = ("jaxce", "optax", "naive", "jax.nn")
COLORS = {"jaxce": "C0", "optax": "C1", "naive": "C2", "jax.nn": "C3"}
MEM_FLOOR = 1024.0  # bytes: temp memory below this is drawn at this value on log axes


# ---------------------------------------------------------------------------
# Formatting.


def _ms(s) -> str:
  if s is None:
    return "-"
  ms = s * 1e3
  return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ratio(r) -> str:
  return "-" if r is None else f"{r:.2f}"


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


# ---------------------------------------------------------------------------
# Markdown.


def _header(meta) -> list[str]:
  f = meta["flags"]
  lines = [
      "# jaxce benchmarks",
      "",
      f"- backend: **{meta['backend']}**, device: {meta['device_kind']} x {meta['device_count']},"
      f" jax {meta['jax_version']}, jaxlib {meta['jaxlib_version']}, optax"
      f" {meta['optax_version']}, python {meta['python_version']}, {meta['date']}",
      f"- flags: cases={f['cases']} dtypes={f['dtypes']} classes={f['classes']}"
      f" (N={f['fixed_tokens']}) tokens={f['tokens']} (C={f['fixed_classes']})"
      f" hidden={f['hidden']} max_elements={f['max_elements']}"
      f" ref_max_elements={f.get('ref_max_elements')} repeats={f['repeats']}"
      f" warmup={f['warmup']} seed={f['seed']}{' quick' if f['quick'] else ''}",
      "- times: median over interleaved rounds (each round runs every implementation"
      " once, rotating order); `x jaxce` = median over rounds of t_impl / t_jaxce in the"
      " same round (> 1: jaxce faster).",
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
      f" {meta.get('ref_rows', 64)} rows only (N*C above --ref-max-elements).",
  ]
  for note in meta.get("shape_notes", []):
    lines.append(f"- note: {note}")
  lines += ["", "Bytes model (S = N*C*itemsize, L = 4N):", ""]
  for case, model in meta["bytes_model"].items():
    lines.append(f"- {case}: fwd {model['fwd']}; fwd+bwd {model['fwd_bwd']}")
  return lines


def markdown(rows, meta) -> str:
  from jaxce.benchmark.cases import CASES

  lines = _header(meta)
  for (case, dtype), group in _grouped(rows).items():
    title = CASES[case].title if case in CASES else case
    linear = group[0]["d"] is not None
    lines += ["", f"## {case}: {title} ({dtype})", ""]
    note = meta["impl_notes"].get(case)
    if note:
      lines += [f"{note}", ""]
    if linear:
      head = ["N", "D", "V", "impl", "fwd ms", "x jaxce", "f+b ms", "x jaxce", "fwd temp",
              "f+b temp", "fwd GFLOP/s", "f+b GFLOP/s", "loss err", "grad err", "grad rel"]
    else:
      head = ["N", "C", "impl", "fwd ms", "x jaxce", "f+b ms", "x jaxce", "fwd temp",
              "f+b temp", "fwd %copy", "f+b %copy", "copy GB/s", "alloc copy GB/s", "loss err",
              "grad err", "grad rel"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---:" if h not in ("impl",) else "---" for h in head) + "|")
    for r in group:
      shape = [str(r["n"]), str(r["d"]), str(r["c"])] if linear else [str(r["n"]), str(r["c"])]
      if r["error"] is not None:
        cells = [*shape, r["impl"], "error: " + r["error"].replace("|", "/")[:120]]
        cells += [""] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
        continue
      common = [
          r["impl"],
          _ms(_get(r, "fwd", "median_s")), _ratio(_get(r, "fwd", "ratio_vs_jaxce")),
          _ms(_get(r, "fwd_bwd", "median_s")), _ratio(_get(r, "fwd_bwd", "ratio_vs_jaxce")),
          _bytes(_get(r, "fwd", "temp_bytes")), _bytes(_get(r, "fwd_bwd", "temp_bytes")),
      ]
      if linear:
        rest = [_num(_get(r, "fwd", "gflops")), _num(_get(r, "fwd_bwd", "gflops"))]
      else:
        copy = r.get("copy")
        rest = [_pct(_get(r, "fwd", "copy_fraction")), _pct(_get(r, "fwd_bwd", "copy_fraction")),
                _num(None if copy is None else copy["gbps"]),
                _num(None if copy is None else copy["fresh"]["gbps"])]
      mark = "" if r.get("checked_on", "all rows") == "all rows" else " *"
      cells = [*shape, *common, *rest, _sci(r.get("loss_abs_err")) + mark,
               _sci(r.get("grad_abs_err")) + mark, _sci(r.get("grad_rel_err")) + mark]
      lines.append("| " + " | ".join(cells) + " |")
  lines += ["", *summary(rows)]
  return "\n".join(lines) + "\n"


def _geomean(xs):
  xs = [x for x in xs if x is not None and x > 0]
  return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary(rows) -> list[str]:
  """Per case, dtype and baseline: geometric means of the same-round time
  ratios over all shapes, and temp memory at the largest shape."""
  lines = [
      "## Summary (baseline / jaxce; > 1 means jaxce is faster or leaner)",
      "",
      "| case | dtype | baseline | shapes | fwd time (geomean) | f+b time (geomean)"
      " | largest shape | f+b temp jaxce | f+b temp baseline |",
      "|---|---|---|---:|---:|---:|---|---:|---:|",
  ]
  for (case, dtype), group in _grouped(rows).items():
    ok = [r for r in group if r["error"] is None]
    jax_rows = {(r["n"], r["c"]): r for r in ok if r["impl"] == "jaxce"}
    for impl in sorted({r["impl"] for r in ok} - {"jaxce"},
                       key=lambda n: IMPL_ORDER.index(n) if n in IMPL_ORDER else 99):
      mine = [r for r in ok if r["impl"] == impl and (r["n"], r["c"]) in jax_rows]
      if not mine:
        continue
      big = max(mine, key=lambda r: (r["n"] * r["c"], r["n"]))
      big_j = jax_rows[(big["n"], big["c"])]
      shape = f"N={big['n']} C={big['c']}" if big["d"] is None else (
          f"N={big['n']} D={big['d']} V={big['c']}")
      lines.append(
          f"| {case} | {dtype} | {impl} | {len(mine)}"
          f" | {_ratio(_geomean([_get(r, 'fwd', 'ratio_vs_jaxce') for r in mine]))}"
          f" | {_ratio(_geomean([_get(r, 'fwd_bwd', 'ratio_vs_jaxce') for r in mine]))}"
          f" | {shape} | {_bytes(_get(big_j, 'fwd_bwd', 'temp_bytes'))}"
          f" | {_bytes(_get(big, 'fwd_bwd', 'temp_bytes'))} |")
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
  path.write_text(json.dumps(_jsonable({"meta": meta, "results": rows}), indent=1) + "\n")
  return path


# ---------------------------------------------------------------------------
# Plots.


def _series(group, sweep, x_field, mode, field):
  """impl -> sorted [(x, y)] of the rows of one sweep."""
  out = defaultdict(list)
  for r in group:
    if r["error"] is None and sweep in r["sweeps"]:
      y = _get(r, mode, field)
      if y is not None:
        out[r["impl"]].append((r[x_field], y))
  return {k: sorted(v) for k, v in out.items()}


def _fixed(group, sweep, field):
  values = sorted({r[field] for r in group if sweep in r["sweeps"]})
  if len(values) == 1:
    return f"{values[0]}"
  return f"{values[0]}..{values[-1]} (capped)" if values else "?"


def _grid(n):
  cols = min(3, n)
  return math.ceil(n / cols), cols


def _short(v) -> str:
  """1024 -> 1k, 262144 -> 256k, 16 -> 16."""
  v = round(v)
  if v >= 1024 and v % 1024 == 0:
    return f"{v // 1024}k"
  return f"{v}"


def _minor_label(v, _pos) -> str:
  """Labels the 2x, 3x and 5x minor ticks of a log axis only."""
  if v <= 0:
    return ""
  mantissa = v / 10 ** math.floor(math.log10(v))
  return f"{v:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 3, 5)) else ""


def _style(impl):
  # jaxce drawn wide and translucent under the others, so that identical
  # curves stay visible as a halo instead of hiding each other.
  if impl == "jaxce":
    return {"color": COLORS["jaxce"], "linewidth": 4.0, "markersize": 9, "alpha": 0.55,
            "zorder": 1}
  return {"color": COLORS.get(impl), "linewidth": 1.5, "markersize": 5, "zorder": 2}


def _order(items):
  return sorted(items, key=lambda kv: (IMPL_ORDER.index(kv[0]) if kv[0] in IMPL_ORDER else 99,
                                       kv[0]))


def _plot_figure(groups, dtype, meta, sweep, kind, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter, NullFormatter

  cases = [case for (case, dt) in groups if dt == dtype]
  if not cases:
    return None
  nrows, ncols = _grid(len(cases))
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
  x_field = "c" if sweep == "classes" else "n"
  drawn = False
  for ax, case in zip(axes.flat, cases, strict=False):
    group = groups[(case, dtype)]
    linear = group[0]["d"] is not None
    xs_all = set()
    if kind == "time":
      for impl, pts in _order(_series(group, sweep, x_field, "fwd_bwd", "median_s").items()):
        xs, ys = zip(*pts, strict=True)
        xs_all.update(xs)
        ax.plot(xs, np.array(ys) * 1e3, "o-", label=impl, **_style(impl))
        drawn = True
      ax.set_ylabel("fwd+bwd median time (ms)")
    else:
      for mode, style in (("fwd_bwd", "o-"), ("fwd", "x--")):
        for impl, pts in _order(_series(group, sweep, x_field, mode, "temp_bytes").items()):
          xs, ys = zip(*pts, strict=True)
          xs_all.update(xs)
          ys = np.maximum(np.array(ys, float), MEM_FLOOR) / 2**20
          label = f"{impl} {'fwd+bwd' if mode == 'fwd_bwd' else 'fwd'}"
          ax.plot(xs, ys, style, label=label, **_style(impl))
          drawn = True
      ax.set_ylabel("compiled temp memory (MiB)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if xs_all:
      ax.set_xticks(sorted(xs_all))
      ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _short(v)))
      ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    if sweep == "classes":
      ax.set_xlabel("classes C (vocabulary V)" if linear else "classes C")
      fixed = f"N={_fixed(group, sweep, 'n')}" + (f", D={group[0]['d']}" if linear else "")
    else:
      ax.set_xlabel("tokens N")
      fixed = f"{'V' if linear else 'C'}={_fixed(group, sweep, 'c')}" + (
          f", D={group[0]['d']}" if linear else "")
    ax.set_title(f"{case} ({fixed})", fontsize=10)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.1)
    failed = defaultdict(int)
    for r in group:
      if sweep in r["sweeps"] and r["error"] is not None:
        failed[r["impl"]] += 1
    if failed:
      points = len({(r["n"], r["c"]) for r in group if sweep in r["sweeps"]})
      text = "; ".join(f"{k} failed at {v}/{points} points (see table)"
                       for k, v in failed.items())
      ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=8, color="red")
    if ax.lines:
      ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(cases):]:
    ax.set_visible(False)
  what = "fwd+bwd time" if kind == "time" else "compiled temp memory"
  extra = (f"\nsolid: value_and_grad, dashed: forward; values < {MEM_FLOOR / 1024:.0f} KiB"
           f" drawn at {MEM_FLOOR / 1024:.0f} KiB" if kind == "memory" else "")
  fig.suptitle(f"{what} vs {'class' if sweep == 'classes' else 'token'} count, {dtype},"
               f" {meta['backend']} ({meta['device_kind']}){extra}", fontsize=11)
  fig.tight_layout()
  if drawn:
    fig.savefig(path, dpi=110)
  plt.close(fig)
  return path if drawn else None


def plots(rows, meta, out: Path) -> list[Path]:
  groups = _grouped(rows)
  written = []
  for dtype in sorted({dt for (_, dt) in groups}):
    for sweep, kind in (("classes", "time"), ("classes", "memory"), ("tokens", "time")):
      name = f"{kind}_vs_{sweep}_{dtype}.png"
      p = _plot_figure(groups, dtype, meta, sweep, kind, out / name)
      if p is not None:
        written.append(p)
  return written
