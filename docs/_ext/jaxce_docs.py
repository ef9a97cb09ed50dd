"""Sphinx helpers for the jaxce docs.

* ``cli-help``: runs ``python <jaxce_benchmark_command>`` from the repository
  root at build time and shows its output, so the flags page cannot go stale.
* Signatures that read `ArrayLike | None` (see `clean_signature`).
* A completeness check: every name in ``jaxce.__all__`` and
  ``jaxce.checked.__all__`` must be documented somewhere, or the build warns
  (and ``-W`` fails).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)


class CliHelp(SphinxDirective):
  """Shows the benchmark CLI's `--help` output as a literal block."""

  has_content = False

  def run(self) -> list[nodes.Node]:
    argv = list(self.config.jaxce_benchmark_command)
    root = Path(self.env.srcdir).parent
    proc = subprocess.run(
        [sys.executable, *argv], cwd=root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "100"})
    if proc.returncode != 0:
      logger.warning("cli-help: `python %s` failed (%d): %s", " ".join(argv), proc.returncode,
                     proc.stderr[-2000:], location=self.get_location())
    command = nodes.paragraph()
    command += nodes.literal(text="python " + " ".join(argv))
    block = nodes.literal_block(proc.stdout, proc.stdout)
    block["language"] = "text"
    return [command, block]


def check_public_api(app: Sphinx, env: Any) -> None:
  import jaxce

  documented = set(env.get_domain("py").objects)
  names = [f"jaxce.{n}" for n in jaxce.__all__ if n != "checked"]
  names += [f"jaxce.checked.{n}" for n in jaxce.checked.__all__]
  for name in names:
    if name not in documented:
      logger.warning("public API `%s` is not documented under docs/api/", name)


def clean_signature(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None]:
  """`ArrayLike | None`, not `TypeAliasForwardRef('ArrayLike') | None` (a
  Sphinx rendering of aliases inside unions)."""
  if signature:
    signature = re.sub(r"TypeAliasForwardRef\('([^']*)'\)", r"\1", signature)
  return signature, return_annotation


def setup(app: Sphinx) -> dict[str, Any]:
  app.add_config_value("jaxce_benchmark_command", ["benchmarks/run.py", "--help"], "env")
  app.add_directive("cli-help", CliHelp)
  app.connect("env-check-consistency", check_public_api)
  app.connect("autodoc-process-signature", clean_signature)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
