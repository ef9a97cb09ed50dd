#!/usr/bin/env bash
# The benchmark runs from an installed wheel, without the repository: build
# the wheel, install it in a fresh virtualenv (with the system's jax, optax,
# matplotlib and tqdm visible, so that nothing is downloaded), and run the
# benchmark's two entry points from an empty folder.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip wheel --no-deps -q -w "$work/dist" "$root"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --force-reinstall "$work"/dist/jaxce-*.whl
cd "$work"
"$work/venv/bin/python" -c "import jaxce, sys; assert 'site-packages' in jaxce.__file__, jaxce.__file__"
"$work/venv/bin/jaxce-benchmark" --help > /dev/null
"$work/venv/bin/python" -m jaxce.benchmark --quick --cases nll,ce_nchw --dtypes float32 \
    --out "$work/out" > "$work/table.md" 2> "$work/progress.log" || {
  cat "$work/progress.log"; exit 1; }
grep -q "jaxce / peer" "$work/table.md"
test -s "$work/out/results.json"
test -s "$work/out/ratio_float32.png"
echo "bench_from_wheel: ok ($(ls "$work/out" | wc -l) files)"
