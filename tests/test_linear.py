"""`jaxce.linear_cross_entropy`: the fused linear + cross-entropy that never
materializes the [N, V] logits.

It must equal `jaxce.cross_entropy(x @ kernel + bias, labels, ...)` (logits
soft-capped to `softcap * tanh(logits / softcap)` when asked) with the same
options, reductions, ignore / all-ignored rules, dtypes and errors. Checked
here: values and gradients (x, kernel, bias, class weight) against that
reference for every option and chunk size, bf16, jit / vmap / checkpoint,
second order, the row-blocked dx accumulation, `default_chunk_size`, the saved
residuals and the compiled program (no [N, V] buffer), argument errors, and
the PyTorch goldens of tests/golden/linear_cross_entropy.npz; and
backward="precompute" against recompute, the reference and the goldens, with
the rule of backward="auto".

Compile time dominates on CPU, so the option matrix and the goldens run as a
few jitted programs of GROUP cases each (inputs as arguments; XLA's compile
time grows faster than linearly with the program, so not one program); each
case is still its own test.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_compile import compile_as_shipped, compile_fast
from golden import load, torch_version
from residuals import saved_residuals

import jaxce
from jaxce import _cpu_features, _linear_precompute, _linear_stats

F32 = jnp.float32
F32_EPS = float(np.finfo(np.float32).eps)
HIGHEST = jax.lax.Precision.HIGHEST
# Compile time dominates: the programs compile with FAST_COMPILE
# (tests/fast_compile.py); the memory checks with XLA's defaults.

GROUP = 4  # cases per compiled program
D, V = 5, 37  # V prime: chunk 7 leaves a shifted, overlapping last chunk
INF_COLS = (33, 36)  # -inf bias: 33 lies in the overlap of the last chunk of 7


# ---------------------------------------------------------------------------
# Helpers: fast compilation, the materialized reference, comparison.


def _fast(fn):
  """`fn` jitted, compiled with FAST_COMPILE for the arguments of each call."""
  return lambda *args: compile_fast(fn, *args)(*args)


def _ct(dtype):
  """The reference's compute dtype: float64 stays, everything else float32."""
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else F32


def _ref_logits(x, kernel, bias=None, softcap=None):
  """x @ kernel + bias (soft-capped), materialized, in the compute dtype."""
  ct = _ct(x.dtype)
  z = jax.lax.dot_general(
      x.astype(ct), kernel.astype(ct), (((x.ndim - 1,), (0,)), ((), ())), precision=HIGHEST)
  if bias is not None:
    z = z + bias.astype(ct).reshape((1,) * (z.ndim - 1) + (-1,))
  if softcap is not None:  # a -inf logit (from a -inf bias) stays -inf: no class
    z = jnp.where(z == -jnp.inf, -jnp.inf, softcap * jnp.tanh(z / softcap))
  return z


def _ref_loss(x, kernel, labels, *, bias=None, softcap=None, chunk_size=None, **kw):
  del chunk_size
  return jaxce.cross_entropy(_ref_logits(x, kernel, bias, softcap), labels, **kw)


def _lin_loss(x, kernel, labels, **kw):
  return jaxce.linear_cross_entropy(x, kernel, labels, **kw)


def _value_and_grads(loss_fn, params, labels, cot, kw):
  """(loss, grads of params) where the objective is the loss, or
  sum(loss * cot) for reduction "none". `params` holds x, kernel and
  optionally bias and weight."""
  def f(p):
    p = dict(p)
    loss = loss_fn(p.pop("x"), p.pop("kernel"), labels, **p, **kw)
    if kw.get("reduction") == "none":
      return jnp.sum(loss * jnp.asarray(cot).astype(loss.dtype)), loss
    return loss, loss

  (_, loss), grads = jax.value_and_grad(f, has_aux=True)(params)
  return loss, grads


def _assert_close(actual, expected, rtol, atol, what):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


# ---------------------------------------------------------------------------
# The option matrix against cross_entropy on materialized logits (float32).

BASE = dict(lead=(6,), chunk=7, reduction="mean", bias=True, weight=False, ignore_index=-100,
            ignored="none", eps=0.0, z=0.0, softcap=None, scale=1.0, inf_bias=False)
ALL_OPTS = dict(weight=True, ignore_index=3, ignored="some", eps=0.2, z=1e-3, softcap=2.0,
                scale=2.0)


def _spec(**kw):
  assert set(kw) <= set(BASE), kw
  return {**BASE, **kw}


SPECS = {}
# chunk sizes: one column, a prime not dividing V (shifted last chunk), exactly V
for _chunk in (1, 7, 37):
  SPECS[f"chunk{_chunk}"] = _spec(chunk=_chunk, reduction="none", weight=True, ignored="some")
SPECS.update({
    "chunk50-smoothing-sum": _spec(chunk=50, eps=0.1, weight=True, reduction="sum"),  # > V
    "plain": _spec(),
    "no_bias-z_loss-sum": _spec(bias=False, z=1e-2, ignored="some", reduction="sum"),
    "ignore_valid_class-weight-smoothing-none": _spec(
        ignore_index=3, ignored="some", weight=True, eps=0.1, reduction="none"),
    "smoothing-weight": _spec(eps=0.1, weight=True, ignored="some"),
    "smoothing1-weight-sum": _spec(eps=1.0, weight=True, reduction="sum"),
    "softcap": _spec(softcap=1.5, scale=3.0),
    "all-none": _spec(**ALL_OPTS, reduction="none"),
    "all-mean-chunk1": _spec(**ALL_OPTS, chunk=1),
    "all-sum-chunkNone": _spec(**ALL_OPTS, chunk=None, reduction="sum"),
    # leading batch dims: x [B, T, D], labels [B, T]
    "batch-all-none-chunk13": _spec(**ALL_OPTS, lead=(2, 3), reduction="none", chunk=13),
    "batch-mean-chunkNone": _spec(lead=(2, 3), chunk=None, ignored="some"),
    # extreme but finite: logits reach about +-1e3
    "extreme-smoothing-weight": _spec(scale=400.0, eps=0.1, weight=True),
    "extreme-softcap-none": _spec(scale=400.0, softcap=50.0, ignored="some", reduction="none"),
    # -inf bias entries: those classes take no part
    "inf_bias-smoothing-weight": _spec(inf_bias=True, eps=0.1, weight=True),
    "inf_bias-none-chunk1": _spec(inf_bias=True, reduction="none", chunk=1, z=1e-2),
    "inf_bias-softcap": _spec(inf_bias=True, softcap=2.0, eps=0.1),
    # every label ignored
    "all_ignored-mean": _spec(ignored="all", weight=True, eps=0.1, z=1e-2),
    "all_ignored-mean-valid_class": _spec(ignored="all", ignore_index=3, softcap=2.0),
    "all_ignored-none": _spec(ignored="all", weight=True, eps=0.1, reduction="none", z=1e-2),
})


def _inputs(spec, seed):
  """numpy inputs of one case: params (x, kernel, [bias], [weight]), labels, cot."""
  rng = np.random.default_rng(seed)
  lead = spec["lead"]
  x = rng.normal(size=(*lead, D)) * spec["scale"]
  kernel = rng.normal(size=(D, V)) * 0.5
  params = {"x": x, "kernel": kernel}
  if spec["bias"]:
    bias = rng.normal(size=(V,)) * 0.5
    if spec["inf_bias"]:
      bias[list(INF_COLS)] = -np.inf
    params["bias"] = bias
  if spec["weight"]:
    params["weight"] = rng.uniform(0.2, 2.0, size=(V,))
  labels = rng.integers(0, V, size=lead)
  flat = labels.reshape(-1)
  flat[np.isin(flat, INF_COLS)] = 0  # no label on a removed class (its loss is +inf)
  if spec["ignored"] == "some":
    flat[::3] = spec["ignore_index"]
  elif spec["ignored"] == "all":
    flat[:] = spec["ignore_index"]
  cot = rng.normal(size=lead)
  params = {k: np.asarray(v, np.float32) for k, v in params.items()}
  return params, np.asarray(labels, np.int32), np.asarray(cot, np.float32)


def _kwargs(spec):
  return dict(ignore_index=spec["ignore_index"], reduction=spec["reduction"],
              label_smoothing=spec["eps"], z_loss=spec["z"], softcap=spec["softcap"],
              chunk_size=spec["chunk"])


MATRIX_NAMES = list(SPECS)


@functools.cache
def _matrix_results(group):
  """{case: (lib (loss, grads), ref (loss, grads))}, {case: inputs} for one
  group of GROUP cases of SPECS, in one program."""
  names = MATRIX_NAMES[group * GROUP:(group + 1) * GROUP]
  inputs = [_inputs(SPECS[n], MATRIX_NAMES.index(n)) for n in names]

  def run(all_inputs):
    out = []
    for name, (params, labels, cot) in zip(names, all_inputs, strict=True):
      kw = _kwargs(SPECS[name])
      out.append((_value_and_grads(_lin_loss, params, labels, cot, kw),
                  _value_and_grads(_ref_loss, params, labels, cot, kw)))
    return out

  results = jax.device_get(_fast(run)(inputs))
  return dict(zip(names, results, strict=True)), dict(zip(names, inputs, strict=True))


@pytest.mark.parametrize("name", list(SPECS))
def test_matches_cross_entropy_on_materialized_logits(name):
  spec = SPECS[name]
  results, inputs = _matrix_results(MATRIX_NAMES.index(name) // GROUP)
  (loss, grads), (ref_loss, ref_grads) = results[name]
  params = inputs[name][0]

  assert loss.dtype == np.float32
  assert loss.shape == (spec["lead"] if spec["reduction"] == "none" else ())
  assert set(grads) == set(params)
  for k, g in grads.items():
    assert g.dtype == np.float32, k
    assert g.shape == params[k].shape, k
    assert np.all(np.isfinite(g)), k
  assert np.all(np.isfinite(loss))
  # float32 rounds the logsumexp at the magnitude of the largest logit.
  logit_scale = float(np.max(np.abs(params["x"] @ params["kernel"])))

  if spec["ignored"] == "all":
    # mean over nothing is 0.0 (not NaN), and nothing moves.
    assert np.all(loss == 0.0)
    for k, g in grads.items():
      assert np.all(g == 0.0), k

  if name.startswith("extreme"):
    assert logit_scale > 500.0, logit_scale

  if spec["inf_bias"]:
    cols = list(INF_COLS)
    assert np.all(grads["bias"][cols] == 0.0)
    if spec["softcap"] is None:  # soft-capped, a -inf logit becomes -softcap
      assert np.all(grads["kernel"][:, cols] == 0.0)

  tol = dict(rtol=2e-5, atol=1e-6 + 16 * F32_EPS * logit_scale)
  _assert_close(loss, ref_loss, what="loss", **tol)
  for k in grads:
    scale = float(np.max(np.abs(ref_grads[k]), initial=0.0))
    _assert_close(grads[k], ref_grads[k], rtol=1e-4,
                  atol=1e-6 + 1e-5 * scale + 16 * F32_EPS * logit_scale * scale,
                  what=f"gradient with respect to {k}")


def test_label_outside_range_gives_nan_like_cross_entropy():
  params, labels, _ = _inputs(_spec(), 0)
  labels = labels.copy()
  labels[1], labels[4] = V, -5  # neither is ignore_index
  kw = dict(bias=params["bias"], reduction="none", chunk_size=7)
  loss, ref = jax.device_get(_fast(lambda p, y: [
      fn(p["x"], p["kernel"], y, **kw) for fn in (_lin_loss, _ref_loss)])(params, labels))
  assert np.isnan(loss[[1, 4]]).all()
  assert np.isnan(ref[[1, 4]]).all()
  ok = [0, 2, 3, 5]
  _assert_close(loss[ok], ref[ok], rtol=2e-5, atol=1e-6, what="other positions")


# ---------------------------------------------------------------------------
# bfloat16 inputs: float32 loss, gradients in the input dtype.


def test_bfloat16():
  spec = _spec(**ALL_OPTS, reduction="none")
  params, labels, cot = _inputs(spec, 100)
  kw = _kwargs(spec)
  bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in params.items()}
  mixed = {**bf, "bias": jnp.asarray(params["bias"], F32)}  # float32 bias with bf16 x

  @_fast
  def run(bf, mixed):
    # the reference: the same bf16-rounded values, in float32
    return {name: (_value_and_grads(_lin_loss, p, labels, cot, kw),
                   _value_and_grads(_ref_loss, p, labels, cot, kw))
            for name, p in (("bf16", bf), ("mixed", mixed))}

  out = jax.device_get(run(bf, mixed))
  for name, ((loss, grads), (ref_loss, ref_grads)) in out.items():
    assert loss.dtype == np.float32
    _assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, what=f"{name} loss")
    for k, g in grads.items():
      want = np.float32 if (name, k) == ("mixed", "bias") else jnp.bfloat16
      assert g.dtype == ref_grads[k].dtype == want, (name, k, g.dtype)
      # the cotangent of the logits is rounded to bf16 before each matmul
      scale = float(np.max(np.abs(np.asarray(ref_grads[k], np.float32))))
      _assert_close(g, ref_grads[k], rtol=3e-2, atol=2e-2 * scale, what=f"{name} d{k}")


# ---------------------------------------------------------------------------
# Transformations: vmap, checkpoint, second order.


def test_vmap_over_extra_leading_axis():
  B, N = 3, 4
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(B, N, D)), F32)
  kernel = jnp.asarray(rng.normal(size=(D, V)) * 0.5, F32)
  kernels = jnp.asarray(rng.normal(size=(B, D, V)) * 0.5, F32)
  bias = jnp.asarray(rng.normal(size=(V,)) * 0.5, F32)
  labels = jnp.asarray(rng.integers(0, V, size=(B, N)), jnp.int32).at[0, 1].set(-100)
  kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=2.0, chunk_size=7)

  @_fast
  def run(x, kernel, kernels, bias, labels):
    out = {}
    for tag, fn in (("lin", _lin_loss), ("ref", _ref_loss)):
      f = lambda x, k, b, y, fn=fn: fn(x, k, y, bias=b, **kw)
      vg = jax.value_and_grad(f, (0, 1, 2))
      out[tag] = (jax.vmap(vg, in_axes=(0, None, None, 0))(x, kernel, bias, labels),
                  jax.vmap(vg, in_axes=(0, 0, None, 0))(x, kernels, bias, labels))
    out["single"] = _lin_loss(x[1], kernel, labels[1], bias=bias, **kw)
    return out

  out = jax.device_get(run(x, kernel, kernels, bias, labels))
  (losses, (dx, dkernel, dbias)), _ = out["lin"]
  assert losses.shape == (B,)
  assert dx.shape == (B, N, D)
  assert dkernel.shape == (B, D, V)
  assert dbias.shape == (B, V)
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(out["lin"]), leaves(out["ref"]), strict=True):
    _assert_close(a, b, rtol=1e-4, atol=1e-6, what="vmap")
  _assert_close(losses[1], out["single"], rtol=1e-6, atol=1e-7, what="unbatched call")


def test_checkpoint():
  params, labels, _ = _inputs(_spec(**ALL_OPTS), 11)
  kw = _kwargs(_spec(**ALL_OPTS))

  def loss(p):
    return _lin_loss(p["x"], p["kernel"], labels, bias=p["bias"], weight=p["weight"], **kw)

  @_fast
  def run(params):
    return [jax.value_and_grad(f)(params) for f in (
        loss, jax.checkpoint(loss),
        jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable))]

  plain, *remat = jax.device_get(run(params))
  for other in remat:
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(other), leaves(plain), strict=True):
      _assert_close(a, b, rtol=1e-6, atol=1e-7, what="checkpoint")


def _second_order_inputs(seed):
  spec = _spec(**ALL_OPTS)
  params, labels, _ = _inputs(spec, seed)
  weight = params.pop("weight")
  rng = np.random.default_rng(seed + 1)
  tangent = {k: np.asarray(rng.normal(size=v.shape), np.float32) for k, v in params.items()}
  return params, weight, labels, tangent, {**_kwargs(spec), "reduction": "mean"}


def _tree_vdot(a, b):
  return sum(jnp.vdot(a[k], b[k]) for k in a)


def test_grad_of_grad_matches_reference():
  """Hessian-vector products (reverse over reverse) with respect to x, kernel
  and bias equal those of cross_entropy on materialized logits, with every
  option on (class weights fixed: see test_grad_of_grad_wrt_class_weight)."""
  params, weight, labels, tangent, kw = _second_order_inputs(12)

  @_fast
  def hvps(params, tangent):
    out = []
    for fn in (_lin_loss, _ref_loss):
      def f(p, fn=fn):
        return fn(p["x"], p["kernel"], labels, bias=p["bias"], weight=weight, **kw)

      out.append(jax.grad(lambda p, f=f: _tree_vdot(jax.grad(f)(p), tangent))(params))
    return out

  lin, ref = jax.device_get(hvps(params, tangent))
  for k in lin:
    scale = float(np.max(np.abs(ref[k])))
    _assert_close(lin[k], ref[k], rtol=1e-4, atol=1e-4 * scale, what=f"hvp {k}")


def test_second_order_finite_differences():
  """What `check_grads(f, order=2, modes=["rev"])` checks, in one compiled
  program (check_grads itself compiles op by op: ~30 s here): in a random
  direction u, central differences of f and of grad f against the gradient
  and the reverse-over-reverse VJP. float32 (the kernel accumulates in
  float32 whatever the input dtype), so a large step."""
  params, weight, labels, u, kw = _second_order_inputs(14)
  rng = np.random.default_rng(15)
  cot = {k: np.asarray(rng.normal(size=v.shape), np.float32) for k, v in params.items()}
  h = 1e-2

  def f(p):
    return _lin_loss(p["x"], p["kernel"], labels, bias=p["bias"], weight=weight, **kw)

  @_fast
  def run(p, u, cot):
    vg = jax.value_and_grad(f)
    (f_plus, g_plus), (f_minus, g_minus) = (
        vg({k: p[k] + sign * h * u[k] for k in p}) for sign in (1.0, -1.0))
    fd1 = (f_plus - f_minus) / (2 * h)
    fd2 = _tree_vdot({k: (g_plus[k] - g_minus[k]) / (2 * h) for k in p}, cot)
    ad1 = _tree_vdot(jax.grad(f)(p), u)
    ad2 = _tree_vdot(jax.grad(lambda p: _tree_vdot(jax.grad(f)(p), cot))(p), u)
    return fd1, ad1, fd2, ad2

  fd1, ad1, fd2, ad2 = jax.device_get(run(params, u, cot))
  _assert_close(ad1, fd1, rtol=1e-2, atol=1e-3, what="first order")
  _assert_close(ad2, fd2, rtol=1e-2, atol=1e-3, what="second order")


def test_grad_of_grad_wrt_class_weight():
  """Reverse over reverse with respect to the class weight, with label
  smoothing: NaN in the overlap columns of the shifted last chunk (chunk 7,
  V = 37: columns 30-34). The forward's smoothing sum masks those columns
  with -inf logits and takes jnp.where(active, w * z, 0.0); its cotangent for
  w is 0 * -inf = NaN (the where-gradient trap). cross_entropy has the same
  trap for genuinely -inf logits."""
  params, weight, labels, _, kw = _second_order_inputs(16)
  rng = np.random.default_rng(17)
  t_w = np.asarray(rng.normal(size=weight.shape), np.float32)

  @_fast
  def run(params, weight):
    out = []
    for fn in (_lin_loss, _ref_loss):
      def f(w, fn=fn):
        return fn(params["x"], params["kernel"], labels, bias=params["bias"], weight=w, **kw)

      out.append(jax.grad(lambda w, f=f: jnp.vdot(jax.grad(f)(w), t_w))(weight))
    return out

  lin, ref = jax.device_get(run(params, weight))
  assert np.all(np.isfinite(ref))
  nan_cols = np.flatnonzero(np.isnan(lin)).tolist()
  assert not nan_cols, f"NaN in columns {nan_cols}"
  _assert_close(lin, ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))), what="hvp weight")


# ---------------------------------------------------------------------------
# Forward mode (forward_mode=True): jvp, linearize, jacfwd, hessian, in float64.


def _plain_loss(x, kernel, labels, *, bias=None, weight=None, ignore_index=-100,
                reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, **_):
  """PyTorch's formula on materialized logits in plain JAX (so every
  transform applies): -inf logits take no part, smoothing spreads over the
  active classes, "mean" divides by the summed label weights."""
  z = _ref_logits(x, kernel, bias, softcap)
  lse = jax.nn.logsumexp(z, axis=-1)
  active = z > -jnp.inf
  logp = jnp.where(active, z - lse[..., None], 0.0)
  w = jnp.ones(z.shape[-1], z.dtype) if weight is None else weight
  valid = labels != ignore_index
  y = jnp.where(valid, labels, 0)
  w_y = jnp.where(valid, w[y], 0.0)
  nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
  count = jnp.sum(active, axis=-1, dtype=z.dtype)
  uniform = -jnp.sum(jnp.where(active, w[None] * logp, 0.0), axis=-1) / count
  eps = label_smoothing
  loss = (1 - eps) * w_y * nll + eps * jnp.where(valid, uniform, 0.0)
  loss = loss + z_loss * jnp.where(valid, lse, 0.0) ** 2
  if reduction == "none":
    return loss
  total = jnp.sum(loss)
  return total if reduction == "sum" else total / jnp.sum(w_y)


# One case per option family; each differentiates x, kernel, bias and weight.
FWD_CASES = {
    "mean-chunk7": dict(chunk_size=7),
    "weight-ignore_valid_class-sum-chunk1": dict(ignore_index=3, reduction="sum", chunk_size=1),
    "smoothing-weight-chunkNone": dict(label_smoothing=0.2, chunk_size=None),
    "z_loss-none-chunk7": dict(z_loss=1e-2, reduction="none", chunk_size=7),
    "softcap-smoothing-chunk13": dict(softcap=1.5, label_smoothing=0.1, chunk_size=13),
    "inf_bias-softcap-smoothing": dict(softcap=2.0, label_smoothing=0.1, chunk_size=7,
                                       inf_bias=True),
}


def _fwd_inputs(seed, inf_bias, ignore_index=-100):
  rng = np.random.default_rng(seed)
  n = 5
  params = {"x": rng.normal(size=(n, D)), "kernel": rng.normal(size=(D, V)) * 0.5,
            "bias": rng.normal(size=(V,)) * 0.5, "weight": rng.uniform(0.5, 2.0, size=(V,))}
  if inf_bias:
    params["bias"][list(INF_COLS)] = -np.inf
  labels = rng.integers(0, V, size=(n,))
  labels[np.isin(labels, INF_COLS)] = 0
  labels[[1, 4]] = ignore_index
  u, v = ({k: rng.normal(size=a.shape) for k, a in params.items()} for _ in range(2))
  cot = rng.normal(size=(n,))
  return params, labels, u, v, cot


SECOND_ORDER_ALL = "inf_bias-softcap-smoothing"  # every second-order transform here


@functools.cache
def _forward_mode_results(name):
  """First and second directional derivatives of the fused loss by each
  transform, of the plain reference, and central differences."""
  h = 1e-4
  kw = dict(FWD_CASES[name])
  inf_bias = kw.pop("inf_bias", False)
  with jax.enable_x64(True):
    inputs = _fwd_inputs(30 + list(FWD_CASES).index(name), inf_bias,
                         kw.get("ignore_index", -100))

    def run(inputs):
      params, labels, u, v, cot = inputs

      def objective(fn, forward_mode):
        def f(p):
          loss = fn(p["x"], p["kernel"], labels, bias=p["bias"], weight=p["weight"],
                    forward_mode=forward_mode, **kw)
          return jnp.sum(loss * cot) if kw.get("reduction") == "none" else loss
        return f

      f, f_rev, ref = objective(_lin_loss, True), objective(_lin_loss, False), objective(
          _plain_loss, None)
      jvp = lambda g, p, t: jax.jvp(g, (p,), (t,))[1]
      vjp = lambda g, p, t: _tree_vdot(jax.grad(g)(p), t)
      shifted = lambda p, t, s: {k: p[k] + s * h * t[k] for k in p}
      hvp_ref = jvp(lambda p: vjp(ref, p, u), params, v)
      res = {
          "value": (f(params), ref(params)),
          "jvp": (jvp(f, params, u), jvp(ref, params, u)),
          "linearize": (jax.linearize(f, params)[1](u), jvp(ref, params, u)),
          "vjp": (vjp(f, params, u), vjp(f_rev, params, u)),
          "fd1": ((f(shifted(params, u, 1)) - f(shifted(params, u, -1))) / (2 * h),
                  jvp(f, params, u)),
          "fwd_over_rev": (jvp(lambda p: vjp(f, p, u), params, v), hvp_ref),
      }
      if name == SECOND_ORDER_ALL:
        res.update({
            "fwd_over_fwd": (jvp(lambda p: jvp(f, p, u), params, v),
                             jvp(lambda p: jvp(ref, p, u), params, v)),
            "rev_over_fwd": (vjp(lambda p: jvp(f, p, u), params, v), hvp_ref),
            "rev_over_rev": (vjp(lambda p: vjp(f, p, u), params, v), hvp_ref),
            "rev_over_rev_default": (vjp(lambda p: vjp(f_rev, p, u), params, v), hvp_ref),
            "fd2": ((jvp(f, shifted(params, v, 1), u) - jvp(f, shifted(params, v, -1), u))
                    / (2 * h), jvp(lambda p: jvp(f, p, u), params, v)),
        })
      return res

    return jax.device_get(_fast(run)(inputs))


@pytest.mark.slow  # a sweep: `pytest -m slow` (.ci/run) runs it
@pytest.mark.parametrize("name", list(FWD_CASES))
def test_forward_mode_every_transform(name):
  """jvp, linearize and fwd-over-rev (Hessian-vector products) of
  forward_mode=True equal those of the plain float64 reference; its vjp
  equals the default mode's; central differences agree (what
  check_grads(order=2, modes=("fwd", "rev")) checks, in one compiled
  program). One case also checks fwd-over-fwd, rev-over-fwd and
  rev-over-rev of both modes. softcap and -inf bias entries included."""
  for what, (got, want) in _forward_mode_results(name).items():
    tol = 1e-6 if what.startswith("fd") else 1e-10
    _assert_close(got, want, rtol=tol, atol=tol, what=f"{name}: {what}")


def test_forward_mode_jacfwd_hessian_vmap():
  """jax.jacfwd, jax.hessian and jax.vmap of a jvp, against the reference."""
  with jax.enable_x64(True):
    params, labels, u, _, _ = _fwd_inputs(40, False)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0, chunk_size=7)
    x, kernel = params["x"], params["kernel"]

    def run(x, kernel, us):
      out = []
      for fn in (_lin_loss, _plain_loss):
        f = lambda x, fn=fn: fn(x, kernel, labels, forward_mode=True, **kw)
        out.append((jax.jacfwd(f)(x), jax.hessian(f)(x),
                    jax.vmap(lambda t, f=f: jax.jvp(f, (x,), (t,))[1])(us)))
      return out

    us = np.stack([u["x"], -u["x"], 2 * u["x"]])
    lin, ref = jax.device_get(_fast(run)(x, kernel, us))
  for what, a, b in zip(("jacfwd", "hessian", "vmap jvp"), lin, ref, strict=True):
    _assert_close(a, b, rtol=1e-10, atol=1e-10, what=what)


@pytest.mark.parametrize("chunk_size", [None, pytest.param(128, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_mode_jvp_runs_in_every_dtype(branches, dtype, chunk_size):
  """jax.jvp of forward_mode=True, executed (not only compiled) in bfloat16
  and float32, with tangents of x and the kernel, equals the plain loss's
  jvp on the same rounded inputs, in one chunk and in a loop of chunks. (In
  bfloat16 on XLA:CPU, in one chunk, it raised "Unsupported element type
  for DotThunk" at run time.)"""
  rng = np.random.default_rng(3)
  n, d, v = 24, 16, 300
  x, kernel, tx, tk = (jnp.asarray(rng.normal(size=s), dtype)
                       for s in ((n, d), (d, v), (n, d), (d, v)))
  labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
  lin = lambda x, k: _lin_loss(x, k, labels, forward_mode=True, chunk_size=chunk_size, **kw)
  ref = lambda x, k: _plain_loss(x.astype(jnp.float32), k.astype(jnp.float32), labels, **kw)
  try:
    (v1, t1), (v2, t2) = (jax.block_until_ready(jax.jvp(f, (x, kernel), (tx, tk)))
                          for f in (lin, ref))
  except jax.errors.JaxRuntimeError as e:
    # The TPU branch's bf16 product over both first axes, executed by
    # XLA:CPU: jaxlib 0.11's runtime has no such dot (0.10's ran it). TPUs
    # run it; on CPU jaxce takes the widened CPU branch (the "cpu" case).
    if branches == "tpu" and "Unsupported element type for DotThunk" in str(e):
      pytest.skip(f"XLA:CPU of jaxlib {jax.__version__} cannot execute the TPU branch: {e}")
    raise
  assert t1.dtype == jnp.float32
  _assert_close(v1, v2, rtol=1e-5, atol=1e-5, what="value")
  _assert_close(t1, t2, rtol=1e-4, atol=1e-4, what="jvp")


def test_default_mode_refuses_jvp_clearly():
  x, kernel = jnp.ones((2, D)), jnp.ones((D, V))
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda k: _lin_loss(x, k, jnp.zeros(2, jnp.int32)), (kernel,), (kernel,))


# ---------------------------------------------------------------------------
# The row-blocked dx accumulation.


@pytest.fixture
def fresh_caches():
  jax.clear_caches()
  yield
  jax.clear_caches()


def _scan_lengths(jaxpr_text):
  """Trip counts of the chunk loops: scans' lengths, and the bound of the
  forward statistics' while loops (`_linear_stats._while_chunks`)."""
  scans = re.findall(r"length=(\d+)", jaxpr_text)
  whiles = re.findall(r"cond_jaxpr=\{ lambda ;[^}]*?= lt \w+ (\d+):i32\[\]", jaxpr_text)
  return sorted(int(n) for n in scans + whiles)


@pytest.mark.parametrize(
    ("block_elements", "row_blocks"),
    [(24, 4),  # 3 rows a block: blocks 0-2, 3-5, 6-8 and a last one shifted to 7-9
     (5, 10),  # fewer elements than D: one row a block
     (80, None)])  # a single block of all 10 rows: no row loop
def test_row_blocked_dx(monkeypatch, fresh_caches, block_elements, row_blocks):
  n, d = 10, 8
  monkeypatch.setattr(_linear_stats, "BLOCK_ELEMENTS", block_elements)
  rng = np.random.default_rng(15)
  x = jnp.asarray(rng.normal(size=(n, d)), F32)
  kernel = jnp.asarray(rng.normal(size=(d, V)) * 0.5, F32)
  bias = jnp.asarray(rng.normal(size=(V,)) * 0.5, F32)
  labels = jnp.asarray(rng.integers(0, V, size=(n,)), jnp.int32).at[2].set(-100)
  cot = jnp.asarray(rng.normal(size=(n,)), F32)
  kw = dict(reduction="none", label_smoothing=0.1, softcap=2.0, chunk_size=7)

  def objective(fn):  # a fresh function: retraced with the patched constant
    return lambda x, k, b: jnp.sum(fn(x, k, labels, bias=b, **kw) * cot)

  grad_lin = jax.grad(objective(_lin_loss), (0, 1, 2))
  lengths = _scan_lengths(str(jax.make_jaxpr(grad_lin)(x, kernel, bias)))
  vocab_chunks = -(-V // 7)
  if row_blocks is None:
    assert set(lengths) == {vocab_chunks}, lengths
  else:
    assert row_blocks in lengths, lengths
  grad_ref = jax.grad(objective(_ref_loss), (0, 1, 2))
  lin, ref = _fast(lambda *a: (grad_lin(*a), grad_ref(*a)))(x, kernel, bias)
  for name, a, b in zip(("x", "kernel", "bias"), lin, ref, strict=True):
    _assert_close(a, b, rtol=1e-5, atol=1e-6, what=f"d{name}")


# ---------------------------------------------------------------------------
# default_chunk_size: the power of two that makes a float32 [N, chunk] block
# about BLOCK_ELEMENTS (2**22) elements, clamped to [128, V]
# (so V itself when V < 128).


@pytest.mark.parametrize(
    ("num_tokens", "vocab", "expected"),
    [
        (1, 50_000, 50_000),  # 2**22 columns wanted: all of V
        (64, 1000, 1000),
        (0, 1000, 1000),  # no tokens: counted as one
        (1000, 5000, 4096),  # 4194 -> the power of two below
        (8192, 128_256, 512),  # 2**22 / 2**13 exactly
        (8193, 128_256, 256),
        (2**15, 128_256, 128),
        (2**15 + 1, 128_256, 128),  # floor of 128
        (2**22, 128_256, 128),
        (2**23, 128_256, 128),
        (10**6, 100, 100),  # V below the floor
        (1, 1, 1),
    ])
def test_default_chunk_size(num_tokens, vocab, expected):
  assert _linear_stats.default_chunk_size(num_tokens, vocab) == expected


def test_default_chunk_size_takes_all_columns_for_few_tokens():
  # all of V when a float32 [N, V] block is no larger than the kernel
  # (4 N <= the kernel's bytes per column); chunks otherwise
  assert _linear_stats.default_chunk_size(64, 151_936, column_bytes=128 * 4) == 151_936
  assert _linear_stats.default_chunk_size(64, 151_936, column_bytes=128 * 2) == 151_936
  assert _linear_stats.default_chunk_size(65, 151_936, column_bytes=128 * 2) == 32_768
  assert _linear_stats.default_chunk_size(8192, 128_256, column_bytes=4096 * 2) == 512
  # ... and the block at most four blocks' worth (64 MiB): not at a Llama head
  assert _linear_stats.default_chunk_size(64, 262_144, column_bytes=128 * 2) == 262_144
  assert _linear_stats.default_chunk_size(2048, 128_256, column_bytes=4096 * 2) == 2048


def test_cpu_chunk_size():
  """XLA:CPU's chunk: float32 [N, chunk] blocks of about CPU_BLOCK_ELEMENTS
  (2**20) but at least CPU_MIN_CHUNK (512) columns, or the 16 MiB rule's
  chunk where that is smaller (N > 8192); all of V where
  `default_chunk_size` takes it whole for the kernel's sake, or where it
  fits in two such blocks (one chunk, no loop)."""
  rule = _linear_stats.cpu_chunk_size
  assert (_linear_stats.CPU_BLOCK_ELEMENTS, _linear_stats.CPU_MIN_CHUNK) == (2**20, 512)
  assert rule(512, 1_048_576, column_bytes=64 * 4) == 2048
  assert rule(2048, 65_536, column_bytes=256 * 2) == 512
  assert rule(1000, 50_257) == 1024
  assert rule(4096, 50_257) == 512  # 256 columns wanted
  assert rule(8192, 128_256, column_bytes=4096 * 2) == 512  # = the 16 MiB rule
  assert rule(16_384, 32_768) == 256
  assert rule(2**15, 32_768) == 128  # floor of 128
  assert rule(10**6, 100) == 100
  assert rule(512, 300) == 300
  assert rule(2048, 1024) == 1024  # 8 MiB: one chunk, no loop
  assert rule(4096, 1024) == 512
  assert rule(2048, 4096) == 512
  assert rule(64, 1000) == 1000
  assert rule(64, 151_936, column_bytes=128 * 4) == 151_936
  assert rule(64, 262_144, column_bytes=128 * 2) == 262_144
  assert rule(65, 151_936, column_bytes=128 * 2) == 8064  # 19 of 8192 narrowed
  # V split evenly over the power of two's chunk count, in multiples of 128
  # (the last chunk's overlap with the one before is computed twice): not
  # 7 x 8192 columns for V = 50257 (14% more), 7 x 7296.
  assert rule(128, 50_257, column_bytes=128 * 2) == 7296
  for n in (65, 128, 256, 1000, 2048, 4096, 8192):
    for vocab in (32_000, 50_257, 128_256, 151_936, 256_000):
      chunk = rule(n, vocab, column_bytes=128 * 2)
      if chunk < vocab:
        chunks = -(-vocab // chunk)
        assert chunk % 128 == 0, (n, vocab, chunk)
        assert chunks * chunk - vocab < 128 * chunks, (n, vocab, chunk)
  n = jax.export.symbolic_shape("n")[0]
  assert rule(n, 50_257) == _linear_stats.SYMBOLIC_CHUNK


@pytest.mark.parametrize(("dtype", "vocab"), [  # one group of 37; 8 groups of 5 (8 CPU devices)
    (jnp.bfloat16, 37), (jnp.float16, 40)])
def test_cpu_half_dkernel_panels_match_direct_writes(monkeypatch, fresh_caches, dtype, vocab):
  """The CPU backward writes a 16-bit dkernel a panel of chunks at a time (as
  bits, see `_rev_bwd_loop`): the same gradients, bit for bit, as writing each
  chunk into dkernel, with a last panel of fewer chunks, shifted in bounds,
  and with one panel of the whole kernel."""
  rng = np.random.default_rng(31)
  d = 8
  x = jnp.asarray(rng.normal(size=(6, d)), dtype)
  kernel = jnp.asarray(rng.normal(size=(d, vocab)), dtype)
  bias = jnp.asarray(rng.normal(size=(vocab,)), dtype)
  weight = jnp.asarray(rng.uniform(0.5, 2.0, size=(vocab,)), F32)
  labels = jnp.asarray([3, 0, -100, vocab - 1, 5, 1], jnp.int32)

  def grads():
    jax.clear_caches()
    return jax.grad(lambda x, k, b: jaxce.linear_cross_entropy(
        x, k, labels, bias=b, weight=weight, label_smoothing=0.1, chunk_size=2),
        (0, 1, 2))(x, kernel, bias)

  monkeypatch.setattr(_linear_stats, "CPU_PANEL_BYTES", None)
  want = grads()
  groups = math.gcd(vocab, jax.device_count())
  chunk = max(1, 2 // groups)
  chunks = -(-(vocab // groups) // chunk)
  for per_panel in (2, 3, 100):  # 100: one panel of the whole kernel
    size = per_panel * d * groups * chunk * 2  # bytes of `per_panel` chunks' columns
    panels = _linear_stats._panel_chunks(kernel, chunk, vocab // groups, groups, size)
    assert panels == min(per_panel, chunks)
    assert panels == chunks or chunks % panels, chunks  # else a last panel of fewer chunks
    monkeypatch.setattr(_linear_stats, "CPU_PANEL_BYTES", size)
    for got, ref in zip(grads(), want, strict=True):
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))


def test_default_chunk_size_rule():
  for n in (1, 3, 100, 1000, 4097, 50_000, 2**20):
    for v in (7, 128, 129, 1000, 32_000, 128_256):
      c = _linear_stats.default_chunk_size(n, v)
      assert 1 <= c <= v
      if c != v:
        assert c & (c - 1) == 0, (n, v, c)  # a power of two
        assert c >= 128, (n, v, c)
        if c > 128:  # the largest power of two with n * c <= BLOCK_ELEMENTS
          assert n * c <= _linear_stats.BLOCK_ELEMENTS < n * 2 * c, (n, v, c)


@pytest.mark.all_platforms  # (counts the other backends' loops too)
def test_default_chunk_size_is_used(monkeypatch, fresh_caches):
  rng = np.random.default_rng(16)
  n, vocab = 8, 1000
  x = jnp.asarray(rng.normal(size=(n, 4)), F32)
  kernel = jnp.asarray(rng.normal(size=(4, vocab)), F32)
  labels = jnp.asarray(rng.integers(0, vocab, size=(n,)), jnp.int32)
  def loss_fn(x, k):  # a new function per trace: make_jaxpr caches by function
    return _lin_loss(x, k, labels, reduction="none")

  # unpatched: 2**22 / 8 columns wanted, so one chunk of all of V (the jaxpr
  # holds XLA:CPU's loop over 8 groups and the other backends' over one:
  # `_linear_stats.Plan`, with the 8 test devices)
  text = str(jax.make_jaxpr(lambda x, k: loss_fn(x, k))(x, kernel))
  assert set(_scan_lengths(text)) == {1}
  monkeypatch.setattr(_linear_stats, "BLOCK_ELEMENTS", 2**12)
  monkeypatch.setattr(_linear_stats, "CPU_BLOCK_ELEMENTS", 2**11)  # 256 wanted, 512 the floor
  jax.clear_caches()  # the public function's cached trace holds the old chunk
  assert _linear_stats.default_chunk_size(n, vocab) == 512
  assert _linear_stats.cpu_chunk_size(n, vocab) == 512
  text = str(jax.make_jaxpr(lambda x, k: loss_fn(x, k))(x, kernel))
  assert set(_scan_lengths(text)) == {2}  # 1000 columns in chunks of 512 (64 x 8 groups)
  # XLA:CPU's loop takes its own block: chunks of 256 (32 x 8 groups), 4 steps
  monkeypatch.setattr(_linear_stats, "CPU_MIN_CHUNK", 128)
  jax.clear_caches()
  text = str(jax.make_jaxpr(lambda x, k: loss_fn(x, k))(x, kernel))
  assert sorted(_scan_lengths(text)) == [2, 4]
  loss, ref = _fast(lambda x, k: (loss_fn(x, k), _ref_loss(x, k, labels, reduction="none")))(
      x, kernel)
  _assert_close(loss, ref, rtol=1e-5, atol=1e-6, what="loss")


# ---------------------------------------------------------------------------
# Memory: what is saved for the backward, and what the compiled program holds.

RES_N, RES_D, RES_V = 64, 16, 1000


def _res_inputs(dtype):
  rng = np.random.default_rng(17)
  x = jnp.asarray(rng.normal(size=(RES_N, RES_D)), dtype)
  kernel = jnp.asarray(rng.normal(size=(RES_D, RES_V)) * 0.3, dtype)
  bias = jnp.asarray(rng.normal(size=(RES_V,)), dtype)
  weight = jnp.asarray(rng.uniform(0.5, 1.5, size=(RES_V,)), F32)
  labels = jnp.asarray(rng.integers(0, RES_V, size=(RES_N,)), jnp.int32).at[::5].set(-100)
  return x, kernel, bias, weight, labels


RES_OPTIONS = {
    "default": {},
    "all": dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, chunk_size=128),
    "chunk7_none": dict(chunk_size=7, reduction="none"),
    # reverse mode through the transposed tangent keeps the same residuals
    "forward_mode": dict(forward_mode=True),
    "forward_mode_all": dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, chunk_size=128,
                             forward_mode=True),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", list(RES_OPTIONS))
def test_saved_residuals_hold_no_logits(options, dtype):
  x, kernel, bias, weight, labels = _res_inputs(jnp.dtype(dtype))
  kw = RES_OPTIONS[options]

  def loss(x, kernel, bias, weight):
    out = jaxce.linear_cross_entropy(x, kernel, labels, bias=bias, weight=weight, **kw)
    return jnp.sum(out)

  res = saved_residuals(loss, x, kernel, bias, weight)
  short = {"float32": "f32", "bfloat16": "bf16"}[dtype]
  biggest = max(RES_N * RES_D, RES_D * RES_V)
  for dt, shape, origin in res:
    size = math.prod(shape)
    assert size != RES_N * RES_V, (dt, shape, origin, res)
    assert size <= biggest, (dt, shape, origin, res)
    if origin.startswith("from the argument"):
      # the inputs as given: no float32 copy of bf16 activations or kernel
      if shape in ((RES_N, RES_D), (RES_D, RES_V)):
        assert dt == short, (dt, shape, origin)
    elif not origin.startswith(("from a constant", "from a literal")):
      assert size <= RES_N, (dt, shape, origin, res)  # computed: per-token arrays only
  args = {o.split()[-1] for _, _, o in res if o.startswith("from the argument")}
  assert {"x", "kernel"} <= args, res  # the backward recomputes the logits from them


@pytest.mark.parametrize("policy", ["dots_saveable", "dots_with_no_batch_dims_saveable"])
@pytest.mark.parametrize("options", ["default", "all"])
def test_checkpoint_policies_save_no_chunk_logits(options, policy):
  """Under a user's `jax.checkpoint` whose policy saves matmul outputs, the
  recomputing backward still keeps no logits: the forward statistics' loop
  is a while loop, which remat recomputes whole (as a scan it kept every
  chunk's logits, stacked: an [N, V] array)."""
  x, kernel, bias, weight, labels = _res_inputs(jnp.dtype("bfloat16"))
  kw = {**RES_OPTIONS[options], "backward": "recompute"}

  def loss(x, kernel, bias, weight):
    return jaxce.linear_cross_entropy(x, kernel, labels, bias=bias, weight=weight, **kw)

  res = saved_residuals(
      jax.checkpoint(loss, policy=getattr(jax.checkpoint_policies, policy)),
      x, kernel, bias, weight)
  for dt, shape, origin in res:
    if not origin.startswith(("from the argument", "from a constant", "from a literal")):
      assert math.prod(shape) <= RES_N, (dt, shape, origin, res)


def test_saved_residuals_control():
  """The parser above sees an [N, V] residual where there is one."""
  x, kernel, _, _, labels = _res_inputs(F32)
  res = saved_residuals(lambda x, k: _ref_loss(x, k, labels), x, kernel)
  assert any(math.prod(s) == RES_N * RES_V for _, s, _ in res), res


HLO_N, HLO_D, HLO_V, HLO_CHUNK = 256, 32, 8192, 512
HLO_BLOCK = HLO_N * HLO_CHUNK * 4  # bytes of one float32 [N, chunk] block
HLO_OPTIONS = {
    "default": {},
    # measured: smoothing keeps about 5 [N, chunk] float32 blocks live (2.6 MB
    # here, against 1.2 MB without it), the same for V = 8192 and 16384
    "all": dict(weight=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
}


@pytest.mark.parametrize(("dtype", "options"),
                         [("float32", "default"), ("bfloat16", "default"), ("bfloat16", "all")])
def test_compiled_program_has_no_logits_buffer(monkeypatch, fresh_caches, dtype, options):
  # The CPU backward holds a 16-bit dkernel's bits in a panel of up to
  # CPU_PANEL_BYTES, the whole kernel while it fits (512 KiB here): four
  # chunks' columns keep the panel the same size at V and 2 V.
  monkeypatch.setattr(_linear_stats, "CPU_PANEL_BYTES", 4 * HLO_D * HLO_CHUNK * 2)
  dt = jnp.dtype(dtype)
  x = jax.ShapeDtypeStruct((HLO_N, HLO_D), dt)
  labels = jax.ShapeDtypeStruct((HLO_N,), jnp.int32)
  kw = dict(HLO_OPTIONS[options])
  use_weight = kw.pop("weight", False)

  def loss(x, kernel, bias, weight, labels):
    return jaxce.linear_cross_entropy(x, kernel, labels, bias=bias,
                                      weight=weight if use_weight else None,
                                      chunk_size=HLO_CHUNK, **kw)

  def compile_for(vocab):
    k = jax.ShapeDtypeStruct((HLO_D, vocab), dt)
    b = jax.ShapeDtypeStruct((vocab,), dt)
    w = jax.ShapeDtypeStruct((vocab,), F32)
    return compile_as_shipped(
        jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(x, k, b, w, labels))

  compiled = compile_for(HLO_V)
  text = compiled.as_text()
  assert f"[{HLO_N},{HLO_CHUNK}]" in text  # the chunk blocks are there, spelled so
  for shape in (f"[{HLO_N},{HLO_V}]", f"[{HLO_V},{HLO_N}]"):
    assert shape not in text, shape
  temp = compiled.memory_analysis().temp_size_in_bytes
  if options == "default":
    assert temp < HLO_N * HLO_V * 4 / 4, temp
  else:  # O(N * chunk), not O(N * V): a few blocks, the same at twice the vocabulary
    assert temp < 8 * HLO_BLOCK, temp
    assert compile_for(2 * HLO_V).memory_analysis().temp_size_in_bytes <= 1.05 * temp


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_holds_one_logits_block(fresh_caches, dtype):
  # N = 64 at D = 128 takes all of V in one chunk. The label's logit is
  # gathered on CPU (`_linear_stats._label_logit`): a select and sum wrote a
  # second float32 [N, V] block there (2.0x the logits' bytes, as optax's
  # forward on materialized logits holds 1.0x). V is odd, so one group on
  # the test process's 8 devices (groups keep the select).
  n, d, v = 64, 128, 65537
  dt = jnp.dtype(dtype)
  args = (jax.ShapeDtypeStruct((n, d), dt), jax.ShapeDtypeStruct((d, v), dt),
          jax.ShapeDtypeStruct((n,), jnp.int32))
  compiled = compile_as_shipped(jax.jit(jaxce.linear_cross_entropy).lower(*args))
  assert compiled.memory_analysis().temp_size_in_bytes <= 1.05 * n * v * 4


# ---------------------------------------------------------------------------
# Bad input: the right exception, a message naming the function and argument.

_X = np.zeros((4, D), np.float32)
_K = np.zeros((D, V), np.float32)
_Y = np.zeros((4,), np.int32)

BAD = {
    "D_mismatch": (dict(kernel=np.zeros((D + 1, V), np.float32)), ValueError, "kernel"),
    "kernel_rank1": (dict(kernel=np.zeros((D,), np.float32)), ValueError, "kernel"),
    "kernel_rank3": (dict(kernel=np.zeros((1, D, V), np.float32)), ValueError, "kernel"),
    "x_scalar": (dict(x=np.float32(1.0)), ValueError, "x"),
    "x_kernel_dtypes": (dict(kernel=_K.astype(jnp.bfloat16)), TypeError, "kernel"),
    "x_int": (dict(x=_X.astype(np.int32), kernel=_K.astype(np.int32)), TypeError, "x"),
    "labels_shape": (dict(labels=np.zeros((5,), np.int32)), ValueError, "labels"),
    "labels_rank": (dict(labels=np.zeros((4, 1), np.int32)), ValueError, "labels"),
    "labels_float": (dict(labels=_Y.astype(np.float32)), TypeError, "labels"),
    "bias_shape": (dict(bias=np.zeros((V - 1,), np.float32)), ValueError, "bias"),
    "bias_rank": (dict(bias=np.zeros((1, V), np.float32)), ValueError, "bias"),
    "bias_int": (dict(bias=np.zeros((V,), np.int32)), TypeError, "bias"),
    "weight_shape": (dict(weight=np.ones((V + 1,), np.float32)), ValueError, "weight"),
    "chunk_zero": (dict(chunk_size=0), ValueError, "chunk_size"),
    "chunk_negative": (dict(chunk_size=-3), ValueError, "chunk_size"),
    "chunk_float": (dict(chunk_size=2.5), TypeError, "chunk_size"),
    "chunk_str": (dict(chunk_size="8"), TypeError, "chunk_size"),
    "softcap_zero": (dict(softcap=0.0), ValueError, "softcap"),
    "softcap_negative": (dict(softcap=-1.0), ValueError, "softcap"),
    "softcap_nan": (dict(softcap=float("nan")), ValueError, "softcap"),
    "softcap_inf": (dict(softcap=float("inf")), ValueError, "softcap"),
    "smoothing_negative": (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    "smoothing_above_one": (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    "z_loss_negative": (dict(z_loss=-1e-3), ValueError, "z_loss"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction"),
    "backward_unknown": (dict(backward="both"), ValueError, "backward"),
    "backward_none": (dict(backward=None), ValueError, "backward"),
    "precompute_reduction_none": (dict(backward="precompute", reduction="none"), ValueError,
                                  "backward"),
    "precompute_forward_mode": (dict(backward="precompute", forward_mode=True), ValueError,
                                "backward"),
    "precompute_chunk_size": (dict(backward="precompute", chunk_size=8), ValueError, "backward"),
    "precompute_class_axis": (dict(backward="precompute", class_axis_name="model"), ValueError,
                              "backward"),
}


def test_bad_softcap_message():
  # one message for every value outside [2**-126, 2**102] (a subnormal cap is 0 on
  # XLA:CPU; above 2**102, z / cap of small logits is flushed to 0, and from 2**126 on
  # every capped logit was 0), with no range that suggests 0 or inf work
  for cap in (-1.0, 0.0, float("inf"), float("nan"), 1e-39, 1e31, 9e37, 3e38, 1e39):
    with pytest.raises(ValueError, match=(
        r"`softcap` must be in \[1\.2e-38, 5\.1e30\] \(2\*\*-126 to 2\*\*102\)\. Got")):
      jaxce.linear_cross_entropy(_X, _K, _Y, softcap=cap)
  # the ends work, and a cap of 2**102 changes no logit near 1 (nor its gradient)
  rng = np.random.default_rng(0)
  x, k = rng.normal(size=_X.shape).astype(np.float32), rng.normal(size=_K.shape).astype(np.float32)
  for cap in (2.0**-126, 2.0**102):
    assert np.isfinite(jaxce.linear_cross_entropy(x, k, _Y, softcap=cap))
  for f in (jaxce.linear_cross_entropy, jax.grad(jaxce.linear_cross_entropy)):
    np.testing.assert_allclose(f(x, k, _Y, softcap=2.0**102), f(x, k, _Y), rtol=1e-5, atol=1e-7)
  with pytest.raises(TypeError, match=r"`softcap` must be a static Python float"):
    jax.jit(lambda c: jaxce.linear_cross_entropy(_X, _K, _Y, softcap=c))(2.0)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
  override, exc, arg = BAD[case]
  args = dict(x=_X, kernel=_K, labels=_Y)
  kw = {k: v for k, v in override.items() if k not in args}
  args.update({k: v for k, v in override.items() if k in args})
  pattern = rf"linear_cross_entropy: .*`{arg}`"
  with pytest.raises(exc, match=pattern):
    jaxce.linear_cross_entropy(args["x"], args["kernel"], args["labels"], **kw)
  # the same at trace time, under jit
  with pytest.raises(exc, match=pattern):
    jax.eval_shape(lambda x, k, y: jaxce.linear_cross_entropy(x, k, y, **kw),
                   args["x"], args["kernel"], args["labels"])


# ---------------------------------------------------------------------------
# PyTorch goldens (tests/golden/linear_cross_entropy.npz, see make_golden.py).

GOLDEN = load("linear_cross_entropy")
GOLDEN_INPUTS = ("x", "kernel", "bias", "weight", "cot")
GOLDEN_CHUNK = 4  # V = 11: chunks 0-3, 4-7 and a last one shifted to 7-10


def test_golden_file():
  assert len(GOLDEN) == 16
  assert torch_version("linear_cross_entropy")
  assert {c["meta"]["fn"] for c in GOLDEN} == {"linear_cross_entropy"}


def _golden_run(meta, a, backward):
  kw = dict(ignore_index=meta["ignore_index"], reduction=meta["reduction"],
            label_smoothing=meta["label_smoothing"], softcap=meta["softcap"],
            chunk_size=GOLDEN_CHUNK)
  if backward == "precompute" and meta["reduction"] != "none":
    kw.update(chunk_size=None, backward="precompute")
  params = {k: a[k] for k in ("x", "kernel", "bias", "weight") if k in a}
  return _value_and_grads(_lin_loss, params, a["labels"], a.get("cot", 1.0), kw)


@functools.cache
def _golden_results(dtype, group, backward="recompute"):
  cases = GOLDEN[group * GROUP:(group + 1) * GROUP]
  metas = [c["meta"] for c in cases]
  with jax.enable_x64(dtype == "float64"):
    inputs = [{**{k: jnp.asarray(c[k], dtype) for k in GOLDEN_INPUTS if k in c},
               "labels": jnp.asarray(c["labels"])} for c in cases]
    run = _fast(lambda inputs: [_golden_run(m, a, backward)
                                for m, a in zip(metas, inputs, strict=True)])
    return jax.device_get(run(inputs))


def _golden_mismatches(index, dtype, backward="recompute"):
  """Every way case `index` differs from torch in `dtype`, as messages."""
  case = GOLDEN[index]
  meta = case["meta"]
  loss, grads = _golden_results(dtype, index // GROUP, backward)[index % GROUP]
  if dtype == "float64":
    tol = dict(rtol=1e-10, atol=1e-12)
  else:
    logits = np.abs(case["x"]).max() * np.abs(case["kernel"]).sum(0).max()
    tol = dict(rtol=1e-5, atol=1e-6 + 8 * F32_EPS * logits)
  bad = []
  if loss.dtype != np.dtype(dtype):
    bad.append(f"loss dtype {loss.dtype}")
  bad += [f"d{k} dtype {g.dtype}" for k, g in grads.items() if g.dtype != np.dtype(dtype)]
  checks = [("grad_" + k, grads[k], case["grad_" + k]) for k in ("x", "kernel", "bias")]
  if meta["all_ignored"] and meta["reduction"] == "mean":
    assert np.isnan(case["loss"])  # torch: 0 / 0
    if float(loss) != 0.0:  # jaxce, on purpose
      bad.append(f"all-ignored mean loss {loss}, expected 0.0")
  else:
    checks.append(("loss", loss, case["loss"]))
  for what, actual, expected in checks:
    actual = np.asarray(actual, np.float64)
    if actual.shape != expected.shape:
      bad.append(f"{what}: shape {actual.shape}, expected {expected.shape}")
    elif not np.allclose(actual, expected, equal_nan=False, **tol):
      err = np.abs(actual - expected)
      rel = np.max(err / np.maximum(np.abs(expected), tol["atol"]))
      bad.append(f"{what}: max abs error {np.max(err):.3g}, max rel error {rel:.3g}")
  return [f"{meta['case_id']}: {b}" for b in bad]


@pytest.mark.parametrize("index", range(len(GOLDEN)),
                         ids=[c["meta"]["case_id"] for c in GOLDEN])
def test_golden_float32(index):
  bad = _golden_mismatches(index, "float32")
  assert not bad, "\n".join(bad)


def test_golden_float64():
  """All cases at float64 tolerance (one test: one cause fails them all)."""
  bad = [m for i in range(len(GOLDEN)) for m in _golden_mismatches(i, "float64")]
  assert not bad, f"{len(bad)} mismatches:\n" + "\n".join(bad)


def test_golden_float64_precompute():
  """backward="precompute" on the "mean" and "sum" cases, at float64 tolerance."""
  cases = [i for i, c in enumerate(GOLDEN) if c["meta"]["reduction"] != "none"]
  assert len(cases) >= 8
  bad = [m for i in cases for m in _golden_mismatches(i, "float64", "precompute")]
  assert not bad, f"{len(bad)} mismatches:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------
# Found while writing these tests: each is what cross_entropy does, or what
# the docstring promises, and linear_cross_entropy does not.


def test_float64_inputs_give_a_float64_loss():
  """Docstring: "float32 (float64 for float64 inputs) loss", as cross_entropy.
  The kernel computes in float32 (`_F32` throughout _linear.py): the loss is
  float32 and only float32-accurate."""
  rng = np.random.default_rng(18)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(4, D)), jnp.float64)
    kernel = jnp.asarray(rng.normal(size=(D, V)), jnp.float64)
    labels = jnp.asarray(rng.integers(0, V, size=(4,)), jnp.int64)
    loss, ref = _fast(lambda x, k: (jaxce.linear_cross_entropy(x, k, labels, chunk_size=7),
                                    _ref_loss(x, k, labels)))(x, kernel)
  assert ref.dtype == np.float64
  assert loss.dtype == np.float64
  _assert_close(loss, ref, rtol=1e-12, atol=0.0, what="float64 loss")


LABEL_DTYPES = [(False, jnp.int8), (False, jnp.uint8), (False, jnp.int16), (False, jnp.uint16),
                (False, jnp.uint32), (True, jnp.int64), (True, jnp.uint64)]


@pytest.mark.parametrize(("x64", "dtype"), LABEL_DTYPES,
                         ids=[f"{jnp.dtype(d).name}-x64={a}" for a, d in LABEL_DTYPES])
def test_any_integer_label_dtype(x64, dtype):
  """Labels are compared by value: every integer dtype gives the int32
  result. V = 300 > 255: uint8 156 (= -100 mod 256) is a class, not
  ignored; int8 labels near 127 are classes; the ignored and out-of-range
  labels (where the dtype holds them) behave as for int32."""
  vocab = 300
  rng = np.random.default_rng(19)
  x = np.asarray(rng.normal(size=(6, D)), np.float32)
  kernel = np.asarray(rng.normal(size=(D, vocab)) * 0.3, np.float32)
  info = np.iinfo(jnp.dtype(dtype))
  labels = np.asarray([min(156, info.max), 5, min(info.max, 299), 0, 100, 127])
  ignored = -100 if info.min < 0 else 5  # ignore_index a value the dtype holds
  with jax.enable_x64(x64):
    fn = _fast(lambda x, k, y, y32: [
        _lin_loss(x, k, yy, reduction="none", ignore_index=ii, chunk_size=64)
        for yy in (y, y32) for ii in (-100, ignored)])
    got = jax.device_get(fn(x, kernel, jnp.asarray(labels, dtype), jnp.asarray(labels, jnp.int32)))
  for a, b in ((got[0], got[2]), (got[1], got[3])):
    _assert_close(a, b, rtol=0, atol=0, what=f"{jnp.dtype(dtype).name} labels")
  assert np.all(np.isfinite(got[0]))  # uint8 156 is not -100


def test_uint16_token_ids_with_a_64k_vocabulary():
  """uint16 token ids with V = 65536: the largest id is a class (no NaN)."""
  vocab = 65536
  rng = np.random.default_rng(23)
  x = jnp.asarray(rng.normal(size=(3, 2)), F32)
  kernel = jnp.asarray(rng.normal(size=(2, vocab)) * 0.1, F32)
  labels = np.asarray([65535, 40000, 0])
  fn = jax.jit(lambda y: _lin_loss(x, kernel, y, reduction="none"))
  got, want = fn(jnp.asarray(labels, jnp.uint16)), fn(jnp.asarray(labels, jnp.int32))
  assert np.all(np.isfinite(got)), got
  _assert_close(got, want, rtol=0, atol=0, what="uint16 labels")


@pytest.mark.parametrize("forward_mode", [False, True])
def test_traced_ignore_index(forward_mode):
  """ignore_index may be a traced integer scalar, on every path."""
  rng = np.random.default_rng(24)
  x = jnp.asarray(rng.normal(size=(5, D)), F32)
  kernel = jnp.asarray(rng.normal(size=(D, V)), F32)
  labels = jnp.asarray([3, 1, 3, 0, 7], jnp.int32)
  kw = dict(forward_mode=forward_mode, chunk_size=7)

  @_fast
  def run(ii):
    return [jax.value_and_grad(lambda k, r=r: _lin_loss(x, k, labels, ignore_index=ii,
                                                         reduction=r, **kw))(kernel)
            if r != "none" else _lin_loss(x, kernel, labels, ignore_index=ii, reduction=r, **kw)
            for r in ("none", "mean")]

  got = run(jnp.asarray(3, jnp.int32))
  want = [jax.value_and_grad(lambda k: _lin_loss(x, k, labels, ignore_index=3, **kw))(kernel)]
  assert np.all(np.asarray(got[0])[[0, 2]] == 0.0)
  _assert_close(got[1][0], want[0][0], rtol=0, atol=0, what="mean")
  _assert_close(got[1][1], want[0][1], rtol=0, atol=0, what="grad")


def test_empty_vocabulary():
  """V = 0: the loss cross_entropy's rules give (every label is out of range:
  NaN, unless ignored: 0.0), zero gradients, no internal error."""
  x = jnp.ones((4, D), F32)
  kernel = jnp.ones((D, 0), F32)
  labels = jnp.asarray([0, -100, 2, -100], jnp.int32)
  f = jax.jit(lambda x, k, y, w: (
      _lin_loss(x, k, y, reduction="none"), _lin_loss(x, k, y, weight=w, label_smoothing=0.1),
      jax.grad(lambda x: _lin_loss(x, k, y, ignore_index=-100, z_loss=0.1))(x),
      _lin_loss(x, k, jnp.full_like(y, -100))))
  none, mean, dx, all_ignored = jax.device_get(f(x, kernel, labels, jnp.ones((0,), F32)))
  assert np.isnan(none[[0, 2]]).all()
  assert np.all(none[[1, 3]] == 0.0)
  assert np.isnan(mean)
  assert np.all(dx == 0.0)
  assert float(all_ignored) == 0.0


def test_export_with_symbolic_batch():
  """jax.export with a symbolic token count on the default path (default
  chunk, no chunk_size), value and gradients, reused at two batch sizes."""
  from jax import export
  b, = export.symbolic_shape("b")
  rng = np.random.default_rng(25)
  kernel = jnp.asarray(rng.normal(size=(D, V)), F32)
  f = jax.jit(jax.value_and_grad(lambda x, k, y: _lin_loss(x, k, y), (0, 1)))
  exp = export.export(f)(jax.ShapeDtypeStruct((b, D), F32), jax.ShapeDtypeStruct((D, V), F32),
                         jax.ShapeDtypeStruct((b,), jnp.int32))
  for n in (3, 8):
    x = jnp.asarray(rng.normal(size=(n, D)), F32)
    y = jnp.asarray(rng.integers(0, V, size=(n,)), jnp.int32)
    got, want = exp.call(x, kernel, y), f(x, kernel, y)
    _assert_close(got[0], want[0], rtol=1e-6, atol=1e-6, what="loss")
    for a, w in zip(got[1], want[1], strict=True):
      _assert_close(a, w, rtol=1e-5, atol=1e-6, what="grad")


def test_empty_batch():
  """cross_entropy on [0, V] logits gives 0.0 and empty gradients; here the
  backward's row-blocked dx accumulation slices one row out of zero rows
  (`_add_rows_matmul`: block = max(1, min(n, ...)) = 1 for n = 0)."""
  x = jnp.zeros((0, D), F32)
  kernel = jnp.asarray(np.random.default_rng(20).normal(size=(D, V)), F32)
  labels = jnp.zeros((0,), jnp.int32)
  vg = lambda fn: jax.value_and_grad(lambda x, k: fn(x, k, labels, chunk_size=7), (0, 1))
  ref_loss, _ = _fast(vg(_ref_loss))(x, kernel)
  assert float(ref_loss) == 0.0
  assert float(_fast(lambda x, k: _lin_loss(x, k, labels, chunk_size=7))(x, kernel)) == 0.0
  jax.eval_shape(vg(_lin_loss), x, kernel)  # the backward traces
  loss, (dx, dkernel) = _fast(vg(_lin_loss))(x, kernel)
  assert float(loss) == 0.0
  assert dx.shape == (0, D)
  assert np.all(np.asarray(dkernel) == 0.0)


def test_nan_activation_gives_nan():
  """A NaN in x must show in the loss (PyTorch: NaN). Today the NaN logsumexp
  fails integer_target_loss's `lse > -inf` test for "no class left", so the
  position silently contributes 0 (while its gradient is NaN).
  cross_entropy shares this: cross_entropy([[nan, 0.]], [0]) is 0.0."""
  x = jnp.asarray([[1.0, 2.0, 0.5, -1.0, 0.0], [np.nan, 0.0, 0.0, 0.0, 0.0]], F32)
  kernel = jnp.asarray(np.random.default_rng(21).normal(size=(D, V)), F32)
  labels = jnp.asarray([3, 4], jnp.int32)
  none, mean = _fast(lambda x, k: (_lin_loss(x, k, labels, reduction="none"),
                                   _lin_loss(x, k, labels)))(x, kernel)
  assert np.isfinite(float(none[0]))
  assert np.isnan(float(none[1])), none
  assert np.isnan(float(mean)), mean


def test_infinite_softcap():
  """softcap=inf passes the argument check, then inf * tanh(z / inf) = inf * 0
  gives NaN logits, and (see above) a silent 0.0 loss. Either refuse it,
  naming `softcap`, or treat it as no cap."""
  rng = np.random.default_rng(22)
  x = jnp.asarray(rng.normal(size=(4, D)), F32)
  kernel = jnp.asarray(rng.normal(size=(D, V)), F32)
  labels = jnp.asarray([0, 5, 36, 2], jnp.int32)
  try:
    jax.eval_shape(lambda x, k: _lin_loss(x, k, labels, softcap=float("inf")), x, kernel)
    refused = None
  except ValueError as e:
    refused = str(e)
  if refused is not None:
    assert "softcap" in refused
    return
  capped, plain = _fast(lambda x, k: (_lin_loss(x, k, labels, softcap=float("inf")),
                                      _lin_loss(x, k, labels)))(x, kernel)
  _assert_close(capped, plain, rtol=1e-6, atol=0.0, what="softcap=inf vs no cap")


# ---------------------------------------------------------------------------
# XLA:CPU workarounds apply only when lowering for CPU.


@pytest.mark.all_platforms
@pytest.mark.parametrize("forward_mode", [False, True])
def test_cpu_workarounds_only_on_cpu(forward_mode):
  """The optimization barriers (on the bf16 kernel carried through the chunk
  loops, on the transposed copy of x) are in the CPU lowering only; the
  CUDA and TPU lowerings of the same function have none but the two of
  jax.checkpoint's rematerialization in forward mode (prevent_cse)."""
  from jax import export
  f = jax.jit(jax.value_and_grad(lambda x, k, y: _lin_loss(
      x, k, y, chunk_size=64, forward_mode=forward_mode), (0, 1)))
  args = (jax.ShapeDtypeStruct((16, 8), jnp.bfloat16),
          jax.ShapeDtypeStruct((8, 256), jnp.bfloat16), jax.ShapeDtypeStruct((16,), jnp.int32))
  count = {p: export.export(f, platforms=(p,))(*args).mlir_module().count("optimization_barrier")
           for p in ("cpu", "cuda", "tpu")}
  remat = 2 if forward_mode else 0
  assert count["cuda"] == count["tpu"] == remat, count
  assert count["cpu"] >= remat + 2, count  # the kernel carries and x transposed


# ---------------------------------------------------------------------------
# backward="precompute": the gradients computed in the forward (three
# matmuls), equal to backward="recompute" and to the materialized reference.

PRE_BLOCK = 4  # rows of a precompute block here: N = 6 gives blocks 0-3 and 2-5 (overlap)
PRE_SPECS = {
    "plain": _spec(chunk=None),
    "weight-ignore_valid_class": _spec(chunk=None, weight=True, ignore_index=3, ignored="some"),
    "smoothing-weight-sum": _spec(chunk=None, eps=0.1, weight=True, reduction="sum",
                                  ignored="some"),
    "no_bias-z_loss": _spec(chunk=None, bias=False, z=1e-2, ignored="some"),
    "softcap-no_ignore_index": _spec(chunk=None, softcap=1.5, scale=3.0, ignore_index=None),
    "all-mean": _spec(**ALL_OPTS, chunk=None),
    "all-sum-batch": _spec(**ALL_OPTS, chunk=None, reduction="sum", lead=(2, 3)),
    "smoothing1-weight-sum": _spec(chunk=None, eps=1.0, weight=True, reduction="sum"),
    "extreme-smoothing-weight": _spec(chunk=None, scale=400.0, eps=0.1, weight=True),
    "inf_bias-smoothing-weight": _spec(chunk=None, inf_bias=True, eps=0.1, weight=True),
    "inf_bias-softcap-z_loss": _spec(chunk=None, inf_bias=True, softcap=2.0, z=1e-2),
    "all_ignored-mean": _spec(chunk=None, ignored="all", weight=True, eps=0.1, z=1e-2),
}
PRE_NAMES = list(PRE_SPECS)


@functools.cache
def _precompute_results(group):
  """{case: (precompute, recompute, reference)}, each (loss, grads), for one
  group of GROUP cases of PRE_SPECS, in one program with PRE_BLOCK-row
  blocks."""
  names = PRE_NAMES[group * GROUP:(group + 1) * GROUP]
  inputs = [_inputs(PRE_SPECS[n], 100 + PRE_NAMES.index(n)) for n in names]

  def run(all_inputs):
    out = []
    for name, (params, labels, cot) in zip(names, all_inputs, strict=True):
      kw = _kwargs(PRE_SPECS[name])
      out.append(tuple(_value_and_grads(fn, params, labels, cot, {**kw, **extra})
                       for fn, extra in ((_lin_loss, dict(backward="precompute")),
                                         (_lin_loss, dict(backward="recompute", chunk_size=7)),
                                         (_ref_loss, {}))))
    return out

  saved = _linear_precompute.ROW_BLOCK_ELEMENTS
  _linear_precompute.ROW_BLOCK_ELEMENTS = PRE_BLOCK * V
  try:
    results = jax.device_get(_fast(run)(inputs))
  finally:
    _linear_precompute.ROW_BLOCK_ELEMENTS = saved
  return dict(zip(names, results, strict=True)), dict(zip(names, inputs, strict=True))


@pytest.mark.parametrize("name", PRE_NAMES)
def test_precompute_matches_recompute_and_reference(name):
  spec = PRE_SPECS[name]
  results, inputs = _precompute_results(PRE_NAMES.index(name) // GROUP)
  (loss, grads), (re_loss, re_grads), (ref_loss, ref_grads) = results[name]
  params = inputs[name][0]
  assert loss.dtype == np.float32
  assert loss.shape == ()
  assert set(grads) == set(params)
  logit_scale = float(np.max(np.abs(params["x"] @ params["kernel"])))
  if spec["ignored"] == "all":
    assert float(loss) == 0.0
    for k, g in grads.items():
      assert np.all(g == 0.0), k
  tol = dict(rtol=2e-5, atol=1e-6 + 16 * F32_EPS * logit_scale)
  for other_loss, other_grads, what in ((re_loss, re_grads, "recompute"),
                                        (ref_loss, ref_grads, "reference")):
    _assert_close(loss, other_loss, what=f"loss vs {what}", **tol)
    for k in grads:
      assert grads[k].dtype == params[k].dtype, k
      assert grads[k].shape == params[k].shape, k
      scale = float(np.max(np.abs(other_grads[k]), initial=0.0))
      _assert_close(grads[k], other_grads[k], rtol=1e-4,
                    atol=1e-6 + 1e-5 * scale + 16 * F32_EPS * logit_scale * scale,
                    what=f"gradient with respect to {k} vs {what}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_precompute_half_precision(monkeypatch, fresh_caches, dtype):
  """A 16-bit kernel: dkernel accumulates in float32 over the blocks (the
  residual) and comes back in the kernel's dtype; the same as recompute and
  as the float32 reference on the same rounded inputs, within the rounding
  of the logits' cotangent to 16 bits that recompute (and precompute off
  CPU) does before each matmul."""
  spec = _spec(**ALL_OPTS, chunk=None, lead=(2, 3))  # "mean"; 6 rows: blocks 0-3 and 2-5
  params, labels, cot = _inputs(spec, 102)
  kw = _kwargs(spec)
  half = {k: jnp.asarray(v, F32 if k == "weight" else dtype) for k, v in params.items()}
  monkeypatch.setattr(_linear_precompute, "ROW_BLOCK_ELEMENTS", PRE_BLOCK * V)
  out = jax.device_get(_fast(lambda p: tuple(
      _value_and_grads(fn, p, labels, cot, {**kw, **extra})
      for fn, extra in ((_lin_loss, dict(backward="precompute")),
                        (_lin_loss, dict(backward="recompute", chunk_size=7)),
                        (_ref_loss, {}))))(half))
  (loss, grads), *others = out
  assert loss.dtype == np.float32
  assert set(grads) == set(half)
  for other_loss, other_grads in others:
    _assert_close(loss, other_loss, rtol=1e-5, atol=1e-5, what="loss")
    for k, g in grads.items():
      assert g.dtype == other_grads[k].dtype == half[k].dtype, (k, g.dtype)
      scale = float(np.max(np.abs(np.asarray(other_grads[k], np.float32))))
      _assert_close(g, other_grads[k], rtol=3e-2, atol=2e-2 * scale, what=f"d{k}")

  x, kernel, _, weight, res_labels = _res_inputs(jnp.dtype(dtype))
  res = saved_residuals(lambda x, k, w: jaxce.linear_cross_entropy(
      x, k, res_labels, weight=w, label_smoothing=0.1, backward="precompute"),
      x, kernel, weight)
  computed = sorted((dt, s) for dt, s, o in res
                    if not o.startswith(("from a constant", "from a lit")))
  short = {jnp.bfloat16: "bf16", jnp.float16: "f16"}[dtype]
  # dx in x's dtype, dkernel in float32 (the accumulator), dweight float32
  assert computed == sorted([(short, (RES_N, RES_D)), ("f32", (RES_D, RES_V)),
                             ("f32", (RES_V,))]), res


@pytest.mark.all_platforms  # (the real platform_dependent: each platform's branch)
@pytest.mark.parametrize("bf16_dot", [False, True])
def test_auto_precompute_platforms_as_lowered(monkeypatch, bf16_dot):
  """backward="auto" at a shape where it may precompute: the token-block
  loop (`_linear_precompute._run`) is in the program lowered for CPU in
  float32, and in bfloat16 unless the host CPU has bfloat16 dot
  instructions, and for GPU in float32; in none for TPU, nor for GPU in
  bfloat16 (`_linear_precompute.platforms`)."""
  from jax import export
  monkeypatch.setattr(_cpu_features, "cpu_has_bf16_dot", lambda: bf16_dot)
  jax.clear_caches()  # no trace made under the other answer
  labels = jax.ShapeDtypeStruct((64,), jnp.int32)
  for dtype, where in ((F32, {"cpu", "cuda"}),
                       (jnp.bfloat16, set() if bf16_dot else {"cpu"})):
    # (V = 999 shares no factor with the 8 test devices)
    args = (jax.ShapeDtypeStruct((64, 16), dtype), jax.ShapeDtypeStruct((16, 999), dtype),
            labels)
    f = jax.jit(jax.value_and_grad(lambda x, k, y: _lin_loss(x, k, y), (0, 1)))
    for platform in ("cpu", "cuda", "tpu"):
      text = export.export(f, platforms=(platform,))(*args).mlir_module()
      assert ("func.func private @_run(" in text) == (platform in where), (dtype, platform)
  if bf16_dot:
    jax.clear_caches()  # (no trace made under this answer outlives the test)
    return
  # dkernel from a transposed copy of the block's rows on CPU
  # (`cpu_transposed`): no compiled dot contracts both first axes, the form
  # XLA:CPU ran at 1.3-2.2x the time.
  for dtype in (F32, jnp.bfloat16):
    args = (jax.ShapeDtypeStruct((64, 16), dtype), jax.ShapeDtypeStruct((16, 999), dtype),
            labels)
    compiled = f.lower(*args).compile().as_text()
    lhs = re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d)\}", compiled)
    assert lhs == ["1", "1", "1"], (dtype, lhs)


@pytest.mark.all_platforms  # (the real platform_dependent: each platform's branch)
@pytest.mark.parametrize("bf16_dot", [False, True])
def test_matmul_operands_of_16_bit_kernels(monkeypatch, bf16_dot):
  """Both backwards' matmuls of a 16-bit kernel (`_linear_stats.mixed_matmul`):
  float32 operands in a program lowered for CPU, 16-bit ones there on a
  host CPU with bfloat16 dot instructions (for a bf16 kernel) or where the
  recomputing path reads the kernel whole (one chunk, V=999 here), and
  16-bit ones for GPU and TPU."""
  from jax import export
  monkeypatch.setattr(_cpu_features, "cpu_has_bf16_dot", lambda: bf16_dot)
  jax.clear_caches()  # no trace made under the other answer
  labels = jax.ShapeDtypeStruct((64,), jnp.int32)
  dots_of = lambda text: re.findall(
      r"stablehlo\.dot_general .*: \(tensor<\w+x(\w+)>, tensor<\w+x(\w+)>\)", text)
  for dtype, short in ((jnp.bfloat16, "bf16"), (jnp.float16, "f16")):
    # forward logits, then the backward's logits, dx and dkernel (recompute)
    for backward, vocab, count in (("precompute", 999, 3), ("recompute", 39999, 4),
                                   ("recompute", 999, 4)):
      assert (_linear_stats.cpu_chunk_size(64, vocab, 16 * 2) < vocab) == (vocab > 999)
      args = (jax.ShapeDtypeStruct((64, 16), dtype), jax.ShapeDtypeStruct((16, vocab), dtype),
              labels)
      f = jax.jit(jax.value_and_grad(
          lambda x, k, y, b=backward: _lin_loss(x, k, y, backward=b), (0, 1)))
      for platform in ("cpu", "cuda", "tpu"):
        widened = (platform == "cpu" and not (bf16_dot and dtype == jnp.bfloat16)
                   and (backward, vocab) != ("recompute", 999))
        dots = dots_of(export.export(f, platforms=(platform,))(*args).mlir_module())
        assert len(dots) == count, (backward, platform, dots)
        operand = "f32" if widened else short
        assert all(set(d) == {operand} for d in dots), (short, backward, vocab, platform, dots)
  # Nor where float32 copies of x and x.T would exceed WIDEN_BYTES.
  n, d = 8192, 4096
  assert 8 * n * d > _linear_stats.WIDEN_BYTES >= 8 * 64 * 16
  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((d, 39999), jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.int32))
  f = jax.jit(jax.value_and_grad(lambda x, k, y: _lin_loss(x, k, y, backward="recompute"),
                                 (0, 1)))
  dots = dots_of(export.export(f, platforms=("cpu",))(*args).mlir_module())
  assert len(dots) >= 4, dots  # (dx in row blocks)
  assert all(set(d) == {"bf16"} for d in dots), dots
  jax.clear_caches()  # (no trace made under this answer outlives the test)


def test_precompute_block_rows():
  assert _linear_precompute.block_rows(2048, 32768) == 512
  assert _linear_precompute.block_rows(512, 2**20) == 16
  assert _linear_precompute.block_rows(100, 1000) == 100  # one block of all tokens
  assert _linear_precompute.block_rows(0, 1000) == 1
  assert _linear_precompute.block_rows(10, 2**30) == 1
  # Even blocks: not 4 x 333 rows (1332 computed) for 1024 tokens.
  assert _linear_precompute.block_rows(1024, 50257) == 256
  for n in (1, 7, 335, 336, 1000, 2048, 4097, 32768):
    for v in (1000, 32000, 50000, 50257, 131072, 2**20):
      rows = _linear_precompute.block_rows(n, v)
      most = max(1, _linear_precompute.ROW_BLOCK_ELEMENTS // v)
      blocks = -(-n // rows)
      assert rows <= min(n, most), (n, v, rows)
      assert blocks == -(-n // min(n, most)), (n, v, rows)
      assert blocks * rows - n < blocks, (n, v, rows)  # fewer rows twice than blocks


def test_precompute_traced_ignore_index_vmap_and_eval():
  """A traced ignore_index, vmap over a batch of problems, and the value
  without differentiation (the custom_vjp's primal), all equal to recompute."""
  rng = np.random.default_rng(26)
  x = jnp.asarray(rng.normal(size=(3, 5, D)), F32)
  kernel = jnp.asarray(rng.normal(size=(D, V)), F32)
  labels = jnp.asarray([[3, 1, 3, 0, 7], [3, 3, 3, 3, 3], [0, 1, 2, 4, 5]], jnp.int32)

  def run(ii, backward):
    vg = jax.value_and_grad(lambda x, k, y: _lin_loss(
        x, k, y, ignore_index=ii, label_smoothing=0.1, backward=backward), (0, 1))
    return (jax.vmap(vg, (0, None, 0))(x, kernel, labels),
            jax.vmap(lambda x, y: _lin_loss(x, kernel, y, ignore_index=ii, reduction="sum",
                                            backward=backward))(x, labels))

  got, want = _fast(lambda ii: (run(ii, "precompute"), run(ii, "recompute")))(
      jnp.asarray(3, jnp.int32))
  assert float(got[0][0][1]) == 0.0  # every label ignored
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    _assert_close(a, b, rtol=1e-5, atol=1e-6, what="precompute vs recompute")


def test_precompute_empty_batch_and_vocabulary():
  kernel = jnp.asarray(np.random.default_rng(27).normal(size=(D, V)), F32)
  vg = jax.value_and_grad(lambda x, k, y: _lin_loss(x, k, y, backward="precompute"), (0, 1))
  loss, (dx, dkernel) = vg(jnp.zeros((0, D), F32), kernel, jnp.zeros((0,), jnp.int32))
  assert float(loss) == 0.0
  assert dx.shape == (0, D)
  assert np.all(np.asarray(dkernel) == 0.0)
  # V = 0: every label out of range (NaN) or ignored (0.0), as on every path
  x, empty = jnp.ones((4, D), F32), jnp.ones((D, 0), F32)
  labels = jnp.asarray([0, -100, 2, -100], jnp.int32)
  assert np.isnan(float(_lin_loss(x, empty, labels, backward="precompute")))
  loss, dx = jax.value_and_grad(lambda x: _lin_loss(
      x, empty, jnp.full_like(labels, -100), backward="precompute"))(x)
  assert float(loss) == 0.0
  assert np.all(np.asarray(dx) == 0.0)


def test_precompute_saved_residuals_are_the_gradients():
  """What the backward keeps is dx, dkernel, dbias and dweight (computed in
  the forward), nothing of size N x V, none of the inputs."""
  x, kernel, bias, weight, labels = _res_inputs(F32)

  def loss(x, kernel, bias, weight):
    return jaxce.linear_cross_entropy(x, kernel, labels, bias=bias, weight=weight,
                                      label_smoothing=0.1, backward="precompute")

  res = saved_residuals(loss, x, kernel, bias, weight)
  computed = sorted(s for _, s, o in res if not o.startswith(("from a constant", "from a lit")))
  assert computed == sorted([(RES_N, RES_D), (RES_D, RES_V), (RES_V,), (RES_V,)]), res
  assert all(dt == "f32" for dt, _, _ in res), res
  assert not any(o.startswith("from the argument") for _, _, o in res), res


def test_auto_backward_rule():
  rule = _linear_precompute.auto_backward
  base = dict(reduction="mean", forward_mode=False, chunk_size=None, class_sharded=False,
              groups=1)
  limit = _linear_precompute.ROW_BLOCK_ELEMENTS // _linear_precompute.MIN_ROWS
  assert limit == 52428
  for vocab in (1, 1000, 32000, 32768, 50257, limit):
    for dtype in (F32, jnp.float64, jnp.bfloat16, jnp.float16):  # D * V <= 2**24 here
      assert rule((128, vocab), dtype, 2048, **base) == "precompute", (vocab, dtype)
    assert rule((128, vocab), F32, 2048, **{**base, "reduction": "sum"}) == "precompute"
  for vocab in (limit + 1, 65536, 131072, 2**20):
    assert rule((128, vocab), F32, 2048, **base) == "recompute", vocab
  for change in (dict(reduction="none"), dict(forward_mode=True), dict(chunk_size=1024),
                 dict(class_sharded=True), dict(groups=2), dict(bias=True)):
    for dtype in (F32, jnp.bfloat16):
      assert rule((128, 32000), dtype, 2048, **{**base, **change}) == "recompute", change
  assert rule((128, 0), F32, 2048, **base) == "recompute"
  # 16-bit kernels: the float32 dkernel accumulator at most one logits block,
  # or N >= 4 D (the accumulator and a float32 kernel at most the logits)
  assert rule((512, 32768), jnp.bfloat16, 2047, **base) == "precompute"  # D * V = 2**24
  for d, vocab in ((513, 32768), (4096, 4097), (4096, 32768)):
    for n, expected in ((4 * d - 1, "recompute"), (4 * d, "precompute")):
      assert rule((d, vocab), jnp.bfloat16, n, **base) == expected, (d, vocab, n)
      assert rule((d, vocab), jnp.float16, n, **base) == expected, (d, vocab, n)
      assert rule((d, vocab), F32, n, **base) == "precompute", (d, vocab, n)
  from jax import export
  b, = export.symbolic_shape("b")
  assert rule((128, 32000), F32, b, **base) == "recompute"  # symbolic N
  assert rule((b, 32000), jnp.bfloat16, 2048, **base) == "recompute"  # symbolic D
  assert rule((b, 32000), F32, 2048, **base) == "precompute"


def test_auto_backward_platforms(monkeypatch):
  where = _linear_precompute.platforms
  for bf16_dot in (False, True):
    monkeypatch.setattr(_cpu_features, "cpu_has_bf16_dot", lambda b=bf16_dot: b)
    assert where(F32) == where(jnp.float64) == ("cpu", "cuda", "rocm")
    assert where(jnp.float16) == ("cpu",)
    # A CPU with bfloat16 dot instructions recomputes bfloat16 kernels too.
    assert where(jnp.bfloat16) == (() if bf16_dot else ("cpu",))


def test_bf16_dot_in_cpuinfo():
  found = _cpu_features.bf16_dot_in_cpuinfo
  zen4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
  spr = "flags\t: avx512f amx_bf16 amx_tile\n"
  zen3 = "processor\t: 0\nflags\t\t: fpu avx2 fma\nbugs\t\t: avx512_bf16\n"
  arm = "processor\t: 0\nFeatures\t: fp asimd bf16\n"
  assert found(zen4)
  assert found(spr)
  for text in (zen3, arm, ""):  # (Zen 3's "bugs" line is not its flags)
    assert not found(text), text
  assert isinstance(_cpu_features.cpu_has_bf16_dot(), bool)


@pytest.mark.parametrize(("case", "expected"), [
    (dict(), "precompute"),  # V = 37 shares no factor with the 8 test devices
    (dict(reduction="sum"), "precompute"),
    (dict(reduction="none"), "recompute"),
    (dict(dtype=jnp.bfloat16), "precompute"),  # on CPU (platforms: CPU only)
    (dict(dtype=jnp.bfloat16, bf16_dot=True), "recompute"),  # a CPU with bf16 dots
    (dict(dtype=jnp.float16, bf16_dot=True), "precompute"),
    (dict(chunk_size=7), "recompute"),
    (dict(forward_mode=True), "recompute"),
    (dict(vocab=40), "recompute"),  # gcd(40, 8) = 8: a kernel XLA may have split
    (dict(vocab=52429), "recompute"),  # a block would hold fewer than MIN_ROWS rows
    (dict(bias=True), "recompute"),
    (dict(backward="recompute"), "recompute"),
    (dict(backward="precompute", vocab=40), "precompute"),
])
def test_auto_backward_is_what_runs(monkeypatch, case, expected):
  case = dict(case)
  dtype, vocab = case.pop("dtype", F32), case.pop("vocab", V)
  bf16_dot = case.pop("bf16_dot", False)
  monkeypatch.setattr(_cpu_features, "cpu_has_bf16_dot", lambda: bf16_dot)
  if case.pop("bias", False):
    case["bias"] = jnp.zeros((vocab,), dtype)
  calls = []
  real = _linear_precompute.precomputed_loss
  monkeypatch.setattr(_linear_precompute, "precomputed_loss",
                      lambda *a: calls.append(1) or real(*a))
  jax.clear_caches()  # so that the public function traces again, with the spy
  x = jax.ShapeDtypeStruct((6, D), dtype)
  kernel = jax.ShapeDtypeStruct((D, vocab), dtype)
  labels = jax.ShapeDtypeStruct((6,), jnp.int32)
  jax.eval_shape(lambda x, k, y: _lin_loss(x, k, y, **case), x, kernel, labels)
  if bf16_dot:
    jax.clear_caches()  # (no trace made under this answer outlives the test)
  assert ("precompute" if calls else "recompute") == expected


def test_precompute_refuses_symbolic_batch_and_explicit_mesh():
  from jax import export
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P
  b, = export.symbolic_shape("b")
  f = jax.jit(lambda x, k, y: _lin_loss(x, k, y, backward="precompute"))
  with pytest.raises(ValueError, match=r"linear_cross_entropy: `backward`.*concrete number"):
    export.export(f)(jax.ShapeDtypeStruct((b, D), F32), jax.ShapeDtypeStruct((D, V), F32),
                     jax.ShapeDtypeStruct((b,), jnp.int32))
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Explicit,))
  kernel = jax.device_put(jnp.zeros((D, 40), F32), NamedSharding(mesh, P(None, "model")))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"`backward`.*Explicit mesh"):
    f(jnp.zeros((8, D), F32), kernel, jnp.zeros((8,), jnp.int32))


def test_precompute_on_auto_mesh_with_vocab_split_kernel():
  """On an Auto mesh with the kernel split over its vocabulary axis, XLA's
  partitioner runs the precompute path: the same values and gradients."""
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P
  rng = np.random.default_rng(28)
  x = jnp.asarray(rng.normal(size=(8, D)), F32)
  kernel = jnp.asarray(rng.normal(size=(D, 40)), F32)
  labels = jnp.asarray(rng.integers(0, 40, size=(8,)), jnp.int32).at[3].set(-100)
  vg = lambda b: jax.jit(jax.value_and_grad(
      lambda x, k: _lin_loss(x, k, labels, label_smoothing=0.1, backward=b), (0, 1)))
  want = vg("recompute")(x, kernel)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    got = vg("precompute")(jax.device_put(x, NamedSharding(mesh, P("data", None))),
                           jax.device_put(kernel, NamedSharding(mesh, P(None, "model"))))
  for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    _assert_close(a, w, rtol=1e-5, atol=1e-6, what="Auto mesh precompute vs recompute")


def test_precompute_second_order():
  """jax.hessian (forward over reverse) and grad of grad (reverse over
  reverse) through the precomputed gradients equal the materialized ones."""
  rng = np.random.default_rng(29)
  x = jnp.asarray(rng.normal(size=(6, D)), F32)
  kernel = jnp.asarray(rng.normal(size=(D, 7)), F32)
  labels = jnp.asarray([1, 2, 3, 0, 6, -100], jnp.int32)
  kw = dict(label_smoothing=0.1, z_loss=1e-2)
  lin = lambda x, k: _lin_loss(x, k, labels, backward="precompute", **kw)
  ref = lambda x, k: _ref_loss(x, k, labels, **kw)
  v = jnp.asarray(rng.normal(size=(D, 7)), F32)

  def both(f):
    hess = jax.hessian(f, 1)(x, kernel)
    gg = jax.grad(lambda x, k: jnp.vdot(jax.grad(f, 1)(x, k), v), (0, 1))(x, kernel)
    return hess, gg

  got, want = _fast(lambda: (both(lin), both(ref)))()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    _assert_close(a, b, rtol=1e-4, atol=1e-5, what="second order")


@pytest.mark.slow  # check_grads runs op by op: `pytest -m slow` (.ci/run) runs it
@pytest.mark.parametrize("backward", ["forward_mode", "default"])
def test_check_grads_itself(backward):
  """jax.test_util.check_grads, order 2, in float64 with label smoothing,
  z-loss, softcap, a bias, a class weight and an ignored label, over three
  vocabulary chunks: forward and reverse modes with forward_mode=True,
  reverse mode (the default's custom_vjp refuses jvp) otherwise."""
  from jax.test_util import check_grads

  with jax.enable_x64(True):
    rng = np.random.default_rng(41)
    x = jnp.asarray(rng.normal(size=(5, 4)))
    kernel = jnp.asarray(rng.normal(size=(4, 9)) * 0.7)
    bias = jnp.asarray(rng.normal(size=(9,)) * 0.3)
    weight = jnp.asarray(rng.uniform(0.5, 2.0, size=9))
    labels = jnp.asarray([0, 8, -100, 3, 4], jnp.int32)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=2.5, chunk_size=3,
              forward_mode=backward == "forward_mode")

    def f(x, kernel, bias, weight):
      return _lin_loss(x, kernel, labels, bias=bias, weight=weight, **kw)

    modes = ("fwd", "rev") if backward == "forward_mode" else ("rev",)
    check_grads(f, (x, kernel, bias, weight), order=2, modes=modes, atol=1e-6, rtol=1e-6)
