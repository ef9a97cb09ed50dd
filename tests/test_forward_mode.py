"""Forward-mode autodiff of every custom_jvp loss: jvp against a float64
plain-JAX reference and finite differences, under jit and vmap; jacfwd,
linearize, grad of jvp and hessians; inside shard_map with class_axis_name
and on an Explicit mesh; and optax's gradient checks on the drop-ins.
(Eager calls' recompilation: tests/test_eager.py.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jaxce

F64 = jnp.float64
N, C = 6, 5
LABELS = np.array([0, 3, -100, 4, 1, 2], np.int32)
WHERE = np.ones((N, C), bool)
WHERE[0, 1] = WHERE[0, 3] = WHERE[4, 0] = False


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _rng(seed):
  return np.random.default_rng(seed)


def _inputs():
  x = jnp.asarray(_rng(0).normal(size=(N, C)) * 2, F64)
  t = _rng(1).uniform(0.05, 1.0, size=(N, C))
  t = jnp.asarray(t / t.sum(-1, keepdims=True), F64)
  w = jnp.asarray(_rng(2).uniform(0.5, 2.0, size=C), F64)
  return x, t, w


# Plain-JAX references (float64), the docstrings' formulas.


def _ref_int(x, w=None, eps=0.0, z=0.0, where=None, reduction="mean"):
  y = jnp.asarray(LABELS)
  w = jnp.ones(C, x.dtype) if w is None else w
  act = jnp.ones(x.shape, bool) if where is None else jnp.asarray(where)
  xm = jnp.where(act, x, -jnp.inf)
  lse = jax.nn.logsumexp(xm, axis=-1)
  nlp = jnp.where(act, lse[:, None] - jnp.where(act, x, 0.0), 0.0)
  valid = y != -100
  yc = jnp.clip(y, 0, C - 1)
  w_y = jnp.where(valid, w[yc], 0.0)
  main = w_y * jnp.take_along_axis(nlp, yc[:, None], -1)[:, 0]
  smooth = jnp.where(valid, jnp.sum(w[None, :] * nlp, -1) / jnp.sum(act, -1, dtype=x.dtype), 0.0)
  loss = (1 - eps) * main + eps * smooth + z * jnp.where(valid, lse, 0.0) ** 2
  return loss if reduction == "none" else jnp.sum(loss) / jnp.sum(w_y)


def _ref_probs(x, t, w=None, eps=0.0, z=0.0):
  w = jnp.ones(C, x.dtype) if w is None else w
  q = (1 - eps) * t + eps / C
  lse = jax.nn.logsumexp(x, axis=-1)
  return jnp.mean(jnp.sum(w[None, :] * q * (lse[:, None] - x), -1) + z * lse**2)


def _ref_bce(x, t, pw):
  return jnp.mean(-(pw[None, :] * t * jax.nn.log_sigmoid(x) + (1 - t) * jax.nn.log_sigmoid(-x)))


# (jaxce function, reference), both of the same float64 arguments.
def _families():
  x, t, w = _inputs()
  y = jnp.asarray(LABELS)
  pw = jnp.asarray([0.5, 1.0, 2.0, 3.0, 1.5], F64)
  return {
      "ce_int": ((x,), lambda x: jaxce.cross_entropy(x, y), _ref_int),
      "ce_int_all": (
          (x, w),
          lambda x, w: jaxce.cross_entropy(
              x, y, weight=w, label_smoothing=0.2, z_loss=0.05, where=WHERE),
          lambda x, w: _ref_int(x, w, 0.2, 0.05, WHERE)),
      "ce_int_none": (
          (x,), lambda x: jaxce.cross_entropy(x, y, reduction="none", label_smoothing=0.1),
          lambda x: _ref_int(x, eps=0.1, reduction="none")),
      "ce_probs": (
          (x, t, w),
          lambda x, t, w: jaxce.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=0.02),
          lambda x, t, w: _ref_probs(x, t, w, 0.1, 0.02)),
      "nll_log_softmax": (
          (x, w), lambda x, w: jaxce.nll_loss(jaxce.log_softmax(x), y, weight=w),
          lambda x, w: _ref_int(x, w)),
      "log_softmax": ((x,), lambda x: jnp.cos(jaxce.log_softmax(x)),
                      lambda x: jnp.cos(jax.nn.log_softmax(x))),
      "log_softmax_axes": ((x,), lambda x: jaxce.log_softmax(x, axis=(0, 1)),
                           lambda x: jax.nn.log_softmax(x, axis=(0, 1))),
      "logsumexp": ((x,), lambda x: jnp.sin(jaxce.logsumexp(x, axis=0)),
                    lambda x: jnp.sin(jax.nn.logsumexp(x, axis=0))),
      "bce": ((x, t, pw),
              lambda x, t, pw: jaxce.binary_cross_entropy_with_logits(x, t, pos_weight=pw),
              _ref_bce),
  }


FAMILIES = ["ce_int", "ce_int_all", "ce_int_none", "ce_probs", "nll_log_softmax", "log_softmax",
            "log_softmax_axes", "logsumexp", "bce"]


def _tangents(args, seed=5):
  rng = _rng(seed)
  return tuple(jnp.asarray(rng.normal(size=a.shape), F64) for a in args)


def _close(a, b, rtol=1e-9, atol=1e-12):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", FAMILIES)
def test_jvp_matches_reference_jit_and_vmap(name):
  args, f, ref = _families()[name]
  tangents = _tangents(args)

  @jax.jit
  def both(args, tangents):
    return jax.jvp(f, args, tangents), jax.jvp(ref, args, tangents)

  got, want = both(args, tangents)
  _close(got, want)
  # vmap over a batch of 3 tangent directions.
  batch = tuple(jnp.stack([t, 2 * t, -t]) for t in tangents)
  jvp_of = lambda fn: jax.jit(jax.vmap(lambda *ts: jax.jvp(fn, args, ts)[1]))
  _close(jvp_of(f)(*batch), jvp_of(ref)(*batch))


@pytest.mark.parametrize("name", FAMILIES)
def test_jvp_matches_finite_differences(name):
  args, f, _ = _families()[name]
  tangents = _tangents(args, seed=6)
  f = jax.jit(f)
  _, tangent = jax.jit(lambda a, t: jax.jvp(f, a, t))(args, tangents)
  h = 1e-6
  shifted = lambda s: f(*(a + s * t for a, t in zip(args, tangents, strict=True)))
  fd = (shifted(h) - shifted(-h)) / (2 * h)
  np.testing.assert_allclose(tangent, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["ce_int_all", "ce_probs", "log_softmax", "bce"])
def test_jacfwd_linearize_grad_of_jvp_hessian(name):
  args, f, ref = _families()[name]
  tangents = _tangents(args)

  def derivatives(fn):
    jf = jax.jacfwd(fn, argnums=0)(*args)
    out, lin = jax.linearize(fn, *args)
    lin_t = lin(*tangents)
    # Reverse over forward: gradient of a directional derivative.
    gjvp = jax.grad(lambda *a: jnp.sum(jax.jvp(fn, a, tangents)[1]), argnums=0)(*args)
    return jf, out, lin_t, gjvp

  _close(jax.jit(lambda: derivatives(f))(), jax.jit(lambda: derivatives(ref))())
  scalar = (lambda fn: lambda *a: jnp.sum(fn(*a)))
  hess = lambda fn: jax.jit(jax.hessian(scalar(fn)))(*args)  # forward over reverse
  _close(hess(f), hess(ref))


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_linear_zero_tokens_under_vmap_every_mode(softcap):
  # jvp and grad of vmap over batches of zero tokens: zero tangents and
  # gradients (with softcap the chunk loop's tangent came back batched twice)
  kernel = jnp.ones((8, 64), jnp.float32)
  f = lambda x: jaxce.linear_cross_entropy(
      x, kernel, jnp.zeros((0,), jnp.int32), softcap=softcap, forward_mode=True)
  x = jnp.ones((2, 0, 8), jnp.float32)
  value, tangent = jax.jvp(jax.vmap(f), (x,), (x,))
  np.testing.assert_array_equal(value, [0.0, 0.0])
  np.testing.assert_array_equal(tangent, [0.0, 0.0])
  assert jax.grad(lambda x: jax.vmap(f)(x).sum())(x).shape == x.shape


def test_forward_over_forward_and_third_order():
  args, f, ref = _families()["ce_int_all"]
  t = _tangents(args)
  d2 = lambda fn: jax.jit(lambda a: jax.jvp(lambda *b: jax.jvp(fn, b, t)[1], a, t)[1])(args)
  _close(d2(f), d2(ref))
  d3 = lambda fn: jax.jit(jax.grad(lambda x: jax.jvp(
      lambda x: jax.jvp(lambda x: fn(x, args[1]), (x,), (t[0],))[1], (x,), (t[0],))[1]))(args[0])
  _close(d3(f), d3(ref), rtol=1e-8)


@pytest.mark.parametrize("targets", ["int", "probs"])
def test_second_order_with_smoothing_keeps_no_logits_per_pass(targets):
  """jvp of grad and grad of a grad-vector product with label smoothing and
  class weights: compiled temp memory within 3x the float32 logits (optax:
  1-2x). The rules take the statistics through their own kernel, so that
  the second derivative takes the rule again; through the plain passes
  (the smoothing sums' branches) it kept an N x C array per pass: 14x the
  logits for jvp of grad, here and at 1024 x 4096."""
  n, c = 256, 1024
  x = jax.ShapeDtypeStruct((n, c), jnp.float32)
  w = jnp.linspace(0.5, 2.0, c)
  y = jnp.arange(n) % c
  if targets == "probs":
    y = jax.nn.one_hot(y, c) * 0.9 + 0.1 / c

  def f(q):
    return jaxce.cross_entropy(q, y, weight=w, label_smoothing=0.1)

  hvp = lambda q: jax.jvp(jax.grad(f), (q,), (q,))
  gvp = lambda q: jax.grad(lambda r: jnp.vdot(jax.grad(f)(r), q))(q)
  for g in (hvp, gvp):
    temp = jax.jit(g).lower(x).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 3 * n * c * 4, temp / (n * c * 4)


@pytest.mark.parametrize(  # float64 (the same rules at 2000): `pytest -m slow`
    "dtype", [jnp.float32, pytest.param(F64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", [  # (jvp of jvp: `pytest -m slow`)
    "grad_of_grad", "jvp_of_grad", pytest.param("jvp_of_jvp", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", ["label_far_below_max", "ignored_row_large", "smoothing"])
def test_second_order_where_the_label_shift_overflows(case, mode, dtype):
  # On CPU the shift is the label's logit; where exp(x - shift) overflows
  # the batch is redone at the max under a lax.cond, and second derivatives
  # sent the rejected branch's zero cotangent through that inf: NaN.
  far = 200.0 if dtype == jnp.float32 else 2000.0
  x, y, kw = {
      "label_far_below_max": ([[0.0, far], [0.3, 1.0], [1.0, -0.5]], [0, 1, 0], {}),
      "ignored_row_large": ([[0.3, 1.0], [far / 2, far / 2 + 0.7], [0.2, -1.0]], [1, -100, 0], {}),
      "smoothing": ([[0.0, far, 3.0], [0.5, 0.1, -0.2]], [0, 2], {"label_smoothing": 0.1}),
  }[case]
  x, y = jnp.asarray(x, dtype), jnp.asarray(y, jnp.int32)
  eps = kw.get("label_smoothing", 0.0)

  def ref(x):
    valid = y != -100
    logp = jax.nn.log_softmax(x, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, y, 0)[:, None], -1)[:, 0]
    loss = (1 - eps) * nll - eps * jnp.mean(logp, -1)
    return jnp.sum(jnp.where(valid, loss, 0.0)) / jnp.sum(valid, dtype=x.dtype)

  v = jnp.asarray(_rng(7).normal(size=x.shape), dtype)
  second = {
      "grad_of_grad": lambda f, x, v: jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), v))(x),
      "jvp_of_grad": lambda f, x, v: jax.jvp(jax.grad(f), (x,), (v,))[1],
      "jvp_of_jvp": lambda f, x, v: jax.jvp(lambda x: jax.jvp(f, (x,), (v,))[1], (x,), (v,))[1],
  }[mode]
  loss = lambda x: jaxce.cross_entropy(x, y, **kw)
  got = second(loss, x, v)
  want = second(ref, x.astype(F64), v.astype(F64))
  assert got.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(got))), got
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want), rtol=1e-5, atol=1e-7)
  jitted = jax.jit(lambda x: second(loss, x, v))(x)
  np.testing.assert_allclose(np.asarray(jitted, np.float64), np.asarray(want), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name",
                         ["ce_int_all", "ce_probs", "nll_log_softmax", "log_softmax", "bce"])
def test_remat_pmap_export_and_linear_transpose(name):
  """The transforms users wrap training steps in: jax.checkpoint (two
  policies), jax.pmap, jax.export, and jax.linear_transpose of the
  linearization (reverse mode built from forward mode by hand), each giving
  the plain-JAX reference's gradient."""
  args, f, ref = _families()[name]
  scalar = lambda *a: jnp.sum(f(*a))
  want = jax.grad(lambda *a: jnp.sum(ref(*a)))(*args)
  grad = jax.grad(scalar)
  for policy in (jax.checkpoint_policies.dots_saveable,
                 jax.checkpoint_policies.nothing_saveable):
    _close(jax.jit(jax.grad(jax.checkpoint(scalar, policy=policy)))(*args), want)
  _close(jax.pmap(grad)(*(a[None] for a in args))[0], want)
  _close(jax.export.export(jax.jit(grad))(*args).call(*args), want)
  out, lin = jax.linearize(lambda *a: scalar(*a, *args[1:]), args[0])
  (transposed,) = jax.linear_transpose(lin, args[0])(jnp.ones_like(out))
  _close(transposed, want)


# ---------------------------------------------------------------------------
# Meshes: shard_map with class_axis_name, and an Explicit mesh.


@functools.cache
def _mesh(kind):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(getattr(AxisType, kind),) * 2)


def _sharded_case():
  rng = _rng(7)
  x = jnp.asarray(rng.normal(size=(8, 16)) * 2, F64)
  y = jnp.asarray(rng.integers(0, 16, size=8), jnp.int32).at[3].set(-100)
  t = jnp.asarray(rng.dirichlet(np.ones(16), size=8), F64)
  w = jnp.asarray(rng.uniform(0.5, 2.0, size=16), F64)
  return x, y, t, w


@pytest.mark.parametrize("targets", ["int", pytest.param("probs", marks=pytest.mark.slow)])
def test_forward_mode_in_shard_map(targets):
  x, y, t, w = _sharded_case()
  lab, lab_spec = (y, P("data")) if targets == "int" else (t, P("data", "model"))
  kw = {"label_smoothing": 0.1, "z_loss": 0.01}

  def local(x, lab, w):
    return jaxce.cross_entropy(x, lab, weight=w, class_axis_name="model", reduction="none",
                               **kw)

  sharded = jax.shard_map(local, mesh=_mesh("Auto"),
                          in_specs=(P("data", "model"), lab_spec, P("model")),
                          out_specs=P("data"))
  plain = lambda x, lab, w: jaxce.cross_entropy(x, lab, weight=w, reduction="none", **kw)
  tx, tw = _tangents((x, w), seed=8)
  jvp = lambda fn: jax.jit(lambda x, w: jax.jvp(lambda x, w: fn(x, lab, w), (x, w), (tx, tw)))
  _close(jvp(sharded)(x, w), jvp(plain)(x, w), rtol=1e-10, atol=1e-12)
  jac = lambda fn: jax.jit(jax.jacfwd(lambda x, w: fn(x, lab, w), argnums=(0, 1)))
  _close(jac(sharded)(x, w), jac(plain)(x, w), rtol=1e-10, atol=1e-12)
  # Reverse over forward through the collectives.
  g = lambda fn: jax.jit(jax.grad(lambda x: jnp.sum(jax.jvp(
      lambda x: fn(x, lab, w), (x,), (tx,))[1] ** 2)))(x)
  _close(g(sharded), g(plain), rtol=1e-10, atol=1e-12)


def test_forward_mode_explicit_mesh():
  x, y, _, w = _sharded_case()
  mesh = _mesh("Explicit")
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    f = lambda x: jaxce.cross_entropy(x, ys, weight=w, label_smoothing=0.1)
    tx = _tangents((x,), seed=9)[0]
    got = jax.jit(lambda x: jax.jvp(f, (x,), (tx,)))(xs)
    # JAX refuses optax's Hessian here (its gather on class-split logits).
    hessian = jax.jit(jax.hessian(f))(xs)
  plain = lambda x: jaxce.cross_entropy(x, y, weight=w, label_smoothing=0.1)
  _close(got, jax.jvp(plain, (x,), (tx,)), rtol=1e-10, atol=1e-12)
  _close(hessian, jax.hessian(plain)(x), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# optax's own gradient checks (check_grads in both modes) on the drop-ins.


@pytest.mark.slow  # eager check_grads to order 2 in both modes: `pytest -m slow` (.ci/run) runs it
def test_optax_dropins_check_grads_both_modes():
  rng = _rng(10)
  logits = jnp.asarray(rng.normal(size=(3, 4)), F64)
  probs = jnp.asarray(rng.dirichlet(np.ones(4), size=3), F64)
  ints = jnp.asarray([0, 3, 1], jnp.int32)
  cases = [
      (jaxce.softmax_cross_entropy, optax.softmax_cross_entropy, (logits, probs)),
      (lambda x: jaxce.softmax_cross_entropy_with_integer_labels(x, ints),
       lambda x: optax.softmax_cross_entropy_with_integer_labels(x, ints), (logits,)),
      (jaxce.sigmoid_binary_cross_entropy, optax.sigmoid_binary_cross_entropy,
       (logits, jnp.asarray(rng.uniform(size=(3, 4)), F64))),
  ]
  for ours, theirs, args in cases:
    check_grads(ours, args, order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)
    t = _tangents(args, seed=11)
    _close(jax.jvp(ours, args, t), jax.jvp(theirs, args, t))



# Positions with an infinite loss (a label on a -inf logit or outside
# `where`) beside finite ones: the mean is +inf and reverse mode's gradient
# is finite. Forward mode must agree with it (jvp = <grad, t>); the mean's
# weights-sum took a zero tangent through the stacked reduction, and inf * 0
# made every such jvp NaN.
INFINITE_LOSS = {
    "ce_minus_inf_label": lambda x, w: jaxce.cross_entropy(
        x.at[1, 3].set(-jnp.inf), jnp.asarray(LABELS)),
    "ce_outside_where": lambda x, w: jaxce.cross_entropy(
        x, jnp.asarray(LABELS), where=jnp.asarray(WHERE).at[3, 4].set(False), weight=w),
    "ce_all_options": lambda x, w: jaxce.cross_entropy(
        x.at[1, 3].set(-jnp.inf), jnp.asarray(LABELS), weight=w, label_smoothing=0.1,
        z_loss=1e-3),
    "nll": lambda x, w: jaxce.nll_loss(
        x.at[1, 3].set(-jnp.inf), jnp.asarray(LABELS), weight=w),
    "linear": lambda x, w: jaxce.linear_cross_entropy(
        x, jnp.eye(C, dtype=x.dtype), jnp.asarray(LABELS), weight=w,
        bias=jnp.zeros(C, x.dtype).at[3].set(-jnp.inf), forward_mode=True),
}


@pytest.mark.parametrize("name", INFINITE_LOSS)
def test_jvp_matches_grad_beside_infinite_losses(name):
  x, _, w = _inputs()
  f = functools.partial(INFINITE_LOSS[name], w=w)
  t = jnp.asarray(_rng(7).normal(size=x.shape), F64)
  value, tangent = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, t)
  assert value == np.inf
  grad = jax.jit(jax.grad(f))(x)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(tangent, jnp.vdot(grad, t), rtol=1e-12)
  # Forward over forward: the first-order tangent again, as the outer
  # tangent of the value (it was NaN there too).
  (_, tangent2), (again, _) = jax.jvp(lambda x: jax.jvp(f, (x,), (t,)), (x,), (t,))
  np.testing.assert_allclose(tangent2, tangent, rtol=1e-12)
  np.testing.assert_allclose(again, tangent, rtol=1e-12)
  # The class weights' own tangent still counts: d/dw of the mean on the
  # finite positions, against the plain ratio sum(w_y l) / sum(w_y).
  y = jnp.asarray(LABELS)
  keep = (y >= 0) & (y != 1) & (y != 4)  # no infinite loss at these positions
  loss = lambda w: jaxce.cross_entropy(x, jnp.where(keep, y, -100), weight=w)
  ref = lambda w: (jnp.sum(jnp.where(keep, w[jnp.clip(y, 0)] * jaxce.cross_entropy(
      x, jnp.clip(y, 0), reduction="none"), 0.0)) / jnp.sum(jnp.where(keep, w[jnp.clip(y, 0)], 0)))
  tw = jnp.asarray(_rng(8).normal(size=w.shape), F64)
  np.testing.assert_allclose(jax.jvp(loss, (w,), (tw,))[1], jax.jvp(ref, (w,), (tw,))[1],
                             rtol=1e-12)


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}])
def test_forward_over_forward_targets_beside_neg_inf_logits(opts):
  """Probability targets differentiated beside -inf logits (zero target
  mass there): the value's tangent at the second order (forward over
  forward) is the first-order tangent, which gives the targets on a -inf
  logit no derivative (the rule's primal gave them one)."""
  x, t, w = _inputs()
  x = x.at[1, 3].set(-jnp.inf).at[4, 0].set(-jnp.inf)
  t = jnp.where(jnp.isfinite(x), t, 0.0)
  f = lambda x, t: jaxce.cross_entropy(x, t, weight=w, **opts)
  tx, tt = _rng(11).normal(size=x.shape), _rng(12).normal(size=x.shape)
  ux, ut = _rng(13).normal(size=x.shape), _rng(14).normal(size=x.shape)
  inner = lambda x, t: jax.jvp(f, (x, t), (tx, tt))
  (_, _), (again, _) = jax.jvp(inner, (x, t), (ux, ut))
  _, first = jax.jvp(f, (x, t), (ux, ut))
  np.testing.assert_allclose(again, first, rtol=1e-12)


# Second order inside lax.scan: JAX's scan linearization re-traces the primal
# body to hoist loop-invariant residuals (`_scan_known_hoisting`, jax 0.10.2)
# and that re-trace inlines every custom_jvp's primal function, so the next
# derivative differentiates the primal code, not the rule. Where that code is
# differentiable the values are the unrolled loop's; where it holds a
# custom_vmap or a while_loop JAX raises. Never a silently wrong number (a
# primal behind stop_gradient would give one): pinned here, per loss.
def _scan_cases():
  """name -> (loss of one step's logits and index, which mode fails or None),
  built under the x64 fixture."""
  t = jax.nn.softmax(jnp.asarray(_rng(7).normal(size=(2, 3, 5))))
  labels = jnp.asarray([[0, 3, 1], [2, -100, 4]])
  kernel = jnp.asarray(_rng(8).normal(size=(5, 6)))
  return {
      "ce_probs": (lambda r, i: jaxce.cross_entropy(r, t[i], label_smoothing=0.1), None),
      "nll": (lambda r, i: jaxce.nll_loss(jax.nn.log_softmax(r), labels[i]), None),
      "bce": (lambda r, i: jaxce.binary_cross_entropy_with_logits(r, t[i]), None),
      "log_softmax": (lambda r, i: jnp.sum(jaxce.log_softmax(r) * t[i]), None),
      "ce_int": (lambda r, i: jaxce.cross_entropy(r, labels[i]), "all"),
      "linear_forward_mode": (lambda r, i: jaxce.linear_cross_entropy(
          r, kernel, labels[i], forward_mode=True), "reverse-over-reverse"),
  }


@pytest.mark.slow  # about 30 s of second-order traces: `pytest -m slow` (.ci/run) runs it
@pytest.mark.parametrize(
    "name", ["ce_probs", "nll", "bce", "log_softmax", "ce_int", "linear_forward_mode"])
def test_second_order_inside_scan(name):
  loss, fails = _scan_cases()[name]
  x = jnp.asarray(_rng(6).normal(size=(2, 3, 5)))
  scanned = lambda x: jax.lax.scan(
      lambda c, xi: (c + loss(xi[0], xi[1]), None), 0.0, (x, jnp.arange(2)))[0]
  unrolled = lambda x: loss(x[0], 0) + loss(x[1], 1)
  grad_of_grad = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2))
  for mode, op in [("forward-over-reverse", jax.hessian), ("reverse-over-reverse", grad_of_grad)]:
    expected = op(unrolled)(x)
    if fails in ("all", mode):
      with pytest.raises((ValueError, TypeError, OverflowError, RecursionError)):
        op(scanned)(x)
    else:
      np.testing.assert_allclose(op(scanned)(x), expected, rtol=1e-10, atol=1e-12, err_msg=mode)
