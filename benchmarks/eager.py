"""Eager per-call time: the repository's entry point of `jaxce.benchmark.eager`.

    python benchmarks/eager.py
    python benchmarks/eager.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxce.benchmark.eager import main

if __name__ == "__main__":
  main()
