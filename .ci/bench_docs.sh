#!/usr/bin/env bash
# Regenerates docs/bench-cpu.{md,json} and the plots that the README and the
# docs show, from one default run of the benchmark sweep (on an idle machine:
# the table's header records the load average before and after).
#   .ci/bench_docs.sh [extra flags for the benchmark]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cd "$root"
python benchmarks/run.py --out "$out" "$@" > /dev/null
cp "$out/results.md" docs/bench-cpu.md
cp "$out/results.json" docs/bench-cpu.json
for png in ratio_float32 ratio_bfloat16 time_vs_classes_float32 memory_vs_classes_bfloat16; do
  cp "$out/$png.png" "docs/$png.png"
done
# (a missed acceptance check is recorded in the JSON's "checks" and named on
# stderr; the figures are published either way)
python benchmarks/targets.py --out docs/targets-cpu.json > /dev/null || true
echo "updated docs/bench-cpu.md, docs/bench-cpu.json, docs/targets-cpu.json and 4 plots"
