"""optax 0.2.8's own classification-loss test cases (optax/losses/
_classification_test.py: SoftmaxCrossEntropyTest,
SoftmaxCrossEntropyWithIntegerLabelsTest, SigmoidCrossEntropyTest), their
inputs and expected values re-run against jaxce's drop-ins, and each also
against optax itself where optax runs.

Disagreements that remain are documented differences (see
jaxce/_optax.py): optax's gradient test also runs forward mode, which
jaxce's custom VJPs do not offer; an integer label on a class outside `where`
gives +inf in jaxce (optax's test only looks at rows with no class left,
which both give 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jaxce

# optax's fixtures: two rows of three logits, one-hot and integer targets.
YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], np.float32)
TS_ONE_HOT = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
TS_INT = np.array([1, 0], np.int32)
EXPECTED = np.array([9.00013, 3.0696733], np.float32)
ROW_MASK = np.array([True, False])
LOGIT_MASK = np.array([[1, 0, 0], [0, 0, 0]], bool)


def test_softmax_cross_entropy_values():
  f = jax.jit(jaxce.softmax_cross_entropy)
  np.testing.assert_allclose(f(YS[0], TS_ONE_HOT[0]), EXPECTED[0], atol=1e-4)
  np.testing.assert_allclose(f(YS, TS_ONE_HOT), EXPECTED, atol=1e-4)


@pytest.mark.parametrize("module", [jaxce, optax], ids=["jaxce", "optax"])
def test_rows_with_every_logit_masked_give_zero(module):
  for fn, labels in ((module.softmax_cross_entropy, TS_ONE_HOT),
                     (module.softmax_cross_entropy_with_integer_labels, TS_INT)):
    out = fn(YS, labels, where=LOGIT_MASK)
    np.testing.assert_array_equal(jnp.where(jnp.any(LOGIT_MASK, -1), 0.0, out), 0)


def test_gradients_and_finite_gradients_with_a_row_mask():
  """optax checks both modes; jaxce's custom VJPs have no forward mode (a
  documented difference), so forward mode is checked only where it runs."""
  for f, args in ((jaxce.softmax_cross_entropy, (YS, TS_ONE_HOT)),
                  (lambda x: jaxce.softmax_cross_entropy_with_integer_labels(x, TS_INT), (YS,))):
    check_grads(f, args, order=1, modes=("rev",))
    try:
      check_grads(f, args, order=1, modes=("fwd",))
    except TypeError as e:
      if "custom_vjp" not in str(e):
        raise
  for fn, labels in ((jaxce.softmax_cross_entropy, TS_ONE_HOT),
                     (jaxce.softmax_cross_entropy_with_integer_labels, TS_INT)):
    g = jax.grad(lambda x, fn=fn, labels=labels: jnp.sum(fn(x, labels, where=ROW_MASK)))(YS)
    assert jnp.all(jnp.isfinite(g))


@pytest.mark.parametrize("size", [5, 10])
def test_where_equals_dropping_the_masked_entries(size):
  rng = np.random.default_rng(size)
  for _ in range(4):  # several masks, the empty one included by chance or below
    preds = rng.normal(size=size).astype(np.float32)
    targets = rng.dirichlet(np.ones(size)).astype(np.float32)
    mask = rng.integers(0, 2, size=size).astype(bool)
    want = optax.softmax_cross_entropy(preds[mask], targets[mask])
    np.testing.assert_allclose(jaxce.softmax_cross_entropy(preds, targets, where=mask), want,
                               atol=1e-4)
  none = np.zeros(size, bool)
  assert float(jaxce.softmax_cross_entropy(preds, targets, where=none)) == 0.0


@pytest.mark.slow  # a sweep: `pytest -m slow` (.ci/run) runs it
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_axis_equals_moving_the_axis_last(axis):
  rng = np.random.default_rng(axis)
  shape = (4, 5, 6)
  preds = rng.normal(size=shape).astype(np.float32)
  targets = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)
  np.testing.assert_allclose(
      jaxce.softmax_cross_entropy(preds, targets, axis=axis),
      jaxce.softmax_cross_entropy(np.moveaxis(preds, axis, -1), np.moveaxis(targets, axis, -1)),
      atol=1e-4)
  labels = rng.integers(0, shape[axis], size=shape[:axis] + shape[axis + 1:]).astype(np.int32)
  f = jaxce.softmax_cross_entropy_with_integer_labels
  got = f(preds, labels, axis=axis)
  np.testing.assert_allclose(got, f(np.moveaxis(preds, axis, -1), labels), atol=1e-4)
  np.testing.assert_allclose(
      got, optax.softmax_cross_entropy_with_integer_labels(preds, labels, axis=axis), atol=1e-5)


def test_integer_labels_match_one_hot():
  f = jax.jit(jaxce.softmax_cross_entropy_with_integer_labels)
  one_hot = jax.nn.one_hot(TS_INT, 3)
  np.testing.assert_allclose(f(YS[0], TS_INT[0]),
                             jaxce.softmax_cross_entropy(YS[0], one_hot[0]), rtol=1e-6)
  np.testing.assert_allclose(f(YS, TS_INT), jaxce.softmax_cross_entropy(YS, one_hot), rtol=1e-6)
  np.testing.assert_allclose(f(YS, TS_INT), EXPECTED, atol=1e-4)


@pytest.mark.parametrize("axis", [(1, 3), (3, 2), (2, 3), (-3, -1), (-1, -2), (-2, -1),
                                  (0, 1, 3), (-4, -3, -1)])
def test_tuple_axes_index_classes_in_the_given_order(axis):
  """The logits of a flat [..., K] problem, scattered over `axis` (in its
  order) of a (2, 3, 4, 5) array, give the flat problem's losses."""
  shape = (2, 3, 4, 5)
  ndim = len(shape)
  class_axes = tuple(a % ndim for a in axis)
  batch_axes = tuple(a for a in range(ndim) if a not in class_axes)
  class_shape = tuple(shape[a] for a in class_axes)
  batch_shape = tuple(shape[a] for a in batch_axes)
  k = int(np.prod(class_shape))
  rng = np.random.default_rng(42)
  flat = rng.uniform(size=(*batch_shape, k)).astype(np.float32)
  labels = rng.integers(0, k - 1, size=batch_shape).astype(np.int32)
  want = jaxce.softmax_cross_entropy_with_integer_labels(flat, labels)
  order = batch_axes + class_axes
  inverse = tuple(np.argsort(order))
  logits = flat.reshape(batch_shape + class_shape).transpose(inverse)
  assert logits.shape == shape
  got = jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, axis)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(
      got, optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis), rtol=1e-6)


SIGMOID_CASES = [
    ([-1e09, -1e-09], [1.0, 0.0], 5e08),
    ([-1e09, -1e-09], [0.0, 1.0], 0.3465736),
    ([1e09, 1e-09], [1.0, 0.0], 0.3465736),
    ([1e09, 1e-09], [0.0, 1.0], 5e08),
    ([-1e09, 1e-09], [1.0, 0.0], 5e08),
    ([-1e09, 1e-09], [0.0, 1.0], 0.3465736),
    ([1e09, -1e-09], [1.0, 0.0], 0.3465736),
    ([1e09, -1e-09], [0.0, 1.0], 5e08),
    ([0.0, 0.0], [1.0, 0.0], 0.6931472),
    ([0.0, 0.0], [0.0, 1.0], 0.6931472),
]


@pytest.mark.parametrize(("preds", "labels", "expected"), SIGMOID_CASES)
def test_sigmoid_binary_cross_entropy(preds, labels, expected):
  preds, labels = np.asarray(preds, np.float32), np.asarray(labels, np.float32)
  got = jnp.mean(jaxce.sigmoid_binary_cross_entropy(preds, labels))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, jnp.mean(optax.sigmoid_binary_cross_entropy(preds, labels)),
                             rtol=1e-6, atol=1e-6)
