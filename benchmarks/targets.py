"""The repository's entry point of the acceptance figures; the code is
`jaxce.benchmark.acceptance` (`python -m jaxce.benchmark.acceptance` does the same).
`python benchmarks/targets.py --help`."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # this checkout's jaxce

from jaxce.benchmark.acceptance import main

if __name__ == "__main__":
  sys.exit(0 if main()["passed"] else 1)
