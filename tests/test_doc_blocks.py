"""Every ```python block of the README, examples/README.md and docs/**/*.md
runs as written, on its own, in a fresh Python process (a user's copy-paste:
no conftest, no strict promotion, one CPU device, nothing from other blocks).

Conventions, an HTML comment (invisible once rendered) on a line directly
above the block's fence, blank lines allowed in between:

  <!-- doc-test: cpu-devices=8 -->   run with
      XLA_FLAGS=--xla_force_host_platform_device_count=8 (the sharding blocks;
      the text around them must tell the reader to set it too)
  <!-- doc-test: skip REASON -->     do not run it (say why: e.g. it needs a
      TPU or several hosts)

Blocks of one run are started together on a small thread pool (each one is a
new process that imports jax, about 2 s), and each test waits for its own.
A failure names the file and the line of the block; the traceback's line
numbers are the markdown file's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

# Each block starts a fresh Python process: opt-in (`pytest -m slow`, which .ci/run runs)
# to keep the default suite within its 5-minute budget on 2 cores.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)\s*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*-->\s*$")

# Blocks that do not run as written (none today), matched by a piece of a line of
# their code; each is xfail(strict=True), so fixing the block makes the test ask for
# the entry's removal.
KNOWN_FAILING: dict[tuple[str, str], str] = {}  # (path, a line of the block): reason


@dataclasses.dataclass(frozen=True)
class Block:
  path: str  # relative to the repository root
  line: int  # 1-based line of the opening fence
  code: str  # dedented, padded with blank lines so that line numbers match the file
  cpu_devices: int | None
  skip: str | None

  @property
  def id(self) -> str:
    return f"{self.path}:{self.line}"


def doc_files() -> list[pathlib.Path]:
  files = [ROOT / "README.md", ROOT / "examples" / "README.md"]
  files += sorted((ROOT / "docs").glob("**/*.md"))
  return [f for f in files if f.is_file()]


def parse_blocks(path: pathlib.Path) -> list[Block]:
  """The ```python blocks of one markdown file, with their directives."""
  rel = path.relative_to(ROOT).as_posix()
  lines = path.read_text(encoding="utf-8").splitlines()
  blocks = []
  i = 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if m is None or not m["lang"]:
      i += 1
      continue
    start, indent, lang = i, m["indent"], m["lang"]
    i += 1
    while i < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[i]):
      i += 1
    if i == len(lines):
      raise ValueError(f"{rel}:{start + 1}: unclosed ``` fence")
    body = lines[start + 1:i]
    i += 1
    if lang.lower() not in ("python", "py"):
      continue
    directives = []
    j = start - 1
    while j >= 0 and (not lines[j].strip() or DIRECTIVE.match(lines[j])):
      if lines[j].strip():
        directives.append(DIRECTIVE.match(lines[j])["body"])
      j -= 1
    cpu_devices, skip = None, None
    for d in directives:
      if d.startswith("skip"):
        skip = d[4:].strip() or "skipped by a doc-test directive"
      elif d.startswith("cpu-devices="):
        cpu_devices = int(d.split("=", 1)[1])
      else:
        raise ValueError(f"{rel}:{j + 1}: unknown doc-test directive {d!r}")
    code = "\n" * (start + 1) + textwrap.dedent("\n".join(body)) + "\n"
    blocks.append(Block(rel, start + 1, code, cpu_devices, skip))
  return blocks


BLOCKS = [b for f in doc_files() for b in parse_blocks(f)]

RUNNER = (
    "import sys; src = sys.stdin.read();"
    " exec(compile(src, sys.argv[1], 'exec'), {'__name__': '__main__'})"
)


def run_block(block: Block) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  if block.cpu_devices is not None:
    flags += f" --xla_force_host_platform_device_count={block.cpu_devices}"
  env["XLA_FLAGS"] = flags.strip()
  env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
  env["MPLBACKEND"] = "Agg"
  return subprocess.run([sys.executable, "-c", RUNNER, block.path], input=block.code,
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=TIMEOUT_S)


@pytest.fixture(scope="session")
def doc_block_runs(request):
  """Starts every selected block at once on a pool of min(2, cores) workers;
  each test then waits for its own."""
  wanted = [item.callspec.params["block"] for item in request.session.items
            if getattr(item, "originalname", None) == "test_doc_block"
            and hasattr(item, "callspec")]
  wanted = [b for b in wanted if b.skip is None]
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
  futures = {b.id: pool.submit(run_block, b) for b in wanted}
  yield futures
  pool.shutdown(wait=True, cancel_futures=True)


def _known_failure(block: Block) -> str | None:
  for (path, line), reason in KNOWN_FAILING.items():
    if path == block.path and any(line.strip() in c for c in block.code.splitlines()):
      return reason
  return None


def _params():
  out = []
  for b in BLOCKS:
    marks = []
    if b.skip is not None:
      marks.append(pytest.mark.skip(reason=f"{b.id}: {b.skip}"))
    reason = _known_failure(b)
    if reason is not None:
      marks.append(pytest.mark.xfail(reason=f"{b.id}: {reason}", strict=True))
    out.append(pytest.param(b, id=b.id, marks=marks))
  return out


@pytest.mark.parametrize("block", _params())
def test_doc_block(block, doc_block_runs):
  future = doc_block_runs.get(block.id)
  proc = future.result() if future is not None else run_block(block)
  if proc.returncode != 0:
    devices = f", {block.cpu_devices} CPU devices" if block.cpu_devices else ""
    shown = "\n".join(f"{n:5d}  {line}" for n, line in enumerate(block.code.splitlines(), 1)
                      if n > block.line)
    pytest.fail(
        f"{block.id}: the ```python block starting at line {block.line} of {block.path}"
        f" exits with status {proc.returncode} when run on its own"
        f" (python -c, fresh process{devices}).\n--- block ---\n{shown}\n"
        f"--- stderr (last 3000 chars) ---\n{proc.stderr[-3000:]}",
        pytrace=False)


def test_parser_finds_fences_directives_and_indented_blocks(tmp_path, monkeypatch):
  text = textwrap.dedent("""\
      # t
      ```bash
      echo no
      ```
      <!-- doc-test: cpu-devices=8 -->

      ```python
      import os
      ```
      - item:
        ```python
        x = 1
        assert x == 1
        ```
      <!-- doc-test: skip needs a TPU -->
      ```py
      import libtpu
      ```
      """)
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  (tmp_path / "a.md").write_text(text)
  blocks = parse_blocks(tmp_path / "a.md")
  assert [(b.line, b.cpu_devices, b.skip) for b in blocks] == [
      (7, 8, None), (11, None, None), (16, None, "needs a TPU")]
  # Line numbers of the padded code are the file's: `assert` is on line 13.
  assert blocks[1].code.splitlines()[12] == "assert x == 1"
  assert blocks[1].code.splitlines()[11] == "x = 1"
  (tmp_path / "b.md").write_text("<!-- doc-test: sometimes -->\n```python\npass\n```\n")
  with pytest.raises(ValueError, match="unknown doc-test directive"):
    parse_blocks(tmp_path / "b.md")


def test_every_doc_file_is_collected():
  assert any(b.path == "README.md" for b in BLOCKS)
  ids = [b.id for b in BLOCKS]
  assert len(ids) == len(set(ids)), ids


def test_known_failures_name_existing_blocks():
  """An entry of KNOWN_FAILING that matches no block is stale (the block was
  rewritten): delete it."""
  stale = [key for key in KNOWN_FAILING
           if not any(b.path == key[0] and _known_failure(b) == KNOWN_FAILING[key]
                      for b in BLOCKS)]
  assert not stale, f"KNOWN_FAILING entries that match no block, delete them: {stale}"
