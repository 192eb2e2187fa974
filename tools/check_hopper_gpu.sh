#!/usr/bin/env bash
# The Hopper measurements that only an H100/H200 can make, in one short run (about 10 minutes):
#   1. the Hopper kernel tests, compiled: unmasked with each `BackwardOptions` variant, and the
#      prefix masks (causal, VAR's block-causal, key padding) that `policy.HOPPER_PREFIX_MASKS`
#      waits for;
#   2. the backward variants against the default and cuDNN, unmasked, L = 4096 / 8192;
#   3. the masked Hopper kernels (pallas_hopper) against Triton (pallas), our dense visit and
#      cuDNN at VAR's lengths and causal L = 1024 / 4096 (LlamaGen's 256–1024 tokens are where
#      the unmasked Hopper kernels beat cuDNN), and BSQ at 1M / 4M / 16M tokens.
# A variant or mask that passes (1) and wins (2, 3) becomes the default: delete the other path, or
# set the policy flag. Everything lands in OUT_DIR (logs and JSONs).
#   tools/check_hopper_gpu.sh OUT_DIR
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds) bound each step; the bench JSONs are rewritten as rows
# come, so a step stopped at its limit keeps what it measured.
set -u
cd "$(dirname "$0")/.."
out=${1:-hopper_gpu}
mkdir -p "$out"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  # The masked Hopper kernels refuse CUDA runtimes 12.8.0-12.9.0 (flash_attention_hopper).
  python -c "from jax._src.lib import cuda_versions as v; print('cuda runtime', v and v.cuda_runtime_get_version())"
} 2>&1 | tee "$out/device.txt"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TEST_TIMEOUT:-240}" \
  python -m pytest tests/test_kernels.py -k hopper -q -rfE --tb=short -n 4 2>&1 | tee "$out/tests.log"
echo "tests rc=${PIPESTATUS[0]}" | tee -a "$out/tests.log"
timed=(--warmup 2 --iters 5 --back_to_back 10)
timeout "${BENCH_TIMEOUT:-180}" python tools/bench_kernels.py --out "$out/variants.json" \
  --lengths 4096,8192 --head_dims 128,64 --var_lengths= --bsq_more_tokens= "${timed[@]}" \
  --impls pallas,pallas+swizzled_dq,pallas+deferred_dq,pallas+swizzled_dq+deferred_dq,cudnn \
  2>&1 | tee "$out/variants.log"
echo "variants rc=${PIPESTATUS[0]}" | tee -a "$out/variants.log"
timeout "${BENCH_TIMEOUT:-180}" python tools/bench_kernels.py --out "$out/masked.json" \
  --lengths 1024,4096 --head_dims 64 --causal --var_lengths 680,2240 "${timed[@]}" \
  --impls pallas,pallas_hopper,pallas_dense,cudnn 2>&1 | tee "$out/masked.log"
echo "masked rc=${PIPESTATUS[0]}" | tee -a "$out/masked.log"
