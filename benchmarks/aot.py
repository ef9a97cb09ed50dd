"""Compile-only TPU/GPU benchmark: the repository's entry point of `jaxce.benchmark.aot`.

    python benchmarks/aot.py --quick
    python benchmarks/aot.py --help
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: no device is used
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxce.benchmark.aot import main

if __name__ == "__main__":
  main()
