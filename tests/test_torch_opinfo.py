"""jaxce on PyTorch's own sample inputs: the OpInfo samples (op_db, CPU,
float64 and float32) of cross_entropy, nll_loss, binary_cross_entropy,
binary_cross_entropy_with_logits and log_softmax, with torch's outputs and
gradients, recorded by `python tests/make_golden.py opinfo` (torch is not a
test dependency). Samples jaxce has no call for are listed, with the reason,
in tests/golden/opinfo_unmapped.json; this test checks that list too.

All the samples of one dtype run in one jitted program (one compilation);
zero-size samples run on their own.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_compile import compile_lowered_fast
from golden import GOLDEN_DIR, load

import jaxce

CASES = load("opinfo")
F32_EPS = float(np.finfo(np.float32).eps)
UNMAPPED_REASONS = {
    "0-d input: jaxce needs a class axis (torch treats it as one element)",
    "dtype=torch.float64 casts the result; jaxce keeps the input dtype",
}


def _call(meta, a):
  """(loss, {torch input name: gradient}) for one sample, as a VJP with the
  stored cotangent (or the gradient of a scalar loss)."""
  kw = dict(meta["kwargs"])
  fn = meta["fn"]
  float_targets = "target" in a and jnp.issubdtype(a["target"].dtype, jnp.floating)
  diff = ("input", "target") if float_targets else ("input",)

  def f(*xs):
    args = dict(zip(diff, xs, strict=True))
    x, t = args["input"], args.get("target", a.get("target"))
    if fn == "log_softmax":
      return jaxce.log_softmax(x, **kw)
    extra = {k: a[k] for k in ("weight", "pos_weight") if k in a}
    return getattr(jaxce, fn)(x, t, **kw, **extra)

  out, vjp = jax.vjp(f, *(a[k] for k in diff))
  cot = a.get("cot", jnp.ones((), out.dtype))
  grads = vjp(cot.astype(out.dtype))
  return out, dict(zip(diff, grads, strict=True))


def _inputs(case, dtype):
  out = {}
  for k in ("input", "target", "weight", "pos_weight", "cot"):
    if k in case:
      v = case[k]
      out[k] = v.astype(np.int32) if v.dtype.kind in "iu" else v.astype(dtype)
  return out


def _zero_size(case):
  return any(0 in case[k].shape for k in ("input", "target") if k in case)


@functools.cache
def _results(dtype):
  """jaxce's (loss, grads) for every nonempty sample of `dtype`, in one
  compiled program."""
  chosen = [i for i, c in enumerate(CASES) if c["meta"]["dtype"] == dtype and not _zero_size(c)]
  metas = [CASES[i]["meta"] for i in chosen]
  inputs = [_inputs(CASES[i], dtype) for i in chosen]
  run = jax.jit(lambda inputs: [_call(m, a) for m, a in zip(metas, inputs, strict=True)])
  with jax.enable_x64(dtype == "float64"):
    out = jax.device_get(compile_lowered_fast(run.lower(inputs))(inputs))
  return dict(zip(chosen, out, strict=True))


def _compare(case, loss, grads):
  meta = case["meta"]
  if meta["dtype"] == "float64":
    tol = dict(rtol=1e-10, atol=1e-12)
  else:
    scale = float(np.max(np.abs(case["input"]), initial=1.0))
    tol = dict(rtol=2e-5, atol=1e-6 + 8 * F32_EPS * scale)
  expected = case["loss"]
  reduction = meta["kwargs"].get("reduction", "mean")
  if np.isnan(expected).any() and reduction == "mean" and meta["fn"] in ("nll_loss",
                                                                         "cross_entropy"):
    # Documented difference: "mean" over only ignored positions is 0.0 here
    # (torch: 0 / 0 = NaN).
    assert float(loss) == 0.0
  else:
    assert np.shape(loss) == np.shape(expected)
    np.testing.assert_allclose(np.asarray(loss, np.float64), expected, **tol)
  for k, g in grads.items():
    want = case.get("grad_" + k)
    if want is None:  # torch's sample did not ask for this gradient
      continue
    np.testing.assert_allclose(np.asarray(g, np.float64), want, **tol,
                               err_msg=f"gradient with respect to {k}")


def _id(meta):
  variant = f"-{meta['variant']}" if meta["variant"] else ""
  return f"{meta['op'].removeprefix('nn.functional.')}{variant}-{meta['dtype']}-s{meta['sample']}"


IDS = [_id(c["meta"]) for c in CASES]


# float32 samples run with `pytest -m slow` (.ci/run runs both): the default
# suite has to fit in 5 minutes on 2 cores.
@pytest.mark.parametrize("index", [
    pytest.param(i, marks=pytest.mark.slow) if c["meta"]["dtype"] == "float32" else i
    for i, c in enumerate(CASES)], ids=IDS)
def test_opinfo_sample(index):
  case = CASES[index]
  if _zero_size(case):
    with jax.enable_x64(case["meta"]["dtype"] == "float64"):
      loss, grads = _call(case["meta"], _inputs(case, case["meta"]["dtype"]))
  else:
    loss, grads = _results(case["meta"]["dtype"])[index]
  _compare(case, loss, grads)


def test_every_op_and_dtype_is_covered_and_the_rest_is_explained():
  with open(os.path.join(GOLDEN_DIR, "opinfo_unmapped.json")) as f:
    unmapped = json.load(f)
  assert unmapped["mapped"] == len(CASES)
  ops = {(c["meta"]["op"], c["meta"]["dtype"]) for c in CASES}
  for op in ("nn.functional.cross_entropy", "nn.functional.nll_loss", "log_softmax",
             "nn.functional.binary_cross_entropy",
             "nn.functional.binary_cross_entropy_with_logits"):
    assert {(op, "float64"), (op, "float32")} <= ops
  # Only the two known gaps are left out: 0-d log_softmax inputs and
  # log_softmax's dtype argument (cast the input instead).
  assert {u["reason"] for u in unmapped["unmapped"]} == UNMAPPED_REASONS
  assert all(u["op"] == "log_softmax" for u in unmapped["unmapped"])
