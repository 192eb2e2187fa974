"""When impl="auto" picks a Pallas kernel: the one place to tune after tools/bench_kernels.py.

A Pallas kernel is chosen only on a backend where it has run on the real hardware (its tests pass
outside interpret mode) and only where the benchmark shows it ahead; elsewhere "auto" keeps the
vendor/XLA path. The kernels are always available explicitly (impl="pallas").

Measured on an H100 (jax 0.11.2, bf16, docs/kernels/bench_kernels_h100.json, default tiles):
  - the kernel tests pass compiled (`tests/test_kernels.py -m "slow or not slow"`: 49 passed on
    the H100, BSQ's PTX approximate math, its tile loop and VQ's TF32×3 dot included);
  - the Hopper kernels (Mosaic GPU, forward and backward, unmasked or prefix masks): their tests
    pass on the H100 (with CUDA 13.0). Unmasked fwd+bwd: 3.5–3.6× XLA and 0.92–0.94× cuDNN at
    head dim 128 (0.95–0.98× at 64) for L = 4096 / 8192; 1.03–1.06× cuDNN at L = 1024 and
    1.19–1.24× at 256 (with the Triton backward there) (docs/kernels/bench_hopper_bwd_h100.json);
    0.96× / 0.98× cuDNN at L = 4096, head dim 128 / 64, in a later run
    (bench_hopper_bwd_orders_h100.json).
    Causal: see HOPPER_AHEAD_MAX_LEN;
  - on Triton fwd+bwd at L ≥ 4096 is 2.7–3.0× XLA (head dim 128) but 0.67–0.74× cuDNN,
    0.73–0.75× with the causal mask (docs/kernels/bench_causal_h100.json): unmasked and causal
    attention stay on cuDNN where it applies (half precision, head_dim % 8 == 0), except the
    short Hopper shapes of `hopper_ahead`;
  - block-causal (VAR, 680 / 2240 tokens, head dim 64), on the Hopper kernels with the arrays
    unpadded (HOPPER_UNPADDED): 1.80–1.82× / 2.15× cuDNN given the same mask densely (1.35× /
    1.86× padded to whole tiles; Triton is 4.2× / 7.4× XLA); no [L, S] mask is built;
  - BSQ 4.9× (its default launch, bench_hopper_bwd_h100.json) and VQ (16384 codes) 3.6× the
    XLA-fused jnp versions, VQ without the 4.3 GB tokens × codes buffer.
TPU: checked in interpret mode, and lowered for a v5e from a CPU (jax's Pallas TPU lowering:
block shapes and primitives; `tests/test_kernels.py -k lower_for_tpu`); not yet compiled or run
on a TPU.
"""
from __future__ import annotations

import jax

# Backends where the Pallas kernels passed their tests compiled. Add "tpu" once
# `pytest tests/test_kernels.py -m "slow or not slow"` passes there and tools/bench_kernels.py
# shows them ahead.
HARDWARE_VALIDATED: frozenset = frozenset({"gpu"})

# Mask kinds for which the vendor's fused attention (cuDNN) beat ours in the benchmark: "auto"
# keeps it there whenever it supports the dtype and head dim.
VENDOR_AHEAD = {"gpu": ("none", "causal"), "tpu": ()}

# Hopper GPUs (sm_90): for half-precision attention up to this many queries, by mask, with query
# and key lengths in whole 128-token tiles and head dim 64 or 128, our Mosaic GPU kernels (with
# the Triton backward below `flash_attention_hopper.BACKWARD_MIN_Q_LEN`) beat cuDNN on an H100:
#   - unmasked, fwd+bwd 1.24× / 1.19× at L = 256 (head dim 128 / 64) and 1.03× / 1.06× at 1024,
#     forward alone 1.07× / 1.00× and 1.01× / 0.93× (docs/kernels/bench_hopper_bwd_h100.json; 512
#     not measured); from 4096 on cuDNN leads (0.92–0.98×). ViTok's 256-token images fall here.
#   - causal (`HOPPER_PREFIX_MASKS`), fwd+bwd 1.35× / 1.23× at 256, 1.15× / 1.15× at 512, 1.02× /
#     1.14× at 1024, 1.01× / 1.11× at 2048; from 4096 on a tie (0.99–1.05×), where cuDNN stays, as
#     its backward is deterministic (docs/kernels/bench_hopper_causal_h100.json,
#     bench_hopper_default_h100.json). LlamaGen's 256–1024 tokens fall here.
HOPPER_AHEAD_MAX_LEN = {"none": 1024, "causal": 2048}

# Whether flash_attention (hopper unset) takes the Hopper kernels (the backward from
# `flash_attention_hopper.BACKWARD_MIN_Q_LEN` queries on, and for block-causal masks) for masks
# that show each query a prefix of the keys (causal, block-causal with rising static ids, key
# padding: `flash_attention_hopper.PrefixMask`), in place of Triton. On an H100 (jax 0.11.2, CUDA
# 13.0, bf16, head dim 64; docs/kernels/bench_hopper_masked_h100.json) their tests pass compiled
# (`test_hopper_masked_kernels_match_reference`) and fwd+bwd they beat Triton at every length
# measured, with that backward rule: block-causal 0.75–0.77 / 1.14–1.16 ms against 0.77–0.78 /
# 1.24–1.25 at VAR's 680 / 2240 tokens (1.33–1.37× / 1.81–1.83× our dense visit, 1.35–1.38× /
# 1.86–1.89× cuDNN given the mask densely; three runs), causal 1.05–1.41× Triton for L 256–8192
# (bench_hopper_causal_h100.json, bench_hopper_default_h100.json). Their forward alone is slower
# than Triton's at 2240 (0.38–0.39 against 0.34–0.35 ms).
HOPPER_PREFIX_MASKS = True

# Whether flash_attention, where both passes run on the Hopper kernels under a `PrefixMask`, lets
# them skip the tiles that hold query padding alone (`PrefixMask.q_valid`). Padding rows see
# what the last true row sees: at VAR's 680 tokens (padded to 768) every key, and skipping cuts
# the tiles walked by 11% forward (64 × 128 tiles) and 11% backward (64 × 64), by count; at 2240
# by 4% / 4%. On an H100 (jax 0.11.2, CUDA 13.0) its tests pass compiled
# (`test_hopper_masked_kernels_match_reference[skip_padded-*]`, tools/check_hopper_gpu.sh) and,
# with HOPPER_UNPADDED below, fwd+bwd 0.567 against 0.578 ms at 680 tokens and 0.995 against
# 1.004 ms at 2240; padded, 0.706 against 0.758 and 1.128 against 1.148
# (docs/kernels/bench_hopper_var_variants_h100.json).
HOPPER_SKIP_PADDED_QUERIES = True

# Whether flash_attention, where both passes run on the Hopper kernels, hands them the arrays
# with their lengths as they are (multiples of `flash_attention_hopper.LENGTH_MULTIPLE`) rather
# than padded to whole 128-token tiles: TMA reads past the end as zeros and drops the writes
# there, and the key tail is masked in the kernels. Padding copies q, k, v and dO in and slices
# dq, dk, dv (and the output) back out: at VAR's 680 tokens (padded to 768; batch 24, 16 heads,
# head dim 64) that is about 0.45 of the 0.7 GB XLA moves around the two kernels in a fwd+bwd
# step (counted by hand from the exported program's arrays; dq's zeros, its cast and delta are
# the rest), about 0.15 ms at 3 TB/s against the 0.76 ms measured for the step. On an H100 (jax
# 0.11.2, CUDA 13.0, bf16, 16 heads, head dim 64; batch 24 at 680 tokens, 7 at 2240) its tests
# pass compiled (`test_hopper_kernels_take_lengths_as_they_are`), and with both flags set
# block-causal fwd+bwd takes 0.567–0.576 ms at 680 tokens against 0.758–0.769 padded (1.80–1.82×
# cuDNN given the mask densely, 1.80–1.81× our dense visit) and 0.995–1.015 ms at 2240 against
# 1.148–1.171 (2.15× cuDNN, 2.08–2.10× dense); two runs, the benchmark's `pallas_padded` rows
# timing the padded path (docs/kernels/bench_hopper_var_variants_h100.json, before the flags
# were set; bench_hopper_var_h100.json, after).
HOPPER_UNPADDED = True


def hopper_ahead(dtype, q_len, kv_len, head_dim, mask: str = "none") -> bool:
  """Whether attention of this shape and mask kind ("none" or "causal") is one where the Hopper
  kernels beat cuDNN: at most HOPPER_AHEAD_MAX_LEN[mask] queries, in whole tiles (the lengths
  measured) that the kernels take (`flash_attention_hopper.unsupported_reason`); causal only
  while HOPPER_PREFIX_MASKS sends it to them."""
  max_len = HOPPER_AHEAD_MAX_LEN.get(mask) if mask == "none" or HOPPER_PREFIX_MASKS else None
  if max_len is None or q_len is None or head_dim is None or not 0 < q_len <= max_len:
    return False
  from vitok_jax.kernels import flash_attention_hopper  # Imports Mosaic GPU.
  kv_len = q_len if kv_len is None else kv_len
  if q_len % (2 * flash_attention_hopper.BLOCK_Q) or kv_len % flash_attention_hopper.BLOCK_K:
    return False  # Measured in whole tiles only.
  spec = lambda length: jax.ShapeDtypeStruct((1, length, 1, head_dim), dtype)
  kv = spec(kv_len)
  prefix = flash_attention_hopper.PrefixMask(causal=True) if mask == "causal" else None
  return flash_attention_hopper.unsupported_reason(spec(q_len), kv, kv, masked=prefix is not None,
                                                   mask=prefix) is None


def is_hopper(device=None) -> bool:
  """An sm_90 GPU (H100 / H200; default: the first device), where wgmma and TMA exist."""
  device = device or jax.devices()[0]
  return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


# Shortest sequence for which flash attention is chosen over materialising the scores when no
# vendor kernel applies (e.g. float32). On GPU ours beat XLA from 256 tokens on in bf16; below
# ~1k tokens the [L, L] scores are small either way, so XLA keeps short sequences.
MIN_FLASH_LEN = {"gpu": 1024, "tpu": 512}


def backend() -> str:
  return jax.default_backend()


def pallas_allowed(on_backend: str) -> bool:
  """A hardware-validated backend. Under a mesh the kernels run per shard (`kernels.shard`)."""
  return on_backend in HARDWARE_VALIDATED
