"""Label smoothing's sums without class weights on CPU
(`_stats._cpu_unweighted_sums`): one plain sum and the count C where every
logit is finite, and `lax.cond` hands over to `_cpu_masked_sums` (the
arithmetic that keeps -inf classes out) where a sum is not finite, or first
where the first position has a -inf logit.

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
