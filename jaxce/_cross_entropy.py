"""`cross_entropy` and `nll_loss`: PyTorch's semantics on any class axis."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxce import _checks, _collective, _dispatch, _explicit, _stats, _target_forward
from jaxce._reduction import integer_target_loss, target_loss


@_dispatch.jitted(
    static=("reduction", "label_smoothing", "z_loss", "axis", "class_axis_name"),
    static_if_python=("ignore_index",), constant_if_empty="logits")
def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int | ArrayLike | None = -100,
    reduction: _checks.Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    axis: int = -1,
    where: ArrayLike | None = None,
    class_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Softmax cross-entropy with PyTorch's options, for integer or probability
  targets.

  With :math:`p = \mathrm{softmax}(x)` over the class axis, class weights
  :math:`w` (default 1), :math:`v_n = [y_n \ne \text{ignore\_index}]` and
  :math:`C` classes, integer targets give

  .. math::
    \ell_n = (1 - \varepsilon)\, w_{y_n} v_n (-\log p_{n, y_n})
      + \frac{\varepsilon}{C}\, v_n \sum_c w_c (-\log p_{n,c})
      + \lambda_z v_n (\log \textstyle\sum_c e^{x_{n,c}})^2

  and "mean" is :math:`\sum_n \ell_n / \sum_n w_{y_n} v_n`. Probability targets
  :math:`t` give :math:`\ell_n = -\sum_c w_c q_{n,c} \log p_{n,c}` with
  :math:`q = (1 - \varepsilon) t + \varepsilon / C`, plus the z-loss term, and
  "mean" divides by the number of positions.

  Differences from PyTorch, on purpose:

  * "mean" over positions that are all ignored, or all of zero class weight,
    returns 0.0 with zero gradients (PyTorch returns NaN), so a padding-only
    micro-batch of finite logits cannot poison training (a NaN or +inf
    logit of an ignored position still has a NaN gradient, as in PyTorch).
    Otherwise "mean" divides by the sum of the weights as PyTorch does, even
    when weights of both signs cancel (giving +-inf or NaN).
  * Integer labels outside [0, C) that are not `ignore_index` make that
    position's loss NaN (PyTorch raises). Use :mod:`jaxce.checked` to raise an
    error naming the bad label instead, even under `jax.jit`.
  * Classes outside `where`, and classes whose logit is -inf, take no part:
    probability 0, gradient 0, and label smoothing spreads its mass over the
    remaining :math:`C_n` classes of each position (:math:`C_n = C` when
    nothing is masked). A position with no class left contributes 0, with
    zero gradients. With probability targets, the gradient w.r.t. the
    targets on such a class is 0 too (not :math:`w_c \log\sum e^x`), and
    target mass on a -inf logit makes the loss +inf (and the gradient
    there that of :math:`-w_c t_c x_c`) on any position, also one whose
    logits are all -inf (there :math:`-\sum_c t_c \log p_c` over
    :func:`log_softmax`'s all -inf row is +inf only if every class has
    target mass, and NaN otherwise; target mass outside `where` is
    dropped, and so is mass that does not count: at a class of weight 0,
    or with ``label_smoothing=1``, where :math:`q = 1 / C_n`).

  Accuracy: the per-position shift (the label's logit, or the max) is kept
  apart from the log-sum, so the loss is ``log_sum - (x_y - shift)`` and the
  softmax ``exp((x - shift) - log_sum)``: logits far from 0 (1e6 in float32,
  6e4 in float16) lose nothing. On CPU, integer labels shift by the label's
  logit (no pass for the max), which costs float32 gradients some accuracy:
  a row whose label lies D below its max rounds ``x - shift`` and the
  log-sum at the scale of D, so its gradient is within about
  :math:`(D + 16) \cdot 2^{-23}` of its largest entry, or of
  :math:`\epsilon` times its largest probability if that is larger (a few
  ulps with the max: at logits of standard deviation 10 over 1,000 classes,
  up to 26 ulps against optax's 2). The loss is not affected. With label
  smoothing :math:`\epsilon` and z-loss :math:`z`, on any platform, the
  label's entry may differ by a further :math:`(\epsilon + 2 z |\mathrm{lse}|)
  \cdot 2^{-23}` (their derivatives go through :math:`p_y - 1`, which rounds
  at 1, so that the gradient takes one exp).

  Differentiation: a `jax.custom_jvp` whose tangent recomputes the softmax
  inside ``jax.checkpoint``, so `jax.jvp`, `jax.jacfwd`, `jax.linearize`,
  `jax.grad`, `jax.hessian` and any nesting of them work, under `jax.jit`,
  `jax.vmap` and `shard_map`. Reverse mode keeps only `logits` (as given)
  and a few float32 numbers per position, and computes the gradient in one
  fused elementwise pass.

  Args:
    logits: Unnormalized scores, float16, bfloat16, float32 or float64, with
      the classes on `axis`.
    labels: Either integer class indices with `logits`' shape without `axis`
      (any integer dtype, signed or unsigned, 8 to 64 bits: values are
      compared as integers, so uint16 token ids with 65536 classes work), or
      floating class probabilities with `logits`' shape.
    weight: Optional per-class weights, shape ``[C]``.
    ignore_index: Integer targets equal to this contribute nothing and are left
      out of the "mean" denominator. Any Python int, an integer scalar array
      (traced values too), or None to ignore nothing. A label is ignored only
      if its value equals `ignore_index` as an integer, never through a
      wrap-around of the labels' dtype (a uint8 label 156 is not -100); a
      value the labels' dtype cannot hold ignores nothing. A Python int is
      static (a new value compiles again; an array does not). Not used with
      probability targets.
    reduction: "none", "mean" or "sum".
    label_smoothing: :math:`\varepsilon \in [0, 1]`, a static float (a new
      value compiles again).
    z_loss: :math:`\lambda_z \in [0, 3.4 \cdot 10^{38}]` (finite in float32),
      weight of the squared logsumexp (the PaLM / t5x auxiliary loss),
      reduced with the same denominator; a static float (a new value
      compiles again).
    axis: The class axis. -1 is JAX's layout; 1 is PyTorch's ``(N, C, ...)``.
    where: Optional boolean mask broadcastable to `logits` (NumPy's rules,
      aligned at the last axis): the classes that take part in the softmax.
      A position left with no class contributes 0 but still counts in
      "mean" (to drop positions, give them `ignore_index`).
      With `axis` not the last axis, a 1-D `where` is refused as ambiguous
      (a 1-D `weight` applies to `axis`); give it the logits' rank, e.g.
      ``where[:, None, None]`` for ``(N, C, H, W)`` logits and ``axis=1``.
    class_axis_name: Inside `shard_map`, the mesh axis (or a tuple of axes)
      over which the classes are split: each device passes its slice of
      `logits` (and of `weight` and `where`) and the global labels, and gets
      the loss over all classes.
      Label smoothing uses the global class count. Logits that `shard_map`'s
      types show whole on every device of the axis raise a ValueError.

  Returns:
    The loss in float32 (float64 for float64 logits): a scalar, or per-position
    values of `logits`' shape without `axis` for ``reduction="none"``.

  Examples:
    >>> import jax.numpy as jnp, jaxce
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> print(jaxce.cross_entropy(logits, jnp.array([0, 1]), reduction="none"))
    [0.2761297 2.951799 ]
    >>> print(jaxce.cross_entropy(logits, jnp.array([0, -100])))
    0.2761297
  """
  fn = "cross_entropy"
  class_axis_name = _checks.class_axis_name(fn, class_axis_name)
  logits = _checks.float_array(fn, "logits", logits)
  _collective.require_split(fn, "logits", logits, class_axis_name)
  _collective.require_bound(fn, class_axis_name)
  axis = _checks.canonical_axis(fn, axis, logits.ndim)
  reduction = _checks.reduction(fn, reduction)
  eps = _checks.static_float(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
  z = _checks.z_loss(fn, z_loss)
  num_classes = logits.shape[axis]
  weight = _checks.class_weight(fn, weight, num_classes)
  where = _checks.class_mask(fn, where, logits.shape, axis)
  ignore_index = _checks.ignore_value(fn, ignore_index)
  label_ignore: int | None = None  # ignore_index as integer_target_loss takes it
  labels = _checks.as_labels(fn, labels)
  probabilities = jnp.issubdtype(labels.dtype, jnp.floating)
  if probabilities and labels.shape != logits.shape:
    # Of the logits' rank, a shape error; of another, most likely class
    # indices of a floating dtype.
    error = ValueError if labels.ndim == logits.ndim else TypeError
    raise error(
        f"{fn}: floating `labels` are class probabilities and must have the"
        f" logits' shape {logits.shape}. Got {labels.shape}. For class"
        " indices, pass an integer array."
    )
  if not probabilities and labels.shape == logits.shape and logits.shape[axis] != 1:
    raise TypeError(
        f"{fn}: `labels` has the logits' shape {labels.shape} and dtype"
        f" {labels.dtype}: class probabilities must have a floating dtype; cast"
        f" them (e.g. `labels.astype(jnp.{logits.dtype.name})`). Class indices have"
        f" the logits' shape without axis {axis},"
        f" {_checks.positions_shape(logits.shape, axis)}."
    )
  if not probabilities:
    labels, label_ignore = _checks.integer_labels(
        fn, labels, logits.shape, axis, _checks.global_classes(num_classes, class_axis_name),
        ignore_index)

  spec = _explicit.spec_of(logits)
  if spec is not None:
    label_spec = spec if probabilities else _explicit.without(spec, axis)
    labels = _explicit.like(logits, labels, label_spec)
    weight = _explicit.like(logits, weight, P(spec[axis]))
    where = _explicit.like(logits, where)

  # `labels`: probabilities may be a host float64 array (see _checks.as_labels).
  def impl(
      logits: jax.Array, labels: Any, weight: jax.Array | None, where: jax.Array | None,
      class_axis_name: _collective.AxisName | None, row_axes: tuple[str, ...] = (),
  ) -> jax.Array:
    if probabilities:
      if (class_axis_name is None and not row_axes
          and _target_forward.takes(logits.shape[axis], where)):
        return _target_forward.target_cross_entropy(
            logits, labels, weight, axis, reduction, z, eps)
      target = _stats.target_stats(logits, labels, weight, where, axis, bool(eps))
      target = _collective.combine(target, class_axis_name)
      return target_loss(target, reduction=reduction, label_smoothing=eps, z_loss=z,
                         row_axes=row_axes)
    classes = _collective.class_slice(labels, logits.shape[axis], class_axis_name)
    stats = _stats.label_stats(
        logits, classes.local_labels, weight if eps else None, where, axis, bool(eps))
    stats = _collective.combine(stats, class_axis_name, classes.owned)
    return integer_target_loss(
        stats,
        labels,
        classes=classes,
        weight=weight,
        ignore_index=label_ignore,
        reduction=reduction,
        label_smoothing=eps,
        z_loss=z,
        row_axes=row_axes,
    )

  args = (logits, labels, weight, where)
  if class_axis_name is None:
    split = _explicit.class_split(logits, axis, reduction)
    if split is not None:
      label_spec = split.spec if probabilities else split.row_spec
      where_spec = None if where is None else _explicit.spec_for_shape(split.spec, where.shape)
      return _explicit.run_split(
          impl, split, args, (split.spec, label_spec, split.class_spec, where_spec))
  return impl(*args, class_axis_name)


@_dispatch.jitted(
    static=("reduction", "axis", "class_axis_name"),
    static_if_python=("ignore_index",), constant_if_empty="log_probs")
def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int | ArrayLike | None = -100,
    reduction: _checks.Reduction = "mean",
    axis: int = -1,
    class_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Negative log-likelihood of integer labels, as `torch.nn.functional.nll_loss`.

  .. math::
    \ell_n = -w_{y_n} v_n \,\mathrm{log\_probs}_{n, y_n}, \qquad
    \text{mean} = \sum_n \ell_n / \sum_n w_{y_n} v_n

  with :math:`v_n = [y_n \ne \text{ignore\_index}]`. As in :func:`cross_entropy`,
  "mean" over all-ignored positions is 0.0 (PyTorch: NaN) and labels outside
  [0, C) give NaN. Differentiation: a `jax.custom_jvp` (forward and reverse
  mode, any order); reverse mode keeps the labels, a few float32 numbers
  per position and, on CPU, one int32 row of the C class numbers.

  Args:
    log_probs: Log-probabilities (e.g. from :func:`log_softmax`), floating,
      with the classes on `axis`.
    labels: Integer class indices with `log_probs`' shape without `axis`, of
      any integer dtype (compared as integers, as in :func:`cross_entropy`).
    weight: Optional per-class weights, shape ``[C]``.
    ignore_index: Labels equal to this contribute nothing: any Python int
      (static: a new value compiles again), an integer scalar array (traced
      too) or None, compared without wrap-around as in :func:`cross_entropy`.
    reduction: "none", "mean" or "sum".
    axis: The class axis (1 for PyTorch's layout).
    class_axis_name: Inside `shard_map`, the mesh axis over which the classes
      are split (see :func:`cross_entropy`).

  Returns:
    The loss in float32 (float64 for float64 input); per position for
    ``reduction="none"``.

  Examples:
    >>> import jax.numpy as jnp, jaxce
    >>> log_probs = jaxce.log_softmax(jnp.array([[1.2, -0.8, -0.5]]))
    >>> print(jaxce.nll_loss(log_probs, jnp.array([0])))
    0.2761297
  """
  fn = "nll_loss"
  class_axis_name = _checks.class_axis_name(fn, class_axis_name)
  log_probs = _checks.as_array(fn, "log_probs", log_probs)
  if not jnp.issubdtype(log_probs.dtype, jnp.floating):
    raise TypeError(
        f"{fn}: `log_probs` must have a floating dtype (log-probabilities)."
        f" Got {log_probs.dtype}."
    )
  axis = _checks.canonical_axis(fn, axis, log_probs.ndim, "log_probs")
  _collective.require_split(fn, "log_probs", log_probs, class_axis_name)
  _collective.require_bound(fn, class_axis_name, "log_probs")
  reduction = _checks.reduction(fn, reduction)
  num_classes = log_probs.shape[axis]
  weight = _checks.class_weight(fn, weight, num_classes)
  labels, ignore_index = _checks.integer_labels(
      fn, labels, log_probs.shape, axis, _checks.global_classes(num_classes, class_axis_name),
      ignore_index, of="log_probs")

  def impl(
      log_probs: jax.Array, labels: jax.Array, weight: jax.Array | None,
      class_axis_name: _collective.AxisName | None, row_axes: tuple[str, ...] = (),
  ) -> jax.Array:
    classes = _collective.class_slice(labels, log_probs.shape[axis], class_axis_name)
    picked = _stats.pick(log_probs, classes.local_labels, labels == _checks.OUT_OF_RANGE, axis)
    if class_axis_name is not None:
      picked = jax.lax.psum(picked, class_axis_name)
    stats = _stats.LabelStats(jnp.zeros_like(picked), None, picked, None)
    return integer_target_loss(
        stats,
        labels,
        classes=classes,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        row_axes=row_axes,
    )

  spec = _explicit.spec_of(log_probs)
  if spec is not None:
    labels = _explicit.like(log_probs, labels, _explicit.without(spec, axis))
    weight = _explicit.like(log_probs, weight, P(spec[axis]))

  args = (log_probs, labels, weight)
  if class_axis_name is None:
    split = _explicit.class_split(log_probs, axis, reduction)
    if split is not None:
      return _explicit.run_split(
          impl, split, args, (split.spec, split.row_spec, split.class_spec))
  return impl(*args, class_axis_name)
