"""Loader for the PyTorch golden values in tests/golden/*.npz.

The files are produced by ``tests/make_golden.py`` (which needs torch); this
module only needs numpy.  See the docstring of make_golden.py for the format.

Example (not a doctest: the path depends on the working directory)::

    cases = load("cross_entropy_int")
    cases[0]["meta"]["reduction"], cases[0]["logits"].shape
"""

from __future__ import annotations

import json
import os

import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")

NAMES = (
    "cross_entropy_int",
    "cross_entropy_prob",
    "nll_loss",
    "bce_with_logits",
    "log_softmax",
    "extreme",
)


def load(name: str) -> list[dict]:
    """Return one dict per case of ``tests/golden/<name>.npz``, in case order.

    Each dict maps ``"meta"`` to the parsed JSON metadata and every other
    array name (``"logits"``, ``"targets"``, ``"loss"``, ``"grad_logits"``,
    ...) to a numpy array.  Optional arrays (``weight``, ``pos_weight``,
    ``cot``) are present only when the case uses them.
    """
    if name.endswith(".npz"):
        name = name[:-4]
    path = os.path.join(GOLDEN_DIR, name + ".npz")
    cases: dict[str, dict] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            if "__" not in key or key.startswith("__"):
                continue  # file-level entries such as __torch_version__
            cid, field = key.split("__", 1)
            case = cases.setdefault(cid, {})
            value = data[key]
            if field == "meta":
                case["meta"] = json.loads(value.item())
            else:
                case[field] = value
    return [cases[cid] for cid in sorted(cases)]


def torch_version(name: str) -> str:
    """The torch version recorded in ``tests/golden/<name>.npz``."""
    if name.endswith(".npz"):
        name = name[:-4]
    with np.load(os.path.join(GOLDEN_DIR, name + ".npz"),
                 allow_pickle=False) as data:
        return data["__torch_version__"].item()
