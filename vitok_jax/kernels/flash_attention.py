"""Flash attention: the differentiable entry point in front of the Pallas GPU and TPU kernels.

This file holds what both kernels share: argument checks, padding the sequence lengths to whole
blocks (the padded keys are masked, the padded queries sliced off), the key-block ranges that let
kernels skip fully masked tiles (`masks.block_ranges`), grouped-query heads, and the custom VJP.
The kernels themselves (`flash_attention_gpu`, `flash_attention_tpu`) implement

  forward(q, k, v, ids, kv_range, cfg) -> (out_BLHD, lse_BHL)
  backward(q, k, v, ids, kv_range, q_range, do, lse, delta, cfg) -> (dq, dk, dv)

on padded arrays (ranges: `masks.BlockRange`), with dk/dv per *query* head (this file sums them
over each group). On Hopper GPUs the GPU module hands forward and backward passes to the Mosaic
GPU kernels (`flash_attention_hopper`, chosen here: `hopper`; unmasked, or prefix masks while
`policy.HOPPER_PREFIX_MASKS` is set), whose logsumexp is the Triton kernels' own. No [L, S] array
exists at any point: scores live in one tile at a time, the backward recomputes them from the
saved logsumexp (natural log).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from vitok_jax.errors import ConfigError
from vitok_jax.kernels import masks
from vitok_jax.kernels import policy
from vitok_jax.kernels import recording

# Length multiple of the masked Hopper kernels (`flash_attention_hopper`: 2·BLOCK_Q, BLOCK_K).
HOPPER_MULTIPLE = 128
# Finite "minus infinity" for masked scores: exp(mask - max) must be 0, never NaN (inf - inf).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes in tokens (powers of two; lengths pad to the largest) and GPU launch settings.

  The forward runs a program per `block_q` queries stepping over `block_k` keys; the dK/dV kernel a
  program per `block_k_bwd` keys stepping over `block_q_bwd` queries; the dQ kernel a program per
  `block_q_dq` queries stepping over `block_k_dq` keys (default: the dK/dV pair). The GPU kernels
  take `num_warps` (forward) / `num_warps_bwd` (default: by tile size) and `num_stages`; the TPU
  kernel uses none of these, nor separate dQ tiles.
  """
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  block_q_dq: Optional[int] = None
  block_k_dq: Optional[int] = None
  num_warps: Optional[int] = None
  num_warps_bwd: Optional[int] = None
  num_stages: int = 2

  @property
  def dq_tiles(self) -> tuple[int, int]:
    return (self.block_q_dq or self.block_q_bwd, self.block_k_dq or self.block_k_bwd)


# GPU: the fastest correct tiles of tools/tune_kernels.py on an H200 (bf16, L = 4096, head dims 64
# and 128; docs/kernels/tuned_kernels_h200.json): 4 warps beat 8 everywhere (fwd+bwd 5.6–6.1 ms
# against 9.8 ms at head dim 128). TPU: a starting point, not yet measured (Mosaic wants large
# tiles to amortise the ~0.35 µs per grid step).
DEFAULT_BLOCK_SIZES = {
    "gpu": BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4,
                      num_warps_bwd=4, num_stages=2),
    "tpu": BlockSizes(block_q=256, block_k=512, block_q_bwd=256, block_k_bwd=256),
}
# GPU, block-causal masks (VAR): tools/tune_kernels.py --var_lengths 2240,680 on an H100 (head dim
# 64; docs/kernels/tuned_var_h100.json): 64 × 64 tiles throughout, 4 warps, 3 stages; smaller
# tiles skip more hidden pairs. Forward 0.34 / 0.29 ms against 0.48 / 0.35 ms with the tiles
# above; fwd+bwd 1.26 / 0.83 ms. Elsewhere the tiles above.
BLOCK_CAUSAL_BLOCK_SIZES = {
    "gpu": BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4,
                      num_warps_bwd=4, num_stages=3),
}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static (hashable) settings the kernels are specialised on."""
  scale: float
  causal: bool
  kv_len: Optional[int]  # True key count when keys were padded to whole blocks, else None.
  group: int  # Query heads per key/value head.
  blocks: BlockSizes
  interpret: bool
  hopper_forward: bool = False  # GPU: the forward on the Mosaic GPU kernels (`hopper`),
  hopper_backward: bool = False  # and the backward.
  hopper_mask: Optional[Any] = None  # Their `flash_attention_hopper.PrefixMask` (None: none).


def _kernel_module(backend: str):
  # Imported lazily: each module imports its Pallas backend (Triton / Mosaic) at load time.
  if backend == "gpu":
    from vitok_jax.kernels import flash_attention_gpu
    return flash_attention_gpu
  if backend == "tpu":
    from vitok_jax.kernels import flash_attention_tpu
    return flash_attention_tpu
  raise ConfigError(f"flash attention backend={backend!r} is unknown; use 'gpu' or 'tpu'")


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _fit_block(block: int, length: int, minimum: int) -> int:
  """The block, shrunk to the smallest power of two ≥ length (and ≥ minimum) for short inputs."""
  return min(block, max(minimum, 1 << max(length - 1, 0).bit_length()))


def fit_block_sizes(blocks: BlockSizes, q_len: int, kv_len: int, minimum: int) -> BlockSizes:
  """Checks the tiles are powers of two and shrinks them for short sequences."""
  block_q_dq, block_k_dq = blocks.dq_tiles
  tiles = dict(block_q=blocks.block_q, block_q_bwd=blocks.block_q_bwd, block_q_dq=block_q_dq,
               block_k=blocks.block_k, block_k_bwd=blocks.block_k_bwd, block_k_dq=block_k_dq)
  bad = {name: size for name, size in tiles.items() if size < 1 or size & (size - 1)}
  if bad:
    raise ConfigError(f"flash attention tiles must be powers of two, got {bad}")
  return dataclasses.replace(blocks, **{
      name: _fit_block(size, q_len if name.startswith("block_q") else kv_len, minimum)
      for name, size in tiles.items()})


def padded_lengths(blocks: BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
  """Lengths rounded up to the largest query / key tile (a multiple of every other one)."""
  block_q_dq, block_k_dq = blocks.dq_tiles
  return (_round_up(q_len, max(blocks.block_q, blocks.block_q_bwd, block_q_dq)),
          _round_up(kv_len, max(blocks.block_k, blocks.block_k_bwd, block_k_dq)))


def _pad_axis(x, axis: int, size: int, mode: str = "constant"):
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, mode=mode)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(backend, cfg, q_BLHD, k_BSHD, v_BSHD, ids, fwd_range, bwd_ranges):
  return _kernel_module(backend).forward(q_BLHD, k_BSHD, v_BSHD, ids, fwd_range, cfg)


def _flash_fwd(backend, cfg, q_BLHD, k_BSHD, v_BSHD, ids, fwd_range, bwd_ranges):
  out_BLHD, lse_BHL = _flash(backend, cfg, q_BLHD, k_BSHD, v_BSHD, ids, fwd_range, bwd_ranges)
  residuals = (q_BLHD, k_BSHD, v_BSHD, ids, bwd_ranges, out_BLHD, lse_BHL)
  return (out_BLHD, lse_BHL), residuals


def _flash_bwd(backend, cfg, residuals, cotangents):
  q_BLHD, k_BSHD, v_BSHD, ids, (kv_range, q_range), out_BLHD, lse_BHL = residuals
  do_BLHD, dlse_BHL = cotangents
  # dS = P ∘ (dP − delta) with delta_i = Σ_d o·do; a cotangent on lse adds P·dlse, i.e. −dlse.
  # (The Hopper kernels' lse may run past the queries, to whole programs: delta is 0 there.)
  delta_BHL = _pad_axis(jnp.einsum("blhd,blhd->bhl", out_BLHD.astype(jnp.float32),
                                   do_BLHD.astype(jnp.float32)), 2, lse_BHL.shape[2]) - dlse_BHL
  dq_BLHD, dk_BSHD, dv_BSHD = _kernel_module(backend).backward(
      q_BLHD, k_BSHD, v_BSHD, ids, kv_range, q_range, do_BLHD, lse_BHL, delta_BHL, cfg)
  # Kernels return dk/dv per query head; grouped-query heads share one key/value head.
  if cfg.group > 1:
    batch, kv_len, heads, head_dim = dk_BSHD.shape
    group_sum = lambda x: x.reshape(batch, kv_len, heads // cfg.group, cfg.group,
                                    head_dim).astype(jnp.float32).sum(3)
    dk_BSHD, dv_BSHD = group_sum(dk_BSHD), group_sum(dv_BSHD)
  return (dq_BLHD.astype(q_BLHD.dtype), dk_BSHD.astype(k_BSHD.dtype),
          dv_BSHD.astype(v_BSHD.dtype), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _hopper_possible(hopper: Union[None, bool, str], backend: str, interpret: bool) -> bool:
  """Whether the Hopper kernels may take this call: asked for or allowed, on an sm_90 GPU."""
  if hopper not in (None, True, False, "forward"):
    raise ConfigError(f"hopper={hopper!r}; use None, True, False or 'forward'")
  return hopper is not False and backend == "gpu" and not interpret and policy.is_hopper()


def _prefix_mask(*, causal: bool, segment_ids, block_ids, q_len: int, kv_len: int):
  """The `flash_attention_hopper.PrefixMask` of these masks (without key padding), or None if
  they do not show every query a prefix of the keys: segment ids, causal cross-attention, block
  ids that are traced, per example, a (q, kv) pair or not rising."""
  from vitok_jax.kernels import flash_attention_hopper as kernels  # Imports Mosaic GPU.
  if segment_ids is not None or ((causal or block_ids is not None) and q_len != kv_len):
    return None
  if block_ids is not None:
    block_ids = masks.static_ids(block_ids)  # Known when tracing, one sequence's?
    if block_ids is None:
      return None
    blocks = kernels.PrefixMask.from_block_ids(block_ids)
    if blocks is None or not causal:  # (Causal within rising block ids is causal.)
      return blocks
  return kernels.PrefixMask(causal=causal)


def _with_key_padding(prefix, padded_kv: int, kv_len: int):
  """`prefix` with the keys from kv_len on hidden when they are padding."""
  return dataclasses.replace(prefix, kv_valid=kv_len) if padded_kv != kv_len else prefix


def _hopper_padding(prefix, q_BLHD, k_BSHD, padded_q: int, padded_kv: int, padded_dim: int,
                    scale: float, hopper: Union[None, bool, str] = None
                    ) -> tuple[int, int, bool]:
  """(q length, kv length, unpadded) for the Hopper kernels: the arrays' own lengths, unpadded,
  where both passes run on them over the arrays as they are (`policy.HOPPER_UNPADDED`); else
  (padded_q, padded_kv) rounded up to whole 128-token tiles (a multiple of every Triton tile;
  one length for a causal mask) if the kernels take the call so padded, the padded keys hidden by
  `prefix`'s kv_valid; else unchanged (Triton keeps its own padding)."""
  from vitok_jax.kernels import flash_attention_hopper as kernels  # Imports Mosaic GPU.
  spec = lambda x, length: jax.ShapeDtypeStruct((x.shape[0], length, x.shape[2], padded_dim),
                                                x.dtype)
  q_len, kv_len = q_BLHD.shape[1], k_BSHD.shape[1]
  if policy.HOPPER_UNPADDED:
    # The key tail is the kernels' own mask (`hide_key_tail`): as masked as flash_attention sees it.
    mask = kernels.hide_key_tail(prefix if prefix.causal or prefix.block_ends else None, kv_len)
    q, kv = spec(q_BLHD, q_len), spec(k_BSHD, kv_len)
    if (kernels.unsupported_reason(q, kv, kv, masked=mask is not None, mask=mask, scale=scale)
        is None and _use_hopper(hopper, True, mask is not None, mask, scale, q, kv, kv,
                                unpadded=True) == (True, True)):
      return q_len, kv_len, True
  q_to, kv_to = _round_up(padded_q, HOPPER_MULTIPLE), _round_up(padded_kv, HOPPER_MULTIPLE)
  if prefix.causal or prefix.block_ends:
    q_to = kv_to = max(q_to, kv_to)
  mask = _with_key_padding(prefix, kv_to, kv_len)
  masked = bool(mask.causal or mask.block_ends or mask.kv_valid)
  kv = spec(k_BSHD, kv_to)
  reason = kernels.unsupported_reason(spec(q_BLHD, q_to), kv, kv, masked=masked,
                                      mask=mask if masked else None, scale=scale)
  return (q_to, kv_to, False) if reason is None else (padded_q, padded_kv, False)


def _skip_padded_queries(mask, q_len: int, q_BLHD, k_BSHD, v_BSHD, scale: float):
  """`mask` with the tiles of query padding alone skipped (`PrefixMask.q_valid`) while
  `policy.HOPPER_SKIP_PADDED_QUERIES` is set and the kernels take it (the padding, from Triton
  tiles larger than 128, can span a whole program); for both Hopper passes only, as Triton's
  backward would read the skipped rows' lse."""
  if not policy.HOPPER_SKIP_PADDED_QUERIES:
    return mask
  from vitok_jax.kernels import flash_attention_hopper as kernels  # Imports Mosaic GPU.
  skipping = dataclasses.replace(mask, q_valid=q_len)
  reason = kernels.unsupported_reason(q_BLHD, k_BSHD, v_BSHD, masked=True, mask=skipping,
                                      scale=scale)
  return mask if reason else skipping


def _use_hopper(hopper: Union[None, bool, str], possible: bool, masked: bool, mask, scale: float,
                q_BLHD, k_BSHD, v_BSHD, *, unpadded: bool = False) -> tuple[bool, bool]:
  """(forward, backward): which passes over these (padded) arrays run on the Hopper kernels (see
  `flash_attention`'s `hopper`); mask: the call's `PrefixMask` if it is one. Their lengths must
  be whole 128-token tiles unless `unpadded` (`policy.HOPPER_UNPADDED` chose to pass them as
  they are)."""
  if hopper is False:
    return False, False
  reason = "the Hopper kernel runs compiled on an sm_90 GPU only"
  if possible:
    from vitok_jax.kernels import flash_attention_hopper as kernels  # Imports Mosaic GPU.
    reason = kernels.unsupported_reason(q_BLHD, k_BSHD, v_BSHD, masked=masked, mask=mask,
                                        scale=scale)
    lengths = (q_BLHD.shape[1], k_BSHD.shape[1])
    if reason is None and not unpadded and any(n % HOPPER_MULTIPLE for n in lengths):
      reason = (f"lengths {lengths} are not whole {HOPPER_MULTIPLE}-token tiles (flash_attention "
                "pads them so where the Hopper kernels take the call; they take them unpadded "
                "only with policy.HOPPER_UNPADDED)")
  if hopper and reason:
    raise ConfigError(f"hopper={hopper!r}: {reason}; leave hopper unset to fall back to Triton")
  if reason or (hopper is None and masked and not policy.HOPPER_PREFIX_MASKS):
    return False, False
  if hopper is None:  # Where the Hopper backward was measured ahead of Triton's: from
    # BACKWARD_MIN_Q_LEN queries on, and block-causal at VAR's lengths (680 and 2240) too.
    block_causal = mask is not None and bool(mask.block_ends)
    return True, block_causal or q_BLHD.shape[1] >= kernels.BACKWARD_MIN_Q_LEN
  return True, hopper is True


def default_backend() -> str:
  """Kernel flavour for this machine: the TPU kernel on TPU, else the Triton one (interpreted on
  CPU, where it is the faster of the two to interpret)."""
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def check_qkv(q_BLHD, k_BSHD, v_BSHD) -> None:
  """ConfigError for q, k, v no attention implementation takes: not [B, L, H, D] and [B, S, Hk, D]
  with one batch and head dim, Hk not dividing H, dtypes that differ or are not floating point,
  or an empty axis."""
  shapes = f"q {q_BLHD.shape}, k {k_BSHD.shape}, v {v_BSHD.shape}"
  if any(x.ndim != 4 for x in (q_BLHD, k_BSHD, v_BSHD)):
    raise ConfigError(f"attention takes q [B, L, H, D] and k, v [B, S, Hk, D]; got {shapes}")
  dtypes = [jnp.dtype(x.dtype).name for x in (q_BLHD, k_BSHD, v_BSHD)]
  if len(set(dtypes)) > 1:  # XLA refuses them; the kernels would quietly compute in q's.
    raise ConfigError(f"attention q, k, v have dtypes {', '.join(dtypes)}; cast them to one")
  if not jnp.issubdtype(q_BLHD.dtype, jnp.floating):
    raise ConfigError(f"attention needs floating-point q, k, v; got {dtypes[0]}")
  batch, _, heads, head_dim = q_BLHD.shape
  if k_BSHD.shape != v_BSHD.shape or k_BSHD.shape[::3] != (batch, head_dim):
    raise ConfigError(f"attention needs k and v of shape [{batch}, S, kv_heads, {head_dim}]; "
                      f"got {shapes}")
  if heads % k_BSHD.shape[2]:
    raise ConfigError(f"kv_heads={k_BSHD.shape[2]} must divide heads={heads} (grouped-query "
                      "attention)")
  if 0 in q_BLHD.shape or 0 in k_BSHD.shape:
    raise ConfigError(f"attention over an empty axis: {shapes}")


def flash_attention(q_BLHD, k_BSHD, v_BSHD, *, causal: bool = False, segment_ids=None,
                    block_ids=None, scale: Optional[float] = None,
                    block_sizes: Optional[BlockSizes] = None, backend: Optional[str] = None,
                    interpret: Optional[bool] = None, return_lse: bool = False,
                    skip_blocks: bool = True, hopper: Union[None, bool, str] = None):
  """softmax(scale·q·kᵀ + mask)·v in tiles, differentiable in q, k and v.

  Args:
    q_BLHD: [batch, q_len, heads, head_dim]; k_BSHD, v_BSHD: [batch, kv_len, kv_heads, head_dim]
      with kv_heads dividing heads. float32 or bfloat16 (accumulation is float32).
    causal: query i sees keys ≤ i.
    segment_ids: [L] or [B, L] ints (or a (q_ids, kv_ids) pair): only equal ids see each other.
    block_ids: [L] or [B, L] ints (or a pair): block-causal, key j visible if ids[j] ≤ ids[i].
      (The Hopper kernels take them as a numpy [L] of rising ids, e.g. `masks.var_block_ids`.)
    scale: logit scale, default 1/√head_dim.
    block_sizes: tiles; default `BLOCK_CAUSAL_BLOCK_SIZES[backend]` with block_ids where there
      is one, else `DEFAULT_BLOCK_SIZES[backend]`; shrunk for short sequences.
    backend: "gpu" (Pallas Triton) or "tpu" (Pallas Mosaic); default `default_backend()`.
    interpret: run the kernel in the Pallas interpreter; default: on CPU.
    return_lse: also return the logsumexp [batch, heads, q_len] (float32, natural log).
    skip_blocks: skip the tiles the mask hides and build no mask on the tiles it wholly shows
      (`masks.block_ranges`); False visits every tile masked, the dense-mask baseline of
      tools/bench_kernels.py (same result, slower; a mask then runs on Triton).
    hopper: GPU: run forward and backward on the warp-specialised Mosaic GPU kernels
      (`flash_attention_hopper`). Default: where they apply (an sm_90 GPU, compiled, no mask or
      one that shows each query a prefix of the keys (causal or rising block ids in
      self-attention, key padding: `flash_attention_hopper.PrefixMask`, while
      `policy.HOPPER_PREFIX_MASKS` is set), bf16/f16, head dim 33–128 (padded to 64 / 128),
      query and key lengths padded to multiples of 128, a positive scale), the backward from
      `BACKWARD_MIN_Q_LEN` queries on and for block-causal masks; True: both, raising if they do
      not apply; "forward" keeps the Triton backward; False keeps Triton for both. The Hopper
      backward adds dq up with float32 atomics in no fixed order, so dq is not bitwise
      reproducible from run to run (the Triton backward is).
  Returns:
    out_BLHD in q's dtype (0 for a query that sees no key), and lse_BHL if return_lse.
  """
  check_qkv(q_BLHD, k_BSHD, v_BSHD)
  batch, q_len, heads, head_dim = q_BLHD.shape
  kv_len, kv_heads = k_BSHD.shape[1], k_BSHD.shape[2]
  backend = backend or default_backend()
  module = _kernel_module(backend)
  interpret = jax.default_backend() == "cpu" if interpret is None else interpret
  if block_sizes is None and block_ids is not None:
    block_sizes = BLOCK_CAUSAL_BLOCK_SIZES.get(backend)
  block_sizes = block_sizes or DEFAULT_BLOCK_SIZES[backend]
  if backend == "tpu" and block_sizes.dq_tiles != (block_sizes.block_q_bwd,
                                                   block_sizes.block_k_bwd):
    raise ConfigError("the TPU kernel has no separate dQ tiles; leave block_q_dq / block_k_dq "
                      "unset")
  blocks = fit_block_sizes(block_sizes, q_len, kv_len, module.MIN_BLOCK)
  padded_q, padded_kv = padded_lengths(blocks, q_len, kv_len)
  padded_dim = module.padded_head_dim(head_dim)
  try:
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  except jax.errors.ConcretizationTypeError:
    raise ConfigError("the Pallas attention kernels take scale as a Python number, not a traced "
                      "value; scale q before the call (and pass scale=1.0) instead") from None
  hopper_possible = _hopper_possible(hopper, backend, interpret)
  if hopper and not skip_blocks and (causal or block_ids is not None):
    raise ConfigError(f"hopper={hopper!r} with skip_blocks=False: the Hopper kernels always skip "
                      "the tiles a mask hides; the dense visit runs on Triton (hopper=False)")
  prefix = _prefix_mask(causal=causal, segment_ids=segment_ids, block_ids=block_ids,
                        q_len=q_len, kv_len=kv_len) if hopper_possible and skip_blocks else None
  unpadded = False
  if prefix is not None and (hopper or policy.HOPPER_PREFIX_MASKS):
    padded_q, padded_kv, unpadded = _hopper_padding(prefix, q_BLHD, k_BSHD, padded_q, padded_kv,
                                                    padded_dim, scale, hopper)
  # Zero head-dim padding changes no score and adds output columns that are sliced off.
  pad = lambda x, length: _pad_axis(_pad_axis(x, 1, length), 3, padded_dim)
  q_BLHD, k_BSHD, v_BSHD = pad(q_BLHD, padded_q), pad(k_BSHD, padded_kv), pad(v_BSHD, padded_kv)
  masked = causal or padded_kv != kv_len or segment_ids is not None or block_ids is not None
  hopper_mask = (_with_key_padding(prefix, padded_kv, kv_len)
                 if masked and prefix is not None else None)
  hopper_forward, hopper_backward = _use_hopper(hopper, hopper_possible, masked, hopper_mask,
                                                scale, q_BLHD, k_BSHD, v_BSHD, unpadded=unpadded)
  if hopper_backward and hopper_mask is not None and _round_up(padded_q, HOPPER_MULTIPLE) != q_len:
    hopper_mask = _skip_padded_queries(hopper_mask, q_len, q_BLHD, k_BSHD, v_BSHD, scale)
  recording.annotate(kernel="mosaic_tpu" if backend == "tpu" else (
      ("mosaic_gpu" if hopper_backward else "mosaic_gpu_fwd") if hopper_forward else "triton"),
                     hopper_mask=bool(hopper_forward and hopper_mask))
  cfg = KernelConfig(scale=scale, causal=causal, kv_len=None if padded_kv == kv_len else kv_len,
                     group=heads // kv_heads, blocks=blocks, interpret=interpret,
                     hopper_forward=hopper_forward, hopper_backward=hopper_backward,
                     hopper_mask=hopper_mask if hopper_forward else None)
  ids = masks.make_ids(batch, q_len, kv_len, segment_ids=segment_ids, block_ids=block_ids)
  # Padded tokens repeat the last id, so the per-block id ranges (and the skipping) are unchanged.
  ids = masks.MaskIds(*(_pad_axis(x, 1, padded_q if i % 2 == 0 else padded_kv, mode="edge")
                        for i, x in enumerate(ids)))
  # The tile ranges the Triton kernels skip by (the Hopper kernels take theirs from the mask).
  ranges = lambda bq, bk: masks.block_ranges(ids, batch, padded_q, padded_kv, bq, bk,
                                             causal=causal, kv_valid=kv_len, skip=skip_blocks)
  fwd_range = None if hopper_forward else ranges(blocks.block_q, blocks.block_k)[0]
  bwd_ranges = (None, None) if hopper_backward else (ranges(*blocks.dq_tiles)[0],
                                                     ranges(blocks.block_q_bwd,
                                                            blocks.block_k_bwd)[1])
  out_BLHD, lse_BHL = _flash(backend, cfg, q_BLHD, k_BSHD, v_BSHD, ids, fwd_range, bwd_ranges)
  out_BLHD = out_BLHD[:, :q_len, :, :head_dim]
  return (out_BLHD, lse_BHL[:, :, :q_len]) if return_lse else out_BLHD
