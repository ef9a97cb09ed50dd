"""What a function saves for its backward pass, as `print_saved_residuals`
reports it: (dtype name, shape, where it comes from) per saved array."""

from __future__ import annotations

import contextlib
import io
import re

from jax.ad_checkpoint import print_saved_residuals

_LINE = re.compile(r"^(\w+)\[([\d,\s]*)\]\s+(.*)$")


def saved_residuals(fn, *args) -> list[tuple[str, tuple[int, ...], str]]:
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(fn, *args)
  out = []
  for line in buf.getvalue().splitlines():
    m = _LINE.match(line.strip())
    assert m, f"unparsed residual line: {line!r}"
    shape = tuple(int(d) for d in m.group(2).replace(" ", "").split(",") if d)
    out.append((m.group(1), shape, m.group(3)))
  assert out, "no residual printed"
  return out
