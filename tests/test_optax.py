"""jaxce against optax (and jax.nn) on everything they share.

Each case pairs a jaxce function with its optax / jax.nn counterpart and
compares per-example values and gradients (a VJP with a random cotangent)
without jit, under `jax.jit`, and under `jax.vmap` over a leading batch
dimension (vmap inside one jit, to keep compilation to one program).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fast_compile import compile_lowered_fast

import jaxce

TOL = dict(rtol=1e-5, atol=1e-6)
N, C = 6, 5
VMAP_BATCH = 3
# The programs that group every case skip LLVM's optimizations, which halves
# their compile time; XLA's own passes (fusion included) still run, and
# without fast-math the arithmetic is the same IEEE arithmetic.


def _normal(rng, shape, scale=2.0):
  return np.asarray(rng.normal(0.0, scale, size=shape), np.float32)


def _probs(rng, shape, axis=-1):
  z = np.exp(rng.normal(0.0, 1.5, size=shape))
  return np.asarray(z / np.sum(z, axis=axis, keepdims=True), np.float32)


def _flat_probs(rng, shape, axes):
  """Probabilities that sum to 1 over several axes."""
  z = np.exp(rng.normal(0.0, 1.5, size=shape))
  return np.asarray(z / np.sum(z, axis=axes, keepdims=True), np.float32)


def _class_mask(rng, shape, axis=-1):
  """Random class mask that keeps class 0 of every position."""
  m = rng.random(shape) < 0.6
  np.moveaxis(m, axis, -1)[..., 0] = True
  return m


def _batch_mask(rng, shape):
  m = rng.random(shape) < 0.7
  m.reshape(-1)[0] = False
  m.reshape(-1)[-1] = True
  return m


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  make: Callable  # rng -> tuple of NumPy arrays (one example batch)
  ours: Callable  # jaxce side, takes the arrays
  theirs: Callable  # optax / jax.nn side, same arrays
  # positions of the arrays to differentiate. With `where`, only the logits:
  # optax's gradient with respect to the labels is NaN on masked classes.
  diff: tuple[int, ...] = (0,)


def _sce_where(m):
  return lambda x, y, w: m.softmax_cross_entropy(x, y, where=w)


def _sce_int_where(m):
  return lambda x, y, w: m.softmax_cross_entropy_with_integer_labels(x, y, where=w)


def _int_where_make(rng):
  w = _class_mask(rng, (N, C))
  # labels only on classes inside the mask (class 0 always is)
  labels = np.array([rng.choice(np.flatnonzero(row)) for row in w], np.int32)
  return _normal(rng, (N, C)), labels, w


CASES = [
    # --- optax.softmax_cross_entropy
    Case("sce", lambda r: (_normal(r, (N, C)), _probs(r, (N, C))),
         jaxce.softmax_cross_entropy, optax.softmax_cross_entropy, (0, 1)),
    Case("sce-axis0", lambda r: (_normal(r, (C, N)), _probs(r, (C, N), 0)),
         lambda x, y: jaxce.softmax_cross_entropy(x, y, axis=0),
         lambda x, y: optax.softmax_cross_entropy(x, y, axis=0), (0, 1)),
    Case("sce-tuple-axis", lambda r: (_normal(r, (N, 3, 4)), _flat_probs(r, (N, 3, 4), (1, 2))),
         lambda x, y: jaxce.softmax_cross_entropy(x, y, axis=(1, 2)),
         lambda x, y: optax.softmax_cross_entropy(x, y, axis=(1, 2)), (0, 1)),
    Case("sce-tuple-axis-unsorted",
         lambda r: (_normal(r, (3, N, 4)), _flat_probs(r, (3, N, 4), (0, 2))),
         lambda x, y: jaxce.softmax_cross_entropy(x, y, axis=(-1, 0)),
         lambda x, y: optax.softmax_cross_entropy(x, y, axis=(-1, 0)), (0, 1)),
    Case("sce-axis-none", lambda r: (_normal(r, (3, 4)), _flat_probs(r, (3, 4), (0, 1))),
         lambda x, y: jaxce.softmax_cross_entropy(x, y, axis=None),
         lambda x, y: optax.softmax_cross_entropy(x, y, axis=None), (0, 1)),
    Case("sce-where-classes",
         lambda r: (_normal(r, (N, C)), _probs(r, (N, C)), _class_mask(r, (N, C))),
         _sce_where(jaxce), _sce_where(optax), (0,)),
    Case("sce-where-batch",
         lambda r: (_normal(r, (N, C)), _probs(r, (N, C)), _batch_mask(r, (N,))),
         _sce_where(jaxce), _sce_where(optax), (0,)),
    Case("sce-where-tuple-axis",
         lambda r: (_normal(r, (N, 3, 4)), _flat_probs(r, (N, 3, 4), (1, 2)),
                    _batch_mask(r, (N,))),
         lambda x, y, w: jaxce.softmax_cross_entropy(x, y, axis=(1, 2), where=w),
         lambda x, y, w: optax.softmax_cross_entropy(x, y, axis=(1, 2), where=w), (0,)),
    # --- optax.softmax_cross_entropy_with_integer_labels
    Case("sce-int", lambda r: (_normal(r, (N, C)), r.integers(0, C, N).astype(np.int32)),
         jaxce.softmax_cross_entropy_with_integer_labels,
         optax.softmax_cross_entropy_with_integer_labels),
    Case("sce-int-axis1",
         lambda r: (_normal(r, (N, C, 2)), r.integers(0, C, (N, 2)).astype(np.int32)),
         lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=1),
         lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y, axis=1)),
    Case("sce-int-tuple-axis",
         lambda r: (_normal(r, (N, 3, 4)), r.integers(0, 12, N).astype(np.int32)),
         lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=(1, 2)),
         lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y, axis=(1, 2))),
    Case("sce-int-tuple-axis-reversed",
         lambda r: (_normal(r, (N, 3, 4)), r.integers(0, 12, N).astype(np.int32)),
         lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=(2, 1)),
         lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y, axis=(2, 1))),
    Case("sce-int-tuple-axis-negative",
         lambda r: (_normal(r, (3, N, 4)), r.integers(0, 12, N).astype(np.int32)),
         lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=(-1, 0)),
         lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y, axis=(-1, 0))),
    Case("sce-int-where-classes", _int_where_make, _sce_int_where(jaxce),
         _sce_int_where(optax)),
    Case("sce-int-where-batch",
         lambda r: (_normal(r, (N, C)), r.integers(0, C, N).astype(np.int32),
                    _batch_mask(r, (N,))),
         _sce_int_where(jaxce), _sce_int_where(optax)),
    # --- jaxce.cross_entropy(reduction="none") against optax
    Case("ce-none-int", lambda r: (_normal(r, (N, C)), r.integers(0, C, N).astype(np.int32)),
         lambda x, y: jaxce.cross_entropy(x, y, reduction="none"),
         optax.softmax_cross_entropy_with_integer_labels),
    Case("ce-none-int-axis1",
         lambda r: (_normal(r, (N, C, 2)), r.integers(0, C, (N, 2)).astype(np.int32)),
         lambda x, y: jaxce.cross_entropy(x, y, reduction="none", axis=1),
         lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y, axis=1)),
    Case("ce-none-int-where", _int_where_make,
         lambda x, y, w: jaxce.cross_entropy(x, y, reduction="none", where=w),
         _sce_int_where(optax)),
    Case("ce-none-prob", lambda r: (_normal(r, (N, C)), _probs(r, (N, C))),
         lambda x, y: jaxce.cross_entropy(x, y, reduction="none"),
         optax.softmax_cross_entropy, (0, 1)),
    Case("ce-none-prob-axis1", lambda r: (_normal(r, (N, C, 2)), _probs(r, (N, C, 2), 1)),
         lambda x, y: jaxce.cross_entropy(x, y, reduction="none", axis=1),
         lambda x, y: optax.softmax_cross_entropy(x, y, axis=1), (0, 1)),
    Case("ce-none-prob-where",
         lambda r: (_normal(r, (N, C)), _probs(r, (N, C)), _class_mask(r, (N, C))),
         lambda x, y, w: jaxce.cross_entropy(x, y, reduction="none", where=w),
         _sce_where(optax), (0,)),
    # --- log_softmax / logsumexp against jax.nn
    Case("log_softmax", lambda r: (_normal(r, (N, C, 2), 4.0),),
         jaxce.log_softmax, jax.nn.log_softmax),
    Case("log_softmax-axis1", lambda r: (_normal(r, (N, C, 2), 4.0),),
         lambda x: jaxce.log_softmax(x, axis=1), lambda x: jax.nn.log_softmax(x, axis=1)),
    Case("log_softmax-where", lambda r: (_normal(r, (N, C)), _class_mask(r, (N, C))),
         lambda x, w: jaxce.log_softmax(x, where=w),
         lambda x, w: jax.nn.log_softmax(x, where=w)),
    Case("logsumexp", lambda r: (_normal(r, (N, C, 2), 4.0),),
         jaxce.logsumexp, lambda x: jax.nn.logsumexp(x, axis=-1)),
    Case("logsumexp-axis1", lambda r: (_normal(r, (N, C, 2), 4.0),),
         lambda x: jaxce.logsumexp(x, axis=1), lambda x: jax.nn.logsumexp(x, axis=1)),
    Case("logsumexp-where", lambda r: (_normal(r, (N, C)), _class_mask(r, (N, C))),
         lambda x, w: jaxce.logsumexp(x, where=w),
         lambda x, w: jax.nn.logsumexp(x, axis=-1, where=w)),
    # --- sigmoid binary cross-entropy
    Case("sbce", lambda r: (_normal(r, (N, C)), np.asarray(r.uniform(size=(N, C)), np.float32)),
         jaxce.sigmoid_binary_cross_entropy, optax.sigmoid_binary_cross_entropy, (0, 1)),
    Case("sbce-binary-labels",
         lambda r: (_normal(r, (N, C)), r.integers(0, 2, (N, C)).astype(np.float32)),
         jaxce.sigmoid_binary_cross_entropy, optax.sigmoid_binary_cross_entropy, (0, 1)),
    Case("sbce-int-labels", lambda r: (_normal(r, (N, C)), r.integers(0, 2, (N, C)).astype(
        np.int32)), jaxce.sigmoid_binary_cross_entropy, optax.sigmoid_binary_cross_entropy),
    Case("sbce-broadcast-labels",
         lambda r: (_normal(r, (N, C)), np.asarray(r.uniform(size=(1, C)), np.float32)),
         jaxce.sigmoid_binary_cross_entropy, optax.sigmoid_binary_cross_entropy, (0, 1)),
    Case("sbce-broadcast-logits",
         lambda r: (_normal(r, (N, 1)), np.asarray(r.uniform(size=(N, C)), np.float32)),
         jaxce.sigmoid_binary_cross_entropy, optax.sigmoid_binary_cross_entropy, (0, 1)),
    Case("bce-with-logits-none",
         lambda r: (_normal(r, (N, C), 6.0), np.asarray(r.uniform(size=(N, C)), np.float32)),
         lambda x, t: jaxce.binary_cross_entropy_with_logits(x, t, reduction="none"),
         optax.sigmoid_binary_cross_entropy, (0, 1)),
]


def _value_and_vjp(fn, diff):
  """args, cot -> (fn(*args), gradient of sum(finite part of fn * cot) for
  the arrays at positions `diff`)."""

  def run(args, cot):
    def scalar(*d):
      full = list(args)
      for i, v in zip(diff, d, strict=True):
        full[i] = v
      out = fn(*full)
      return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) * cot), out

    grads, out = jax.grad(scalar, argnums=tuple(range(len(diff))), has_aux=True)(
        *[args[i] for i in diff])
    return out, grads

  return run


def _both(case):
  ours = _value_and_vjp(case.ours, case.diff)
  theirs = _value_and_vjp(case.theirs, case.diff)
  return lambda args, cot: (ours(args, cot), theirs(args, cot))


def _inputs(case, mode):
  rng = np.random.default_rng(zlib.crc32(case.name.encode()))
  if mode != "vmap":
    args = case.make(rng)
    out_shape = jax.eval_shape(case.theirs, *args).shape
    return args, np.asarray(rng.normal(size=out_shape), np.float32)
  examples = [case.make(rng) for _ in range(VMAP_BATCH)]
  args = tuple(np.stack(a) for a in zip(*examples, strict=True))
  out_shape = jax.eval_shape(case.theirs, *examples[0]).shape
  return args, np.asarray(rng.normal(size=(VMAP_BATCH, *out_shape)), np.float32)


_RESULTS: dict[str, dict] = {}


def _all_cases(mode):
  """{case name: ((ours, grads), (theirs, grads))} for every case, computed
  in one jitted program per mode ("jit", or "vmap": jit of vmap); the
  inputs are arguments of the program, not constants."""
  if mode not in _RESULTS:
    inputs = [_inputs(c, mode) for c in CASES]
    fns = [_both(c) if mode == "jit" else jax.vmap(_both(c)) for c in CASES]
    run = jax.jit(lambda ins: [f(args, cot) for f, (args, cot) in zip(fns, ins, strict=True)])
    outputs = jax.device_get(compile_lowered_fast(run.lower(inputs))(inputs))
    _RESULTS[mode] = dict(zip([c.name for c in CASES], outputs, strict=True))
  return _RESULTS[mode]


# Without jit, every operation compiles on its own: one representative case
# per function keeps that affordable.
EAGER = {"sce-where-batch", "sce-int-tuple-axis", "ce-none-int-axis1", "ce-none-prob",
         "log_softmax-where", "logsumexp", "sbce"}
MODES = [(c, m) for c in CASES for m in ("eager", "jit", "vmap") if m != "eager" or c.name in EAGER]
# (vmap, one program of every case: `pytest -m slow`, which .ci/run runs)
PARAMS = [pytest.param(c, m, marks=pytest.mark.slow) if m == "vmap" else (c, m) for c, m in MODES]


@pytest.mark.parametrize(("case", "mode"), PARAMS, ids=[f"{c.name}-{m}" for c, m in MODES])
def test_matches_optax(case, mode):
  if mode == "eager":
    args, cot = _inputs(case, mode)
    result = _both(case)(tuple(jnp.asarray(a) for a in args), jnp.asarray(cot))
  else:
    result = _all_cases(mode)[case.name]
  (ours, g_ours), (theirs, g_theirs) = result
  assert ours.shape == theirs.shape
  assert ours.dtype == theirs.dtype
  chex.assert_trees_all_close(ours, theirs, **TOL)
  chex.assert_trees_all_close(g_ours, g_theirs, **TOL)
  chex.assert_trees_all_equal_shapes_and_dtypes(g_ours, g_theirs)


def test_drop_in_gradient_for_one_hot_labels():
  """Gradient with respect to one-hot labels: -log p_c for every class, also
  where the label is 0 (e.g. label-smoothing schedules or learned targets)."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(_normal(rng, (N, C)))
  labels = jax.nn.one_hot(jnp.asarray(rng.integers(0, C, N)), C, dtype=jnp.float32)

  def grads(m):
    return jax.grad(lambda x, y: jnp.sum(m.softmax_cross_entropy(x, y)), (0, 1))(logits, labels)

  g_ours, g_theirs = grads(jaxce), grads(optax)
  chex.assert_trees_all_close(g_ours[0], g_theirs[0], **TOL)
  chex.assert_trees_all_close(g_ours[1], g_theirs[1], **TOL)
  chex.assert_trees_all_close(g_ours[1], -jax.nn.log_softmax(logits), **TOL)


@pytest.mark.parametrize("label_dtype", [jnp.int32, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_cross_entropy_takes_integer_one_hot_labels(label_dtype, dtype):
  """optax multiplies the labels into the log-probabilities, so integer and
  boolean one-hots work there: the drop-in takes them in the logits' dtype."""
  rng = np.random.default_rng(2)
  logits = jnp.asarray(_normal(rng, (N, C)), dtype)
  labels = jax.nn.one_hot(jnp.asarray(rng.integers(0, C, N)), C, dtype=label_dtype)
  ours = jax.value_and_grad(lambda x: jnp.sum(jaxce.softmax_cross_entropy(x, labels)))(logits)
  with jax.numpy_dtype_promotion("standard"):  # optax's own int x float product
    theirs = jax.value_and_grad(lambda x: jnp.sum(optax.softmax_cross_entropy(x, labels)))(
        logits)
  tol = TOL if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  chex.assert_trees_all_close(ours[0], theirs[0].astype(jnp.float32), **tol)
  chex.assert_trees_all_close(ours[1].astype(jnp.float32), theirs[1].astype(jnp.float32), **tol)
  assert ours[1].dtype == dtype


# ---------------------------------------------------------------------------
# Swapping the import


def _train_loss(losses, params, batch):
  """A loss written against optax's names; `losses` is the module."""
  logits = batch["x"] @ params["w"] + params["b"][None, :]
  multi = batch["x"] @ params["v"]
  return (jnp.mean(losses.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))
          + 0.5 * jnp.mean(losses.softmax_cross_entropy(logits, batch["soft"]))
          + 0.25 * jnp.mean(losses.sigmoid_binary_cross_entropy(multi, batch["tags"])))


def _problem():
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(_normal(rng, (4, C), 0.5)), "b": jnp.zeros((C,), jnp.float32),
            "v": jnp.asarray(_normal(rng, (4, 3), 0.5))}
  batch = {"x": jnp.asarray(_normal(rng, (8, 4), 1.0)),
           "y": jnp.asarray(rng.integers(0, C, 8), jnp.int32),
           "soft": jnp.asarray(_probs(rng, (8, C))),
           "tags": jnp.asarray(rng.integers(0, 2, (8, 3)), jnp.float32)}
  return params, batch


@pytest.mark.parametrize("module", [jaxce, optax.losses], ids=["jaxce", "optax.losses"])
def test_swapping_the_import(module):
  params, batch = _problem()
  loss_ref, grads_ref = jax.jit(jax.value_and_grad(lambda p: _train_loss(optax, p, batch)))(
      params)
  loss, grads = jax.jit(jax.value_and_grad(lambda p: _train_loss(module, p, batch)))(params)
  chex.assert_trees_all_close(loss, loss_ref, rtol=1e-6)
  chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-7)


def test_swapping_the_import_in_a_training_loop():
  """A few jitted optax SGD steps give the same parameters with either module."""
  params0, batch = _problem()
  opt = optax.sgd(0.5)

  def train(losses):
    @jax.jit
    def step(params, state):
      grads = jax.grad(lambda p: _train_loss(losses, p, batch))(params)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    params, state = params0, opt.init(params0)
    for _ in range(5):
      params, state = step(params, state)
    return params, jax.jit(lambda p: _train_loss(losses, p, batch))(params)

  p_ours, l_ours = train(jaxce)
  p_theirs, l_theirs = train(optax)
  assert float(l_ours) < float(jax.jit(lambda p: _train_loss(optax, p, batch))(params0))
  chex.assert_trees_all_close(p_ours, p_theirs, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(l_ours, l_theirs, rtol=1e-5)


def test_drop_ins_exist_with_optax_signatures():
  import inspect

  for name in ("softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels",
               "sigmoid_binary_cross_entropy"):
    ours = inspect.signature(getattr(jaxce, name))
    theirs = inspect.signature(getattr(optax, name))
    assert list(ours.parameters) == list(theirs.parameters), name
    for p, q in zip(ours.parameters.values(), theirs.parameters.values(), strict=True):
      assert p.default == q.default, (name, p.name)


# ---------------------------------------------------------------------------
# Documented differences


@jax.jit
def _half_precision_pairs(x, y, t):
  x32, t32 = x.astype(jnp.float32), t.astype(jnp.float32)
  pairs = [
      (jaxce.softmax_cross_entropy_with_integer_labels(x, y),
       optax.softmax_cross_entropy_with_integer_labels(x32, y)),
      (jaxce.softmax_cross_entropy(x, t), optax.softmax_cross_entropy(x32, t32)),
      (jaxce.sigmoid_binary_cross_entropy(x, t), optax.sigmoid_binary_cross_entropy(x32, t32)),
  ]
  return pairs, optax.softmax_cross_entropy(x, t)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_gives_float32_loss(dtype):
  """optax keeps the input dtype; jaxce returns float32 computed from the
  same rounded inputs."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(_normal(rng, (N, C)), dtype)
  y = jnp.asarray(rng.integers(0, C, N), jnp.int32)
  t = jnp.asarray(_probs(rng, (N, C)), dtype)
  pairs, optax_half = _half_precision_pairs(x, y, t)
  for ours, theirs in pairs:
    assert ours.dtype == jnp.float32
    chex.assert_trees_all_close(ours, theirs, **TOL)
  assert optax_half.dtype == dtype


@jax.jit
def _neg_inf_vs_masked(x, x_inf, t, keep):
  ours = jax.value_and_grad(lambda v: jnp.sum(jaxce.softmax_cross_entropy(v, t)))(x_inf)
  theirs_inf = jnp.sum(optax.softmax_cross_entropy(x_inf, t))
  masked = jax.value_and_grad(
      lambda v: jnp.sum(optax.softmax_cross_entropy(v, t, where=keep)))(x)
  return ours, theirs_inf, masked


def test_neg_inf_logits_with_zero_target_are_finite():
  """optax gives NaN when a -inf logit meets a zero target; jaxce treats the
  class as absent, which equals optax with that class masked out."""
  rng = np.random.default_rng(4)
  x = _normal(rng, (N, C))
  keep = _class_mask(rng, (N, C))
  t = np.where(keep, _probs(rng, (N, C)), 0.0).astype(np.float32)
  t = (t / np.sum(t, axis=-1, keepdims=True)).astype(np.float32)
  x_inf = np.where(keep, x, -np.inf).astype(np.float32)
  ours, theirs_inf, masked = _neg_inf_vs_masked(x, x_inf, t, keep)
  assert np.isnan(float(theirs_inf))
  assert np.isfinite(float(ours[0]))
  chex.assert_trees_all_close(ours, masked, **TOL)


def test_label_on_masked_class_is_inf_with_limit_gradient():
  """A label on a class outside `where` (or on a -inf logit) costs +inf, and
  its gradient is the softmax over the other classes minus the one-hot label:
  the limit as that logit goes to -inf (docs/guides/differences.md)."""
  x = jnp.asarray([[0.0, 1.0, 5.0], [0.5, -1.0, 2.0]], jnp.float32)
  y = jnp.asarray([2, 0], jnp.int32)
  keep = jnp.asarray([[True, True, False], [True, True, True]])
  x_inf = jnp.where(keep, x, -jnp.inf)
  p = np.asarray(jax.nn.softmax(x_inf, axis=-1))
  want = p - np.eye(3)[np.asarray(y)]
  for v, where in ((x, keep), (x_inf, None)):
    f = lambda v, where=where: jaxce.softmax_cross_entropy_with_integer_labels(v, y, where=where)
    loss = np.asarray(f(v))
    assert loss[0] == np.inf
    assert np.isfinite(loss[1])
    for row in (0, 1):
      grad = jax.grad(lambda v, row=row, f=f: f(v)[row])(v)
      np.testing.assert_allclose(grad[row], want[row], rtol=1e-6)


def test_tuple_axis_keeps_optax_order():
  """A tuple axis sets the flat class index in the order given (issue 10.3):
  optax's own numbers for arange(24).reshape(1, 2, 3, 4) / 7."""
  x = jnp.arange(24.0, dtype=jnp.float32).reshape(1, 2, 3, 4) / 7
  y = jnp.asarray([[1, 5]], jnp.int32)
  for axis, want in (((3, 2), [2.8179, 2.1036]), ((-1, -2), [2.8179, 2.1036]),
                     ((2, 3), [3.2465, 2.6751])):
    got = jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=axis)
    np.testing.assert_allclose(got, [want], atol=1e-4)
    np.testing.assert_allclose(
        got, optax.softmax_cross_entropy_with_integer_labels(x, y, axis=axis), rtol=1e-6)
    # a per-position where expands over the class axes, as in optax
    w = jnp.asarray([[True, False]])
    np.testing.assert_allclose(
        jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=axis, where=w),
        optax.softmax_cross_entropy_with_integer_labels(x, y, axis=axis, where=w), rtol=1e-6)


@pytest.mark.parametrize("axis", [(2, 2), (3, -1), (2, 3, 2)])
def test_repeated_axes_raise_like_optax(axis):
  """optax raises TypeError (integer labels: a transpose with a repeated axis)
  and ValueError (probabilities: "duplicate value in 'axis'"); so do the
  drop-ins, naming the argument."""
  x = jnp.arange(24.0, dtype=jnp.float32).reshape(1, 2, 3, 4)
  y = jnp.zeros((1, 2), jnp.int32)
  t = jnp.full(x.shape, 1 / 12, jnp.float32)
  for module in (optax, jaxce):
    with pytest.raises(TypeError):
      module.softmax_cross_entropy_with_integer_labels(x, y, axis=axis)
    with pytest.raises(ValueError):  # noqa: PT011 -- optax's message is its own
      module.softmax_cross_entropy(x, t, axis=axis)
  with pytest.raises(TypeError, match="`axis` repeats an axis"):
    jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=axis)


def test_where_errors_show_the_callers_shapes():
  x = jnp.zeros((10, 5), jnp.float32)
  y = jnp.zeros((10,), jnp.int32)
  for f, labels in ((jaxce.softmax_cross_entropy_with_integer_labels, y),
                    (jaxce.softmax_cross_entropy, x)):
    with pytest.raises(ValueError, match=r"\(10, 5\).*\(10,\).*Got \(9,\)") as info:
      f(x, labels, where=jnp.ones((9,), bool))
    assert "(10, 1)" not in str(info.value)
