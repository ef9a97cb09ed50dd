"""Bad inputs raise at trace time (eagerly and under jax.jit) with the right
type and a message naming the argument and what was expected and got;
out-of-range labels give NaN, or an error naming them with jaxce.checked."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxce

N, C = 4, 5


def _x(shape=(N, C), dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)


def _y(shape=(N,)):
  return jnp.asarray(np.arange(int(np.prod(shape))).reshape(shape) % C, jnp.int32)


def _assert_raises(fn, args, exc, fragments):
  """`fn(*args)` raises `exc` eagerly and while tracing under jit (never when
  running), with every fragment in its message."""
  for mode, f in (("eager", fn), ("jit", jax.jit(fn))):
    with pytest.raises(exc) as info:
      f(*args)
    msg = str(info.value)
    for frag in fragments:
      assert frag in msg, f"{mode}: {frag!r} not in {msg!r}"
  # Trace time: abstract evaluation alone raises too.
  with pytest.raises(exc):
    jax.eval_shape(fn, *args)


CE = jaxce.cross_entropy
NLL = jaxce.nll_loss
BCE = jaxce.binary_cross_entropy_with_logits

# name: (fn, args, exception, message fragments)
CASES = {
    # integer labels of the wrong shape
    "ce_labels_shape": (
        lambda x, y: CE(x, y), (_x(), _y((3,))), ValueError, ["labels", "(4,)", "(3,)"]),
    "ce_labels_shape_axis1": (
        lambda x, y: CE(x, y, axis=1), (_x((2, C, 3)), _y((2, C))), ValueError,
        ["labels", "(2, 3)", "(2, 5)"]),
    "ce_labels_rank": (
        lambda x, y: CE(x, y), (_x(), _y((N, 1))), ValueError, ["labels", "(4,)", "(4, 1)"]),
    "nll_labels_shape": (
        lambda x, y: NLL(x, y), (_x(), _y((N + 1,))), ValueError, ["labels", "(4,)", "(5,)"]),
    # one-hot integer targets: probabilities must be floating (PyTorch's rule)
    "ce_integer_probabilities": (
        lambda x, y: CE(x, y), (_x(), jnp.eye(C, dtype=jnp.int32)[:N]), TypeError,
        ["`labels` has the logits' shape (4, 5) and dtype int32",
         "must have a floating dtype", "labels.astype(jnp.float32)", "(4,)"]),
    "ce_bool_labels": (
        lambda x, y: CE(x, y), (_x(), jnp.zeros(N, bool)), TypeError, ["labels", "bool"]),
    # class weights
    "ce_weight_shape": (
        lambda x, w: CE(x, _y(), weight=w), (_x(), jnp.ones(C - 1)), ValueError,
        ["weight", "(5,)", "(4,)"]),
    "ce_weight_rank": (
        lambda x, w: CE(x, _y(), weight=w), (_x(), jnp.ones((1, C))), ValueError,
        ["weight", "(5,)", "(1, 5)"]),
    "ce_probs_weight_shape": (
        lambda x, w: CE(x, jnp.full((N, C), 0.2), weight=w), (_x(), jnp.ones(C + 2)),
        ValueError, ["weight", "(5,)", "(7,)"]),
    "nll_weight_shape": (
        lambda x, w: NLL(x, _y(), weight=w), (_x(), jnp.ones(3)), ValueError,
        ["weight", "(5,)", "(3,)"]),
    "ce_int_weight": (
        lambda x, w: CE(x, _y(), weight=w), (_x(), jnp.ones(C, jnp.int32)), TypeError,
        ["weight", "int32"]),
    # where
    "ce_where_shape": (
        lambda x, m: CE(x, _y(), where=m), (_x(), jnp.ones((N, 3), bool)), ValueError,
        ["where", "(4, 5)", "(4, 3)"]),
    "ce_where_rank": (
        lambda x, m: CE(x, _y(), where=m), (_x(), jnp.ones((2, N, C), bool)), ValueError,
        ["where", "(4, 5)", "(2, 4, 5)"]),
    "ce_probs_where_shape": (
        lambda x, m: CE(x, jnp.full((N, C), 0.2), where=m), (_x(), jnp.ones((C,), bool)[:3]),
        ValueError, ["where", "(4, 5)", "(3,)"]),
    "log_softmax_where_shape": (
        lambda x, m: jaxce.log_softmax(x, where=m), (_x(), jnp.ones((2, C), bool)),
        ValueError, ["where", "(4, 5)", "(2, 5)"]),
    "logsumexp_where_shape": (
        lambda x, m: jaxce.logsumexp(x, where=m), (_x(), jnp.ones((N, 2), bool)),
        ValueError, ["where", "(4, 5)", "(4, 2)"]),
    "ce_where_int": (
        lambda x, m: CE(x, _y(), where=m), (_x(), jnp.ones((N, C), jnp.int32)), TypeError,
        ["where", "bool", "int32"]),
    "ce_where_float": (
        lambda x, m: CE(x, _y(), where=m), (_x(), jnp.ones((N, C), jnp.float32)), TypeError,
        ["where", "bool", "float32"]),
    "log_softmax_where_float": (
        lambda x, m: jaxce.log_softmax(x, where=m), (_x(), jnp.ones((N, C))), TypeError,
        ["where", "float32"]),
    "logsumexp_where_int": (
        lambda x, m: jaxce.logsumexp(x, where=m), (_x(), jnp.ones((N, C), jnp.int32)),
        TypeError, ["where", "int32"]),
    # floating labels of another rank (class indices as floats, most likely),
    # and probabilities of the logits' rank but not their shape
    "ce_float_labels_shape": (
        lambda x, t: CE(x, t), (_x(), jnp.full((N,), 0.5)), TypeError,
        ["labels", "(4, 5)", "(4,)"]),
    "ce_float_labels_transposed": (
        lambda x, t: CE(x, t), (_x(), jnp.full((C, N), 0.2)), ValueError,
        ["labels", "(4, 5)", "(5, 4)"]),
    # integer logits / log_probs, floating labels to nll_loss
    "ce_int_logits": (
        lambda x, y: CE(x, y), (jnp.zeros((N, C), jnp.int32), _y()), TypeError,
        ["logits", "int32"]),
    "ce_bool_logits": (
        lambda x, y: CE(x, y), (jnp.zeros((N, C), bool), _y()), TypeError, ["logits", "bool"]),
    "nll_int_log_probs": (
        lambda x, y: NLL(x, y), (jnp.zeros((N, C), jnp.int32), _y()), TypeError,
        ["log_probs", "int32"]),
    "nll_float_labels": (
        lambda x, y: NLL(x, y), (_x(), jnp.zeros((N,), jnp.float32)), TypeError,
        ["labels", "float32"]),
    "nll_prob_labels": (
        lambda x, y: NLL(x, y), (_x(), jnp.full((N, C), 0.2)), TypeError, ["labels"]),
    "log_softmax_int": (
        lambda x: jaxce.log_softmax(x), (jnp.zeros((N, C), jnp.int32),), TypeError,
        ["x", "int32"]),
    "logsumexp_int": (
        lambda x: jaxce.logsumexp(x), (jnp.zeros((N, C), jnp.int32),), TypeError,
        ["x", "int32"]),
    "bce_int_logits": (
        lambda x, t: BCE(x, t), (jnp.zeros((N, C), jnp.int32), _x()), TypeError,
        ["logits", "int32"]),
    # unknown reduction
    "ce_reduction": (
        lambda x, y: CE(x, y, reduction="avg"), (_x(), _y()), ValueError,
        ["reduction", "'avg'", "'none'", "'mean'", "'sum'"]),
    "ce_probs_reduction": (
        lambda x, t: CE(x, t, reduction="batchmean"), (_x(), jnp.full((N, C), 0.2)),
        ValueError, ["reduction", "'batchmean'", "'none'", "'mean'", "'sum'"]),
    "nll_reduction": (
        lambda x, y: NLL(x, y, reduction="Mean"), (_x(), _y()), ValueError,
        ["reduction", "'Mean'", "'none'", "'mean'", "'sum'"]),
    "bce_reduction": (
        lambda x, t: BCE(x, t, reduction=None), (_x(), _x()), ValueError,
        ["reduction", "None", "'none'", "'mean'", "'sum'"]),
    # label_smoothing and z_loss
    "ce_smoothing_negative": (
        lambda x, y: CE(x, y, label_smoothing=-0.1), (_x(), _y()), ValueError,
        ["label_smoothing", "-0.1"]),
    "ce_smoothing_above_one": (
        lambda x, y: CE(x, y, label_smoothing=1.5), (_x(), _y()), ValueError,
        ["label_smoothing", "1.5"]),
    "ce_smoothing_nan": (
        lambda x, y: CE(x, y, label_smoothing=float("nan")), (_x(), _y()), ValueError,
        ["label_smoothing", "nan"]),
    "ce_probs_smoothing_above_one": (
        lambda x, t: CE(x, t, label_smoothing=2.0), (_x(), jnp.full((N, C), 0.2)),
        ValueError, ["label_smoothing", "2.0"]),
    "ce_z_loss_negative": (
        lambda x, y: CE(x, y, z_loss=-1e-4), (_x(), _y()), ValueError, ["z_loss", "-0.0001"]),
    "ce_z_loss_inf": (
        lambda x, y: CE(x, y, z_loss=float("inf")), (_x(), _y()), ValueError,
        ["z_loss", "finite", "inf"]),
    "linear_z_loss_inf": (
        lambda x, y: jaxce.linear_cross_entropy(x, jnp.ones((C, 3)), y % 3,
                                                z_loss=float("inf")),
        (_x(), _y()), ValueError, ["z_loss", "finite", "inf"]),
    "ce_probs_z_loss_negative": (
        lambda x, t: CE(x, t, z_loss=-1.0), (_x(), jnp.full((N, C), 0.2)), ValueError,
        ["z_loss", "-1.0"]),
    # BCE shapes
    "bce_targets_shape": (
        lambda x, t: BCE(x, t), (_x(), _x((N, 1))), ValueError, ["targets", "(4, 5)", "(4, 1)"]),
    "bce_targets_rank": (
        lambda x, t: BCE(x, t), (_x(), _x((C,))), ValueError, ["targets", "(4, 5)", "(5,)"]),
    "bce_weight_shape": (
        lambda x, w: BCE(x, x, weight=w), (_x(), jnp.ones((3,))), ValueError,
        ["weight", "(4, 5)", "(3,)"]),
    "bce_weight_bigger": (
        lambda x, w: BCE(x, x, weight=w), (_x(), jnp.ones((2, N, C))), ValueError,
        ["weight", "(4, 5)", "(2, 4, 5)"]),
    "bce_pos_weight_shape": (
        lambda x, pw: BCE(x, x, pos_weight=pw), (_x(), jnp.ones((N,))), ValueError,
        ["pos_weight", "(4, 5)", "(4,)"]),
    "bce_pos_weight_int": (
        lambda x, pw: BCE(x, x, pos_weight=pw), (_x(), jnp.ones((C,), jnp.int32)), TypeError,
        ["pos_weight", "int32"]),
    # bad axis
    "ce_axis_out_of_range": (
        lambda x, y: CE(x, y, axis=2), (_x(), _y()), ValueError, ["axis", "2", "[-2, 2)"]),
    "ce_axis_negative_out_of_range": (
        lambda x, y: CE(x, y, axis=-3), (_x(), _y()), ValueError, ["axis", "-3"]),
    "ce_axis_float": (
        lambda x, y: CE(x, y, axis=1.0), (_x(), _y()), TypeError, ["axis", "float"]),
    "nll_axis_out_of_range": (
        lambda x, y: NLL(x, y, axis=5), (_x(), _y()), ValueError, ["axis", "5"]),
    "log_softmax_axis": (
        lambda x: jaxce.log_softmax(x, axis=3), (_x(),), ValueError, ["axis", "3"]),
    "logsumexp_axis": (
        lambda x: jaxce.logsumexp(x, axis=-5), (_x(),), ValueError, ["axis", "-5"]),
    "ce_scalar_logits": (
        lambda x, y: CE(x, y), (jnp.float32(1.0), jnp.int32(0)), ValueError,
        ["logits", "0-d", "rank 0"]),
    "nll_scalar_log_probs": (
        lambda x, y: NLL(x, y), (jnp.float32(1.0), jnp.int32(0)), ValueError,
        ["log_probs", "rank 0"]),
    "ce_axis_bool": (
        lambda x, y: CE(x, y, axis=True), (_x(), _y()), TypeError, ["axis", "bool"]),
    "nll_axis_bool": (
        lambda x, y: NLL(x, y, axis=False), (_x(), _y()), TypeError, ["axis", "bool"]),
    "drop_in_axis_bool": (
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=True),
        (_x(), _y()), TypeError, ["axis", "bool"]),
    # a 1-D where with the classes on axis 1 (weight's rule would differ)
    "ce_where_1d_axis1": (
        lambda x, m: CE(x, _y((2, C)), axis=1, where=m), (_x((2, C, C)), jnp.ones(C, bool)),
        ValueError, ["where", "(5,)", "class axis 1", "where[:, None]"]),
    "ce_probs_where_1d_axis0": (
        lambda x, m: CE(x, jnp.full((C, N), 0.2), axis=0, where=m), (_x((C, N)),
                                                                     jnp.ones(N, bool)),
        ValueError, ["where", "(4,)", "class axis 0", "where[:, None]"]),
    # numbers given as strings (float() would parse them)
    "ce_label_smoothing_str": (
        lambda x, y: CE(x, y, label_smoothing="0.1"), (_x(), _y()), TypeError,
        ["label_smoothing", "'0.1'"]),
    "linear_softcap_str": (
        lambda x, k, y: jaxce.linear_cross_entropy(x, k, y, softcap="30"),
        (_x((N, 3)), _x((3, C)), _y()), TypeError, ["softcap", "'30'"]),
    "ce_label_smoothing_bool": (
        lambda x, y: CE(x, y, label_smoothing=True), (_x(), _y()), TypeError,
        ["label_smoothing", "True"]),
    "linear_softcap_beyond_2_102": (  # (XLA:CPU flushed every z / cap to 0 from 2**126 on)
        lambda x, k, y: jaxce.linear_cross_entropy(x, k, y, softcap=1e31),
        (_x((N, 3)), _x((3, C)), _y()), ValueError, ["softcap", "5.1e30", "1e+31", "None"]),
    "linear_softcap_below_float32_normal": (  # (0 on XLA:CPU: the capped logits NaN)
        lambda x, k, y: jaxce.linear_cross_entropy(x, k, y, softcap=1e-39),
        (_x((N, 3)), _x((3, C)), _y()), ValueError, ["softcap", "smallest normal"]),
    "sigmoid_bce_complex_labels": (
        lambda x, t: jaxce.sigmoid_binary_cross_entropy(x, t),
        (_x(), jnp.ones((N, C), jnp.complex64)), TypeError,
        ["sigmoid_binary_cross_entropy", "`labels`", "complex64"]),
    "ce_z_loss_beyond_float32": (  # (inf in float32: ignored positions 0 * inf = NaN)
        lambda x, y: CE(x, y, z_loss=1e39), (_x(), _y()), ValueError,
        ["z_loss", "3.4e38", "1e+39"]),
    "ce_label_smoothing_beyond_float64": (
        lambda x, y: CE(x, y, label_smoothing=10**400), (_x(), _y()), ValueError,
        ["label_smoothing", "401 digits"]),
    "drop_in_where_of_class_shape": (  # broadcasts, but a lower rank is per position
        lambda x, m: jaxce.softmax_cross_entropy(x, jnp.full((2, N, C), 0.2), where=m),
        (_x((2, N, C)), jnp.ones(C, bool)), ValueError,
        ["`where` must have the logits' rank", "one flag per position", "(2, 4)", "(5,)"]),
    "ce_labels_beyond_int64": (
        lambda x: CE(x, [0, 1, 2, 2**70]), (_x(),), TypeError, ["labels", "64 bits"]),
    "linear_reduction_array": (  # (== is elementwise: an array passed the old check)
        lambda x, k, y: jaxce.linear_cross_entropy(x, k, y, reduction=np.array("mean")),
        (_x((N, 3)), _x((3, C)), _y()), ValueError, ["reduction", "array('mean'"]),
    "bce_complex_targets": (
        lambda x, t: jaxce.binary_cross_entropy_with_logits(x, t),
        (_x(), jnp.ones((N, C), jnp.complex64)), TypeError, ["targets", "complex64"]),
    "sigmoid_bce_not_broadcastable": (
        lambda x, t: jaxce.sigmoid_binary_cross_entropy(x, t), (_x(), jnp.ones(3)),
        ValueError, ["sigmoid_binary_cross_entropy", "labels", "(4, 5)", "(3,)"]),
    # class_axis_name that is not axis names
    "ce_class_axis_name_int": (
        lambda x, y: CE(x, y, class_axis_name=3), (_x(), _y()), TypeError,
        ["class_axis_name", "Got 3"]),
    "ce_class_axis_name_repeated": (
        lambda x, y: CE(x, y, class_axis_name=("model", "model")), (_x(), _y()), ValueError,
        ["cross_entropy", "class_axis_name", "once", "('model', 'model')"]),
    "nll_class_axis_name_empty": (
        lambda x, y: NLL(x, y, class_axis_name=()), (_x(), _y()), TypeError,
        ["class_axis_name", "Got ()"]),
    "linear_class_axis_name_mixed": (
        lambda x, k, y: jaxce.linear_cross_entropy(x, k, y, class_axis_name=("model", 1)),
        (_x((N, 3)), _x((3, C)), _y()), TypeError, ["class_axis_name", "('model', 1)"]),
    # PyTorch's (N, C, H, W) layout without axis=1: the message suggests it
    "ce_torch_layout_hint": (
        lambda x, y: CE(x, y), (_x((2, C, 3, 4)), _y((2, 3, 4))), ValueError,
        ["labels", "(2, 5, 3)", "(2, 3, 4)", "axis=1"]),
    "nll_torch_layout_hint": (
        lambda x, y: NLL(x, y), (_x((2, C, 3)), _y((2, 3))), ValueError,
        ["labels", "(2, 5)", "(2, 3)", "axis=1"]),
    # class_axis_name where no such axis is bound (JAX: "unbound axis name")
    "ce_class_axis_name_unbound": (
        lambda x, y: CE(x, y, class_axis_name="model"), (_x(), _y()), ValueError,
        ["cross_entropy", "class_axis_name='model'", "not bound", "shard_map",
         "leave class_axis_name out"]),
    "nll_class_axis_name_unbound": (
        lambda x, y: NLL(x, y, class_axis_name=("data", "model")), (_x(), _y()), ValueError,
        ["nll_loss", "'data'", "not bound", "`log_probs`"]),
    "linear_class_axis_name_unbound": (
        lambda x, k, y: jaxce.linear_cross_entropy(x, k, y, class_axis_name="model"),
        (_x((N, 3)), _x((3, C)), _y()), ValueError,
        ["linear_cross_entropy", "'model'", "not bound", "`kernel`", "Auto mesh",
         "Explicit mesh"]),
    # messages name the argument as the function calls it
    "linear_x_0d": (
        lambda x, k, y: jaxce.linear_cross_entropy(x, k, y), (_x(()), _x((3, C)), _y(())),
        ValueError, ["`x`", "0-d"]),
    "log_softmax_where_names_x": (
        lambda x, m: jaxce.log_softmax(x, where=m), (_x(), jnp.ones((3, C), bool)), ValueError,
        ["log_softmax", "`where`", "`x` of shape (4, 5)", "(3, 5)"]),
    "logsumexp_axis_names_x": (
        lambda x: jaxce.logsumexp(x, axis=2), (_x(),), ValueError,
        ["logsumexp", "`x` of rank 2", "Got 2"]),
    "nll_labels_names_log_probs": (
        lambda x, y: NLL(x, y), (_x(), _y((N + 1,))), ValueError,
        ["`log_probs` of shape (4, 5)"]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_raises(case):
  fn, args, exc, fragments = case
  _assert_raises(fn, args, exc, fragments)


# Arguments that are no array at all (jit takes none of them as an argument:
# they are closed over). name: (call, exception, message fragments)
NOT_ARRAYS = {
    "ce_logits_none": (lambda: CE(None, _y()), TypeError,
                       ["cross_entropy", "`logits` must be an array", "None"]),
    "ce_labels_str": (lambda: CE(_x(), "0"), TypeError, ["cross_entropy", "`labels`", "str"]),
    "ce_labels_ragged": (lambda: CE(_x(), [[0], [1, 2]]), ValueError,
                         ["cross_entropy", "`labels`", "list"]),
    "ce_weight_str": (lambda: CE(_x(), _y(), weight="w"), TypeError, ["`weight`", "str"]),
    "ce_where_none_list": (lambda: CE(_x(), _y(), where=[None]), ValueError, ["`where`", "list"]),
    "ce_ignore_index_str": (lambda: CE(_x(), _y(), ignore_index="-100"), TypeError,
                            ["`ignore_index`", "str"]),
    # (the dtype given, not the float32 that jnp.asarray makes of it)
    "ce_ignore_index_host_float64": (lambda: CE(_x(), _y(), ignore_index=np.float64(2)),
                                     TypeError, ["`ignore_index`", "float64 of shape ()"]),
    "nll_log_probs_none": (lambda: NLL(None, _y()), TypeError, ["nll_loss", "`log_probs`"]),
    "log_softmax_none": (lambda: jaxce.log_softmax(None), TypeError, ["log_softmax", "`x`"]),
    "logsumexp_str": (lambda: jaxce.logsumexp("x"), TypeError, ["logsumexp", "`x`", "str"]),
    "bce_targets_none": (lambda: BCE(_x(), None), TypeError,
                         ["binary_cross_entropy_with_logits", "`targets`"]),
    "bce_probs_none": (lambda: jaxce.binary_cross_entropy(None, _x()), TypeError,
                       ["binary_cross_entropy", "`probs`"]),
    "linear_kernel_none": (lambda: jaxce.linear_cross_entropy(_x((N, 3)), None, _y()),
                           TypeError, ["linear_cross_entropy", "`kernel`"]),
    "drop_in_labels_none": (lambda: jaxce.softmax_cross_entropy(_x(), None), TypeError,
                            ["softmax_cross_entropy", "`labels`"]),
    "bce_targets_int_beyond_int32": (  # (JAX's OverflowError named nothing)
        lambda: BCE(_x((C,)), [0, 1, 2**40, 0, 0]), ValueError,
        ["binary_cross_entropy_with_logits", "`targets`", "beyond"]),
    "sigmoid_bce_labels_str": (lambda: jaxce.sigmoid_binary_cross_entropy(_x(), "1"),
                               TypeError, ["sigmoid_binary_cross_entropy", "`labels`", "str"]),
}


@pytest.mark.parametrize("case", NOT_ARRAYS.values(), ids=NOT_ARRAYS.keys())
def test_not_an_array_names_the_argument(case):
  call, exc, fragments = case
  for mode, f in (("eager", call), ("jit", jax.jit(call))):
    with pytest.raises(exc) as info:
      f()
    for frag in fragments:
      assert frag in str(info.value), f"{mode}: {frag!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss", "log_softmax", "logsumexp",
                                  "binary_cross_entropy_with_logits"])
def test_messages_name_the_function(name):
  fn = getattr(jaxce, name)
  x = jnp.zeros((N, C), jnp.int32)
  args = {"cross_entropy": (x, _y()), "nll_loss": (x, _y()),
          "binary_cross_entropy_with_logits": (x, x)}.get(name, (x,))
  with pytest.raises(TypeError, match=re.escape(name)):
    fn(*args)


def test_traced_label_smoothing_is_refused():
  # label_smoothing selects code: a traced value is a TypeError, not a silent
  # concretization failure.
  f = jax.jit(lambda x, y, eps: CE(x, y, label_smoothing=eps))
  with pytest.raises(TypeError, match="label_smoothing"):
    f(_x(), _y(), 0.1)
  f = jax.jit(lambda x, y, z: CE(x, y, z_loss=z))
  with pytest.raises(TypeError, match="z_loss"):
    f(_x(), _y(), 0.1)


def test_traced_axis_is_told_to_be_static():
  """`jax.jit(loss)(..., axis=1)` traces the axis: the error says it must be
  static and how, not that an int "must be an int"."""
  calls = {
      "cross_entropy": lambda x, a: CE(x, _y(), axis=a),
      "nll_loss": lambda x, a: NLL(x, _y(), axis=a),
      "log_softmax": lambda x, a: jaxce.log_softmax(x, axis=a),
      "softmax_cross_entropy": lambda x, a: jaxce.softmax_cross_entropy(x, x, axis=a),
  }
  for name, call in calls.items():
    with pytest.raises(TypeError, match=rf"{name}: `axis` must be static.*static_argnames"):
      jax.jit(call)(_x(), 1)


def test_valid_edge_values_accepted():
  x, y = _x(), _y()
  for eps in (0.0, 1.0):
    assert np.isfinite(float(CE(x, y, label_smoothing=eps)))
  assert np.isfinite(float(CE(x, y, z_loss=0.0)))
  assert np.isfinite(float(CE(x, y, axis=-1)))
  # numpy integer axis and a broadcastable where of lower rank are fine.
  assert np.isfinite(float(CE(x, y, axis=np.int64(1), where=jnp.ones((C,), bool))))
  assert np.isfinite(float(BCE(x, x, weight=jnp.ones((N, 1)), pos_weight=jnp.ones((C,)))))
  assert np.isfinite(float(BCE(x, jnp.ones((N, C), jnp.int32))))  # integer targets cast
  assert np.isfinite(float(BCE(x, jnp.ones((N, C), bool))))


# ---------------------------------------------------------------------------
# Out-of-range labels: NaN for that position (not ignore_index).


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_out_of_range_labels_give_nan_at_that_position(jit):
  x = _x()
  y = jnp.asarray([0, C, -1, -100], jnp.int32)  # too big, negative, ignored
  ce = jax.jit(CE, static_argnames=("reduction", "label_smoothing")) if jit else CE
  nll = jax.jit(NLL, static_argnames=("reduction",)) if jit else NLL
  for kw in ({}, {"label_smoothing": 0.1}):
    per = np.asarray(ce(x, y, reduction="none", **kw))
    assert np.isfinite(per[0])
    assert per[3] == 0.0
    assert np.isnan(per[1]), per
    assert np.isnan(per[2]), per
    assert np.isnan(float(ce(x, y, **kw)))
    assert np.isnan(float(ce(x, y, reduction="sum", **kw)))
  per = np.asarray(nll(jaxce.log_softmax(x), y, reduction="none"))
  assert np.isfinite(per[0])
  assert per[3] == 0.0
  assert np.isnan(per[1]), per
  assert np.isnan(per[2]), per
  # Weighted: the clipped weight lookup must not hide the bad label.
  per = np.asarray(CE(x, y, weight=jnp.ones((C,)), reduction="none"))
  assert np.isnan(per[1])
  assert np.isnan(per[2])


def test_ignore_index_is_not_special_otherwise():
  # With another ignore_index, -100 is an out-of-range label like any other.
  x = _x()
  per = np.asarray(CE(x, jnp.asarray([0, 1, -100, 3], jnp.int32), ignore_index=1,
                      reduction="none"))
  assert per[1] == 0.0
  assert np.isnan(per[2])
  assert np.isfinite(per[[0, 3]]).all()


# ---------------------------------------------------------------------------
# jaxce.checked: an error naming the bad label, under jit too.


def _checked_ce(x, y):
  return jaxce.checked.cross_entropy(x, y, label_smoothing=0.1)


def test_checked_raising_names_bad_label_under_jit():
  step = jaxce.checked.raising(jax.jit(_checked_ce))
  x = _x()
  with pytest.raises(checkify.JaxRuntimeError, match=r"label 7 at flat position 2") as info:
    step(x, jnp.asarray([0, 1, 7, -100], jnp.int32))
  assert "[0, 5)" in str(info.value)
  with pytest.raises(checkify.JaxRuntimeError, match=r"label -3 at flat position 0"):
    step(x, jnp.asarray([-3, 1, 2, 3], jnp.int32))


def test_checked_raising_correct_labels_match_plain_loss():
  x, y = _x(), jnp.asarray([0, 4, -100, 2], jnp.int32)
  step = jaxce.checked.raising(jax.jit(_checked_ce))
  np.testing.assert_allclose(step(x, y), CE(x, y, label_smoothing=0.1), rtol=1e-6)
  # Gradients through the checked loss, too.
  g = jaxce.checked.raising(jax.jit(jax.grad(_checked_ce)))(x, y)
  np.testing.assert_allclose(g, jax.grad(lambda x: CE(x, y, label_smoothing=0.1))(x),
                             rtol=1e-6)


def test_checked_raising_inside_jit_says_to_put_it_outside():
  """jax.jit(raising(f)) cannot raise on the host: a ValueError that says
  where raising goes (JAX's own error said "not functionalized"), for good
  labels too; under jax.grad raising works from either side."""
  x, y = _x(), jnp.asarray([0, 4, -100, 2], jnp.int32)
  staged = jax.jit(jaxce.checked.raising(_checked_ce))
  for labels in (y, y.at[0].set(7)):
    with pytest.raises(ValueError, match=r"raising\(jax.jit\(step\)\)"):
      staged(x, labels)
  g = jax.grad(jaxce.checked.raising(_checked_ce))(x, y)
  np.testing.assert_allclose(g, jax.grad(lambda x: CE(x, y, label_smoothing=0.1))(x),
                             rtol=1e-6)


def test_checked_options_forwarded():
  # axis, ignore_index and weight reach both the check and the loss.
  x = _x((2, C, 3))
  y = jnp.asarray([[0, 4, 9], [1, 9, 2]], jnp.int32)  # 9 is ignore_index
  w = jnp.linspace(0.5, 2.0, C, dtype=jnp.float32)

  def f(x, y):
    return jaxce.checked.cross_entropy(x, y, axis=1, ignore_index=9, weight=w)

  got = jaxce.checked.raising(jax.jit(f))(x, y)
  np.testing.assert_allclose(got, CE(x, y, axis=1, ignore_index=9, weight=w), rtol=1e-6)
  with pytest.raises(checkify.JaxRuntimeError, match="label -100"):
    jaxce.checked.raising(jax.jit(f))(x, y.at[1, 0].set(-100))


def test_checked_nll_loss():
  lp = jaxce.log_softmax(_x())
  f = jaxce.checked.raising(jax.jit(lambda lp, y: jaxce.checked.nll_loss(lp, y)))
  y = jnp.asarray([0, 1, -100, 4], jnp.int32)
  np.testing.assert_allclose(f(lp, y), NLL(lp, y), rtol=1e-6)
  with pytest.raises(checkify.JaxRuntimeError, match=r"label 5 at flat position 3"):
    f(lp, y.at[3].set(C))


def test_checked_probability_targets_pass_through():
  x, t = _x(), jnp.full((N, C), 0.2, jnp.float32)
  f = jaxce.checked.raising(jax.jit(lambda x, t: jaxce.checked.cross_entropy(x, t)))
  np.testing.assert_allclose(f(x, t), CE(x, t), rtol=1e-6)


def test_checked_eager_raises_and_plain_jit_refuses():
  x, bad = _x(), jnp.asarray([0, 1, 7, 2], jnp.int32)
  with pytest.raises(checkify.JaxRuntimeError, match="label 7"):
    jaxce.checked.cross_entropy(x, bad)
  # Without checkify, a staged check is refused at trace time, saying what to
  # do instead (not JAX's "not functionalized" at lowering).
  for f in (jax.jit(jaxce.checked.cross_entropy),
            jax.jit(lambda x, y: jax.lax.map(lambda y: jaxce.checked.cross_entropy(x, y),
                                             y[None]))):
    with pytest.raises(ValueError, match=r"jaxce.checked.raising\(jax.jit\(f\)\)") as info:
      f(x, bad)
    assert "not functionalized" not in str(info.value)


def test_checked_python_int_labels_beyond_int32():
  """Python ints beyond int32 are out-of-range labels to the plain losses
  (NaN there); the checked ones name them, where JAX's int32 conversion
  raised an OverflowError naming nothing."""
  x, y = _x((3, C)), [0, 1, 2**32]
  assert np.isnan(CE(x, y, reduction="none")[2])
  calls = {"cross_entropy": lambda: jaxce.checked.cross_entropy(x, y),
           "nll_loss": lambda: jaxce.checked.nll_loss(x, y),
           "softmax_cross_entropy_with_integer_labels":
               lambda: jaxce.checked.softmax_cross_entropy_with_integer_labels(x, y),
           "check_labels": lambda: jaxce.checked.check_labels(y, C)}
  for name, call in calls.items():
    with pytest.raises(checkify.JaxRuntimeError,
                       match=rf"checked.{name}: label 4294967296 at flat position 2 "):
      call()
  with pytest.raises(checkify.JaxRuntimeError, match=r"label 1099511627776 at flat position 0"):
    jaxce.checked.cross_entropy(x[0], 2**40)


def test_check_labels_num_classes_must_be_an_int():
  # (4.5 and True were taken: "outside [0, True)"; None and "5" gave JAX's errors)
  for bad in (4.5, True, None, "5", jnp.int32(3)):
    with pytest.raises(TypeError, match=r"check_labels: `num_classes` must be an int"):
      jaxce.checked.check_labels(jnp.asarray([0, 1]), bad)
  with pytest.raises(ValueError, match=r"`num_classes` must be non-negative\. Got -1"):
    jaxce.checked.check_labels(jnp.asarray([0, 1]), -1)


def test_check_labels_under_checkify():
  def f(y):
    jaxce.checked.check_labels(y, 3, ignore_index=None)
    return y

  err, _ = checkify.checkify(jax.jit(f))(jnp.asarray([0, 2, 1], jnp.int32))
  assert err.get() is None
  err, _ = checkify.checkify(jax.jit(f))(jnp.asarray([[0, 2], [-100, 1]], jnp.int32))
  assert "label -100 at flat position 2" in err.get()


def test_checked_empty_batch():
  f = jaxce.checked.raising(jax.jit(jaxce.checked.cross_entropy))
  assert float(f(jnp.zeros((0, C), jnp.float32), jnp.zeros((0,), jnp.int32))) == 0.0
  g = jaxce.checked.raising(jaxce.checked.nll_loss)
  assert g(jnp.zeros((0, C), jnp.float32), jnp.zeros((0,), jnp.uint8), reduction="none").shape \
      == (0,)


def test_checked_position_under_vmap_counts_over_the_batch():
  """Under vmap the flat position is over the whole batched labels (mapped
  axes first), so it names the example too; nested vmaps as well."""
  f = jaxce.checked.raising(jax.jit(jax.vmap(jaxce.checked.cross_entropy)))
  x = jnp.zeros((3, 4, C), jnp.float32)
  y = jnp.zeros((3, 4), jnp.int32).at[2, 1].set(9)
  with pytest.raises(checkify.JaxRuntimeError, match=r"label 9 at flat position 9 "):
    f(x, y)
  g = jaxce.checked.raising(jax.vmap(jax.vmap(jaxce.checked.cross_entropy)))
  with pytest.raises(checkify.JaxRuntimeError, match=r"label 9 at flat position 9 "):
    g(x.reshape(3, 1, 4, C), y.reshape(3, 1, 4))
  # in_axes=1: the mapped axis counts first, so y.T[1, 2] is 2 * 4 + 1 again
  h = jaxce.checked.raising(jax.vmap(jaxce.checked.cross_entropy, in_axes=(0, 1)))
  with pytest.raises(checkify.JaxRuntimeError, match=r"label 9 at flat position 9 "):
    h(x, y.T)


def test_checked_linear_and_drop_in():
  x, k = jnp.ones((3, 2), jnp.float32), jnp.ones((2, 7), jnp.float32)
  lin = jaxce.checked.raising(jax.jit(jaxce.checked.linear_cross_entropy))
  np.testing.assert_allclose(lin(x, k, jnp.asarray([0, 6, -100])), np.log(7), rtol=1e-6)
  with pytest.raises(checkify.JaxRuntimeError, match=r"linear_cross_entropy: label 7 at flat"):
    lin(x, k, jnp.asarray([0, 7, 1], jnp.int8))
  drop = jaxce.checked.raising(
      jax.jit(jaxce.checked.softmax_cross_entropy_with_integer_labels, static_argnums=2))
  logits = jnp.zeros((2, 3, 4), jnp.float32)
  np.testing.assert_allclose(drop(logits, jnp.asarray([11, 0]), (2, 1)), [np.log(12)] * 2,
                             rtol=1e-6)
  # no ignore_index in optax's loss: -100 is out of range
  with pytest.raises(checkify.JaxRuntimeError, match=r"label -100 at flat position 1 is"
                     r" outside \[0, 12\)\."):
    drop(logits, jnp.asarray([11, -100]), (2, 1))
  # axis=None: every axis is the class axis (24 classes), as in the plain drop-in
  np.testing.assert_allclose(drop(logits, jnp.asarray(23), None), np.log(24), rtol=1e-6)
  with pytest.raises(checkify.JaxRuntimeError, match=r"label 24 at flat position 0"):
    drop(logits, jnp.asarray(24), None)


def test_checked_shard_map_uses_the_global_class_count():
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((4,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.float32)

  @jax.jit
  def loss(x, y):
    return jax.shard_map(
        lambda x, y: jaxce.checked.cross_entropy(x, y, class_axis_name="model"),
        mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P())(x, y)

  f = jaxce.checked.raising(loss)
  y = jnp.asarray([7, 0, 5], jnp.int32)  # global classes: device 3 holds 6 and 7
  np.testing.assert_allclose(f(logits, y), CE(logits, y), rtol=1e-6)
  with pytest.raises(checkify.JaxRuntimeError, match=r"label 8 at flat position 0 is outside"
                     r" \[0, 8\)"):
    f(logits, y.at[0].set(8))


def test_checked_on_an_explicit_mesh_with_the_rows_split():
  """The bad label's value is read with a select and a sum: reading it as
  labels[position] was a dynamic slice of a split axis, which an Explicit
  mesh refuses (ShardingTypeError, with good labels too)."""
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  logits = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
  y = np.array([7, 0, 5, -100, 1, 2, 3, 4], np.int32)
  bad = y.copy()
  bad[5] = 9
  f = jaxce.checked.raising(jax.jit(jaxce.checked.cross_entropy))
  for spec in (P("data", None), P("data", "model")):
    with jax.set_mesh(mesh):
      x, labels = jax.device_put(logits, spec), jax.device_put(y, P("data"))
      np.testing.assert_allclose(f(x, labels), CE(logits, y), rtol=1e-6)
      with pytest.raises(checkify.JaxRuntimeError, match=r"label 9 at flat position 5 is"):
        f(x, jax.device_put(bad, P("data")))


def test_checked_narrow_dtypes_and_wrap_values():
  f = jaxce.checked.raising(jax.jit(jaxce.checked.cross_entropy))
  x = jnp.zeros((2, 300), jnp.float32)
  np.testing.assert_allclose(f(x, jnp.asarray([156, 255], jnp.uint8)), np.log(300), rtol=1e-6)
  with pytest.raises(checkify.JaxRuntimeError, match="label 4294967196 at flat position 1"):
    f(x, jnp.asarray([1, 4294967196], jnp.uint32))


def test_no_axis1_hint_when_it_would_not_help():
  with pytest.raises(ValueError, match="labels") as info:
    CE(_x((2, C, 3)), _y((2, 4)))
  assert "axis=1" not in str(info.value)


def test_where_1d_on_the_last_axis_still_broadcasts():
  """The 1-D where rule only refuses the ambiguous case."""
  x = _x((2, 3, C))
  m = jnp.asarray([True, False, True, True, False])
  np.testing.assert_allclose(CE(x, _y((2, 3)), where=m),
                             CE(x, _y((2, 3)), where=jnp.broadcast_to(m, x.shape)), rtol=1e-6)
