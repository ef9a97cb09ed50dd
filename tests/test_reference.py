"""jaxce (float32) against the float64 NumPy formulas of tests/reference.py.

Compile time dominates on CPU, so the jaxce side of each parametrized family
runs as one jitted program over all of the family's cases (built on first use
and cached); every case is still checked, and reported, as its own test. The
inputs are arguments of that program, not constants, and the options are
static, as in user code.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from fast_compile import compile_lowered_fast

import jaxce

C = 5
# name -> (logits shape, class axis)
LAYOUTS = {"2d": ((8, C), -1), "kdim": ((4, C, 2, 3), 1)}
RTOL, ATOL = 1e-5, 1e-6
# The grouped programs skip LLVM's optimizations, which halves their compile
# time; XLA's own passes (fusion included) still run, and without fast-math
# the arithmetic is the same IEEE arithmetic.


def _close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def _positions(shape, axis):
  axis = axis % len(shape)
  return shape[:axis] + shape[axis + 1:]


def _rng(*key):
  """A generator seeded by a test case's parameters."""
  return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _int_labels(rng, shape, ignore_index):
  """Class indices in [0, C); with -100 about a quarter are ignored. At least
  one position is ignored and at least one is not."""
  labels = rng.integers(0, C, size=shape)
  flat = labels.reshape(-1)
  if ignore_index == -100:
    flat[rng.random(flat.shape) < 0.25] = -100
  flat[0] = ignore_index
  flat[-1] = 3 if ignore_index != 3 else 0
  return labels.astype(np.int32)


def _prob_targets(rng, shape, axis):
  z = np.exp(rng.normal(0.0, 1.5, size=shape))
  return (z / np.sum(z, axis=axis, keepdims=True)).astype(np.float32)


def _weight(rng, use):
  return rng.uniform(0.2, 2.0, size=(C,)).astype(np.float32) if use else None


def _normal(rng, shape, scale=2.0, loc=0.0):
  return rng.normal(loc, scale, size=shape).astype(np.float32)


def _cot(rng, shape, reduction):
  if reduction != "none":
    return np.float32(1.0)
  return rng.normal(size=shape).astype(np.float32)


def _scalarize(loss, cot, reduction):
  return jnp.sum(loss * cot) if reduction == "none" else loss


_GROUPS: dict[str, dict] = {}


def _grouped(family: str, cases: Sequence, make: Callable, compute: Callable):
  """{case: (inputs, outputs)} for every case of a family.

  `make(case)` gives the case's inputs (a dict of NumPy arrays or None) and
  `compute(case, inputs)` the traced jaxce computation; all cases run in one
  jitted program on first use, and the outputs come back as NumPy arrays.
  """
  if family not in _GROUPS:
    cases = list(cases)
    inputs = [make(c) for c in cases]
    run = jax.jit(lambda ins: [compute(c, i) for c, i in zip(cases, ins, strict=True)])
    outputs = jax.device_get(compile_lowered_fast(run.lower(inputs))(inputs))
    _GROUPS[family] = {c: (i, o) for c, i, o in zip(cases, inputs, outputs, strict=True)}
  return _GROUPS[family]


def _ce_value_and_grads(a, kw, argnames):
  """jaxce.cross_entropy's loss and its gradients with respect to `argnames`
  (of "logits", "labels", "weight"), a VJP with a["cot"] for reduction="none"."""

  def f(*diff):
    b = dict(a, **dict(zip(argnames, diff, strict=True)))
    loss = jaxce.cross_entropy(b["logits"], b["labels"], weight=b.get("weight"),
                               where=b.get("where"), **kw)
    return _scalarize(loss, a["cot"], kw["reduction"]), loss

  (_, loss), grads = jax.value_and_grad(f, tuple(range(len(argnames))), has_aux=True)(
      *[a.get(k) for k in argnames])
  return loss, dict(zip(argnames, grads, strict=True))


# ---------------------------------------------------------------------------
# the reference itself: analytic gradients against finite differences


def test_reference_gradients_match_finite_differences():
  rng = np.random.default_rng(0)
  x = rng.normal(0.0, 2.0, size=(3, 4))
  labels = np.array([2, -100, 0])
  w = rng.uniform(0.2, 2.0, size=(4,))
  t = _prob_targets(rng, (3, 4), -1).astype(np.float64)
  t[0] = [0.0, 1.0, 0.0, 0.0]
  where = np.array([[True, True, True, True], [True, False, True, True],
                    [True, True, False, True]])
  cot = rng.normal(size=(3,))
  for red, eps, z, wh in itertools.product(("none", "mean"), (0.0, 0.1), (0.0, 0.2),
                                           (None, where)):
    kw = dict(weight=w, reduction=red, label_smoothing=eps, z_loss=z, where=wh)

    def scal(v, red=red):
      return np.sum(v * cot) if red == "none" else v

    fd = ref.central_difference(lambda x, kw=kw: scal(ref.cross_entropy_int(x, labels, **kw)), x)
    np.testing.assert_allclose(ref.cross_entropy_int_grad(x, labels, cot=cot, **kw), fd,
                               rtol=1e-6, atol=1e-8)
    fd_x = ref.central_difference(lambda x, kw=kw: scal(ref.cross_entropy_prob(x, t, **kw)), x)
    fd_t = ref.central_difference(lambda t, kw=kw: scal(ref.cross_entropy_prob(x, t, **kw)), t)
    gx, gt = ref.cross_entropy_prob_grad(x, t, cot=cot, **kw)
    np.testing.assert_allclose(gx, fd_x, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gt, fd_t, rtol=1e-6, atol=1e-8)
  lp = ref.log_softmax(x)
  fd = ref.central_difference(lambda v: ref.nll_loss(v, labels, weight=w), lp)
  np.testing.assert_allclose(ref.nll_loss_grad(lp, labels, weight=w), fd, atol=1e-8)
  pw = rng.uniform(0.5, 3.0, size=(4,))
  tb = rng.uniform(size=(3, 4))
  fd_x = ref.central_difference(lambda v: ref.bce_with_logits(v, tb, weight=w, pos_weight=pw), x)
  fd_t = ref.central_difference(lambda v: ref.bce_with_logits(x, v, weight=w, pos_weight=pw), tb)
  gx, gt = ref.bce_with_logits_grad(x, tb, weight=w, pos_weight=pw)
  np.testing.assert_allclose(gx, fd_x, atol=1e-8)
  np.testing.assert_allclose(gt, fd_t, atol=1e-8)
  cot3 = rng.normal(size=(3, 4))
  fd = ref.central_difference(
      lambda v: np.sum(np.where(where, ref.log_softmax(v, where=where), 0.0) * cot3), x)
  np.testing.assert_allclose(ref.log_softmax_vjp(x, np.where(where, cot3, 0.0), where=where), fd,
                             atol=1e-7)


def test_reference_matches_hand_values():
  # -log softmax([1.2, -0.8, -0.5])[0] = log(e^1.2 + e^-0.8 + e^-0.5) - 1.2, by hand.
  logits = np.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
  expected = [np.log(np.exp(1.2) + np.exp(-0.8) + np.exp(-0.5)) - 1.2,
              np.log(np.exp(0.9) + np.exp(-1.2) + np.exp(1.1)) + 1.2]
  np.testing.assert_allclose(ref.cross_entropy_int(logits, np.array([0, 1]), reduction="none"),
                             expected, rtol=1e-14)
  out = jax.jit(lambda x, y: jaxce.cross_entropy(x, y, reduction="none"))(
      logits.astype(np.float32), np.array([0, 1], np.int32))
  _close(out, expected)


# ---------------------------------------------------------------------------
# cross_entropy with integer targets: the full option product

INT_CASES = list(itertools.product(
    [False, True],  # weight
    [-100, 1],  # ignore_index
    [0.0, 0.1],  # label_smoothing
    ref.REDUCTIONS,
    sorted(LAYOUTS),
))


def _int_kw(case):
  _, ignore_index, eps, reduction, layout = case
  return dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=eps,
              axis=LAYOUTS[layout][1])


def _int_make(case):
  use_weight, ignore_index, _, reduction, layout = case
  shape, axis = LAYOUTS[layout]
  rng = _rng("int", *case)
  labels = _int_labels(rng, _positions(shape, axis), ignore_index)
  return dict(logits=_normal(rng, shape), labels=labels, weight=_weight(rng, use_weight),
              cot=_cot(rng, labels.shape, reduction))


def _int_compute(case, a):
  return _ce_value_and_grads(a, _int_kw(case), ("logits", "weight"))


@pytest.mark.parametrize(("use_weight", "ignore_index", "label_smoothing", "reduction", "layout"),
                         INT_CASES)
def test_cross_entropy_int(use_weight, ignore_index, label_smoothing, reduction, layout):
  case = (use_weight, ignore_index, label_smoothing, reduction, layout)
  a, (loss, grads) = _grouped("int", INT_CASES, _int_make, _int_compute)[case]
  kw = _int_kw(case)
  x, y, w = a["logits"], a["labels"], a["weight"]
  assert loss.dtype == np.float32
  assert grads["logits"].dtype == np.float32
  assert loss.shape == (y.shape if reduction == "none" else ())
  _close(loss, ref.cross_entropy_int(x, y, weight=w, **kw))
  _close(grads["logits"], ref.cross_entropy_int_grad(x, y, weight=w, cot=a["cot"], **kw))
  if use_weight:
    # The weight gradient against central differences of the float64 formula.
    c = np.float64(a["cot"])
    fd = ref.central_difference(
        lambda v: np.sum(ref.cross_entropy_int(x, y, weight=v, **kw) * c), w)
    _close(grads["weight"], fd, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# cross_entropy with probability targets

PROB_CASES = list(itertools.product([False, True], [0.0, 0.1], ref.REDUCTIONS, sorted(LAYOUTS)))


def _prob_kw(case):
  _, eps, reduction, layout = case
  return dict(reduction=reduction, label_smoothing=eps, axis=LAYOUTS[layout][1])


def _prob_make(case):
  use_weight, _, reduction, layout = case
  shape, axis = LAYOUTS[layout]
  rng = _rng("prob", *case)
  return dict(logits=_normal(rng, shape), labels=_prob_targets(rng, shape, axis),
              weight=_weight(rng, use_weight), cot=_cot(rng, _positions(shape, axis), reduction))


def _prob_compute(case, a):
  # ignore_index does not apply to probability targets: pass one anyway.
  return _ce_value_and_grads(a, dict(_prob_kw(case), ignore_index=0),
                             ("logits", "labels", "weight"))


@pytest.mark.parametrize(("use_weight", "label_smoothing", "reduction", "layout"), PROB_CASES)
def test_cross_entropy_prob(use_weight, label_smoothing, reduction, layout):
  case = (use_weight, label_smoothing, reduction, layout)
  a, (loss, grads) = _grouped("prob", PROB_CASES, _prob_make, _prob_compute)[case]
  kw = _prob_kw(case)
  x, t, w = a["logits"], a["labels"], a["weight"]
  assert loss.dtype == np.float32
  _close(loss, ref.cross_entropy_prob(x, t, weight=w, **kw))
  e_x, e_t = ref.cross_entropy_prob_grad(x, t, weight=w, cot=a["cot"], **kw)
  _close(grads["logits"], e_x)
  _close(grads["labels"], e_t)
  if use_weight:
    c = np.float64(a["cot"])
    fd = ref.central_difference(
        lambda v: np.sum(ref.cross_entropy_prob(x, t, weight=v, **kw) * c), w)
    _close(grads["weight"], fd, rtol=1e-4, atol=1e-5)


ZERO_TARGET_CASES = ["none", "sum"]


def _zero_target_make(reduction):
  rng = _rng("zero-target", reduction)
  targets = np.eye(C, dtype=np.float32)[rng.integers(0, C, size=6)]
  targets[1] = [0.0, 0.5, 0.5, 0.0, 0.0]
  return dict(logits=_normal(rng, (6, C)), labels=targets, weight=_weight(rng, True),
              cot=_cot(rng, (6,), reduction))


@pytest.mark.parametrize("reduction", ZERO_TARGET_CASES)
def test_cross_entropy_prob_target_grad_at_zero_targets(reduction):
  """d loss / d t_c = -w_c log p_c for every class, including classes whose
  target is exactly 0 (one-hot targets, the common case)."""
  kw = dict(reduction=reduction)
  a, (loss, grads) = _grouped(
      "zero-target", ZERO_TARGET_CASES, _zero_target_make,
      lambda red, a: _ce_value_and_grads(a, dict(reduction=red), ("logits", "labels")))[reduction]
  x, t, w = a["logits"], a["labels"], a["weight"]
  _close(loss, ref.cross_entropy_prob(x, t, weight=w, **kw))
  e_x, e_t = ref.cross_entropy_prob_grad(x, t, weight=w, cot=a["cot"], **kw)
  _close(grads["logits"], e_x)
  _close(grads["labels"], e_t)


# ---------------------------------------------------------------------------
# z-loss

Z_CASES = [(red, kind, w, eps) for red in ref.REDUCTIONS
           for kind, w, eps in [("int", False, 0.0), ("int", True, 0.1), ("prob", True, 0.1)]]
Z = 0.3


def _z_make(case):
  reduction, kind, use_weight, _ = case
  shape, axis = LAYOUTS["kdim"]
  rng = _rng("z", *case)
  pos = _positions(shape, axis)
  labels = _int_labels(rng, pos, -100) if kind == "int" else _prob_targets(rng, shape, axis)
  return dict(logits=_normal(rng, shape, loc=1.0), labels=labels,
              weight=_weight(rng, use_weight), cot=_cot(rng, pos, reduction))


def _z_kw(case, z):
  reduction, _, _, eps = case
  return dict(reduction=reduction, label_smoothing=eps, z_loss=z, axis=1)


def _z_compute(case, a):
  argnames = ("logits", "labels") if case[1] == "prob" else ("logits",)
  with_z = _ce_value_and_grads(a, _z_kw(case, Z), argnames)
  without_z = _ce_value_and_grads(a, _z_kw(case, 0.0), argnames)[0]
  return with_z, without_z


@pytest.mark.parametrize(("reduction", "kind", "use_weight", "label_smoothing"), Z_CASES)
def test_z_loss(reduction, kind, use_weight, label_smoothing):
  case = (reduction, kind, use_weight, label_smoothing)
  a, ((loss, grads), loss_without_z) = _grouped("z", Z_CASES, _z_make, _z_compute)[case]
  kw = _z_kw(case, Z)
  x, y, w = a["logits"], a["labels"], a["weight"]
  lse = ref.logsumexp(x, axis=1)
  if kind == "int":
    _close(loss, ref.cross_entropy_int(x, y, weight=w, **kw))
    _close(grads["logits"], ref.cross_entropy_int_grad(x, y, weight=w, cot=a["cot"], **kw))
    # z * lse^2 on every non-ignored position, not scaled by the class
    # weights, over the same denominator as the rest of the loss.
    valid = y != -100
    z_term = np.where(valid, Z * lse**2, 0.0)
    w_y = np.where(valid, (np.ones(C) if w is None else w)[np.where(valid, y, 0)], 0.0)
    denominator = np.sum(w_y)
  else:
    _close(loss, ref.cross_entropy_prob(x, y, weight=w, **kw))
    e_x, e_t = ref.cross_entropy_prob_grad(x, y, weight=w, cot=a["cot"], **kw)
    _close(grads["logits"], e_x)
    _close(grads["labels"], e_t)
    z_term = Z * lse**2  # every position
    denominator = z_term.size
  expected = {"none": z_term, "sum": np.sum(z_term), "mean": np.sum(z_term) / denominator}
  _close(np.float64(loss) - loss_without_z, expected[reduction], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# nll_loss

NLL_CASES = list(itertools.product([False, True], [-100, 1], ref.REDUCTIONS, sorted(LAYOUTS)))


def _nll_kw(case):
  _, ignore_index, reduction, layout = case
  return dict(ignore_index=ignore_index, reduction=reduction, axis=LAYOUTS[layout][1])


def _nll_make(case):
  use_weight, ignore_index, reduction, layout = case
  shape, axis = LAYOUTS[layout]
  rng = _rng("nll", *case)
  log_probs = ref.log_softmax(rng.normal(0.0, 2.0, size=shape), axis=axis).astype(np.float32)
  labels = _int_labels(rng, _positions(shape, axis), ignore_index)
  return dict(log_probs=log_probs, labels=labels, weight=_weight(rng, use_weight),
              cot=_cot(rng, labels.shape, reduction))


def _nll_compute(case, a):
  kw = _nll_kw(case)

  def f(x):
    loss = jaxce.nll_loss(x, a["labels"], weight=a["weight"], **kw)
    return _scalarize(loss, a["cot"], kw["reduction"]), loss

  (_, loss), grad = jax.value_and_grad(f, has_aux=True)(a["log_probs"])
  return loss, grad


@pytest.mark.parametrize(("use_weight", "ignore_index", "reduction", "layout"), NLL_CASES)
def test_nll_loss(use_weight, ignore_index, reduction, layout):
  case = (use_weight, ignore_index, reduction, layout)
  a, (loss, grad) = _grouped("nll", NLL_CASES, _nll_make, _nll_compute)[case]
  kw = _nll_kw(case)
  assert loss.dtype == np.float32
  _close(loss, ref.nll_loss(a["log_probs"], a["labels"], weight=a["weight"], **kw))
  _close(grad, ref.nll_loss_grad(a["log_probs"], a["labels"], weight=a["weight"], cot=a["cot"],
                                 **kw))


# ---------------------------------------------------------------------------
# binary_cross_entropy_with_logits

BCE_SHAPE = (6, C)
BCE_WEIGHTS = {"none": None, "class": (C,), "row": (6, 1)}
BCE_CASES = list(itertools.product(sorted(BCE_WEIGHTS), [False, True], ref.REDUCTIONS))


def _bce_make(case):
  weight_kind, use_pos_weight, reduction = case
  rng = _rng("bce", *case)
  targets = rng.uniform(size=BCE_SHAPE).astype(np.float32)
  targets[0, :2] = [0.0, 1.0]
  targets[1, 2:] = [1.0, 0.0, 1.0]
  wshape = BCE_WEIGHTS[weight_kind]
  return dict(
      logits=_normal(rng, BCE_SHAPE, 2.5), targets=targets,
      weight=None if wshape is None else rng.uniform(0.2, 2.0, size=wshape).astype(np.float32),
      pos_weight=(rng.uniform(0.5, 3.0, size=(C,)).astype(np.float32) if use_pos_weight
                  else None),
      cot=_cot(rng, BCE_SHAPE, reduction))


def _bce_compute(case, a):
  reduction = case[2]

  def f(x, t, w, pw):
    loss = jaxce.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw,
                                                  reduction=reduction)
    return _scalarize(loss, a["cot"], reduction), loss

  (_, loss), grads = jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True)(
      a["logits"], a["targets"], a["weight"], a["pos_weight"])
  return loss, grads


@pytest.mark.parametrize(("weight_kind", "use_pos_weight", "reduction"), BCE_CASES)
def test_bce_with_logits(weight_kind, use_pos_weight, reduction):
  case = (weight_kind, use_pos_weight, reduction)
  a, (loss, (g_x, g_t, g_w, g_pw)) = _grouped("bce", BCE_CASES, _bce_make, _bce_compute)[case]
  x, t, w, pw = a["logits"], a["targets"], a["weight"], a["pos_weight"]
  assert loss.dtype == np.float32
  kw = dict(weight=w, pos_weight=pw, reduction=reduction)
  _close(loss, ref.bce_with_logits(x, t, **kw))
  e_x, e_t = ref.bce_with_logits_grad(x, t, cot=a["cot"], **kw)
  _close(g_x, e_x)
  _close(g_t, e_t)
  c = np.float64(a["cot"])
  if w is not None:
    fd = ref.central_difference(lambda v: np.sum(ref.bce_with_logits(
        x, t, weight=v, pos_weight=pw, reduction=reduction) * c), w)
    assert g_w.shape == w.shape
    _close(g_w, fd, rtol=1e-4, atol=1e-5)
  if pw is not None:
    fd = ref.central_difference(lambda v: np.sum(ref.bce_with_logits(
        x, t, weight=w, pos_weight=v, reduction=reduction) * c), pw)
    assert g_pw.shape == pw.shape
    _close(g_pw, fd, rtol=1e-4, atol=1e-5)


PW_SHAPES = [(C,), (3, C), (1, 3, 1), (2, 1, C)]


@jax.jit
def _bce_pos_weights(logits, targets, weight, pos_weights):
  def f(pw):
    return jaxce.binary_cross_entropy_with_logits(logits, targets, weight=weight, pos_weight=pw,
                                                  reduction="sum")

  return [(jaxce.binary_cross_entropy_with_logits(logits, targets, weight=weight, pos_weight=pw,
                                                  reduction="none"), jax.grad(f)(pw))
          for pw in pos_weights]


def test_bce_weight_and_pos_weight_broadcast_right_aligned():
  rng = np.random.default_rng(11)
  logits = _normal(rng, (2, 3, C))
  targets = rng.uniform(size=(2, 3, C)).astype(np.float32)
  weight = rng.uniform(0.2, 2.0, size=(2, 3, C)).astype(np.float32)
  pws = [rng.uniform(0.5, 3.0, size=shape).astype(np.float32) for shape in PW_SHAPES]
  for pw, (out, g) in zip(pws, _bce_pos_weights(logits, targets, weight, pws), strict=True):
    _close(out, ref.bce_with_logits(logits, targets, weight=weight, pos_weight=pw,
                                    reduction="none"))
    fd = ref.central_difference(lambda p, pw=pw: ref.bce_with_logits(
        logits, targets, weight=weight, pos_weight=p, reduction="sum"), pw)
    assert g.shape == pw.shape
    _close(g, fd, rtol=1e-4, atol=1e-4)


@jax.jit
def _bce_misc(logits, int_targets, large_x, large_t):
  return (
      jaxce.binary_cross_entropy_with_logits(logits, int_targets.astype(jnp.bool_)),
      jaxce.binary_cross_entropy_with_logits(logits, int_targets),
      jax.value_and_grad(lambda x, t: jaxce.binary_cross_entropy_with_logits(
          x, t, reduction="sum"), argnums=(0, 1))(large_x, large_t),
  )


def test_bce_non_float_targets_and_large_logits():
  rng = np.random.default_rng(12)
  logits = _normal(rng, BCE_SHAPE)
  targets = rng.integers(0, 2, size=BCE_SHAPE).astype(np.int32)
  x = np.array([[50.0, -50.0, 200.0, -200.0], [-1e4, 1e4, 0.0, 1.0]], np.float32)
  t = np.array([[1.0, 0.0, 0.0, 1.0], [0.3, 0.7, 0.5, 1.0]], np.float32)
  from_bool, from_int, (large, (g_x, g_t)) = _bce_misc(logits, targets, x, t)
  for out in (from_bool, from_int):
    assert out.dtype == jnp.float32
    _close(out, ref.bce_with_logits(logits, targets))
  _close(large, ref.bce_with_logits(x, t, reduction="sum"))
  e_x, e_t = ref.bce_with_logits_grad(x, t, reduction="sum")
  _close(g_x, e_x)
  _close(g_t, e_t)


# ---------------------------------------------------------------------------
# ignore_index edge cases: all ignored, out-of-range labels

ALL_IGNORED_CASES = {
    "plain": (dict(), False),
    "weight": (dict(), True),
    "weight-smooth-z": (dict(label_smoothing=0.1, z_loss=0.2), True),
    "smooth-axis1": (dict(label_smoothing=0.3, axis=1), False),
    "valid-class-ignore-index": (dict(label_smoothing=0.1, ignore_index=1), True),
}


def _all_ignored_make(name):
  kw, use_weight = ALL_IGNORED_CASES[name]
  rng = _rng("all-ignored", name)
  axis = kw.get("axis", -1)
  shape = (4, C, 3) if axis == 1 else (6, C)
  return dict(logits=_normal(rng, shape),
              labels=np.full(_positions(shape, axis), kw.get("ignore_index", -100), np.int32),
              weight=_weight(rng, use_weight))


def _all_ignored_compute(name, a):
  kw = ALL_IGNORED_CASES[name][0]
  x, y, w = a["logits"], a["labels"], a["weight"]
  nll_kw = {k: v for k, v in kw.items() if k in ("axis", "ignore_index")}
  return (
      jax.value_and_grad(lambda v: jaxce.cross_entropy(v, y, weight=w, **kw))(x),
      jax.value_and_grad(lambda v: jaxce.nll_loss(v, y, weight=w, **nll_kw))(x),
      jaxce.cross_entropy(x, y, weight=w, reduction="sum", **kw),
      jaxce.cross_entropy(x, y, weight=w, reduction="none", **kw),
  )


@pytest.mark.parametrize("name", sorted(ALL_IGNORED_CASES))
def test_all_ignored_mean_is_zero_with_zero_grad(name):
  a, ((loss, grad), (nll, nll_grad), total, per_position) = _grouped(
      "all-ignored", sorted(ALL_IGNORED_CASES), _all_ignored_make, _all_ignored_compute)[name]
  zeros = np.zeros(a["logits"].shape, np.float32)
  assert loss.dtype == np.float32
  assert float(loss) == 0.0  # PyTorch: NaN
  np.testing.assert_array_equal(grad, zeros)
  assert float(nll) == 0.0
  np.testing.assert_array_equal(nll_grad, zeros)
  assert float(total) == 0.0
  np.testing.assert_array_equal(per_position, np.zeros(a["labels"].shape, np.float32))


OUT_OF_RANGE_CASES = [(-100, C), (-100, -1), (1, -100), (1, 99)]


def _out_of_range_make(case):
  ignore_index, bad = case
  return dict(logits=_normal(_rng("oor", *case), (6, C)),
              labels=np.array([0, bad, 2, ignore_index, 4, 3], np.int32))


def _out_of_range_compute(case, a):
  x, y, ignore_index = a["logits"], a["labels"], case[0]
  out = {f"{eps}-{red}": jaxce.cross_entropy(x, y, ignore_index=ignore_index, reduction=red,
                                             label_smoothing=eps)
         for eps in (0.0, 0.1) for red in ref.REDUCTIONS}
  out["nll"] = jaxce.nll_loss(x, y, ignore_index=ignore_index, reduction="none")
  return out


@pytest.mark.parametrize(("ignore_index", "bad"), OUT_OF_RANGE_CASES)
def test_out_of_range_label_gives_nan_for_that_position(ignore_index, bad):
  a, out = _grouped("oor", OUT_OF_RANGE_CASES, _out_of_range_make,
                    _out_of_range_compute)[(ignore_index, bad)]
  x, y = a["logits"], a["labels"]
  for eps in (0.0, 0.1):
    loss = out[f"{eps}-none"]
    expected = ref.cross_entropy_int(x, y, ignore_index=ignore_index, reduction="none",
                                     label_smoothing=eps)
    assert np.isnan(expected[1])
    assert np.isnan(loss[1])
    assert not np.any(np.isnan(np.delete(loss, 1)))
    _close(np.delete(loss, 1), np.delete(expected, 1))
    assert loss[3] == 0.0
    assert np.isnan(out[f"{eps}-mean"])
    assert np.isnan(out[f"{eps}-sum"])
  assert np.isnan(out["nll"][1])
  _close(np.delete(out["nll"], 1), np.delete(ref.nll_loss(
      x, y, ignore_index=ignore_index, reduction="none"), 1))


# ---------------------------------------------------------------------------
# `where` masks and -inf logits


def _mask(rng, shape, axis):
  """Random class mask with classes 0 and 3 always active, except at
  position 0, where every class is masked."""
  last = list(np.moveaxis(np.empty(shape), axis, -1).shape)
  m = rng.random(last) < 0.6
  m[..., 0] = True
  m[..., 3] = True
  m.reshape(-1, last[-1])[0] = False
  return np.moveaxis(m, -1, axis)


WHERE_CASES = list(itertools.product(["none", "mean"], [0.0, 0.2], sorted(LAYOUTS)))


def _where_kw(case):
  reduction, eps, layout = case
  return dict(reduction=reduction, label_smoothing=eps, axis=LAYOUTS[layout][1])


def _where_make(case):
  reduction, _, layout = case
  shape, axis = LAYOUTS[layout]
  rng = _rng("where", *case)
  where = _mask(rng, shape, axis)
  # labels on active classes (0 or 3) or ignored; position 0 has no class left
  labels = rng.choice(np.array([0, 3, -100], np.int32), size=_positions(shape, axis))
  labels.reshape(-1)[:2] = [3, 0]
  return dict(logits=_normal(rng, shape), labels=labels, weight=_weight(rng, True),
              where=where, cot=_cot(rng, labels.shape, reduction))


def _where_compute(case, a):
  kw = _where_kw(case)
  masked = _ce_value_and_grads(a, kw, ("logits",))
  # the same with -inf logits in place of the mask
  neg_inf = dict(a, logits=jnp.where(a["where"], a["logits"], -jnp.inf), where=None)
  return masked, _ce_value_and_grads(neg_inf, kw, ("logits",))


@pytest.mark.parametrize(("reduction", "label_smoothing", "layout"), WHERE_CASES)
def test_cross_entropy_int_where(reduction, label_smoothing, layout):
  case = (reduction, label_smoothing, layout)
  a, ((loss, grads), (loss_inf, grads_inf)) = _grouped(
      "where", WHERE_CASES, _where_make, _where_compute)[case]
  kw = _where_kw(case)
  x, y, w, where = a["logits"], a["labels"], a["weight"], a["where"]
  _close(loss, ref.cross_entropy_int(x, y, weight=w, where=where, **kw))
  _close(grads["logits"], ref.cross_entropy_int_grad(x, y, weight=w, where=where, cot=a["cot"],
                                                     **kw))
  assert not np.any(grads["logits"][~where])
  if reduction == "none":
    assert float(loss.reshape(-1)[0]) == 0.0
  # -inf logits behave exactly like masked classes.
  _close(loss_inf, np.float64(loss), rtol=1e-6)
  _close(grads_inf["logits"], np.float64(grads["logits"]), rtol=1e-6)


PROB_WHERE_CASES = [0.0, 0.2]


def _prob_where_make(eps):
  shape, axis = LAYOUTS["kdim"]
  rng = _rng("prob-where", eps)
  return dict(logits=_normal(rng, shape), where=_mask(rng, shape, axis),
              labels=_prob_targets(rng, shape, axis),  # some mass on masked classes too
              weight=_weight(rng, True), cot=_cot(rng, _positions(shape, axis), "none"))


@pytest.mark.parametrize("label_smoothing", PROB_WHERE_CASES)
def test_cross_entropy_prob_where(label_smoothing):
  kw = dict(reduction="none", label_smoothing=label_smoothing, axis=1)
  a, (loss, grads) = _grouped(
      "prob-where", PROB_WHERE_CASES, _prob_where_make,
      lambda eps, a: _ce_value_and_grads(a, dict(kw, label_smoothing=eps),
                                         ("logits", "labels")))[label_smoothing]
  x, t, w, where = a["logits"], a["labels"], a["weight"], a["where"]
  _close(loss, ref.cross_entropy_prob(x, t, weight=w, where=where, **kw))
  e_x, e_t = ref.cross_entropy_prob_grad(x, t, weight=w, where=where, cot=a["cot"], **kw)
  _close(grads["logits"], e_x)
  _close(grads["labels"], e_t)
  assert float(loss.reshape(-1)[0]) == 0.0  # position 0 has no class left


@jax.jit
def _misc_equalities(x4, y4, w, x_sub, where_sub, labels, one_hot):
  """Pairs that must agree: each is (a, b)."""
  pairs = {
      # axis=1 on [N, C, d1, d2] equals axis=-1 after moving the classes last
      "axis1-vs-moved": (
          jaxce.cross_entropy(x4, y4, axis=1, reduction="none", label_smoothing=0.1),
          jaxce.cross_entropy(jnp.moveaxis(x4, 1, -1), y4, reduction="none",
                              label_smoothing=0.1)),
      # smoothing under a mask equals smoothing over the active sub-array
      "mask-vs-sub-array": (
          jaxce.cross_entropy(x_sub, jnp.asarray([2]), where=where_sub, label_smoothing=0.3),
          jaxce.cross_entropy(x_sub[:, jnp.asarray([0, 2, 3, 5])], jnp.asarray([1]),
                              label_smoothing=0.3)),
  }
  for red in ref.REDUCTIONS:
    pairs[f"nll-of-log-softmax-{red}"] = (
        jaxce.nll_loss(jaxce.log_softmax(x4, axis=1), y4, weight=w, reduction=red, axis=1),
        jaxce.cross_entropy(x4, y4, weight=w, reduction=red, axis=1))
    for eps in (0.0, 0.2):
      pairs[f"one-hot-{red}-{eps}"] = (
          jaxce.cross_entropy(x4, labels, reduction=red, label_smoothing=eps, axis=1),
          jaxce.cross_entropy(x4, one_hot, reduction=red, label_smoothing=eps, axis=1))
  return pairs


def test_equivalent_formulations():
  rng = np.random.default_rng(2)
  x4 = _normal(rng, (4, C, 2, 3))
  y4 = _int_labels(rng, (4, 2, 3), -100)
  labels = rng.integers(0, C, size=(4, 2, 3)).astype(np.int32)
  one_hot = np.moveaxis(np.eye(C, dtype=np.float32)[labels], -1, 1)
  where_sub = np.array([[True, False, True, True, False, True]])
  pairs = _misc_equalities(x4, y4, _weight(rng, True), _normal(rng, (1, 6)), where_sub, labels,
                           one_hot)
  for name, (a, b) in pairs.items():
    np.testing.assert_allclose(np.float64(a), np.float64(b), rtol=1e-6, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------
# log_softmax / logsumexp

LSM_CASES = list(itertools.product([-1, 1, 0], [False, True]))


def _lsm_make(case):
  axis, use_where = case
  rng = _rng("lsm", *case)
  x = _normal(rng, (4, 5, 6), 3.0)
  where = None
  if use_where:
    where = rng.random((4, 5, 6)) < 0.7
    np.moveaxis(where, axis, -1)[..., 0] = True
  act = np.isfinite(ref.log_softmax(x, axis=axis, where=where))
  return dict(x=x, where=where,
              cot=np.where(act, rng.normal(size=x.shape), 0.0).astype(np.float32),
              lcot=rng.normal(size=np.sum(x, axis=axis).shape).astype(np.float32))


def _lsm_compute(case, a):
  axis = case[0]
  out, vjp = jax.vjp(lambda v: jaxce.log_softmax(v, axis=axis, where=a["where"]), a["x"])
  lse, vjp2 = jax.vjp(lambda v: jaxce.logsumexp(v, axis=axis, where=a["where"]), a["x"])
  return out, vjp(a["cot"])[0], lse, vjp2(a["lcot"])[0]


@pytest.mark.parametrize(("axis", "use_where"), LSM_CASES)
def test_log_softmax_and_logsumexp(axis, use_where):
  a, (out, g, lse, g_lse) = _grouped("lsm", LSM_CASES, _lsm_make, _lsm_compute)[
      (axis, use_where)]
  x, where = a["x"], a["where"]
  expected = ref.log_softmax(x, axis=axis, where=where)
  act = np.isfinite(expected)
  assert out.dtype == np.float32
  assert lse.dtype == np.float32
  assert np.array_equal(np.isfinite(out), act)
  assert np.all(out[~act] == -np.inf)
  _close(out[act], expected[act])
  _close(g, ref.log_softmax_vjp(x, a["cot"], axis=axis, where=where))
  _close(lse, ref.logsumexp(x, axis=axis, where=where))
  _close(g_lse, ref.logsumexp_vjp(x, a["lcot"], axis=axis, where=where))


@jax.jit
def _all_masked_row(x, where, cot):
  out, vjp = jax.vjp(lambda v: jaxce.log_softmax(v, where=where), x)
  lse, vjp2 = jax.vjp(lambda v: jaxce.logsumexp(v, where=where), x)
  large = jnp.asarray([[1e4, -1e4, 0.0, 5e3], [-3e4, -3e4, -3e4, -3e4]], jnp.float32)
  return out, vjp(cot)[0], lse, vjp2(jnp.ones((2,), jnp.float32))[0], jaxce.log_softmax(large)


def test_row_with_every_class_masked():
  x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  where = np.array([[True, True], [False, False]])
  cot = np.array([[1.0, -1.0], [0.0, 0.0]], np.float32)
  out, g, lse, g_lse, large = jax.device_get(_all_masked_row(x, where, cot))
  # logsumexp: -inf, zero gradient
  assert lse[1] == -np.inf
  _close(lse[0], ref.logsumexp(x[0]))
  _close(g_lse, np.array([ref.logsumexp_vjp(x[0], np.float64(1.0)), [0.0, 0.0]]))
  # large magnitudes, no masking
  _close(large, ref.log_softmax(np.array([[1e4, -1e4, 0.0, 5e3], [-3e4, -3e4, -3e4, -3e4]])),
         atol=1e-3)
  # log_softmax: documented as "a row with no class left is all -inf"
  _close(out[0], ref.log_softmax(x[0]))
  _close(g, np.array([ref.log_softmax_vjp(x[0], cot[0]), [0.0, 0.0]]))
  np.testing.assert_array_equal(out[1], [-np.inf, -np.inf])


# ---------------------------------------------------------------------------
# dtypes


@jax.jit
def _all_losses(x, labels, t):
  """Values and gradients of every loss, for the dtype tests."""
  return dict(
      ce_int=jax.value_and_grad(
          lambda v: jaxce.cross_entropy(v, labels, label_smoothing=0.1, z_loss=0.1))(x),
      ce_prob=jax.value_and_grad(lambda v, t: jaxce.cross_entropy(v, t), (0, 1))(x, t),
      bce=jax.value_and_grad(
          lambda v, t: jaxce.binary_cross_entropy_with_logits(v, t), (0, 1))(x, t),
      nll=jax.value_and_grad(lambda v: jaxce.nll_loss(v, labels))(x),
      log_softmax=jaxce.log_softmax(x),
      logsumexp=jaxce.logsumexp(x),
  )


def _check_all_losses(x, labels, t, x64, t64, tol, gtol):
  dtype = x.dtype
  out = _all_losses(x, labels, t)
  loss_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  kw = dict(label_smoothing=0.1, z_loss=0.1)

  loss, g = out["ce_int"]
  assert loss.dtype == loss_dtype
  assert g.dtype == dtype
  _close(loss, ref.cross_entropy_int(x64, labels, **kw), **tol)
  _close(g, ref.cross_entropy_int_grad(x64, labels, **kw), **gtol)

  loss, (g, gt) = out["ce_prob"]
  assert loss.dtype == loss_dtype
  assert g.dtype == dtype
  assert gt.dtype == dtype
  _close(loss, ref.cross_entropy_prob(x64, t64), **tol)
  e_x, e_t = ref.cross_entropy_prob_grad(x64, t64)
  _close(g, e_x, **gtol)
  _close(gt, e_t, **gtol)

  loss, (g, gt) = out["bce"]
  assert loss.dtype == loss_dtype
  assert g.dtype == dtype
  assert gt.dtype == dtype
  _close(loss, ref.bce_with_logits(x64, t64), **tol)
  e_x, e_t = ref.bce_with_logits_grad(x64, t64)
  _close(g, e_x, **gtol)
  _close(gt, e_t, **gtol)

  loss, g = out["nll"]
  assert loss.dtype == loss_dtype
  assert g.dtype == dtype
  _close(loss, ref.nll_loss(x64, labels), **tol)
  _close(g, ref.nll_loss_grad(x64, labels), **gtol)

  assert out["log_softmax"].dtype == dtype
  assert out["logsumexp"].dtype == dtype
  _close(out["log_softmax"], ref.log_softmax(x64), **gtol)
  _close(out["logsumexp"], ref.logsumexp(x64), **gtol)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_losses_are_float32(dtype):
  """Losses are reduced in float32 from the rounded half-precision inputs;
  gradients and log_softmax come back in the input dtype."""
  rng = np.random.default_rng(20)
  x = jnp.asarray(rng.normal(size=(6, C)), dtype)
  t = jnp.asarray(_prob_targets(rng, (6, C), -1), dtype)
  labels = jnp.asarray(_int_labels(rng, (6,), -100))
  x64 = np.asarray(x, np.float64)  # the rounded inputs
  t64 = np.asarray(t, np.float64)
  _check_all_losses(x, labels, t, x64, t64, dict(rtol=1e-5, atol=1e-6),
                    dict(rtol=2e-2, atol=2e-2))


def test_float64_losses_are_float64():
  rng = np.random.default_rng(21)
  x64 = rng.normal(size=(6, C))
  t64 = _prob_targets(rng, (6, C), -1).astype(np.float64)
  labels = jnp.asarray(_int_labels(rng, (6,), -100))
  with jax.enable_x64(True):
    tight = dict(rtol=1e-12, atol=1e-14)
    _check_all_losses(jnp.asarray(x64, jnp.float64), labels, jnp.asarray(t64, jnp.float64),
                      x64, t64, tight, tight)
