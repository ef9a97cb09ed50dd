"""jaxce against the PyTorch golden values of tests/golden/*.npz.

Every case of the files in FILES is rebuilt from its metadata (PyTorch's class
axis is 1) and compared, loss and gradients, in float64 (tight) and in float32
(float32 with `pytest -m slow`, which .ci/run also runs).
To keep compile time low, all the cases of one file run in a single jitted
program per dtype (the inputs are arguments, not constants); each case is
still checked, and reported, as its own test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_compile import compile_lowered_fast
from golden import NAMES, load, torch_version

import jaxce

# The files this module rebuilds calls for (linear_cross_entropy.npz, if
# present, belongs to the fused linear loss and is tested with it).
FILES = {
    "cross_entropy_int": 51,
    "cross_entropy_prob": 24,
    "nll_loss": 24,
    "bce_with_logits": 38,
    "log_softmax": 3,
    "extreme": 4,
    "bce_probs": 24,
}
CASES = [(name, i, case) for name in FILES for i, case in enumerate(load(name))]
F32_EPS = float(np.finfo(np.float32).eps)
# Skipping LLVM's optimizations halves the compile time of the per-file
# programs; XLA's own passes (fusion included) still run, and without
# fast-math the arithmetic is the same IEEE arithmetic.


def test_every_file_has_its_cases():
  assert set(FILES) - {"bce_probs"} <= set(NAMES)
  assert {name: len(load(name)) for name in FILES} == FILES
  for name in FILES:
    assert torch_version(name)
  fns = {case["meta"]["fn"] for _, _, case in CASES}
  assert fns == {"cross_entropy", "nll_loss", "binary_cross_entropy_with_logits", "log_softmax",
                 "binary_cross_entropy"}


def _scalar(loss, cot, reduction):
  return jnp.sum(loss * cot) if reduction == "none" else loss


def _run(meta, a):
  """(loss, {input name: gradient}) from jaxce for one case; `a` holds the
  case's arrays, already in the compute dtype (targets int32)."""
  reduction = meta.get("reduction", "none")
  cot = a.get("cot", 1.0)

  if meta["fn"] == "log_softmax":
    out, vjp = jax.vjp(lambda x: jaxce.log_softmax(x, axis=meta["axis"]), a["x"])
    return out, {"x": vjp(a["cot"])[0]}

  if meta["fn"] == "nll_loss":
    def f(lp):
      loss = jaxce.nll_loss(lp, a["targets"], weight=a.get("weight"),
                            ignore_index=meta["ignore_index"], reduction=reduction,
                            axis=meta["axis"])
      return _scalar(loss, cot, reduction), loss

    (_, loss), g = jax.value_and_grad(f, has_aux=True)(a["log_probs"])
    return loss, {"log_probs": g}

  if meta["fn"] == "binary_cross_entropy_with_logits":
    def f(x, t):
      loss = jaxce.binary_cross_entropy_with_logits(
          x, t, weight=a.get("weight"), pos_weight=a.get("pos_weight"), reduction=reduction)
      return _scalar(loss, cot, reduction), loss

    (_, loss), (gx, gt) = jax.value_and_grad(f, (0, 1), has_aux=True)(a["logits"], a["targets"])
    return loss, {"logits": gx, "targets": gt}

  if meta["fn"] == "binary_cross_entropy":
    def f(p, t):
      loss = jaxce.binary_cross_entropy(p, t, weight=a.get("weight"), reduction=reduction)
      return _scalar(loss, cot, reduction), loss

    (_, loss), (gp, gt) = jax.value_and_grad(f, (0, 1), has_aux=True)(a["probs"], a["targets"])
    return loss, {"probs": gp, "targets": gt}

  assert meta["fn"] == "cross_entropy"
  kw = dict(weight=a.get("weight"), reduction=reduction,
            label_smoothing=meta["label_smoothing"], axis=meta["axis"])
  if meta["target_kind"] == "prob":
    def f(x, t):
      loss = jaxce.cross_entropy(x, t, **kw)
      return _scalar(loss, cot, reduction), loss

    (_, loss), (gx, gt) = jax.value_and_grad(f, (0, 1), has_aux=True)(a["logits"], a["targets"])
    return loss, {"logits": gx, "targets": gt}

  def f(x):
    loss = jaxce.cross_entropy(x, a["targets"], ignore_index=meta["ignore_index"], **kw)
    return _scalar(loss, cot, reduction), loss

  (_, loss), g = jax.value_and_grad(f, has_aux=True)(a["logits"])
  return loss, {"logits": g}


INPUTS = ("logits", "log_probs", "x", "probs", "targets", "weight", "pos_weight", "cot")


def _inputs(case, dtype):
  out = {}
  for k in INPUTS:
    if k in case:
      v = case[k]
      out[k] = v.astype(np.int32) if v.dtype.kind in "iu" else v.astype(dtype)
  return out


@functools.cache
def _file_results(name, dtype):
  """jaxce's (loss, grads) for every case of one file, as NumPy arrays."""
  cases = load(name)
  metas = [c["meta"] for c in cases]
  run_all = jax.jit(lambda inputs: [_run(m, a) for m, a in zip(metas, inputs, strict=True)])
  inputs = [_inputs(c, dtype) for c in cases]
  if dtype == "float64":
    with jax.enable_x64(True):
      return jax.device_get(compile_lowered_fast(run_all.lower(inputs))(inputs))
  return jax.device_get(compile_lowered_fast(run_all.lower(inputs))(inputs))


def _check(name, index, case, dtype):
  meta = case["meta"]
  loss, grads = _file_results(name, dtype)[index]
  fdt = np.dtype(dtype)
  assert loss.dtype == fdt
  for k, g in grads.items():
    assert g.dtype == fdt, k
  if dtype == "float64":
    tol = dict(rtol=1e-10, atol=1e-12)
  else:
    # float32 rounds the logsumexp at the magnitude of the largest input.
    scale = max(float(np.max(np.abs(case[k]))) for k in ("logits", "log_probs", "x", "probs")
                if k in case)
    tol = dict(rtol=1e-5, atol=1e-6 + 8 * F32_EPS * scale)

  expected = case["out"] if meta["fn"] == "log_softmax" else case["loss"]
  if meta.get("all_ignored") and meta["reduction"] == "mean":
    assert np.isnan(expected)  # torch: 0 / 0
    assert float(loss) == 0.0  # jaxce, on purpose
  else:
    assert np.shape(loss) == np.shape(expected)
    np.testing.assert_allclose(np.asarray(loss, np.float64), expected, **tol)
  for k, g in grads.items():
    want = case["grad_" + k]
    if meta["fn"] == "binary_cross_entropy" and dtype == "float32":
      # Rounding p to float32 moves 1 - p (and p) by up to eps relative to
      # min(p, 1 - p): the gradients' own conditioning. torch's +-inf target
      # gradients at p = 0, 1 must match exactly.
      p = case["probs"]
      margin = np.minimum(p, 1 - p)  # 0 at the exact (representable) edges
      rtol = 1e-5 + 4 * F32_EPS / np.where(margin > 0, margin, np.inf)
      g = np.asarray(g, np.float64)
      finite = np.isfinite(want)
      np.testing.assert_array_equal(g[~finite], want[~finite])
      err = np.abs(g[finite] - want[finite])
      assert np.all(err <= (rtol * np.abs(want) + 1e-6)[finite]), (k, g, want)
      continue
    np.testing.assert_allclose(np.asarray(g, np.float64), want, **tol,
                               err_msg=f"gradient with respect to {k}")


# float32 runs with `pytest -m slow` (.ci/run runs both): the default suite
# has to fit in 5 minutes on 2 cores, and float64 checks the same kernels
# against torch at tight tolerances.
@pytest.mark.parametrize("dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    ("name", "index", "case"), CASES, ids=[f"{n}-{c['meta']['case_id']}" for n, _, c in CASES])
def test_golden(name, index, case, dtype):
  _check(name, index, case, dtype)
