"""Test set-up: 8 CPU devices for the sharding tests, fast compiles, and
strict dtype and rank promotion so that no implicit upcast or broadcast hides
in the library."""

import gc
import os
import subprocess
import sys

# Fast compiles (most of the suite's time), options of XLA:CPU's code
# generation (tests/fast_compile.py); the tests that read XLA:CPU's compiled
# program compile it with XLA's defaults. An XLA that does not know a flag
# aborts the process, so a flag that may be retired is probed first.
_BASE_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"


def _xla_flags() -> str:
  flags = (f"{_BASE_FLAGS} --xla_cpu_use_fusion_emitters=false"
           " --xla_cpu_parallel_codegen_split_count=1")
  probe = subprocess.run(
      [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
      env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, capture_output=True)
  return flags if probe.returncode == 0 else _BASE_FLAGS


if "XLA_FLAGS" not in os.environ:  # set once; pytest-xdist's workers inherit it
  if os.environ.get("JAXCE_TEST_COMPILE") == "shipped":  # .ci/shipped
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  else:
    os.environ["XLA_FLAGS"] = _xla_flags()

import jax  # noqa: E402 (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# No Python tracebacks in the lowered programs' locations, which the tests do
# not read: tests/test_gradients.py on one core took 66.9 and 64.2 s with
# them, 57.8 and 54.9 s without (alternating runs; two runs of one setting
# differed by 5 s later). Tracebacks of raised errors are not affected.
jax.config.update("jax_traceback_in_locations_limit", 0)
# Python's cyclic garbage collector, at its default thresholds, walked the
# millions of objects that tracing and lowering leave alive (jaxprs, MLIR
# modules, caches) again and again: tests/test_gradients.py and
# test_forward_mode.py took 52.5 and 47.7 s with them, 46.7 and 39.9 s with
# these (alternating runs on the 2-core machine, 2026-12-07). Reference
# counting frees the rest as before; the objects alive after import are
# frozen out of the collections.
gc.set_threshold(50_000, 50, 1_000)
gc.freeze()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  if hasattr(config, "workerinput"):
    # A pytest-xdist worker has sent its reports and its exit status (at
    # sessionfinish) by now. The interpreter's teardown of the worker's
    # thousands of compiled executables took 10-12 s at the end of the
    # default suite, which the controller waits for: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


from fast_compile import AS_SHIPPED  # noqa: E402 (after XLA_FLAGS)


def _only_branch(key):
  """A `lax.platform_dependent` that calls the branch of platform `key`
  alone (or the default), as lowering for that platform would."""
  def platform_dependent(*args, default=None, **per_platform):
    return per_platform.get(key, default)(*args)
  return platform_dependent


@pytest.fixture(autouse=True)
def _cpu_branches_only(request, monkeypatch):
  """Traces only the CPU branch of each `lax.platform_dependent`, the one
  that XLA:CPU runs (the TPU and GPU branches are tested through `branches`
  below). JAX traces and lowers every branch, and the suite is mostly
  tracing and lowering rather than XLA's compiles (a profile of two numerics
  families: 18.5 of 108 s in `platform_dependent`, 22 s compiling).
  `.ci/shipped` (JAXCE_TEST_COMPILE=shipped) traces as users' programs do,
  every branch; so do tests marked `all_platforms`, which lower for TPU or
  GPU, with JAX's caches cleared first so that no CPU-only trace of an
  inner `jax.jit` is reused."""
  global _cpu_traces
  if AS_SHIPPED:
    yield
    return
  if request.node.get_closest_marker("all_platforms"):
    if _cpu_traces:
      jax.clear_caches()
      _cpu_traces = False
    yield
    return
  _cpu_traces = True
  monkeypatch.setattr(jax.lax, "platform_dependent", _only_branch("cpu"))
  yield


_cpu_traces = False  # whether JAX's caches may hold CPU-only traces


def _on_branch(param, monkeypatch):
  if param == "cpu":
    yield param
    return
  key = "tpu" if param == "tpu" else "cuda"
  monkeypatch.setattr(jax.lax, "platform_dependent", _only_branch(key))
  with jax.default_matmul_precision("highest" if key == "tpu" else "float32"):
    yield param


# The TPU and GPU branches run with `pytest -m slow` (.ci/run runs it): the
# default suite's time limit.
_TPU = pytest.param("tpu", marks=pytest.mark.slow)
_GPU = pytest.param("gpu", marks=pytest.mark.slow)


@pytest.fixture(params=["cpu", _TPU])
def branches(request, monkeypatch):
  """Runs each test twice: with jaxce's XLA:CPU code paths, and with those it
  takes on TPU (the `tpu=` or `default=` branch of every
  `lax.platform_dependent`), traced on CPU, so that their values are tested
  where no accelerator is at hand. The GPU's are TPU's except where
  `all_branches` says.

  The TPU run is under a `default_matmul_precision` of its own, a setting
  that is part of every jit cache's key (and that XLA:CPU's dots ignore), so
  that internal `jax.jit`s trace it anew instead of reusing the CPU traces,
  and the CPU traces stay cached for later tests (`jax.clear_caches()` made
  every later test compile again)."""
  yield from _on_branch(request.param, monkeypatch)


@pytest.fixture(params=["cpu", _TPU, _GPU])
def all_branches(request, monkeypatch):
  """`branches` and the GPU's (`cuda=` or `default=`) branches too, for the
  tests that reach a GPU-only one: label smoothing and probability targets'
  statistics (`_stats._gpu_smoothed`, `_stats._gpu_target_stats`)."""
  yield from _on_branch(request.param, monkeypatch)


# Variants that run with `pytest -m slow` only (.ci/run runs it), by test
# function and parameter id (an id ending in "*" matches ids that start with
# it): cases whose code paths the default suite's other variants of the same
# test cover, moved there to keep the default suite under its 5 minutes on
# the 2-core machine (328 s with the first set on 2026-12-07, an AMD EPYC,
# and 283 s before the second; see the README's Development section).
_SLOW_VARIANTS = {
    "test_cpu_half_dkernel_panels_match_direct_writes": {"float16-40"},
    "test_compiled_program_has_no_logits_buffer": {"bfloat16-default", "float32-default"},
    "test_losses_and_gradients_finite_in_every_dtype": {"float16", "float64"},
    "test_shard_map_vmap_of_weighted_losses_rows_split": {
        "cpu-labels-opts0", "cpu-labels-opts1", "cpu-probs-opts0", "cpu-probs-opts1"},
    "test_jacfwd_linearize_grad_of_jvp_hessian": {"log_softmax", "bce"},
    "test_jit_explicit_linear_features_split": {
        "x_spec1-kernel_spec1", "x_spec2-kernel_spec2", "x_spec3-kernel_spec3",
        "x_spec4-kernel_spec4"},
    "test_fully_masked_rows_integer_targets": {
        "z_loss-neg_inf", "plain-where", "smoothing-where", "z_loss-where", "plain-neg_inf"},
    "test_long_rows_in_blocks": {
        "none-neg_inf_pass", "none-pass", "mean-neg_inf_pass", "none-forward"},
    "test_long_rows_without_blocks_match_reference": {
        "devices-bf16", "devices-vmap", "devices-nchw", "one_device-bf16"},
    "test_symbolic_classes": {
        "cross_entropy_none-*", "cross_entropy_where-*", "sigmoid_binary_cross_entropy-*",
        "softmax_cross_entropy_with_integer_labels-*", "softmax_cross_entropy-*",
        "logsumexp-*", "cross_entropy_jvp-*", "binary_cross_entropy_with_logits-*",
        "nll_loss-n, c"},
    "test_zero_size_under_vmap_with_jvp_and_grad": {"shape1"},
    "test_check_grads_cross_entropy_int_weight": {"none-0.0"},
    "test_second_order_where_the_label_shift_overflows": {
        "smoothing-jvp_of_grad-float32", "label_far_below_max-grad_of_grad-float32",
        "ignored_row_large-grad_of_grad-float32"},
    "test_symbolic_classes_labels_of_any_dtype": {"int8-7", "int32-7"},
    "test_matches_cross_entropy_on_materialized_logits": {
        "extreme-softcap-none", "all_ignored-mean", "chunk1"},
    "test_precompute_matches_recompute_and_reference": {  # one compiled group
        "extreme-smoothing-weight", "inf_bias-smoothing-weight", "inf_bias-softcap-z_loss",
        "all_ignored-mean"},
    "test_loss_and_gradient_dtypes": {"float16", "float64"},
    "test_under_vmap_eagerly_and_on_axis_1": {"bfloat16"},
    "test_bce_narrow_rows_values": {
        "devices-shape1", "devices-shape2", "devices-shape3", "one_device-shape1",
        "one_device-shape3", "one_device-shape2"},
    "test_check_grads_cross_entropy_probs": {"z_loss"},
    "test_label_outside_where_is_a_neg_inf_logit_at_every_order": {"opts1"},
    "test_jvp_matches_grad_beside_infinite_losses": {"ce_outside_where", "nll"},
    "test_cpu_label_shift_gradient_bound": {"64x1000", "16x100x3_axis1"},
    "test_jit_explicit_side_arrays_sharded_otherwise": {"logits_spec1"},
    "test_linear_symbolic_shapes": {
        "plain-bf16-d", "plain-f32-d", "plain-bf16-n,*", "plain-f32-n,*", "sum-f32-n,*",
        "plain-f32-v"},
    "test_row_blocked_dx": {"80-None"},
    "test_golden_float32": {"c004", "c012"},
    "test_jvp_matches_reference_jit_and_vmap": {"ce_int_none", "log_softmax_axes", "logsumexp"},
    "test_fully_masked_rows_make_no_nan_inside": {"where-4"},
    "test_all_neg_inf_rows_probability_targets": {
        "cpu-smoothing_z_loss-bfloat16", "cpu-plain-bfloat16"},
    "test_remat_pmap_export_and_linear_transpose": {"ce_probs", "nll_log_softmax"},
    "test_far_labels_redo_their_rows": {
        "axis0-one-devices", "long-one-devices", "nchw-one-devices", "mask_bf16-one-devices",
        "vmap-one-devices", "axis0-one-one_device", "vmap-one-one_device"},
    "test_logsumexp_keepdims_like_jax_nn": {"axis3", "0"},
    "test_large_offset_accuracy": {"f16_6e4"},
    "test_hessian_matches_reference": {"log_softmax", "logsumexp", "nll", "int"},
    "test_second_order_weight_masked_class": {"int_where"},
    "test_jit_named_sharding": {  # cross_entropy_int-Auto and linear_cross_entropy stay
        "cross_entropy_probs-Auto", "nll_loss-Auto", "cross_entropy_int_rows-Auto",
        "cross_entropy_axis1_where-Auto", "elementwise-Auto", "cross_entropy_int-Explicit",
        "cross_entropy_int_rows-Explicit", "cross_entropy_probs-Explicit",
        "cross_entropy_axis1_where-Explicit", "nll_loss-Explicit", "elementwise-Explicit"},
    "test_precompute_half_precision": {"float16"},
    "test_matmul_operands_of_16_bit_kernels": {"True"},  # (a CPU with bf16 dots)
    "test_vmap_of_weighted_smoothing_rows_and_classes_split": {"cpu-probs"},
    "test_check_grads_log_softmax_logsumexp": {"log_softmax-plain", "logsumexp-where"},
    "test_check_grads_nll_loss": {"sum"},
    "test_check_grads_bce": {"none"},
    "test_mean_matches_int32_and_wrap_values_are_not_ignored": {"int8", "uint32"},
    "test_checked_uses_the_same_rule": {"int8", "uint32"},
    "test_neg_inf_logits_integer_targets": {"smoothing", "z_loss"},
    "test_large_logits_integer_targets": {"smoothing", "z_loss"},
    "test_both_paths_out_of_range_label_nan_row_with_options": {"cpu-z", "cpu-weight"},
    "test_long_rows_sum_in_blocks_match_reference": {
        "cpu-smooth-40960", "cpu-probs_smooth-40960"},
    "test_matches_optax": {"ce-none-int-axis1-eager", "sce-int-tuple-axis-eager"},
    "test_tuple_axes_index_classes_in_the_given_order": {"axis1", "axis7"},
    "test_dominant_label_losses_accurate_to_their_own_magnitude": {
        "1000-30000.0", "257--1000000.0"},
    "test_every_kind_of_row": {"False-0.0-sum-*", "True-0.001-sum-*"},
    "test_label_smoothing_every_kind_of_row": {"none-False-0.0-0.1-long_rows_in_blocks-pass"},
    "test_jit_auto_linear_named_vocabulary_axis": {"none"},
    "test_linear_forward_mode_bfloat16_vocabulary_split": {"Explicit"},
    "test_long_rows_without_blocks_keep_rows_local": {"Explicit"},
    "test_jvp_matches_finite_differences": {"ce_int", "ce_int_none"},
    "test_loss_and_gradient_of_every_kind_of_row": {"mean"},
}


def _slow_entries(item) -> set[tuple[str, str]]:
  """The `_SLOW_VARIANTS` entries (test, id pattern) that match `item`."""
  name = getattr(item, "originalname", "")
  callspec = getattr(item, "callspec", None)
  if callspec is None:
    return set()
  return {(name, i) for i in _SLOW_VARIANTS.get(name, ())
          if callspec.id == i or (i.endswith("*") and callspec.id.startswith(i[:-1]))}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
  matched = set()
  for item in items:
    entries = _slow_entries(item)
    if entries:
      item.add_marker(pytest.mark.slow)
      matched |= entries
  # On a collection of the whole suite, an entry that matches no test (one
  # renamed) is an error rather than a variant silently back in the default
  # suite.
  whole = (config.args_source == pytest.Config.ArgsSource.TESTPATHS
           and not config.option.keyword and not config.option.deselect)
  stale = {(n, i) for n, ids in _SLOW_VARIANTS.items() for i in ids} - matched
  if whole and stale:
    raise pytest.UsageError(
        f"tests/conftest.py: _SLOW_VARIANTS entries that match no test: {sorted(stale)}")
