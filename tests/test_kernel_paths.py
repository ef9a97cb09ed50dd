"""`cross_entropy` across the CPU kernel's shape-dependent paths, with the
options drawn together, against the float64 references of `reference.py`.

The CPU kernel picks its log-sum by shape: class columns up to
`_stats.NARROW_ROW` classes, blocks where C has a divisor in [64, 2048]
(float32 without `where`), the arithmetic mask otherwise, the max instead of
the label's logit where a label lies far below its row's max, and another
layout on axis 1 of (N, C, H, W) logits. Each class count below (both sides
of those bounds) is a case of its own; hypothesis draws the rows, the
layout, the options, the dtypes and the data's seed together, so that a
combination no hand-written case names is still compared with the
reference. (The redo of only the far rows needs one CPU device, and these
tests run with eight: `test_numerics.py::test_far_labels_redo_their_rows`
covers it.) Slow (`pytest -m slow`): each draw compiles its own program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxce
from jaxce import _stats

pytestmark = pytest.mark.slow

CLASSES = (1, 2, 10, _stats.NARROW_ROW, _stats.NARROW_ROW + 1, 100, 256, 1000, 4099)
ROWS = (0, 1, 7, 64, _stats.FEW_ROWS_FROM + 1)
LAYOUTS = ("last", "nchw", "first")
# Gradient tolerance against the largest reference entry: float32 rounding
# over a few thousand classes (the CPU's label-logit shift; z-loss), and one
# rounding of the gradient to the input's half-precision dtype.
GRAD_TOL = {"float32": 8e-6, "bfloat16": 4e-3, "float16": 1e-3}


class Case:
  """One drawn configuration, its inputs made from `seed` with NumPy."""

  def __init__(self, num_classes, rows, layout, dtype, scale, neg_inf, seed):
    rng = np.random.default_rng(seed)
    self.num_classes, self.dtype = num_classes, dtype
    if layout == "nchw":
      shape, self.axis = (rows, num_classes, 3, 2), 1
    elif layout == "first":
      shape, self.axis = (num_classes, rows), 0
    else:
      shape, self.axis = (rows, num_classes), -1
    x = rng.normal(size=shape) * scale
    if neg_inf:
      x[rng.random(size=shape) < 0.2] = -np.inf
    self.rng, self.shape, self.x = rng, shape, x

  def rows_last(self, a):
    return np.moveaxis(a, self.axis, -1)

  def rounded(self, x):
    """The logits as the kernel sees them: rounded to the input dtype."""
    return np.asarray(jnp.asarray(x, self.dtype).astype(jnp.float32), np.float64)


def _grad_atol(rg, dtype):
  finite = np.abs(rg[np.isfinite(rg)])
  return GRAD_TOL[dtype] * max(finite.max() if finite.size else 0.0, 1e-3)


def _label_entry_atol(x, kw, cot, denominator):
  """A bound at the label's gradient entry, which is formed at the scale of
  1 times the position's upstream and class weight: with smoothing eps and
  z-loss z, (eps + 2 z |lse|) 2^-23 of that scale (docs/guides/backward.md),
  here (1 + eps + 2 z |lse|) 2^-22 (a row of one class, whose entry is 0,
  came out as 2^-23 of it with weights and smoothing)."""
  finite = np.abs(x[np.isfinite(x)])
  lse = (finite.max() if finite.size else 0.0) + np.log(max(x.shape[-1], 1))
  upstream = np.max(np.abs(cot)) if np.size(cot) else 0.0
  if kw["reduction"] == "mean":
    upstream /= max(denominator, 1e-30)
  weight = np.max(kw["weight"]) if "weight" in kw else 1.0
  return (1 + kw["label_smoothing"] + 2 * kw["z_loss"] * lse) * 2.0**-22 * upstream * weight


def _assert_loss(loss, rl):
  finite = np.abs(np.atleast_1d(rl)[np.isfinite(np.atleast_1d(rl))])
  np.testing.assert_allclose(np.asarray(loss, np.float64), rl, rtol=2e-5,
                             atol=1e-6 * max(finite.max() if finite.size else 0.0, 1.0))


def _assert_grad(got, want, atol):
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32), np.float64), want, rtol=0,
                             atol=atol)


def case_st(num_classes):
  return st.builds(
      Case, st.just(num_classes), st.sampled_from(ROWS), st.sampled_from(LAYOUTS),
      st.sampled_from(["float32", "float32", "bfloat16", "float16"]),
      st.sampled_from([1.0, 30.0, 1e3]), st.booleans(), st.integers(0, 2**31 - 1))


# Label smoothing not 1.0: the label's gradient entry is rounded at 1, a
# documented bound of about 800 ulps of a near-uniform row's largest entry at
# eps = 1, which `test_numerics.py::test_cpu_label_shift_gradient_bound`
# holds (docs/guides/backward.md).
options_st = st.fixed_dictionaries({
    "weight": st.booleans(), "label_smoothing": st.sampled_from([0.0, 0.1, 0.5]),
    "z_loss": st.sampled_from([0.0, 1e-3]), "reduction": st.sampled_from(["mean", "sum", "none"]),
    "where": st.booleans()})


def _options(case, drawn):
  """(keyword arguments for jaxce and the reference, the `where` mask)."""
  kw = {k: drawn[k] for k in ("label_smoothing", "z_loss", "reduction")}
  if drawn["weight"]:
    kw["weight"] = case.rng.uniform(0.1, 2.0, size=case.num_classes).astype(np.float32)
  where = case.rng.random(size=case.shape) < 0.8 if drawn["where"] else None
  return kw, where


def _cotangent(case, loss):
  return case.rng.normal(size=np.shape(loss)).astype(np.float32)


@pytest.mark.parametrize("num_classes", CLASSES)
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_integer_labels_on_every_path(num_classes, data):
  _integer_labels(data.draw(case_st(num_classes)), data.draw(options_st),
                  data.draw(st.sampled_from(["int32", "int16", "uint8", "uint16"])),
                  data.draw(st.sampled_from([-100, None, "a class"])), data.draw(st.booleans()))


def _integer_labels(case, drawn, label_dtype, ignore, far):
  c = case.num_classes
  if label_dtype == "uint8" and c > 255:
    label_dtype = "int16"
  lshape = tuple(s for i, s in enumerate(case.shape) if i != case.axis % len(case.shape))
  labels = case.rng.integers(0, c, size=lshape)
  ignore_index = int(case.rng.integers(0, c)) if ignore == "a class" else ignore
  if ignore_index == -100 and label_dtype.startswith("u"):
    ignore_index = None
  if ignore_index is not None and labels.size:
    labels.flat[case.rng.integers(0, labels.size)] = ignore_index
  kw, where = _options(case, drawn)
  # The label's logit finite and its class inside `where`: the documented
  # +inf / NaN of a label on a removed class is tested elsewhere.
  at = np.where((labels >= 0) & (labels < c), labels, 0)[..., None]
  x = case.rows_last(case.x.copy())
  x_at = np.take_along_axis(x, at, -1)
  np.put_along_axis(x, at, np.where(np.isfinite(x_at), x_at, 0.0), -1)
  if far and x.size:
    # A few rows whose label lies far below their max: the CPU's label-logit
    # shift underflows there, and the batch is redone with the max.
    flat_x, flat_at = x.reshape(-1, c), at.reshape(-1, 1)
    for r in case.rng.choice(len(flat_x), size=min(3, len(flat_x)), replace=False):
      np.put_along_axis(flat_x[r:r + 1], flat_at[r:r + 1], np.nanmax(
          np.where(np.isfinite(flat_x[r]), flat_x[r], np.nan)) - 200.0, -1)
    x = flat_x.reshape(x.shape)
  x = case.rounded(np.moveaxis(x, -1, case.axis))
  if where is not None:
    w = case.rows_last(where)
    np.put_along_axis(w, at, True, -1)
    where = np.moveaxis(w, -1, case.axis)
  labels = labels.astype(label_dtype)

  def loss_fn(x):
    return jaxce.cross_entropy(
        x, jnp.asarray(labels), axis=case.axis, ignore_index=ignore_index,
        where=None if where is None else jnp.asarray(where),
        **{k: jnp.asarray(v) if k == "weight" else v for k, v in kw.items()})

  xl = jnp.asarray(x, case.dtype)
  loss, vjp = jax.jit(lambda x: jax.vjp(loss_fn, x))(xl)
  cot = _cotangent(case, loss)
  (grad,) = jax.jit(vjp)(jnp.asarray(cot))
  rkw = dict(kw, axis=case.axis, where=where, ignore_index=ignore_index)
  wide = labels.astype(np.int64)
  rl = ref.cross_entropy_int(x, wide, **rkw)
  rg = ref.cross_entropy_int_grad(
      x, wide, cot=None if kw["reduction"] != "none" else cot.astype(np.float64), **rkw)
  if kw["reduction"] != "none":
    rg = rg * float(cot)
  # ("mean" divides by the label weights of the positions not ignored)
  denominator = float(np.sum(ref._int_parts(
      x, wide, kw.get("weight"), ignore_index, case.axis, where).w_y))
  atol = _grad_atol(rg, case.dtype) + _label_entry_atol(case.rows_last(x), kw, cot, denominator)
  _assert_loss(loss, rl)
  _assert_grad(grad, rg, atol)


@pytest.mark.parametrize("num_classes", CLASSES)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_probability_targets_on_every_path(num_classes, data):
  case, drawn = data.draw(case_st(num_classes)), data.draw(options_st)
  kw, where = _options(case, drawn)
  x = case.rows_last(case.x.copy())
  # One finite logit in every row (a row with none is the documented 0).
  x[..., 0] = np.where(np.isfinite(x[..., 0]), x[..., 0], 0.0)
  x = case.rounded(np.moveaxis(x, -1, case.axis))
  if where is not None:
    w = case.rows_last(where)
    w[..., 0] = True
    where = np.moveaxis(w, -1, case.axis)
  t = case.rows_last(np.zeros(case.shape))
  t[...] = case.rng.dirichlet(np.full(case.num_classes, 0.5), size=t.shape[:-1])
  t = np.moveaxis(t, -1, case.axis)
  # No target mass where a class is removed (documented: +inf, or dropped).
  t = np.where(np.isneginf(x) | (False if where is None else ~where), 0.0, t)
  t = case.rounded(t)

  def loss_fn(x, t):
    return jaxce.cross_entropy(
        x, t, axis=case.axis, where=None if where is None else jnp.asarray(where),
        **{k: jnp.asarray(v) if k == "weight" else v for k, v in kw.items()})

  xl, tl = jnp.asarray(x, case.dtype), jnp.asarray(t, case.dtype)
  loss, vjp = jax.jit(lambda x, t: jax.vjp(loss_fn, x, t))(xl, tl)
  cot = _cotangent(case, loss)
  gx, gt = jax.jit(vjp)(jnp.asarray(cot))
  rkw = dict(kw, axis=case.axis, where=where)
  rl = ref.cross_entropy_prob(x, t, **rkw)
  rgx, rgt = ref.cross_entropy_prob_grad(
      x, t, cot=None if kw["reduction"] != "none" else cot.astype(np.float64), **rkw)
  if kw["reduction"] != "none":
    rgx, rgt = rgx * float(cot), rgt * float(cot)
  rgt = np.where(np.isneginf(x), 0.0, rgt)  # documented: 0 on a -inf class
  # (the entries mass * p - w * q are formed at the scale of the target mass)
  atol = _grad_atol(rgx, case.dtype) + _label_entry_atol(
      case.rows_last(x), kw, cot, float(x.size // max(case.num_classes, 1)))
  _assert_loss(loss, rl)
  _assert_grad(gx, rgx, atol)
  _assert_grad(gt, rgt, _grad_atol(rgt, case.dtype))
