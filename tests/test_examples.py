"""The scripts in examples/: a few training steps each. The digits and
character-LM examples train the same model twice, with jaxce and with optax,
and their loss curves must agree step by step.

tests/conftest.py turns on strict dtype promotion and rank promotion "raise".
The examples' own code (data, model, loss, gradient, evaluation) is traced
under both. The training loops run with standard dtype promotion, because
optax 0.2's Adam computes `b1 ** count` from a Python float and an int32 step
count, which strict promotion rejects; rank promotion stays "raise".
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

# Trains real models: opt-in (`pytest -m slow`, which .ci/run runs) to keep the default
# suite within its 5-minute budget on 2 cores.
pytestmark = pytest.mark.slow

pytest.importorskip("optax")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
  spec = importlib.util.spec_from_file_location(f"jaxce_example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def check_losses(result: dict, steps: int) -> None:
  losses = result["losses"]
  assert len(losses) == steps
  assert all(math.isfinite(loss) for loss in losses), losses
  assert result["first_loss"] == losses[0]
  assert result["last_loss"] == losses[-1]
  assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])


def test_flax_nnx_classifier():
  nnx = pytest.importorskip("flax.nnx")
  example = load_example("flax_nnx_classifier")

  # Strict promotion: data, model, jaxce loss and gradient, evaluation.
  x, y, _, _, _ = example.make_blobs(500, seed=0)
  x, y = jnp.asarray(x), jnp.asarray(y)
  model = example.MLP(example.NUM_FEATURES, example.HIDDEN, example.NUM_CLASSES, rngs=nnx.Rngs(0))
  loss, grads = nnx.jit(nnx.value_and_grad(example.loss_fn))(model, x, y)
  assert loss.dtype == jnp.float32
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  metrics = example.evaluate(model, x, y)
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
  assert float(metrics["loss"]) == pytest.approx(float(metrics["optax_loss"]), rel=1e-5)

  with jax.numpy_dtype_promotion("standard"):
    result = example.main(steps=40, verbose=False)
  check_losses(result, 40)
  assert result["test_accuracy"] > 0.5


def test_lm_head_linear_cross_entropy():
  example = load_example("lm_head_linear_cross_entropy")

  # Strict promotion: traced only (no compile), untied and tied heads.
  inputs, labels = jax.eval_shape(example.make_batch, jax.random.key(0))
  for tie in (False, True):
    params = jax.eval_shape(functools.partial(example.init_params, tie_embeddings=tie),
                            jax.random.key(0))
    loss, grads = jax.eval_shape(jax.value_and_grad(example.loss_fn), params, inputs, labels)
    assert loss.shape == ()
    assert loss.dtype == jnp.float32
    assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == jax.tree.map(
        lambda p: (p.shape, p.dtype), params)
    jax.eval_shape(example.token_accuracy, params, inputs, labels)

  # Compiled temp memory of the loss's value_and_grad for one training batch.
  memory = example.loss_memory(example.BATCH * example.SEQ_LEN, example.DIM, example.VOCAB,
                               example.CHUNK)
  assert memory["fused"] < memory["materialized"], memory

  with jax.numpy_dtype_promotion("standard"):
    result = example.main(steps=30, verbose=False, report_memory=False)
  check_losses(result, 30)
  assert result["memory"] is None


def check_matches_optax(result: dict, steps: int, rtol: float = 3e-4) -> None:
  """The loss falls, and the jaxce curve tracks the optax one from the same
  initialization and batches (float32 rounding only, so it stays close: two
  float32 losses that differ in their last bits drift apart under Adam, by
  about 1e-4 relative after 30-40 steps of the digits examples)."""
  losses, reference = result["losses"], result["optax_losses"]
  assert len(losses) == len(reference) == steps
  assert all(math.isfinite(v) for v in losses + reference)
  assert losses[0] == pytest.approx(reference[0], rel=1e-6)
  for step, (mine, theirs) in enumerate(zip(losses, reference, strict=True)):
    assert mine == pytest.approx(theirs, rel=rtol, abs=rtol), (step, mine, theirs)
  assert sum(losses[-5:]) / 5 < 0.7 * losses[0], (losses[0], losses[-5:])


@pytest.mark.parametrize("name", ["flax_linen_digits", "equinox_digits"])
def test_digits_classifier_matches_optax(name):
  pytest.importorskip("sklearn")
  pytest.importorskip("equinox" if name.startswith("equinox") else "flax.linen")
  example = load_example(name)
  with jax.numpy_dtype_promotion("standard"):
    result = example.main(steps=40, learning_rate=1e-2, verbose=False)
  check_matches_optax(result, 40)
  assert result["test_accuracy"] > 0.6


def test_char_lm_matches_optax():
  example = load_example("char_lm")
  ids, chars = example.load_text()  # from Python's own textwrap.py
  assert len(ids) > 10_000
  assert ids.min() >= 0
  assert ids.max() == len(chars) - 1
  with jax.numpy_dtype_promotion("standard"):
    result = example.main(steps=40, learning_rate=1e-2, verbose=False)
  check_matches_optax(result, 40)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flax_linen_digits", "equinox_digits", "char_lm"])
def test_full_training_run_matches_optax(name):
  """Each comparison example at its default length: the curves still agree
  after hundreds of Adam steps, and the models learn."""
  pytest.importorskip("sklearn")
  pytest.importorskip("equinox" if name.startswith("equinox") else "flax.linen")
  example = load_example(name)
  with jax.numpy_dtype_promotion("standard"):
    result = example.main(verbose=False)
  check_matches_optax(result, len(result["losses"]), rtol=1e-3)
  if "test_accuracy" in result:
    assert result["test_accuracy"] > 0.9
  else:  # the character LM: well below a uniform guess over the vocabulary
    assert result["last_loss"] < 0.5 * math.log(result["vocab"])
