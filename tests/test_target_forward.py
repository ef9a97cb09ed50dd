"""Probability targets' forward on CPU (`jaxce._target_forward`): the fused
pass where its value is exact, the `lax.cond` fallback where it is NaN (with
label smoothing: not finite), and no N x C temporary in either.

Reference: the same loss through the per-position statistics
(`_target_forward._exact`, which every derivative of the loss already
uses, and which the TPU/GPU branches compute for the value too), compared
with its NaNs and infinities exactly. Its values are checked against
float64 references, PyTorch's golden values and optax elsewhere
(test_numerics, test_properties, test_golden, test_optax)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fast_compile import compile_as_shipped
from nonfinite import assert_same

import jaxce
from jaxce import _target_forward
from jaxce._reduction import reduce

N, C = 6, 5
KINDS = ("zero_target_at_neg_inf", "target_at_neg_inf", "negative_weight_at_neg_inf",
         "no_finite_logit", "nan_logit", "nan_target", "pos_inf_logit", "negative_target",
         "no_target_mass", "logits_near_float32_max", "weight_below_minus_2",
         "subnormal_target_at_neg_inf", "mixed_sign_mass_at_neg_inf",
         "mixed_sign_mass_at_neg_inf_swapped")


def _batch(kinds, seed=0, classes=C):
  """Logits, targets [N, classes] and class weights [classes], row i of kind
  kinds[i] (ordinary if "" or past the end)."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((N, classes)) * 3).astype(np.float32)
  t = rng.dirichlet(np.ones(classes), N).astype(np.float32)
  w = np.linspace(0.5, 2.0, classes).astype(np.float32)
  for row, kind in enumerate(kinds):
    if kind == "zero_target_at_neg_inf":
      x[row, 1], t[row, 1] = -np.inf, 0.0
    elif kind in ("target_at_neg_inf", "negative_weight_at_neg_inf"):
      x[row, 2] = -np.inf
      if kind == "negative_weight_at_neg_inf":
        w[2] = -1.0
    elif kind == "no_finite_logit":
      x[row] = -np.inf
    elif kind == "nan_logit":
      x[row, 0] = np.nan
    elif kind == "nan_target":
      t[row, 3] = np.nan
    elif kind == "pos_inf_logit":
      x[row, 4] = np.inf
    elif kind == "negative_target":
      t[row, 0] = -0.25
    elif kind == "no_target_mass":
      t[row] = 0.0
    elif kind == "logits_near_float32_max":
      x[row] = np.float32(3e38) * np.sign(x[row])
    elif kind == "weight_below_minus_2":
      w[0], t[row, 0] = -3.0, 1.0
    elif kind == "subnormal_target_at_neg_inf":
      x[row, 1], t[row, 1] = -np.inf, 1e-40
    elif kind.startswith("mixed_sign_mass_at_neg_inf"):  # +inf - inf: NaN, in either order
      x[row, 1:3] = -np.inf
      t[row, 1:3] = (0.45, -0.74) if kind.endswith("swapped") else (-0.74, 0.45)
  return x, t, w


@functools.partial(jax.jit, static_argnames=("reduction", "z_loss", "weighted", "path"))
def _both(x, t, w, *, reduction, z_loss, weighted, path):
  """(value, exact value): the public forward, or one of its stages alone."""
  w = w if weighted else None
  exact = _target_forward._exact(x.ndim - 1, reduction, z_loss, 0.0, x, t, w)
  if path == "forward":
    got = jaxce.cross_entropy(x, t, weight=w, reduction=reduction, z_loss=z_loss)
  elif path == "exact_rows":
    got = reduce(_target_forward._exact_rows(x, t, w, x.ndim - 1, z_loss), reduction)
  else:
    got = _target_forward._fused(x, t, w, x.ndim - 1, reduction, z_loss, path == "neg_inf_pass")
  return got, exact


@pytest.mark.parametrize("path", ["forward", "pass", "neg_inf_pass", "exact_rows"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(("weighted", "z_loss"), [(False, 0.0), (True, 1e-3)])
def test_every_kind_of_row(path, reduction, weighted, z_loss):
  """Each kind alone in an otherwise ordinary batch, then several at once,
  and the ordinary batch by itself: the forward (which takes the
  fused pass, the pass with -inf terms or the exact rows) equals the exact
  loss; so do the two passes alone wherever they are finite (elsewhere they
  hand over to the next stage), and the exact rows everywhere."""
  # (A kind at the first position sends the forward to the pass with -inf
  # terms first; at the second, after the plain pass.)
  cases = ([()] + [(k,) for k in KINDS] + [("", k) for k in KINDS]
           + [KINDS[i:i + N] for i in range(0, len(KINDS), N)])
  for kinds in cases:
    x, t, w = _batch(kinds)
    got, want = _both(x, t, w, reduction=reduction, z_loss=z_loss, weighted=weighted, path=path)
    if path in ("pass", "neg_inf_pass"):
      keep = np.isfinite(np.asarray(got))
      if np.ndim(got) == 0 and not keep:
        continue
      got, want = np.asarray(got)[keep], np.asarray(want)[keep]
    assert_same(got, want)


@pytest.mark.parametrize("path", ["forward", "pass", "neg_inf_pass"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_long_rows_in_blocks(path, reduction):
  """float32 rows longer than 32768 classes take the passes over blocks of
  the class axis (40000 = 160 blocks of 250): every kind of row as above."""
  cases = [()] + [(k,) for k in KINDS] + [("", k) for k in KINDS]
  for kinds in cases:
    x, t, w = _batch(kinds, classes=40000)
    got, want = _both(x, t, w, reduction=reduction, z_loss=1e-3, weighted=True, path=path)
    if path != "forward":
      keep = np.isfinite(np.asarray(got))
      if np.ndim(got) == 0 and not keep:
        continue
      got, want = np.asarray(got)[keep], np.asarray(want)[keep]
    assert_same(got, want, rtol=2e-5)


@pytest.mark.parametrize("path", ["forward", "pass"])
@pytest.mark.parametrize("classes", [C, 40000], ids=["short", "long_rows_in_blocks"])
@pytest.mark.parametrize("eps", [0.1, pytest.param(1.0, marks=pytest.mark.slow)])  # (slow: .ci/run)
@pytest.mark.parametrize(("reduction", "weighted", "z_loss"),
                         [("none", False, 0.0), ("mean", True, 1e-3),
                          # (the weighted sum the mean divides): `pytest -m slow`
                          pytest.param("sum", True, 0.0, marks=pytest.mark.slow)])
def test_label_smoothing_every_kind_of_row(path, classes, eps, reduction, weighted, z_loss):
  """With label smoothing the plain pass takes the smoothed targets; where
  it is not finite (a -inf logit takes its class out of the uniform part:
  K active classes, not C) the forward takes the exact loss. The forward
  equals the exact loss for every kind of row, the pass alone wherever it
  is finite, and at eps = 1 a NaN target takes no part."""
  cases = [()] + [(k,) for k in KINDS] + [("", k) for k in KINDS]
  run = jax.jit(lambda x, t, w: (
      jaxce.cross_entropy(x, t, weight=w, reduction=reduction, z_loss=z_loss,
                          label_smoothing=eps) if path == "forward"
      else _target_forward._fused(x, t, w, 1, reduction, z_loss, False, eps),
      _target_forward._exact(1, reduction, z_loss, eps, x, t, w)))
  finite_seen = 0
  for kinds in cases:
    x, t, w = _batch(kinds, classes=classes)
    got, want = run(x, t, w if weighted else None)
    if path == "pass":
      if not np.all(np.isfinite(got)):
        continue
      finite_seen += 1
    assert_same(got, want, rtol=2e-5)
  assert path == "forward" or finite_seen >= 3


def test_each_stage_takes_what_it_should():
  """Which batches each fused pass leaves to the next stage (not finite): the
  plain pass a zero target at a -inf logit, the pass with -inf terms only
  rows with target mass at a -inf logit, no finite logit, NaN or +inf input
  and weights below -2."""
  def hands_over(kind, neg_inf):
    x, t, w = _batch((kind,))
    fused = jax.jit(_target_forward._fused, static_argnums=(3, 4, 5, 6))
    return not np.isfinite(fused(x, t, w, 1, "sum", 0.0, neg_inf))

  assert hands_over("zero_target_at_neg_inf", False)
  assert not hands_over("zero_target_at_neg_inf", True)
  assert not hands_over("subnormal_target_at_neg_inf", True)
  for kind in ("negative_target", "no_target_mass", ""):
    assert not hands_over(kind, False), kind
  for kind in ("target_at_neg_inf", "negative_weight_at_neg_inf", "mixed_sign_mass_at_neg_inf",
               "no_finite_logit", "nan_logit", "nan_target", "pos_inf_logit",
               "weight_below_minus_2"):
    assert hands_over(kind, True), kind


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mixed_sign_mass_at_neg_inf_is_nan(all_branches, eps):
  """Target mass of both signs at -inf logits: +inf - inf, NaN in either
  class order, as -sum(t * log_softmax(x)) and PyTorch give (the fused pass
  summed it to +inf or -inf by the order of the classes, compiled with XLA's
  default code generation, which the suite's fast compile does not show)."""
  ni = -np.inf
  for t in ([1.0, 0.45, -0.74], [1.0, -0.74, 0.45]):
    x, t = jnp.array([[0.0, ni, ni], [0.5, 1.0, 2.0]]), jnp.array([t, [0.2, 0.3, 0.5]])
    for red in ("none", "mean"):
      loss = functools.partial(jaxce.cross_entropy, reduction=red, label_smoothing=eps)
      got = compile_as_shipped(jax.jit(loss).lower(x, t))(x, t)
      assert np.isnan(np.asarray(got).ravel()[0]), (t, red, got)
    assert np.isfinite(jaxce.cross_entropy(x, t, reduction="none", label_smoothing=eps)[1])


def test_rules_the_exact_loss_states():
  """The values themselves, per row (not only equal to the statistics'):
  +inf where target mass meets a -inf logit, -inf where negative weight
  does, 0 on a row with no finite logit and no mass, NaN for NaN input."""
  kinds = ("zero_target_at_neg_inf", "target_at_neg_inf", "no_finite_logit", "nan_logit")
  x, t, w = _batch(kinds)
  t[2] = 0.0  # no mass on the row of no finite logit
  per = np.asarray(jaxce.cross_entropy(x, t, reduction="none"))
  assert np.isfinite(per[0])
  assert per[1] == np.inf
  assert per[2] == 0.0
  assert np.isnan(per[3])
  x, t, w = _batch(("negative_weight_at_neg_inf",))
  t[0, 2] = 0.5
  assert jaxce.cross_entropy(x, t, weight=w, reduction="none")[0] == -np.inf


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_under_vmap_eagerly_and_on_axis_1(dtype):
  """vmap (the cond becomes a select: both branches run), an eager call, and
  (N, C, H, W) logits on axis 1, each against the exact loss."""
  x, t, _ = _batch(("zero_target_at_neg_inf",))
  xs = jnp.stack([x, _batch(())[0]]).astype(dtype)
  ts = jnp.stack([t, _batch(())[1]]).astype(dtype)
  exact = lambda x, t: _target_forward._exact(1, "mean", 0.0, 0.0, x, t, None)
  assert_same(jax.vmap(jaxce.cross_entropy)(xs, ts), jax.vmap(exact)(xs, ts), rtol=1e-5)
  assert_same(jaxce.cross_entropy(xs[0], ts[0]), exact(xs[0], ts[0]), rtol=1e-5)
  x4 = jnp.moveaxis(xs.reshape(2, 3, 2, C), -1, 1)  # (2, C, 3, 2)
  t4 = jnp.moveaxis(ts.reshape(2, 3, 2, C), -1, 1)
  for reduction in ("none", "mean"):
    got = jaxce.cross_entropy(x4, t4, axis=1, reduction=reduction)
    assert_same(got, _target_forward._exact(1, reduction, 0.0, 0.0, x4, t4, None), rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_empty_batch(eps):
  """0 (+0, as the statistics path and PyTorch give), and an empty "none"."""
  x = t = jnp.zeros((0, C))
  for reduction in ("mean", "sum"):
    got = jaxce.cross_entropy(x, t, reduction=reduction, label_smoothing=eps)
    assert got == 0.0, (reduction, got)
    assert not np.signbit(got), (reduction, got)
  assert jaxce.cross_entropy(x, t, reduction="none").shape == (0,)


@pytest.mark.parametrize("shape", [(2048, 1000), (4, 40000)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_forward_keeps_no_n_by_c_temporary(shape, dtype):
  """The compiled forward, fallback branch included, takes no more temp
  memory than optax's forward beyond a few numbers per row and a few small
  buffers (the statistics path kept a float32 N x C array, two for
  bfloat16)."""
  x = jax.ShapeDtypeStruct(shape, dtype)

  def temp(f):
    return jax.jit(f).lower(x, x).compile().memory_analysis().temp_size_in_bytes

  ours = temp(lambda x, t: jaxce.cross_entropy(x, t))
  peer = temp(lambda x, t: optax.softmax_cross_entropy(x, t).mean())
  assert ours <= peer + 64 * shape[0] + 4096, (ours, peer)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_smoothed_forward_keeps_what_the_statistics_keep(dtype):
  """With label smoothing the fallback is the statistics path, whose N x C
  temporaries (one float32 array, two for bfloat16) the compiled forward
  keeps: no more than that path alone (the forward before the fused pass)."""
  shape = (2048, 1000)
  x = jax.ShapeDtypeStruct(shape, dtype)

  def temp(f):
    return jax.jit(f).lower(x, x).compile().memory_analysis().temp_size_in_bytes

  ours = temp(lambda x, t: jaxce.cross_entropy(x, t, label_smoothing=0.1))
  stats = temp(lambda x, t: _target_forward._exact(1, "mean", 0.0, 0.1, x, t, None))
  assert ours <= stats + 64 * shape[0] + 4096, (ours, stats)


def test_float64_smallest_normal_target_at_neg_inf():
  """float64 logits (x64 on): a target of the smallest normal float64 on a
  -inf logit is still target mass there (+inf), in the pass with -inf terms
  too, whose factor 2^(1 - minexp) depends on the dtype."""
  with jax.enable_x64(True):
    x, t, _ = (a.astype(np.float64) for a in _batch(("zero_target_at_neg_inf",)))
    x[1, 1], t[1, 1] = -np.inf, np.finfo(np.float64).tiny
    fused = jax.jit(_target_forward._fused, static_argnums=(3, 4, 5, 6))
    per = np.asarray(fused(x, t, None, 1, "none", 0.0, True))
    assert per[1] == np.inf
    assert np.isfinite(per[0])
    assert_same(jaxce.cross_entropy(x, t, reduction="none"),
          _target_forward._exact(1, "none", 0.0, 0.0, jnp.asarray(x), jnp.asarray(t), None))


def test_pos_inf_logit_without_target_mass():
  """The one documented difference: the forward alone gives NaN for a row
  with a +inf logit (as optax and PyTorch do), where the statistics path,
  and so `value_and_grad`'s value, gives +inf when no target mass sits on
  that logit."""
  x = jnp.array([[1.0, jnp.inf, 0.5]])
  t = jnp.array([[0.5, 0.0, 0.5]])
  assert np.isnan(jaxce.cross_entropy(x, t))
  assert jax.value_and_grad(jaxce.cross_entropy)(x, t)[0] == np.inf
