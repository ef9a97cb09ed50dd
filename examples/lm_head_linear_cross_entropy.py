"""A tiny language-model loop whose LM head loss is `jaxce.linear_cross_entropy`.

`linear_cross_entropy(h, kernel, labels)` is `cross_entropy(h @ kernel, labels)`
computed over vocabulary chunks, so the [tokens, vocab] logits are never
materialized, in the forward or in the backward.

The model: token embedding, one pre-norm MLP block with a residual, a final
RMSNorm, and the LM head kernel [D, V]. Parameters are float32 ("master"
weights) and are cast to bfloat16 for the forward and backward; the loss is
returned in float32. The head is untied by default; `tie_embeddings=True`
uses the embedding table [V, D] as the head through `embed.T`.

The data: sequences that follow next = (3 * token + 1) % V, with random
lengths, padded with PAD and labeled -100 (`ignore_index`) past their end.

Run:  python examples/lm_head_linear_cross_entropy.py
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import optax

import jaxce

VOCAB = 4096
DIM = 128
HIDDEN = 256
SEQ_LEN = 32
BATCH = 16
PAD = 0
IGNORE = -100
CHUNK = 1024  # vocabulary chunk: the largest loss temporary is float32 [B * T, CHUNK]
Z_LOSS = 1e-4
COMPUTE = jnp.bfloat16


def next_token(tokens: jax.Array) -> jax.Array:
  return (tokens * 3 + 1) % VOCAB


@jax.jit
def make_batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (inputs, labels), both int32 [BATCH, SEQ_LEN]."""
  k_start, k_len = jax.random.split(key)
  start = jax.random.randint(k_start, (BATCH,), 0, VOCAB, dtype=jnp.int32)

  def body(token, _):
    return next_token(token), token

  _, seq = jax.lax.scan(body, start, None, length=SEQ_LEN + 1)  # [SEQ_LEN + 1, BATCH]
  seq = seq.T
  inputs, labels = seq[:, :-1], seq[:, 1:]
  lengths = jax.random.randint(k_len, (BATCH, 1), SEQ_LEN // 2, SEQ_LEN + 1, dtype=jnp.int32)
  valid = jnp.arange(SEQ_LEN, dtype=jnp.int32)[None, :] < lengths
  return jnp.where(valid, inputs, PAD), jnp.where(valid, labels, IGNORE)


def init_params(key: jax.Array, tie_embeddings: bool = False) -> dict:
  k_emb, k_up, k_down, k_head = jax.random.split(key, 4)
  params = {
      # Scaled as the head, so that `embed.T` also serves as a tied head.
      "embed": jax.random.normal(k_emb, (VOCAB, DIM), jnp.float32) / DIM**0.5,
      "norm1": jnp.ones((DIM,), jnp.float32),
      "up": jax.random.normal(k_up, (DIM, HIDDEN), jnp.float32) / DIM**0.5,
      "down": jax.random.normal(k_down, (HIDDEN, DIM), jnp.float32) / HIDDEN**0.5,
      "norm_f": jnp.ones((DIM,), jnp.float32),
  }
  if not tie_embeddings:
    params["head"] = jax.random.normal(k_head, (DIM, VOCAB), jnp.float32) / DIM**0.5
  return params


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
  return x32.astype(x.dtype) * scale.reshape((1,) * (x.ndim - 1) + (-1,))


def hidden_states(params: dict, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns the final hidden states [B, T, D] and the head kernel [D, V], in bf16."""
  p = jax.tree.map(lambda a: a.astype(COMPUTE), params)
  x = p["embed"][inputs]  # [B, T, D]
  y = rms_norm(x, p["norm1"])
  y = jax.nn.gelu(y @ p["up"]) @ p["down"]
  h = rms_norm(x + y, p["norm_f"])
  # Tied embeddings: the [V, D] table transposed is the [D, V] kernel.
  kernel = p["head"] if "head" in p else p["embed"].T
  return h, kernel


def loss_fn(params: dict, inputs: jax.Array, labels: jax.Array) -> jax.Array:
  h, kernel = hidden_states(params, inputs)
  # Replaces: jaxce.cross_entropy(h @ kernel, labels, z_loss=1e-4), which would hold
  # [B, T, V] logits (and their gradient) in memory.
  return jaxce.linear_cross_entropy(
      h, kernel, labels, ignore_index=IGNORE, z_loss=Z_LOSS, chunk_size=CHUNK)


@functools.partial(jax.jit, static_argnums=0)
def train_step(optimizer, params, opt_state, inputs, labels):
  loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@jax.jit
def token_accuracy(params: dict, inputs: jax.Array, labels: jax.Array) -> jax.Array:
  """Accuracy of argmax predictions on the non-padding tokens. (Evaluation
  materializes the logits; at this size that is fine.)"""
  h, kernel = hidden_states(params, inputs)
  logits = jnp.einsum("btd,dv->btv", h, kernel, preferred_element_type=jnp.float32)
  hit = (jnp.argmax(logits, axis=-1).astype(labels.dtype) == labels) & (labels != IGNORE)
  return jnp.sum(hit).astype(jnp.float32) / jnp.sum(labels != IGNORE).astype(jnp.float32)


def loss_memory(num_tokens: int, dim: int, vocab: int, chunk: int | None) -> dict:
  """Compiled temporary memory (bytes) of value_and_grad of the LM head loss,
  over (h, kernel), for bf16 h [num_tokens, dim] and kernel [dim, vocab]:
  `linear_cross_entropy` vs `cross_entropy` on materialized logits."""
  h = jax.ShapeDtypeStruct((num_tokens, dim), COMPUTE)
  kernel = jax.ShapeDtypeStruct((dim, vocab), COMPUTE)
  labels = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)

  def fused(h, kernel, labels):
    return jaxce.linear_cross_entropy(h, kernel, labels, z_loss=Z_LOSS, chunk_size=chunk)

  def materialized(h, kernel, labels):
    return jaxce.cross_entropy(h @ kernel, labels, z_loss=Z_LOSS)

  def temp_bytes(f):
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, kernel, labels).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  return {
      "fused": temp_bytes(fused),
      "materialized": temp_bytes(materialized),
      "logits": num_tokens * vocab * jnp.dtype(COMPUTE).itemsize,
  }


def print_memory(num_tokens: int, dim: int, vocab: int, chunk: int | None, mem: dict) -> None:
  mib = 2.0**20
  print(f"value_and_grad temp memory, N={num_tokens} D={dim} V={vocab} chunk={chunk}:"
        f" linear_cross_entropy {mem['fused'] / mib:.1f} MiB,"
        f" materialized logits {mem['materialized'] / mib:.1f} MiB"
        f" (bf16 logits alone: {mem['logits'] / mib:.1f} MiB)")


def main(
    steps: int = 200,
    seed: int = 0,
    learning_rate: float = 1e-2,
    tie_embeddings: bool = False,
    log_every: int = 50,
    verbose: bool = True,
    report_memory: bool = True,
) -> dict:
  """Trains the tiny LM; returns the loss history, token accuracy and, if
  `report_memory`, the compiled loss temp memory for one training batch."""
  key_init, key_data, key_eval = jax.random.split(jax.random.key(seed), 3)
  params = init_params(key_init, tie_embeddings)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)

  memory = None
  if report_memory:
    shape = (BATCH * SEQ_LEN, DIM, VOCAB, CHUNK)  # one training batch
    memory = loss_memory(*shape)
    if verbose:
      print_memory(*shape, memory)
      shape = (8192, 1024, 32768, None)  # a larger, LLM-like head: compiled only, never run
      print_memory(*shape, loss_memory(*shape))

  losses = []
  start = time.perf_counter()
  for step, key in enumerate(jax.random.split(key_data, steps)):
    inputs, labels = make_batch(key)
    params, opt_state, loss = train_step(optimizer, params, opt_state, inputs, labels)
    losses.append(float(loss))
    if verbose and (step % log_every == 0 or step == steps - 1):
      print(f"step {step:4d}  loss {losses[-1]:.4f}")
  seconds = time.perf_counter() - start

  accuracy = float(token_accuracy(params, *make_batch(key_eval)))
  if verbose:
    print(f"{steps} steps in {seconds:.1f} s; next-token accuracy {accuracy:.3f}")
  return {
      "losses": losses,
      "first_loss": losses[0],
      "last_loss": losses[-1],
      "accuracy": accuracy,
      "memory": memory,
  }


if __name__ == "__main__":
  main()
