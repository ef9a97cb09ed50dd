"""Train a small Flax NNX MLP classifier with `jaxce.cross_entropy` as the loss.

The data are Gaussian blobs: 10 classes in 16 dimensions. 30% of the training
labels are hidden (set to -100, "unlabeled"); `jaxce.cross_entropy` skips
them through `ignore_index`, and they are left out of the mean's denominator,
so no masking code is needed. The loss also uses label smoothing 0.1.

Run:  python examples/flax_nnx_classifier.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxce

NUM_CLASSES = 10
NUM_FEATURES = 16
HIDDEN = 64
IGNORE = -100  # jaxce's default ignore_index, as in PyTorch
LABEL_SMOOTHING = 0.1


def make_blobs(num_points: int, seed: int, unlabeled_fraction: float = 0.3):
  """Gaussian blobs with one center per class.

  Returns (x_train, y_train, y_train_true, x_test, y_test): `y_train` has a
  fraction of its labels replaced by IGNORE; `y_train_true` keeps them all.
  """
  rng = np.random.default_rng(seed)
  centers = rng.normal(0.0, 2.0, (NUM_CLASSES, NUM_FEATURES))
  y = rng.integers(0, NUM_CLASSES, num_points)
  x = centers[y] + rng.normal(0.0, 1.5, (num_points, NUM_FEATURES))
  x = x.astype(np.float32)
  y = y.astype(np.int32)

  n_train = num_points * 4 // 5
  x_train, y_train_true = x[:n_train], y[:n_train]
  x_test, y_test = x[n_train:], y[n_train:]
  hidden = rng.random(n_train) < unlabeled_fraction
  y_train = np.where(hidden, IGNORE, y_train_true).astype(np.int32)
  return x_train, y_train, y_train_true, x_test, y_test


class MLP(nnx.Module):

  def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(din, dhidden, rngs=rngs)
    self.linear2 = nnx.Linear(dhidden, dhidden, rngs=rngs)
    self.head = nnx.Linear(dhidden, dout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.linear1(x))
    x = nnx.relu(self.linear2(x))
    return self.head(x)


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  # Replaces (optax has no ignore_index; `optax_loss` below adds the masking):
  #   optax.softmax_cross_entropy(
  #       logits, optax.smooth_labels(jax.nn.one_hot(labels, NUM_CLASSES), 0.1)).mean()
  return jaxce.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING, ignore_index=IGNORE)


def loss_fn(model: MLP, x: jax.Array, labels: jax.Array) -> jax.Array:
  return classification_loss(model(x), labels)


def optax_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The same loss written with optax, for comparison: smoothing by hand,
  masking by hand, and a guard for a batch with no labeled example."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, NUM_CLASSES), LABEL_SMOOTHING)
  per_example = optax.softmax_cross_entropy(logits, targets)
  mask = labels != IGNORE
  total = jnp.sum(jnp.where(mask, per_example, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, labels: jax.Array):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, labels)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def evaluate(model: MLP, x: jax.Array, labels: jax.Array) -> dict:
  """jaxce's loss, the optax version of it, and the accuracy on labeled points."""
  logits = model(x)
  labeled = labels != IGNORE
  hits = (jnp.argmax(logits, axis=-1).astype(labels.dtype) == labels) & labeled
  return {
      "loss": classification_loss(logits, labels),
      "optax_loss": optax_loss(logits, labels),
      "accuracy": jnp.sum(hits).astype(jnp.float32) / jnp.sum(labeled).astype(jnp.float32),
  }


def main(
    steps: int = 300,
    seed: int = 0,
    batch_size: int = 256,
    num_points: int = 4000,
    log_every: int = 50,
    verbose: bool = True,
) -> dict:
  """Trains the classifier; returns the loss history and accuracies."""
  x_train, y_train, y_train_true, x_test, y_test = make_blobs(num_points, seed)
  model = MLP(NUM_FEATURES, HIDDEN, NUM_CLASSES, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=1e-4), wrt=nnx.Param)

  if verbose:
    print(f"train {len(x_train)} points ({np.mean(y_train == IGNORE):.0%} unlabeled),"
          f" test {len(x_test)} points")
    first = evaluate(model, jnp.asarray(x_train[:batch_size]), jnp.asarray(y_train[:batch_size]))
    print(f"initial loss on one batch: jaxce {float(first['loss']):.6f},"
          f" optax {float(first['optax_loss']):.6f}")

  rng = np.random.default_rng(seed + 1)
  losses = []
  start = time.perf_counter()
  for step in range(steps):
    idx = rng.integers(0, len(x_train), batch_size)
    loss = train_step(model, optimizer, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
    losses.append(float(loss))
    if verbose and (step % log_every == 0 or step == steps - 1):
      print(f"step {step:4d}  loss {losses[-1]:.4f}")
  seconds = time.perf_counter() - start

  test_acc = float(evaluate(model, jnp.asarray(x_test), jnp.asarray(y_test))["accuracy"])
  # The hidden labels are known here: how well are the unlabeled points classified?
  hidden = y_train == IGNORE
  unlabeled_acc = float(
      evaluate(model, jnp.asarray(x_train[hidden]), jnp.asarray(y_train_true[hidden]))["accuracy"])
  if verbose:
    print(f"{steps} steps in {seconds:.1f} s")
    print(f"test accuracy {test_acc:.3f}, accuracy on the unlabeled train points"
          f" {unlabeled_acc:.3f}")
  return {
      "losses": losses,
      "first_loss": losses[0],
      "last_loss": losses[-1],
      "test_accuracy": test_acc,
      "unlabeled_accuracy": unlabeled_acc,
  }


if __name__ == "__main__":
  main()
