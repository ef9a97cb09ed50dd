"""Integer labels of every dtype give the int32 result: label values are
compared with the class count and with `ignore_index` as integers, never after
a wrap-around, on every entry point (cross_entropy, nll_loss,
linear_cross_entropy on both of its paths, the optax drop-in and
jaxce.checked), with and without jax_enable_x64, for jax and numpy labels.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_compile import compile_fast
from jax.experimental import checkify

import jaxce

C = 300  # more classes than uint8 / int8 can name
D = 4
IGNORE = -100
# (the sub-byte ones: ml_dtypes' int4/uint4/int2/uint2, which JAX arrays take;
# numpy's iinfo does not know them)
DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "int4", "uint4", "int2", "uint2"]


def _boundary_values(dtype):
  """Label values at the edges: classes 0 and C - 1, C, the dtype's extremes,
  and the values that wrap to -100 (or to 300 - 100) in a narrower or wider
  dtype, kept if the dtype holds them."""
  info = jnp.iinfo(dtype)
  candidates = [0, 1, C - 1, C, C + 1, info.max, info.min, IGNORE, -1,
                IGNORE % 2**8, IGNORE % 2**16, IGNORE % 2**32, IGNORE % 2**64,
                IGNORE + 2**32, IGNORE - 2**32, C + 2**8, C + 2**16, C + 2**32, 2**31, -2**31]
  return sorted({v for v in candidates if info.min <= v <= info.max})


def _expected(values, ignore_index):
  """Per value: 'class', 'ignored' or 'bad', by integer comparison."""
  return ["ignored" if ignore_index is not None and v == ignore_index
          else "class" if 0 <= v < C else "bad" for v in values]


def _logits(n):
  return jnp.asarray(np.random.default_rng(0).normal(size=(n, C)), jnp.float32)


def _check_none(got, values, ignore_index, reference):
  """`got` (reduction none) is the int32 loss at classes, +0.0 at ignored
  positions and NaN at bad ones."""
  got = np.asarray(got)
  for i, kind in enumerate(_expected(values, ignore_index)):
    if kind == "class":
      np.testing.assert_allclose(got[i], reference[values[i]], rtol=1e-5,
                                 err_msg=f"label {values[i]}")
    elif kind == "ignored":
      # +0.0, as PyTorch writes it (-0.0 would print as "-0." in a loss table)
      assert got[i] == 0.0, f"label {values[i]} should be ignored, got {got[i]}"
      assert not np.signbit(got[i]), f"label {values[i]}: -0.0 where +0.0"
    else:
      assert np.isnan(got[i]), f"label {values[i]} is out of range, got {got[i]}"


def _ce_table(x):
  """-log softmax(x)[n, c] for every class, in float64 numpy: the reference."""
  x = np.asarray(x, np.float64)
  m = x.max(axis=1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))) - x


def _eye(n):
  return np.eye(n, D, dtype=np.float32)


def _all_losses(x, kernel, y, ignore_index):
  """Per-position losses of every entry point, for a traced ignore_index and
  for None, in one program (one compilation per label dtype)."""
  lp = jaxce.log_softmax(x)
  xs = jnp.asarray(_eye(x.shape[0]))
  out = {}
  for name, ii in (("traced", ignore_index), ("none", None)):
    out["cross_entropy", name] = jaxce.cross_entropy(x, y, ignore_index=ii, reduction="none")
    out["nll_loss", name] = jaxce.nll_loss(lp, y, ignore_index=ii, reduction="none")
    out["linear_cross_entropy", name] = jaxce.linear_cross_entropy(
        xs, kernel, y, ignore_index=ii, reduction="none", chunk_size=128)
  out["drop_in", "none"] = jaxce.softmax_cross_entropy_with_integer_labels(x, y)
  return out


@pytest.mark.parametrize("x64", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["x32", "x64"])  # x64: `pytest -m slow` (.ci/run)
def test_every_dtype_gives_the_int32_result(x64):
  """Every dtype, every boundary value, every entry point; the jax arrays of
  all dtypes in one compiled program."""
  with jax.enable_x64(x64):
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(D, C)), jnp.float32)
    cases = {}
    for dtype in DTYPES:
      values = _boundary_values(dtype)
      cases[dtype] = (values, _logits(len(values)), np.array(values, jnp.dtype(dtype)))
    # JAX would truncate host 64-bit arrays without x64: only eager calls see them.
    host = {d for d in DTYPES if not x64 and jnp.dtype(d).itemsize == 8}
    ignore = jnp.asarray(IGNORE)
    args = {d: (x, jnp.asarray(y)) for d, (_, x, y) in cases.items() if d not in host}
    everything = lambda args, k, ii: {d: _all_losses(x, k, y, ii) for d, (x, y) in args.items()}
    got = compile_fast(everything, args, kernel, ignore)(args, kernel, ignore)
    for d in host:  # eager: cross_entropy stands for the shared host conversion
      x, y = cases[d][1], cases[d][2]
      got[d] = {("cross_entropy", "traced"): jaxce.cross_entropy(
          x, y, ignore_index=ignore, reduction="none")}
    for dtype, (values, x, _) in cases.items():
      table = _ce_table(x)
      refs = {"cross_entropy": table, "nll_loss": table, "drop_in": table,
              "linear_cross_entropy": _ce_table(_eye(len(values)) @ np.asarray(kernel))}
      for (name, ii), loss in got[dtype].items():
        ignore_index = IGNORE if ii == "traced" else None
        ref = {v: refs[name][i, v] for i, v in enumerate(values) if 0 <= v < C}
        try:
          _check_none(loss, values, ignore_index, ref)
        except AssertionError as e:
          raise AssertionError(f"{name} {dtype} ignore={ignore_index}: {e}") from e


@pytest.mark.parametrize("ignore_index", [0, C - 1, IGNORE])
def test_static_ignore_index_inside_the_class_range(ignore_index):
  for dtype in ("uint8", "int16"):
    values = [v for v in (0, 1, C - 1, 156, 255) if v <= np.iinfo(dtype).max]
    x = _logits(len(values))
    y = jnp.asarray(np.array(values, dtype))
    got = jax.jit(lambda x, y: jaxce.cross_entropy(
        x, y, ignore_index=ignore_index, reduction="none"))(x, y)
    table = _ce_table(x)
    _check_none(got, values, ignore_index, {v: table[i, v] for i, v in enumerate(values)})


def test_uint16_token_ids_with_a_64k_vocabulary():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 65536)), jnp.float32)
  y = jnp.asarray([0, 65535, 40000], jnp.uint16)

  def losses(y):
    return (jaxce.cross_entropy(x, y), jaxce.softmax_cross_entropy_with_integer_labels(x, y),
            jaxce.checked.cross_entropy(x, y))

  f = jaxce.checked.raising(jax.jit(losses))
  got, want = f(y), f(y.astype(jnp.int32))
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-6)
  assert np.isfinite(want[0])


@pytest.mark.parametrize("dtype", ["int8", "uint8", "uint16", "uint32"])
def test_mean_matches_int32_and_wrap_values_are_not_ignored(dtype):
  """'mean' over classes and ignored labels equals the int32 'mean', and the
  uint value that wraps to -100 counts as a class (uint8 156 with C=300)."""
  values = [v for v in (0, 156, 255, C - 1, 65436) if v <= np.iinfo(dtype).max]
  values = [v for v in values if v < C] + [IGNORE] * (dtype.startswith("int"))
  x = _logits(len(values))
  y32 = jnp.asarray(values, jnp.int32)
  y = jnp.asarray(np.array(values, dtype))
  f = jax.jit(lambda y: jaxce.cross_entropy(x, y))
  np.testing.assert_allclose(f(y), f(y32), rtol=1e-6)
  k = jnp.asarray(np.random.default_rng(1).normal(size=(D, C)), jnp.float32)
  xs = jnp.eye(len(values), D, dtype=jnp.float32)
  # The 32-bit fused path (reduction "mean", chunk_size None) too.
  lin = jax.jit(lambda y: jaxce.linear_cross_entropy(xs, k, y))
  np.testing.assert_allclose(lin(y), lin(y32), rtol=1e-6)


def test_out_of_range_values_stay_out_of_range():
  x = _logits(2)
  # uint32 4294967196 and int64 4294967196 are -100 in int32: never ignored.
  for y in (jnp.asarray([4294967196, 1], jnp.uint32), np.array([4294967196, 1], np.int64),
            np.array([2**64 - 100, 1], np.uint64)):
    got = jaxce.cross_entropy(x, y, reduction="none")
    assert np.isnan(got[0]), (y.dtype, got)
    assert np.isfinite(got[1]), (y.dtype, got)


def test_weighted_mean_of_out_of_range_labels_is_nan():
  """Class weights: a label outside [0, C) has no class and so no weight; the
  mean is NaN, also where the weight a clip would read is 0 (it was 0.0, the
  all-ignored value) and whatever the backward path of the fused loss."""
  x = _logits(3)
  w = jnp.linspace(0.5, 2.0, C).at[0].set(0.0).at[C - 1].set(0.0)
  xs, k = jnp.asarray(_eye(3)), jnp.asarray(np.random.default_rng(1).normal(size=(D, C)),
                                            jnp.float32)
  for y in ([C, -1, C + 5], [C, 1, -3]):
    y = jnp.asarray(y, jnp.int32)
    losses = {
        "cross_entropy": jaxce.cross_entropy(x, y, weight=w),
        "smoothing": jaxce.cross_entropy(x, y, weight=w, label_smoothing=0.1),
        "nll_loss": jaxce.nll_loss(jaxce.log_softmax(x), y, weight=w),
        **{f"linear_{b}": jaxce.linear_cross_entropy(xs, k, y, weight=w, backward=b)
           for b in ("recompute", "precompute")},
    }
    for name, loss in losses.items():
      assert np.isnan(loss), (name, y, loss)
  # Ignored labels still count for nothing: all ignored is 0.0.
  y = jnp.asarray([IGNORE, IGNORE, IGNORE], jnp.int32)
  assert jaxce.cross_entropy(x, y, weight=w) == 0.0
  # One bad label among good ones weighs 0 in the denominator (as on every
  # device of a class split; the clip read w[C - 1] here): the good rows'
  # gradients are those of the good rows' mean, the bad row's NaN.
  w = jnp.linspace(0.5, 2.0, C)
  y = jnp.asarray([C, 1, 2], jnp.int32)
  g = jax.grad(lambda x: jaxce.cross_entropy(x, y, weight=w))(x)
  want = jax.grad(lambda x: jaxce.cross_entropy(x, y[1:], weight=w))(x[1:])
  np.testing.assert_allclose(g[1:], want, rtol=1e-6)
  assert np.all(np.isnan(g[0]))


def test_any_python_int_ignore_index():
  """Like torch (any int64), and wider: a value no label can hold ignores
  nothing; no OverflowError; numpy integers too."""
  x = _logits(3)
  y = jnp.asarray([5, 1, 2], jnp.int32)
  table = _ce_table(x)
  for ignore_index in (2**31, 2**63, -2**31 - 1, 2**70, -2**70, np.int64(5), np.uint64(2**63),
                       np.array(2**32 + 1), np.array(2**32 + 5, np.uint64), np.array(5)):
    got = jaxce.cross_entropy(x, y, ignore_index=ignore_index, reduction="none")
    want = table[np.arange(3), [5, 1, 2]]
    if int(ignore_index) == 5:
      want[0] = 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # (0-d NumPy arrays beyond int32 were cut to 32 bits: 2**32 + 1 ignored class 1)
  lp = jaxce.log_softmax(x)
  np.testing.assert_allclose(
      jaxce.nll_loss(lp, y, ignore_index=np.array(2**32 + 1), reduction="none"),
      -np.asarray(lp)[np.arange(3), [5, 1, 2]], rtol=1e-6)
  # The fused linear path too (it takes ignore_index as a static option).
  xs, k = jnp.asarray(_eye(3)), jnp.ones((D, C), jnp.float32)
  for ignore_index in (2**40, np.array(2**32 + 1)):
    np.testing.assert_allclose(
        jaxce.linear_cross_entropy(xs, k, y, ignore_index=ignore_index), np.log(C), rtol=1e-6)


def test_python_labels_beyond_int32():
  """Python ints (and lists of them) beyond int32 are labels outside [0, C),
  NaN at their position as for a NumPy int64 array, not an OverflowError."""
  x = _logits(2)
  want = np.array([_ce_table(x)[0, 1], np.nan])
  for labels in ([1, 2**32 + 1], (1, 2**40), np.array([1, 2**32 + 1])):
    np.testing.assert_allclose(jaxce.cross_entropy(x, labels, reduction="none"), want,
                               rtol=1e-6)
  assert np.isnan(jaxce.cross_entropy(x[0], 2**32 + 1))
  xs, k = jnp.asarray(_eye(2)), jnp.ones((D, C), jnp.float32)
  assert np.isnan(jaxce.linear_cross_entropy(xs, k, [0, 2**32 + 1], reduction="none")[1])


@pytest.mark.parametrize("ignore_dtype", ["int32", "uint32", "int8"])
def test_traced_ignore_index_on_every_path(ignore_dtype):
  """A traced ignore_index follows the same rule as a static one, on every
  path (the 32-bit fused linear path included), compared without wrap."""
  values = [5, 1, 2, 156]
  x = _logits(4)
  y = jnp.asarray(values, jnp.uint8)
  xs = jnp.asarray(_eye(4))
  k = jnp.asarray(np.random.default_rng(1).normal(size=(D, C)), jnp.float32)
  lp = jaxce.log_softmax(x)
  tables = (_ce_table(x), _ce_table(x), _ce_table(_eye(4) @ np.asarray(k)))

  @jax.jit
  def losses(ii):
    return (jaxce.cross_entropy(x, y, ignore_index=ii),
            jaxce.nll_loss(lp, y, ignore_index=ii),
            jaxce.linear_cross_entropy(xs, k, y, ignore_index=ii),
            jaxce.linear_cross_entropy(xs, k, y, ignore_index=ii, chunk_size=64))

  info = np.iinfo(ignore_dtype)
  for value in (v for v in (2, 156, -100) if info.min <= v <= info.max):
    got = losses(jnp.asarray(value, ignore_dtype))
    kept = [i for i, v in enumerate(values) if v != value]
    for loss, table in zip(got, (*tables, tables[2]), strict=True):
      np.testing.assert_allclose(loss, table[kept, [values[i] for i in kept]].mean(), rtol=1e-5,
                                 err_msg=f"ignore_index={value}")


def test_bad_ignore_index_types():
  x, y = _logits(2), jnp.asarray([0, 1])
  for bad in (1.5, True, jnp.zeros((2,), jnp.int32), jnp.float32(1)):
    with pytest.raises(TypeError, match="ignore_index"):
      jaxce.cross_entropy(x, y, ignore_index=bad)


@pytest.mark.parametrize("dtype", [  # (the other widths: `pytest -m slow`, which .ci/run runs)
    d if d in ("int8", "uint8", "uint32", "int64", "int4") else pytest.param(
        d, marks=pytest.mark.slow) for d in DTYPES])
def test_checked_uses_the_same_rule(dtype):
  """jaxce.checked accepts valid classes and ignored labels of every dtype
  and flags exactly the out-of-range values, naming the user's value."""
  with jax.enable_x64(True):
    values = _boundary_values(dtype)
    x = _logits(len(values))
    kinds = _expected(values, IGNORE)
    y = jnp.asarray(np.array(values, jnp.dtype(dtype)))
    f = jax.jit(lambda x, y: jaxce.checked.cross_entropy(x, y, reduction="none"))
    err, _ = checkify.checkify(f)(x, y)
    bad = [v for v, k in zip(values, kinds, strict=True) if k == "bad"]
    if bad:
      assert f"label {bad[0]} at flat position {values.index(bad[0])}" in err.get()
    else:
      assert err.get() is None
    ok = np.array([v for v, k in zip(values, kinds, strict=True) if k != "bad"],
                  jnp.dtype(dtype))
    err, _ = checkify.checkify(f)(_logits(len(ok)), jnp.asarray(ok))
    assert err.get() is None, err.get()


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_checked_host_int64_labels(jit):
  """numpy's default integer labels (int64, which JAX truncates without x64,
  also as arguments of jax.jit: here they are constants of the function)
  under `checked.raising`: checked on the host copy, whose values the error
  names (the check read a traced mask and failed on every call); with a
  traced ignore_index, compared on device and the position named."""
  x = _logits(3)
  wrap = jax.jit if jit else (lambda f: f)

  def checked(y):
    return jaxce.checked.raising(wrap(lambda x, ii: jaxce.checked.cross_entropy(
        x, y, ignore_index=IGNORE if ii is None else ii)))

  good = np.array([0, IGNORE, C - 1])
  np.testing.assert_allclose(checked(good)(x, None),
                             jaxce.cross_entropy(x, jnp.asarray(good, jnp.int32)), rtol=1e-6)
  with pytest.raises(Exception, match=rf"label {2**40} at flat position 1 is outside \[0, {C}\)"):
    checked(np.array([0, 2**40, 1]))(x, None)
  with pytest.raises(Exception, match=rf"the label at flat position 1 is outside \[0, {C}\)"):
    checked(np.array([0, 2**32 + IGNORE, 1]))(x, jnp.asarray(IGNORE))


def test_checked_docstrings_say_they_check():
  """help() of a checked loss starts by saying that it checks the labels
  (its body is the plain loss's, which says such labels give NaN)."""
  for name in ("cross_entropy", "nll_loss", "linear_cross_entropy",
               "softmax_cross_entropy_with_integer_labels"):
    doc = inspect.getdoc(getattr(jaxce.checked, name))
    assert doc.startswith(f"Checked :func:`jaxce.{name}`: labels outside [0, C)"), doc[:80]
    assert inspect.getdoc(getattr(jaxce, name)) in doc
