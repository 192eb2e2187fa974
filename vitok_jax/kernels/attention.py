"""Scaled dot-product attention behind one function, so models never pick an implementation.

Implementations:
  "xla"         plain jax.nn.dot_product_attention (materialises the scores; portable reference);
  "cudnn"       jax.nn's cuDNN fused path (GPU, float16/bfloat16);
  "pallas"      our flash attention for this backend (`flash_attention`): "pallas_gpu" (Triton)
                or "pallas_tpu" (Mosaic); on CPU the Triton-style kernel runs interpreted;
  "pallas_gpu", "pallas_tpu"  a specific kernel (interpreted on CPU: how the tests check both);
  "auto"        what `resolve_impl` picks for the backend, dtype, length and mask (see `policy`).
Mask kinds: a dense boolean mask_BHLS (XLA/cuDNN only), is_causal, block_ids (block-causal, VAR) and
segment_ids (packed sequences); the id masks never build an [L, S] array on the Pallas path.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vitok_jax.errors import ConfigError
from vitok_jax.kernels import flash_attention as flash
from vitok_jax.kernels import masks
from vitok_jax.kernels import policy
from vitok_jax.kernels import recording
from vitok_jax.kernels import shard
from vitok_jax.parallel import sharding

IMPLS = ("auto", "xla", "cudnn", "pallas", "pallas_gpu", "pallas_tpu")
MASK_KINDS = ("none", "causal", "block_causal", "segment", "dense")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def mask_kind(*, mask_BHLS=None, is_causal: bool = False, segment_ids=None,
              block_ids=None) -> str:
  """The mask kind that decides the implementation (the most specific one given)."""
  if mask_BHLS is not None:
    return "dense"
  if block_ids is not None:
    return "block_causal"
  if segment_ids is not None:
    return "segment"
  return "causal" if is_causal else "none"


def _cudnn_supports(dtype, head_dim: Optional[int]) -> bool:
  return jnp.dtype(dtype) in _HALF and (head_dim is None or (head_dim % 8 == 0 and head_dim <= 128))


def resolve_impl(impl: str, dtype=jnp.float32, *, q_len: Optional[int] = None,
                 head_dim: Optional[int] = None, mask: str = "none",
                 backend: Optional[str] = None, kv_len: Optional[int] = None,
                 hopper: Optional[bool] = None) -> str:
  """The concrete implementation `impl` runs as: "xla", "cudnn", "pallas_gpu" or "pallas_tpu".

  "auto" on CPU is always "xla". On GPU/TPU, where `policy` allows the Pallas kernel (the backend
  is hardware-validated): cuDNN for the mask kinds where the benchmark found it ahead
  (`policy.VENDOR_AHEAD`) if it supports the dtype and head dim, except on a Hopper GPU for the
  unmasked and causal shapes of `policy.hopper_ahead` (short sequences), which take ours; else our
  kernel for a mask whose empty tiles it skips (block-causal, segments, causal) or a sequence of at
  least `policy.MIN_FLASH_LEN` tokens. Otherwise cuDNN for half precision with head_dim a
  multiple of 8 up to 128, else XLA. kv_len defaults to q_len; hopper (whether the GPU is an
  sm_90 one) to asking the device.
  """
  if impl not in IMPLS:
    raise ConfigError(f"attention impl={impl!r} is unknown; use one of {IMPLS}")
  if mask not in MASK_KINDS:
    raise ConfigError(f"attention mask kind {mask!r} is unknown; use one of {MASK_KINDS}")
  backend = backend or policy.backend()
  if impl == "pallas":
    return "pallas_tpu" if backend == "tpu" else "pallas_gpu"
  if impl != "auto":
    return impl
  vendor = backend == "gpu" and _cudnn_supports(dtype, head_dim)
  if backend in ("gpu", "tpu") and mask != "dense" and policy.pallas_allowed(backend):
    if vendor and mask in policy.VENDOR_AHEAD[backend]:
      hopper = policy.is_hopper() if hopper is None and backend == "gpu" else hopper
      ours_ahead = hopper and policy.hopper_ahead(dtype, q_len, kv_len, head_dim, mask)
      return "pallas_gpu" if ours_ahead else "cudnn"
    long_enough = q_len is not None and q_len >= policy.MIN_FLASH_LEN[backend]
    if long_enough or mask in ("block_causal", "segment", "causal"):
      return f"pallas_{backend}"
  return "cudnn" if vendor else "xla"


def per_shard(kernel, q_BLHD, k_BSHD, v_BSHD, ids: masks.MaskIds):
  """kernel(q, k, v, ids) on each device's share of the batch and heads (see `shard`): the mesh
  axes of "batch" and "act_heads", each kept only where it divides the batch / both head counts."""
  mesh = sharding.active_mesh()
  if mesh is None:
    return kernel(q_BLHD, k_BSHD, v_BSHD, ids)
  batch_axes = shard.divisible_axes("batch", q_BLHD.shape[0], mesh)
  head_axes = shard.divisible_axes("act_heads", math.gcd(q_BLHD.shape[2], k_BSHD.shape[2]), mesh)
  qkv_spec, id_spec = P(batch_axes, None, head_axes, None), P(batch_axes, None)
  id_specs = masks.MaskIds(*(None if x is None else id_spec for x in ids))
  return shard.run(kernel, q_BLHD, k_BSHD, v_BSHD, ids, mesh=mesh,
                   in_specs=(qkv_spec, qkv_spec, qkv_spec, id_specs), out_specs=qkv_spec)


def dot_product_attention(q_BLHD, k_BSHD, v_BSHD, *, mask_BHLS=None, is_causal=False,
                          segment_ids=None, block_ids=None, scale: Optional[float] = None,
                          impl: str = "auto"):
  """softmax(scale·q·kᵀ + mask)·v.

  Args:
    q_BLHD: queries [batch, q_len, heads, head_dim].
    k_BSHD, v_BSHD: keys/values [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads (GQA).
    mask_BHLS: optional boolean mask broadcastable to [batch, heads, q_len, kv_len]; True = attend.
      Not accepted by the Pallas kernels (use the id masks).
    is_causal: apply a causal mask (query i sees keys ≤ i).
    segment_ids: [L] or [B, L] ints, or a (q_ids, kv_ids) pair: attend within equal ids only.
    block_ids: [L] or [B, L] ints, or a pair: block-causal, key j visible from query i iff
      block_ids[j] ≤ block_ids[i] (VAR: the scale index of each token, `masks.var_block_ids`).
    scale: logit scale, default 1/√head_dim.
    impl: one of IMPLS.
  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  flash.check_qkv(q_BLHD, k_BSHD, v_BSHD)
  batch, q_len, _, head_dim = q_BLHD.shape
  kv_len = k_BSHD.shape[1]
  if mask_BHLS is not None and jnp.dtype(mask_BHLS.dtype) != jnp.bool_:
    raise ConfigError(f"attention mask_BHLS must be boolean (True = attend), got "
                      f"{jnp.dtype(mask_BHLS.dtype).name}")
  kind = mask_kind(mask_BHLS=mask_BHLS, is_causal=is_causal, segment_ids=segment_ids,
                   block_ids=block_ids)
  impl = resolve_impl(impl, q_BLHD.dtype, q_len=q_len, head_dim=head_dim, mask=kind,
                      kv_len=kv_len)
  ids = masks.make_ids(batch, q_len, kv_len, segment_ids=segment_ids, block_ids=block_ids)
  if impl.startswith("pallas") and mask_BHLS is not None:
    raise ConfigError(f"attention impl={impl!r} takes no dense mask_BHLS; express the mask as "
                      "is_causal / segment_ids / block_ids, or use impl='xla'")
  visible = (None if mask_BHLS is not None or segment_ids is not None else
             masks.visible_pairs(q_len, kv_len, causal=is_causal, block_ids=block_ids))
  recording.note(impl=impl, mask=kind, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                 dtype=jnp.dtype(q_BLHD.dtype).name, batch=batch, heads=q_BLHD.shape[2],
                 visible_pairs=visible,
                 **({"kernel": None} if impl.startswith("pallas") else {}))  # flash_attention's.
  if impl.startswith("pallas"):
    # Static block ids of one sequence (VAR's) stay numpy, so the kernel can see their layout.
    static_block_ids = masks.static_ids(block_ids)
    kernel = lambda q, k, v, ids: flash.flash_attention(
        q, k, v, causal=is_causal, scale=scale, backend=impl.removeprefix("pallas_"),
        segment_ids=None if ids.q_segment_BL is None else (ids.q_segment_BL, ids.kv_segment_BS),
        block_ids=(static_block_ids if static_block_ids is not None else
                   None if ids.q_block_BL is None else (ids.q_block_BL, ids.kv_block_BS)))
    return per_shard(kernel, q_BLHD, k_BSHD, v_BSHD, ids)
  id_mask = masks.dense_mask(ids, q_len, kv_len, causal=False)
  if id_mask is not None:
    mask_BHLS = id_mask if mask_BHLS is None else jnp.logical_and(mask_BHLS, id_mask)
  out_BLHD = jax.nn.dot_product_attention(
      q_BLHD, k_BSHD, v_BSHD, mask=mask_BHLS, is_causal=is_causal, scale=scale,
      implementation=impl)
  if mask_BHLS is None:
    return out_BLHD
  # A row that sees no key is 0, as in the kernels and the reference (jax's gives it mean(v)).
  # (Causal alone always shows key 0.)
  if is_causal:
    mask_BHLS = mask_BHLS & masks.dense_mask(masks.MaskIds(), q_len, kv_len, causal=True)
  sees_BHL = jnp.broadcast_to(mask_BHLS.any(-1), (batch, q_BLHD.shape[2], q_len))
  return jnp.where(jnp.swapaxes(sees_BHL, 1, 2)[..., None], out_BLHD, 0).astype(out_BLHD.dtype)
