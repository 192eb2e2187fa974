#!/usr/bin/env bash
# The Hopper measurements that only an H100/H200 can make, in one run of at most 10 minutes (the
# default step limits add up to 570 s; 320 s on an H200), the fwd+bwd-against-cuDNN target first:
#   1. where the time goes at L = 4096, head dim 128 (the fwd+bwd ≥ 1.0× cuDNN target): each
#      kernel of our step and of cuDNN's, and BSQ's at 1M tokens (`breakdown.json`); ptxas's
#      registers and spills for each Mosaic GPU kernel compiled there (`breakdown.ptxas.txt`:
#      none on an H200 when last run; its SASS `breakdown.bwd.sass.gz`; 70 s); then the same for
#      the backward computing its resident tiles' wgmma descriptors before its loop, the path
#      before `DESCRIPTORS_IN_LOOP_HEAD_DIMS` (164 bytes of spills a thread;
#      `breakdown_descriptors_before_loop.*`, 70 s);
#   2. the kernel tests of the Hopper paths that take lengths as they are and skip the tiles of
#      query padding (`policy.HOPPER_UNPADDED`, `policy.HOPPER_SKIP_PADDED_QUERIES`), compiled,
#      alone, so that a hang ends this step and the log names it (18 tests with the descriptor
#      variant's, 102 s on an H200, 150 s allowed; NEW_TESTS=EXPR selects others);
#   3. block-causal attention at VAR's lengths (680, 2240): the default (pallas), cuDNN given the
#      mask densely, our dense visit, the path the two flags replaced (padded to whole tiles,
#      pallas_padded; 680 pads to 768); each GPU kernel's time in a fwd+bwd step (--breakdown);
#      the backward waiting for dV's matmul before dS (pallas_bwd_in_order); BSQ and VQ at their
#      default shapes (`var.json`; VAR_IMPLS=A,B times others);
#   4. the other kernel tests, compiled (`-m "slow or not slow"`; the TPU lowering is the CPU's);
#   5. with CAUSAL_TIMEOUT=N (seconds), causal attention, L = 256 … 8192, head dims 64 / 128: the
#      default, the Hopper forward with the Triton backward, Triton alone and cuDNN, which
#      `policy.VENDOR_AHEAD` / `hopper_ahead` choose between (measured before:
#      docs/kernels/bench_hopper_causal_h100.json);
#   6. with TUNE_TIMEOUT=N (seconds), BSQ's launch settings at 16M tokens (tools/tune_kernels.py),
#      where a copy reaches 85% of HBM against 68% at 1M.
# Everything lands in OUT_DIR (logs, JSONs and SASS, about 18 files: where a machine returns only
# a few files, give a directory outside the returned one and tar it).
#   tools/check_hopper_gpu.sh OUT_DIR
# NEW_TEST_TIMEOUT / VAR_TIMEOUT / BREAKDOWN_TIMEOUT / TEST_TIMEOUT (seconds) bound each step; the
# JSONs are rewritten as results come, so a step stopped at its limit keeps what it measured (a
# JSON's "targets" says "not measured" for the rows it has not).
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
# breakdown NAME IMPLS [BENCH ARGS]: L = 4096, head dim 128, each impl's kernels timed, into
# OUT_DIR/NAME.json, NAME.log and NAME.ptxas.txt. Mosaic GPU's dumps (many files, and its IR on
# stdout) stay outside OUT_DIR: only ptxas's lines about registers and the log's other lines are
# kept, and the backward's SASS (NAME.bwd.sass.gz; its PTX through the CUDA toolkit's ptxas and
# cuobjdump, where they are: the jax install has no nvdisasm for MOSAIC_GPU_DUMP_SASS). One process
# per NAME, so that its ptxas lines are its own kernels'.
PATH=$PATH:/usr/local/cuda/bin
breakdown() {
  local name=$1 impls=$2 dump rc ptx
  shift 2
  dump=$(mktemp -d)
  MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO="$dump" \
    timeout "${BREAKDOWN_TIMEOUT:-70}" \
    python tools/bench_kernels.py --out "$out/$name.json" \
    --lengths 4096 --head_dims 128 --var_lengths= --warmup 2 --iters 5 --back_to_back 10 \
    --impls "$impls" --breakdown "$@" > "$dump/$name.log" 2>&1
  rc=$?
  grep -v "^[[:space:]%#}]\|^module\|^$" "$dump/$name.log" | cut -c1-4000 > "$out/$name.log"
  echo "$name rc=$rc" | tee -a "$out/$name.log"
  grep -r "spill\|serialized\|Used [0-9]* registers" "$dump" | sed "s|$dump/||" | cut -c1-400 \
    > "$out/$name.ptxas.txt"
  ptx=$(ls "$dump"/*bwd*.ptx 2>/dev/null | head -1)
  if [ -n "$ptx" ] && command -v ptxas > /dev/null && command -v cuobjdump > /dev/null; then
    ptxas -arch=sm_90a -o "$dump/bwd.cubin" "$ptx" && cuobjdump -sass "$dump/bwd.cubin" \
      | gzip > "$out/$name.bwd.sass.gz"
  fi
  rm -rf "$dump"
}
breakdown breakdown pallas,cudnn --bsq_more_tokens=
# The backward with its resident tiles' wgmma descriptors computed before its loop (the path
# before DESCRIPTORS_IN_LOOP_HEAD_DIMS): its spills and SASS against breakdown's.
breakdown breakdown_descriptors_before_loop pallas_bwd_descriptors_before_loop --bsq_more_tokens=
# The newest Hopper paths first, on their own and in one process (-v names each test as it
# starts): a hang there (a warpgroup that walks no tile; TMA past an array's end) ends this step
# alone and the log names it. Then VAR's lengths with and without them.
NEW_TESTS=${NEW_TESTS:-skip_padded or skipped_padding or as_they_are or descriptors_in_loop}
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${NEW_TEST_TIMEOUT:-150}" \
  python -m pytest tests/test_kernels.py -k "$NEW_TESTS" -v -rfEs --tb=short 2>&1 \
  | tee "$out/tests_new_paths.log"
new_rc=${PIPESTATUS[0]}
echo "new-path tests rc=$new_rc" | tee -a "$out/tests_new_paths.log"
var_impls=${VAR_IMPLS:-pallas,cudnn,pallas_dense,pallas_padded,pallas_bwd_in_order}
timeout "${VAR_TIMEOUT:-140}" python tools/bench_kernels.py --out "$out/var.json" \
  --lengths= --var_lengths 680,2240 --bsq_more_tokens= --warmup 2 --iters 5 --back_to_back 10 \
  --impls "$var_impls" \
  --breakdown 2>&1 \
  | tee "$out/var.log"
echo "var rc=${PIPESTATUS[0]}" | tee -a "$out/var.log"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TEST_TIMEOUT:-140}" \
  python -m pytest tests/test_kernels.py -m "slow or not slow" -k "not tpu and not ($NEW_TESTS)" \
  -q -rfEs --tb=short -n 4 2>&1 | tee "$out/tests.log"
echo "tests rc=${PIPESTATUS[0]}" | tee -a "$out/tests.log"
if [ "${CAUSAL_TIMEOUT:-0}" -gt 0 ]; then  # Opt in: the causal sweep (about 200 s).
  timeout "$CAUSAL_TIMEOUT" python tools/bench_kernels.py --out "$out/causal.json" \
    --lengths 256,512,1024,2048,4096,8192 --head_dims 64,128 --causal --var_lengths= \
    --bsq_more_tokens= --warmup 2 --iters 5 --back_to_back 10 \
    --impls pallas,pallas_hopper_fwd,pallas_triton,cudnn 2>&1 | tee "$out/causal.log"
  echo "causal rc=${PIPESTATUS[0]}" | tee -a "$out/causal.log"
fi
if [ "${TUNE_TIMEOUT:-0}" -gt 0 ]; then  # Opt in: the 16M-token BSQ sweep (about 80 s).
  timeout "$TUNE_TIMEOUT" python tools/tune_kernels.py --out "$out/tuned_bsq_16m.json" \
    --kernels bsq --bsq_tokens 16777216 2>&1 | tee "$out/tune.log"
  echo "tune rc=${PIPESTATUS[0]}" | tee -a "$out/tune.log"
fi
