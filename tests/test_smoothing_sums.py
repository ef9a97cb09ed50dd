"""Label smoothing's sums on CPU (`_stats._cpu_unweighted_sums`, and
`_cpu_weighted_sums` with class weights): one plain sum and the count C (and
the weights' sum) where every logit is finite, and `lax.cond` hands over to
`_cpu_masked_sums` / `_cpu_masked_weighted_sums` (the arithmetic that keeps
-inf classes out) where a sum is not finite, or first where the first
position has a -inf logit.

References: the float64 version of PyTorch's formula (tests/reference.py,
classes at -inf taking no part) where it is finite, and the masked sums
themselves (a class mask, `where`, calls them directly), with NaNs and
infinities compared exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from nonfinite import assert_same

import jaxce
from jaxce import _stats

N, C = 6, 7
EPS = 0.1
KINDS = ("neg_inf_other", "neg_inf_label", "no_finite_logit", "nan_logit", "pos_inf_logit",
         "near_float32_max", "float32_min_other")


def _batch(kinds, classes=C, seed=0):
  """Logits [N, classes] and labels [N], row i of kind kinds[i] (ordinary if
  "" or past the end)."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((N, classes)) * 3).astype(np.float32)
  y = rng.integers(0, classes, N).astype(np.int32)
  for row, kind in enumerate(kinds):
    other = (y[row] + 1) % classes
    if kind == "neg_inf_other":
      x[row, other] = -np.inf
    elif kind == "neg_inf_label":
      x[row, y[row]] = -np.inf
    elif kind == "no_finite_logit":
      x[row] = -np.inf
    elif kind == "nan_logit":
      x[row, other] = np.nan
    elif kind == "pos_inf_logit":
      x[row, other] = np.inf
    elif kind == "near_float32_max":  # x - shift overflows to -inf
      x[row] = np.float32(3e38) * np.sign(x[row])
    elif kind == "float32_min_other":  # finite, as some masks write it
      x[row, other] = np.finfo(np.float32).min
  return x, y


# Rows the float64 reference models: it takes a NaN logit's class out (NaN > -inf
# is false) and does not overflow where float32 does.
MODELED = ("", "neg_inf_other", "neg_inf_label", "no_finite_logit", "float32_min_other")


def _modeled(kinds):
  return np.array([(kinds[i] if i < len(kinds) else "") in MODELED for i in range(N)])


def _cases():
  """Each kind at the first position (the masked sums go first), at the
  second (after the plain sum), several at once, and none."""
  return ([()] + [(k,) for k in KINDS] + [("", k) for k in KINDS]
          + [KINDS[i:i + N] for i in range(0, len(KINDS), N)])


@jax.jit
def _sums(x):
  """(the sums as shipped, the masked sums) about each row's largest finite
  logit (0 where there is none)."""
  finite = jnp.where(jnp.isfinite(x), x, -jnp.inf)
  top = jnp.max(finite, axis=-1, keepdims=True)
  shift = jnp.where(top > -jnp.inf, top, 0.0)
  return _stats._cpu_unweighted_sums(x, shift, 1), _stats._cpu_masked_sums(x, shift, 1)


@pytest.mark.parametrize("classes", [C, 40000], ids=["short", "long_rows_in_blocks"])
def test_sums_equal_the_masked_sums(classes):
  for kinds in _cases():
    got, want = _sums(jnp.asarray(_batch(kinds, classes)[0]))
    for g, w in zip(got, want, strict=True):
      assert_same(g, w)


@functools.partial(jax.jit, static_argnames=("reduction",))
def _losses(x, y, *, reduction):
  """(value_and_grad as shipped, the same through the masked sums: a class
  mask that keeps every class)."""
  def loss(x, where):
    return jnp.sum(jaxce.cross_entropy(x, y, label_smoothing=EPS, reduction=reduction,
                                       where=where))
  keep_all = jnp.ones(x.shape, bool)
  return jax.value_and_grad(loss)(x, None), jax.value_and_grad(loss)(x, keep_all)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_loss_and_gradient_of_every_kind_of_row(reduction):
  for kinds in _cases():
    x, y = _batch(kinds)
    (value, grad), (masked_value, masked_grad) = _losses(x, y, reduction=reduction)
    assert_same(value, masked_value)
    assert_same(grad, masked_grad)
    rows = _modeled(kinds)
    if reduction == "none":
      want = ref.cross_entropy_int(x, y, label_smoothing=EPS, reduction="none")
      np.testing.assert_allclose(np.asarray(
          jaxce.cross_entropy(x, y, label_smoothing=EPS, reduction="none"))[rows], want[rows],
          rtol=2e-6)
    elif rows.all():
      want = ref.cross_entropy_int(x, y, label_smoothing=EPS, reduction="mean")
      np.testing.assert_allclose(value, want, rtol=2e-6)


def test_probability_targets():
  rng = np.random.default_rng(1)
  for kinds in _cases():
    x, _ = _batch(kinds)
    t = rng.dirichlet(np.ones(C), N).astype(np.float32)
    t[np.isneginf(x)] = 0.0
    f = jax.jit(lambda x, t, where: jaxce.cross_entropy(
        x, t, label_smoothing=EPS, reduction="none", where=where))
    assert_same(f(x, t, None), f(x, t, np.ones(x.shape, bool)))
    want = ref.cross_entropy_prob(x, t, label_smoothing=EPS, reduction="none")
    rows = _modeled(kinds)
    np.testing.assert_allclose(np.asarray(f(x, t, None))[rows], want[rows], rtol=2e-6,
                               atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_under_vmap_eagerly_and_on_axis_1(dtype):
  x, y = _batch(("", "neg_inf_other"))
  x = jnp.asarray(x, dtype)
  want = jaxce.cross_entropy(x, y, label_smoothing=EPS, reduction="none",
                             where=jnp.ones(x.shape, bool))
  eager = jaxce.cross_entropy(x, y, label_smoothing=EPS, reduction="none")
  per_row = jax.vmap(lambda r, k: jaxce.cross_entropy(r, k, label_smoothing=EPS))(x, y)
  image = jaxce.cross_entropy(jnp.moveaxis(x, 1, 0)[None, :, :, None], y[None, :, None],
                              axis=1, label_smoothing=EPS, reduction="none")
  for got in (eager, per_row, image.reshape(N)):
    assert_same(got, want, rtol=1e-2 if dtype == jnp.bfloat16 else 2e-6)


WEIGHT = np.linspace(0.25, 2.0, C).astype(np.float32)  # w * -float32 max overflows
# At most 1 for the reference: w * (x - shift) of a float32-min logit (a
# "float32_min_other" row) would overflow float32 in any formulation.
LOSS_WEIGHT = np.linspace(0.25, 1.0, C).astype(np.float32)


@jax.jit
def _weighted_sums(x, w):
  """(the weighted sums as shipped, the masked ones, the three `where`s of
  `_smoothing_terms`) about each row's largest finite logit."""
  finite = jnp.where(jnp.isfinite(x), x, -jnp.inf)
  top = jnp.max(finite, axis=-1, keepdims=True)
  shift = jnp.where(top > -jnp.inf, top, 0.0)
  wc = w[None, :]
  active, xs = _stats._shifted(x, shift)
  by_select = _stats.SmoothingSums(*(jnp.sum(t, -1) for t in _stats._smoothing_terms(
      active, xs, wc)))
  return (_stats._cpu_weighted_sums(x, shift, wc, 1),
          _stats._cpu_masked_weighted_sums(x, shift, wc, 1), by_select)


@pytest.mark.parametrize("classes", [C, 40000], ids=["short", "long_rows_in_blocks"])
def test_weighted_sums_equal_the_masked_and_the_selected_sums(classes):
  """Shipped and masked sums agree everywhere (NaN and infinities
  included); with the select-based sums wherever those are finite and the
  row has no NaN or +inf logit (which the arithmetic makes NaN, where the
  selects leave a NaN class out: the loss is NaN either way)."""
  w = np.resize(WEIGHT, classes)
  for kinds in _cases():
    x = _batch(kinds, classes)[0]
    got, masked, selected = _weighted_sums(jnp.asarray(x), jnp.asarray(w))
    rows = ~np.any(np.isnan(x) | np.isposinf(x), axis=-1)
    for g, m, sel in zip(got, masked, selected, strict=True):
      assert_same(g, m, rtol=1e-5)
      assert_same(np.asarray(g)[rows], np.asarray(sel)[rows], rtol=1e-5)


@jax.jit
def _weighted(x, tgt, w, where):
  """(per-position losses, and value_and_grad of their sum) with class
  weights and smoothing; one compilation per target kind and mask."""
  def loss(x):
    per = jaxce.cross_entropy(x, tgt, weight=w, label_smoothing=EPS, reduction="none",
                              where=where)
    return jnp.sum(per), per
  (value, per), grad = jax.value_and_grad(loss, has_aux=True)(x)
  return per, value, grad


@pytest.mark.parametrize("target", ["labels", "probabilities"])
def test_weighted_loss_and_gradient_against_reference(target):
  """cross_entropy with class weights and smoothing, value and gradient,
  against the float64 reference on the rows it models, and equal to the
  same loss through a class mask that keeps every class."""
  rng = np.random.default_rng(2)
  w = jnp.asarray(LOSS_WEIGHT)
  for kinds in _cases():
    x, y = _batch(kinds)
    t = rng.dirichlet(np.ones(C), N).astype(np.float32)
    t[np.isneginf(x)] = 0.0
    tgt = y if target == "labels" else t
    per, value, grad = _weighted(x, tgt, w, None)
    _, masked_value, masked_grad = _weighted(x, tgt, w, np.ones(x.shape, bool))
    assert_same(value, masked_value, rtol=1e-5)
    assert_same(grad, masked_grad, rtol=1e-5)
    rows = _modeled(kinds) & np.all(np.isfinite(x), axis=-1)
    if not rows.any():
      continue
    if target == "labels":
      want = ref.cross_entropy_int(x, y, weight=LOSS_WEIGHT, label_smoothing=EPS,
                                   reduction="none")
      want_g = ref.cross_entropy_int_grad(x, y, weight=LOSS_WEIGHT, label_smoothing=EPS,
                                          reduction="sum")
    else:
      want = ref.cross_entropy_prob(x, t, weight=LOSS_WEIGHT, label_smoothing=EPS,
                                    reduction="none")
      want_g = ref.cross_entropy_prob_grad(x, t, weight=LOSS_WEIGHT, label_smoothing=EPS,
                                           reduction="sum")[0]
    np.testing.assert_allclose(np.asarray(per)[rows], want[rows], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(grad)[rows], np.asarray(want_g)[rows], rtol=2e-5,
                               atol=2e-6)
