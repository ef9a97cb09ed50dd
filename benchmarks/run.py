"""The repository's entry point of the benchmark sweep; the code is the
installed package's `jaxce.benchmark` (`python -m jaxce.benchmark` or
`jaxce-benchmark` do the same). `python benchmarks/run.py --help`."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # this checkout's jaxce

from jaxce.benchmark.run import main

if __name__ == "__main__":
  sys.exit(main())
