"""jax.export with symbolic shapes (shape polymorphism): every loss exported
with a symbolic number of classes (and rows, spatial dims, features) gives
the values and gradients of the same loss jitted at the concrete shape, as
optax's and jax.nn's do. The shape-dependent layouts (CPU blocks, chunk
sizes) need a number; with a symbolic one they take their generic path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxce
import jaxce.checked

pytestmark = pytest.mark.all_platforms  # exports for TPU and GPU too

F32, BF16 = jnp.float32, jnp.bfloat16


def _rng(seed):
  return np.random.default_rng(seed)


def _specs(args, names):
  """ShapeDtypeStructs of `args` with each size in `names` (size -> name)
  made one symbolic dimension."""
  scope = export.SymbolicScope()
  dims = {size: export.symbolic_shape(name, scope=scope)[0] for size, name in names.items()}
  return [jax.ShapeDtypeStruct(tuple(dims.get(d, d) for d in a.shape), a.dtype) for a in args]


def _check(f, args, names, rtol=1e-5, atol=1e-6):
  f = jax.jit(f)
  got = export.export(f)(*_specs(args, names)).call(*args)
  want = f(*args)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.shape == b.shape
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)
  return got


def _inputs(n, c, dtype, seed=0):
  rng = _rng(seed)
  logits = jnp.asarray(rng.normal(size=(n, c)) * 3, dtype)
  labels = rng.integers(0, c, size=(n,))
  labels[1] = -100  # ignored
  labels[2] = c + 3  # out of range: NaN in both programs
  targets = jnp.asarray(rng.dirichlet(np.ones(c), size=n), dtype)
  weight = jnp.asarray(rng.uniform(0.5, 2.0, size=(c,)), F32)
  return logits, jnp.asarray(labels, jnp.int32), targets, weight


def _losses():
  """(name, value_and_grad function, which inputs) for every public loss."""
  vg = jax.value_and_grad
  return {
      "cross_entropy": (vg(lambda x, y: jaxce.cross_entropy(x, y)), "xy"),
      "cross_entropy_options": (vg(lambda x, y, w: jaxce.cross_entropy(
          x, y, weight=w, label_smoothing=0.1, z_loss=1e-3, reduction="sum")), "xyw"),
      "cross_entropy_none": (lambda x, y: jax.vjp(
          lambda x: jaxce.cross_entropy(x, y, reduction="none"), x)[1](
              jnp.ones(x.shape[:1], x.dtype)), "xy"),
      "cross_entropy_where": (vg(lambda x, y, m: jaxce.cross_entropy(
          x, jnp.abs(y) % x.shape[1], where=m)), "xym"),
      "cross_entropy_probs": (vg(lambda x, t, w: jaxce.cross_entropy(
          x, t, weight=w, label_smoothing=0.2)), "xtw"),
      "nll_loss": (vg(lambda x, y, w: jaxce.nll_loss(x, y, weight=w, ignore_index=3)), "xyw"),
      "binary_cross_entropy_with_logits": (vg(lambda x, t, w: (
          jaxce.binary_cross_entropy_with_logits(x, t, pos_weight=w))), "xtw"),
      "binary_cross_entropy": (vg(lambda x, t: jaxce.binary_cross_entropy(
          jax.nn.sigmoid(x), t)), "xt"),
      "log_softmax": (vg(lambda x: jaxce.log_softmax(x)[:, :1].sum()), "x"),
      "logsumexp": (lambda x: jax.jvp(jaxce.logsumexp, (x,), (jnp.ones_like(x),)), "x"),
      "softmax_cross_entropy": (vg(lambda x, t: jaxce.softmax_cross_entropy(x, t).sum()), "xt"),
      "softmax_cross_entropy_with_integer_labels": (vg(lambda x, y: (
          jaxce.softmax_cross_entropy_with_integer_labels(x, jnp.abs(y) % x.shape[1]).sum())),
          "xy"),
      "sigmoid_binary_cross_entropy": (vg(lambda x, t: (
          jaxce.sigmoid_binary_cross_entropy(x, t).sum())), "xt"),
      "cross_entropy_jvp": (lambda x, y: jax.jvp(
          lambda x: jaxce.cross_entropy(x, y), (x,), (jnp.ones_like(x),)), "xy"),
  }


CLASS_CASES = [(name, "n, c") for name in _losses()] + [  # (C alone: `pytest -m slow`)
    pytest.param(name, "c", marks=pytest.mark.slow)
    for name in ("cross_entropy_options", "cross_entropy_probs", "nll_loss")]


@pytest.mark.parametrize(("name", "symbolic"), CLASS_CASES)
def test_symbolic_classes(name, symbolic):
  """Each loss, exported with a symbolic class count (and rows), matches
  the jitted loss, value and gradient; before, each raised
  InconclusiveDimensionOperation from a shape-dependent layout choice."""
  n, c = 6, 7
  x, y, t, w = _inputs(n, c, F32)
  f, which = _losses()[name]
  mask = jnp.asarray(np.arange(c) % 4 != 1)[None]
  args = [{"x": x, "y": y, "t": t, "w": w, "m": mask}[k] for k in which]
  names = {c: "c"} if symbolic == "c" else {n: "n", c: "c"}
  _check(f, args, names)


@pytest.mark.slow
@pytest.mark.parametrize("c", [1000, 50257, 65536])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_symbolic_classes_long_rows(c, dtype):
  """Rows that a concrete shape sums in blocks or chunks on CPU: the
  exported program (one pass) matches them."""
  x, y, t, w = _inputs(4, c, dtype, seed=c)
  tol = dict(rtol=1e-5, atol=1e-6) if dtype == F32 else dict(rtol=2e-2, atol=2e-2)
  for name in ("cross_entropy_options", "cross_entropy_probs", "log_softmax"):
    f, which = _losses()[name]
    _check(f, [{"x": x, "y": y, "t": t, "w": w}[k] for k in which], {c: "c"}, **tol)


@pytest.mark.parametrize(("dtype", "c"), [
    ("uint8", 300), ("int8", 7), ("int32", 7),
    # the other widths, same comparisons: `pytest -m slow`
    *(pytest.param(d, c, marks=pytest.mark.slow)
      for d, c in (("uint8", 7), ("uint16", 300), ("int16", 300), ("uint32", 300)))])
def test_symbolic_classes_labels_of_any_dtype(dtype, c):
  """Labels of every integer dtype against a symbolic class count: out of
  range (C or above, or a negative that is not ignore_index) is NaN, as with
  a concrete C, without wrap-around (uint8 labels below C = 300 are valid)."""
  info = np.iinfo(dtype)
  values = np.asarray([v for v in (0, 1, c - 1, c, c + 1, info.max, -1, info.min, 5, 2)
                       if info.min <= v <= info.max])
  x = jnp.asarray(_rng(3).normal(size=(len(values), c)), F32)
  y = jnp.asarray(values.astype(dtype))
  for ignore in (None, -100, 5):
    f = lambda x, y, ignore=ignore: jaxce.cross_entropy(
        x, y, ignore_index=ignore, reduction="none")
    per = np.asarray(_check(f, [x, y], {c: "c"}))
    bad = (values < 0) | (values >= c)
    if ignore is not None:
      bad &= values != ignore
    np.testing.assert_array_equal(np.isnan(per), bad)


def test_symbolic_classes_host_labels():
  """Host (NumPy) int64 labels closed over in an exported function with a
  symbolic class count: compared exactly (2**32 + 1 is out of range)."""
  labels = np.array([0, 2**32 + 1, 4, -100], np.int64)
  f = lambda x: jaxce.cross_entropy(x, labels, reduction="none")
  x = jnp.asarray(_rng(4).normal(size=(4, 5)), F32)
  got = export.export(jax.jit(f))(*_specs([x], {5: "c"})).call(x)
  want = jax.jit(f)(x)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.isnan(np.asarray(got)[1])
  assert np.asarray(got)[3] == 0.0


def test_symbolic_image_layout():
  """(N, C, H, W) logits with axis=1, every dimension symbolic."""
  rng = _rng(5)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), F32)
  y = jnp.asarray(rng.integers(0, 5, size=(2, 3, 4)), jnp.int32)
  w = jnp.asarray(rng.uniform(0.5, 2.0, size=(5,)), F32)
  f = jax.value_and_grad(lambda x, y, w: jaxce.cross_entropy(x, y, weight=w, axis=1))
  _check(f, [x, y, w], {2: "n", 5: "c", 3: "h", 4: "w"})


def test_symbolic_checked_losses():
  """The checked losses under checkify, with a symbolic class count: the
  check compares against the runtime C."""
  from jax.experimental import checkify
  f = jax.jit(checkify.checkify(lambda x, y: jaxce.checked.cross_entropy(x, y)))
  x = jnp.zeros((3, 5), F32)
  exp = export.export(f)(*_specs([x, jnp.zeros(3, jnp.int32)], {5: "c", 3: "n"}))
  err, loss = exp.call(x, jnp.array([0, 4, 1]))
  assert err.get() is None
  assert np.isclose(loss, np.log(5.0))
  err, _ = exp.call(x, jnp.array([0, 5, 1]))
  assert "label 5 at flat position 1" in err.get()


LINEAR_OPTIONS = {
    "plain": {},
    "softcap_smoothing_z": {"softcap": 5.0, "label_smoothing": 0.1, "z_loss": 1e-3},
    "sum": {"reduction": "sum", "backward": "recompute"},
}


LINEAR_CASES = [("plain", dtype, symbolic) for dtype in ("f32", "bf16")
                for symbolic in ("v", "d", "n, d, v")] + [
    (options, "f32", "n, d, v") for options in ("softcap_smoothing_z", "sum")] + [
    ("softcap_smoothing_z", "bf16", "v")]


@pytest.mark.parametrize(("options", "dtype", "symbolic"), LINEAR_CASES)
def test_linear_symbolic_shapes(options, dtype, symbolic):
  """linear_cross_entropy with a symbolic vocabulary (one chunk of all of
  it), feature size (one row block) or all three: value and gradients of
  x, kernel and bias match the jitted loss."""
  n, d, v = 6, 16, 40
  dtype = {"f32": F32, "bf16": BF16}[dtype]
  rng = _rng(6)
  x = jnp.asarray(rng.normal(size=(n, d)), dtype)
  kernel = jnp.asarray(rng.normal(size=(d, v)) * 0.3, dtype)
  bias = jnp.asarray(rng.normal(size=(v,)), F32)
  weight = jnp.asarray(rng.uniform(0.5, 2.0, size=(v,)), F32)
  y = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32).at[0].set(-100)
  opts = LINEAR_OPTIONS[options]
  f = jax.value_and_grad(lambda x, k, y, b, w: jaxce.linear_cross_entropy(
      x, k, y, bias=b, weight=w, **opts), argnums=(0, 1, 3))
  names = {s: name for name, s in (("n", n), ("d", d), ("v", v)) if name in symbolic}
  tol = dict(rtol=1e-4, atol=1e-5) if dtype == F32 else dict(rtol=3e-2, atol=3e-2)
  _check(f, [x, kernel, y, bias, weight], names, **tol)


def test_linear_symbolic_vocabulary_forward_mode():
  rng = _rng(7)
  x = jnp.asarray(rng.normal(size=(4, 8)), F32)
  kernel = jnp.asarray(rng.normal(size=(8, 30)), F32)
  y = jnp.asarray(rng.integers(0, 30, size=(4,)), jnp.int32)
  f = lambda x, k, y: jax.jvp(
      lambda a, b: jaxce.linear_cross_entropy(a, b, y, forward_mode=True), (x, k),
      (jnp.ones_like(x), jnp.ones_like(k)))
  _check(f, [x, kernel, y], {30: "v", 4: "n"}, rtol=1e-5)


def test_linear_symbolic_vocabulary_refuses_a_chunk_size():
  """An explicit chunk_size, or backward="precompute", needs a known V: a
  clear error rather than a symbolic-comparison failure."""
  specs = _specs([jnp.zeros((4, 8)), jnp.zeros((8, 30)), jnp.zeros(4, jnp.int32)], {30: "v"})
  with pytest.raises(ValueError, match="`chunk_size` needs a concrete vocabulary size"):
    export.export(jax.jit(lambda x, k, y: jaxce.linear_cross_entropy(
        x, k, y, chunk_size=8)))(*specs)
  with pytest.raises(ValueError, match="needs a concrete number of tokens and vocabulary"):
    export.export(jax.jit(lambda x, k, y: jaxce.linear_cross_entropy(
        x, k, y, backward="precompute")))(*specs)


def test_symbolic_classes_lower_for_every_platform():
  """One export for CPU, CUDA and TPU with symbolic rows and classes (the
  platform-dependent branches lower with a symbolic class count too)."""
  n, c = export.symbolic_shape("n, c")
  ce = jax.value_and_grad(lambda x, y: jaxce.cross_entropy(x, y, label_smoothing=0.1))
  exp = export.export(jax.jit(ce), platforms=("cpu", "cuda", "tpu"))(
      jax.ShapeDtypeStruct((n, c), BF16), jax.ShapeDtypeStruct((n,), jnp.int32))
  assert exp.platforms == ("cpu", "cuda", "tpu")
  x, y, _, _ = _inputs(5, 9, BF16)
  for a, b in zip(exp.call(x, y), jax.jit(ce)(x, y), strict=True):
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-2, atol=1e-3)
  lin = jax.value_and_grad(lambda x, k, y: jaxce.linear_cross_entropy(x, k, y), (0, 1))
  export.export(jax.jit(lin), platforms=("cpu", "cuda", "tpu"))(
      jax.ShapeDtypeStruct((n, 8), BF16), jax.ShapeDtypeStruct((8, c), BF16),
      jax.ShapeDtypeStruct((n,), jnp.int32))
