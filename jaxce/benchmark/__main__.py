"""`python -m jaxce.benchmark`: the benchmark sweep (see `jaxce.benchmark.run`)."""

import sys

from jaxce.benchmark.run import main

sys.exit(main())
