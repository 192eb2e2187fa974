#!/usr/bin/env bash
# Validates the Pallas kernels on a GPU in one go: the tile sweep tools/tune_kernels.py (each
# candidate checked against the reference before it is timed), tools/bench_kernels.py with the
# tiles it found, then the kernel tests compiled (not interpreted). Everything lands in OUT_DIR
# (logs, tuned_kernels.json, bench_kernels.json, the plot).
#   tools/check_kernels_gpu.sh OUT_DIR [extra bench_kernels.py flags]
# TUNE_TIMEOUT / BENCH_TIMEOUT / TEST_TIMEOUT (seconds) bound each step (TUNE_TIMEOUT=0 skips the
# sweep, TUNE_KERNELS picks its kernels, default bsq,vq,attention, TUNE_ARGS adds flags, e.g.
# "--var_lengths 680,2240" for block-causal tiles at VAR's lengths); both JSONs are rewritten as
# results come, so a step stopped at its limit keeps them. The measurements come first so that a
# short lease still brings them back.
set -u
cd "$(dirname "$0")/.."
out=${1:-kernels_gpu}; shift || true
mkdir -p "$out"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$out/device.txt"
tiles=()
if [ "${TUNE_TIMEOUT:-300}" != 0 ]; then
  timeout "${TUNE_TIMEOUT:-300}" python tools/tune_kernels.py --out "$out/tuned_kernels.json" \
    --kernels "${TUNE_KERNELS:-bsq,vq,attention}" ${TUNE_ARGS:-} 2>&1 | tee "$out/tune.log"
  echo "tune rc=${PIPESTATUS[0]}" | tee -a "$out/tune.log"
  [ -f "$out/tuned_kernels.json" ] && tiles=(--tiles "$out/tuned_kernels.json")
fi
timeout "${BENCH_TIMEOUT:-300}" python tools/bench_kernels.py --out "$out/bench_kernels.json" \
  --plot "$out/bench_kernels.png" "${tiles[@]}" "$@" 2>&1 | tee "$out/bench.log"
echo "bench rc=${PIPESTATUS[0]}" | tee -a "$out/bench.log"
# Tests share the GPU: no preallocation, so several pytest workers fit.
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TEST_TIMEOUT:-240}" \
  python -m pytest tests/test_kernels.py -m "slow or not slow" -q -rfE --tb=short -n 4 \
  2>&1 | tee "$out/tests.log"
echo "tests rc=${PIPESTATUS[0]}" | tee -a "$out/tests.log"
