#!/usr/bin/env bash
# The measured GPU run behind docs/bench-gpu.md: jaxce's benchmark
# (python -m jaxce.benchmark) at training-step shapes on one GPU, in segments
# that each write their own results (so that a segment cut off by its time
# limit loses only itself), then a correctness subset of the test suite run on
# that GPU. Needs jax with a GPU backend, optax, tqdm, and for the tests the
# test extra (pytest, pytest-xdist, chex, hypothesis, flax, ...).
#
#   OUT=gpu-results bash benchmarks/gpu.sh
#
# Every segment has a time limit (seconds, scaled by SCALE) so that the whole
# run fits a lease of about 8 minutes on an H100; raise SCALE on a machine of
# your own. Timings are medians of interleaved rounds (benchmarks/README.md).
set -u -o pipefail
OUT=${OUT:-gpu-results}
SCALE=${SCALE:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

limit() { echo $(( $1 * SCALE )); }

{
  date -u
  echo "jaxce commit: ${JAXCE_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>&1
  "$py" -c "import jax, jaxlib, optax, sys; print(sys.version.split()[0], 'jax', jax.__version__,
'jaxlib', jaxlib.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

# name, time limit, then the benchmark's flags. Common: 10 timed rounds after
# 2 untimed ones (a GPU call at these shapes takes milliseconds).
bench() {
  local name=$1 secs=$2
  shift 2
  echo "== $name (limit $(limit "$secs") s)"
  timeout "$(limit "$secs")" "$py" -m jaxce.benchmark --repeats 10 --warmup 2 --no-plots \
    --out "bench/$name" "$@" > "bench/$name.log" 2>&1
  echo "rc $?" >> "bench/$name.log"
  tail -n 3 "bench/$name.log"
}
rm -rf bench && mkdir -p bench

# 1. Integer labels: LM vocabularies at 4096 tokens, token counts at 32000,
#    and image-classification shapes. --max-elements 2^30: 4 GiB of float32
#    logits, so that no LM point is cut (256000 classes runs 4096 tokens).
bench ce_int 110 --cases ce_int --dtypes float32,bfloat16 \
  --classes 32000,50257,128256,151936,256000 --fixed-tokens 4096 \
  --tokens 1024,16384 --fixed-classes 32000 --image-shapes 65536x10,65536x1000 \
  --max-elements $((2**30))
# 2. The fused loss at an LM head's shape: N=8192 tokens, D=4096.
bench linear_ce 100 --cases linear_ce --dtypes float32,bfloat16 \
  --classes 32000,128256,256000 --fixed-tokens 8192 --tokens 8192 --fixed-classes 32000 \
  --hidden 4096 --max-elements $((2**31))
# 3. The other losses at two LM vocabularies and the image layout.
bench others 110 --cases log_softmax,ce_prob,ce_smooth,nll,bce,ce_nchw \
  --dtypes float32,bfloat16 --classes 32000,128256 --fixed-tokens 4096 \
  --tokens 4096 --fixed-classes 32000 --image-shapes 65536x1000 --max-elements $((2**30))
# 4. Eager (un-jitted) calls: per-call time against the peers, and
#    compilations after the warm-up (none expected).
echo "== eager (limit $(limit 40) s)"
timeout "$(limit 40)" "$py" -m jaxce.benchmark.eager --out bench/eager > bench/eager.log 2>&1
echo "rc $?" >> bench/eager.log
tar czf "$OUT/bench.tgz" bench

# 5. Correctness on the GPU: the value and gradient tests (references in
#    float64, optax, PyTorch's golden values, extreme inputs). XLA_FLAGS set
#    here keeps tests/conftest.py's XLA:CPU compile options off the GPU.
echo "== tests"
XLA_FLAGS=--xla_force_host_platform_device_count=8 XLA_PYTHON_CLIENT_PREALLOCATE=false \
  JAXCE_TEST_COMPILE=shipped timeout "$(limit 100)" "$py" -m pytest -p no:cacheprovider \
  -n 12 --dist load -v -rf tests/test_numerics.py tests/test_reference.py tests/test_golden.py \
  tests/test_optax.py tests/test_optax_cases.py tests/test_torch_opinfo.py \
  tests/test_forward_mode.py tests/test_linear.py > "$OUT/pytest.log" 2>&1
echo "rc $?" >> "$OUT/pytest.log"
grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest.log" | tail -n 25
for f in bench/*.log; do echo "== $f"; grep -E "^rc|total" "$f"; done
