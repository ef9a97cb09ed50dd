"""Benchmark cases: inputs, implementations, a bytes / FLOP model and a
float64 NumPy reference for each.

A `Case` gives, for one shape and dtype:

* `make_inputs`: the arguments (JAX arrays, every implementation gets the same).
* `impls`: the implementations, jaxce first. Each has a forward (what a user
  calls) and a scalar `loss` that is differentiated with `jax.value_and_grad`
  w.r.t. `argnums` for the forward+backward timing.
* `fwd_bytes` / `fwd_bwd_bytes`: the compulsory memory traffic of an ideal
  implementation (see `BYTES_MODEL`), for achieved bytes/s.
* `reference`: float64 NumPy values computed from the same (already rounded)
  inputs, written from the formulas, with no JAX. The scalar losses are
  computed over all rows (in row blocks, to bound host memory); gradients, and
  log_softmax's output, over the first `rows` rows only (rows are
  independent, so that is representative; the mean's 1/N factor is applied).
  For linear_ce, dkernel is compared on its first `rows` columns. Shapes whose
  `ref_work` exceeds the run's limit are checked on `head(inputs, rows)`
  instead: the implementations run once more on the first rows only.
* `out_view` / `grad_view`: the matching parts of an implementation's
  output and gradient, as float64 NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce

F32 = jnp.float32
LABEL_BYTES = 4  # int32 labels
REF_BLOCK_ELEMENTS = 2**22  # float64 elements per block of the host reference


class Shape(NamedTuple):
  n: int  # tokens (rows)
  c: int  # classes (the vocabulary V for linear_ce)
  d: int | None = None  # hidden size, linear_ce only

  def label(self) -> str:
    if self.d is None:
      return f"N={self.n} C={self.c}"
    return f"N={self.n} D={self.d} V={self.c}"


@dataclass(frozen=True)
class Impl:
  name: str
  fwd: Callable[..., Any]  # the forward as a user calls it
  loss: Callable[..., Any]  # scalar, for jax.value_and_grad


@dataclass(frozen=True)
class Case:
  name: str
  title: str
  argnums: int | tuple[int, ...]  # differentiated arguments
  make_inputs: Callable[[Shape, Any, jax.Array], tuple]
  impls: tuple[Impl, ...]  # jaxce first
  fwd_bytes: Callable[[Shape, int], int]
  fwd_bwd_bytes: Callable[[Shape, int], int]
  reference: Callable[[tuple, int], tuple[np.ndarray, tuple[np.ndarray, ...]]]
  out_view: Callable[[Any, int], np.ndarray]
  grad_view: Callable[[Any, int], tuple[np.ndarray, ...]]
  # Flop model (fwd, fwd+bwd) for compute-bound cases; None: memory-bound.
  flops: Callable[[Shape], tuple[int, int]] | None = None
  copy_arg: int | None = 0  # argument whose copy bandwidth is the roofline
  row_args: tuple[int, ...] = (0, 1)  # arguments with the N rows first (sliced for checks)
  # Host float64 work of the full reference, in units of logits elements.
  ref_work: Callable[[Shape], int] = lambda s: s.n * s.c
  # The sweeps this case runs in (SWEEPS); linear_ce has no image shapes and
  # the (N, C, H, W) layout no LM shapes.
  sweeps: tuple[str, ...] = ("classes", "tokens", "image")
  # Positions per image of the (N, C, H, W) layout: N must be a multiple.
  positions_per_row: int = 1
  head_fn: Callable[[tuple, int], tuple] | None = None

  def head(self, inputs: tuple, rows: int) -> tuple:
    """The inputs restricted to (at least) their first `rows` rows."""
    if self.head_fn is not None:
      return self.head_fn(inputs, rows)
    return tuple(a[:rows] if i in self.row_args else a for i, a in enumerate(inputs))


# The sweeps: "classes" (class counts at a fixed token count; LM vocabularies),
# "tokens" (token counts at a fixed class count), "image" (N x C pairs of
# image classification: few classes, many examples).
SWEEPS = ("classes", "tokens", "image")
IMAGE_HW = (16, 16)  # spatial size of the (N, C, H, W) case: N = batch * 16 * 16


# Bytes model, stated in the output. S = N*C*itemsize (one logits-sized array),
# L = 4*N (int32 labels). Only compulsory traffic: each input read once, each
# output written once; no intermediate is counted (an ideal fused kernel keeps
# per-row statistics in registers / cache).
BYTES_MODEL = {
    "ce_int": {"fwd": "S + L (read logits, labels)",
               "fwd_bwd": "2S + L (read logits and labels, write dlogits)"},
    "ce_nchw": {"fwd": "S + L (read logits, labels)",
                "fwd_bwd": "2S + L (read logits and labels, write dlogits)"},
    "ce_smooth": {"fwd": "S + L (read logits, labels)",
                  "fwd_bwd": "2S + L (read logits and labels, write dlogits)"},
    "ce_prob": {"fwd": "2S (read logits, targets)",
                "fwd_bwd": "3S (read logits and targets, write dlogits)"},
    "nll": {"fwd": "L + N*itemsize (read labels and the N picked log-probs)",
            "fwd_bwd": "S + L + N*itemsize (forward reads, write dlog_probs)"},
    "bce": {"fwd": "2S (read logits, targets)",
            "fwd_bwd": "3S (read logits and targets, write dlogits)"},
    "log_softmax": {"fwd": "2S (read x, write the output)",
                    "fwd_bwd": "3S (read x and the cotangent, write dx;"
                               " the output is not needed)"},
    "linear_ce": {"fwd": "(N*D + D*V)*itemsize + L (read x, kernel, labels)",
                  "fwd_bwd": "2*(N*D + D*V)*itemsize + L (also write dx, dkernel);"
                             " FLOPs: 2NDV forward, 6NDV forward+backward (useful"
                             " work; jaxce's recomputation of the logits is not"
                             " counted)"},
}


# ---------------------------------------------------------------------------
# Inputs.


def _normal(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(key, shape, F32)).astype(dtype)


def _labels(key, n, c):
  return jax.random.randint(key, (n,), 0, c, jnp.int32)


def _logits_labels(s: Shape, dtype, key):
  k1, k2 = jax.random.split(key)
  return _normal(k1, (s.n, s.c), dtype, 2.0), _labels(k2, s.n, s.c)


def _logits_probs(s: Shape, dtype, key):
  k1, k2 = jax.random.split(key)
  probs = jax.nn.softmax(_normal(k2, (s.n, s.c), F32, 2.0), axis=-1)
  return _normal(k1, (s.n, s.c), dtype, 2.0), probs.astype(dtype)


def _log_probs_labels(s: Shape, dtype, key):
  k1, k2 = jax.random.split(key)
  log_probs = jax.nn.log_softmax(_normal(k1, (s.n, s.c), F32, 2.0), axis=-1)
  return log_probs.astype(dtype), _labels(k2, s.n, s.c)


def _logits_binary(s: Shape, dtype, key):
  k1, k2 = jax.random.split(key)
  targets = jax.random.uniform(k2, (s.n, s.c), F32)
  return _normal(k1, (s.n, s.c), dtype, 2.0), targets.astype(dtype)


def _x_cotangent(s: Shape, dtype, key):
  k1, k2 = jax.random.split(key)
  return _normal(k1, (s.n, s.c), dtype, 2.0), _normal(k2, (s.n, s.c), dtype)


def _nchw_inputs(s: Shape, dtype, key):
  """[B, C, H, W] logits and [B, H, W] labels with B * H * W = N positions."""
  k1, k2 = jax.random.split(key)
  b = s.n // (IMAGE_HW[0] * IMAGE_HW[1])
  x = _normal(k1, (b, s.c, *IMAGE_HW), dtype, 2.0)
  y = jax.random.randint(k2, (b, *IMAGE_HW), 0, s.c, jnp.int32)
  return x, y


def _nchw_head(inputs, rows):
  x, y = inputs
  b = -(-rows // (IMAGE_HW[0] * IMAGE_HW[1]))
  return x[:b], y[:b]


def _linear_inputs(s: Shape, dtype, key):
  k1, k2, k3 = jax.random.split(key, 3)
  x = _normal(k1, (s.n, s.d), dtype)
  kernel = _normal(k2, (s.d, s.c), dtype, 2.0 / np.sqrt(s.d))  # logits ~ N(0, 4)
  return x, kernel, _labels(k3, s.n, s.c)


# ---------------------------------------------------------------------------
# Implementations.


def _naive_ce(logits, labels):
  log_probs = jax.nn.log_softmax(logits.astype(F32), axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None], -1).mean()


def _naive_ce_nchw(logits, labels):
  log_probs = jax.nn.log_softmax(logits.astype(F32), axis=1)
  return -jnp.take_along_axis(log_probs, labels[:, None], 1).mean()


def _naive_nll(log_probs, labels):
  return -jnp.take_along_axis(log_probs, labels[:, None], -1).astype(F32).mean()


def _optax_int(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# label_smoothing of the `ce_smooth` case (torchvision's classification recipes').
SMOOTHING = 0.1


def _optax_smooth(logits, labels):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
                                SMOOTHING)
  return optax.softmax_cross_entropy(logits, targets).mean()


def _dot_cotangent(log_softmax):
  # The scalar whose gradient is log_softmax's VJP with cotangent `ct`.
  return lambda x, ct: jnp.sum((log_softmax(x) * ct).astype(F32))


def _impl(name, fwd, loss=None):
  return Impl(name, fwd, fwd if loss is None else loss)


# ---------------------------------------------------------------------------
# float64 references.


def _f64(a) -> np.ndarray:
  return np.asarray(a).astype(np.float64)


def _blocks(n: int, c: int):
  rows = max(1, REF_BLOCK_ELEMENTS // max(c, 1))
  for start in range(0, n, rows):
    yield start, min(n, start + rows)


def _lse(z: np.ndarray) -> np.ndarray:
  m = z.max(axis=-1, keepdims=True)
  return m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _softmax(z: np.ndarray) -> np.ndarray:
  return np.exp(z - _lse(z))


def _one_hot(labels: np.ndarray, c: int) -> np.ndarray:
  out = np.zeros((labels.shape[0], c))
  out[np.arange(labels.shape[0]), labels] = 1.0
  return out


def _ref_ce_int(inputs, rows):
  x, y = inputs
  n, c = x.shape
  total = 0.0
  for a, b in _blocks(n, c):
    z = _f64(x[a:b])
    total += float(np.sum(_lse(z)[:, 0] - z[np.arange(b - a), y[a:b]]))
  z = _f64(x[:rows])
  grad = (_softmax(z) - _one_hot(y[:rows], c)) / n
  return np.float64(total / n), (grad,)


def _ref_ce_smooth(inputs, rows):
  """PyTorch's formula: (1 - eps) * (lse - z_y) + eps * (lse - mean_c z_c)."""
  x, y = inputs
  n, c = x.shape
  eps = SMOOTHING
  total = 0.0
  for a, b in _blocks(n, c):
    z = _f64(x[a:b])
    lse = _lse(z)[:, 0]
    total += float(np.sum((1 - eps) * (lse - z[np.arange(b - a), y[a:b]])
                          + eps * (lse - z.mean(axis=-1))))
  z = _f64(x[:rows])
  grad = (_softmax(z) - (1 - eps) * _one_hot(y[:rows], c) - eps / c) / n
  return np.float64(total / n), (grad,)


def _channels_last(x: np.ndarray) -> np.ndarray:
  """[B, C, H, W] -> [B * H * W, C]: the positions as rows."""
  return np.moveaxis(np.asarray(x), 1, -1).reshape(-1, x.shape[1])


def _ref_ce_nchw(inputs, rows):
  x, y = inputs
  return _ref_ce_int((_channels_last(x), np.asarray(y).reshape(-1)), rows)


def _ref_ce_prob(inputs, rows):
  x, t = inputs
  n, c = x.shape
  total = 0.0
  for a, b in _blocks(n, c):
    z, tb = _f64(x[a:b]), _f64(t[a:b])
    total += float(np.sum(tb * (_lse(z) - z)))
  z, tb = _f64(x[:rows]), _f64(t[:rows])
  # d/dz sum_c t_c (lse - z_c) = softmax * sum_c t_c - t (bf16 targets need
  # not sum to 1 exactly).
  grad = (_softmax(z) * tb.sum(axis=-1, keepdims=True) - tb) / n
  return np.float64(total / n), (grad,)


def _ref_nll(inputs, rows):
  lp, y = inputs
  n, c = lp.shape
  picked = _f64(lp[np.arange(n), y])
  return np.float64(-picked.mean()), (-_one_hot(y[:rows], c) / n,)


def _ref_bce(inputs, rows):
  x, t = inputs
  n, c = x.shape
  total = 0.0
  for a, b in _blocks(n, c):
    z, tb = _f64(x[a:b]), _f64(t[a:b])
    total += float(np.sum(tb * np.logaddexp(0.0, -z) + (1.0 - tb) * np.logaddexp(0.0, z)))
  z, tb = _f64(x[:rows]), _f64(t[:rows])
  grad = (1.0 / (1.0 + np.exp(-z)) - tb) / (n * c)
  return np.float64(total / (n * c)), (grad,)


def _ref_log_softmax(inputs, rows):
  x, ct = inputs
  z, g = _f64(x[:rows]), _f64(ct[:rows])
  out = z - _lse(z)
  return out, (g - _softmax(z) * g.sum(axis=-1, keepdims=True),)


def _ref_linear(inputs, rows):
  x, kernel, y = inputs
  n, v = x.shape[0], kernel.shape[1]
  x64, k64 = _f64(x), _f64(kernel)
  lse = np.empty(n)
  total = 0.0
  for a, b in _blocks(n, v):
    z = x64[a:b] @ k64
    lse[a:b] = _lse(z)[:, 0]
    total += float(np.sum(lse[a:b] - z[np.arange(b - a), y[a:b]]))
  # dx on the first `rows` rows.
  dz = (_softmax(x64[:rows] @ k64) - _one_hot(y[:rows], v)) / n
  dx = dz @ k64.T
  # dkernel on the first `rows` columns: needs every row's softmax there.
  cols = min(rows, v)
  dz = np.exp(x64 @ k64[:, :cols] - lse[:, None])
  hit = y < cols
  dz[np.nonzero(hit)[0], y[hit]] -= 1.0
  dk = x64.T @ (dz / n)
  return np.float64(total / n), (dx, dk)


def _scalar_view(out, rows):
  del rows
  return _f64(out)


def _rows_view(out, rows):
  return _f64(out[:rows])


def _grad_rows_view(grads, rows):
  return (_f64(grads[:rows]),)


def _nchw_grad_view(grads, rows):
  return (_f64(_channels_last(np.asarray(grads))[:rows]),)


def _linear_grad_view(grads, rows):
  dx, dk = grads
  return _f64(dx[:rows]), _f64(dk[:, :rows])


# ---------------------------------------------------------------------------
# The cases.


def _bytes_s(s: Shape, itemsize: int) -> int:
  return s.n * s.c * itemsize


def _labels_b(s: Shape) -> int:
  return s.n * LABEL_BYTES


def _int_fwd_bytes(s: Shape, b: int) -> int:
  """Integer labels' forward: read the logits and the labels."""
  return _bytes_s(s, b) + _labels_b(s)


def _int_fwd_bwd_bytes(s: Shape, b: int) -> int:
  """Integer labels' value_and_grad: also write the gradient."""
  return 2 * _bytes_s(s, b) + _labels_b(s)


def _linear_io(s: Shape, itemsize: int) -> int:
  return (s.n * s.d + s.d * s.c) * itemsize


CASES: dict[str, Case] = {
    "ce_int": Case(
        name="ce_int",
        title="cross_entropy, integer labels",
        argnums=0,
        make_inputs=_logits_labels,
        impls=(
            _impl("jaxce", lambda x, y: jaxce.cross_entropy(x, y)),
            _impl("optax", _optax_int),
            _impl("naive", _naive_ce),
        ),
        fwd_bytes=_int_fwd_bytes,
        fwd_bwd_bytes=_int_fwd_bwd_bytes,
        reference=_ref_ce_int,
        out_view=_scalar_view,
        grad_view=_grad_rows_view,
    ),
    "ce_nchw": Case(
        name="ce_nchw",
        title="cross_entropy, integer labels, (N, C, H, W) logits, axis=1",
        argnums=0,
        make_inputs=_nchw_inputs,
        impls=(
            _impl("jaxce", lambda x, y: jaxce.cross_entropy(x, y, axis=1)),
            _impl("optax", lambda x, y: optax.softmax_cross_entropy_with_integer_labels(
                x, y, axis=1).mean()),
            _impl("naive", _naive_ce_nchw),
        ),
        fwd_bytes=_int_fwd_bytes,
        fwd_bwd_bytes=_int_fwd_bwd_bytes,
        reference=_ref_ce_nchw,
        out_view=_scalar_view,
        grad_view=_nchw_grad_view,
        sweeps=("image",),
        positions_per_row=IMAGE_HW[0] * IMAGE_HW[1],
        head_fn=_nchw_head,
    ),
    "ce_smooth": Case(
        name="ce_smooth",
        title=f"cross_entropy, integer labels, label_smoothing={SMOOTHING}",
        argnums=0,
        make_inputs=_logits_labels,
        impls=(
            _impl("jaxce", lambda x, y: jaxce.cross_entropy(x, y, label_smoothing=SMOOTHING)),
            _impl("optax", _optax_smooth),
        ),
        fwd_bytes=_int_fwd_bytes,
        fwd_bwd_bytes=_int_fwd_bwd_bytes,
        reference=_ref_ce_smooth,
        out_view=_scalar_view,
        grad_view=_grad_rows_view,
    ),
    "ce_prob": Case(
        name="ce_prob",
        title="cross_entropy, probability targets",
        argnums=0,
        make_inputs=_logits_probs,
        impls=(
            _impl("jaxce", lambda x, t: jaxce.cross_entropy(x, t)),
            _impl("optax", lambda x, t: optax.softmax_cross_entropy(x, t).mean()),
        ),
        fwd_bytes=lambda s, b: 2 * _bytes_s(s, b),
        fwd_bwd_bytes=lambda s, b: 3 * _bytes_s(s, b),
        reference=_ref_ce_prob,
        out_view=_scalar_view,
        grad_view=_grad_rows_view,
    ),
    "nll": Case(
        name="nll",
        title="nll_loss",
        argnums=0,
        make_inputs=_log_probs_labels,
        impls=(
            _impl("jaxce", lambda lp, y: jaxce.nll_loss(lp, y)),
            _impl("naive", _naive_nll),
        ),
        fwd_bytes=lambda s, b: _labels_b(s) + s.n * b,
        fwd_bwd_bytes=lambda s, b: _bytes_s(s, b) + _labels_b(s) + s.n * b,
        reference=_ref_nll,
        out_view=_scalar_view,
        grad_view=_grad_rows_view,
    ),
    "bce": Case(
        name="bce",
        title="binary_cross_entropy_with_logits",
        argnums=0,
        make_inputs=_logits_binary,
        impls=(
            _impl("jaxce", lambda x, t: jaxce.binary_cross_entropy_with_logits(x, t)),
            _impl("optax", lambda x, t: optax.sigmoid_binary_cross_entropy(x, t).mean()),
        ),
        fwd_bytes=lambda s, b: 2 * _bytes_s(s, b),
        fwd_bwd_bytes=lambda s, b: 3 * _bytes_s(s, b),
        reference=_ref_bce,
        out_view=_scalar_view,
        grad_view=_grad_rows_view,
    ),
    "log_softmax": Case(
        name="log_softmax",
        title="log_softmax (fwd+bwd: sum(out * cotangent))",
        argnums=0,
        make_inputs=_x_cotangent,
        impls=(
            _impl("jaxce", lambda x, ct: jaxce.log_softmax(x),
                  _dot_cotangent(jaxce.log_softmax)),
            _impl("jax.nn", lambda x, ct: jax.nn.log_softmax(x),
                  _dot_cotangent(jax.nn.log_softmax)),
        ),
        fwd_bytes=lambda s, b: 2 * _bytes_s(s, b),
        fwd_bwd_bytes=lambda s, b: 3 * _bytes_s(s, b),
        reference=_ref_log_softmax,
        out_view=_rows_view,
        grad_view=_grad_rows_view,
    ),
    "linear_ce": Case(
        name="linear_ce",
        title="linear_cross_entropy vs materialized x @ kernel + optax",
        argnums=(0, 1),
        make_inputs=_linear_inputs,
        impls=(
            _impl("jaxce", lambda x, k, y: jaxce.linear_cross_entropy(x, k, y)),
            _impl("optax", lambda x, k, y: _optax_int(x @ k, y)),
        ),
        fwd_bytes=lambda s, b: _linear_io(s, b) + _labels_b(s),
        fwd_bwd_bytes=lambda s, b: 2 * _linear_io(s, b) + _labels_b(s),
        reference=_ref_linear,
        out_view=_scalar_view,
        grad_view=_linear_grad_view,
        flops=lambda s: (2 * s.n * s.d * s.c, 6 * s.n * s.d * s.c),
        copy_arg=None,
        row_args=(0, 2),
        # A float64 matmul costs far less per element than the softmax chain:
        # count N*V*D / 128 (N*V at the default D).
        ref_work=lambda s: s.n * s.c * s.d // 128,
        sweeps=("classes", "tokens"),
    ),
}

IMPL_NOTES = {
    "ce_int": "optax: softmax_cross_entropy_with_integer_labels(...).mean();"
              " naive: -take_along_axis(log_softmax(logits.astype(f32)), labels).mean()",
    "ce_nchw": "logits [N/256, C, 16, 16], labels [N/256, 16, 16] (N = positions);"
               " optax: softmax_cross_entropy_with_integer_labels(..., axis=1).mean();"
               " naive: -take_along_axis(log_softmax(logits.astype(f32), axis=1), labels,"
               " 1).mean()",
    "ce_smooth": f"optax: softmax_cross_entropy(logits, smooth_labels(one_hot(labels),"
                 f" {SMOOTHING})).mean() (PyTorch's formula)",
    "ce_prob": "optax: softmax_cross_entropy(...).mean()",
    "nll": "naive: -take_along_axis(log_probs, labels).astype(f32).mean()",
    "bce": "optax: sigmoid_binary_cross_entropy(...).mean()",
    "log_softmax": "jax.nn: jax.nn.log_softmax; fwd+bwd differentiates"
                   " sum((out * cotangent).astype(f32))",
    "linear_ce": "optax: softmax_cross_entropy_with_integer_labels(x @ kernel, labels).mean()"
                 " (materialized [N, V] logits); grads w.r.t. (x, kernel)",
}
