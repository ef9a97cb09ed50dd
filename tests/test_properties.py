"""Properties over random inputs (hypothesis, small fixed shapes so that every
example reuses a few compiled programs), and consistency of the losses under
jax.vmap and with or without jax.jit."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import jaxce

# Hypothesis properties: opt-in (`pytest -m slow`, which .ci/run runs) to keep the default
# suite within its 5-minute budget on 2 cores.
pytestmark = pytest.mark.slow

N, C = 6, 5
SETTINGS = settings(max_examples=25, deadline=None)


class Out(NamedTuple):
  none: jax.Array
  sum: jax.Array
  mean: jax.Array
  grad: jax.Array  # of the "sum" w.r.t. the logits


@functools.partial(jax.jit, static_argnames=("label_smoothing", "z_loss"))
def _ce(x, labels, weight=None, **kw):
  """Every reduction and the gradient in one program: one compilation per
  static option set, label kind and weight presence, reused by all examples."""
  f = lambda x, reduction: jaxce.cross_entropy(x, labels, weight=weight, reduction=reduction, **kw)
  return Out(f(x, "none"), f(x, "sum"), f(x, "mean"), jax.grad(f)(x, "sum"))


@jax.jit
def _nll(x, labels, weight=None):
  f = lambda x, r: jaxce.nll_loss(jaxce.log_softmax(x), labels, weight=weight, reduction=r)
  return Out(f(x, "none"), f(x, "sum"), f(x, "mean"), jax.grad(f)(x, "sum"))


@jax.jit
def _bce(x, t, pos_weight=None):
  f = lambda x, r: jaxce.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight, reduction=r)
  return Out(f(x, "none"), f(x, "sum"), f(x, "mean"), jax.grad(f)(x, "sum"))


def _f32(lo, hi):
  return st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False)


logits_st = arrays(np.float32, (N, C), elements=_f32(-30, 30))
# Labels in [0, C), with -1 standing for ignore_index=-100.
labels_st = arrays(np.int32, (N,), elements=st.integers(-1, C - 1)).map(
    lambda y: np.where(y < 0, -100, y).astype(np.int32))
valid_labels_st = arrays(np.int32, (N,), elements=st.integers(0, C - 1))
weight_st = st.none() | arrays(np.float32, (C,), elements=_f32(0.125, 3.0))
targets_st = arrays(np.float32, (N, C), elements=_f32(0.0, 1.0))
smoothing_st = st.sampled_from([0.0, 0.1, 1.0])
z_st = st.sampled_from([0.0, 1e-3])


def _w(w):
  return None if w is None else jnp.asarray(w)


# ---------------------------------------------------------------------------
# Non-negativity.


@SETTINGS
@given(logits_st, labels_st, weight_st, smoothing_st, z_st)
def test_integer_target_loss_nonnegative(x, y, w, eps, z):
  out = _ce(x, y, _w(w), label_smoothing=eps, z_loss=z)
  per = np.asarray(out.none)
  assert np.all(per >= 0), per
  assert np.all(per[y == -100] == 0)
  assert float(out.mean) >= 0


@SETTINGS
@given(logits_st, targets_st, weight_st, smoothing_st, z_st)
def test_probability_target_loss_nonnegative(x, t, w, eps, z):
  per = np.asarray(_ce(x, t, _w(w), label_smoothing=eps, z_loss=z).none)
  # The loss is mass * lse - sum_c w_c t_c x_c: when it is ~0 (targets on
  # the argmax class), float32 cancellation leaves a few ulps of lse either
  # side of 0. Known limitation, noted on the issue.
  assert np.all(per >= -4 * np.finfo(np.float32).eps * (1 + np.abs(np.asarray(x)).max())), per


def _zero_some(t, z):
  # Subnormal targets are 0 to XLA:CPU, which flushes them.
  return np.where(z | (t < np.finfo(np.float32).tiny), 0.0, t).astype(np.float32)


# Class weights of which some are 0 (a class that takes no part).
weight_or_zero_st = st.none() | st.tuples(
    arrays(np.float32, (C,), elements=_f32(0.125, 3.0)), arrays(np.bool_, (C,))).map(
        lambda wz: np.where(wz[1], 0.0, wz[0]).astype(np.float32))


@SETTINGS
@given(logits_st, arrays(np.bool_, (N, C)), st.lists(st.integers(0, N - 1), max_size=N),
       targets_st.flatmap(lambda t: arrays(np.bool_, (N, C)).map(lambda z: _zero_some(t, z))),
       weight_or_zero_st, smoothing_st, z_st)
def test_probability_targets_with_neg_inf_logits(x, neg_inf, dead_rows, t, w, eps, z):
  """-inf logits anywhere, whole rows of them included, targets with zeros
  and class weights with zeros: the per-position loss is
  -sum_c w_c q_c log_softmax(x)_c, q = (1 - eps) t + eps / K on the K
  classes of finite logit, with the terms of w_c q_c = 0 left out (float64;
  a row of all -inf logits has log_softmax -inf everywhere), so +inf
  wherever weighted target mass meets a -inf logit (never at eps = 1) and 0
  on a row with no class and no mass; plus the z-loss on rows with a class.
  No NaN, and the gradient is finite everywhere."""
  x = np.where(neg_inf, -np.inf, x).astype(np.float32)
  x[dead_rows] = -np.inf
  out = _ce(x, t, _w(w), label_smoothing=eps, z_loss=z)
  x64, t64 = x.astype(np.float64), t.astype(np.float64)
  wc = np.ones(C) if w is None else np.asarray(w, np.float64)
  live = np.isfinite(x64).any(-1)
  active = np.isfinite(x64)
  k = np.maximum(active.sum(-1, keepdims=True), 1)
  q = (1.0 - eps) * t64 + np.where(active, eps / k, 0.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    m = np.where(live, x64.max(-1), 0.0)
    lse = m + np.log(np.exp(x64 - m[:, None]).sum(-1))
    logp = np.where(live[:, None], x64 - lse[:, None], -np.inf)
    # A weighted mass below float32's smallest normal (e.g. a target of
    # 1.2e-38 times a weight of 0.5) is 0 to XLA:CPU, which flushes it.
    wq = np.where(wc * q < np.finfo(np.float32).tiny, 0.0, wc * q)
    terms = np.where(wq > 0, -wq * logp, 0.0)
    ref = terms.sum(-1) + np.where(live, z * lse**2, 0.0)  # z * inf**2 off live rows
  per = np.asarray(out.none, np.float64)
  assert not np.any(np.isnan(per)), per
  np.testing.assert_array_equal(np.isinf(per), np.isinf(ref))
  fin = np.isfinite(ref)
  np.testing.assert_allclose(per[fin], ref[fin], rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(out.grad)))


@SETTINGS
@given(logits_st, targets_st, st.none() | arrays(np.float32, (C,), elements=_f32(0.0, 4.0)))
def test_bce_nonnegative(x, t, pw):
  per = np.asarray(_bce(x, t, _w(pw)).none)
  assert np.all(per >= 0), per


@SETTINGS
@given(logits_st, labels_st)
def test_nll_of_log_softmax_nonnegative(x, y):
  per = np.asarray(_nll(x, y).none)
  assert np.all(per >= 0), per


# ---------------------------------------------------------------------------
# Invariance to adding a constant to every logit of a position (no z-loss).

shift_st = arrays(np.float32, (N, 1), elements=_f32(-50, 50))


@SETTINGS
@given(logits_st, labels_st, weight_st, smoothing_st, shift_st)
def test_shift_invariance_integer_targets(x, y, w, eps, c):
  xs = (x + c).astype(np.float32)
  a = _ce(x, y, _w(w), label_smoothing=eps)
  b = _ce(xs, y, _w(w), label_smoothing=eps)
  # Float32 rounding of x + c is up to ~4e-6 per logit at |x + c| <= 80.
  np.testing.assert_allclose(a.none, b.none, rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(a.grad, b.grad, atol=1e-4)
  np.testing.assert_allclose(_nll(x, y).none, _nll(xs, y).none, rtol=1e-4, atol=2e-4)


@SETTINGS
@given(logits_st, targets_st, weight_st, smoothing_st, shift_st)
def test_shift_invariance_probability_targets(x, t, w, eps, c):
  xs = (x + c).astype(np.float32)
  a = _ce(x, t, _w(w), label_smoothing=eps)
  b = _ce(xs, t, _w(w), label_smoothing=eps)
  # mass * lse - sum(w q x) cancels terms up to ~C * 3 * 80.
  np.testing.assert_allclose(a.none, b.none, rtol=1e-4, atol=2e-3)
  np.testing.assert_allclose(a.grad, b.grad, atol=1e-4)


# ---------------------------------------------------------------------------
# Gradient rows sum to 0 (without z-loss): softmax gradients are orthogonal to
# a constant shift.


@SETTINGS
@given(logits_st, labels_st, weight_st, smoothing_st)
def test_integer_target_gradient_rows_sum_to_zero(x, y, w, eps):
  g = np.asarray(_ce(x, y, _w(w), label_smoothing=eps).grad, np.float64)
  scale = 1.0 + np.abs(g).max()
  np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-5 * scale)
  assert np.all(g[y == -100] == 0)


@SETTINGS
@given(logits_st, targets_st, weight_st, smoothing_st)
def test_probability_target_gradient_rows_sum_to_zero(x, t, w, eps):
  g = np.asarray(_ce(x, t, _w(w), label_smoothing=eps).grad, np.float64)
  scale = 1.0 + np.abs(g).max()
  np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-5 * scale)


# ---------------------------------------------------------------------------
# label_smoothing=1 is cross-entropy against the uniform distribution.


@SETTINGS
@given(logits_st, valid_labels_st, weight_st, targets_st)
def test_full_smoothing_is_uniform_target(x, y, w, t):
  uniform = np.full((N, C), 1.0 / C, np.float32)
  want = _ce(x, uniform, _w(w), label_smoothing=0.0)
  got = _ce(x, y, _w(w), label_smoothing=1.0)
  np.testing.assert_allclose(got.none, want.none, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.grad, want.grad, rtol=1e-5, atol=1e-6)
  # For probability targets too, whatever the targets.
  got = _ce(x, t, _w(w), label_smoothing=1.0)
  np.testing.assert_allclose(got.none, want.none, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.grad, want.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Second derivatives: Hessian-vector products against the closed form.


@functools.partial(jax.jit, static_argnames=("label_smoothing", "z_loss"))
def _hvps(x, labels, weight, v, **kw):
  """Reverse over reverse and forward over reverse."""
  f = lambda x: jaxce.cross_entropy(x, labels, weight=weight, **kw)
  return (jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), v))(x),
          jax.jvp(jax.grad(f), (x,), (v,))[1])


def _hvp_reference(x, y, w, v, eps, z):
  """float64 H v of the mean loss: per kept row, the softmax's Jacobian
  (diag(p) - p p^T) times the coefficient of the row's log-sum-exp, plus
  z-loss's 2 z (p p^T + lse (diag(p) - p p^T)); over PyTorch's denominator."""
  x, v = x.astype(np.float64), v.astype(np.float64)
  ww = np.ones(C) if w is None else w.astype(np.float64)
  valid = y != -100
  den = np.sum(np.where(valid, ww[np.clip(y, 0, C - 1)], 0.0))
  if den == 0:
    return np.zeros_like(x)
  m = x.max(-1, keepdims=True)
  lse = m + np.log(np.exp(x - m).sum(-1, keepdims=True))
  p = np.exp(x - lse)
  jv = p * v - p * (p * v).sum(-1, keepdims=True)
  coef = (1 - eps) * ww[np.clip(y, 0, C - 1)] + eps * ww.sum() / C
  h = coef[:, None] * jv + 2 * z * (p * (p * v).sum(-1, keepdims=True) + lse * jv)
  return np.where(valid[:, None], h, 0.0) / den


@SETTINGS
@given(arrays(np.float32, (N, C), elements=_f32(-300, 300)), labels_st, weight_st,
       arrays(np.float32, (N, C), elements=_f32(-1, 1)), smoothing_st, z_st)
def test_second_derivatives_match_the_closed_form(x, y, w, v, eps, z):
  # Spreads past float32's exp range: on CPU, where the sum relative to the
  # label's logit overflows, the batch is redone at the max (a lax.cond),
  # and reverse over reverse once gave NaN there.
  want = _hvp_reference(x, y, w, v, eps, z)
  for got in _hvps(x, y, _w(w), v, label_smoothing=eps, z_loss=z):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4,
                               atol=1e-5 * max(1.0, np.abs(want).max()))


# ---------------------------------------------------------------------------
# Reductions agree with each other.


def _denominator(y, w):
  ww = np.ones(C) if w is None else w.astype(np.float64)
  return np.sum(np.where(y != -100, ww[np.clip(y, 0, C - 1)], 0.0))


@SETTINGS
@given(logits_st, labels_st, weight_st, smoothing_st, z_st)
def test_reduction_consistency_integer_targets(x, y, w, eps, z):
  denom = _denominator(y, w)
  for out in (_ce(x, y, _w(w), label_smoothing=eps, z_loss=z), _nll(x, y, _w(w))):
    per = np.asarray(out.none, np.float64)
    np.testing.assert_allclose(float(out.sum), per.sum(), rtol=1e-5, atol=1e-5)
    want = 0.0 if denom == 0 else per.sum() / denom
    np.testing.assert_allclose(float(out.mean), want, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(logits_st, targets_st, weight_st, smoothing_st, z_st)
def test_reduction_consistency_probability_targets_and_bce(x, t, w, eps, z):
  for out in (_ce(x, t, _w(w), label_smoothing=eps, z_loss=z), _bce(x, t, _w(w))):
    per = np.asarray(out.none, np.float64)
    np.testing.assert_allclose(float(out.sum), per.sum(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(out.mean), per.mean(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# vmap over an extra leading batch axis equals a Python loop; jit equals eager.

B = 3


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, N, C)) * 3, jnp.float32)
  y = rng.integers(0, C, size=(B, N))
  y[0, 1] = y[2, :] = -100  # batch element 2 all ignored
  t = jnp.asarray(rng.dirichlet(np.ones(C), size=(B, N)), jnp.float32)
  where = rng.uniform(size=(B, N, C)) > 0.3
  where[np.arange(B)[:, None], np.arange(N)[None, :], np.clip(y, 0, None)] = True
  w = jnp.linspace(0.5, 2.0, C, dtype=jnp.float32)
  return x, jnp.asarray(y, jnp.int32), t, jnp.asarray(where), w


VMAP_CASES = {
    "ce_int_all_options": lambda x, y, t, m, w: jaxce.cross_entropy(
        x, y, weight=w, label_smoothing=0.1, z_loss=1e-3, where=m),
    "ce_int_axis0_none": lambda x, y, t, m, w: jaxce.cross_entropy(
        x.T, y, axis=0, weight=w, reduction="none"),
    "ce_probs": lambda x, y, t, m, w: jaxce.cross_entropy(
        x, t, weight=w, label_smoothing=0.2, z_loss=1e-3, where=m),
    "nll": lambda x, y, t, m, w: jaxce.nll_loss(jaxce.log_softmax(x, where=m), y, weight=w),
    "bce": lambda x, y, t, m, w: jaxce.binary_cross_entropy_with_logits(
        x, t, weight=m.astype(jnp.float32), pos_weight=w),
}


def _value_and_grads(fn):
  """The loss and its gradients w.r.t. logits, targets and weight."""
  loss = lambda x, y, t, m, w: jnp.sum(fn(x, y, t, m, w))
  return lambda *a: (fn(*a), jax.grad(loss, (0, 2, 4))(*a))


@pytest.mark.parametrize("fn", VMAP_CASES.values(), ids=VMAP_CASES.keys())
def test_vmap_equals_loop(fn):
  x, y, t, m, w = _batch()
  vg = _value_and_grads(fn)
  got = jax.jit(jax.vmap(vg, (0, 0, 0, 0, None)))(x, y, t, m, w)
  one = jax.jit(vg)  # compiled once, run per batch element
  want = [one(x[i], y[i], t[i], m[i], w) for i in range(B)]
  want = jax.tree.map(lambda *a: jnp.stack(a), *want)
  # The weight is shared: vmap returns its gradient per batch element.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


def test_vmap_all_ignored_element_and_batched_weight():
  x, y, _, _, w = _batch()
  ws = jnp.stack([w, w[::-1], jnp.ones_like(w)])
  f = lambda x, y, w: jaxce.cross_entropy(x, y, weight=w, label_smoothing=0.1)
  vg = jax.value_and_grad(f, (0, 2))
  loss, (gx, gw) = jax.jit(jax.vmap(vg))(x, y, ws)
  assert float(loss[2]) == 0.0  # batch element 2 is all ignored
  assert np.all(np.asarray(gx[2]) == 0)
  assert np.all(np.asarray(gw[2]) == 0)
  one = jax.jit(vg)
  for i in range(B):
    li, (gxi, gwi) = one(x[i], y[i], ws[i])
    np.testing.assert_allclose(loss[i], li, rtol=2e-6)
    np.testing.assert_allclose(gx[i], gxi, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(gw[i], gwi, rtol=2e-6, atol=1e-7)
  # vmap over the position axis (1) of (B, N, C) logits: per-position losses.
  got = jax.vmap(lambda x, y: jaxce.cross_entropy(x, y, reduction="sum"), (1, 1))(x, y)
  want = jaxce.cross_entropy(x, y, reduction="none").sum(0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


JIT_CASES = {k: VMAP_CASES[k] for k in ("ce_int_all_options", "ce_probs", "bce")}


@pytest.mark.parametrize("fn", JIT_CASES.values(), ids=JIT_CASES.keys())
def test_jit_equals_eager(fn):
  xb, yb, tb, mb, w = _batch(1)
  args = (xb[0], yb[0], tb[0], mb[0], w)
  vg = _value_and_grads(fn)
  eager, jitted = vg(*args), jax.jit(vg)(*args)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
