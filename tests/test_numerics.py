"""Numerics: output and gradient dtypes, bfloat16 accuracy, logits of magnitude
3e4, -inf logits, rows with every class masked and all-ignored batches, each
against a float64 NumPy reference written here."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_compile import compile_as_shipped

import jaxce

# ---------------------------------------------------------------------------
# Float64 NumPy reference (classes on the last axis). Each returns the
# per-position loss, the "mean" and the gradient of the "mean" w.r.t. logits.


def np_logsumexp(x):
  """log sum exp over the last axis by max shift; -inf for an all -inf row."""
  m = np.max(x, -1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return (m + np.log(np.sum(np.exp(x - m), -1, keepdims=True)))[..., 0]


def _prep(x, where):
  x = np.asarray(x, np.float64)
  if where is not None:
    x = np.where(np.broadcast_to(where, x.shape), x, -np.inf)
  act = x > -np.inf
  lse = np_logsumexp(x)
  alive = np.isfinite(lse)
  lse0 = np.where(alive, lse, 0.0)
  with np.errstate(over="ignore"):  # masked entries, discarded
    p = np.where(act, np.exp(np.where(act, x, 0.0) - lse0[:, None]), 0.0)
  return x, act, alive, lse0, p


def ref_ce_int(x, y, weight=None, ignore_index=-100, eps=0.0, z=0.0, where=None):
  x, act, alive, lse0, p = _prep(x, where)
  _n, c = x.shape
  y = np.asarray(y)
  w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
  valid = y != ignore_index
  keep = valid & alive
  yc = np.clip(y, 0, c - 1)
  w_y = np.where(valid, w[yc], 0.0)
  hot = (np.arange(c)[None, :] == yc[:, None]) & keep[:, None]
  nlp = np.where(act, lse0[:, None] - np.where(act, x, 0.0), 0.0)  # -log p, active
  k = np.maximum(act.sum(-1), 1)[:, None]
  wa = np.where(act, w[None, :], 0.0)
  loss = (1 - eps) * w_y * np.sum(np.where(hot, nlp, 0.0), -1)
  loss = loss + eps * np.sum(wa * nlp, -1) / k[:, 0] + z * lse0**2
  loss = np.where(keep, loss, 0.0)
  g = (1 - eps) * w_y[:, None] * (p - hot) + eps * (wa.sum(-1, keepdims=True) * p - wa) / k
  g = np.where(keep[:, None], g + 2 * z * lse0[:, None] * p, 0.0)
  d = w_y.sum()
  d = 1.0 if d == 0 else d
  return loss, loss.sum() / d, g / d


def ref_ce_probs(x, t, weight=None, eps=0.0, z=0.0, where=None):
  x, act, alive, lse0, p = _prep(x, where)
  n, c = x.shape
  w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
  k = np.maximum(act.sum(-1), 1)[:, None]
  q = (1 - eps) * np.asarray(t, np.float64) + np.where(act, eps / k, 0.0)
  if where is not None:
    q = np.where(np.broadcast_to(where, x.shape), q, 0.0)
  wq = w[None, :] * q
  with np.errstate(invalid="ignore"):
    nlp = np.where(wq == 0, 0.0, lse0[:, None] - x)
  loss = np.where(alive, np.sum(wq * nlp, -1) + z * lse0**2, 0.0)
  g = wq.sum(-1, keepdims=True) * p - wq + 2 * z * lse0[:, None] * p
  g = np.where(alive[:, None], g, 0.0)
  return loss, loss.mean(), g / n


def np_softplus(x):
  return np.logaddexp(0.0, x)


def np_sigmoid(x):
  return np.exp(-np.logaddexp(0.0, -x))


def ref_bce(x, t, weight=None, pos_weight=None):
  x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
  w = 1.0 if weight is None else np.asarray(weight, np.float64)
  pw = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
  loss = w * (pw * t * np_softplus(-x) + (1 - t) * np_softplus(x))
  g = w * ((1 - t) * np_sigmoid(x) - pw * t * np_sigmoid(-x))
  return loss, loss.mean(), g / x.size


def _rng(seed=0):
  return np.random.default_rng(seed)


def _close(actual, desired, rtol, atol=0.0, what=""):
  actual = np.asarray(actual, np.float64)
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=what)


_STATIC = ("reduction", "label_smoothing", "z_loss", "axis", "ignore_index")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _ce_eval(x, y, weight=None, where=None, **kw):
  """Per-position loss, "mean" loss and its gradients w.r.t. logits (and
  weight): one compiled program per static option set."""
  per = jaxce.cross_entropy(x, y, weight=weight, where=where, reduction="none", **kw)
  f = lambda x, w: jaxce.cross_entropy(x, y, weight=w, where=where, **kw)
  if weight is None:
    loss, gx = jax.value_and_grad(f)(x, None)
    return per, loss, gx, None
  loss, (gx, gw) = jax.value_and_grad(f, (0, 1))(x, weight)
  return per, loss, gx, gw


# ---------------------------------------------------------------------------
# Dtypes: losses in float32 (float64 for float64), gradients in each input's
# dtype.

DTYPES = {
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float64": jnp.float64,
}


def _maybe_x64(dt):
  return jax.enable_x64(True) if dt is jnp.float64 else jax.enable_x64(False)


def _loss_dtype(dt):
  return jnp.float64 if dt is jnp.float64 else jnp.float32


def _dtype_cases(dt):
  n, c = 4, 6
  rng = _rng(0)
  x = jnp.asarray(rng.normal(size=(n, c)), dt)
  t = jnp.asarray(rng.dirichlet(np.ones(c), size=n), dt)
  bt = jnp.asarray(rng.uniform(size=(n, c)), dt)
  w = jnp.asarray(rng.uniform(0.5, 2, size=c), dt)
  bw = jnp.asarray(rng.uniform(0.5, 2, size=(n, 1)), dt)
  y = jnp.asarray([0, 5, -100, 2], jnp.int32)
  where = jnp.asarray(rng.uniform(size=(n, c)) > 0.2).at[jnp.arange(n), jnp.clip(y, 0)].set(True)
  return {
      "ce_int": (lambda x, w: jaxce.cross_entropy(x, y, weight=w), (x, w)),
      "ce_int_smooth_z": (
          lambda x, w: jaxce.cross_entropy(x, y, weight=w, label_smoothing=0.1, z_loss=1e-3),
          (x, w)),
      "ce_int_where_smooth": (
          lambda x: jaxce.cross_entropy(x, y, where=where, label_smoothing=0.2), (x,)),
      "ce_int_none_axis0": (
          lambda x: jnp.sum(jaxce.cross_entropy(x.T, y, reduction="none", axis=0)), (x,)),
      "ce_probs": (
          lambda x, t, w: jaxce.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=1e-3),
          (x, t, w)),
      "ce_probs_where": (lambda x, t: jaxce.cross_entropy(x, t, where=where), (x, t)),
      "nll": (lambda x, w: jaxce.nll_loss(x, y, weight=w), (x, w)),
      "bce": (
          lambda x, t, w, pw: jaxce.binary_cross_entropy_with_logits(
              x, t, weight=w, pos_weight=pw),
          (x, bt, bw, w)),
  }


@pytest.mark.parametrize("dt", DTYPES.values(), ids=DTYPES.keys())
def test_loss_and_gradient_dtypes(dt):
  # Dtypes are fixed while tracing: eval_shape checks them without compiling.
  with _maybe_x64(dt):
    for case, (fn, args) in _dtype_cases(dt).items():
      loss = jax.eval_shape(fn, *args)
      assert (loss.dtype, loss.shape) == (_loss_dtype(dt), ()), case
      grads = jax.eval_shape(jax.grad(fn, tuple(range(len(args)))), *args)
      for i, (g, a) in enumerate(zip(grads, args, strict=True)):
        assert (g.dtype, g.shape) == (a.dtype, a.shape), f"{case}: gradient {i}"


@pytest.mark.parametrize("dt", DTYPES.values(), ids=DTYPES.keys())
def test_losses_and_gradients_finite_in_every_dtype(dt):
  with _maybe_x64(dt):
    cases = _dtype_cases(dt)

    @jax.jit
    def run():
      return {k: jax.value_and_grad(fn, tuple(range(len(a))))(*a) for k, (fn, a) in cases.items()}

    for case, (loss, grads) in run().items():
      assert np.isfinite(float(loss)), case
      for g in grads:
        assert np.all(np.isfinite(np.asarray(g, np.float64))), case


@pytest.mark.parametrize("dt", DTYPES.values(), ids=DTYPES.keys())
def test_none_reduction_dtype_and_shape(dt):
  with _maybe_x64(dt):
    x = jax.ShapeDtypeStruct((2, 5, 3), dt)
    y = jax.ShapeDtypeStruct((2, 3), jnp.int32)
    out = jax.eval_shape(lambda x, y: jaxce.cross_entropy(x, y, reduction="none", axis=1), x, y)
    assert (out.dtype, out.shape) == (_loss_dtype(dt), (2, 3))
    out = jax.eval_shape(
        lambda x, y: jaxce.nll_loss(x, y, reduction="none", axis=1, ignore_index=2), x, y)
    assert (out.dtype, out.shape) == (_loss_dtype(dt), (2, 3))
    out = jax.eval_shape(
        lambda x: jaxce.binary_cross_entropy_with_logits(x, x, reduction="none"), x)
    assert (out.dtype, out.shape) == (_loss_dtype(dt), (2, 5, 3))
    out = jax.eval_shape(lambda x: jaxce.cross_entropy(x, x, reduction="none", axis=1), x)
    assert (out.dtype, out.shape) == (_loss_dtype(dt), (2, 3))


@pytest.mark.parametrize("dt", DTYPES.values(), ids=DTYPES.keys())
def test_log_softmax_logsumexp_keep_input_dtype(dt):
  with _maybe_x64(dt):
    x = jax.ShapeDtypeStruct((3, 4), dt)
    assert jax.eval_shape(jaxce.log_softmax, x).dtype == dt
    assert jax.eval_shape(jaxce.logsumexp, x).dtype == dt
    for fn in (jaxce.log_softmax, jaxce.logsumexp):
      g = jax.eval_shape(jax.grad(lambda x, fn=fn: jnp.sum(fn(x).astype(_loss_dtype(dt)))), x)
      assert g.dtype == dt


def test_mixed_dtypes_gradients_follow_each_input():
  # bfloat16 logits with float32 weight and targets: each gradient keeps its dtype.
  x = jax.ShapeDtypeStruct((3, 4), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((4,), jnp.float32)
  t = jax.ShapeDtypeStruct((3, 4), jnp.float32)
  y = jnp.arange(3, dtype=jnp.int32)
  shapes = lambda f, *a: tuple(g.dtype for g in jax.eval_shape(
      jax.grad(f, tuple(range(len(a)))), *a))
  assert shapes(lambda x, t, w: jaxce.cross_entropy(x, t, weight=w, label_smoothing=0.1),
                x, t, w) == (jnp.bfloat16, jnp.float32, jnp.float32)
  assert shapes(lambda x, w: jaxce.cross_entropy(x, y, weight=w, label_smoothing=0.1),
                x, w) == (jnp.bfloat16, jnp.float32)
  assert shapes(lambda x, w: jaxce.cross_entropy(x, y, weight=w), x, w) == (
      jnp.bfloat16, jnp.float32)
  assert shapes(lambda x, w: jaxce.nll_loss(x, y, weight=w), x, w) == (jnp.bfloat16, jnp.float32)
  assert shapes(lambda x, t, pw: jaxce.binary_cross_entropy_with_logits(x, t, pos_weight=pw),
                x, t, w) == (jnp.bfloat16, jnp.float32, jnp.float32)
  assert shapes(lambda x, t, w: jaxce.binary_cross_entropy_with_logits(x, t, weight=w),
                x, t, w) == (jnp.bfloat16, jnp.float32, jnp.float32)


SMALL_FLOAT_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 0.01},
    "where": {"where": np.ones((3, 4), bool)},
}


@pytest.mark.parametrize("opts", SMALL_FLOAT_OPTIONS.values(), ids=SMALL_FLOAT_OPTIONS.keys())
@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_float32_loss_under_x64(dt, opts):
  """With jax_enable_x64 on, float32 and half logits still give float32 losses
  (only float64 logits give float64)."""
  with jax.enable_x64(True):
    x = jax.ShapeDtypeStruct((3, 4), dt)
    y = jnp.asarray([0, 3, 1], jnp.int32)
    t = jax.ShapeDtypeStruct((3, 4), dt)
    for labels in (y, t):
      f = lambda x, labels: jaxce.cross_entropy(x, labels, **opts)
      assert jax.eval_shape(f, x, labels).dtype == jnp.float32
      assert jax.eval_shape(jax.grad(f), x, labels).dtype == dt
    assert jax.eval_shape(lambda x: jaxce.nll_loss(x, y), x).dtype == jnp.float32
    assert jax.eval_shape(jaxce.binary_cross_entropy_with_logits, x, t).dtype == jnp.float32


# ---------------------------------------------------------------------------
# bfloat16: float32 internal math, so the loss is as accurate as float32 and
# gradients are within bfloat16 rounding of the exact values.

BF16_RTOL_LOSS = 1e-5
BF16_RTOL_GRAD = 1e-2


def _bf16_inputs(n=16, c=50, scale=4.0):
  rng = _rng(4)
  x = jnp.asarray(rng.normal(size=(n, c)) * scale, jnp.bfloat16)
  y = rng.integers(0, c, size=n)
  y[3] = -100
  t = jnp.asarray(rng.dirichlet(np.ones(c) * 0.3, size=n), jnp.bfloat16)
  w = jnp.asarray(rng.uniform(0.5, 2, size=c), jnp.bfloat16)
  return x, jnp.asarray(y, jnp.int32), t, w


def _f64(a):
  return np.asarray(a, np.float64)


def _grad_close(g, ref, what):
  # Each entry is within bfloat16 rounding (2^-8 relative) of the exact value;
  # the tiny atol absorbs float32 cancellation in p - 1 at the label.
  scale = np.max(np.abs(ref))
  _close(g, ref, rtol=BF16_RTOL_GRAD, atol=1e-6 * scale, what=what)


@pytest.mark.parametrize("opts", [
    {},
    {"label_smoothing": 0.1, "z_loss": 1e-3},
    {"weight": True, "label_smoothing": 0.2},
], ids=["plain", "smooth_z", "weight_smooth"])
def test_bfloat16_integer_targets_accuracy(opts):
  x, y, _, w = _bf16_inputs()
  kw = dict(opts)
  wt = w if kw.pop("weight", False) else None
  per, loss, g, _ = _ce_eval(x, y, weight=wt, **kw)
  assert loss.dtype == jnp.float32
  assert g.dtype == jnp.bfloat16
  ref_none, ref_mean, ref_g = ref_ce_int(
      _f64(x), np.asarray(y), None if wt is None else _f64(wt),
      eps=kw.get("label_smoothing", 0.0), z=kw.get("z_loss", 0.0))
  _close(loss, ref_mean, rtol=BF16_RTOL_LOSS, what="mean loss")
  _close(per, ref_none, rtol=BF16_RTOL_LOSS,
         atol=1e-6, what="per-position loss")
  _grad_close(g, ref_g, "grad logits")


def test_bfloat16_probability_targets_accuracy():
  x, _, t, w = _bf16_inputs()
  f = lambda x, t, w: jaxce.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=1e-3)
  loss, (gx, gt, gw) = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, t, w)
  assert (gx.dtype, gt.dtype, gw.dtype) == (jnp.bfloat16,) * 3
  _, ref_mean, ref_gx = ref_ce_probs(_f64(x), _f64(t), _f64(w), eps=0.1, z=1e-3)
  _close(loss, ref_mean, rtol=BF16_RTOL_LOSS, what="loss")
  _grad_close(gx, ref_gx, "grad logits")
  # d loss / d t_{n,c} = 0.9 w_c (lse_n - x_{n,c}) / N.
  xf = _f64(x)
  ref_gt = 0.9 * _f64(w)[None, :] * (np_logsumexp(xf)[:, None] - xf) / x.shape[0]
  _grad_close(gt, ref_gt, "grad targets")
  q = 0.9 * _f64(t) + 0.1 / x.shape[1]
  ref_gw = np.sum(q * (np_logsumexp(xf)[:, None] - xf), 0) / x.shape[0]
  _grad_close(gw, ref_gw, "grad weight")


def test_bfloat16_bce_accuracy():
  rng = _rng(5)
  x = jnp.asarray(rng.normal(size=(8, 6)) * 5, jnp.bfloat16)
  t = jnp.asarray(rng.uniform(size=(8, 6)), jnp.bfloat16)
  pw = jnp.asarray(rng.uniform(0.5, 3, size=(6,)), jnp.bfloat16)
  f = lambda x, t, pw: jaxce.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
  loss, (gx, gt, gpw) = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, t, pw)
  xf, tf, pwf = _f64(x), _f64(t), _f64(pw)
  _, ref_mean, ref_gx = ref_bce(xf, tf, pos_weight=pwf)
  _close(loss, ref_mean, rtol=BF16_RTOL_LOSS, what="loss")
  _grad_close(gx, ref_gx, "grad logits")
  _grad_close(gt, (pwf * np_softplus(-xf) - np_softplus(xf)) / x.size, "grad targets")
  _grad_close(gpw, np.sum(tf * np_softplus(-xf), 0) / x.size, "grad pos_weight")


_BCE_FORMS = {
    "mean": lambda x, t: jaxce.binary_cross_entropy_with_logits(x, t),
    "sum_pos_weight": lambda x, t: jaxce.binary_cross_entropy_with_logits(
        x, t, pos_weight=jnp.linspace(0.5, 2.0, x.shape[-1]), reduction="sum"),
    "weight": lambda x, t: jaxce.binary_cross_entropy_with_logits(
        x, t, weight=jnp.arange(x.shape[-1], dtype=jnp.float32) % 3),
    "optax_dropin": lambda x, t: jaxce.sigmoid_binary_cross_entropy(x, t).mean(),
}


@pytest.mark.all_platforms
@pytest.mark.parametrize("platform", ["cpu", "tpu", "cuda"])
@pytest.mark.parametrize("form", sorted(_BCE_FORMS))
def test_bfloat16_bce_backward_fuses_its_cotangent(form, platform):
  # value_and_grad through h @ W, lowered (not compiled) for each platform: an
  # optimization_barrier that takes a float32 logits-sized value (the mean's
  # cotangent, broadcast) makes XLA materialize it (TPU v5e, N=2048,
  # C=32768: 512 MiB temp instead of 128). On TPU no logits-sized value may
  # go through a barrier at all: XLA fuses the whole loss into the matmuls.
  n, d, c = 8, 4, 16
  loss = _BCE_FORMS[form]
  f = jax.value_and_grad(lambda h, w, t: loss(h @ w, t), (0, 1))
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((n, d), (d, c), (n, c))]
  text = jax.export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()
  barriers = [line.rsplit(" : ", 1)[1] for line in text.splitlines()
              if "= stablehlo.optimization_barrier" in line]
  operands = [t for types in barriers for t in re.findall(r"tensor<[^>]*>", types)]
  assert f"tensor<{n}x{c}xf32>" not in operands, barriers
  if platform == "tpu":
    assert not [t for t in operands if t.startswith(f"tensor<{n}x{c}x")], barriers
  else:  # CPU: keeps the recomputed exponentials apart from the forward's
    assert f"tensor<{n}x{c}xbf16>" in operands, barriers


@pytest.mark.parametrize("cpu_devices", ["one_device"], indirect=True)
@pytest.mark.parametrize("shape", [(4096, 1), (64, 16, 2)])
@pytest.mark.parametrize("loss", ["logits", "probs"])
def test_bce_narrow_rows_run_flat(loss, shape, cpu_devices):
  # On (N, 1) arrays XLA:CPU's loops ran scalar code, in every fusion of
  # the program (value_and_grad at 262144 x 1: 6.6 ms, flattened 0.69 ms):
  # now only the gradient's last fusion has the input's shape. (As in a
  # process with one CPU device: this one has 8, which keep the shape.)
  f = {"logits": jaxce.binary_cross_entropy_with_logits,
       "probs": jaxce.binary_cross_entropy}[loss]
  args = [jax.ShapeDtypeStruct(shape, jnp.float32)] * 2
  text = compile_as_shipped(jax.jit(jax.value_and_grad(f)).lower(*args)).as_text()
  entry = text[text.index("ENTRY"):]
  shaped = re.findall(r"= f32\[" + ",".join(map(str, shape)) + r"\]\S* fusion\(", entry)
  assert len(shaped) <= 1, entry


@pytest.mark.parametrize("shape", [(5, 1), (4, 3, 2), (6, 64), (3, 65)])
def test_bce_narrow_rows_values(shape, cpu_devices):
  # Both BCE losses flattened (one CPU device, last axis <= 64) or not:
  # value, gradients (logits or probabilities, targets, weight) and a jvp
  # against float64, for every reduction, with scalar-like and full-shape
  # weights and a one-entry pos_weight (which stay on the flat path).
  rng = _rng(37)
  x = rng.normal(size=shape) * 4
  t = rng.uniform(size=shape)
  w = rng.uniform(0.5, 2.0, size=shape)
  for reduction, pw, weight in [("none", None, None), ("mean", [1.5], w), ("sum", None, 2.0)]:
    _check_bce(x, t, reduction, pw, weight)


@pytest.mark.parametrize("cpu_devices", ["one_device"], indirect=True)
def test_bce_narrow_rows_on_an_explicit_mesh(cpu_devices):
  # As in a process with one CPU device, where short rows are flattened:
  # arrays split on an Explicit mesh keep their shape (the reshape raised
  # a ShardingTypeError for a split second axis).
  from jax.sharding import AxisType
  from jax.sharding import PartitionSpec as P

  rng = _rng(43)
  x, t = rng.normal(size=(16, 8)) * 3, rng.uniform(size=(16, 8))
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    for reduction in ("mean", "none"):
      xs, ts = (jax.device_put(jnp.asarray(a, jnp.float32), P("data", "model")) for a in (x, t))
      got = jax.jit(functools.partial(
          jaxce.binary_cross_entropy_with_logits, reduction=reduction))(xs, ts)
      loss, mean, _ = ref_bce(np.asarray(xs, np.float64), np.asarray(ts, np.float64))
      _close(got, mean if reduction == "mean" else loss, rtol=2e-6, atol=1e-7)
      p = jax.device_put(jax.nn.sigmoid(xs), P("data", "model"))
      jaxce.binary_cross_entropy(p, ts, reduction=reduction)  # (no error)


def _check_bce(x, t, reduction, pw, weight):
  f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
  p = np.asarray(f32(np_sigmoid(x)), np.float64)  # (the float32 probabilities)
  loss, _, g = ref_bce(x, t, weight, pos_weight=None if pw is None else np.asarray(pw))
  total = {"none": lambda a: a, "mean": np.mean, "sum": np.sum}[reduction]
  scale = x.size if reduction == "mean" else 1
  f = lambda x, t, w: jaxce.binary_cross_entropy_with_logits(
      x, t, weight=w, pos_weight=f32(pw), reduction=reduction)
  _close(jax.jit(f)(f32(x), f32(t), f32(weight)), total(loss), rtol=2e-6, atol=1e-7)
  gx, gt = jax.grad(lambda *a: jnp.sum(f(*a)), (0, 1))(f32(x), f32(t), f32(weight))
  _close(gx, g * x.size / scale, rtol=2e-5, atol=1e-7)
  pwf = 1.0 if pw is None else np.asarray(pw)
  wf = 1.0 if weight is None else weight
  _close(gt, wf * (pwf * np_softplus(-x) - np_softplus(x)) / scale, rtol=2e-5, atol=1e-7)
  if weight is not None:
    gw = jax.grad(lambda w: jnp.sum(f(f32(x), f32(t), w)))(f32(weight))
    _close(gw, (loss / wf if np.ndim(wf) else np.sum(loss / wf)) / scale, rtol=2e-5, atol=1e-6)
  _, tangent = jax.jvp(lambda x: jnp.sum(f(x, f32(t), f32(weight))), (f32(x),), (f32(t),))
  _close(tangent, np.sum(g * x.size / scale * t), rtol=2e-5, atol=1e-6)
  fp = lambda p, t: jaxce.binary_cross_entropy(p, t, weight=f32(weight), reduction=reduction)
  want = wf * -(t * np.log(p) + (1 - t) * np.log1p(-p))
  _close(jax.jit(fp)(f32(p), f32(t)), total(want), rtol=2e-5, atol=1e-6)
  gp = jax.grad(lambda p: jnp.sum(fp(p, f32(t))))(f32(p))
  _close(gp, wf * (p - t) / (p * (1 - p)) / scale, rtol=1e-4, atol=1e-6)


def test_bfloat16_nll_log_softmax_logsumexp_accuracy():
  x, y, _, _ = _bf16_inputs()
  xf = _f64(x)
  lse = np_logsumexp(xf)
  # Outputs in bfloat16: within bfloat16 rounding of the exact values.
  _close(jaxce.logsumexp(x), lse, rtol=2**-8)
  _close(jaxce.log_softmax(x), xf - lse[:, None], rtol=2**-8, atol=1e-6)
  loss, g = jax.jit(jax.value_and_grad(lambda x: jaxce.nll_loss(jaxce.log_softmax(x), y)))(x)
  _, ref_mean, ref_g = ref_ce_int(xf, np.asarray(y))
  # The log-probabilities are rounded to bfloat16 before the NLL: bf16 accuracy.
  _close(loss, ref_mean, rtol=2**-8)
  _grad_close(g, ref_g, "grad through log_softmax")


# ---------------------------------------------------------------------------
# Logits of magnitude up to 3e4 in float32.

BIG = 3e4


def _big_logits():
  rng = _rng(6)
  x = rng.uniform(-BIG, BIG, size=(8, 16))
  x[0] = BIG  # all tied at the top
  x[1] = -BIG  # all tied at the bottom
  x[2, :] = -BIG
  x[2, 5] = BIG  # one class far above the others
  x[3] = BIG - rng.uniform(0, 3, size=16)  # near ties at the top
  x[4, ::2] = BIG
  x[4, 1::2] = -BIG
  return np.asarray(x, np.float32)


# Float32 holds 3e4 to 2^-9 ~ 2e-3, so values near 3e4 carry that absolute error.
BIG_ATOL = 8 * BIG * 2.0**-24


def _big_labels():
  # Label at the top, at the bottom, and in between.
  return np.array([3, 0, 0, 1, 1, 7, 9, 12], np.int32)


BIG_INT_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-4},
    "weight_smoothing_z": {"weight": True, "label_smoothing": 0.3, "z_loss": 1e-5},
    "where": {"where": True},
}


@pytest.mark.parametrize("opts", BIG_INT_OPTIONS.values(), ids=BIG_INT_OPTIONS.keys())
def test_large_logits_integer_targets(opts):
  x, y = _big_logits(), _big_labels()
  kw = dict(opts)
  w = np.linspace(0.5, 2.0, 16) if kw.pop("weight", False) else None
  where = None
  if kw.pop("where", False):
    where = np.ones(x.shape, bool)
    where[:, 10] = False
    where[5:, 2] = False
  jw = None if w is None else jnp.asarray(w, jnp.float32)
  jwhere = None if where is None else jnp.asarray(where)
  per, loss, g, _ = _ce_eval(jnp.asarray(x), jnp.asarray(y), weight=jw, where=jwhere, **kw)
  eps, z = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
  ref_none, ref_mean, ref_g = ref_ce_int(x, y, w, eps=eps, z=z, where=where)
  assert np.all(np.isfinite(per))
  assert np.all(np.isfinite(g))
  lse_scale = 1.0 + 2 * z * BIG  # z-loss multiplies lse errors by 2 z lse
  _close(per, ref_none, rtol=1e-6, atol=BIG_ATOL * lse_scale, what="per-position loss")
  _close(loss, ref_mean, rtol=1e-6, atol=BIG_ATOL * lse_scale, what="mean loss")
  # Loose on purpose (finite and right to ~1e-3): see test_large_logits_precision
  # for the float32 accuracy the loss could have.
  _close(g, ref_g, rtol=4e-3, atol=1e-3 * np.max(np.abs(ref_g)), what="gradient")


def test_large_logits_probability_targets():
  x = _big_logits()
  t = _rng(7).dirichlet(np.ones(16), size=8).astype(np.float32)
  per, loss, g, _ = _ce_eval(jnp.asarray(x), jnp.asarray(t), label_smoothing=0.1)
  ref_none, ref_mean, ref_g = ref_ce_probs(x, t.astype(np.float64), eps=0.1)
  assert np.all(np.isfinite(per))
  assert np.all(np.isfinite(g))
  # mass * lse - sum(q x) cancels two numbers of size 3e4.
  _close(per, ref_none, rtol=1e-6, atol=4 * BIG_ATOL)
  _close(loss, ref_mean, rtol=1e-6, atol=4 * BIG_ATOL)
  _close(g, ref_g, rtol=4e-3, atol=1e-3 * np.max(np.abs(ref_g)))


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}], ids=["plain", "smoothing"])
def test_large_logits_precision(opts):
  """Float32 logits are exact inputs: -log p and p depend only on differences
  of logits, which float32 holds exactly here (16 classes tied at 3e4, and
  nearly tied rows), so loss and gradient should be accurate to float32
  rounding, as jax.nn.log_softmax and optax are (they shift by the max before
  the log), not to the ~1e-3 absolute error of a float32 logsumexp near 3e4."""
  x = np.full((2, 16), BIG, np.float32)
  x[1] -= np.arange(16, dtype=np.float32) * 0.5  # exact in float32
  y = np.array([0, 5], np.int32)
  per, _, g, _ = _ce_eval(jnp.asarray(x), jnp.asarray(y), **opts)
  ref_none, _, ref_g = ref_ce_int(x, y, eps=opts.get("label_smoothing", 0.0))
  _close(per, ref_none, rtol=1e-5, what="per-position loss")
  _close(g, ref_g, rtol=1e-5, atol=1e-8, what="gradient")
  # The same inputs shifted down to 0: the exact same values.
  per0, _, _, _ = _ce_eval(jnp.asarray(x - BIG), jnp.asarray(y), **opts)
  _close(per, per0, rtol=1e-5)
  lse = np_logsumexp(x.astype(np.float64))
  _close(jaxce.log_softmax(jnp.asarray(x)), x - lse[:, None], rtol=1e-5, what="log_softmax")


def test_large_logits_bce_and_log_softmax():
  x = _big_logits()
  t = _rng(8).uniform(size=x.shape).astype(np.float32)
  loss, g = jax.jit(jax.value_and_grad(jaxce.binary_cross_entropy_with_logits))(
      jnp.asarray(x), jnp.asarray(t))
  _, ref_mean, ref_g = ref_bce(x, t)
  _close(loss, ref_mean, rtol=1e-6)
  _close(g, ref_g, rtol=1e-6, atol=1e-12)
  lse = np_logsumexp(x.astype(np.float64))
  _close(jaxce.logsumexp(jnp.asarray(x)), lse, rtol=1e-7, atol=BIG_ATOL)
  ls = jaxce.log_softmax(jnp.asarray(x))
  _close(ls, x.astype(np.float64) - lse[:, None], rtol=1e-6, atol=BIG_ATOL)
  cot = jnp.asarray(_rng(9).normal(size=x.shape), jnp.float32)
  g = jax.jit(jax.grad(lambda x: jnp.sum(jaxce.log_softmax(x) * cot)))(jnp.asarray(x))
  p = np.exp(x.astype(np.float64) - lse[:, None])
  ref = _f64(cot) - p * _f64(cot).sum(-1, keepdims=True)
  _close(g, ref, rtol=1e-5, atol=BIG_ATOL * 10)


# ---------------------------------------------------------------------------
# -inf logits on classes that are not the target.


def _neg_inf_case():
  rng = _rng(10)
  x = rng.normal(size=(6, 7)).astype(np.float32) * 3
  y = np.array([0, 3, 6, 2, -100, 1], np.int32)
  ninf = np.zeros(x.shape, bool)
  ninf[0, 1:4] = True
  ninf[1, [0, 6]] = True
  ninf[2, :6] = True  # only the label's class left
  ninf[3, 5] = True
  ninf[4, 0] = True
  x[ninf] = -np.inf
  return x, y, ninf


NEG_INF_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.01},
    "weight_smoothing_z": {"weight": True, "label_smoothing": 0.1, "z_loss": 0.01},
    "where_smoothing": {"where": True, "label_smoothing": 0.3},
}


@pytest.mark.parametrize("opts", NEG_INF_OPTIONS.values(), ids=NEG_INF_OPTIONS.keys())
def test_neg_inf_logits_integer_targets(opts):
  x, y, ninf = _neg_inf_case()
  kw = dict(opts)
  w = np.linspace(0.5, 2.0, 7) if kw.pop("weight", False) else None
  where = None
  if kw.pop("where", False):
    where = np.ones(x.shape, bool)
    where[:, 4] = False  # never a label class here
  jw = None if w is None else jnp.asarray(w, jnp.float32)
  jwhere = None if where is None else jnp.asarray(where)
  eps, z = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
  per, loss, g, gw = _ce_eval(jnp.asarray(x), jnp.asarray(y), weight=jw, where=jwhere, **kw)
  ref_none, ref_mean, ref_g = ref_ce_int(x, y, w, eps=eps, z=z, where=where)
  assert np.all(np.isfinite(per)), per
  assert np.all(np.isfinite(g)), g
  assert np.all(np.asarray(g)[ninf] == 0)
  _close(per, ref_none, rtol=1e-5, atol=1e-6)
  _close(loss, ref_mean, rtol=1e-5)
  _close(g, ref_g, rtol=1e-5, atol=1e-7)
  if jw is not None:
    assert np.all(np.isfinite(gw)), gw


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_neg_inf_logits_probability_targets(eps):
  x, _, ninf = _neg_inf_case()
  rng = _rng(11)
  t = np.where(ninf, 0.0, rng.uniform(size=x.shape))
  t = (t / t.sum(-1, keepdims=True)).astype(np.float32)
  w = np.linspace(0.5, 2.0, 7)
  per, loss, gx, gw = _ce_eval(jnp.asarray(x), jnp.asarray(t), jnp.asarray(w, jnp.float32),
                               label_smoothing=eps, z_loss=0.01)
  ref_none, ref_mean, ref_g = ref_ce_probs(x, t, w, eps=eps, z=0.01)
  assert np.all(np.isfinite(per))
  for a in (gx, gw):
    assert np.all(np.isfinite(a))
  assert np.all(np.asarray(gx)[ninf] == 0)
  _close(per, ref_none, rtol=1e-5, atol=1e-6)
  _close(loss, ref_mean, rtol=1e-5)
  _close(gx, ref_g, rtol=1e-5, atol=1e-7)


def test_neg_inf_logits_log_softmax_logsumexp():
  x, _, ninf = _neg_inf_case()
  ls = np.asarray(jaxce.log_softmax(jnp.asarray(x)))
  assert np.all(ls[ninf] == -np.inf)
  assert np.all(np.isfinite(ls[~ninf]))
  cot = np.where(ninf, 0.0, _rng(12).normal(size=x.shape)).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(jnp.where(jnp.asarray(ninf), 0.0, jaxce.log_softmax(x))
                                 * jnp.asarray(cot)))(jnp.asarray(x))
  _, act, _, _lse0, p = _prep(x, None)
  ref = np.where(act, cot - p * cot.sum(-1, keepdims=True), 0.0)
  _close(g, ref, rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda x: jnp.sum(jaxce.logsumexp(x)))(jnp.asarray(x))
  _close(g, p, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(g)[ninf] == 0)


@pytest.mark.parametrize("rows", ["short", "long"])
def test_log_softmax_non_finite_rows_like_jax_nn(branches, rows):
  # The forward has no select (`_log_softmax._plain_shift`): a row with a
  # +inf or NaN entry is NaN throughout, as in jax.nn (and PyTorch); a row
  # of -inf entries only is -inf (jax.nn: NaN). "long": blocked rows on CPU.
  c = 40 if rows == "short" else 65536
  x = np.tile(np.linspace(-3.0, 2.0, c, dtype=np.float32), (5, 1))
  x[0, 7] = np.inf
  x[1, 7] = np.nan
  x[2] = -np.inf
  x[3, ::2] = -np.inf
  for dt in (jnp.float32, jnp.bfloat16):
    xd = jnp.asarray(x, dt)
    got = np.asarray(jaxce.log_softmax(xd), np.float32)
    want = np.asarray(jax.nn.log_softmax(xd), np.float32)
    assert np.all(np.isnan(got[:2]))
    assert np.all(got[2] == -np.inf)
    np.testing.assert_allclose(got[3:], want[3:], rtol=1e-6 if dt == jnp.float32 else 1e-2)
    # logsumexp keeps its +inf (as jax.nn's does).
    lse = np.asarray(jaxce.logsumexp(xd), np.float32)
    assert lse[0] == np.inf
    assert np.isnan(lse[1])
    assert lse[2] == -np.inf


@pytest.mark.parametrize("masking", ["where", "neg_inf", "both"])
def test_log_softmax_derivatives_like_jax_nn(branches, masking):
  # Any cotangent, also on outputs outside `where` (dropped) and on -inf
  # inputs (an ordinary input: derivative 1 at its own output), and any
  # tangent: jax.nn's vjp and jvp. (The cotangent of masked outputs leaked
  # into the other inputs' gradient before, and their tangent was not 0.)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(6, 9)).astype(np.float32)
  where = None
  if masking in ("neg_inf", "both"):
    x[:, 2] = -np.inf
  if masking in ("where", "both"):
    where = jnp.asarray(rng.random((6, 9)) < 0.7).at[:, 0].set(True)
  x = jnp.asarray(x)
  ct = jnp.asarray(rng.normal(size=(6, 9)), jnp.float32)
  tx = jnp.asarray(rng.normal(size=(6, 9)), jnp.float32)
  mine = functools.partial(jaxce.log_softmax, where=where)
  theirs = functools.partial(jax.nn.log_softmax, where=where)
  _, vjp_mine = jax.vjp(mine, x)
  _, vjp_theirs = jax.vjp(theirs, x)
  np.testing.assert_allclose(vjp_mine(ct)[0], vjp_theirs(ct)[0], rtol=1e-5, atol=1e-6)
  _, t_mine = jax.jvp(mine, (x,), (tx,))
  _, t_theirs = jax.jvp(theirs, (x,), (tx,))
  np.testing.assert_allclose(t_mine, t_theirs, rtol=1e-5, atol=1e-6)
  w0 = None if where is None else where[0]
  np.testing.assert_allclose(jax.jacrev(functools.partial(jaxce.log_softmax, where=w0))(x[0]),
                             jax.jacrev(functools.partial(jax.nn.log_softmax, where=w0))(x[0]),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(4096, 1024), (65536, 100), (65536, 10)])
def test_log_softmax_forward_holds_no_shifted_copy(dtype, shape):
  # With selects (a non-finite max to 0, log(0) to -inf, a -inf output
  # row), XLA:CPU wrote x - shift out as an N x C float32 array and read it
  # back: 16 and 25 MiB of temp for this loss. Without them, one fusion, as
  # jax.nn's. (Rows longer than `LONG_ROW` are summed in blocks, apart.)
  dt = jnp.dtype(dtype)
  args = (jax.ShapeDtypeStruct(shape, dt), jax.ShapeDtypeStruct(shape, dt))
  lowered = jax.jit(lambda x, t: jnp.sum((jaxce.log_softmax(x) * t).astype(jnp.float32))
                    ).lower(*args)
  temp = compile_as_shipped(lowered).memory_analysis().temp_size_in_bytes
  assert temp <= shape[0] * 4 * 8, temp


@pytest.mark.parametrize("shape", [(2048, 1024), (2048, 8192), (64, 32000), (65536, 10)])
def test_log_softmax_gradient_holds_no_shifted_copy(shape):
  # XLA's CSE shared the exp-sum's x - shift with the output's, and a
  # consumer that sums the output (here sum(out * t)) made XLA:CPU's
  # YNNPACK fusions take it as a written-out float32 array: 8, 64 and 7.8
  # MiB of temp memory for value_and_grad at these shapes.
  args = (jax.ShapeDtypeStruct(shape, jnp.float32),) * 2
  f = jax.value_and_grad(lambda x, t: jnp.sum(jaxce.log_softmax(x) * t))
  temp = compile_as_shipped(jax.jit(f).lower(*args)).memory_analysis().temp_size_in_bytes
  assert temp <= shape[0] * 4 * 8, temp


@pytest.mark.parametrize("pos_weight", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bce_shares_nothing_logits_sized_with_its_backward(dtype, pos_weight):
  # XLA:CPU's CSE shared the forward's constant broadcasts (and 1 - t, and
  # pos_weight's broadcast) with the backward's, and its YNNPACK fusion of
  # the forward's sum took them as written-out arrays: 3 float32 arrays of
  # the logits' size here (4 with pos_weight) in float32, 4 in bfloat16.
  # Now the backward's own exp(-|x|) and sigmoid, at most.
  n, c = 2048, 1024
  dt = jnp.dtype(dtype)
  pw = jnp.linspace(0.5, 2.0, c).astype(dt) if pos_weight else None
  f = jax.value_and_grad(
      lambda x, t: jaxce.binary_cross_entropy_with_logits(x, t, pos_weight=pw))
  args = (jax.ShapeDtypeStruct((n, c), dt), jax.ShapeDtypeStruct((n, c), dt))
  temp = compile_as_shipped(jax.jit(f).lower(*args)).memory_analysis().temp_size_in_bytes
  assert temp <= (1 if dt == jnp.float32 else 2) * n * c * 4, temp / (n * c * 4)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_where_keeps_no_masked_copy(smoothing):
  # The blocks' view of the masked logits was written out (XLA:CPU's block
  # sums do not fuse the select): 1x the logits of temp memory, 17.6 MiB
  # here. With `where`, rows up to LONG_ROW take the arithmetic mask.
  n, c = 4096, 1024
  where = jnp.arange(c) < c - 8
  f = jax.value_and_grad(lambda x, y: jaxce.cross_entropy(
      x, y, where=where, label_smoothing=smoothing))
  lowered = jax.jit(f).lower(jax.ShapeDtypeStruct((n, c), jnp.float32),
                             jax.ShapeDtypeStruct((n,), jnp.int32))
  temp = compile_as_shipped(lowered).memory_analysis().temp_size_in_bytes
  assert temp <= n * 4 * 16, temp


def test_neg_inf_logits_half_precision():
  x, y, ninf = _neg_inf_case()
  for dt in (jnp.float16, jnp.bfloat16):
    xd = jnp.asarray(x, dt)
    per, loss, g, _ = _ce_eval(xd, jnp.asarray(y), label_smoothing=0.1, z_loss=0.01)
    assert np.all(np.isfinite(per))
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
    assert np.all(np.asarray(g, np.float32)[ninf] == 0)


# ---------------------------------------------------------------------------
# Positions with every class masked contribute 0 with zero gradient.


def _dead_rows_case():
  rng = _rng(13)
  x = rng.normal(size=(5, 4)).astype(np.float32)
  y = np.array([1, 2, 0, 3, 1], np.int32)
  where = np.ones((5, 4), bool)
  where[1] = False  # row 1: nothing left through `where`
  return x, y, where


@pytest.mark.parametrize("how", ["where", "neg_inf"])
@pytest.mark.parametrize("opts", [
    {}, {"label_smoothing": 0.2}, {"z_loss": 0.01},
    {"weight": True, "label_smoothing": 0.1, "z_loss": 0.01},
], ids=["plain", "smoothing", "z_loss", "all"])
def test_fully_masked_rows_integer_targets(opts, how):
  x, y, where = _dead_rows_case()
  kw = dict(opts)
  w = np.linspace(0.5, 2.0, 4) if kw.pop("weight", False) else None
  if how == "neg_inf":
    x = np.where(where, x, -np.inf).astype(np.float32)
    x[3] = -np.inf  # and row 3 all -inf logits
    jwhere = None
  else:
    jwhere = jnp.asarray(where)
  jw = None if w is None else jnp.asarray(w, jnp.float32)
  per, loss, g, gw = _ce_eval(jnp.asarray(x), jnp.asarray(y), weight=jw, where=jwhere, **kw)
  dead = [1, 3] if how == "neg_inf" else [1]
  per, g = np.asarray(per), np.asarray(g)
  assert np.all(per[dead] == 0), per
  assert np.all(g[dead] == 0), g
  assert np.all(np.isfinite(per))
  assert np.all(np.isfinite(g))
  eps, z = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
  ref_where = where if how == "where" else None
  ref_none, ref_mean, ref_g = ref_ce_int(x, y, w, eps=eps, z=z, where=ref_where)
  _close(per, ref_none, rtol=1e-5, atol=1e-7)
  _close(loss, ref_mean, rtol=1e-5)
  _close(g, ref_g, rtol=1e-5, atol=1e-7)
  if jw is not None:
    assert np.all(np.isfinite(gw))


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "weight": True}])
def test_label_outside_where_is_a_neg_inf_logit_at_every_order(opts):
  """A label outside `where` reads as a label on a -inf logit: the same
  +inf loss and the same gradient (the softmax minus the one-hot label,
  docs/guides/differences.md), and forward mode agrees at the first and the
  second order (forward over forward gave the first-order tangent without
  the label's term: the rule's primal took the masked logit's zero
  derivative)."""
  rng = np.random.default_rng(33)
  x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  y = jnp.array([1, 4, 0])
  where = jnp.ones((3, 5), bool).at[1, 4].set(False).at[1, 0].set(False)
  kw = dict(opts)
  if kw.pop("weight", False):
    kw["weight"] = jnp.linspace(0.5, 2.0, 5)
  masked = lambda x: jaxce.cross_entropy(x, y, where=where, reduction="none", **kw)
  neg_inf = lambda x: jaxce.cross_entropy(x, y, reduction="none", **kw)
  ct = jnp.array([0.5, 1.0, 2.0])
  per, vjp = jax.vjp(masked, x)
  per_inf, vjp_inf = jax.vjp(neg_inf, jnp.where(where, x, -jnp.inf))  # (at those logits)
  assert per[1] == np.inf
  _close(per, per_inf, rtol=1e-6)
  g = vjp(ct)[0]
  _close(g, vjp_inf(ct)[0], rtol=1e-6, atol=1e-7)
  assert g[1, 4] < 0  # the label's term
  assert g[1, 0] == 0.0  # a class outside `where`
  t = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  (_, t1), (again, _) = jax.jvp(lambda x: jax.jvp(masked, (x,), (t,)), (x,), (t,))
  _close(jnp.vdot(ct, t1), jnp.vdot(g, t), rtol=1e-5, atol=1e-6)
  _close(again, t1, rtol=1e-6, atol=1e-7)
  # A +inf logit outside `where` takes no part either, the label's included.
  per_big = masked(x.at[1, 4].set(jnp.inf).at[1, 0].set(jnp.inf))
  assert per_big[1] == np.inf
  _close(per_big, per, rtol=1e-6)


@pytest.mark.parametrize(("how", "num_classes"), [  # (40000: CPU's blocked sums)
    ("where", 4), ("neg_inf", 4), pytest.param("where", 40000, marks=pytest.mark.slow),
    pytest.param("neg_inf", 40000, marks=pytest.mark.slow)])  # `pytest -m slow`
def test_fully_masked_rows_make_no_nan_inside(how, num_classes):
  """A row with no class left takes no NaN anywhere in the computation, not
  even one a select drops: `checkify.float_checks` (which reports any NaN a
  primitive makes) passes on the loss and its gradient. log_sum - picked
  (-inf - -inf) in the forward and picked - log_sum in the backward made
  one."""
  from jax.experimental import checkify

  rng = np.random.default_rng(31)
  x = rng.normal(size=(3, num_classes)).astype(np.float32)
  y = jnp.array([0, 1, 2])
  where = np.ones(x.shape, bool)
  where[0] = False
  kw = {"where": jnp.asarray(where)} if how == "where" else {}
  x = jnp.asarray(np.where(where, x, -np.inf) if how == "neg_inf" else x)
  w = jnp.linspace(0.5, 2.0, num_classes)
  for opts in ({}, {"weight": w, "label_smoothing": 0.1, "z_loss": 1e-3}):
    f = lambda x, opts=opts: jaxce.cross_entropy(x, y, **kw, **opts)
    for g in (f, jax.grad(f)):
      err, out = jax.jit(checkify.checkify(g, errors=checkify.float_checks))(x)
      assert err.get() is None, (opts, err.get())
      assert np.all(np.isfinite(out))


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_fully_masked_rows_probability_targets(eps):
  x, _, where = _dead_rows_case()
  t = _rng(14).dirichlet(np.ones(4), size=5).astype(np.float32)
  f = lambda x, t: jaxce.cross_entropy(x, t, where=jnp.asarray(where), label_smoothing=eps,
                                       z_loss=0.01, reduction="none")
  per, (gx, gt) = jax.jit(
      lambda x, t: (f(x, t), jax.grad(lambda x, t: jnp.mean(f(x, t)), (0, 1))(x, t)))(
      jnp.asarray(x), jnp.asarray(t))
  assert float(per[1]) == 0.0
  assert np.all(np.asarray(gx)[1] == 0)
  assert np.all(np.asarray(gt)[1] == 0)
  assert np.all(np.isfinite(gx))
  assert np.all(np.isfinite(gt))
  ref_none, _, ref_g = ref_ce_probs(x, t, eps=eps, z=0.01, where=where)
  _close(per, ref_none, rtol=1e-5, atol=1e-7)
  _close(gx, ref_g, rtol=1e-5, atol=1e-7)
  # All -inf logits instead of `where`: the same.
  xi = np.where(where, x, -np.inf).astype(np.float32)
  per_i = jaxce.cross_entropy(jnp.asarray(xi), jnp.asarray(np.where(where, t, 0.0)),
                              label_smoothing=eps, reduction="none")
  assert float(per_i[1]) == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.2, "z_loss": 0.01}],
                         ids=["plain", "smoothing_z_loss"])
def test_all_neg_inf_rows_probability_targets(all_branches, opts, dtype):
  """A row whose logits are all -inf: loss 0 and no gradient without target
  mass; with mass, +inf (mass on a -inf logit, as on any row: the
  cross-entropy of log_softmax's all -inf row), and the gradient that such
  mass gives on any row, -w t / N at those logits, 0 w.r.t. the targets."""
  dt = DTYPES[dtype]
  rng = _rng(31)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  x[1] = -np.inf  # all -inf, no target mass
  x[2] = -np.inf  # all -inf, target mass
  x[3, 0] = -np.inf  # a live row with mass on a -inf logit
  t = rng.dirichlet(np.ones(5), size=4).astype(np.float32)
  t[1] = 0.0
  xj, tj = jnp.asarray(x, dt), jnp.asarray(t, dt)
  tq = np.asarray(tj, np.float64)
  scale = 1.0 - opts.get("label_smoothing", 0.0)
  for weight in (None, np.linspace(0.5, 2.0, 5)):
    jw = None if weight is None else jnp.asarray(weight, jnp.float32)
    f = functools.partial(_per_row_ce, weight=jw, **opts)
    per = np.asarray(jax.jit(f)(xj, tj))
    gx, gt = jax.jit(jax.grad(lambda x, t, f=f: jnp.mean(f(x, t)), (0, 1)))(xj, tj)
    gx, gt = np.asarray(gx, np.float64), np.asarray(gt, np.float64)
    assert per[1] == 0.0
    assert np.all(gx[1] == 0)
    assert np.all(gt[1] == 0)
    assert per[2] == np.inf
    assert per[3] == np.inf
    assert np.isfinite(per[0])
    wc = np.ones(5) if weight is None else weight
    np.testing.assert_allclose(gx[2], -scale * wc * tq[2] / 4,
                               rtol=1e-2 if dtype == "bfloat16" else 1e-6)
    assert np.all(gt[2] == 0)
    assert gt[3, 0] == 0
    assert np.all(np.isfinite(gx))
    assert np.all(np.isfinite(gt))


def _per_row_ce(x, t, **kw):
  return jaxce.cross_entropy(x, t, reduction="none", **kw)


def test_fully_masked_rows_log_softmax_is_neg_inf():
  """The docstring: masked classes get -inf; "a row with no class left is all
  -inf" (through `where`, or with every logit -inf)."""
  x, _, where = _dead_rows_case()
  ls = np.asarray(jaxce.log_softmax(jnp.asarray(x), where=jnp.asarray(where)))
  assert np.all(np.isfinite(np.delete(ls, 1, 0)))
  np.testing.assert_array_equal(ls[1], -np.inf)
  xi = jnp.asarray(np.where(where, x, -np.inf), jnp.float32)
  np.testing.assert_array_equal(np.asarray(jaxce.log_softmax(xi))[1], -np.inf)


@pytest.mark.parametrize("bad", [np.inf, np.nan], ids=["inf", "nan"])
def test_log_softmax_where_with_non_finite_entry_is_all_nan(bad):
  """As the docstring says: a +inf or NaN entry inside `where` makes its
  whole slice NaN (jax.nn keeps -inf outside `where`); an entry outside
  `where` takes no part; other slices equal jax.nn's."""
  x = _rng(39).normal(size=(3, 5)).astype(np.float32)
  x[0, 1] = bad
  x[1, 3] = bad
  where = np.array([[True, True, False, True, False]] * 3)
  where[1, 3] = False
  expected = np.asarray(jax.nn.log_softmax(jnp.asarray(x), where=jnp.asarray(where)))
  for f in (jaxce.log_softmax, jax.jit(jaxce.log_softmax)):
    out = np.asarray(f(jnp.asarray(x), where=jnp.asarray(where)))
    assert np.all(np.isnan(out[0]))
    _close(out[1:], expected[1:], rtol=1e-6)


def test_fully_masked_rows_log_softmax_logsumexp_gradients():
  x, _, where = _dead_rows_case()
  jwhere = jnp.asarray(where)
  lse = np.asarray(jaxce.logsumexp(jnp.asarray(x), where=jwhere))
  assert lse[1] == -np.inf
  assert np.all(np.isfinite(np.delete(lse, 1)))
  cot = jnp.asarray(_rng(17).normal(size=x.shape), jnp.float32)
  g = jax.grad(lambda x: jnp.sum(jnp.where(jwhere, jaxce.log_softmax(x, where=jwhere), 0.0)
                                 * cot))(jnp.asarray(x))
  assert np.all(np.isfinite(g))
  assert np.all(np.asarray(g)[1] == 0)
  _, act, _, _, p = _prep(x, where)
  c = np.where(act, _f64(cot), 0.0)
  _close(g, c - p * c.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
  alive = jnp.asarray(np.arange(5) != 1)
  g = jax.grad(lambda x: jnp.sum(jnp.where(alive, jaxce.logsumexp(x, where=jwhere), 0.0)))(
      jnp.asarray(x))
  assert np.all(np.isfinite(g))
  assert np.all(np.asarray(g)[1] == 0)
  _close(g, p, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# "mean" over positions that are all ignored: 0.0 with zero gradients.

ALL_IGNORED_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing_z": {"label_smoothing": 0.1, "z_loss": 0.01},
    "weight_smoothing_z_where": {
        "weight": True, "label_smoothing": 0.1, "z_loss": 0.01, "where": True},
    "custom_ignore_index": {"ignore_index": 2},
}


@pytest.mark.parametrize("opts", ALL_IGNORED_OPTIONS.values(), ids=ALL_IGNORED_OPTIONS.keys())
def test_all_ignored_mean_is_zero(opts):
  kw = dict(opts)
  x = jnp.asarray(_rng(15).normal(size=(3, 5)), jnp.float32)
  y = jnp.full((3,), kw.get("ignore_index", -100), jnp.int32)
  w = jnp.linspace(0.5, 2.0, 5, dtype=jnp.float32) if kw.pop("weight", False) else None
  if kw.pop("where", False):
    kw["where"] = jnp.asarray(np.arange(5) != 1)[None, :]
  per, loss, gx, gw = _ce_eval(x, y, w, **kw)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(per, 0.0)
  assert np.all(np.asarray(gx) == 0)
  assert w is None or np.all(np.asarray(gw) == 0)


@pytest.mark.parametrize("opts", [
    pytest.param(v, id=k, marks=() if "smoothing" in k else pytest.mark.slow)
    for k, v in ALL_IGNORED_OPTIONS.items()])  # without smoothing: `pytest -m slow` (.ci/run)
def test_ignored_rows_with_nan_or_inf_logits_add_nothing(opts):
  """PyTorch multiplies every term by [y != ignore_index]: an ignored row
  adds 0 whatever its logits (padding, say). With label smoothing, XLA:CPU's
  count of such a row's classes was NaN, and 0 / NaN made the loss NaN.
  The kept rows' loss and logits gradients are those without the row."""
  kw = dict(opts)
  ignore = kw.get("ignore_index", -100)
  x = jnp.asarray(_rng(17).normal(size=(4, 5)), jnp.float32)
  x = x.at[1, 0].set(jnp.nan).at[2, 3].set(jnp.inf)
  y = jnp.asarray([0, ignore, ignore, 4], jnp.int32)
  w = jnp.linspace(0.5, 2.0, 5, dtype=jnp.float32) if kw.pop("weight", False) else None
  if kw.pop("where", False):
    kw["where"] = jnp.asarray(np.arange(5) != 1)[None, :]
  kept = jnp.asarray([0, 3])
  per, loss, gx, _ = _ce_eval(x, y, w, **kw)
  want_per, want, want_gx, _ = _ce_eval(x[kept], y[kept], w, **kw)
  np.testing.assert_array_equal(per[1:3], 0.0)
  np.testing.assert_allclose(per[kept], want_per, rtol=1e-6)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(gx[kept], want_gx, rtol=1e-5, atol=1e-7)
  total = jaxce.cross_entropy(x, y, weight=w, reduction="sum", **kw)
  np.testing.assert_allclose(total, jnp.sum(want_per), rtol=1e-6)


@pytest.mark.parametrize("dt", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_all_ignored_half_precision(dt):
  x = jnp.zeros((2, 3), dt)
  y = jnp.full((2,), -100, jnp.int32)
  w = jnp.ones((3,), dt)
  vg = jax.value_and_grad(
      lambda x, w: jaxce.cross_entropy(x, y, weight=w, label_smoothing=0.1, z_loss=0.01), (0, 1))
  loss, (g, gw) = jax.jit(vg)(x, w)
  assert loss.dtype == jnp.float32
  assert float(loss) == 0.0
  assert g.dtype == dt
  assert np.all(np.asarray(g, np.float32) == 0)
  assert np.all(np.asarray(gw, np.float32) == 0)


def test_all_ignored_nll_loss_and_zero_weight():
  x = jnp.asarray(_rng(16).normal(size=(3, 5)), jnp.float32)
  y = jnp.full((3,), -100, jnp.int32)
  w = jnp.ones(5, jnp.float32)
  loss, (gx, gw) = jax.jit(jax.value_and_grad(
      lambda x, w: jaxce.nll_loss(x, y, weight=w), (0, 1)))(x, w)
  assert float(loss) == 0.0
  assert np.all(np.asarray(gx) == 0)
  assert np.all(np.asarray(gw) == 0)
  # Zero weight on every label present: zero denominator, the same 0.0.
  y = jnp.asarray([1, 1, 3], jnp.int32)
  w = jnp.asarray([1.0, 0.0, 1.0, 0.0, 1.0], jnp.float32)
  for fn in (jaxce.nll_loss, jaxce.cross_entropy):
    loss, gx = jax.jit(jax.value_and_grad(functools.partial(fn, labels=y, weight=w)))(x)
    assert float(loss) == 0.0
    assert np.all(np.asarray(gx) == 0)


def test_target_on_neg_inf_class_is_inf_not_nan():
  # The target's own class at -inf (or target mass on it): the loss is +inf.
  x = jnp.asarray([[0.0, -jnp.inf, 1.0]], jnp.float32)
  for labels in (jnp.asarray([1], jnp.int32), jnp.asarray([[0.5, 0.5, 0.0]], jnp.float32)):
    for eps in (0.0, 0.1):
      per = jaxce.cross_entropy(x, labels, label_smoothing=eps, reduction="none")
      assert float(per[0]) == np.inf


@pytest.mark.parametrize("z", [0.0, 1e-2])
def test_target_mass_that_does_not_count_on_neg_inf_class_is_finite(all_branches, z):
  # Target mass on a -inf logit costs +inf only where it counts: not at a
  # class of weight 0 (w_c t_c = 0), nor at eps = 1, where q = 1 / K over the
  # classes of finite logit and the targets take no part.
  x = np.asarray([[0.5, -np.inf, 1.0, -2.0], [1.0, 2.0, -np.inf, 0.0]], np.float32)
  t = np.asarray([[0.2, 0.3, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]], np.float32)
  w = np.asarray([1.0, 0.0, 2.0, 0.5], np.float32)
  x64, t64 = x.astype(np.float64), t.astype(np.float64)
  lse = np_logsumexp(x64)
  logp = x64 - lse[:, None]
  act = np.isfinite(x64)
  with np.errstate(invalid="ignore"):
    weighted = -np.sum(np.where(w * t64 > 0, w * t64 * logp, 0.0), -1)
  # Row 1's mass on its -inf class has weight 2: +inf there.
  want_w = np.asarray([weighted[0], np.inf]) + z * lse**2
  uniform = -np.sum(np.where(act, logp, 0.0), -1) / act.sum(-1) + z * lse**2
  for kw, want in ((dict(weight=jnp.asarray(w)), want_w), (dict(label_smoothing=1.0), uniform),
                   (dict(weight=jnp.asarray(w), label_smoothing=1.0), None)):
    per = np.asarray(jaxce.cross_entropy(x, t, reduction="none", z_loss=z, **kw), np.float64)
    assert not np.any(np.isnan(per)), (kw, per)
    if want is not None:
      np.testing.assert_allclose(per, want, rtol=1e-6)
  f = lambda x: jaxce.cross_entropy(x, t, weight=jnp.asarray(w), label_smoothing=1.0, z_loss=z)
  g = np.asarray(jax.grad(f)(jnp.asarray(x)))
  assert np.all(np.isfinite(g))
  assert np.all(g[~act] == 0)


# ---------------------------------------------------------------------------
# Logits far from 0 (up to 1e6 in float32, 6e4 in float16): the shift is kept
# apart from the log-sum, so losses and gradients are as accurate as float32
# allows relative to their own magnitude (issue 10, item 2).

EPS32 = 2.0**-23


def _offset_inputs(dt, offset, n=6, c=9, seed=20):
  rng = _rng(seed)
  ulp = float(np.spacing(np.asarray(offset, dt)))
  d = np.round(rng.normal(size=(n, c)) * 4 / ulp) * ulp  # exact in dt
  d[0] = -np.arange(c) * ulp * max(1, round(0.5 / ulp))  # near ties at the top
  x = np.asarray(offset + d, dt)
  y = rng.integers(0, c, size=n).astype(np.int32)
  t = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
  return x, y, t


def _assert_ulps(got, want, what, grad_dtype=np.float32):
  """Each loss within 4 float32 ulps of its own magnitude; gradients within
  4 float32 ulps of their largest entry (plus their own rounding, for a
  half-precision gradient)."""
  got = np.asarray(got, np.float64)
  rtol = float(np.finfo(grad_dtype).eps) / 2 if np.dtype(grad_dtype).itemsize < 4 else 0.0
  atol = 4 * EPS32 * np.max(np.abs(want))
  if what.startswith("loss"):
    # Relative to each loss, however small: a loss near 0 (p_y near 1) is
    # not the log of a rounded 1 + tiny (see _stats._label_log_sum).
    np.testing.assert_allclose(got, want, rtol=4 * EPS32, atol=0, err_msg=what)
  else:
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


OFFSETS = {"f32_3e4": (np.float32, 3e4), "f32_1e6": (np.float32, 1e6),
           "f32_minus_1e6": (np.float32, -1e6), "f16_6e4": (np.float16, 6e4)}


@pytest.mark.parametrize("case", OFFSETS.values(), ids=OFFSETS.keys())
def test_large_offset_accuracy(case):
  dt, offset = case
  x, y, t = _offset_inputs(dt, offset)
  xf = x.astype(np.float64)
  jx, jy = jnp.asarray(x), jnp.asarray(y)
  for kw in ({}, {"label_smoothing": 0.1}, {"z_loss": 1e-4}):
    per, _, g, _ = _ce_eval(jx, jy, **kw)
    ref_none, _, ref_g = ref_ce_int(xf, y, eps=kw.get("label_smoothing", 0.0),
                                    z=kw.get("z_loss", 0.0))
    _assert_ulps(per, ref_none, f"loss, integer labels {kw}")
    _assert_ulps(g, ref_g, f"gradient, integer labels {kw}", dt)
  per, _, g, _ = _ce_eval(jx, jnp.asarray(t), label_smoothing=0.1)
  ref_none, _, ref_g = ref_ce_probs(xf, t.astype(np.float64), eps=0.1)
  _assert_ulps(per, ref_none, "loss, probability targets")
  _assert_ulps(g, ref_g, "gradient, probability targets", dt)
  # log_softmax: differences of logits, exact; returned in x's dtype.
  lse = np_logsumexp(xf)
  out_eps = float(np.finfo(dt).eps)
  np.testing.assert_allclose(np.asarray(jaxce.log_softmax(jx), np.float64), xf - lse[:, None],
                             rtol=out_eps, atol=4 * EPS32)
  np.testing.assert_allclose(np.asarray(jaxce.logsumexp(jx), np.float64), lse, rtol=out_eps)


def test_large_offset_not_worse_than_optax_and_torch():
  optax = pytest.importorskip("optax")
  x, y, _ = _offset_inputs(np.float32, 3e4)
  ref_none, _, ref_g = ref_ce_int(x.astype(np.float64), y)
  jx, jy = jnp.asarray(x), jnp.asarray(y)
  ours = jaxce.cross_entropy(jx, jy, reduction="none")
  theirs = optax.softmax_cross_entropy_with_integer_labels(jx, jy)
  err = lambda a: np.max(np.abs(np.asarray(a, np.float64) - ref_none))
  assert err(ours) <= err(theirs)
  # PyTorch's float32 backward: exp(log_softmax) - one_hot, over N.
  lsm = jx - jax.nn.logsumexp(jx, axis=-1, keepdims=True)
  torch_g = (jnp.exp(lsm) - jax.nn.one_hot(jy, x.shape[1], dtype=jnp.float32)) / x.shape[0]
  g_ours = jax.grad(lambda x: jaxce.cross_entropy(x, jy))(jx)
  gerr = lambda a: np.max(np.abs(np.asarray(a, np.float64) - ref_g))
  assert gerr(g_ours) <= gerr(torch_g)


def test_large_offset_issue_example():
  """x = [[30000, 29990, 29985]], y = [0]: 4.5705e-5 in float64 (PyTorch
  float32: 4.5776e-5, the log of a rounded 1 + tiny), with a non-zero label
  gradient -(1 - p_0). Both shift paths (the label's logit on CPU, the max
  elsewhere) leave the label's term out of the sum: exact to 4 ulps."""
  from jaxce import _stats

  x = np.array([[30000.0, 29990.0, 29985.0]], np.float32)
  ref_none, _, ref_g = ref_ce_int(x.astype(np.float64), np.array([0]))
  loss, g = jax.value_and_grad(jaxce.cross_entropy)(jnp.asarray(x), jnp.asarray([0]))
  np.testing.assert_allclose(float(loss), ref_none[0], rtol=4 * EPS32, atol=0)
  assert float(g[0, 0]) < 0
  np.testing.assert_allclose(np.asarray(g, np.float64), ref_g, rtol=4 * EPS32, atol=EPS32)
  jx, y = jnp.asarray(x), jnp.asarray([0])
  _, at_max = _stats._shift_branches(1)
  _, log_sum, picked = at_max(jx, y, _stats.take_at(jx, y, 1))
  np.testing.assert_allclose(float(log_sum[0] - picked[0]), ref_none[0], rtol=4 * EPS32)


# The CPU's shift for integer labels is the label's logit: a row whose label
# lies D below its max has each softmax exponent x_c - shift, and the
# log-sum, rounded at the scale of D. The bound the docstring and the
# backward guide state: per row, (D + 16) * 2**-23 of the larger of its
# largest gradient entry and eps times its largest probability (label
# smoothing eps: near-uniform rows have entries p_c - 1/C far below p; the
# 16 is the log-sum's own rounding over 1,000-40,000 near-equal terms, up
# to 8 ulps of p measured); the label's entry (eps + 2 z |lse|) * 2**-23
# more with label smoothing eps and z-loss z, on any platform (their
# derivatives go through p_y - 1, rounded at 1:
# `_reduction._smoothed_through_nll`, `_log_sum_through_nll`).
LABEL_SHIFT_LAYOUTS = {
    "64x1000": ((64, 1000), -1),   # blocks
    "256x1024": ((256, 1024), -1),
    "8x40000": ((8, 40000), -1),   # long rows (chunks or blocks)
    "16x100x3_axis1": ((16, 100, 3), 1),
}


@pytest.mark.parametrize("layout", LABEL_SHIFT_LAYOUTS.values(), ids=LABEL_SHIFT_LAYOUTS.keys())
def test_cpu_label_shift_gradient_bound(layout):
  shape, axis = layout
  rng = _rng(31)
  c = shape[axis]

  @functools.partial(jax.jit, static_argnums=(3, 4))
  def f(x, y, weight, eps, z):
    return jax.grad(lambda x: jaxce.cross_entropy(
        x, y, weight=weight, axis=axis, label_smoothing=eps, z_loss=z, reduction="sum"))(x)

  # (eps, z_loss, zero class weights): the z-loss's gradient alone, 2 z lse p,
  # where the weights take the rest away
  options = ((0.0, 0.0, False), (0.5, 0.0, False), (1.0, 0.0, False), (0.0, 1e-2, True))
  for scale in (0.1, 1.0, 5.0, 10.0):
    x = (rng.normal(size=shape) * scale).astype(np.float32)
    y = rng.integers(0, c, size=shape[:axis % len(shape)] + shape[axis % len(shape) + 1:])
    x2 = np.moveaxis(x, axis, -1).reshape(-1, c).astype(np.float64)
    y2 = y.reshape(-1)
    d = x2.max(-1) - x2[np.arange(len(y2)), y2]
    lse = np_logsumexp(x2)
    p_max = np.exp(x2.max(-1) - lse)[:, None]
    hot = np.arange(c)[None] == y2[:, None]
    for eps, z, zero_weights in options:
      weight = np.zeros(c, np.float32) if zero_weights else None
      g = f(jnp.asarray(x), jnp.asarray(y, np.int32),
            None if weight is None else jnp.asarray(weight), eps, z)
      g = np.moveaxis(np.asarray(g, np.float64), axis, -1).reshape(-1, c)
      _, _, ref = ref_ce_int(x2, y2, weight=weight, eps=eps, z=z)
      ref = ref * (1 if zero_weights else len(y2))  # "sum" (all-zero weights: / 1)
      largest = np.maximum(np.abs(ref).max(-1, keepdims=True), eps * p_max)
      bound = (d[:, None] + 16) * EPS32 * largest
      bound = bound + np.where(hot, (eps + 2 * z * np.abs(lse)[:, None]) * EPS32, 0.0)
      err = np.abs(g - ref)
      assert np.all(err <= bound), (scale, eps, z, float(np.max(err / bound)))


# ---------------------------------------------------------------------------
# Class weights that sum to zero: "mean" divides by the weight sum, as PyTorch
# (issue 10, item 4); only all-ignored / all-zero-weight batches give 0.0.


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_mean_with_weights_summing_to_zero_follows_torch(fn):
  x = jnp.asarray(_rng(21).normal(size=(4, 5)), jnp.float32)
  y = jnp.asarray([0, 1, 0, 1], jnp.int32)
  w = jnp.asarray([1.0, -1.0, 0.0, 0.0, 0.0], jnp.float32)
  loss_fn = getattr(jaxce, fn)
  total = float(loss_fn(x, y, weight=w, reduction="sum"))
  mean = float(loss_fn(x, y, weight=w))
  assert total != 0
  assert mean == np.copysign(np.inf, total)  # torch: total / 0
  # Weights of opposite sign but a non-zero sum: an ordinary division.
  w2 = jnp.asarray([1.0, -0.5, 0.0, 0.0, 0.0], jnp.float32)
  np.testing.assert_allclose(float(loss_fn(x, y, weight=w2)),
                             float(loss_fn(x, y, weight=w2, reduction="sum")) / 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# Gradient w.r.t. probability targets on a -inf class with zero target mass:
# the same as on a `where`-masked class, 0 (issue 10, item 5).


def test_target_gradient_on_neg_inf_class_matches_masked_class():
  x = np.asarray(_rng(22).normal(size=(3, 4)), np.float32)
  t = np.asarray(_rng(23).dirichlet(np.ones(4), size=3), np.float32)
  t[:, 2] = 0.0
  t /= t.sum(-1, keepdims=True)
  where = np.ones((3, 4), bool)
  where[:, 2] = False
  w = jnp.linspace(0.5, 2.0, 4, dtype=jnp.float32)
  g = lambda x, **kw: jax.grad(
      lambda t, w: jaxce.cross_entropy(jnp.asarray(x), t, weight=w, **kw), (0, 1))(
      jnp.asarray(t), w)
  gt_inf, gw_inf = g(np.where(where, x, -np.inf).astype(np.float32))
  gt_mask, gw_mask = g(x, where=jnp.asarray(where))
  np.testing.assert_array_equal(np.asarray(gt_inf)[:, 2], 0.0)
  np.testing.assert_allclose(gt_inf, gt_mask, rtol=1e-6)
  np.testing.assert_allclose(gw_inf, gw_mask, rtol=1e-6)


# ---------------------------------------------------------------------------
# Zero-size axes (issue 10, item 6) and jax.nn's axis forms.


@pytest.mark.parametrize("shape", [(3, 0), (5, 0, 0), (0, 4)])
def test_zero_size_axes_like_jax_nn(shape):
  x = jnp.zeros(shape, jnp.float32)
  for axis in (-1, None, (0, 1)):
    np.testing.assert_array_equal(jaxce.logsumexp(x, axis=axis),
                                  jax.nn.logsumexp(x, axis=axis))
    assert jaxce.log_softmax(x, axis=axis).shape == shape
    g = jax.grad(lambda x, axis=axis: jnp.sum(jaxce.log_softmax(x, axis=axis)))(x)
    assert g.shape == shape


@pytest.mark.parametrize("c", [4, 256, 50257])
def test_zero_classes_and_empty_batch_cross_entropy(c):
  # optax's softmax_cross_entropy with C = 0: 0 per example.
  per = jaxce.cross_entropy(jnp.zeros((3, 0)), jnp.zeros((3, 0)), reduction="none")
  np.testing.assert_array_equal(per, 0.0)
  # An empty batch: "mean" 0.0 (no position), "none" empty, zero gradients;
  # also where CPU sums rows in blocks (C = 256, 50257: a reshape of an empty
  # batch must not infer a length).
  x, y = jnp.zeros((0, c)), jnp.zeros((0,), jnp.int32)
  assert float(jaxce.cross_entropy(x, y)) == 0.0
  assert jaxce.cross_entropy(x, y, reduction="none").shape == (0,)
  assert jax.grad(jaxce.cross_entropy)(x, y).shape == (0, c)
  assert float(jaxce.cross_entropy(x, jnp.zeros((0, c)))) == 0.0
  loss, g = jax.value_and_grad(lambda x: jaxce.cross_entropy(
      x, y, weight=jnp.ones(c), label_smoothing=0.1, z_loss=1e-3))(x)
  assert float(loss) == 0.0
  assert g.shape == (0, c)
  drop_in = jax.grad(lambda x: jnp.sum(jaxce.softmax_cross_entropy_with_integer_labels(
      x.reshape(0, 1, c), y.reshape(0, 1))))(x)
  assert drop_in.shape == (0, c)
  x3 = jnp.zeros((0, 2, c // 2))  # a tuple of class axes, flattened for the loss
  assert jaxce.softmax_cross_entropy(x3, x3, axis=(1, 2)).shape == (0,)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_zero_size_under_vmap_with_jvp_and_grad(shape):
  # jvp or grad of a vmapped loss of empty logits raised a rank error: some
  # kernels' empty values were unbatched, their tangents batched.
  n, c = shape
  y = jnp.zeros((n,), jnp.int32)
  t = jnp.zeros(shape)
  losses = {
      "ce": lambda x: jaxce.cross_entropy(x, y),
      "ce_smooth_weight": lambda x: jaxce.cross_entropy(
          x, y, label_smoothing=0.1, weight=jnp.ones(c), z_loss=1e-3),
      "ce_axis0": lambda x: jaxce.cross_entropy(x.T, y, axis=0),
      "ce_probs": lambda x: jaxce.cross_entropy(x, t, label_smoothing=0.1),
      "nll": lambda x: jaxce.nll_loss(x, y, ignore_index=None),
      "drop_in": lambda x: jnp.sum(jaxce.softmax_cross_entropy_with_integer_labels(x, y)),
      "log_softmax": lambda x: jnp.sum(jaxce.log_softmax(x)),
      "logsumexp": lambda x: jnp.sum(jaxce.logsumexp(x)),
      "bce": lambda x: jaxce.binary_cross_entropy_with_logits(x, t),
  }
  xs = jnp.zeros((2, *shape))
  for name, f in losses.items():
    value, tangent = jax.jvp(jax.vmap(f), (xs,), (xs,))
    assert value.shape == tangent.shape == (2,), name
    np.testing.assert_array_equal(tangent, 0.0, err_msg=name)
    g = jax.grad(lambda xs, f=f: jnp.sum(jax.vmap(f)(xs)))(xs)
    assert g.shape == xs.shape, name


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_zero_classes_with_class_weights_like_without(reduction):
  # C = 0: every label not ignored is out of range (NaN), an ignored one
  # costs 0; an empty `weight` must not change that (it crashed in a gather).
  labels = jnp.array([0, -100, 3])
  x = jnp.zeros((3, 0))
  for fn in (jaxce.cross_entropy, jaxce.nll_loss):
    plain = jax.jit(lambda x, fn=fn: fn(x, labels, reduction=reduction))
    weighted = jax.jit(lambda x, fn=fn: fn(x, labels, weight=jnp.ones(0), reduction=reduction))
    np.testing.assert_array_equal(weighted(x), plain(x))
    assert jax.grad(lambda x, f=weighted: jnp.sum(f(x)))(x).shape == (3, 0)
  ignored = jnp.full((3,), -100)
  assert float(jaxce.cross_entropy(x, ignored, weight=jnp.ones(0), reduction="sum")) == 0.0
  fused = jaxce.linear_cross_entropy(jnp.ones((3, 4)), jnp.zeros((4, 0)), labels,
                                     weight=jnp.ones(0), reduction="none")
  np.testing.assert_array_equal(fused, [np.nan, 0.0, np.nan])


@pytest.mark.slow  # a sweep: `pytest -m slow` (.ci/run) runs it
@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2), (2, 0), (1,), (0, 1, 2)])
def test_axis_forms_like_jax_nn(axis):
  x = jnp.asarray(_rng(24).normal(size=(2, 3, 4)) * 3, jnp.float32)
  np.testing.assert_allclose(jaxce.logsumexp(x, axis=axis), jax.nn.logsumexp(x, axis=axis),
                             rtol=1e-6)
  np.testing.assert_allclose(jaxce.log_softmax(x, axis=axis),
                             jax.nn.log_softmax(x, axis=axis), rtol=1e-6, atol=1e-6)
  cot = jnp.asarray(_rng(25).normal(size=x.shape), jnp.float32)
  g = lambda fn: jax.grad(lambda x: jnp.sum(fn(x, axis=axis) * cot))(x)
  np.testing.assert_allclose(g(jaxce.log_softmax), g(jax.nn.log_softmax), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2)])
def test_logsumexp_keepdims_like_jax_nn(axis):
  x = jnp.asarray(_rng(26).normal(size=(2, 3, 4)) * 3, jnp.float32).at[0, 1, 2].set(-jnp.inf)
  ours = jaxce.logsumexp(x, axis=axis, keepdims=True)
  assert ours.shape == jax.nn.logsumexp(x, axis=axis, keepdims=True).shape
  np.testing.assert_allclose(ours, jax.nn.logsumexp(x, axis=axis, keepdims=True), rtol=1e-6)
  # Broadcastable against x, with the gradient and tangent of the plain call.
  cot = jnp.asarray(_rng(27).normal(size=ours.shape), jnp.float32)
  g = jax.grad(lambda x: jnp.sum(jaxce.logsumexp(x, axis=axis, keepdims=True) * cot))(x)
  np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(jax.nn.logsumexp(
      x, axis=axis, keepdims=True) * cot))(x), rtol=1e-5, atol=1e-7)
  _, t = jax.jvp(lambda x: jaxce.logsumexp(x, axis=axis, keepdims=True), (x,), (jnp.ones_like(x),))
  assert t.shape == ours.shape
  assert jax.jit(lambda x: jaxce.logsumexp(x, axis=axis, keepdims=False))(x).shape == (
      jax.nn.logsumexp(x, axis=axis).shape)
  with pytest.raises(TypeError, match=r"`keepdims` must be a bool\. Got int"):
    jaxce.logsumexp(x, axis=axis, keepdims=1)


def _dominant_label_inputs(c, offset, n=48, seed=23):
  """Rows whose label dominates by 8-20 (losses down to ~1e-7), rows whose
  label sits 120 below the max (CPU's fallback to the max shift), -inf
  classes and an ignored row; values exact in float32."""
  rng = _rng(seed)
  d = np.round(rng.normal(size=(n, c)) * 2 * 256) / 256
  y = rng.integers(0, c, size=n).astype(np.int32)
  rows = np.arange(n)
  d[rows, y] = np.max(d, axis=1) + rng.uniform(8, 20, size=n).round(2)
  r = rows[::7]
  d[r, (y[r] + 1) % c] = -np.inf
  r = rows[3::11]
  d[r, y[r]] -= 150.0  # far below the max
  y[5] = -100
  return (offset + d).astype(np.float32), y


def _ref_rows(x, y):
  """Per-row loss log sum_c exp(x_c - x_y) and its gradient p - onehot, in
  float64 from exact differences (no large lse formed); 0 for ignored rows."""
  x = x.astype(np.float64)
  keep = y >= 0
  xy = np.take_along_axis(x, np.where(keep, y, 0)[:, None], 1)
  with np.errstate(invalid="ignore"):
    z = np.exp(x - xy)
  s = z.sum(1)
  hot = np.arange(x.shape[1]) == y[:, None]
  others = np.where(hot, 0.0, z).sum(1)
  loss = np.where(keep, np.log1p(others), 0.0)
  # p_y - 1 as -others / s: z_y / s - 1 cancels to float64's ulp of 1 (5e-17
  # off a p_y - 1 of 5e-11 at two classes: 7e-7 of it)
  g = np.where(keep[:, None], np.where(hot, -others[:, None], z) / s[:, None], 0.0)
  return loss, g


# C = 10: columns (_stats._others_in_columns); 50, 257: the arithmetic mask;
# 1000, 4096: blocks; 45007 (prime, past LONG_ROW): the arithmetic mask in
# this process of 8 CPU devices (row chunks with one device:
# test_long_rows_without_blocks_match_reference). A third of the cases in
# the default run, the rest with the slow marker (.ci/run runs both).
_DOMINANT = [pytest.param(c, off, marks=[] if (c, off) in {(10, 3e4), (257, -1e6), (1000, 3e4),
                                                          (4096, -1e6), (50, 0.0), (45007, 3e4)}
                          else [pytest.mark.slow])
             for c in (10, 50, 257, 1000, 4096, 45007) for off in (0.0, 3e4, -1e6)]


@pytest.mark.parametrize(("c", "offset"), _DOMINANT)
def test_dominant_label_losses_accurate_to_their_own_magnitude(c, offset):
  """Each loss (down to ~1e-7) within 4 float32 ulps of itself, and each row's
  gradient within 4 ulps of its largest entry, wherever the label's logit
  dominates: the label's own term stays out of the log-sum on every path
  (CPU's blocks or arithmetic mask, the max-shift fallback)."""
  x, y = _dominant_label_inputs(c, offset)
  ref, ref_g = _ref_rows(x, y)
  jx, jy = jnp.asarray(x), jnp.asarray(y)
  total = lambda x: jaxce.cross_entropy(x, jy, reduction="sum")
  per, g = jax.jit(lambda x: (jaxce.cross_entropy(x, jy, reduction="none"),
                              jax.grad(total)(x)))(jx)
  assert np.min(ref[ref > 0]) < 1e-6
  np.testing.assert_allclose(np.asarray(per, np.float64), ref, rtol=4 * EPS32, atol=0)
  scale = np.max(np.abs(ref_g), axis=1, keepdims=True)
  assert np.all(np.abs(np.asarray(g, np.float64) - ref_g) <= 4 * EPS32 * scale)


@pytest.mark.all_platforms  # (counts the platform's cond too)
@pytest.mark.parametrize("far", [False, True], ids=["label_shift", "max_fallback"])
def test_vmap_keeps_one_cond(far):
  """Under jax.vmap the CPU label-shift's cond stays a cond (its rule maps
  the batch to rows), where vmap's own rule made it a select that ran both
  branches; the values stay exact, also when one group needs the fallback."""
  x, y = _dominant_label_inputs(1000, 0.0)
  if not far:
    x, y = x[:3], y[:3]  # (no row far below its max)
  ref, ref_g = _ref_rows(x, y)
  split = lambda a: jnp.asarray(a).reshape(3, -1, *a.shape[1:])
  one = lambda x, y: jaxce.cross_entropy(x, y, reduction="none")
  f = jax.vmap(one)
  conds = lambda f, *a: str(jax.make_jaxpr(f)(*a)).count("cond[")  # (also the platform's)
  assert conds(f, split(x), split(y)) == conds(one, split(x)[0], split(y)[0]) == 2
  per, g = jax.jit(lambda x, y: (f(x, y), jax.grad(lambda x: f(x, y).sum())(x)))(
      split(x), split(y))
  np.testing.assert_allclose(np.asarray(per, np.float64).ravel(), ref, rtol=4 * EPS32, atol=0)
  scale = np.max(np.abs(ref_g), axis=1, keepdims=True)
  g = np.asarray(g, np.float64).reshape(ref_g.shape)
  assert np.all(np.abs(g - ref_g) <= 4 * EPS32 * scale)


# (shape, class axis, dtype, vmap groups): blocks, the mask in bfloat16, axis 1
# of (N, C, H, W), axis 0, rows past LONG_ROW (row chunks with one device),
# and vmap (the batch as rows).
_FAR_LAYOUTS = {
    "blocks": ((512, 1000), 1, jnp.float32, 0), "mask_bf16": ((256, 1024), 1, jnp.bfloat16, 0),
    "nchw": ((8, 10, 8, 8), 1, jnp.float32, 0), "axis0": ((10, 256), 0, jnp.float32, 0),
    "long": ((32, 40009), 1, jnp.float32, 0), "vmap": ((4, 128, 1000), 2, jnp.float32, 4)}


# With 8 devices every count takes the same path (the whole batch redone):
# "few" and "many" there run with `pytest -m slow`, as they do with one
# device (the default suite's time limit).
@pytest.mark.parametrize(("count", "cpu_devices"), [
    ("one", "one_device"), pytest.param("few", "one_device", marks=pytest.mark.slow),
    pytest.param("many", "one_device", marks=pytest.mark.slow), ("one", "devices"),
    pytest.param("few", "devices", marks=pytest.mark.slow),
    pytest.param("many", "devices", marks=pytest.mark.slow)], indirect=["cpu_devices"])
@pytest.mark.parametrize("layout", list(_FAR_LAYOUTS))
def test_far_labels_redo_their_rows(layout, count, cpu_devices, monkeypatch):
  """When labels sit far below their row's max (the CPU label shift's sum
  underflows), a process with one CPU device redoes those rows alone while
  there are at most `_stats._few_rows` of them, and every row otherwise
  (and always with more devices). Which ran is recorded at run time; loss
  and gradient match the float64 reference either way."""
  import reference as ref

  from jaxce import _stats

  shape, axis, dtype, groups = _FAR_LAYOUTS[layout]
  ran = []
  redo = _stats._redo_rows

  def recorded(*args):
    jax.debug.callback(lambda: ran.append("rows"))
    return redo(*args)

  monkeypatch.setattr(_stats, "_redo_rows", recorded)
  # (small batches here: the loop is taken from FEW_ROWS_FROM rows on)
  assert _stats.FEW_ROWS_FROM == 512
  assert _stats._few_rows((256, 1000), 1) is None
  assert _stats._few_rows((512, 1000), 1) == (32 if cpu_devices else None)
  monkeypatch.setattr(_stats, "FEW_ROWS_FROM", 16)
  jax.clear_caches()
  rng = _rng(29)
  x = rng.normal(size=shape) * 3
  y = rng.integers(0, shape[axis], size=shape[:axis] + shape[axis + 1:]).astype(np.int32)
  y.reshape(-1)[5] = -100
  row_shape = (*shape[:axis], *shape[axis + 1:])
  rows = math.prod(row_shape)
  few = _stats._few_rows((rows, shape[axis]), 1)
  assert (few is not None) == cpu_devices
  far = {"one": 1, "few": few or 2, "many": (few or 2) + 1}[count]
  xm, ym = np.moveaxis(x, axis, -1).reshape(rows, -1), y.reshape(-1)
  at = rng.choice(np.arange(6, rows), size=far, replace=False)
  xm[at, (ym[at] + 1) % shape[axis]] = 200.0  # each label 190+ below its max
  x = np.moveaxis(xm.reshape(*row_shape, shape[axis]), -1, axis)
  x = np.asarray(jnp.asarray(x, dtype), np.float64)  # the rounded logits
  jx, jy = jnp.asarray(x, dtype), jnp.asarray(y)
  one = lambda x, y: jaxce.cross_entropy(x, y, axis=axis - (groups > 0), reduction="none")
  f = jax.vmap(one) if groups else one
  per = jax.jit(f)(jx, jy)
  jax.effects_barrier()
  assert ran == (["rows"] if cpu_devices and count != "many" else []), ran
  g = jax.jit(jax.grad(lambda x: jnp.sum(f(x, jy)) / float(np.sum(y != -100))))(jx)
  want = ref.cross_entropy_int(x, y, axis=axis, reduction="none")
  want_g = ref.cross_entropy_int_grad(x, y, axis=axis)
  tol = {"rtol": 1e-5, "atol": 1e-8} if dtype == jnp.float32 else {"rtol": 2**-7, "atol": 1e-6}
  np.testing.assert_allclose(np.asarray(per, np.float64), want, **tol)
  np.testing.assert_allclose(np.asarray(g, np.float64), want_g, **tol)


@pytest.mark.parametrize("cpu_devices", ["one_device"], indirect=True)
def test_far_labels_redo_their_rows_in_shard_map(cpu_devices, monkeypatch):
  """The rows' loop inside `shard_map`, with replicated logits and labels
  split over the (one-device) mesh: its carry types agree (they did not:
  the replicated logits and the varying stats), and the values are right."""
  import reference as ref
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from jaxce import _stats

  monkeypatch.setattr(_stats, "FEW_ROWS_FROM", 16)
  jax.clear_caches()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("b",))
  rng = _rng(30)
  x = rng.normal(size=(64, 100)) * 3
  y = rng.integers(0, 100, size=64).astype(np.int32)
  x[3, (y[3] + 1) % 100] = 200.0
  x = x.astype(np.float32)
  f = jax.shard_map(lambda x, y: jaxce.cross_entropy(x, y, reduction="none"), mesh=mesh,
                    in_specs=(P(), P("b")), out_specs=P("b"))
  jx = jax.device_put(x, NamedSharding(mesh, P()))
  jy = jax.device_put(y, NamedSharding(mesh, P("b")))
  per, g = jax.jit(lambda x, y: (f(x, y), jax.grad(lambda x: jnp.mean(f(x, y)))(x)))(jx, jy)
  np.testing.assert_allclose(np.asarray(per, np.float64),
                             ref.cross_entropy_int(x.astype(np.float64), y, reduction="none"),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g, np.float64),
                             ref.cross_entropy_int_grad(x.astype(np.float64), y),
                             rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("far_label", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["label_shift", "max_fallback"])
def test_many_short_rows_take_the_mask_and_stay_exact(far_label):
  """float32 rows of at most 1024 classes with at least 2**23 logits in all
  take the arithmetic mask on CPU, not the blocks (_stats._cpu_block_size):
  losses near 0 within 4 ulps of themselves, gradients within 8 ulps of
  their row's largest entry (the blocks: up to 6.8 on these rows), an
  ignored row; with one label far below its row's max, the whole batch takes
  the max-shift fallback."""
  from jaxce import _stats

  n, c = 8200, 1024
  rng = _rng(26)
  x = (rng.normal(size=(n, c)) * 3).astype(np.float32)
  y = rng.integers(0, c, size=n).astype(np.int32)
  x[np.arange(50), y[:50]] = 25.0  # p_y = 1 - ~1e-6
  y[60] = -100
  if far_label:
    x[70, y[70]] = -200.0
  assert _stats._cpu_block_size(jnp.asarray(x), 1) is None
  assert _stats._cpu_block_size(jnp.asarray(x[:4096]), 1) is not None
  assert _stats._cpu_block_size(jnp.asarray(x.reshape(n // 8, c, 8)), 1) is not None
  ref, ref_g = _ref_rows(x, y)
  jy = jnp.asarray(y)
  total = lambda x: jaxce.cross_entropy(x, jy, reduction="sum")
  per, g = jax.jit(lambda x: (jaxce.cross_entropy(x, jy, reduction="none"),
                              jax.grad(total)(x)))(jnp.asarray(x))
  assert np.min(ref[:50]) > 1e-8
  assert np.max(ref[:50]) < 1e-5
  np.testing.assert_allclose(np.asarray(per, np.float64), ref, rtol=4 * EPS32, atol=0)
  scale = np.max(np.abs(ref_g), axis=1, keepdims=True)
  assert np.all(np.abs(np.asarray(g, np.float64) - ref_g) <= 8 * EPS32 * scale)  # row 60: 0


def _class_axis_reductions(f, x):
  """The reductions in `f`'s jaxpr (nested ones included; of a platform
  switch, the CPU's branch only) whose operand has the shape of `x`."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      platforms = eqn.params.get("branches_platforms")
      for name, value in eqn.params.items():
        subs = value if isinstance(value, (tuple, list)) else (value,)
        if name == "branches" and platforms is not None:
          cpu = [b for b, p in zip(subs, platforms, strict=True) if p and "cpu" in p]
          subs = cpu or [b for b, p in zip(subs, platforms, strict=True) if p is None]
        for sub in subs:
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            yield from walk(sub)

  return [e.primitive.name for e in walk(jax.make_jaxpr(f)(x).jaxpr)
          if e.primitive.name.startswith(("reduce", "argm")) and e.invars
          and getattr(e.invars[0].aval, "shape", None) == x.shape]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_log_softmax_gradient_of_narrow_rows_by_columns(dtype):
  """At least `COLUMN_ROWS` rows of at most `_log_softmax.COLUMN_ROW`
  classes: on CPU the float32 tangent's row sum is elementwise over the
  class columns (no reduction over the classes; bfloat16 keeps its row
  reduction), and reverse mode's broadcast of the cotangent's row sum is by
  columns too; jax.nn's derivatives: -inf inputs, `where`, axis 1 of (N, C,
  H, W), jax.vmap."""
  from jaxce import _log_softmax

  c, n = _log_softmax.COLUMN_ROW, _log_softmax.COLUMN_ROWS
  dt = jnp.dtype(dtype)
  rng = _rng(41)
  x = rng.normal(size=(n, c)).astype(np.float32) * 4
  x[3, 2] = -np.inf
  where = rng.random((n, c)) < 0.8
  where[:, 0] = True
  jx, ct = jnp.asarray(x, dt), jnp.asarray(rng.normal(size=(n, c)), dt)
  vjp = lambda f, x, ct: jax.vjp(f, x)[1](ct)[0]
  by_columns = {(n, c): True, (n // 4, 4, c): True, (n, c + 1): False, (n - 1, c): False}
  for shape, columns in by_columns.items():
    x1 = jnp.zeros(shape, dt)
    sums = _class_axis_reductions(lambda x: jax.jvp(jaxce.log_softmax, (x,), (x,))[1], x1)
    assert sums.count("reduce_sum") == (not columns or dt == jnp.bfloat16), (shape, sums)
  # (bfloat16: jax.nn rounds its steps to 16 bits; 0.027 seen, 2 ulps of |ct| ~ 4)
  tol = {"rtol": 1e-5, "atol": 1e-5} if dt == jnp.float32 else {"rtol": 2e-2, "atol": 6e-2}

  def close(f, g, x, ct):
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, ct), np.float32),
                               np.asarray(g(x, ct), np.float32), **tol)

  for mask in (None, jnp.asarray(where)):
    mine = functools.partial(jaxce.log_softmax, where=mask)
    theirs = functools.partial(jax.nn.log_softmax, where=mask)
    close(lambda x, ct, f=mine: vjp(f, x, ct), lambda x, ct, f=theirs: vjp(f, x, ct), jx, ct)
  x4 = jnp.asarray(rng.normal(size=(16, c, 16, 16)), dt)
  close(lambda x, ct: vjp(functools.partial(jaxce.log_softmax, axis=1), x, ct),
        lambda x, ct: vjp(functools.partial(jax.nn.log_softmax, axis=1), x, ct), x4, x4)
  close(lambda x, ct: vjp(jax.vmap(jaxce.log_softmax), x, ct),
        lambda x, ct: vjp(jax.nn.log_softmax, x, ct), jx.reshape(8, -1, c), ct.reshape(8, -1, c))


@pytest.mark.parametrize("c", [2, 10, pytest.param(17, marks=pytest.mark.slow), 32])
def test_narrow_rows_sum_by_columns_and_stay_exact(c):
  """Rows of at most NARROW_ROW classes: on CPU the log-sum and the max are
  elementwise over the class columns (_stats._others_in_columns), with no
  reduction over the classes in the forward, and stay exact: losses near 0
  within 4 ulps of themselves, gradients within 8 ulps of their row's
  largest entry (exp((x - shift) - log_sum) rounds its argument to half an
  ulp of |x - shift|: 4 ulps at two classes), with -inf classes, an ignored
  row and labels far below their row's max (the max-shift fallback, by
  columns too); also with the classes on axis 1 of (N, C, H, W), and under
  jax.vmap over N."""
  from jaxce import _stats

  assert _stats._narrow_row((5, c), 1)
  assert not _stats._narrow_row((5, _stats.NARROW_ROW + 1), 1)
  x, y = _dominant_label_inputs(c, 3e4 if c == 10 else 0.0)
  # Logits on a 1/256 grid, so that x - x_y is exact in float32: with two
  # classes a loss near 0 is one exp of it, and the rounding of x_y (half an
  # ulp of 16) alone moved it by 8.7 ulps (the earlier kernel the same).
  x = (np.round(x.astype(np.float64) * 256) / 256).astype(np.float32)
  ref, ref_g = _ref_rows(x, y)
  jx, jy = jnp.asarray(x), jnp.asarray(y)
  per_row = lambda x: jaxce.cross_entropy(x, jy, reduction="none")
  assert _class_axis_reductions(per_row, jx) == []
  wide = jnp.zeros((x.shape[0], _stats.NARROW_ROW + 1), jnp.float32)  # (the walk sees them)
  assert _class_axis_reductions(lambda x: jaxce.cross_entropy(x, jy), wide)
  # Labels closed over (constants of the program) do not fold into a
  # constant mask per column: at most one [N] constant mask is left.
  hlo = jax.jit(lambda x: jaxce.cross_entropy(x, jy)).lower(jx).compile().as_text()
  assert len(re.findall(rf"pred\[{x.shape[0]}\]\{{0\}} constant", hlo)) <= 1
  total = lambda x: jaxce.cross_entropy(x, jy, reduction="sum")
  per, g = jax.jit(lambda x: (per_row(x), jax.grad(total)(x)))(jx)
  np.testing.assert_allclose(np.asarray(per, np.float64), ref, rtol=4 * EPS32, atol=0)
  scale = np.max(np.abs(ref_g), axis=1, keepdims=True)
  assert np.all(np.abs(np.asarray(g, np.float64) - ref_g) <= 8 * EPS32 * scale)
  # (N, C, H, W) = (4, c, 3, 4): row n * 12 + h * 4 + w is x[n, :, h, w]
  image = lambda a: np.moveaxis(a.reshape(4, 3, 4, *a.shape[1:]), 3, 1) if a.ndim == 2 else (
      a.reshape(4, 3, 4))
  xi, yi = jnp.asarray(image(x)), jnp.asarray(image(y))
  scale_i = image(np.broadcast_to(scale, ref_g.shape))

  def both(x, y, axis):
    sum_loss = lambda x: jaxce.cross_entropy(x, y, axis=axis, reduction="sum")
    return jaxce.cross_entropy(x, y, axis=axis, reduction="none"), jax.grad(sum_loss)(x)

  for per_i, g_i in (jax.jit(functools.partial(both, axis=1))(xi, yi),
                     jax.jit(jax.vmap(functools.partial(both, axis=0)))(xi, yi)):
    np.testing.assert_allclose(np.asarray(per_i, np.float64), image(ref), rtol=4 * EPS32, atol=0)
    assert np.all(np.abs(np.asarray(g_i, np.float64) - image(ref_g)) <= 8 * EPS32 * scale_i)


def test_one_class_rows():
  """A single class (the columns' shortest row): loss 0 and gradient 0 for
  finite logits, NaN for a label out of range, 0 for an ignored one."""
  x = jnp.asarray([[3.0], [-1e30], [0.0], [5.0]], jnp.float32)
  y = jnp.asarray([0, 0, -100, 1])
  per = jaxce.cross_entropy(x, y, reduction="none")
  np.testing.assert_array_equal(np.asarray(per[:3]), [0.0, 0.0, 0.0])
  assert np.isnan(per[3])
  g = jax.grad(lambda x: jaxce.cross_entropy(x[:3], y[:3], reduction="sum"))(x)
  np.testing.assert_array_equal(np.asarray(g), np.zeros((4, 1), np.float32))


def test_export_with_symbolic_batch_keeps_the_blocks():
  """Under jax.export with a symbolic number of rows, the CPU rule above
  cannot compare the logits' size: it keeps the blocks, and the exported
  loss and gradient match the eager ones."""
  from jax import export

  b, = export.symbolic_shape("b")
  f = jax.jit(jax.value_and_grad(jaxce.cross_entropy))
  exp = export.export(f)(jax.ShapeDtypeStruct((b, 1000), jnp.float32),
                         jax.ShapeDtypeStruct((b,), jnp.int32))
  x = jnp.asarray(_rng(27).normal(size=(5, 1000)), jnp.float32)
  y = jnp.array([0, 999, 3, -100, 500])
  got, want = exp.call(x, y), f(x, y)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-9)


BLOCK_OPTIONS = {
    "plain": {},
    "weight_ignore": {"weight": True, "ignore_index": 7},
    "smoothing_z": {"label_smoothing": 0.2, "z_loss": 1e-3},
    "where": {"where": True},
}
_BLOCK_CASES = [pytest.param(layout, opts, id=f"{name}-{layout}",
                             marks=[] if (name, layout) in {("plain", "2d"), ("where", "nchw")}
                             else [pytest.mark.slow])
                for name, opts in BLOCK_OPTIONS.items() for layout in ("2d", "nchw")]


@pytest.mark.parametrize(("c", "blocked"), [(4096, False), (40960, True)])
def test_half_precision_log_sum_paths_match_reference(c, blocked):
  """bfloat16 on CPU: rows up to LONG_ROW classes take the arithmetic mask,
  longer ones the blocks (see _stats._cpu_block_size); both against the
  float64 reference of the same rounded logits, with a dominant label (a
  loss near 0) and an ignored row."""
  import reference as ref

  from jaxce import _stats

  x = jnp.asarray(_rng(25).normal(size=(4, c)) * 3, jnp.bfloat16)
  assert (_stats._cpu_block_size(x, 1) is not None) == blocked
  y = np.array([7, c - 1, -100, 0], np.int32)
  x = x.at[0, 7].set(28.0)  # p_y = 1 - tiny: a loss of 1e-7 to 1e-6
  x64 = np.asarray(x, np.float64)
  loss, g = jax.jit(jax.value_and_grad(jaxce.cross_entropy))(x, jnp.asarray(y))
  np.testing.assert_allclose(float(loss), ref.cross_entropy_int(x64, y), rtol=1e-5)
  ref_g = ref.cross_entropy_int_grad(x64, y)
  np.testing.assert_allclose(np.asarray(g, np.float64), ref_g, rtol=2**-7, atol=1e-6)
  per = jaxce.cross_entropy(x, jnp.asarray(y), reduction="none")
  tiny = np.log1p(np.sum(np.exp(np.delete(x64[0], 7) - x64[0, 7])))  # no 1 + tiny
  assert 1e-8 < tiny < 1e-5
  np.testing.assert_allclose(float(per[0]), tiny, rtol=4 * 2**-23)


@pytest.mark.parametrize(("layout", "opts"), _BLOCK_CASES)
def test_class_axis_in_blocks_matches_reference(layout, opts):
  """C = 256: on CPU the log-sum runs in blocks of 64 classes with the
  label's block gathered (see _stats._others_in_blocks); loss and gradient
  against the float64 reference, with every option that touches the sum,
  in (N, C) and (N, C, H, W) with axis=1, under jit and vmap."""
  import reference as ref

  from jaxce import _sum

  c = 256
  assert _sum.block_size(c) == 64
  shape, axis = ((12, c), -1) if layout == "2d" else ((2, c, 3, 2), 1)
  rng = _rng(24)
  x = (rng.normal(size=shape) * 3).astype(np.float32)
  pos = shape[:1] + shape[2:] if axis == 1 else shape[:1]
  y = rng.integers(0, c, size=pos).astype(np.int32)
  y.reshape(-1)[[0, -1]] = [c - 1, 0]  # the first and last blocks
  if "ignore_index" in opts:
    y.reshape(-1)[1] = opts["ignore_index"]
  kw = {k: v for k, v in opts.items() if k not in ("weight", "where")}
  weight = rng.uniform(0.5, 2.0, size=c).astype(np.float32) if "weight" in opts else None
  where = None
  if "where" in opts:
    where = rng.random(shape) > 0.3
    np.put_along_axis(where, np.expand_dims(y, axis), True, axis)
  ref_loss = ref.cross_entropy_int(x, y, weight=weight, axis=axis, where=where, **kw)
  ref_g = ref.cross_entropy_int_grad(x, y, weight=weight, axis=axis, where=where, **kw)

  def f(x, y):
    return jaxce.cross_entropy(x, y, weight=None if weight is None else jnp.asarray(weight),
                               axis=axis, where=None if where is None else jnp.asarray(where),
                               **kw)

  loss, g = jax.jit(jax.value_and_grad(f))(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g, np.float64), ref_g, rtol=1e-5, atol=1e-7)
  if layout == "2d" and not opts:  # vmap over rows: each a batch of one
    per = jax.jit(jax.vmap(lambda r, t: f(r[None], t[None])))(jnp.asarray(x), jnp.asarray(y))
    ref_per = ref.cross_entropy_int(x, y, axis=axis, reduction="none")
    np.testing.assert_allclose(np.asarray(per, np.float64), ref_per, rtol=1e-5)


@pytest.fixture(params=["one_device", "devices"])
def cpu_devices(request, monkeypatch):
  """Both CPU rules of `_stats._takes_row_chunks`: as in a process with one CPU device
  (row chunks), and as in this one, with 8 (the arithmetic mask). Caches are
  cleared so that nothing traced under the other rule is reused."""
  from jaxce import _stats

  if request.param == "one_device":
    monkeypatch.setattr(_stats, "one_cpu_device", lambda: True)
  else:
    assert not _stats.one_cpu_device()
  jax.clear_caches()
  yield request.param == "one_device"
  jax.clear_caches()


@pytest.mark.parametrize("layout", ["2d", "vmap", "nchw", "bf16", "empty"])
def test_long_rows_without_blocks_match_reference(layout, cpu_devices):
  """Rows longer than LONG_ROW with no block divisor (C = 40009, prime): on
  CPU with one device the integer-label log-sum runs a few rows at a time (6
  here, so the last of 7 rows' chunks overlaps the one before), with the
  one-hot select; on axis 1 of (N, C, H, W), or with more CPU devices, by the
  arithmetic mask over the whole array. Loss and gradient against the
  float64 reference, with a dominant label (loss near 0), an ignored row, a
  row of -inf but its label, and a label far below its row's max (the batch
  takes the max-shift fallback)."""
  import reference as ref

  from jaxce import _stats, _sum

  c = 40009
  assert _sum.block_size(c) is None
  assert _stats.ROW_CHUNK // c == 6
  rng = _rng(41)
  n = 0 if layout == "empty" else 7
  x = (rng.normal(size=(n, c)) * 3).astype(np.float32)
  y = rng.integers(0, c, size=n).astype(np.int32)
  if n:
    x[0, y[0]] = 40.0
    y[1] = -100
    x[2] = -np.inf
    x[2, y[2]] = 1.0
    x[6, y[6]] = -200.0
  dtype = jnp.bfloat16 if layout == "bf16" else jnp.float32
  x = rows = np.asarray(jnp.asarray(x, dtype), np.float32)  # the rounded logits
  axis = -1
  if layout == "nchw":  # (7, C) as (1, C, 7, 1)
    x, y, axis = x.T[None, :, :, None], y[None, :, None], 1
  chunked = _stats._takes_row_chunks(jnp.asarray(x), axis % x.ndim)
  assert chunked == (layout != "nchw" and cpu_devices)
  want = ref.cross_entropy_int(x.astype(np.float64), y, axis=axis, reduction="none")
  if n:  # row 0 from exact differences, no 1 + tiny: the loss to its own magnitude
    tiny = np.log1p(np.sum(np.exp(np.delete(rows[0], y.reshape(-1)[0]).astype(np.float64) - 40)))
    assert 1e-20 < tiny < 1e-10
    want.reshape(-1)[0] = tiny
  want_g = ref.cross_entropy_int_grad(x.astype(np.float64), y, axis=axis)
  f = lambda x, y: jaxce.cross_entropy(x, y, axis=axis, reduction="none")
  jx, jy = jnp.asarray(x, dtype), jnp.asarray(y)
  looped = "scan[" in str(jax.make_jaxpr(f)(jx, jy))  # the chunks (a fori_loop)
  assert looped == (layout != "nchw" and cpu_devices)
  if layout == "vmap":  # one row per call: chunks of one row
    per = jax.jit(jax.vmap(lambda r, t: f(r[None], t[None])[0]))(jx, jy)
  else:
    per = jax.jit(f)(jx, jy)
  g = jax.jit(jax.grad(lambda x: jaxce.cross_entropy(x, jy, axis=axis)))(jx)
  # A float32 sum of 40,008 terms per row (row 0's loss; row 6's log-sum,
  # in its gradient): the chunks' sums are within 4 ulps. The arithmetic
  # mask's sum over the whole row, in XLA:CPU's order, was off by 6.5 ulps on
  # an AVX-512 machine and by 187 (2.2e-5) on an AVX2 one (AMD EPYC): hence
  # 512 there. Against the failure row 0 guards against, 1 + tiny rounded,
  # its error would be 100%.
  sum_ulps = 16 if chunked else 512
  rtol = max(1e-5, sum_ulps * EPS32) if dtype == jnp.float32 else 1e-3
  np.testing.assert_allclose(np.asarray(per, np.float64), want, rtol=rtol, atol=0)
  np.testing.assert_allclose(np.asarray(g, np.float64), want_g,  # (bf16 gradient: 2**-8)
                             **({"rtol": rtol, "atol": 1e-8} if dtype == jnp.float32
                                else {"rtol": 2**-7, "atol": 1e-6}))
  if n:
    np.testing.assert_allclose(float(np.asarray(per).reshape(-1)[0]), tiny,
                               rtol=sum_ulps * EPS32)


@pytest.mark.parametrize("c", [40960, 50257])
@pytest.mark.parametrize("case", ["smooth", "smooth_weight_where", "probs_smooth"])
def test_long_rows_sum_in_blocks_match_reference(branches, case, c):
  """Rows longer than LONG_ROW: on CPU the smoothing sums and the target sums
  run over blocks and then across them (`_stats._cpu_row_sums`, blocks of 512
  and 1733 here), elsewhere over the row; loss and gradient against the
  float64 reference, with -inf logits, a row of them and an ignored label."""
  from jaxce import _stats

  rng = _rng(31)
  x = (rng.normal(size=(4, c)) * 3).astype(np.float32)
  x[1, :100] = -np.inf
  x[2] = -np.inf
  x[3, 5] = -np.inf
  (view, *_), _ = _stats._cpu_row_sums(1, jnp.asarray(x))
  assert view.ndim == 3  # in blocks
  y = np.array([0, 150, 3, -100], np.int32)
  weight = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
  where = rng.random(x.shape) > 0.2
  where[:, :200] = True
  if case == "probs_smooth":
    t = rng.random(x.shape) * (x > -np.inf)
    t = t / np.maximum(t.sum(-1, keepdims=True), 1e-30)
    _, ref_loss, ref_g = ref_ce_probs(x, t, eps=0.3)
    f = functools.partial(jaxce.cross_entropy, labels=jnp.asarray(t, jnp.float32),
                          label_smoothing=0.3)
  else:
    kw = {"weight": weight, "where": where} if case == "smooth_weight_where" else {}
    _, ref_loss, ref_g = ref_ce_int(x, y, eps=0.2, **kw)
    f = functools.partial(jaxce.cross_entropy, labels=jnp.asarray(y), label_smoothing=0.2,
                          **{k: jnp.asarray(v) for k, v in kw.items()})
  loss, g = jax.jit(jax.value_and_grad(f))(jnp.asarray(x))
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g, np.float64), ref_g, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------
# Both code paths (XLA:CPU's, and TPU/GPU's run on CPU: the `branches` fixture
# of conftest.py) on the integer-label cases where they differ: the `nll`
# statistic's gradient (0 or NaN rows set after the reduction on CPU, inside
# the exp's offset elsewhere, where half-precision logits take one offset).


@pytest.mark.parametrize("opts", [
    {}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"weight": True, "label_smoothing": 0.2},
], ids=["plain", "smooth_z", "weight_smooth"])
def test_both_paths_bfloat16_integer_targets(all_branches, opts):
  test_bfloat16_integer_targets_accuracy(opts)


@pytest.mark.parametrize("how", ["where", "neg_inf"])
@pytest.mark.parametrize("opts", [{}, {"z_loss": 0.01}], ids=["plain", "z_loss"])
def test_both_paths_fully_masked_rows(branches, opts, how):
  test_fully_masked_rows_integer_targets(opts, how)


@pytest.mark.parametrize(("c", "offset"), [(50, 0.0), (1000, 3e4), (257, -1e6)])
def test_both_paths_dominant_label(branches, c, offset):
  test_dominant_label_losses_accurate_to_their_own_magnitude(c, offset)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_both_paths_half_precision_far_from_zero(branches, dtype):
  """Half-precision logits near +-1000 (lse of that size, whose float32
  rounding is the one-offset exp's error on TPU and GPU): the gradient within
  half an ulp of its own dtype of the float64 one, at every normal entry
  above 1e-3 of the row's largest, dominant labels' p - 1 included."""
  rng = _rng(31)
  n, c = 24, 40
  for offset in (1000.0, -1000.0):
    x = jnp.asarray(offset + rng.integers(-12, 1, size=(n, c)) * 0.5, dtype)
    y = rng.integers(0, c, size=n).astype(np.int32)
    x = x.at[np.arange(n)[::2], y[::2]].set(offset + 12.0)  # p_y = 1 - ~1e-5
    xf = np.asarray(x, np.float64)
    total = functools.partial(lambda x, y: jaxce.cross_entropy(x, y, reduction="sum"),
                              y=jnp.asarray(y))
    g = jax.jit(jax.grad(total))(x)
    assert g.dtype == x.dtype
    _, ref_g = _ref_rows(xf, y)
    g = np.asarray(g, np.float64)
    big = np.abs(ref_g) >= np.maximum(1e-3 * np.max(np.abs(ref_g), axis=1, keepdims=True),
                                      float(jnp.finfo(dtype).tiny))
    assert np.sum(big[np.arange(n), y]) >= n // 2, "labels' entries not checked"
    ulp = 2.0 ** -(8 if dtype == "bfloat16" else 11)
    assert np.all(np.abs(g - ref_g)[big] <= ulp * np.abs(ref_g)[big] * 1.01), (offset,)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_both_paths_out_of_range_label_nan_row(branches, reduction):
  """A label outside [0, C) that is not ignored: NaN loss and a NaN gradient
  row (so that a non-finite check on the update sees it); the other rows,
  ignored ones included (0), as PyTorch's formula gives."""
  rng = _rng(33)
  x = jnp.asarray(rng.normal(size=(6, 7)), jnp.float32)
  y = jnp.asarray([0, 9, 2, -100, 6, 3], jnp.int32)
  f = lambda x: jnp.sum(jaxce.cross_entropy(x, y, reduction=reduction))
  loss, g = jax.jit(jax.value_and_grad(f))(x)
  assert np.isnan(loss)
  g = np.asarray(g)
  assert np.all(np.isnan(g[1]))
  assert np.all(g[3] == 0)
  rows = [0, 2, 4, 5]
  yr = np.asarray(y)[rows]
  ref_g = _ref_rows(np.asarray(x, np.float64)[rows], yr)[1]
  if reduction == "mean":
    ref_g = ref_g / 5  # five positions not ignored, the bad one among them
  _close(g[rows], ref_g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_out_of_range_label_nan_row_in_both_modes(reduction, weighted):
  """`nll_loss` as `cross_entropy` above: a label outside [0, C) that is not
  ignored gives a NaN gradient row in reverse mode too (its one-hot matches
  no class, so the row's NaN cotangent was dropped for a plausible 0), and
  forward mode's directional derivative along that row is NaN; the other
  rows as PyTorch's formula gives, ignored ones 0."""
  rng = _rng(35)
  x = jnp.asarray(rng.normal(size=(6, 7)), jnp.float32)
  y = jnp.asarray([0, 9, 2, -100, 6, -3], jnp.int32)
  w = jnp.linspace(0.5, 2.0, 7) if weighted else None
  f = lambda x: jnp.sum(jaxce.nll_loss(x, y, weight=w, reduction=reduction))
  for grad in (jax.grad(f), jax.jit(jax.grad(f))):
    g = np.asarray(grad(x))
    assert np.all(np.isnan(g[[1, 5]]))
    assert np.all(g[3] == 0)
    rows = [0, 2, 4]
    ref_g = np.zeros((3, 7))
    ref_g[np.arange(3), np.asarray(y)[rows]] = -(1.0 if w is None else np.asarray(w)[
        np.asarray(y)[rows]])
    if reduction == "mean" and w is None:
      ref_g = ref_g / 5  # five positions not ignored, the bad ones among them
    if reduction == "mean" and w is not None:
      assert np.all(np.isfinite(g[rows]))  # (as cross_entropy's)
    else:
      _close(g[rows], ref_g, rtol=1e-6)
  t = jnp.zeros_like(x).at[1].set(1.0)
  assert np.isnan(jax.jvp(f, (x,), (t,))[1])


@pytest.mark.parametrize("opts", [
    {"label_smoothing": 0.1}, {"z_loss": 1e-2}, {"weight": True, "label_smoothing": 0.1},
    {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2}, {"weight": True},
], ids=["smooth", "z", "weight_smooth", "weight_smooth_z", "weight"])
def test_both_paths_out_of_range_label_nan_row_with_options(all_branches, opts):
  """As above with the options whose derivatives take the label's statistics
  another way (`_reduction._smoothed_through_nll`, `_nll_through_log_sum`):
  the bad label's gradient row is still NaN, in reverse and forward mode,
  also where its row has no active class (all -inf, or masked whole by
  `where`); an ignored row 0, the others finite."""
  x = jnp.asarray(_rng(34).normal(size=(8, 7)), jnp.float32)
  x = x.at[6].set(-jnp.inf)
  y = jnp.asarray([0, 9, 2, -100, 6, 3, 7, -1], jnp.int32)
  where = jnp.ones(x.shape, bool).at[7].set(False)
  kw = dict(opts)
  if kw.pop("weight", False):
    kw["weight"] = jnp.linspace(0.5, 2.0, 7)
  f = lambda x: jaxce.cross_entropy(x, y, where=where, **kw)
  rows = [1, 6, 7]
  tangents = jnp.zeros((3, *x.shape), x.dtype).at[np.arange(3), np.asarray(rows)].set(1.0)
  (loss, g), jvps = jax.jit(lambda x, ts: (
      jax.value_and_grad(f)(x), jax.vmap(lambda t: jax.jvp(f, (x,), (t,))[1])(ts)))(x, tangents)
  g = np.asarray(g)
  assert np.isnan(loss)
  assert np.all(np.isnan(g[rows]))
  assert np.all(g[3] == 0)
  assert np.all(np.isfinite(g[[0, 2, 4, 5]]))
  assert np.all(np.isnan(jvps)), jvps


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("layout", ["last", "nchw"])
def test_both_paths_label_smoothing_masked_classes(all_branches, weighted, layout):
  """Label smoothing's sums (count of active classes, their weight sum and
  the weighted sum of x - shift; reduced beside the log-sum, in one stacked
  reduction on GPU) over `where`-masked classes, -inf logits, a row masked
  whole, an ignored label and one at a -inf logit: loss and gradient equal
  to the float64 reference, with the classes on the last axis and on axis
  1 of (N, C, H, W)."""
  rng = _rng(38)
  n, c = 9, 11
  x = rng.normal(size=(n, c)) * 3
  where = rng.random((n, c)) > 0.3
  where[4] = False
  y = rng.integers(0, c, size=n).astype(np.int32)
  x[1, [k for k in range(c) if k != y[1]][:2]] = -np.inf
  where[np.arange(n), y] = True
  y[6] = -100
  x[7, y[7]] = -np.inf  # the label's logit is -inf: an infinite loss there
  w = np.linspace(0.5, 2.0, c) if weighted else None
  kw = {"label_smoothing": 0.2, "weight": None if w is None else jnp.asarray(w)}
  rows = np.arange(n) != 7
  ref_per, _, ref_g = ref_ce_int(x[rows], y[rows], w, eps=0.2, where=where[rows])
  def move(a):  # rows of (N, C) as (N/3, C, 3, 1) with the classes on axis 1
    return a if layout == "last" else np.moveaxis(a.reshape(3, 3, c, 1), 2, 1)
  def back(a):
    return a if layout == "last" else np.moveaxis(a, 1, 2).reshape(a.shape[0] * 3, c)
  axis = -1 if layout == "last" else 1
  yy = y if layout == "last" else y.reshape(3, 3, 1)
  def f(x, sel):
    per = jaxce.cross_entropy(x, jnp.asarray(yy), where=jnp.asarray(move(where)), axis=axis,
                              reduction="none", **kw)
    return jnp.sum(jnp.where(sel.reshape(per.shape), per, 0.0)), per
  vg = jax.jit(jax.value_and_grad(f, has_aux=True))
  for sel in (rows, np.ones(n, bool)):
    (_, per), g = vg(jnp.asarray(move(x), jnp.float32), jnp.asarray(sel))
    per = np.asarray(per).reshape(n)
    if sel.all():
      assert per[7] == np.inf
      continue
    _close(per[rows], ref_per, rtol=1e-5, atol=1e-6, what="per-position loss")
    w_y = np.ones(c) if w is None else w
    d = np.sum(np.where(y[rows] != -100, w_y[np.clip(y[rows], 0, c - 1)], 0))  # ref's mean
    _close(back(np.asarray(g))[rows], ref_g * d, rtol=1e-5, atol=1e-6, what="gradient")
    assert np.all(back(np.asarray(g))[7] == 0)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_both_paths_probability_targets_smoothing_masked_classes(all_branches, weighted):
  """Probability targets with label smoothing and z-loss (their log-sum,
  target and smoothing sums reduced together, in one stacked reduction on
  GPU) over `where`-masked classes, -inf logits and a row masked whole: loss
  and gradient equal to the float64 reference."""
  rng = _rng(39)
  n, c = 8, 13
  x = rng.normal(size=(n, c)) * 3
  where = rng.random((n, c)) > 0.3
  where[5] = False
  t = rng.random((n, c)) * where
  t = t / np.maximum(t.sum(-1, keepdims=True), 1e-9)
  x[2, np.flatnonzero(t[2] == 0)[:2]] = -np.inf  # -inf logits with no target mass
  w = np.linspace(0.5, 2.0, c) if weighted else None
  kw = {"label_smoothing": 0.1, "z_loss": 1e-2, "weight": None if w is None else jnp.asarray(w)}
  f = lambda x: jaxce.cross_entropy(x, jnp.asarray(t, jnp.float32), where=jnp.asarray(where),
                                    **kw)
  loss, g = jax.jit(jax.value_and_grad(f))(jnp.asarray(x, jnp.float32))
  _, ref_mean, ref_g = ref_ce_probs(x, t, w, eps=0.1, z=1e-2, where=where)
  _close(loss, ref_mean, rtol=1e-5, what="loss")
  _close(g, ref_g, rtol=1e-5, atol=1e-7, what="gradient")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_paths_forward_mode(all_branches, dtype):
  """jvp of the plain loss, of z-loss (d log_sum) and smoothing, with ignored
  and fully masked rows: equal to the float64 reference's directional
  derivative."""
  rng = _rng(35)
  n, c = 8, 12
  x = np.asarray(jnp.asarray(rng.normal(size=(n, c)) * 3, dtype), np.float64)
  where = np.ones((n, c), bool)
  where[2] = False
  y = rng.integers(0, c, size=n).astype(np.int32)
  y[5] = -100
  v = rng.normal(size=(n, c))
  def tangent(x, v, **kw):
    f = lambda x: jaxce.cross_entropy(x, jnp.asarray(y), where=jnp.asarray(where), **kw)
    return jax.jvp(f, (x,), (v,))[1]

  for kw in ({}, {"z_loss": 0.01, "label_smoothing": 0.1}):
    t = jax.jit(functools.partial(tangent, **kw))(jnp.asarray(x, dtype), jnp.asarray(v, dtype))
    _, _, ref_g = ref_ce_int(x, y, eps=kw.get("label_smoothing", 0.0), z=kw.get("z_loss", 0.0),
                             where=where)
    expected = np.sum(ref_g * np.asarray(jnp.asarray(v, dtype), np.float64))
    tol = 1e-5 if dtype == "float32" else 1e-2
    _close(t, expected, rtol=tol, atol=tol * np.sum(np.abs(ref_g)), what=str(kw))


def test_both_paths_bfloat16_probability_targets_and_log_softmax(all_branches):
  test_bfloat16_probability_targets_accuracy()
  test_bfloat16_nll_log_softmax_logsumexp_accuracy()
  test_neg_inf_logits_half_precision()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_both_paths_half_precision_softmax_gradients_far_from_zero(all_branches, dtype):
  """log_softmax's and logsumexp's gradients, and probability targets', on
  half-precision logits near +-1000 with a -inf entry and a row masked
  whole: within half an ulp of their dtype of the float64 ones at every
  normal entry above 1e-3 of the row's largest, plus, where the softmax
  term cancels against another, 2**-22 |lse| of that term (the TPU/GPU
  path's one offset rounds p by up to 2**-24 |lse|); the masked row's 0."""
  rng = _rng(37)
  n, c = 16, 40
  ulp = 2.0 ** -(8 if dtype == "bfloat16" else 11)
  where = np.ones((n, c), bool)
  where[3] = False
  where[5, :7] = False
  jw = jnp.asarray(where)
  losses = {  # of (x, cot, t)
      "log_softmax": lambda x, cot, t: jnp.sum(jnp.where(
          jw, jaxce.log_softmax(x, where=jw), 0.0).astype(jnp.float32) * cot),
      "logsumexp": lambda x, cot, t: jnp.sum(jnp.where(
          np.arange(n) != 3, jaxce.logsumexp(x, where=jw).astype(jnp.float32), 0.0)),
      "probabilities": lambda x, cot, t: jaxce.cross_entropy(x, t, where=jw, reduction="sum"),
  }
  for offset in (1000.0, -1000.0):
    x = jnp.asarray(offset + rng.integers(-12, 1, size=(n, c)) * 0.5, dtype)
    x = x.at[7, 2].set(-jnp.inf)
    xf = np.asarray(x, np.float64)
    # (the output's cotangent is in its dtype)
    cot = np.asarray(jnp.asarray(rng.normal(size=(n, c)), dtype), np.float64)
    t = rng.dirichlet(np.ones(c), size=n) * where
    _, act, _, lse, p = _prep(xf, where)
    total_cot = np.where(where, cot, 0.0).sum(-1, keepdims=True)  # (a -inf logit's
    mass = t.sum(-1, keepdims=True)  # output, -inf - lse, has a cotangent)
    refs = {  # the gradient, and its softmax term
        "log_softmax": (np.where(act, cot - p * total_cot, 0.0), p * np.abs(total_cot)),
        "logsumexp": (p, p),
        "probabilities": (np.where(act, p * mass - t, 0.0), p * mass),
    }
    for name, (ref, term) in refs.items():
      g = jax.jit(jax.grad(losses[name]))(x, jnp.asarray(cot, jnp.float32),
                                          jnp.asarray(t, jnp.float32))
      assert g.dtype == x.dtype, name
      g = np.asarray(g, np.float64)
      assert np.all(g[3] == 0), name
      big = np.abs(ref) >= np.maximum(1e-3 * np.max(np.abs(ref), axis=1, keepdims=True),
                                      float(jnp.finfo(dtype).tiny))
      bound = 1.01 * ulp * np.abs(ref) + 2.0**-22 * np.abs(lse)[:, None] * term
      assert np.all((np.abs(g - ref) <= bound)[big]), (name, offset)
