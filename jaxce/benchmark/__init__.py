"""jaxce's benchmark, installed with the package: `python -m jaxce.benchmark --help`
(or `jaxce-benchmark --help`) after `pip install "jaxce[bench]"`.

Modules: `run` (the sweep: times, compiled memory, errors), `targets` (the
issues' acceptance figures), `cases`, `measure`, `report`. Nothing here is
imported by `import jaxce`.
"""
