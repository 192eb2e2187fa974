"""Flash attention kernels for TPUs (Pallas → Mosaic): forward, dK/dV and dQ.

The grid is (batch, head, outer block, inner block) with the innermost axis a reduction
("arbitrary"): the running max / normaliser / accumulators live in VMEM scratch, initialised at the
first inner step and written out at the last. The inner axis walks the blocks `masks.block_ranges`
marks as possibly visible: the scalar-prefetched range [lo, hi) offsets the block index maps, steps
past hi re-point at block hi − 1 (same block, so no new DMA) and skip their body with `pl.when`.

Layout follows Mosaic's (8, 128) tiling: the kernels work on [B, H, L, D] (this module transposes),
per-row statistics (logsumexp, delta) are replicated over 128 lanes, query ids over 128 lanes and
key ids over 8 sublanes, so every block's last two dims are full or tile multiples (as in jax's own
TPU flash attention).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vitok_jax.kernels import masks
from vitok_jax.kernels.flash_attention import MASK_VALUE, KernelConfig

MIN_BLOCK = 8  # Sublane tile: TPU blocks of rows come in multiples of 8.
LANES, SUBLANES = 128, 8
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def padded_head_dim(head_dim: int) -> int:
  return head_dim  # A block spanning the whole last dim is always legal.


def _dot(a, b, dims):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _scores_and_mask(q_QD, k_KD, q_start, k_start, id_tiles, cfg: KernelConfig):
  """scale·q·kᵀ [bq, bk] float32 with masked entries at MASK_VALUE, and the mask (or None)."""
  q_segment, kv_segment, q_block, kv_block = id_tiles
  s_QK = _dot(q_QD, k_KD, NT) * cfg.scale
  shape = s_QK.shape
  col = lambda x: None if x is None else x[:, :1]  # [bq, 128] lane-replicated → [bq, 1].
  row = lambda x: None if x is None else x[:1, :]  # [8, bk] sublane-replicated → [1, bk].
  mask_QK = masks.tile_mask(
      q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0),
      k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1),
      causal=cfg.causal, kv_len=cfg.kv_len,
      q_segment_Q1=col(q_segment), k_segment_1K=row(kv_segment),
      q_block_Q1=col(q_block), k_block_1K=row(kv_block))
  if mask_QK is not None:
    s_QK = jnp.where(mask_QK, s_QK, MASK_VALUE)
  return s_QK, mask_QK


def _probabilities(s_QK, m_Q1, mask_QK):
  p_QK = jnp.exp(s_QK - m_Q1)
  return p_QK if mask_QK is None else jnp.where(mask_QK, p_QK, 0.0)


def _load_ids(id_refs):
  return [None if ref is None else ref[...] for ref in id_refs]


def _forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs, cfg: KernelConfig):
  """q [bq, D], k/v [bk, D], ids; out o [bq, D], lse [bq, 128]; scratch m, l [bq, 128], acc."""
  id_refs, (o_ref, lse_ref), (m_ref, l_ref, acc_ref) = refs[:4], refs[4:6], refs[6:]
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * pl.num_programs(2) + i
  kv_index = lo_ref[row] + j

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(kv_index < hi_ref[row])
  def _step():
    s_QK, mask_QK = _scores_and_mask(q_ref[...], k_ref[...], i * cfg.blocks.block_q,
                                     kv_index * cfg.blocks.block_k, _load_ids(id_refs), cfg)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, s_QK.max(axis=1, keepdims=True))
    p_QK = _probabilities(s_QK, m_next[:, :1], mask_QK)
    rescale = jnp.exp(m_prev - m_next)
    l_ref[...] = rescale * l_ref[...] + p_QK.sum(axis=1, keepdims=True)
    v_KD = v_ref[...]
    acc_ref[...] = acc_ref[...] * rescale[:, :1] + _dot(p_QK.astype(v_KD.dtype), v_KD, NN)
    m_ref[...] = m_next

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_ref[...]
    seen = l > 0
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_ref[...] / l[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(l), -jnp.inf)


def _dkdv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                 cfg: KernelConfig):
  """Grid (b, h, key block j, query step i): dk, dv [bk, D] accumulate over query blocks."""
  id_refs, (dk_ref, dv_ref), (dk_acc, dv_acc) = refs[:4], refs[4:6], refs[6:]
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * pl.num_programs(2) + j
  q_index = lo_ref[row] + i

  @pl.when(i == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  @pl.when(q_index < hi_ref[row])
  def _step():
    q_QD, do_QD = q_ref[...], do_ref[...]
    s_QK, mask_QK = _scores_and_mask(q_QD, k_ref[...], q_index * cfg.blocks.block_q_bwd,
                                     j * cfg.blocks.block_k_bwd, _load_ids(id_refs), cfg)
    p_QK = _probabilities(s_QK, lse_ref[...][:, :1], mask_QK)
    dv_acc[...] += _dot(p_QK.astype(do_QD.dtype), do_QD, TN)
    ds_QK = p_QK * (_dot(do_QD, v_ref[...], NT) - delta_ref[...][:, :1])
    dk_acc[...] += _dot(ds_QK.astype(q_QD.dtype), q_QD, TN)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               cfg: KernelConfig):
  """Grid (b, h, query block i, key step j): dq [bq, D] accumulates over key blocks."""
  id_refs, (dq_ref,), (dq_acc,) = refs[:4], refs[4:5], refs[5:]
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * pl.num_programs(2) + i
  kv_index = lo_ref[row] + j

  @pl.when(j == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  @pl.when(kv_index < hi_ref[row])
  def _step():
    k_KD = k_ref[...]
    s_QK, mask_QK = _scores_and_mask(q_ref[...], k_KD, i * cfg.blocks.block_q_bwd,
                                     kv_index * cfg.blocks.block_k_bwd, _load_ids(id_refs), cfg)
    p_QK = _probabilities(s_QK, lse_ref[...][:, :1], mask_QK)
    ds_QK = p_QK * (_dot(do_ref[...], v_ref[...], NT) - delta_ref[...][:, :1])
    dq_acc[...] += _dot(ds_QK.astype(k_KD.dtype), k_KD, NN)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_acc[...] * cfg.scale).astype(dq_ref.dtype)


def _clamped(lo_ref, hi_ref, row, step):
  """Block index lo + step, held at hi − 1 past the range (a revisit costs no DMA)."""
  return jnp.minimum(lo_ref[row] + step, jnp.maximum(hi_ref[row] - 1, 0))


def _tpu_ids(ids: masks.MaskIds):
  """Query ids replicated over lanes [B, L, 128], key ids over sublanes [B, 8, S]."""
  q_seg, kv_seg, q_blk, kv_blk = ids
  lanes = lambda x: None if x is None else jnp.broadcast_to(x[:, :, None], (*x.shape, LANES))
  sublanes = lambda x: None if x is None else jnp.broadcast_to(
      x[:, None, :], (x.shape[0], SUBLANES, x.shape[1]))
  return [lanes(q_seg), sublanes(kv_seg), lanes(q_blk), sublanes(kv_blk)]


class _Specs:
  """BlockSpecs for a grid (b, h, outer, inner) where `inner` steps through a block range."""

  def __init__(self, num_outer: int, q_is_outer: bool, group: int):
    self.num_outer, self.q_is_outer, self.group = num_outer, q_is_outer, group

  def _blocks(self, b, outer, inner, lo_ref, hi_ref):
    """(query block, key block) of a grid point."""
    stepped = _clamped(lo_ref, hi_ref, b * self.num_outer + outer, inner)
    return (outer, stepped) if self.q_is_outer else (stepped, outer)

  def q_side(self, block: int, width: int, head_of=lambda h: h):
    return pl.BlockSpec((None, None, block, width), lambda b, h, o, n, lo, hi: (
        b, head_of(h), self._blocks(b, o, n, lo, hi)[0], 0))

  def kv_side(self, block: int, width: int, per_q_head: bool = False):
    head_of = (lambda h: h) if per_q_head else (lambda h: h // self.group)
    return pl.BlockSpec((None, None, block, width), lambda b, h, o, n, lo, hi: (
        b, head_of(h), self._blocks(b, o, n, lo, hi)[1], 0))

  def ids(self, ids, block_q: int, block_k: int):
    q_spec = pl.BlockSpec((None, block_q, LANES), lambda b, h, o, n, lo, hi: (
        b, self._blocks(b, o, n, lo, hi)[0], 0))
    k_spec = pl.BlockSpec((None, SUBLANES, block_k), lambda b, h, o, n, lo, hi: (
        b, 0, self._blocks(b, o, n, lo, hi)[1]))
    return [None if x is None else spec for x, spec in zip(ids, (q_spec, k_spec) * 2)]


def _call(kernel, cfg, grid, specs, out_specs, out_shape, scratch, name):
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=grid, in_specs=specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name=name)


def _heads_major(*xs):
  return [jnp.swapaxes(x, 1, 2) for x in xs]


def _replicate_lanes(x_BHL):
  return jnp.broadcast_to(x_BHL[..., None], (*x_BHL.shape, LANES))


def forward(q_BLHD, k_BSHD, v_BSHD, ids: masks.MaskIds, kv_range, cfg: KernelConfig):
  """o [B, L, H, D] in q's dtype and lse [B, H, L] float32 (natural log)."""
  batch, q_len, heads, head_dim = q_BLHD.shape
  kv_len = k_BSHD.shape[1]
  block_q, block_k = cfg.blocks.block_q, cfg.blocks.block_k
  num_q, num_k = q_len // block_q, kv_len // block_k
  q_BHLD, k_BHSD, v_BHSD = _heads_major(q_BLHD, k_BSHD, v_BSHD)
  specs = _Specs(num_q, q_is_outer=True, group=cfg.group)
  tpu_ids = _tpu_ids(ids)
  o_BHLD, lse_BHL128 = _call(
      _forward_kernel, cfg, (batch, heads, num_q, num_k),
      [specs.q_side(block_q, head_dim), specs.kv_side(block_k, head_dim),
       specs.kv_side(block_k, head_dim)] + specs.ids(tpu_ids, block_q, block_k),
      [specs.q_side(block_q, head_dim), specs.q_side(block_q, LANES)],
      [jax.ShapeDtypeStruct(q_BHLD.shape, q_BHLD.dtype),
       jax.ShapeDtypeStruct((batch, heads, q_len, LANES), jnp.float32)],
      [pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
       pltpu.VMEM((block_q, head_dim), jnp.float32)],
      "flash_attention_fwd_tpu",
  )(*(r.reshape(-1) for r in (kv_range.lo, kv_range.hi)), q_BHLD, k_BHSD, v_BHSD, *tpu_ids)
  return jnp.swapaxes(o_BHLD, 1, 2), lse_BHL128[..., 0]


def backward(q_BLHD, k_BSHD, v_BSHD, ids: masks.MaskIds, kv_range, q_range, do_BLHD, lse_BHL,
             delta_BHL, cfg: KernelConfig):
  """dq [B, L, H, D] float32 and dk, dv per query head [B, S, H, D] float32."""
  batch, q_len, heads, head_dim = q_BLHD.shape
  kv_len = k_BSHD.shape[1]
  block_q, block_k = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
  num_q, num_k = q_len // block_q, kv_len // block_k
  q_BHLD, k_BHSD, v_BHSD, do_BHLD = _heads_major(q_BLHD, k_BSHD, v_BSHD, do_BLHD)
  lse_BHL128, delta_BHL128 = _replicate_lanes(lse_BHL), _replicate_lanes(delta_BHL)
  operands = (q_BHLD, k_BHSD, v_BHSD, do_BHLD, lse_BHL128, delta_BHL128, *_tpu_ids(ids))

  def in_specs(specs):
    return ([specs.q_side(block_q, head_dim), specs.kv_side(block_k, head_dim),
             specs.kv_side(block_k, head_dim), specs.q_side(block_q, head_dim),
             specs.q_side(block_q, LANES), specs.q_side(block_q, LANES)]
            + specs.ids(operands[6:], block_q, block_k))

  dkv_specs = _Specs(num_k, q_is_outer=False, group=cfg.group)
  per_q_head = jax.ShapeDtypeStruct((batch, heads, kv_len, head_dim), jnp.float32)
  dk_out = dkv_specs.kv_side(block_k, head_dim, per_q_head=True)
  dk_BHSD, dv_BHSD = _call(
      _dkdv_kernel, cfg, (batch, heads, num_k, num_q), in_specs(dkv_specs), [dk_out, dk_out],
      [per_q_head, per_q_head], [pltpu.VMEM((block_k, head_dim), jnp.float32)] * 2,
      "flash_attention_dkdv_tpu",
  )(*(r.reshape(-1) for r in (q_range.lo, q_range.hi)), *operands)

  dq_specs = _Specs(num_q, q_is_outer=True, group=cfg.group)
  dq_BHLD = _call(
      _dq_kernel, cfg, (batch, heads, num_q, num_k), in_specs(dq_specs),
      dq_specs.q_side(block_q, head_dim), jax.ShapeDtypeStruct(q_BHLD.shape, jnp.float32),
      [pltpu.VMEM((block_q, head_dim), jnp.float32)], "flash_attention_dq_tpu",
  )(*(r.reshape(-1) for r in (kv_range.lo, kv_range.hi)), *operands)
  return _heads_major(dq_BHLD, dk_BHSD, dv_BHSD)
