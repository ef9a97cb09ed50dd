"""`binary_cross_entropy` (probabilities) against a float64 NumPy transcription
of PyTorch's documented formula and of its backward (aten's
binary_cross_entropy_backward and _target_backward), at the edges p = 0 and 1
where the -100 clamp and the 1e-12 floor act, in every dtype, under jit, vmap,
forward and reverse mode, with the residual promise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from residuals import saved_residuals

import jaxce

BCE = jaxce.binary_cross_entropy

# Probabilities at the edges and inside; targets hard and soft.
P_EDGES = np.array([0.0, 1.0, 1e-30, 1e-7, 0.5, 1 - 1e-7, 0.25, 0.9, 0.999, 3e-3])
T_EDGES = np.array([0.0, 1.0, 0.5, 0.3, 1.0, 0.0, 0.75, 0.1, 1.0, 0.6])


def _reference(p, t, w, reduction):
  """PyTorch's forward and backward in float64 NumPy: (loss, dL/dp, dL/dt,
  dL/dw) for a cotangent of ones."""
  p, t = np.asarray(p, np.float64), np.asarray(t, np.float64)
  w = np.ones_like(p) if w is None else np.broadcast_to(np.asarray(w, np.float64), p.shape)
  with np.errstate(divide="ignore"):
    log_p = np.maximum(np.log(p), -100.0)
    log_not_p = np.maximum(np.log1p(-p), -100.0)
    elementwise = (t - 1.0) * log_not_p - t * log_p
    d_p = (p - t) / np.maximum(p * (1.0 - p), float(np.float32(1e-12)))
    d_t = np.log1p(-p) - np.log(p)
  scale = 1.0 / p.size if reduction == "mean" else 1.0
  loss = w * elementwise
  if reduction != "none":
    loss = loss.sum() * scale
  return loss, w * d_p * scale, w * d_t * scale, elementwise * scale


def _grid(shape=(2, 5)):
  rng = np.random.default_rng(0)
  n = int(np.prod(shape))
  p = np.concatenate([P_EDGES, rng.random(n)])[:n].reshape(shape)
  t = np.concatenate([T_EDGES, rng.random(n)])[:n].reshape(shape)
  return p, t


WEIGHTS = {"none": None, "scalar": np.float64(0.5), "per-column": np.linspace(0.5, 2, 5),
           "per-row": np.array([[2.0], [0.25]]), "full": np.linspace(0.1, 1, 10).reshape(2, 5)}


def _value_and_grads(reduction, with_weight):
  def f(p, t, w):
    loss = BCE(p, t, weight=w if with_weight else None, reduction=reduction)
    return jnp.sum(loss)
  argnums = (0, 1, 2) if with_weight else (0, 1)
  return jax.jit(jax.value_and_grad(f, argnums))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weight", WEIGHTS, ids=WEIGHTS)
def test_matches_pytorch_formula_float64(reduction, weight):
  with jax.enable_x64(True):
    p, t = _grid()
    w = WEIGHTS[weight]
    loss, *grads = _value_and_grads(reduction, w is not None)(p, t, w)[:2]
    grads = grads[0]
    ref_loss, ref_p, ref_t, ref_w = _reference(p, t, w, reduction)
    np.testing.assert_allclose(loss, np.sum(ref_loss), rtol=1e-12)
    np.testing.assert_allclose(grads[0], ref_p, rtol=1e-12)
    np.testing.assert_allclose(grads[1], ref_t, rtol=1e-12)  # +-inf at p = 0, 1
    if w is not None:
      # dL/dw: the elementwise loss, summed over the axes w is broadcast along.
      np.testing.assert_allclose(grads[2], _unbroadcast(ref_w, np.shape(w)), rtol=1e-12)


def _unbroadcast(x, shape):
  while x.ndim > len(shape):
    x = x.sum(axis=0)
  for i, n in enumerate(shape):
    if n == 1:
      x = x.sum(axis=i, keepdims=True)
  return x


def test_edges_are_finite_like_pytorch():
  p = jnp.asarray([0.0, 1.0, 0.0, 1.0])
  t = jnp.asarray([1.0, 0.0, 0.0, 1.0])
  np.testing.assert_array_equal(BCE(p, t, reduction="none"), [100.0, 100.0, 0.0, 0.0])
  g = jax.grad(BCE)(p, t)
  # 1 / float32(1e-12), to 1e-6
  np.testing.assert_allclose(g, np.array([-1e12, 1e12, 0.0, 0.0]) / 4, rtol=1e-6)


def test_float32_subnormal_probability_is_zero_on_cpu():
  """differences.md: XLA:CPU flushes subnormals, so p = 1e-40 is p = 0 (a
  loss of 100 where PyTorch's -log(p) is 92.1), with the same gradient; a
  normal p just above keeps its log."""
  p = jnp.asarray([1e-40, 1.2e-38], jnp.float32)
  t = jnp.ones(2, jnp.float32)
  np.testing.assert_allclose(BCE(p, t, reduction="none"), [100.0, -np.log(1.2e-38)], rtol=1e-6)
  np.testing.assert_allclose(jax.grad(BCE)(p, t)[0], -1e12 / 2, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes(dtype):
  """float32 loss for half inputs, matching the float64 formula on the
  rounded inputs; float32 within a few ulps."""
  p, t = _grid()
  p_in, t_in = jnp.asarray(p, dtype), jnp.asarray(t, dtype)
  loss = jax.jit(lambda p, t: BCE(p, t, reduction="none"))(p_in, t_in)
  assert loss.dtype == jnp.float32
  ref = _reference(np.asarray(p_in.astype(jnp.float32)), np.asarray(t_in.astype(jnp.float32)),
                   None, "none")[0]
  np.testing.assert_allclose(loss, ref, rtol=3e-6, atol=1e-6)
  g = jax.jit(jax.grad(BCE))(p_in, t_in)
  assert g.dtype == dtype


def test_float64_loss_and_mixed_precision():
  with jax.enable_x64(True):
    p, t = _grid()
    assert BCE(jnp.asarray(p), jnp.asarray(t)).dtype == jnp.float64
    # float64 targets with float32 probs: computed (and returned) in float64
    assert BCE(jnp.asarray(p, jnp.float32), jnp.asarray(t)).dtype == jnp.float64


def test_jit_eager_vmap_agree():
  p, t = (jnp.asarray(a, jnp.float32) for a in _grid((3, 5)))
  w = jnp.linspace(0.5, 1.5, 5, dtype=jnp.float32)
  eager = jnp.stack([BCE(p[i], t[i], weight=w) for i in range(3)])
  batched = jax.jit(jax.vmap(lambda p, t: BCE(p, t, weight=w)))(p, t)
  np.testing.assert_allclose(batched, eager, rtol=1e-6)


def test_forward_and_reverse_mode():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    p = jnp.asarray(rng.uniform(0.05, 0.95, (2, 3)))
    t = jnp.asarray(rng.uniform(0, 1, (2, 3)))
    w = jnp.asarray(rng.uniform(0.5, 2, (3,)))
    f = lambda p, t, w: BCE(p, t, weight=w)
    check_grads(f, (p, t, w), order=1, modes=("fwd", "rev"))
    check_grads(f, (p, t, w), order=2, modes=("fwd", "rev"))
    check_grads(lambda p, t: BCE(p, t, reduction="none"), (p, t), order=2, modes=("fwd", "rev"))
    # jvp agrees with the gradient, and jacfwd with jacrev, also at the edges
    pe, te = (jnp.asarray(a) for a in _grid())
    tangent = jnp.asarray(rng.normal(size=pe.shape))
    _, jvp = jax.jvp(lambda p: BCE(p, te), (pe,), (tangent,))
    np.testing.assert_allclose(jvp, jnp.sum(jax.grad(BCE)(pe, te) * tangent), rtol=1e-12)
    g = lambda p: BCE(p, te, reduction="none")
    np.testing.assert_allclose(jax.jacfwd(g)(pe), jax.jacrev(g)(pe), rtol=1e-12)


def test_residuals_are_the_inputs():
  p, t = (jnp.asarray(a, jnp.bfloat16) for a in _grid())
  res = saved_residuals(lambda p, t: BCE(p, t), p, t)
  big = [r for r in res if r[1] == p.shape]
  assert [(d, s) for d, s, _ in big] == [("bf16", p.shape)] * 2, res
  assert all("argument" in origin for _, _, origin in big), res


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=1, max_size=6), st.floats(0, 1))
def test_agrees_with_the_logits_version(xs, target):
  """On sigmoid(x) for moderate x the two losses agree (float64)."""
  with jax.enable_x64(True):
    x = jnp.asarray(xs, jnp.float64)
    t = jnp.full(x.shape, target, jnp.float64)
    np.testing.assert_allclose(BCE(jax.nn.sigmoid(x), t),
                               jaxce.binary_cross_entropy_with_logits(x, t), rtol=1e-9)
    assert float(BCE(jax.nn.sigmoid(x), t)) >= 0.0


@pytest.mark.parametrize(("args", "kwargs", "exc", "fragments"), [
    ((jnp.ones(3), jnp.ones(3, jnp.int32)), {}, TypeError, ["targets", "int32", "[0, 1]"]),
    ((jnp.ones(3), jnp.ones(3, bool)), {}, TypeError, ["targets", "bool"]),
    ((jnp.ones(3, jnp.int32), jnp.ones(3)), {}, TypeError, ["probs", "int32"]),
    ((jnp.ones(3), jnp.ones(4)), {}, ValueError, ["targets", "(3,)", "(4,)"]),
    ((jnp.ones((2, 3)), jnp.ones(3)), {}, ValueError, ["targets", "(2, 3)", "(3,)"]),
    ((jnp.ones(3), jnp.ones(3)), {"weight": jnp.ones(2)}, ValueError, ["weight", "(3,)", "(2,)"]),
    ((jnp.ones(3), jnp.ones(3)), {"weight": jnp.ones(3, jnp.int32)}, TypeError, ["weight"]),
    ((jnp.ones(3), jnp.ones(3)), {"reduction": "avg"}, ValueError, ["reduction", "'avg'"]),
], ids=["int-targets", "bool-targets", "int-probs", "shape", "rank", "weight-shape",
        "weight-int", "reduction"])
def test_errors(args, kwargs, exc, fragments):
  for f in (BCE, jax.jit(BCE, static_argnames="reduction")):
    with pytest.raises(exc) as info:
      f(*args, **kwargs)
    for frag in ["binary_cross_entropy", *fragments]:
      assert frag in str(info.value)
