"""Typed use of jaxce's public API, for type checkers (not a test module).

`.ci/typecheck` runs `mypy --strict` on this file: it must pass. The lines
marked "must be rejected" carry `# type: ignore[code]`; strict mode reports an
ignore that silences nothing, so the file passes only if the checker rejects
those lines for that reason. Nothing here runs at import.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxce


def every_public_function(logits: jax.Array, labels: jax.Array) -> list[jax.Array]:
  probs = jax.nn.softmax(logits)
  host_logits = np.zeros((2, 3), np.float32)  # NumPy arrays and scalars are ArrayLike
  x = jnp.ones((4, 8), jnp.bfloat16)
  kernel = jnp.ones((8, 16), jnp.bfloat16)
  return [
      jaxce.cross_entropy(logits, labels),
      jaxce.cross_entropy(host_logits, np.array([0, 2]), weight=np.array([1.0, 2.0, 0.5]),
                          reduction="sum", ignore_index=None),
      jaxce.cross_entropy(logits, probs, reduction="none", label_smoothing=0.1, z_loss=1e-4,
                          axis=-1, where=jnp.ones(logits.shape[-1], bool)),
      jaxce.nll_loss(jaxce.log_softmax(logits, axis=-1), labels, reduction="mean"),
      jaxce.binary_cross_entropy_with_logits(logits, probs, pos_weight=jnp.ones(3), weight=None),
      jaxce.binary_cross_entropy(probs, probs, weight=np.ones(3, np.float32), reduction="none"),
      jaxce.logsumexp(logits, where=None),
      jaxce.linear_cross_entropy(x, kernel, jnp.zeros(4, jnp.int32), bias=None, softcap=30.0,
                                 chunk_size=None, class_axis_name=None),
      jaxce.linear_cross_entropy(x, kernel, np.zeros(4, np.uint8), weight=jnp.ones(16),
                                 ignore_index=jnp.int32(-100), reduction="sum",
                                 label_smoothing=0.1, z_loss=1e-4, chunk_size=8,
                                 forward_mode=True),
      jaxce.linear_cross_entropy(x, kernel, jnp.zeros(4, jnp.int32), backward="precompute"),
      jaxce.softmax_cross_entropy(logits, probs, axis=(0, 1)),
      jaxce.softmax_cross_entropy(logits, probs, axis=None, where=None),
      jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1),
      jaxce.sigmoid_binary_cross_entropy(logits, probs),
      jaxce.checked.cross_entropy(logits, labels, reduction="sum"),
      jaxce.checked.nll_loss(logits, labels),
      jaxce.checked.linear_cross_entropy(x, kernel, jnp.zeros(4, jnp.int32), reduction="none"),
      jaxce.checked.softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1),
  ]


def checked_step(logits: jax.Array, labels: jax.Array) -> jax.Array:
  def loss_fn(logits: jax.Array, labels: jax.Array) -> jax.Array:
    jaxce.checked.check_labels(labels, logits.shape[-1], ignore_index=None)
    return jaxce.checked.cross_entropy(logits, labels)

  # raising keeps the wrapped function's signature.
  step: Callable[[jax.Array, jax.Array], jax.Array] = jaxce.checked.raising(loss_fn)
  return step(logits, labels)


def rejected(logits: jax.Array, labels: jax.Array) -> None:
  jaxce.cross_entropy(logits, labels, reduction="avg")  # type: ignore[arg-type]  # must be rejected
  jaxce.cross_entropy(logits, labels, None)  # type: ignore[call-arg]  # must be rejected: keyword-only
  jaxce.linear_cross_entropy(logits, logits, labels, chunk_size=1.5)  # type: ignore[arg-type]  # must be rejected
  jaxce.binary_cross_entropy(logits, labels, reduction="avg")  # type: ignore[arg-type]  # must be rejected
  jaxce.linear_cross_entropy(logits, logits, labels, forward_mode=None)  # type: ignore[arg-type]  # must be rejected
  jaxce.checked.cross_entropy(logits, labels, reduction="avg")  # type: ignore[arg-type]  # must be rejected
  jaxce.linear_cross_entropy(logits, logits, labels, backward="fast")  # type: ignore[arg-type]  # must be rejected
