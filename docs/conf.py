"""Sphinx configuration of the jaxce documentation (build: `.ci/docs`)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document the checkout's jaxce, not whichever one is installed.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

import jaxce  # noqa: E402

project = "jaxce"
author = "the jaxce authors"
copyright = "the jaxce authors"
release = version = jaxce.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "jaxce_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# aot-results.md (written by the AOT benchmark, headings from H3) is included by
# guides/accelerators.md rather than built as a page of its own; eager-cpu.md
# (written by the eager benchmark) is included by guides/benchmarks.md;
# against-1b96716-cpu.md (benchmarks/against_commit.py) is a data page linked
# from benchmarks/README.md.
exclude_patterns = ["_build", "_ext", "**/.ipynb_checkpoints", "aot-results.md", "eager-cpu.md",
                    "against-1b96716-cpu.md"]

# MyST: $...$ math in the guides, {directive} blocks, heading anchors for #links.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# Google-style docstrings with Args/Returns/Examples and `.. math::`.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
# Signatures say `ArrayLike` (jax.typing.ArrayLike), not its expansion.
autodoc_type_aliases = {"ArrayLike": "ArrayLike"}

# The docstrings' examples run under `sphinx-build -b doctest` (.ci/docs).
doctest_global_setup = "import jax, jax.numpy as jnp, jaxce"

html_theme = "sphinx_book_theme"
html_title = f"jaxce {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}

# The benchmark's command line, documented from its own --help (see _ext/jaxce_docs.py).
jaxce_benchmark_command = ["-m", "jaxce.benchmark", "--help"]
