"""Float64 NumPy reference implementations of jaxce's losses and gradients.

Written from the formulas of the specification (PyTorch's semantics), with no
use of jaxce or JAX, so that the tests compare two independent computations.

Conventions shared by every function here:

* All arithmetic is float64 NumPy; inputs are converted with `np.asarray`.
* Integer-target functions take the class axis `axis` of the logits; labels
  have the logits' shape without that axis.
* ``reduction="mean"`` over positions that are all ignored returns 0.0 (jaxce's
  deliberate difference from PyTorch, which gives NaN).
* Gradient functions return the gradient of the scalar loss for "mean" and
  "sum", and of ``sum(loss * cot)`` for "none" (a vector-Jacobian product).
* `where` (boolean, broadcastable to the logits) marks the classes that take
  part; classes with a -inf logit take no part either (for integer labels and
  label smoothing). A position without any active class contributes 0.

Formulas (w: class weights, default 1; v_n = [y_n != ignore_index];
p = softmax over the active classes; C_n = number of active classes):

* integer targets: l_n = (1 - eps) w[y_n] v_n (-log p[n, y_n])
  + (eps / C_n) v_n sum_{c active} w_c (-log p[n, c]) + z v_n lse_n^2,
  "mean" = sum_n l_n / sum_n w[y_n] v_n.  Labels outside [0, C) that are not
  ignored give NaN.
* probability targets: q = (1 - eps) t + eps / C_n on the active classes,
  l_n = -sum_{c in where} w_c q_{n,c} log p_{n,c} + z lse_n^2, "mean" divides
  by the number of positions.
* NLL: l_n = -w[y_n] v_n log_probs[n, y_n], "mean" as for integer targets.
* BCE with logits: l = w [pw t softplus(-x) + (1 - t) softplus(x)]
  (= -w [pw t log s(x) + (1 - t) log(1 - s(x))]), "mean" = plain mean.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

REDUCTIONS = ("none", "mean", "sum")


# ---------------------------------------------------------------------------
# helpers


def _f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def _last(x: np.ndarray, axis: int) -> np.ndarray:
  """Moves the class axis last."""
  return np.moveaxis(x, axis, -1)


def _back(x: np.ndarray, axis: int) -> np.ndarray:
  """Inverse of `_last` for an array of the logits' rank."""
  return np.moveaxis(x, -1, axis)


def _active(x: np.ndarray, where) -> np.ndarray:
  """Classes that take part: inside `where` and with a logit above -inf."""
  act = x > -np.inf
  if where is not None:
    act = act & np.broadcast_to(np.asarray(where, dtype=bool), x.shape)
  return act


def _reduce(loss: np.ndarray, reduction: str, denominator: float | None = None):
  if reduction == "none":
    return loss
  total = np.sum(loss)
  if reduction == "sum":
    return np.float64(total)
  if denominator is None:
    denominator = loss.size
  if denominator == 0:
    return np.float64(0.0)
  return np.float64(total / denominator)


def _upstream(reduction: str, shape, cot, denominator: float | None = None) -> np.ndarray:
  """d(reduced loss) / d(per-position loss)."""
  if reduction == "none":
    return np.broadcast_to(_f64(cot), shape)
  if reduction == "sum":
    return np.ones(shape)
  n = int(np.prod(shape)) if denominator is None else denominator
  if n == 0:
    return np.zeros(shape)
  return np.full(shape, 1.0 / n)


def log_softmax_last(x: np.ndarray, act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(log p, lse) over the last axis and the active classes only.

  Inactive classes get log p = -inf; a row without active classes gets
  lse = -inf and log p = -inf everywhere.
  """
  xa = np.where(act, x, -np.inf)
  m = np.max(xa, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    lse = m + np.log(np.sum(np.where(act, np.exp(xa - m), 0.0), axis=-1, keepdims=True))
  with np.errstate(invalid="ignore"):
    logp = np.where(act, xa - lse, -np.inf)
  return logp, lse[..., 0]


def softmax_last(logp: np.ndarray) -> np.ndarray:
  return np.exp(logp)  # exp(-inf) = 0 for inactive classes


def softplus(x) -> np.ndarray:
  """log(1 + e^x), finite for every finite x."""
  return np.logaddexp(0.0, _f64(x))


def sigmoid(x) -> np.ndarray:
  x = _f64(x)
  return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))),
                  np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


# ---------------------------------------------------------------------------
# log_softmax / logsumexp


def log_softmax(x, axis: int = -1, where=None) -> np.ndarray:
  x = _f64(x)
  xl = _last(x, axis)
  wl = None if where is None else _last(np.broadcast_to(np.asarray(where, bool), x.shape), axis)
  logp, _ = log_softmax_last(xl, _active_where_only(xl, wl))
  return _back(logp, axis)


def _active_where_only(x: np.ndarray, where) -> np.ndarray:
  """For log_softmax / logsumexp a -inf entry is simply exp(-inf) = 0."""
  if where is None:
    return np.ones(x.shape, bool)
  return np.broadcast_to(where, x.shape)


def logsumexp(x, axis: int = -1, where=None) -> np.ndarray:
  x = _f64(x)
  xl = _last(x, axis)
  wl = None if where is None else _last(np.broadcast_to(np.asarray(where, bool), x.shape), axis)
  _, lse = log_softmax_last(xl, _active_where_only(xl, wl))
  return lse


def log_softmax_vjp(x, cot, axis: int = -1, where=None) -> np.ndarray:
  """Gradient of sum(log_softmax(x) * cot): g - p * sum(g) on active entries."""
  x = _f64(x)
  xl = _last(x, axis)
  wl = None if where is None else _last(np.broadcast_to(np.asarray(where, bool), x.shape), axis)
  act = _active_where_only(xl, wl) & (xl > -np.inf)
  logp, _ = log_softmax_last(xl, act)
  p = softmax_last(logp)
  g = np.where(act, _last(_f64(cot), axis), 0.0)
  return _back(g - p * np.sum(g, axis=-1, keepdims=True), axis)


def logsumexp_vjp(x, cot, axis: int = -1, where=None) -> np.ndarray:
  """Gradient of sum(logsumexp(x) * cot): cot * softmax."""
  x = _f64(x)
  xl = _last(x, axis)
  wl = None if where is None else _last(np.broadcast_to(np.asarray(where, bool), x.shape), axis)
  logp, _ = log_softmax_last(xl, _active_where_only(xl, wl) & (xl > -np.inf))
  return _back(softmax_last(logp) * _f64(cot)[..., None], axis)


# ---------------------------------------------------------------------------
# cross-entropy with integer targets


def _int_parts(logits, labels, weight, ignore_index, axis, where):
  x = _last(_f64(logits), axis)
  num_classes = x.shape[-1]
  labels = np.asarray(labels)
  wl = None if where is None else _last(np.broadcast_to(np.asarray(where, bool), _f64(
      logits).shape), axis)
  act = _active(x, wl)
  logp, lse = log_softmax_last(x, act)
  w = np.ones(num_classes) if weight is None else _f64(weight)
  valid = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
  in_range = (labels >= 0) & (labels < num_classes)
  safe = np.where(in_range, labels, 0)
  w_y = np.where(valid, w[safe], 0.0)
  alive = np.any(act, axis=-1)  # positions with at least one active class
  return SimpleNamespace(num_classes=num_classes, act=act, logp=logp, lse=lse, w=w, valid=valid,
                         in_range=in_range, safe=safe, w_y=w_y, alive=alive)


def cross_entropy_int(logits, labels, *, weight=None, ignore_index=-100, reduction="mean",
                      label_smoothing=0.0, z_loss=0.0, axis=-1, where=None):
  """PyTorch's cross_entropy with class-index targets, in float64."""
  s = _int_parts(logits, labels, weight, ignore_index, axis, where)
  act, logp, lse, w, valid, safe, w_y = s.act, s.logp, s.lse, s.w, s.valid, s.safe, s.w_y
  eps = float(label_smoothing)
  keep = valid & s.alive
  logp_y = np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  with np.errstate(invalid="ignore"):
    nll = np.where(keep, -w_y * logp_y, 0.0)
    count = np.maximum(np.sum(act, axis=-1), 1)
    smooth = np.where(keep, -np.sum(np.where(act, w * logp, 0.0), axis=-1) / count, 0.0)
  loss = (1.0 - eps) * nll + eps * smooth
  with np.errstate(invalid="ignore"):  # 0 * inf on a row with a +inf logit: NaN, as it is
    loss = loss + float(z_loss) * np.where(keep, lse, 0.0) ** 2
  loss = np.where(valid & ~s.in_range, np.nan, loss)
  return _reduce(loss, reduction, np.sum(w_y))


def cross_entropy_int_grad(logits, labels, *, weight=None, ignore_index=-100, reduction="mean",
                           label_smoothing=0.0, z_loss=0.0, axis=-1, where=None, cot=None):
  """Gradient with respect to the logits (assumes labels in range or ignored)."""
  s = _int_parts(logits, labels, weight, ignore_index, axis, where)
  act, logp, lse, w, w_y = s.act, s.logp, s.lse, s.w, s.w_y
  eps = float(label_smoothing)
  keep = s.valid & s.alive
  g = _upstream(reduction, w_y.shape, cot, np.sum(w_y))
  g = np.where(keep, g, 0.0)[..., None]
  p = softmax_last(logp)
  hot = np.arange(s.num_classes) == s.safe[..., None]
  count = np.maximum(np.sum(act, axis=-1, keepdims=True), 1)
  w_act = np.where(act, w, 0.0)
  d = (1.0 - eps) * w_y[..., None] * (p - hot)
  d = d + eps * (np.sum(w_act, axis=-1, keepdims=True) * p - w_act) / count
  d = d + 2.0 * float(z_loss) * np.where(keep, lse, 0.0)[..., None] * p
  return _back(np.where(act, g * d, 0.0), axis)


# ---------------------------------------------------------------------------
# cross-entropy with probability targets


def _prob_parts(logits, targets, weight, label_smoothing, axis, where):
  x = _last(_f64(logits), axis)
  t = _last(_f64(targets), axis)
  num_classes = x.shape[-1]
  inside = np.ones(x.shape, bool)
  if where is not None:
    inside = _last(np.broadcast_to(np.asarray(where, bool), _f64(logits).shape), axis)
  act = inside & (x > -np.inf)
  logp, lse = log_softmax_last(x, inside)
  w = np.ones(num_classes) if weight is None else _f64(weight)
  eps = float(label_smoothing)
  count = np.maximum(np.sum(act, axis=-1, keepdims=True), 1)
  q = (1.0 - eps) * t + np.where(act, eps / count, 0.0)
  q = np.where(inside, q, 0.0)
  alive = np.any(inside, axis=-1) & (lse > -np.inf)
  return SimpleNamespace(inside=inside, logp=logp, lse=lse, w=w, eps=eps, q=q, alive=alive)


def cross_entropy_prob(logits, targets, *, weight=None, reduction="mean", label_smoothing=0.0,
                       z_loss=0.0, axis=-1, where=None):
  """PyTorch's cross_entropy with probability targets, in float64."""
  s = _prob_parts(logits, targets, weight, label_smoothing, axis, where)
  wq = s.w * s.q
  with np.errstate(invalid="ignore"):
    terms = np.where(wq == 0, 0.0, -wq * s.logp)
  loss = np.where(s.alive, np.sum(terms, axis=-1), 0.0)
  with np.errstate(invalid="ignore"):  # (as in cross_entropy_int)
    loss = loss + float(z_loss) * np.where(s.alive, s.lse, 0.0) ** 2
  return _reduce(loss, reduction)


def cross_entropy_prob_grad(logits, targets, *, weight=None, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0, axis=-1, where=None, cot=None):
  """(d/d logits, d/d targets), for finite logits."""
  s = _prob_parts(logits, targets, weight, label_smoothing, axis, where)
  inside, logp, lse, w, eps, q, alive = s.inside, s.logp, s.lse, s.w, s.eps, s.q, s.alive
  g = _upstream(reduction, lse.shape, cot)
  g = np.where(alive, g, 0.0)[..., None]
  p = softmax_last(logp)
  wq = w * q
  mass = np.sum(wq, axis=-1, keepdims=True)
  dx = g * (mass * p - wq + 2.0 * float(z_loss) * np.where(alive, lse, 0.0)[..., None] * p)
  dx = np.where(inside, dx, 0.0)
  with np.errstate(invalid="ignore"):
    dt = np.where(inside, g * (1.0 - eps) * w * -logp, 0.0)
  return _back(dx, axis), _back(dt, axis)


def cross_entropy(logits, labels, **kwargs):
  """Dispatches on the label dtype like jaxce.cross_entropy."""
  labels = np.asarray(labels)
  if np.issubdtype(labels.dtype, np.floating):
    kwargs.pop("ignore_index", None)
    return cross_entropy_prob(logits, labels, **kwargs)
  return cross_entropy_int(logits, labels, **kwargs)


# ---------------------------------------------------------------------------
# nll_loss


def nll_loss(log_probs, labels, *, weight=None, ignore_index=-100, reduction="mean", axis=-1):
  lp = _last(_f64(log_probs), axis)
  num_classes = lp.shape[-1]
  labels = np.asarray(labels)
  w = np.ones(num_classes) if weight is None else _f64(weight)
  valid = labels != ignore_index
  in_range = (labels >= 0) & (labels < num_classes)
  safe = np.where(in_range, labels, 0)
  w_y = np.where(valid, w[safe], 0.0)
  picked = np.take_along_axis(lp, safe[..., None], axis=-1)[..., 0]
  loss = np.where(valid, -w_y * picked, 0.0)
  loss = np.where(valid & ~in_range, np.nan, loss)
  return _reduce(loss, reduction, np.sum(w_y))


def nll_loss_grad(log_probs, labels, *, weight=None, ignore_index=-100, reduction="mean",
                  axis=-1, cot=None):
  lp = _last(_f64(log_probs), axis)
  num_classes = lp.shape[-1]
  labels = np.asarray(labels)
  w = np.ones(num_classes) if weight is None else _f64(weight)
  valid = labels != ignore_index
  safe = np.where((labels >= 0) & (labels < num_classes), labels, 0)
  w_y = np.where(valid, w[safe], 0.0)
  g = _upstream(reduction, labels.shape, cot, np.sum(w_y))
  hot = np.arange(num_classes) == safe[..., None]
  return _back(np.where(hot, -(g * w_y)[..., None], 0.0), axis)


# ---------------------------------------------------------------------------
# binary cross-entropy with logits


def _bce_parts(logits, targets, weight, pos_weight):
  x = _f64(logits)
  t = _f64(targets)
  w = np.ones(x.shape) if weight is None else np.broadcast_to(_f64(weight), x.shape)
  pw = np.ones(x.shape) if pos_weight is None else np.broadcast_to(_f64(pos_weight), x.shape)
  return x, t, w, pw


def bce_with_logits(logits, targets, *, weight=None, pos_weight=None, reduction="mean"):
  x, t, w, pw = _bce_parts(logits, targets, weight, pos_weight)
  loss = w * (pw * t * softplus(-x) + (1.0 - t) * softplus(x))
  return _reduce(loss, reduction)


def bce_with_logits_grad(logits, targets, *, weight=None, pos_weight=None, reduction="mean",
                         cot=None):
  """(d/d logits, d/d targets)."""
  x, t, w, pw = _bce_parts(logits, targets, weight, pos_weight)
  g = _upstream(reduction, x.shape, cot) * w
  dx = g * ((1.0 - t) * sigmoid(x) - pw * t * sigmoid(-x))
  dt = g * (pw * softplus(-x) - softplus(x))
  return dx, dt


# ---------------------------------------------------------------------------
# finite differences, to check the gradients above and jaxce's parameter grads


def central_difference(f, x, h: float = 1e-6) -> np.ndarray:
  """d f(x) / d x for a scalar float64 function f, by central differences."""
  x = _f64(x).copy()
  out = np.zeros(x.shape)
  flat_x = x.reshape(-1)
  flat_out = out.reshape(-1)
  for i in range(flat_x.size):
    old = flat_x[i]
    flat_x[i] = old + h
    up = f(x)
    flat_x[i] = old - h
    down = f(x)
    flat_x[i] = old
    flat_out[i] = (up - down) / (2.0 * h)
  return out
