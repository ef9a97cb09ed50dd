"""A character-level language model whose head loss is `jaxce.linear_cross_entropy`.

The text ships with Python itself: the source of the standard library's
`textwrap` module (about 20,000 characters, 90 distinct ones; nothing to
download). The model reads the previous CONTEXT characters, embeds each one,
and an MLP turns them into a hidden state h [B, D]; the head is a [D, V]
kernel and a bias over the V characters. The loss

    jaxce.linear_cross_entropy(h, kernel, labels, bias=bias, chunk_size=CHUNK)

equals the cross-entropy of `h @ kernel + bias`, computed over vocabulary
chunks, so the [B, V] logits are never materialized (at V = 90 that saves
nothing; at an LLM's V = 128k it saves gigabytes).

The model is trained twice from the same initialization on the same batches:
with jaxce, and with optax's `softmax_cross_entropy_with_integer_labels` on
materialized logits. The two loss curves are printed side by side; they agree
to float32 rounding.

Run:  python examples/char_lm.py     (needs optax)
"""

from __future__ import annotations

import functools
import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce

CONTEXT = 8  # characters of context
EMBED = 16
HIDDEN = 128
DIM = 64  # size of the hidden state h fed to the head
CHUNK = 32  # vocabulary chunk of linear_cross_entropy (does not divide V: any size works)


def load_text() -> tuple[np.ndarray, list[str]]:
  """The characters of textwrap.py as int32 ids, and the id -> character table."""
  text = pathlib.Path(textwrap.__file__).read_text(encoding="utf-8")
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  return np.array([index[c] for c in text], np.int32), chars


def init_params(key: jax.Array, vocab: int) -> dict:
  k = jax.random.split(key, 4)
  return {
      "embed": jax.random.normal(k[0], (vocab, EMBED), jnp.float32),
      "w1": jax.random.normal(k[1], (CONTEXT * EMBED, HIDDEN), jnp.float32)
            / np.sqrt(CONTEXT * EMBED),
      "b1": jnp.zeros((HIDDEN,), jnp.float32),
      "w2": jax.random.normal(k[2], (HIDDEN, DIM), jnp.float32) / np.sqrt(HIDDEN),
      "kernel": jax.random.normal(k[3], (DIM, vocab), jnp.float32) / np.sqrt(DIM),
      "bias": jnp.zeros((vocab,), jnp.float32),
  }


def hidden_state(params: dict, context: jax.Array) -> jax.Array:
  """context [B, CONTEXT] character ids -> h [B, DIM]."""
  e = params["embed"][context].reshape(context.shape[0], CONTEXT * EMBED)
  return jnp.tanh(jnp.tanh(e @ params["w1"] + params["b1"][None]) @ params["w2"])


def jaxce_loss(params: dict, context: jax.Array, labels: jax.Array) -> jax.Array:
  h = hidden_state(params, context)
  return jaxce.linear_cross_entropy(h, params["kernel"], labels, bias=params["bias"],
                                    chunk_size=CHUNK)


def optax_loss(params: dict, context: jax.Array, labels: jax.Array) -> jax.Array:
  logits = hidden_state(params, context) @ params["kernel"] + params["bias"][None]  # [B, V]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_step(loss, optimizer, params, opt_state, context, labels):
  value, grads = jax.value_and_grad(loss)(params, context, labels)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value


def batches(ids: np.ndarray, steps: int, batch_size: int, seed: int):
  """`steps` batches of (context [B, CONTEXT], next character [B]) at random positions."""
  rng = np.random.default_rng(seed)
  offsets = np.arange(CONTEXT)
  for _ in range(steps):
    start = rng.integers(0, len(ids) - CONTEXT, batch_size)
    yield ids[start[:, None] + offsets], ids[start + CONTEXT]


def train(loss, ids: np.ndarray, vocab: int, steps: int, seed: int, batch_size: int,
          learning_rate: float):
  params = init_params(jax.random.key(seed), vocab)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)
  losses = []
  for context, labels in batches(ids, steps, batch_size, seed + 1):
    params, opt_state, value = train_step(loss, optimizer, params, opt_state,
                                          jnp.asarray(context), jnp.asarray(labels))
    losses.append(float(value))
  return params, losses


def sample(params: dict, prompt: np.ndarray, length: int, key: jax.Array) -> np.ndarray:
  """Samples `length` characters after `prompt` (at least CONTEXT ids)."""
  out = list(prompt)
  for k in jax.random.split(key, length):
    h = hidden_state(params, jnp.asarray(np.array(out[-CONTEXT:], np.int32))[None])
    logits = h @ params["kernel"] + params["bias"][None]
    out.append(int(jax.random.categorical(k, logits[0])))
  return np.array(out[len(prompt):])


def main(steps: int = 500, seed: int = 0, batch_size: int = 256, learning_rate: float = 3e-3,
         log_every: int = 100, verbose: bool = True) -> dict:
  """Trains with jaxce and with optax; returns both loss curves."""
  ids, chars = load_text()
  vocab = len(chars)
  params, losses = train(jaxce_loss, ids, vocab, steps, seed, batch_size, learning_rate)
  _, optax_losses = train(optax_loss, ids, vocab, steps, seed, batch_size, learning_rate)
  if verbose:
    print(f"text: textwrap.py, {len(ids)} characters, vocabulary V={vocab}")
    print(f"uniform guess: loss {np.log(vocab):.3f}")
    print("step   jaxce loss   optax loss")
    for step in range(0, steps, log_every):
      print(f"{step:4d}   {losses[step]:10.6f}   {optax_losses[step]:10.6f}")
    print(f"{steps - 1:4d}   {losses[-1]:10.6f}   {optax_losses[-1]:10.6f}")
    text = "".join(chars[i] for i in sample(params, ids[:CONTEXT], 200, jax.random.key(seed)))
    print("sample:\n" + "".join(chars[i] for i in ids[:CONTEXT]) + text)
  return {"losses": losses, "optax_losses": optax_losses, "first_loss": losses[0],
          "last_loss": losses[-1], "vocab": vocab}


if __name__ == "__main__":
  main()
