"""Gradients of every loss: numerical checks to second order in forward and
reverse mode, hessians and grad-of-grad against plain jnp formulas, and the
lean-residual promise of the custom JVPs in reverse mode. (Forward mode in
depth: test_forward_mode.py.)"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_compile import compile_as_shipped
from jax.test_util import check_grads
from residuals import saved_residuals

import jaxce

F64 = jnp.float64


@pytest.fixture(autouse=True)
def _x64():
  """Float64 everywhere in this module: finite differences need it."""
  with jax.enable_x64(True):
    yield


def _rng(seed=0):
  return np.random.default_rng(seed)


def _logits(shape, seed=0, scale=2.0):
  return jnp.asarray(_rng(seed).normal(size=shape) * scale, F64)


def _probs(shape, seed=1):
  t = _rng(seed).uniform(0.05, 1.0, size=shape)
  return jnp.asarray(t / t.sum(-1, keepdims=True), F64)


def _weight(c, seed=2):
  return jnp.asarray(_rng(seed).uniform(0.5, 2.0, size=c), F64)


LABELS = np.array([0, 3, -100, 4, 1, 2], np.int32)  # one ignored position
N, C = 6, 5
# Classes 1 and 3 out of row 0, class 0 out of row 4 (none holds the label).
WHERE = np.ones((N, C), bool)
WHERE[0, 1] = WHERE[0, 3] = False
WHERE[4, 0] = False


def _check(f, args, jit=False):
  # Eager by default: op-by-op executables are cached across these tests (same
  # [N, C] shapes), cheaper than compiling programs per closure. Shapes used
  # once are cheaper compiled.
  check_grads(jax.jit(f) if jit else f, args, order=2, modes=["fwd", "rev"], eps=1e-4,
              atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# check_grads, order 2, forward and reverse mode, for every option family.

INT_OPTIONS = {
    "plain": {},
    "sum_smoothing": {"reduction": "sum", "label_smoothing": 0.2},
    "none_z_loss": {"reduction": "none", "z_loss": 0.03},
    "where_smoothing_z": {"where": WHERE, "label_smoothing": 0.1, "z_loss": 0.01},
    # Broadcast mask, one flag per position: row 1 has no class left.
    "where_rows": {"where": np.arange(N)[:, None] != 1, "label_smoothing": 0.1},
    "ignore_index_3": {"ignore_index": 3, "label_smoothing": 0.1},
}


@pytest.mark.slow  # a sweep: `pytest -m slow` (.ci/run) runs it
@pytest.mark.parametrize("opts", INT_OPTIONS.values(), ids=INT_OPTIONS.keys())
def test_check_grads_cross_entropy_int(opts):
  x = _logits((N, C))
  y = jnp.asarray(LABELS)
  _check(lambda x: jaxce.cross_entropy(x, y, **opts), (x,))


@pytest.mark.parametrize(("reduction", "smoothing"), [
    ("mean", 0.15), ("none", 0.0),
    # the other two pairings: `pytest -m slow` (.ci/run)
    pytest.param("mean", 0.0, marks=pytest.mark.slow),
    pytest.param("none", 0.15, marks=pytest.mark.slow)])
def test_check_grads_cross_entropy_int_weight(smoothing, reduction):
  x, w = _logits((N, C)), _weight(C)
  y = jnp.asarray(LABELS)
  f = lambda x, w: jaxce.cross_entropy(
      x, y, weight=w, label_smoothing=smoothing, z_loss=0.02, reduction=reduction)
  _check(f, (x, w))


@pytest.mark.slow  # a sweep: `pytest -m slow` (.ci/run) runs it
@pytest.mark.parametrize("masked", [False, True], ids=["weight", "where"])
def test_check_grads_cross_entropy_int_axis1(masked):
  # PyTorch layout (N, C, L): the class axis is 1.
  x, w = _logits((3, C, 4)), _weight(C)
  y = _rng(3).integers(0, C, size=(3, 4))
  # Random class mask that keeps every label's class.
  where = (_rng(4).uniform(size=(3, C, 4)) > 0.3) | (np.arange(C)[None, :, None] == y[:, None])
  y = jnp.asarray(y, jnp.int32).at[0, 1].set(-100)
  opts = {"axis": 1, "label_smoothing": 0.1, "z_loss": 0.01}
  if masked:  # (weight and where together: see test_second_order_weight_masked_class)
    _check(lambda x: jaxce.cross_entropy(x, y, where=where, **opts), (x,), jit=True)
  else:
    _check(lambda x, w: jaxce.cross_entropy(x, y, weight=w, **opts), (x, w), jit=True)


@pytest.mark.parametrize("case", ["int_where", "int_neg_inf", "probs_where"])
def test_second_order_weight_masked_class(case):
  """Reverse-over-reverse w.r.t. `weight` with a masked class (outside `where`,
  or a -inf logit) must stay finite: the masked class takes no part, so every
  derivative is an ordinary finite number (0 for the masked class)."""
  x, w, t = _logits((N, C)), _weight(C), _probs((N, C))
  y = jnp.asarray(LABELS)
  if case == "int_where":
    f = lambda x, w: jaxce.cross_entropy(x, y, weight=w, label_smoothing=0.1, where=WHERE)
    ref = lambda x, w: _ref_ce_int(x, y, w, 0.1, 0.0, WHERE)
  elif case == "int_neg_inf":
    x = jnp.where(jnp.asarray(WHERE), x, -jnp.inf)
    f = lambda x, w: jaxce.cross_entropy(x, y, weight=w, label_smoothing=0.1)
    ref = lambda x, w: _ref_ce_int(x, y, w, 0.1, 0.0, WHERE)
  else:
    # d/dw of ||dL/dt||^2 (and vice versa), probability targets.
    x = t
    f = lambda t, w: jaxce.cross_entropy(_logits((N, C)), t, weight=w, where=WHERE)
    ref = lambda t, w: _ref_ce_probs(_logits((N, C)), t, w, where=WHERE)
  sq_grad = lambda loss, i: lambda x, w: jnp.sum(jax.grad(loss, i)(x, w) ** 2)
  for i in (0, 1):
    got = jax.grad(sq_grad(f, i), (0, 1))(x, w)
    want = jax.grad(sq_grad(ref, i), (0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
      np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-13, err_msg=f"{case}, inner {i}")


@pytest.mark.parametrize("case", ["probs_targets_where", "int_weight_smoothing_where"])
def test_second_order_through_cotangent_masked_class(case):
  """d/ds of sum(grad(s * loss)) is sum(grad(loss)): the first-order gradient
  is linear in the incoming cotangent, also with a masked class."""
  x, t, w = _logits((N, C)), _probs((N, C)), _weight(C)
  y = jnp.asarray(LABELS)
  if case == "probs_targets_where":
    arg, loss = t, lambda t: jaxce.cross_entropy(x, t, where=WHERE)
  else:
    arg, loss = w, lambda w: jaxce.cross_entropy(
        x, y, weight=w, where=WHERE, label_smoothing=0.1)
  f = lambda s: jnp.sum(jax.grad(lambda a: s * loss(a))(arg))
  np.testing.assert_allclose(jax.grad(f)(1.0), f(1.0), rtol=1e-12)


PROB_OPTIONS = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "smoothing": {"label_smoothing": 0.3},
    "z_loss": {"z_loss": 0.05},
    "where_smoothing": {"where": WHERE, "label_smoothing": 0.1},
}


@pytest.mark.parametrize("opts", [
    # reductions "none" and "sum" (wired as for integer labels), and smoothing
    # without `where` (where_smoothing covers it): `pytest -m slow`
    pytest.param(v, marks=pytest.mark.slow) if k in ("none", "sum", "smoothing") else v
    for k, v in PROB_OPTIONS.items()], ids=PROB_OPTIONS.keys())
def test_check_grads_cross_entropy_probs(opts):
  x, t, w = _logits((N, C)), _probs((N, C)), _weight(C)
  if "where" in opts:  # (targets or weight with where: see test_second_order_*_masked_class)
    _check(lambda x: jaxce.cross_entropy(x, t, **opts), (x,))
  else:
    _check(lambda x, t, w: jaxce.cross_entropy(x, t, weight=w, **opts), (x, t, w))


def test_check_grads_cross_entropy_probs_axis1():
  x, t = _logits((2, C, 3)), _probs((2, 3, C)).transpose(0, 2, 1)
  f = lambda x, t: jaxce.cross_entropy(x, t, axis=1, label_smoothing=0.1, z_loss=0.01)
  _check(f, (x, t), jit=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_check_grads_nll_loss(reduction):
  lp, w = _logits((N, C)), _weight(C)
  y = jnp.asarray(LABELS)
  _check(lambda lp, w: jaxce.nll_loss(lp, y, weight=w, reduction=reduction), (lp, w))


def test_check_grads_nll_loss_log_softmax_logsumexp_axis1():
  x = _logits((2, C, 3))
  y = jnp.asarray([[0, 4, -100], [2, 1, 3]], jnp.int32)
  f = lambda x: (jaxce.nll_loss(jaxce.log_softmax(x, axis=1), y, axis=1)
                 + jnp.sum(jnp.sin(jaxce.logsumexp(x, axis=1))))
  _check(f, (x,), jit=True)


@pytest.mark.parametrize("reduction", ["mean", "none", "plain"])
def test_check_grads_bce(reduction):
  x = _logits((4, 3), scale=3.0)
  t = jnp.asarray(_rng(5).uniform(size=(4, 3)), F64)
  w = jnp.asarray(_rng(6).uniform(0.5, 2.0, size=(4, 1)), F64)
  pw = jnp.asarray(_rng(7).uniform(0.5, 3.0, size=(3,)), F64)
  if reduction == "plain":  # no weights, "mean"
    _check(lambda x, t: jaxce.binary_cross_entropy_with_logits(x, t), (x, t))
    return
  f = lambda x, t, w, pw: jaxce.binary_cross_entropy_with_logits(
      x, t, weight=w, pos_weight=pw, reduction=reduction)
  _check(f, (x, t, w, pw))


@pytest.mark.parametrize("where", [None, WHERE], ids=["plain", "where"])
@pytest.mark.parametrize("fn", [jaxce.log_softmax, jaxce.logsumexp])
def test_check_grads_log_softmax_logsumexp(fn, where):
  x = _logits((N, C))
  if where is None:
    _check(lambda x: fn(x), (x,))
  else:
    # Masked outputs of log_softmax are constant -inf: take them out of the sum.
    w = jnp.asarray(where)
    g = (lambda x: jnp.where(w, fn(x, where=w), 0.0)) if fn is jaxce.log_softmax else (
        lambda x: fn(x, where=w))
    _check(g, (x,))


# ---------------------------------------------------------------------------
# Hessians and grad-of-grad against plain jnp formulas.


def _ref_ce_int(x, y, w=None, eps=0.0, z=0.0, where=None, ignore_index=-100):
  """Plain jnp integer-target CE ("mean"), the docstring's formula."""
  c = x.shape[-1]
  w = jnp.ones(c, x.dtype) if w is None else w
  act = jnp.ones(x.shape, bool) if where is None else jnp.asarray(where)
  xm = jnp.where(act, x, -jnp.inf)
  lse = jax.nn.logsumexp(xm, axis=-1)
  nlp = jnp.where(act, lse[:, None] - xm, 0.0)  # -log p on active classes
  valid = y != ignore_index
  yc = jnp.clip(y, 0, c - 1)
  hot = jax.nn.one_hot(yc, c, dtype=x.dtype)
  w_y = jnp.where(valid, w[yc], 0.0)
  main = w_y * jnp.sum(hot * nlp, -1)
  k = jnp.sum(act, -1).astype(x.dtype)
  smooth = jnp.where(valid, jnp.sum(w[None, :] * nlp, -1) / k, 0.0)
  loss = (1 - eps) * main + eps * smooth + z * jnp.where(valid, lse, 0.0) ** 2
  return jnp.sum(loss) / jnp.sum(w_y)


def _ref_ce_probs(x, t, w=None, eps=0.0, z=0.0, where=None):
  c = x.shape[-1]
  w = jnp.ones(c, x.dtype) if w is None else w
  act = jnp.ones(x.shape, bool) if where is None else jnp.asarray(where)
  k = jnp.sum(act, -1, keepdims=True).astype(x.dtype)
  q = jnp.where(act, (1 - eps) * t + eps / k, 0.0)
  lse = jax.nn.logsumexp(jnp.where(act, x, -jnp.inf), axis=-1)
  nlp = jnp.where(act, lse[:, None] - x, 0.0)
  loss = jnp.sum(w[None, :] * q * nlp, -1) + z * lse**2
  return jnp.mean(loss)


def _ref_bce(x, t, w, pw):
  ls = jax.nn.log_sigmoid
  return jnp.mean(-w * (pw[None, :] * t * ls(x) + (1 - t) * ls(-x)))


HESS_CASES = {
    "int": (lambda x, y: jaxce.cross_entropy(x, y), lambda x, y: _ref_ce_int(x, y)),
    "int_all": (
        lambda x, y: jaxce.cross_entropy(
            x, y, weight=_weight(C), label_smoothing=0.2, z_loss=0.05, where=WHERE),
        lambda x, y: _ref_ce_int(x, y, _weight(C), 0.2, 0.05, WHERE),
    ),
    "nll": (
        lambda x, y: jaxce.nll_loss(jaxce.log_softmax(x), y, weight=_weight(C)),
        lambda x, y: _ref_ce_int(x, y, _weight(C)),
    ),
    "probs": (
        lambda x, y: jaxce.cross_entropy(
            x, _probs((N, C)), weight=_weight(C), label_smoothing=0.1, z_loss=0.02),
        lambda x, y: _ref_ce_probs(x, _probs((N, C)), _weight(C), 0.1, 0.02),
    ),
    "logsumexp": (
        lambda x, y: jnp.sum(jnp.sin(jaxce.logsumexp(x))),
        lambda x, y: jnp.sum(jnp.sin(jax.nn.logsumexp(x, axis=-1))),
    ),
    "log_softmax": (
        lambda x, y: jnp.sum(jnp.cos(jaxce.log_softmax(x))),
        lambda x, y: jnp.sum(jnp.cos(jax.nn.log_softmax(x, axis=-1))),
    ),
}


@pytest.mark.parametrize("case", HESS_CASES.values(), ids=HESS_CASES.keys())
def test_hessian_matches_reference(case):
  f, ref = case
  x, y = _logits((N, C)), jnp.asarray(LABELS)
  np.testing.assert_allclose(f(x, y), ref(x, y), rtol=1e-12)
  # Compiled: one program is much cheaper than eager op-by-op hessians.
  h = jax.jit(jax.hessian(f))(x, y)
  assert h.shape == (N, C, N, C)
  np.testing.assert_allclose(h, jax.jit(jax.hessian(ref))(x, y), rtol=1e-9, atol=1e-12)


def test_hessian_bce_all_arguments():
  x = _logits((3, 4), scale=3.0)
  t = jnp.asarray(_rng(5).uniform(size=(3, 4)), F64)
  w = jnp.asarray(_rng(6).uniform(0.5, 2.0, size=(3, 4)), F64)
  pw = jnp.asarray(_rng(7).uniform(0.5, 3.0, size=(4,)), F64)
  f = lambda x, t, pw: jaxce.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw)
  ref = lambda x, t, pw: _ref_bce(x, t, w, pw)
  args = (x, t, pw)
  got = jax.jit(jax.hessian(f, (0, 1, 2)))(*args)
  want = jax.jit(jax.hessian(ref, (0, 1, 2)))(*args)
  for g_row, w_row in zip(got, want, strict=True):
    for g, r in zip(g_row, w_row, strict=True):
      np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


def test_hessian_wrt_weight_and_targets():
  x, t, w = _logits((N, C)), _probs((N, C)), _weight(C)
  f = lambda x, t, w: jaxce.cross_entropy(x, t, weight=w, label_smoothing=0.25)
  ref = lambda x, t, w: _ref_ce_probs(x, t, w, 0.25)
  got = jax.jit(jax.hessian(f, (0, 1, 2)))(x, t, w)
  want = jax.jit(jax.hessian(ref, (0, 1, 2)))(x, t, w)
  for g_row, w_row in zip(got, want, strict=True):
    for g, r in zip(g_row, w_row, strict=True):
      np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


def test_grad_of_grad():
  x, y, w = _logits((N, C)), jnp.asarray(LABELS), _weight(C)

  def gnorm(loss):
    return lambda x: jnp.sum(jax.grad(loss)(x) ** 2)

  f = lambda x: jaxce.cross_entropy(x, y, weight=w, label_smoothing=0.1, z_loss=0.01)
  ref = lambda x: _ref_ce_int(x, y, w, 0.1, 0.01)
  gg = lambda loss: jax.jit(jax.grad(gnorm(loss)))(x)
  np.testing.assert_allclose(gg(f), gg(ref), rtol=1e-9, atol=1e-13)
  # Third order too: grad of grad of grad, along one direction.
  d3 = lambda loss: jax.jit(jax.grad(lambda s: jax.grad(gnorm(loss))(x * s)[0, 0]))(1.0)
  np.testing.assert_allclose(d3(f), d3(ref), rtol=1e-8)


# ---------------------------------------------------------------------------
# Lean residuals: backward keeps the inputs and per-position statistics only.

RES_N, RES_C = 64, 1000


def _assert_lean(residuals, in_dtype, n_args):
  """Only arrays the caller holds (arguments, closed-over constants) may have
  more than N elements, besides [C] weight vectors; the arguments of size
  N*C are the inputs as given (no float32 copy of half-precision inputs)."""
  full = []
  for dtype, shape, origin in residuals:
    size = math.prod(shape)
    held = origin.startswith(("from the argument", "from a constant", "from a literal"))
    if held:
      if size == RES_N * RES_C and origin.startswith("from the argument"):
        full.append(dtype)
      continue
    assert size <= RES_N or size == RES_C, (
        f"computed residual {dtype}{list(shape)} {origin} is larger than one value per"
        f" position; all residuals: {residuals}")
  # nll_loss needs no input at all; the others keep their inputs as given.
  assert len(full) <= n_args, residuals
  assert all(d == in_dtype for d in full), residuals


# The short dtype names print_saved_residuals uses.
_DT = {"f32": jnp.float32, "bf16": jnp.bfloat16}
_LBL = np.arange(RES_N, dtype=np.int32) * 7 % RES_C


def _res_cases():
  w = jnp.ones(RES_C, jnp.float32)
  y = jnp.asarray(_LBL)
  y_ign = jnp.asarray(_LBL).at[::5].set(-100)
  where_full = jnp.asarray(np.arange(RES_C)[None, :] % 7 != 3).repeat(RES_N, 0)
  return {
      "ce": (lambda x: jaxce.cross_entropy(x, y), 1),
      "ce_smooth_z_weight": (
          lambda x: jaxce.cross_entropy(
              x, y_ign, weight=w, label_smoothing=0.1, z_loss=1e-4), 1),
      "ce_none": (lambda x: jnp.sum(jaxce.cross_entropy(x, y, reduction="none")), 1),
      "ce_where_full": (
          lambda x: jaxce.cross_entropy(x, y, where=where_full, label_smoothing=0.1), 1),
      "ce_probs": (
          lambda x, t: jaxce.cross_entropy(
              x, t, weight=w, label_smoothing=0.1, z_loss=1e-4), 2),
      "nll": (lambda x: jaxce.nll_loss(x, y, weight=w), 1),
      "nll_of_log_softmax": (lambda x: jaxce.nll_loss(jaxce.log_softmax(x), y), 1),
      "log_softmax": (lambda x: jnp.sum(jaxce.log_softmax(x).astype(jnp.float32)), 1),
      "logsumexp": (lambda x: jnp.sum(jaxce.logsumexp(x).astype(jnp.float32)), 1),
      "bce": (
          lambda x, t: jaxce.binary_cross_entropy_with_logits(x, t, pos_weight=w), 2),
  }


@pytest.mark.parametrize("dt_name", list(_DT))
@pytest.mark.parametrize("case", list(_res_cases()))
def test_lean_residuals(case, dt_name):
  with jax.enable_x64(False):
    fn, n_args = _res_cases()[case]
    dt = _DT[dt_name]
    rng = _rng(11)
    x = jnp.asarray(rng.normal(size=(RES_N, RES_C)), dt)
    t = jnp.asarray(rng.uniform(size=(RES_N, RES_C)), dt)
    res = saved_residuals(fn, *(x, t)[:n_args])
  _assert_lean(res, dt_name, n_args)


@pytest.mark.parametrize("where_shape", [(1, RES_C), (RES_N, 1)])
def test_lean_residuals_broadcast_where(where_shape):
  # A `where` that broadcasts against the logits (one row of classes, or one
  # flag per position) must not be saved as a materialized [N, C] mask.
  with jax.enable_x64(False):
    where = jnp.asarray(_rng(12).uniform(size=where_shape) > 0.1)
    y = jnp.asarray(_LBL)
    x = jnp.asarray(_rng(11).normal(size=(RES_N, RES_C)), jnp.float32)
    res = saved_residuals(lambda x: jaxce.cross_entropy(x, y, where=where), x)
  _assert_lean(res, "f32", 1)


@pytest.mark.all_platforms
@pytest.mark.parametrize(("classes", "numbers"), [(1000, "s16"), (40000, "s32")])
def test_cpu_gradient_finds_the_label_by_constant_class_numbers(classes, numbers):
  """XLA:CPU compares an iota in 64-bit vector lanes, which doubled the time
  of the integer-label gradient's pass: on CPU the label's entry is found
  against constant class numbers, int16 below 2^15 classes (LLVM's loop then
  takes twice the logits an iteration); other platforms keep the iota, which
  their fusions take for free. The answer is the same for every label,
  ignored and out-of-range ones included."""
  x = jnp.zeros((16, classes), jnp.float32)
  y = jnp.asarray([0, 1, classes - 1, classes, -1, -100, 2**31 - 1, -(2**31), 7, 9, 11, 13,
                   classes // 2, 3, 5, 2**15], jnp.int32)
  f = jax.jit(jax.value_and_grad(lambda x: jaxce.cross_entropy(x, y, reduction="sum")))
  cpu = compile_as_shipped(f.lower(x)).as_text()
  assert f"{numbers}[{classes}]{{0}} constant" in cpu
  assert not re.search(rf"s32\[16,{classes}\]\{{1,0\}} iota", cpu)
  tpu = f.trace(x).lower(lowering_platforms=("tpu",)).as_text()
  assert re.search(rf"iota.*tensor<16x{classes}xi32>", tpu)
  from jaxce import _stats

  np.testing.assert_array_equal(
      _stats.numbered_one_hot(y, x.shape, 1), _stats.one_hot_at(y, x.shape, 1))
  np.testing.assert_array_equal(
      _stats.numbered_one_hot(y, x.shape, 1, narrow=False), _stats.one_hot_at(y, x.shape, 1))


def test_cpu_smoothing_sums_materialize_nothing():
  """XLA:CPU's fused reductions take no compare or select, so the label-
  smoothing sums are written by arithmetic on CPU: the forward of float32
  integer-label smoothing keeps no N x C array (three before)."""
  x = jnp.zeros((16, 1000), jnp.float32)
  y = jnp.arange(16, dtype=jnp.int32)
  hlo = compile_as_shipped(
      jax.jit(lambda x: jaxce.cross_entropy(x, y, label_smoothing=0.1)).lower(x))
  entry = hlo.as_text().split("ENTRY")[1]
  assert not re.search(r"= f32\[16,1000\]\{1,0\} fusion\(", entry)


def test_cpu_sums_start_from_negative_zero():
  """XLA:CPU runs a fused reduction 2-2.5x slower when its start value is a
  constant shared with other operations, as `jnp.sum`'s 0.0 is: the kernels'
  sums (`_sum.total`) start from -0.0, which nothing else uses."""
  x = jnp.zeros((16, 1024), jnp.float32)
  y = jnp.arange(16, dtype=jnp.int32)
  for f in (lambda x: jaxce.cross_entropy(x, y, label_smoothing=0.1),
            lambda x: jaxce.cross_entropy(x, jax.nn.softmax(x)),
            lambda x: jnp.sum(jaxce.log_softmax(x)[:, 0])):
    hlo = compile_as_shipped(jax.jit(jax.value_and_grad(f)).lower(x)).as_text()
    assert "constant(-0)" in hlo
