"""Generate PyTorch golden values for the jaxce test suite.

Run from the repository root (or anywhere)::

    python tests/make_golden.py

This regenerates every file in ``tests/golden/``; ``python tests/make_golden.py
linear_cross_entropy`` (any of the file names below, without ``.npz``)
regenerates only the files named.  PyTorch is needed ONLY to
regenerate the files; the test suite reads the committed ``.npz`` files through
``tests/golden.py`` and never imports torch.

Generated with torch 2.13.0 (CPU build, ``torch-2.13.0+cpu``), numpy 2.4.6,
Python 3.11.  The torch version actually used is also stored in every file
under the key ``__torch_version__`` (0-d str array).

Inputs come from ``numpy.random.default_rng(SEED)`` (``SEED = 20240601``, one
generator per output file, so adding a case to one file does not change the
others).  All inputs are converted to ``torch.float64`` (floats) or
``torch.int64`` (class indices) before calling torch, and every stored array
is float64 or int64.  The ``.npz`` files are written with a fixed zip
timestamp, so regenerating with the same torch build gives byte-identical
files.

File format
-----------
Each file is an ordinary ``.npz`` archive (``numpy.load`` works, no pickle
needed).  Keys are ``"{case_id}__{name}"`` where ``case_id`` is ``c000``,
``c001``, ... (zero-padded, in generation order) and ``name`` is an array
name.  Every case has ``{case_id}__meta``: a 0-d numpy unicode array holding a
JSON object that describes how to rebuild the call.  Common meta keys:

    fn              "cross_entropy" | "nll_loss" |
                    "binary_cross_entropy_with_logits" | "log_softmax" |
                    "linear_cross_entropy"
    torch_call      the exact torch expression evaluated (for humans)
    layout          "2d" ([N, C]), "kdim" ([N, C, d1, d2], class axis 1),
                    "3d" ([B, T, C], BCE only) or "3d" (log_softmax)
    axis            the class / softmax axis (always 1 for cross_entropy and
                    nll_loss, because torch's class axis is dim 1; for the
                    2-D layout axis 1 == axis -1)
    reduction       "none" | "mean" | "sum"
    weight          bool: whether a ``weight`` array is stored and passed
    ... plus the keys listed per file below.

``{case_id}__loss`` is the torch output (0-d for "mean"/"sum").  Gradients
are named ``grad_<input>``.  For reduction "mean"/"sum" they are the gradient
of the scalar loss; for reduction "none" (and for log_softmax) they are the
gradient of ``(loss * cot).sum()`` where ``{case_id}__cot`` is a stored random
cotangent with the loss's shape (so they are exactly a VJP with ``cot``).

``tests/golden.py`` provides ``load(name) -> list[dict]``: one dict per case,
``"meta"`` -> parsed JSON dict, every other name -> numpy array.

Files and cases
---------------
cross_entropy_int.npz  (51 cases)
    ``torch.nn.functional.cross_entropy(logits, targets, weight=weight,
    ignore_index=ignore_index, reduction=reduction,
    label_smoothing=label_smoothing)`` with int64 class-index targets.
    Full product of layout {2d [7, 5], kdim [6, 5, 2, 3]} x weight {None,
    uniform(0.2, 2.0) [C]} x ignore_index {-100 (about 25% of targets set to
    -100), 1 (a valid class; targets equal to 1 are ignored)} x
    label_smoothing {0.0, 0.15} x reduction {none, mean, sum} = 48 cases,
    plus 3 cases with meta ``"all_ignored": true`` where every target equals
    ignore_index (-100): (2d, mean, no weight, eps 0), (kdim, mean, weight,
    eps 0.15), (2d, sum, weight, eps 0.15).  For "mean" torch returns NaN
    there (0/0) while its gradient is all zeros; jaxce deliberately returns
    0.0 for the loss instead.  Arrays: logits, targets, [weight], loss,
    grad_logits, [cot].  Meta: target_kind="int", ignore_index,
    label_smoothing, all_ignored, n_ignored.

cross_entropy_prob.npz  (24 cases)
    Same torch function with probability targets of the logits' shape
    (softmax over the class axis of random normals; requires_grad=True).
    layout {2d [7, 5], kdim [6, 5, 2, 3]} x weight {None, [C]} x
    label_smoothing {0.0, 0.2} x reduction {none, mean, sum}.  Note that for
    probability targets torch's "mean" divides by the number of batch
    elements (N * d1 * d2), not by a weight sum, and ignore_index does not
    apply.  Arrays: logits, targets, [weight], loss, grad_logits,
    grad_targets, [cot].  Meta: target_kind="prob", label_smoothing.

nll_loss.npz  (24 cases)
    ``torch.nn.functional.nll_loss(log_probs, targets, weight=weight,
    ignore_index=ignore_index, reduction=reduction)`` where ``log_probs`` =
    log_softmax (class axis 1) of random normals, used as the leaf input.
    layout {2d [7, 5], kdim [6, 5, 2, 3]} x weight {None, [C]} x
    ignore_index {-100 (~25% ignored), 1} x reduction.  Arrays: log_probs,
    targets, [weight], loss, grad_log_probs, [cot].  Meta: ignore_index,
    n_ignored.

bce_with_logits.npz  (38 cases)
    ``torch.nn.functional.binary_cross_entropy_with_logits(logits, targets,
    weight=weight, reduction=reduction, pos_weight=pos_weight)``; targets
    uniform in [0, 1] with some entries exactly 0.0 and 1.0
    (requires_grad=True).  layout {2d [7, 5], 3d [3, 4, 5]} x weight {None,
    per-class [C], broadcast ([N, 1] for 2d, [B, 1, C] for 3d)} x pos_weight
    {None, uniform(0.5, 3.0) [C]} x reduction = 36 cases, plus 2 "large"
    cases (meta ``"large": true``; 2d [4, 5] logits containing +-50 and
    +-200, per-class weight and pos_weight, reduction none and mean).
    Arrays: logits, targets, [weight], [pos_weight], loss, grad_logits,
    grad_targets, [cot].  Meta: weight_kind ("none"|"class"|"broadcast"),
    weight_shape, pos_weight (bool), large.

log_softmax.npz  (3 cases)
    ``torch.log_softmax(x, dim=axis)`` on a [4, 5, 6] array, axis -1 and 1,
    plus one case (meta ``"large": true``) with entries of magnitude up to
    1e4 along axis -1.  Arrays: x, out, cot, grad_x (gradient of
    ``(out * cot).sum()``).

extreme.npz  (4 cases)
    cross_entropy with int64 targets on 2-D float64 logits [6, 5] whose
    entries reach +-3e4 (e.g. the row [3e4, -3e4, 0, 1, -1] with target 1,
    whose loss is 6e4), label_smoothing {0.0, 0.1} x reduction {none, mean};
    no weight, ignore_index -100 (unused).  Arrays: logits, targets, loss,
    grad_logits, [cot].  The loss here spans ~1e-4..1e5, so compare with a
    relative tolerance.

linear_cross_entropy.npz  (16 cases)
    The fused linear + cross-entropy: ``logits = x @ kernel + bias`` (float64),
    optionally soft-capped, ``logits = softcap * torch.tanh(logits /
    softcap)``, then ``torch.nn.functional.cross_entropy(logits, labels,
    weight=weight, ignore_index=ignore_index, reduction=reduction,
    label_smoothing=label_smoothing)`` (for the 3d layout the logits are
    permuted to torch's class axis 1).  D = 6 features, V = 11 classes;
    x ~ N(0, 1) (times 8 for the "large" cases), kernel ~ N(0, 0.7^2),
    bias ~ N(0, 0.5^2).  Cases: weight {None, [V]} x ignore_index {-100
    (~25% of labels -100), 2 (a valid class)} x label_smoothing {0.0, 0.1},
    2d layout (x [7, D]), reduction cycling none/mean/sum = 8 cases; 2
    softcap=2.0 cases (2d); 3 cases with layout "3d" (x [2, 4, D], labels
    [2, 4]; one with softcap 2.0), one per reduction; 2 "large" cases
    (logits up to ~1e2; one with softcap 5.0); 1 case with every label
    ignored (reduction "mean", weight, smoothing: torch gives NaN, jaxce
    0.0).  Arrays: x, kernel, bias, labels, [weight], loss, grad_x,
    grad_kernel, grad_bias, [cot].  Meta: layout, weight, ignore_index,
    label_smoothing, reduction, softcap (null or float), large,
    all_ignored, n_ignored.  The jaxce call is ``linear_cross_entropy(x,
    kernel, labels, bias=bias, weight=weight, ignore_index=...,
    reduction=..., label_smoothing=..., softcap=...)``.

bce_probs.npz  (24 cases; torch 2.14.1)
    ``torch.nn.functional.binary_cross_entropy(probs, targets, weight=weight,
    reduction=reduction)`` on [4, C]: kind {random, edges (0, 1, 1e-30,
    2**-40, 1 - 2**-24: the -100 log clamp and the backward's 1e-12 floor
    act)} x weight {none, [C], [4, 1], [4, C]} x reduction.  Arrays: probs,
    targets, [weight], loss, grad_probs, grad_targets, [cot].  Meta: kind,
    shape, weight, weight_shape, reduction.  Observed: the backward's floor is
    1e-12 rounded to float32 (9.99999996e-13) in float64 too, and the target
    gradient is -logit(p), +-inf at p = 0, 1.

opinfo.npz  (256 cases; torch 2.14.1, needs ``expecttest``)
    PyTorch's own OpInfo sample inputs (``torch.testing._internal.
    common_methods_invocations.op_db``, CPU, float64 and float32) of
    cross_entropy, nll_loss, binary_cross_entropy,
    binary_cross_entropy_with_logits and log_softmax (and its with_dtype
    variant), with torch's output and the gradients torch's samples ask for
    (``grad_input``, ``grad_target``; a VJP with ``cot`` for non-scalar
    outputs).  Arrays: input, [target], [weight], [pos_weight], loss,
    grad_*, [cot].  Meta: fn (the jaxce function), op, variant, dtype,
    sample (its index in op.sample_inputs), kwargs (the jaxce keyword
    arguments: torch's non-tensor kwargs, plus ``axis`` = 1 for inputs of
    rank >= 2 and 0 for unbatched ones), shapes, torch_call.  Samples with no
    jaxce call are listed with the reason in ``opinfo_unmapped.json``.

Observed torch behaviour (checked against an independent float64 JAX
reference when these files were generated; all 144 cases agree to rtol 1e-10)
---------------------------------------------------------------------------
* Integer targets, label smoothing eps, weight w (w = 1 if None), validity
  v_n = [y_n != ignore_index]:
      l_n = (1 - eps) * nll_n + (eps / C) * s_n,
      nll_n = -w[y_n] v_n log p[n, y_n],   s_n = -v_n sum_c w_c log p[n, c];
  "mean" divides the sum of BOTH terms by sum_n w[y_n] v_n (so without a
  weight, by the number of non-ignored targets, not by N).
* Every target ignored: "mean" -> NaN (0/0) with an all-zero gradient;
  "sum" -> 0.0; "none" -> zeros.
* Probability targets: targets become (1 - eps) * y + eps / C; the loss is
  -sum_c w_c y_c log p_c and "mean" divides by the number of batch elements
  regardless of the weight.
* binary_cross_entropy_with_logits: l = -w [pw * y log s(x) + (1 - y)
  log(1 - s(x))], finite for |x| = 200; "mean" divides by the element count.
* A zero loss can come out as -0.0 (extreme.npz, a row whose target holds
  the maximum logit by a margin of 3e4).
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

SEED = 20240601
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")

N2, C = 7, 5  # 2-D layout [N, C]
NK, D1, D2 = 6, 2, 3  # K-dim layout [N, C, d1, d2]
REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _rng(tag: str) -> np.random.Generator:
    # one generator per file, derived from SEED and a fixed per-file integer
    offsets = {
        "cross_entropy_int": 1,
        "cross_entropy_prob": 2,
        "nll_loss": 3,
        "bce_with_logits": 4,
        "log_softmax": 5,
        "extreme": 6,
        "linear_cross_entropy": 7,
        "bce_probs": 8,
        "opinfo": 9,
    }
    return np.random.default_rng([SEED, offsets[tag]])


def _t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    a = np.array(a, order="C")
    if a.dtype.kind in "iu":
        return torch.from_numpy(a.astype(np.int64))
    t = torch.from_numpy(a.astype(np.float64).copy())
    if grad:
        t.requires_grad_(True)
    return t


def _np(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    if a.dtype.kind == "f":
        return np.asarray(a, dtype=np.float64)
    return np.asarray(a, dtype=np.int64)


def _logit_shape(layout: str) -> tuple[int, ...]:
    return (N2, C) if layout == "2d" else (NK, C, D1, D2)


def _target_shape(layout: str) -> tuple[int, ...]:
    return (N2,) if layout == "2d" else (NK, D1, D2)


def _int_targets(rng, layout: str, ignore_index: int) -> np.ndarray:
    """Class indices in [0, C); for ignore_index=-100 about 25% set to -100,
    for ignore_index=1 the natural ~1/C of entries equal to 1 are ignored.
    Guarantees at least one ignored and at least one non-ignored entry."""
    shape = _target_shape(layout)
    tg = rng.integers(0, C, size=shape).astype(np.int64)
    flat = tg.reshape(-1)
    if ignore_index == -100:
        mask = rng.random(flat.shape) < 0.25
        flat[mask] = -100
    if not np.any(flat == ignore_index):
        flat[0] = ignore_index
    if np.all(flat == ignore_index):
        flat[-1] = 0 if ignore_index != 0 else 2
    return flat.reshape(shape)


def _backward(loss: torch.Tensor, reduction: str, rng):
    """Backprop either the scalar loss or (loss * cot).sum(); returns cot."""
    if reduction == "none":
        cot = rng.normal(size=tuple(loss.shape))
        (loss * _t(cot)).sum().backward()
        return cot
    loss.backward()
    return None


def _save(name: str, cases: list[dict]) -> str:
    """Write cases to OUT_DIR/name.npz with keys '{cid}__{array}'.

    Written through zipfile with a fixed timestamp so reruns are byte-stable;
    the result is a normal .npz readable by numpy.load(allow_pickle=False).
    """
    os.makedirs(OUT_DIR, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "__torch_version__": np.array(torch.__version__),
    }
    for i, case in enumerate(cases):
        cid = f"c{i:03d}"
        meta = dict(case["meta"])
        meta["case_id"] = cid
        arrays[f"{cid}__meta"] = np.array(json.dumps(meta, sort_keys=True))
        for k, v in case["arrays"].items():
            if v is None:
                continue
            v = np.asarray(v)
            if v.dtype.kind == "f":
                v = v.astype(np.float64)
            elif v.dtype.kind in "iub":
                v = v.astype(np.int64)
            arrays[f"{cid}__{k}"] = v
    path = os.path.join(OUT_DIR, name + ".npz")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.array(arrays[key], order="C"),
                                      allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    return path


# ----------------------------------------------------------------------------
# cross_entropy, integer targets
# ----------------------------------------------------------------------------
def _ce_int_case(rng, layout, use_weight, ignore_index, eps, reduction,
                 targets=None, all_ignored=False):
    logits = rng.normal(0.0, 2.0, size=_logit_shape(layout))
    weight = rng.uniform(0.2, 2.0, size=(C,)) if use_weight else None
    if targets is None:
        targets = _int_targets(rng, layout, ignore_index)
    x = _t(logits, grad=True)
    loss = F.cross_entropy(x, _t(targets),
                           weight=None if weight is None else _t(weight),
                           ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=eps)
    cot = _backward(loss, reduction, rng)
    meta = {
        "fn": "cross_entropy",
        "torch_call": (
            "torch.nn.functional.cross_entropy(logits, targets, "
            f"weight={'weight' if use_weight else None}, "
            f"ignore_index={ignore_index}, reduction={reduction!r}, "
            f"label_smoothing={eps})"),
        "target_kind": "int",
        "layout": layout,
        "axis": 1,
        "weight": use_weight,
        "ignore_index": ignore_index,
        "label_smoothing": eps,
        "reduction": reduction,
        "all_ignored": all_ignored,
        "n_ignored": int(np.sum(targets == ignore_index)),
    }
    return {"meta": meta, "arrays": {
        "logits": logits, "targets": targets, "weight": weight,
        "loss": _np(loss), "grad_logits": _np(x.grad), "cot": cot}}


def make_cross_entropy_int():
    rng = _rng("cross_entropy_int")
    cases = []
    for layout in ("2d", "kdim"):
        for use_weight in (False, True):
            for ignore_index in (-100, 1):
                for eps in (0.0, 0.15):
                    for reduction in REDUCTIONS:
                        cases.append(_ce_int_case(rng, layout, use_weight,
                                                  ignore_index, eps, reduction))
    # every target ignored: torch "mean" -> NaN (jaxce returns 0.0)
    for layout, use_weight, eps, reduction in (("2d", False, 0.0, "mean"),
                                              ("kdim", True, 0.15, "mean"),
                                              ("2d", True, 0.15, "sum")):
        tg = np.full(_target_shape(layout), -100, dtype=np.int64)
        cases.append(_ce_int_case(rng, layout, use_weight, -100, eps,
                                  reduction, targets=tg, all_ignored=True))
    return cases


# ----------------------------------------------------------------------------
# cross_entropy, probability targets
# ----------------------------------------------------------------------------
def make_cross_entropy_prob():
    rng = _rng("cross_entropy_prob")
    cases = []
    for layout in ("2d", "kdim"):
        for use_weight in (False, True):
            for eps in (0.0, 0.2):
                for reduction in REDUCTIONS:
                    shape = _logit_shape(layout)
                    logits = rng.normal(0.0, 2.0, size=shape)
                    z = rng.normal(0.0, 1.5, size=shape)
                    z = np.exp(z - z.max(axis=1, keepdims=True))
                    targets = z / z.sum(axis=1, keepdims=True)
                    weight = (rng.uniform(0.2, 2.0, size=(C,))
                              if use_weight else None)
                    x = _t(logits, grad=True)
                    y = _t(targets, grad=True)
                    loss = F.cross_entropy(
                        x, y, weight=None if weight is None else _t(weight),
                        reduction=reduction, label_smoothing=eps)
                    cot = _backward(loss, reduction, rng)
                    meta = {
                        "fn": "cross_entropy",
                        "torch_call": (
                            "torch.nn.functional.cross_entropy(logits, "
                            "targets, "
                            f"weight={'weight' if use_weight else None}, "
                            f"reduction={reduction!r}, "
                            f"label_smoothing={eps})"),
                        "target_kind": "prob",
                        "layout": layout,
                        "axis": 1,
                        "weight": use_weight,
                        "label_smoothing": eps,
                        "reduction": reduction,
                    }
                    cases.append({"meta": meta, "arrays": {
                        "logits": logits, "targets": targets,
                        "weight": weight, "loss": _np(loss),
                        "grad_logits": _np(x.grad),
                        "grad_targets": _np(y.grad), "cot": cot}})
    return cases


# ----------------------------------------------------------------------------
# nll_loss
# ----------------------------------------------------------------------------
def make_nll_loss():
    rng = _rng("nll_loss")
    cases = []
    for layout in ("2d", "kdim"):
        for use_weight in (False, True):
            for ignore_index in (-100, 1):
                for reduction in REDUCTIONS:
                    raw = rng.normal(0.0, 2.0, size=_logit_shape(layout))
                    log_probs = _np(torch.log_softmax(_t(raw), dim=1))
                    weight = (rng.uniform(0.2, 2.0, size=(C,))
                              if use_weight else None)
                    targets = _int_targets(rng, layout, ignore_index)
                    lp = _t(log_probs, grad=True)
                    loss = F.nll_loss(
                        lp, _t(targets),
                        weight=None if weight is None else _t(weight),
                        ignore_index=ignore_index, reduction=reduction)
                    cot = _backward(loss, reduction, rng)
                    meta = {
                        "fn": "nll_loss",
                        "torch_call": (
                            "torch.nn.functional.nll_loss(log_probs, targets, "
                            f"weight={'weight' if use_weight else None}, "
                            f"ignore_index={ignore_index}, "
                            f"reduction={reduction!r})"),
                        "layout": layout,
                        "axis": 1,
                        "weight": use_weight,
                        "ignore_index": ignore_index,
                        "reduction": reduction,
                        "n_ignored": int(np.sum(targets == ignore_index)),
                    }
                    cases.append({"meta": meta, "arrays": {
                        "log_probs": log_probs, "targets": targets,
                        "weight": weight, "loss": _np(loss),
                        "grad_log_probs": _np(lp.grad), "cot": cot}})
    return cases


# ----------------------------------------------------------------------------
# binary_cross_entropy_with_logits
# ----------------------------------------------------------------------------
def _bce_targets(rng, shape):
    y = rng.uniform(0.0, 1.0, size=shape)
    flat = y.reshape(-1)
    r = rng.random(flat.shape)
    flat[r < 0.2] = 0.0
    flat[r > 0.8] = 1.0
    flat[0], flat[1] = 0.0, 1.0  # make sure both exact values occur
    return flat.reshape(shape)


def _bce_case(rng, layout, logits, targets, weight_kind, weight, pos_weight,
              reduction, large=False):
    x = _t(logits, grad=True)
    y = _t(targets, grad=True)
    loss = F.binary_cross_entropy_with_logits(
        x, y, weight=None if weight is None else _t(weight),
        reduction=reduction,
        pos_weight=None if pos_weight is None else _t(pos_weight))
    cot = _backward(loss, reduction, rng)
    meta = {
        "fn": "binary_cross_entropy_with_logits",
        "torch_call": (
            "torch.nn.functional.binary_cross_entropy_with_logits(logits, "
            f"targets, weight={'weight' if weight is not None else None}, "
            f"reduction={reduction!r}, "
            f"pos_weight={'pos_weight' if pos_weight is not None else None})"),
        "layout": layout,
        "shape": list(logits.shape),
        "weight": weight is not None,
        "weight_kind": weight_kind,
        "weight_shape": None if weight is None else list(weight.shape),
        "pos_weight": pos_weight is not None,
        "reduction": reduction,
        "large": large,
    }
    return {"meta": meta, "arrays": {
        "logits": logits, "targets": targets, "weight": weight,
        "pos_weight": pos_weight, "loss": _np(loss),
        "grad_logits": _np(x.grad), "grad_targets": _np(y.grad), "cot": cot}}


def make_bce_with_logits():
    rng = _rng("bce_with_logits")
    cases = []
    shapes = {"2d": (N2, C), "3d": (3, 4, C)}
    bshapes = {"2d": (N2, 1), "3d": (3, 1, C)}
    for layout in ("2d", "3d"):
        shape = shapes[layout]
        for weight_kind in ("none", "class", "broadcast"):
            for use_pw in (False, True):
                for reduction in REDUCTIONS:
                    logits = rng.normal(0.0, 2.5, size=shape)
                    targets = _bce_targets(rng, shape)
                    if weight_kind == "none":
                        weight = None
                    elif weight_kind == "class":
                        weight = rng.uniform(0.2, 2.0, size=(C,))
                    else:
                        weight = rng.uniform(0.2, 2.0, size=bshapes[layout])
                    pos_weight = (rng.uniform(0.5, 3.0, size=(C,))
                                  if use_pw else None)
                    cases.append(_bce_case(rng, layout, logits, targets,
                                           weight_kind, weight, pos_weight,
                                           reduction))
    # large-magnitude logits: naive log(sigmoid(x)) would overflow / give inf
    logits = np.array([[50.0, -50.0, 200.0, -200.0, 0.0],
                       [-200.0, 200.0, -50.0, 50.0, 1.0],
                       [200.0, 200.0, -200.0, -200.0, -1.0],
                       [50.0, -50.0, 200.0, -200.0, 3.0]])
    targets = np.array([[1.0, 0.0, 0.0, 1.0, 0.5],
                        [0.0, 1.0, 1.0, 0.0, 0.25],
                        [1.0, 0.3, 0.7, 0.0, 1.0],
                        [0.5, 0.5, 0.5, 0.5, 0.0]])
    weight = rng.uniform(0.2, 2.0, size=(C,))
    pos_weight = rng.uniform(0.5, 3.0, size=(C,))
    for reduction in ("none", "mean"):
        cases.append(_bce_case(rng, "2d", logits, targets, "class", weight,
                               pos_weight, reduction, large=True))
    return cases


# ----------------------------------------------------------------------------
# log_softmax
# ----------------------------------------------------------------------------
def make_log_softmax():
    rng = _rng("log_softmax")
    cases = []
    specs = [(-1, False), (1, False), (-1, True)]
    for axis, large in specs:
        x_np = rng.normal(0.0, 2.0, size=(4, 5, 6))
        if large:
            x_np = x_np * 1e3
            x_np[0, 0] = [1e4, -1e4, 0.0, 5e3, -5e3, 1e4]
            x_np[1, 2] = -1e4
        x = _t(x_np, grad=True)
        out = torch.log_softmax(x, dim=axis)
        cot = rng.normal(size=tuple(out.shape))
        (out * _t(cot)).sum().backward()
        meta = {
            "fn": "log_softmax",
            "torch_call": f"torch.log_softmax(x, dim={axis})",
            "layout": "3d",
            "axis": axis,
            "large": large,
        }
        cases.append({"meta": meta, "arrays": {
            "x": x_np, "out": _np(out), "cot": cot, "grad_x": _np(x.grad)}})
    return cases


# ----------------------------------------------------------------------------
# extreme logits for cross_entropy
# ----------------------------------------------------------------------------
def make_extreme():
    rng = _rng("extreme")
    logits = np.array([[3e4, -3e4, 0.0, 1.0, -1.0],
                       [-3e4, 3e4, 0.0, 0.0, 0.0],
                       [3e4, 3e4, -3e4, 0.0, 0.0],
                       [1e4, -2e4, 2.5e4, -3e4, 5.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0],
                       [-3e4, -3e4, -3e4, -3e4, -3e4]])
    targets = np.array([1, 1, 0, 3, 2, 4], dtype=np.int64)
    cases = []
    for eps in (0.0, 0.1):
        for reduction in ("none", "mean"):
            x = _t(logits, grad=True)
            loss = F.cross_entropy(x, _t(targets), reduction=reduction,
                                   label_smoothing=eps)
            cot = _backward(loss, reduction, rng)
            meta = {
                "fn": "cross_entropy",
                "torch_call": (
                    "torch.nn.functional.cross_entropy(logits, targets, "
                    f"reduction={reduction!r}, label_smoothing={eps})"),
                "target_kind": "int",
                "layout": "2d",
                "axis": 1,
                "weight": False,
                "ignore_index": -100,
                "label_smoothing": eps,
                "reduction": reduction,
                "all_ignored": False,
            }
            cases.append({"meta": meta, "arrays": {
                "logits": logits, "targets": targets, "loss": _np(loss),
                "grad_logits": _np(x.grad), "cot": cot}})
    return cases

# ----------------------------------------------------------------------------
# linear_cross_entropy: cross_entropy(x @ kernel + bias), optional soft-cap
# ----------------------------------------------------------------------------
LIN_D, LIN_V = 6, 11  # features, classes
LIN_SHAPES = {"2d": (7,), "3d": (2, 4)}  # x's leading dims (= labels' shape)


def _linear_case(rng, layout, use_weight, ignore_index, eps, reduction,
                 softcap=None, x_scale=1.0, all_ignored=False):
    lead = LIN_SHAPES[layout]
    x_np = rng.normal(0.0, 1.0, size=(*lead, LIN_D)) * x_scale
    kernel = rng.normal(0.0, 0.7, size=(LIN_D, LIN_V))
    bias = rng.normal(0.0, 0.5, size=(LIN_V,))
    weight = rng.uniform(0.2, 2.0, size=(LIN_V,)) if use_weight else None
    labels = rng.integers(0, LIN_V, size=lead).astype(np.int64)
    flat = labels.reshape(-1)
    if all_ignored:
        flat[:] = ignore_index
    else:
        if ignore_index == -100:
            flat[rng.random(flat.shape) < 0.25] = -100
        if not np.any(flat == ignore_index):
            flat[0] = ignore_index
        if np.all(flat == ignore_index):
            flat[-1] = 0
    x = _t(x_np, grad=True)
    k = _t(kernel, grad=True)
    b = _t(bias, grad=True)
    logits = x @ k + b
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if layout == "3d":
        logits = logits.permute(0, 2, 1)  # torch's class axis is 1
    loss = F.cross_entropy(logits, _t(labels),
                           weight=None if weight is None else _t(weight),
                           ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=eps)
    cot = _backward(loss, reduction, rng)
    cap = "" if softcap is None else f"; logits = {softcap} * tanh(logits / {softcap})"
    meta = {
        "fn": "linear_cross_entropy",
        "torch_call": (
            f"logits = x @ kernel + bias{cap}; "
            "torch.nn.functional.cross_entropy(logits"
            f"{'.permute(0, 2, 1)' if layout == '3d' else ''}, labels, "
            f"weight={'weight' if use_weight else None}, "
            f"ignore_index={ignore_index}, reduction={reduction!r}, "
            f"label_smoothing={eps})"),
        "layout": layout,
        "weight": use_weight,
        "ignore_index": ignore_index,
        "label_smoothing": eps,
        "reduction": reduction,
        "softcap": softcap,
        "large": x_scale != 1.0,
        "all_ignored": all_ignored,
        "n_ignored": int(np.sum(labels == ignore_index)),
    }
    return {"meta": meta, "arrays": {
        "x": x_np, "kernel": kernel, "bias": bias, "labels": labels,
        "weight": weight, "loss": _np(loss), "grad_x": _np(x.grad),
        "grad_kernel": _np(k.grad), "grad_bias": _np(b.grad), "cot": cot}}


def make_linear_cross_entropy():
    rng = _rng("linear_cross_entropy")
    cases = []
    i = 0
    for use_weight in (False, True):
        for ignore_index in (-100, 2):
            for eps in (0.0, 0.1):
                cases.append(_linear_case(rng, "2d", use_weight, ignore_index,
                                          eps, REDUCTIONS[i % 3]))
                i += 1
    # soft-capped logits
    cases.append(_linear_case(rng, "2d", False, -100, 0.0, "mean", softcap=2.0))
    cases.append(_linear_case(rng, "2d", True, 2, 0.1, "none", softcap=2.0))
    # leading batch dims [B, T, D]
    cases.append(_linear_case(rng, "3d", True, -100, 0.1, "none"))
    cases.append(_linear_case(rng, "3d", False, 2, 0.0, "mean"))
    cases.append(_linear_case(rng, "3d", True, -100, 0.0, "sum", softcap=2.0))
    # large activations: logits up to ~1e2
    cases.append(_linear_case(rng, "2d", True, -100, 0.1, "mean", x_scale=8.0))
    cases.append(_linear_case(rng, "2d", False, -100, 0.0, "none",
                              softcap=5.0, x_scale=8.0))
    # every label ignored: torch "mean" -> NaN (jaxce returns 0.0)
    cases.append(_linear_case(rng, "2d", True, -100, 0.1, "mean",
                              all_ignored=True))
    return cases


# ----------------------------------------------------------------------------
# binary_cross_entropy (probabilities)
# ----------------------------------------------------------------------------
def _bce_probs_case(rng, probs, targets, weight, reduction, kind):
    p = _t(probs, grad=True)
    y = _t(targets, grad=True)
    loss = F.binary_cross_entropy(p, y, weight=None if weight is None else _t(weight),
                                  reduction=reduction)
    cot = _backward(loss, reduction, rng)
    meta = {
        "fn": "binary_cross_entropy",
        "torch_call": (
            "torch.nn.functional.binary_cross_entropy(probs, targets, "
            f"weight={'weight' if weight is not None else None}, reduction={reduction!r})"),
        "kind": kind,
        "shape": list(probs.shape),
        "weight": weight is not None,
        "weight_shape": None if weight is None else list(weight.shape),
        "reduction": reduction,
    }
    return {"meta": meta, "arrays": {
        "probs": probs, "targets": targets, "weight": weight, "loss": _np(loss),
        "grad_probs": _np(p.grad), "grad_targets": _np(y.grad), "cot": cot}}


def make_bce_probs():
    """binary_cross_entropy on probabilities: random and edge probabilities
    (0, 1, 1e-30, 2**-40, 1 - 2**-24: the -100 clamp and the 1e-12 floor act) x
    weight {none, per-last-axis, per-row, full} x reduction.  Gradients with
    respect to the probabilities and the targets (torch's
    binary_cross_entropy_backward and _target_backward; at p = 0 or 1 the
    target gradient is +-inf)."""
    rng = _rng("bce_probs")
    cases = []
    shape = (4, C)
    weights = {"none": None, "class": (C,), "row": (4, 1), "full": shape}
    for kind in ("random", "edges"):
        for wname, wshape in weights.items():
            for reduction in REDUCTIONS:
                probs = rng.uniform(0.0, 1.0, size=shape)
                if kind == "edges":
                    flat = probs.reshape(-1)
                    # exactly representable in float32 too (the float32
                    # tests round the inputs), except 1e-30 (relative error
                    # 2e-8 there)
                    flat[:6] = [0.0, 1.0, 1e-30, 1.0 - 2.0**-24, 2.0**-40, 0.5]
                targets = _bce_targets(rng, shape)
                weight = None if wshape is None else rng.uniform(0.2, 2.0, size=wshape)
                cases.append(_bce_probs_case(rng, probs, targets, weight, reduction,
                                             f"{kind}-{wname}"))
    return cases


# ----------------------------------------------------------------------------
# PyTorch's own OpInfo sample inputs
# ----------------------------------------------------------------------------
OPINFO_OPS = ("nn.functional.cross_entropy", "nn.functional.nll_loss",
              "nn.functional.binary_cross_entropy",
              "nn.functional.binary_cross_entropy_with_logits", "log_softmax")


def _opinfo_mapping(op, sample):
    """(jaxce function name, keyword arguments) for one OpInfo sample, or
    (None, reason) where jaxce has no equivalent call."""
    kwargs = {k: v for k, v in sample.kwargs.items() if not isinstance(v, torch.Tensor)}
    x = sample.input
    if op.name == "log_softmax":
        if x.ndim == 0:
            return None, "0-d input: jaxce needs a class axis (torch treats it as one element)"
        dtype = kwargs.pop("dtype", None)
        if dtype is not None and dtype != x.dtype:
            return None, f"dtype={dtype} casts the result; jaxce keeps the input dtype"
        return "log_softmax", {"axis": int(sample.args[0])}
    name = op.name.removeprefix("nn.functional.")
    if name in ("cross_entropy", "nll_loss"):
        for key in ("size_average", "reduce"):
            if key in kwargs:
                return None, f"deprecated {key}"
        kwargs["axis"] = 1 if x.ndim >= 2 else 0
    return name, kwargs


def _opinfo_cases(op, dtype, rng):
    cases, unmapped = [], []
    ttype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    for i, sample in enumerate(op.sample_inputs("cpu", ttype, requires_grad=True)):
        fn, kwargs = _opinfo_mapping(op, sample)
        tensors = {"input": sample.input}
        for j, a in enumerate(sample.args):
            if isinstance(a, torch.Tensor):
                tensors["target" if j == 0 else f"arg{j}"] = a
        tensors.update({k: v for k, v in sample.kwargs.items() if isinstance(v, torch.Tensor)})
        described = {k: list(v.shape) for k, v in tensors.items()}
        if fn is None:
            unmapped.append({"op": op.name, "variant": op.variant_test_name, "dtype": dtype,
                             "sample": i, "shapes": described, "reason": kwargs})
            continue
        out = op(sample.input, *sample.args, **sample.kwargs)
        diff = {k: v for k, v in tensors.items() if v.requires_grad}
        cot = None
        if out.ndim:
            cot = rng.normal(size=tuple(out.shape))
            scalar = (out * torch.from_numpy(cot).to(out.dtype)).sum()
        else:
            scalar = out
        grads = {}
        if diff and out.numel():
            got = torch.autograd.grad(scalar, list(diff.values()), allow_unused=True)
            grads = {f"grad_{k}": g for k, g in zip(diff, got, strict=True) if g is not None}
        arrays = {k: v.detach().numpy() for k, v in tensors.items()}
        arrays.update({k: g.numpy() for k, g in grads.items()})
        arrays["loss"] = out.detach().numpy()
        arrays["cot"] = cot
        meta = {"fn": fn, "op": op.name, "variant": op.variant_test_name, "dtype": dtype,
                "sample": i, "kwargs": kwargs, "shapes": described,
                "torch_call": f"{op.name}(input, *args, **{sample.kwargs!r})"}
        cases.append({"meta": meta, "arrays": arrays})
    return cases, unmapped


OPINFO_UNMAPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden",
                               "opinfo_unmapped.json")


def make_opinfo():
    """PyTorch's own sample inputs (torch.testing._internal's op_db OpInfos)
    for the ops in OPINFO_OPS, CPU float64 and float32, with torch's outputs
    and gradients (a VJP with a stored random cotangent for non-scalar
    outputs).  Samples with no jaxce equivalent are listed, with the reason,
    in golden/opinfo_unmapped.json.  Needs `expecttest` besides torch."""
    from torch.testing._internal.common_methods_invocations import op_db

    rng = _rng("opinfo")
    cases, unmapped = [], []
    for op in op_db:
        if op.name not in OPINFO_OPS:
            continue
        for dtype in ("float64", "float32"):
            torch.manual_seed(0)
            got, skipped = _opinfo_cases(op, dtype, rng)
            cases += got
            unmapped += skipped
    with open(OPINFO_UNMAPPED, "w") as f:
        json.dump({"torch": torch.__version__, "mapped": len(cases), "unmapped": unmapped}, f,
                  indent=1, sort_keys=True)
        f.write("\n")
    return cases


MAKERS = {
    "cross_entropy_int": make_cross_entropy_int,
    "cross_entropy_prob": make_cross_entropy_prob,
    "nll_loss": make_nll_loss,
    "bce_with_logits": make_bce_with_logits,
    "log_softmax": make_log_softmax,
    "extreme": make_extreme,
    "linear_cross_entropy": make_linear_cross_entropy,
    "bce_probs": make_bce_probs,
    "opinfo": make_opinfo,
}


def main(names=None) -> None:
    """Regenerate the files in `names` (default: all of MAKERS)."""
    names = list(MAKERS) if not names else [n.removesuffix(".npz") for n in names]
    unknown = sorted(set(names) - set(MAKERS))
    if unknown:
        raise SystemExit(f"unknown golden file(s) {unknown}; known: {list(MAKERS)}")
    torch.use_deterministic_algorithms(True)
    total = 0
    for name in names:
        cases = MAKERS[name]()
        path = _save(name, cases)
        size = os.path.getsize(path)
        total += size
        print(f"{os.path.relpath(path)}: {len(cases)} cases, {size} bytes")
    print(f"total: {total} bytes (torch {torch.__version__})")


if __name__ == "__main__":
    main(sys.argv[1:])
