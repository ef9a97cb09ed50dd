"""Eager calls compile nothing after the first: with new jax arrays of the
same shape, and with host inputs (NumPy arrays, lists, array-valued options),
which run through each function's cached jit, with x64 off as users run them:
jit narrows NumPy's float64 as `jnp.asarray` would, and NumPy's int64
labels are cast to int32 on the host only where that keeps every value."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

_KERNEL = np.linspace(-1.0, 1.0, 30, dtype=np.float32).reshape(3, 10)


def _rng(seed):
  return np.random.default_rng(seed)


class _CompileCounter:
  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


def _assert_no_compile_after_the_first(fns, rng, host):
  """Each of `fns` and its grad, called three times with fresh (4, 3) inputs:
  float64 NumPy arrays for the value calls if `host`, else float32 jax
  arrays (the grads take jax arrays)."""
  counter = _CompileCounter()
  jax.monitoring.register_event_duration_secs_listener(counter)
  try:
    for name, fn in fns.items():
      for g in (fn, jax.grad(lambda x, fn=fn: jnp.sum(fn(x)))):
        for i in range(3):
          x = rng.normal(size=(4, 3))
          before = counter.count
          jax.block_until_ready(g(x if host and g is fn else jnp.asarray(x, jnp.float32)))
          if i:
            assert counter.count == before, f"{name}: call {i} compiled {counter.count - before}"
  finally:
    jax.monitoring.unregister_event_duration_listener(counter)


def _eager_linear(x, **kw):
  y = jnp.asarray([0, 9, -100, 4], jnp.int32)
  return jaxce.linear_cross_entropy(x, jnp.asarray(_KERNEL), y, **kw)


@pytest.mark.slow  # 6 s: `pytest -m slow` (.ci/run) runs it
def test_eager_calls_do_not_recompile():
  """Every public function, and its grad, called eagerly three times with
  fresh arrays of one shape: nothing compiles after the first call."""
  rng = _rng(12)
  y = jnp.asarray([0, 2, -100, 1], jnp.int32)
  fns = {
      "log_softmax": lambda x: jaxce.log_softmax(x),
      "logsumexp": lambda x: jaxce.logsumexp(x),
      "ce_int": lambda x: jaxce.cross_entropy(x, y, label_smoothing=0.1),
      "ce_probs": lambda x: jaxce.cross_entropy(x, jax.nn.softmax(x), z_loss=0.1),
      "nll": lambda x: jaxce.nll_loss(x, y),
      "bce": lambda x: jaxce.binary_cross_entropy_with_logits(x, jnp.ones_like(x) / 2),
      "bce_probs": lambda x: jaxce.binary_cross_entropy(jax.nn.sigmoid(x), jnp.ones_like(x) / 2),
      "optax_int": lambda x: jaxce.softmax_cross_entropy_with_integer_labels(x, y % 3),
      "optax_probs": lambda x: jaxce.softmax_cross_entropy(x, jax.nn.softmax(x)),
      "optax_sigmoid": lambda x: jaxce.sigmoid_binary_cross_entropy(x, jnp.ones_like(x) / 2),
      # The fused loss: x (4, 3) times a fixed kernel (3, 10), every backward.
      **{f"linear_{b}": functools.partial(_eager_linear, backward=b)
         for b in ("auto", "recompute", "precompute")},
      "linear_chunked": functools.partial(_eager_linear, chunk_size=4),
      "linear_forward_mode": functools.partial(_eager_linear, forward_mode=True),
      "checked_ce": lambda x: jaxce.checked.cross_entropy(x, y),
  }
  _assert_no_compile_after_the_first(fns, rng, host=False)


def test_eager_calls_transfer_nothing():
  """Called eagerly on device arrays, after the first call, every public
  function moves nothing from the host (one cached jit; the optax drop-ins
  ran op by op, with host constants). `jaxce.checked` aside: checkify runs
  its checks eagerly."""
  x = jax.device_put(jnp.asarray(_rng(3).normal(size=(6, 5)), jnp.float32))
  y, t = jax.device_put(jnp.asarray([0, 1, 2, 3, 4, -100])), jax.device_put(jax.nn.softmax(x))
  kernel = jax.device_put(jnp.ones((5, 7), jnp.float32))
  y5 = jax.device_put(jnp.asarray([0, 1, 2, 3, 4, 1]))
  fns = {
      "log_softmax": lambda: jaxce.log_softmax(x),
      "logsumexp": lambda: jaxce.logsumexp(x),
      "ce_int": lambda: jaxce.cross_entropy(x, y, label_smoothing=0.1),
      "ce_probs": lambda: jaxce.cross_entropy(x, t),
      "nll": lambda: jaxce.nll_loss(x, y),
      "bce": lambda: jaxce.binary_cross_entropy_with_logits(x, t),
      "bce_probs": lambda: jaxce.binary_cross_entropy(t, t),
      "linear": lambda: jaxce.linear_cross_entropy(x, kernel, y),
      "optax_int": lambda: jaxce.softmax_cross_entropy_with_integer_labels(x, y5),
      "optax_probs": lambda: jaxce.softmax_cross_entropy(x, t),
      "optax_sigmoid": lambda: jaxce.sigmoid_binary_cross_entropy(x, t),
  }
  for name, f in fns.items():
    jax.block_until_ready(f())
    with jax.transfer_guard("disallow"):
      try:
        jax.block_until_ready(f())
      except Exception as e:
        raise AssertionError(f"{name}: {e}") from None


@pytest.mark.slow  # 5 s: `pytest -m slow` (.ci/run) runs it
def test_eager_host_inputs_do_not_recompile():
  """NumPy inputs (int64 labels, NumPy's default, and float64 arrays), lists,
  a list `axis` and a concrete array option go through the cached jit too:
  they ran op by op, compiling again on every call (label smoothing with
  NumPy labels: about 110 ms a call at 8 x 100 on 2 CPU cores)."""
  rng = _rng(13)
  host_labels = lambda: rng.integers(0, 3, 4).astype(np.int64)
  fns = {
      "ce_int64_smoothing": lambda x: jaxce.cross_entropy(
          x, host_labels(), label_smoothing=0.1),
      "ce_int64_weight": lambda x: jaxce.cross_entropy(
          x, host_labels(), weight=rng.uniform(size=3)),
      "ce_float64_probs": lambda x: jaxce.cross_entropy(x, rng.dirichlet(np.ones(3), 4)),
      "ce_array_option": lambda x: jaxce.cross_entropy(
          x, host_labels(), label_smoothing=jnp.float32(0.1)),
      "nll_int64": lambda x: jaxce.nll_loss(x, host_labels()),
      "linear_int64": lambda x: jaxce.linear_cross_entropy(
          x, _KERNEL, rng.integers(0, 10, 4)),
      "log_softmax_list_axis": lambda x: jaxce.log_softmax(x, axis=[0, 1]),
      "logsumexp_list_where": lambda x: jaxce.logsumexp(x, where=[True, False, True]),
      "bce_float64": lambda x: jaxce.binary_cross_entropy_with_logits(
          x, rng.uniform(size=(4, 3))),
      "optax_int64": lambda x: jaxce.softmax_cross_entropy_with_integer_labels(
          x, host_labels()),
  }
  _assert_no_compile_after_the_first(fns, rng, host=True)


def test_host_int64_labels_keep_their_values():
  """NumPy int64 labels are cast to int32 on the host only where every value
  fits: ignore_index, labels past C and negative ones keep their meaning, and
  a label beyond int32 (which a cast would wrap onto a class) stays out of
  range."""
  logits = jnp.asarray(_rng(14).normal(size=(5, 3)), jnp.float32)
  labels = np.array([0, -100, 2, 7, -1], np.int64)
  ours = jaxce.cross_entropy(logits, labels, reduction="none")
  want = jaxce.cross_entropy(logits, jnp.asarray(labels, jnp.int32), reduction="none")
  np.testing.assert_array_equal(ours, want)
  np.testing.assert_array_equal(np.isnan(ours), [False, False, False, True, True])
  assert ours[1] == 0
  wraps = np.array([0, 2**32 + 1, 2**32 - 100], np.int64)  # int32 wraps: 1 and -100
  out = jaxce.cross_entropy(logits[:3], wraps, reduction="none")
  np.testing.assert_array_equal(np.isnan(out), [False, True, True])
  out = jaxce.cross_entropy(logits[:3], wraps, reduction="none", ignore_index=2**32 - 100)
  np.testing.assert_array_equal(np.isnan(out), [False, True, False])
  assert out[2] == 0


def test_host_inputs_give_the_jax_inputs_values():
  """What the cached jit makes of host inputs is what `jnp.asarray` makes of
  them: the same values as the float32 / int32 jax arrays."""
  rng = _rng(15)
  x, t = rng.normal(size=(4, 3)), rng.dirichlet(np.ones(3), 4)
  y, w = np.array([0, 2, -100, 1]), rng.uniform(size=3)
  f32, i32 = (lambda a: jnp.asarray(a, jnp.float32)), (lambda a: jnp.asarray(a, jnp.int32))
  pairs = [
      (jaxce.cross_entropy(x, y, weight=w, label_smoothing=0.1),
       jaxce.cross_entropy(f32(x), i32(y), weight=f32(w), label_smoothing=0.1)),
      (jaxce.cross_entropy(x, t, label_smoothing=jnp.float32(0.2)),
       jaxce.cross_entropy(f32(x), f32(t), label_smoothing=0.2)),
      (jaxce.log_softmax(x.tolist(), axis=[0, 1]), jaxce.log_softmax(f32(x), axis=(0, 1))),
      (jaxce.logsumexp(x, where=[True, False, True]),
       jaxce.logsumexp(f32(x), where=jnp.asarray([True, False, True]))),
  ]
  for got, want in pairs:
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def _compiles(calls):
  """The number of compilations during each of `calls` (thunks), in order."""
  counter = _CompileCounter()
  jax.monitoring.register_event_duration_secs_listener(counter)
  counts = []
  try:
    for call in calls:
      before = counter.count
      jax.block_until_ready(call())
      counts.append(counter.count - before)
  finally:
    jax.monitoring.unregister_event_duration_listener(counter)
  return counts


def test_spelled_out_defaults_compile_nothing_new():
  """A default written out is the same program: each spelling compiled one
  more (the cached jit's key held only the arguments given)."""
  x, y = jnp.zeros((4, 3)), jnp.asarray([0, 1, 2, -100])
  counts = _compiles([
      lambda: jaxce.cross_entropy(x, y),
      lambda: jaxce.cross_entropy(x, y, reduction="mean"),
      lambda: jaxce.cross_entropy(x, y, ignore_index=-100, weight=None),
      lambda: jaxce.cross_entropy(x, y, axis=-1, label_smoothing=0.0, where=None),
      lambda: jaxce.softmax_cross_entropy_with_integer_labels(x, y % 3),
      lambda: jaxce.softmax_cross_entropy_with_integer_labels(x, y % 3, -1),
      lambda: jaxce.softmax_cross_entropy_with_integer_labels(x, y % 3, axis=-1),
  ])
  assert counts[1:4] == [0, 0, 0], counts
  assert counts[5:] == [0, 0], counts


class _Held:
  """An array holder with `__jax_array__`, as flax.nnx.Param is."""

  def __init__(self, value):
    self.value = value

  def __jax_array__(self):
    return self.value


def test_jax_array_holders_go_through_the_cached_jit():
  """Options held by objects with `__jax_array__` (flax.nnx.Param) ran op by
  op, 4x optax's eager time at 8 x 10; they go in as the arrays they hold."""
  from jaxce import _dispatch

  w = jnp.linspace(0.5, 1.5, 3)
  assert isinstance(_dispatch._host_array(_Held(w)), jax.Array)
  x, y = jnp.asarray(_rng(4).normal(size=(4, 3)), jnp.float32), jnp.asarray([0, 1, 2, -100])
  expected = jaxce.cross_entropy(x, y, weight=w)
  counts = _compiles([lambda: jaxce.cross_entropy(x, y, weight=_Held(w)) for _ in range(3)])
  assert counts[1:] == [0, 0], counts
  np.testing.assert_array_equal(jaxce.cross_entropy(x, y, weight=_Held(w)), expected)
  kernel = jnp.asarray(_KERNEL)
  np.testing.assert_array_equal(
      jaxce.linear_cross_entropy(_Held(x), _Held(kernel), jnp.asarray([0, 9, 1, 4])),
      jaxce.linear_cross_entropy(x, kernel, jnp.asarray([0, 9, 1, 4])))


def test_checked_raising_of_grad_does_not_recompile():
  """`raising(jax.grad(checked loss))` called eagerly compiled the loss's
  jit again on every call (a checkify check outside a jit, JAX's behaviour),
  about 130 ms a step at 8 x 10; the label check now runs inside a jit. It
  still raises on a bad label."""
  y = jnp.asarray([0, 2, -100, 1])
  kernel = jnp.asarray(_KERNEL)
  steps = {
      "cross_entropy": jaxce.checked.raising(jax.grad(jaxce.checked.cross_entropy)),
      "nll_loss": jaxce.checked.raising(jax.value_and_grad(jaxce.checked.nll_loss)),
      "linear": jaxce.checked.raising(jax.grad(
          lambda x, y: jaxce.checked.linear_cross_entropy(x, kernel, y))),
  }
  for name, step in steps.items():
    xs = [jnp.asarray(_rng(i).normal(size=(4, 3)), jnp.float32) for i in range(3)]
    counts = _compiles([functools.partial(step, x, y) for x in xs])
    assert counts[1:] == [0, 0], (name, counts)
    with pytest.raises(Exception, match=f"checked.{name.replace('linear', 'linear_cross_entropy')}"
                       ": label 17 at flat position 1"):
      step(xs[0], jnp.asarray([0, 17, -100, 1]))  # (C = 3, or 10 for the fused loss)


def test_eager_checked_losses_raise_at_once():
  """Eager checked calls (their check one jitted dispatch) still raise, name
  the bad label, and give the plain loss's value otherwise."""
  x, y = jnp.asarray(_rng(5).normal(size=(4, 3)), jnp.float32), jnp.asarray([0, 2, -100, 1])
  np.testing.assert_array_equal(jaxce.checked.cross_entropy(x, y), jaxce.cross_entropy(x, y))
  counts = _compiles([lambda: jaxce.checked.cross_entropy(x, y) for _ in range(2)])
  assert counts == [0, 0], counts
  for ignore in (-100, jnp.asarray(-100), None):
    bad = jnp.asarray([0, 3, -100, 1]) if ignore is not None else jnp.asarray([0, 3, 1, 1])
    with pytest.raises(Exception, match="label 3 at flat position 1 is outside"):
      jaxce.checked.cross_entropy(x, bad, ignore_index=ignore)
