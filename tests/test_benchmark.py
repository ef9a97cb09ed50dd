"""The installed benchmark (`python -m jaxce.benchmark`) end to end at tiny
shapes, and its output conventions: ratios are jaxce / peer from the same
round, units follow the value, each default is printed once in --help."""

from __future__ import annotations

import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("optax")
pytest.importorskip("tqdm")

from jaxce.benchmark import measure, report, run

TINY = ["--dtypes", "float32", "--classes", "16", "--fixed-tokens", "8", "--tokens", "8",
        "--fixed-classes", "16", "--image-shapes", "256x3", "--repeats", "3", "--warmup", "0",
        "--hidden", "8"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """One run of one case (3 implementations) at one shape: the compiles
  dominate, so the sweep logic is tested through `plan` alone."""
  out = tmp_path_factory.mktemp("bench")
  argv = ["--cases", "ce_nchw", *TINY, "--out", str(out)]
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    argv.append("--no-plots")
  # The benchmark runs as a user's program: default promotion rules.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    assert run.main(argv) == 0
  return out, json.loads((out / "results.json").read_text())


def test_plan_puts_each_case_in_its_sweeps():
  configs, notes = run.plan(run.parse_args(
      ["--cases", "ce_int,ce_nchw,linear_ce", *TINY, "--image-shapes", "256x3,100x7"]))
  shapes = {(case.name, s.n, s.c, sweeps) for case, _, s, sweeps in configs}
  # ce_int: the shared class/token point and the image points; the (N, C, H, W)
  # layout only at image points, with N rounded to whole 16 x 16 images;
  # linear_ce never at image shapes.
  assert shapes == {("ce_int", 8, 16, ("classes", "tokens")), ("ce_int", 256, 3, ("image",)),
                    ("ce_int", 100, 7, ("image",)), ("ce_nchw", 256, 3, ("image",)),
                    ("ce_nchw", 256, 7, ("image",)), ("linear_ce", 8, 16, ("classes", "tokens"))}
  assert notes == ["ce_nchw: N=100 is not a multiple of 256 positions per image; runs with N=256"]
  configs, notes = run.plan(run.parse_args(["--cases", "ce_int", *TINY, "--classes", "4096",
                                            "--max-elements", "8192"]))
  assert {(s.n, s.c) for _, _, s, _ in configs} == {(2, 4096), (8, 16), (256, 3)}
  assert notes == ["classes sweep: N=8 C=4096 exceeds --max-elements 8192; runs with N=2"]
  # '' turns a sweep off: one case at one shape.
  configs, _ = run.plan(run.parse_args(["--cases", "linear_ce", *TINY, "--classes", "4096",
                                        "--tokens", ""]))
  assert [(s.n, s.c) for _, _, s, _ in configs] == [(8, 4096)]


def test_bad_selections_and_outputs_fail_before_the_run(tmp_path, monkeypatch):
  """Empty selections, and an --out that cannot be written, are refused
  before anything is measured (a bad --out failed after the whole run, and
  an empty selection wrote empty results and exited 0); a repeated case or
  dtype runs once."""
  def no_run(*args, **kwargs):
    raise AssertionError("the benchmark ran")

  monkeypatch.setattr(run, "run_config", no_run)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  for argv in (["--cases", ","], ["--dtypes", ""],
               ["--cases", "ce_nchw", "--image-shapes", ""],
               ["--cases", "ce_int", "--classes", "", "--tokens", "", "--image-shapes", ""],
               ["--cases", "ce_int", "--tokens", "0"],
               ["--cases", "bce", "--out", str(blocker / "sub")],
               ["--cases", "bce", "--out", " "]):
    with pytest.raises(SystemExit) as info:
      run.main([*TINY, *argv])
    assert info.value.code not in (0, None), argv
  configs, _ = run.plan(run.parse_args(
      [*TINY, "--cases", "bce,bce", "--dtypes", "float32,float32,bfloat16"]))
  assert len(configs) == len({(c.name, dt, s) for c, dt, s, _ in configs}) == 4
  assert report.output_folder(tmp_path / "new" / "dir").is_dir()
  with pytest.raises(SystemExit):
    report.output_file(tmp_path)  # a folder where a file goes
  # The eager and acceptance benchmarks' flags too (tracebacks, or empty
  # timings, after the run).
  from jaxce.benchmark import acceptance, eager

  for argv in (["--shape", "a"], ["--shape", "0,5"], ["--rounds", "0"], ["--hidden", "0"],
               ["--out", str(blocker / "sub")]):
    with pytest.raises(SystemExit) as info:
      eager.main(argv)
    assert info.value.code not in (0, None), argv
  for argv in (["--repeats", "0"], ["--out", str(tmp_path)]):
    with pytest.raises(SystemExit) as info:
      acceptance.main(argv)
    assert info.value.code not in (0, None), argv


@pytest.mark.slow  # each script in a subprocess: `pytest -m slow` (.ci/run) runs it
def test_standalone_scripts_refuse_bad_counts_and_specs():
  """benchmarks/*.py: --rounds 0, an empty --shapes and a bad spec or commit
  are argparse errors (exit 2), not tracebacks after the compiles."""
  import argparse
  import pathlib
  import subprocess
  import sys

  assert measure.positive_int("3") == 3
  for bad in ("0", "-2", "x"):
    with pytest.raises(argparse.ArgumentTypeError):
      measure.positive_int(bad)
  script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "against_commit.py"
  for args in (["HEAD", "--specs", "foo:1:2:f32"], ["nosuchcommit", "--rounds", "1"],
               ["HEAD", "--rounds", "0"]):
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 2, (args, done.stderr[-500:])
    assert "Traceback" not in done.stderr, args
  script = script.with_name("profile_kernels.py")
  for args in (["--calls", "0"], ["--shape", "8x16x4"], ["--case", "linear_ce", "--shape", "8x16"],
               ["--case", "foo"]):
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 2, (args, done.stderr[-500:])
    assert "Traceback" not in done.stderr, args
  script = script.with_name("outside_sweep.py")
  for args in (["--cases", "foo"], ["--rounds", "0"]):
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 2, (args, done.stderr[-500:])
    assert "Traceback" not in done.stderr, args


@pytest.mark.parametrize("forward", [False, True])
def test_profile_kernels_lists_each_implementations_kernels(monkeypatch, capsys, forward):
  """benchmarks/profile_kernels.py: one table per implementation, jaxce's
  and its peers', of the traced program's events, the kernels among them;
  of value_and_grad, or with --forward of the forward alone."""
  import importlib.util
  import pathlib
  import sys

  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "profile_kernels.py"
  spec = importlib.util.spec_from_file_location("profile_kernels", path)
  assert spec is not None
  assert spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  argv = [str(path), "--case", "nll", "--shape", "8x16", "--calls", "2"]
  monkeypatch.setattr(sys, "argv", argv + ["--forward"] * forward)
  module.main()
  out = capsys.readouterr().out
  header = out.split("\n")[0]
  assert header.startswith("#"), out
  assert (", forward," if forward else ", value_and_grad,") in header, out
  tables = out.split("\n## ")[1:]
  assert [t.split("\n")[0] for t in tables] == ["jaxce", "naive"], out
  for table in tables:
    rows = [line for line in table.split("\n") if line.startswith("| ") and "event" not in line]
    assert rows, table
    assert not any("`$" in row for row in rows), table
    assert any("fusion" in row or "scatter" in row for row in rows), table


def _script(name):
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  assert spec is not None
  assert spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return path, module


def _fresh_pages_rows(monkeypatch, capsys, *argv):
  import sys

  path, module = _script("fresh_pages")
  monkeypatch.setattr(sys, "argv", [str(path), "--shapes", "8x16", "--rounds", "2", *argv])
  module.main()
  out = capsys.readouterr().out
  return [line.split(" | ") for line in out.split("\n")
          if line.startswith("| ") and "wall ms" not in line]


def test_fresh_pages_times_each_pass(monkeypatch, capsys):
  """benchmarks/fresh_pages.py: one row per pass, the exp pass's ratio to
  itself 1, and the passes compute what they are named for."""
  import jax.numpy as jnp

  rows = _fresh_pages_rows(monkeypatch, capsys)
  assert [r[0] for r in rows] == ["| exp", "| exp * g", "| exp * g + 0 * x",
                                  "| label select * g", "| label select (int32) * g",
                                  "| label select (iota) * g"], rows
  assert rows[0][2] == "1.00"
  _, module = _script("fresh_pages")
  x, lse, y, q, g = module.inputs(8, 16)
  outs = {name: f(x, lse, y, q, g) for name, f in module.passes(16).items()}
  expected = jnp.where(jnp.arange(16)[None] == y[:, None], q[:, None],
                       jnp.exp(x - lse[:, None])) * g[:, None]
  np.testing.assert_allclose(outs["label select * g"], expected, rtol=1e-6)
  np.testing.assert_allclose(outs["label select (int32) * g"], expected, rtol=1e-6)
  np.testing.assert_allclose(outs["label select (iota) * g"], expected, rtol=1e-6)
  np.testing.assert_allclose(outs["exp * g + 0 * x"], outs["exp * g"], rtol=1e-6)


@pytest.mark.slow  # a subprocess compiles with XLA's dump on
def test_fresh_pages_reads_the_loop_step_from_the_ir(monkeypatch, capsys):
  rows = _fresh_pages_rows(monkeypatch, capsys, "--ir", "--shapes", "64x1024")  # (8x16: no loop)
  steps = [r[-1].rstrip(" |") for r in rows]
  assert all(s != "-" and all(int(v) > 0 for v in s.split(", ")) for s in steps), rows


def test_zero_reference_gradient_has_zero_relative_error():
  """One class: the gradient and its reference are 0; `grad rel` was 0/0 = nan."""
  zero = [jax.numpy.zeros((2, 1))]
  assert measure.grad_errors(zero, zero) == (0.0, 0.0)
  assert measure.grad_errors([zero[0] + 1e-3], zero)[1] == float("inf")
  # float64 rounding in the reference (label smoothing at one class): still 0
  rounded = [np.full((2, 1), 3.5e-18)]
  assert measure.grad_errors(zero, rounded) == (3.5e-18, 0.0)
  assert measure.grad_errors([zero[0] + 1e-3], rounded)[1] == float("inf")


def test_run_records_rows_and_load(results):
  _, data = results
  rows = data["results"]
  assert {(r["case"], r["impl"], r["n"], r["c"]) for r in rows} == {
      ("ce_nchw", impl, 256, 3) for impl in ("jaxce", "optax", "naive")}
  assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
  assert max(r["grad_rel_err"] for r in rows) < 1e-5
  meta = data["meta"]
  assert len(meta["loadavg_before"]) == 3
  assert len(meta["loadavg_after"]) == 3
  assert meta["sweeps"]["image"] == [[256, 3]]
  assert meta["complete"] is True


def test_a_stopped_run_keeps_what_it_measured(tmp_path, monkeypatch):
  """results.json and results.md are written after every configuration: a
  run cut off by a time limit (the GPU run of benchmarks/gpu.sh) keeps the
  configurations it finished, marked incomplete in both, and no table or
  plot of an earlier run into the folder stays beside them."""
  done = []
  measured = run.run_config

  def stopped_after_one(case, dt, shape, *args):
    if done:
      raise KeyboardInterrupt  # as a time limit's signal would stop it
    done.append(shape)
    return measured(case, dt, shape, *args)

  earlier = [tmp_path / "results.md", tmp_path / "ratio_float32.png",
             tmp_path / "time_vs_classes_float32.png"]
  for path in earlier:
    path.write_text("an earlier run")
  monkeypatch.setattr(run, "run_config", stopped_after_one)
  with pytest.raises(KeyboardInterrupt):
    run.main(["--cases", "bce", *TINY, "--classes", "16,32", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "results.json").read_text())
  assert data["meta"]["complete"] is False
  assert {(r["n"], r["c"]) for r in data["results"]} == {(8, 16)}
  table = (tmp_path / "results.md").read_text()
  assert "**incomplete**" in table
  assert "an earlier run" not in table
  assert not any(p.exists() for p in earlier[1:])


def test_ratios_are_jaxce_over_peer_from_the_same_round(results):
  _, data = results
  for r in data["results"]:
    for mode in ("fwd", "fwd_bwd"):
      if r["impl"] == "jaxce":
        assert r[mode]["jaxce_over"] is None
        continue
      mine = next(j for j in data["results"] if j["impl"] == "jaxce" and j["case"] == r["case"]
                  and (j["n"], j["c"]) == (r["n"], r["c"]))
      per_round = [a / b for a, b in zip(mine[mode]["times_s"], r[mode]["times_s"], strict=True)]
      st = r[mode]["jaxce_over"]
      assert st["median"] == pytest.approx(statistics.median(per_round))
      assert (st["min"], st["max"]) == pytest.approx((min(per_round), max(per_round)))
      assert st["min"] <= st["q1"] <= st["median"] <= st["q3"] <= st["max"]
      assert r[mode]["temp_jaxce_over"] == pytest.approx(
          mine[mode]["temp_bytes"] / r[mode]["temp_bytes"])


def test_markdown_and_plots(results):
  out, data = results
  text = (out / "results.md").read_text()
  assert "< 1 means jaxce is faster" in text
  assert "x jaxce" not in text
  assert "load average" in text
  assert str(data["meta"]["loadavg_after"]) in text
  assert "cpu (cpu)" not in text
  assert "| ce_nchw | float32 | optax | 1 |" in text
  pngs = sorted(p.name for p in out.glob("*.png"))
  if pngs:  # matplotlib installed
    assert "ratio_float32.png" in pngs
    assert "time_vs_image_float32.png" in pngs


def test_units_follow_the_value():
  assert report._time(52.6e-6) == "52.6 us"
  assert report._time(3.79e-3) == "3.79 ms"
  assert report._time(12.5) == "12.5 s"
  assert report._bytes(264) == "264 B"
  assert report._bytes(1536) == "1.5 KiB"
  assert report._bytes(3 * 2**30) == "3 GiB"
  assert report._unit([2e-4, 5e-4], report.TIME_UNITS) == ("us", 1e-6)
  assert report._unit([3.0 * 2**20], report.BYTE_UNITS) == ("MiB", 2.0**20)
  st = measure.ratio_stats([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
  assert report._spread(st) == "1.00 [0.50, 1.50]"


def test_help_prints_each_default_once(capsys):
  with pytest.raises(SystemExit):
    run.parse_args(["--help"])
  text = capsys.readouterr().out
  assert "(default: None)" not in text
  assert text.count("(default:") == len({"dtypes", "classes", "tokens", "image_shapes",
                                         "fixed_tokens", "fixed_classes", "hidden",
                                         "max_elements", "ref_max_elements", "repeats",
                                         "warmup", "cases", "out", "seed"})


@pytest.mark.slow
def test_quick_run_as_a_user_runs_it(tmp_path):
  """`python -m jaxce.benchmark --quick` in a fresh process: every case, both
  dtypes, the plots; the table states the ratio convention."""
  import os
  import pathlib
  import subprocess
  import sys

  pytest.importorskip("matplotlib")
  root = pathlib.Path(__file__).resolve().parent.parent
  env = {**os.environ, "PYTHONPATH": str(root), "XLA_FLAGS": ""}
  proc = subprocess.run([sys.executable, "-m", "jaxce.benchmark", "--quick", "--out",
                         str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "jaxce / peer" in proc.stdout
  data = json.loads((tmp_path / "results.json").read_text())
  assert not [r["error"] for r in data["results"] if r["error"]]
  assert {r["case"] for r in data["results"]} == set(run.CASES)
  assert (tmp_path / "ratio_bfloat16.png").stat().st_size > 0


@pytest.mark.slow  # 6 s: `pytest -m slow` (.ci/run) runs it
def test_eager_benchmark_compiles_nothing_after_warmup(tmp_path):
  from jaxce.benchmark import eager

  eager.main(["--shape", "4,7", "--hidden", "3", "--rounds", "2", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "results.json").read_text())
  assert {r["loss"] for r in data["rows"]} >= {"cross_entropy (labels)", "linear_cross_entropy"}
  for row in data["rows"]:
    assert row["compiles_after_warmup"] == 0, row
    assert row["ratio"]["rounds"] == 2
  assert "| jaxce/peer |" in (tmp_path / "results.md").read_text()


def test_aot_report_merges_merged_reports(tmp_path):
  """`aot.py --from-json` takes a merged results.json (the published
  docs/aot-results.json) as well as a single run's: its runs are kept, a
  later file's rows replace the earlier ones, nothing is compiled."""
  import pathlib

  from jaxce.benchmark import aot

  published = pathlib.Path(__file__).parent.parent / "docs" / "aot-results.json"
  doc = json.loads(published.read_text())
  later = {**doc["runs"][0], "command": "a later run", "rows": [
      {**doc["rows"][0], "jaxce": {**doc["rows"][0]["jaxce"], "temp_bytes": 12345}}]}
  (tmp_path / "later.json").write_text(json.dumps(later))
  aot.main(["--from-json", str(published), str(tmp_path / "later.json"), "--no-plots",
            "--out", str(tmp_path / "merged")])
  merged = json.loads((tmp_path / "merged" / "results.json").read_text())
  assert [r["command"] for r in merged["runs"]] == [
      *(r["command"] for r in doc["runs"]), "a later run"]
  assert len(merged["rows"]) == len(doc["rows"])
  first = doc["rows"][0]
  same = [r for r in merged["rows"] if all(r[k] == first[k] for k in ("target", "loss", "dtype",
                                                                       "shape"))]
  assert [r["jaxce"]["temp_bytes"] for r in same] == [12345]
  assert "a later run" in (tmp_path / "merged" / "results.md").read_text()


def test_rounds_run_in_a_seeded_shuffled_order():
  """Each round's order is a permutation, the same for the same seed, and
  no implementation keeps one neighbour (a rotation would keep them all)."""
  names = ["jaxce", "optax", "naive", "copy", "copy_inplace"]
  orders = [measure.round_order(names, r, seed=3) for r in range(20)]
  assert all(sorted(o) == sorted(names) for o in orders)
  assert orders == [measure.round_order(names, r, seed=3) for r in range(20)]
  assert orders != [measure.round_order(names, r, seed=4) for r in range(20)]
  before = {n: {o[o.index(n) - 1] for o in orders if o.index(n) > 0} for n in names}
  assert all(len(b) > 1 for b in before.values()), before


def test_aot_flags_are_checked_before_compiling(capsys, tmp_path):
  """Bad flags of the accelerator-compiler benchmark end in one line naming
  the flag, before anything compiles (they raised tracebacks, some only
  after compiling: a 0 in --shape divided by zero in the report)."""
  from jaxce.benchmark import aot
  assert aot.parse_args(["--workers", "2"]).workers == 2
  assert aot.parse_args(["--shape", "8,4,16"]).shape == [8, 4, 16]
  refused = {("--workers", "0"): "must be at least 1. Got 0.",
             ("--workers", "-1"): "must be at least 1. Got -1.",
             ("--shape", "0,8,16"): "positive integers",
             ("--shape=-8,8,16",): "positive integers",
             ("--shape", "8,16"): "must be N,D,C",
             ("--linear-vocab", "0"): "positive integers",
             ("--linear-vocab", "1,x"): "positive integers"}
  for argv, message in refused.items():
    with pytest.raises(SystemExit):
      aot.parse_args(list(argv))
    assert message in capsys.readouterr().err, argv
  a_file = tmp_path / "results.json"
  a_file.write_text(json.dumps({"meta": {}, "results": []}))  # the other benchmark's
  for argv, message in (
      (["--from-json", str(tmp_path / "missing.json")], "cannot read it"),
      (["--from-json", str(a_file)], "not a results.json of this benchmark"),
      (["--targets", "h100", "--out", str(a_file)], "cannot write a folder there"),
      (["--targets", "h100", "--out", ""], "it was empty")):
    with pytest.raises(SystemExit, match=message):
      aot.main([*argv, "--no-plots"])
  # Selections: a repeated name compiles once (as in jaxce.benchmark); an
  # empty one says so.
  args = aot.parse_args(["--targets", "h100,h100,v5e", "--losses", "ce_int,ce_int",
                         "--dtypes", "float32,float32"])
  jobs = aot.plan(args)
  assert len(jobs) == len(set(jobs)) == 2
  with pytest.raises(SystemExit, match="--targets: none given"):
    aot.plan(aot.parse_args(["--targets", ""]))




def test_a_wrong_jaxce_result_fails_the_run(tmp_path, monkeypatch, capsys):
  """A jaxce loss 1% off (or a gradient half its size) is bold in the table,
  named on stderr, and the run exits with status 1; the right one passes."""
  import dataclasses

  from jaxce.benchmark import cases

  case = cases.CASES["bce"]
  right = case.impls[0]
  argv = ["--cases", "bce", *TINY, "--image-shapes", "", "--no-plots", "--repeats", "1"]
  half = lambda x, t: right.loss(x, t) * 0.5
  for wrong in (lambda x, t: right.loss(x, t) * 1.01,  # the loss 1% off
                lambda x, t: half(x, t) + jax.lax.stop_gradient(half(x, t))):  # half the grad
    impl = dataclasses.replace(right, fwd=wrong, loss=wrong)
    monkeypatch.setitem(run.CASES, "bce", dataclasses.replace(case, impls=(impl, *case.impls[1:])))
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
      assert run.main([*argv, "--out", str(tmp_path / "wrong")]) == 1
    rows = json.loads((tmp_path / "wrong" / "results.json").read_text())["results"]
    assert [r["accurate"] for r in rows] == [False, True], rows
    assert "FAILED: jaxce bce float32" in capsys.readouterr().err
    assert "| **" in (tmp_path / "wrong" / "results.md").read_text()
  monkeypatch.setitem(run.CASES, "bce", case)
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    assert run.main([*argv, "--out", str(tmp_path / "right")]) == 0


def test_acceptance_checks_fail_on_a_missed_figure_or_a_wrong_value():
  """The acceptance script's checks: each figure against its limit, and
  jaxce's loss and gradients against the peer's (a 1% error fails)."""
  import jaxce
  from jaxce.benchmark import acceptance

  x = jax.random.normal(jax.random.key(0), (8, 10))
  y = jnp.arange(8) % 10
  ours = jax.value_and_grad(jaxce.cross_entropy)
  theirs = jax.value_and_grad(acceptance._optax_int)
  assert acceptance.values_agree(ours, theirs, (x, y), 1e-4)
  off = jax.value_and_grad(lambda x, y: jaxce.cross_entropy(x, y) * 1.01)
  assert not acceptance.values_agree(off, theirs, (x, y), 1e-4)
  speed = {"jaxce_over_optax": 0.9, "values_agree": True}
  results = {
      "core_memory": {"float32": {"jaxce_over_optax": 0.5}},
      "linear_memory": {"target_MiB (N=8192, D=4096, V=128256, bf16)": 196,
                        "materialized_optax_MiB": 12024,
                        "table_MiB": {"by_vocab (N=8192, D=4096)": {1: 196, 2: 196.1}}},
      "core_speed": {"float32": dict(speed)}, "linear_speed": dict(speed)}
  assert all(c["ok"] for c in acceptance.checks(results))
  for path, value in ((("core_speed", "float32", "jaxce_over_optax"), 1.05),
                      (("linear_speed", "values_agree"), False),
                      (("core_memory", "float32", "jaxce_over_optax"), 1.2)):
    bad = json.loads(json.dumps(results))
    node = bad
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
    assert [c["ok"] for c in acceptance.checks(bad)].count(False) == 1, path


def test_matmul_cases_off_cpu_allow_the_default_precision_rounding():
  from jaxce.benchmark import cases

  linear, ce = cases.CASES["linear_ce"], cases.CASES["ce_int"]
  assert run.tolerance(linear, "float32", "cpu") == run.tolerance(ce, "float32", "tpu") == 1e-4
  assert run.tolerance(linear, "float32", "tpu") == run.tolerance(linear, "bfloat16", "gpu") == 3e-2
