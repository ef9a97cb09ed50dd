"""A `flax.linen` MLP trained on scikit-learn's bundled digits with `jaxce.cross_entropy`.

The data: `sklearn.datasets.load_digits()`, 1797 8x8 images of handwritten
digits that ship inside scikit-learn (no download). A third of the training
labels are hidden (set to -100): `ignore_index` drops them from the loss and
from the mean's denominator, and `label_smoothing=0.1` softens the targets.

The same model is trained twice from the same initialization on the same
batches: once with `jaxce.cross_entropy`, once with the same loss written with
optax (smoothing, masking and the empty-batch guard by hand). The two loss
curves are printed side by side; they agree to float32 rounding.

Run:  python examples/flax_linen_digits.py     (needs flax, optax, scikit-learn)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jaxce

NUM_CLASSES = 10
IGNORE = -100  # jaxce's default ignore_index, as in PyTorch
LABEL_SMOOTHING = 0.1


def load_data(seed: int, hidden_fraction: float = 1 / 3):
  """Returns (x_train, y_train, x_test, y_test); y_train has a fraction of its
  labels replaced by IGNORE."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(x))
  x, y = x[order], y[order]
  n_train = 1500
  y_train = y[:n_train].copy()
  y_train[rng.random(n_train) < hidden_fraction] = IGNORE
  return x[:n_train], y_train, x[n_train:], y[n_train:]


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(NUM_CLASSES)(x)


def jaxce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jaxce.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=LABEL_SMOOTHING)


def optax_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The same loss with optax: smoothing, masking and the empty-batch guard by hand."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, NUM_CLASSES), LABEL_SMOOTHING)
  per_example = optax.softmax_cross_entropy(logits, targets)
  mask = labels != IGNORE
  total = jnp.sum(jnp.where(mask, per_example, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def train_step(model, optimizer, loss, params, opt_state, x, labels):
  def objective(params):
    return loss(model.apply(params, x), labels)

  value, grads = jax.value_and_grad(objective)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value


def train(loss, data, steps: int, seed: int, batch_size: int, learning_rate: float):
  """Trains a fresh MLP with `loss`; the same seed gives the same initial
  parameters and batches whatever the loss. Returns (params, losses)."""
  x_train, y_train, _, _ = data
  model = MLP()
  params = model.init(jax.random.key(seed), jnp.zeros((1, x_train.shape[1]), jnp.float32))
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed + 1)
  losses = []
  for _ in range(steps):
    idx = rng.integers(0, len(x_train), batch_size)
    params, opt_state, value = train_step(model, optimizer, loss, params, opt_state,
                                          jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
    losses.append(float(value))
  return params, losses


def main(steps: int = 300, seed: int = 0, batch_size: int = 128, learning_rate: float = 3e-3,
         log_every: int = 50, verbose: bool = True) -> dict:
  """Trains with jaxce and with optax; returns both loss curves and the test accuracy."""
  data = load_data(seed)
  params, losses = train(jaxce_loss, data, steps, seed, batch_size, learning_rate)
  _, optax_losses = train(optax_loss, data, steps, seed, batch_size, learning_rate)
  _, _, x_test, y_test = data
  predictions = jnp.argmax(MLP().apply(params, jnp.asarray(x_test)), axis=-1)
  accuracy = float(jnp.mean((predictions == jnp.asarray(y_test)).astype(jnp.float32)))
  if verbose:
    print(f"digits: {len(data[0])} train images ({np.mean(data[1] == IGNORE):.0%} unlabeled),"
          f" {len(x_test)} test images")
    print("step   jaxce loss   optax loss")
    for step in range(0, steps, log_every):
      print(f"{step:4d}   {losses[step]:10.6f}   {optax_losses[step]:10.6f}")
    print(f"{steps - 1:4d}   {losses[-1]:10.6f}   {optax_losses[-1]:10.6f}")
    print(f"test accuracy {accuracy:.3f}")
  return {"losses": losses, "optax_losses": optax_losses, "first_loss": losses[0],
          "last_loss": losses[-1], "test_accuracy": accuracy}


if __name__ == "__main__":
  main()
