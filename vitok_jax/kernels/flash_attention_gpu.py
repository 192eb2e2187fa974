"""Flash attention kernels for GPUs (Pallas → Triton): forward, dK/dV and dQ.

One program per (query block, batch, head) walks its key blocks with a `fori_loop`, keeping the
running max, normaliser and output accumulator in registers (online softmax, FlashAttention-2);
the loop runs only over the key blocks `masks.block_ranges` marks as possibly visible, which is
where causal and block-causal masks save work, and builds a mask only on the tiles that are not
wholly visible (the causal diagonal, the edges of VAR's scales): a loop over the partial tiles,
one over the full ones, one over the partial ones after them. Scores use exp2 with log2(e) folded
into the scale (the GPU's native exponential); the saved logsumexp is converted to natural log for
the interface. The backward recomputes each score tile from the logsumexp: one kernel per key
block accumulates dK and dV over its query blocks, one kernel per query block accumulates dQ: no
atomics needed.

Arrays arrive padded (see `flash_attention`): lengths are multiples of every tile, head_dim a
power of two ≥ 16 as Triton's dot requires.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vitok_jax.kernels import masks
from vitok_jax.kernels.flash_attention import MASK_VALUE, KernelConfig

MIN_BLOCK = 16  # Triton's dot needs every tile dimension ≥ 16.
LOG2_E = math.log2(math.e)


def padded_head_dim(head_dim: int) -> int:
  return max(16, pl.next_power_of_2(head_dim))


def _has_mask(cfg: KernelConfig, id_refs) -> bool:
  return cfg.causal or cfg.kv_len is not None or any(r is not None for r in id_refs)


def _visit(range_refs, body, init, *, masked: bool):
  """carry of body(index, carry, masked=...) over a `masks.BlockRange` [lo, hi): unmasked on its
  full tiles [full_lo, full_hi), masked on the others (or unmasked everywhere if not `masked`)."""
  lo, hi, full_lo, full_hi = (ref[0] for ref in range_refs)
  if not masked:
    return jax.lax.fori_loop(lo, hi, functools.partial(body, masked=False), init)
  carry = jax.lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), init)
  carry = jax.lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return jax.lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _tile_mask(cfg: KernelConfig, q_start, block_q: int, k_start, block_k: int, id_refs,
               masked: bool = True):
  """bool [block_q, block_k] (or None) for the tile at (q_start, k_start); ids are whole rows.
  None also for a tile known to be wholly visible (not `masked`)."""
  if not masked:
    return None
  q_segment_ref, kv_segment_ref, q_block_ref, kv_block_ref = id_refs
  q_slice, k_slice = pl.ds(q_start, block_q), pl.ds(k_start, block_k)
  col = lambda ref: None if ref is None else ref[q_slice][:, None]
  row = lambda ref: None if ref is None else ref[k_slice][None, :]
  return masks.tile_mask(
      q_start + jnp.arange(block_q)[:, None], k_start + jnp.arange(block_k)[None, :],
      causal=cfg.causal, kv_len=cfg.kv_len,
      q_segment_Q1=col(q_segment_ref), k_segment_1K=row(kv_segment_ref),
      q_block_Q1=col(q_block_ref), k_block_1K=row(kv_block_ref))


def _probabilities(s_QK, lse_Q, mask_QK):
  """exp2(s − lse) with masked entries exactly 0 (also for rows that see no key, lse = −inf)."""
  p_QK = jnp.exp2(s_QK - lse_Q[:, None])
  return p_QK if mask_QK is None else jnp.where(mask_QK, p_QK, 0.0)


def _forward_kernel(*refs, cfg: KernelConfig):
  """Refs: the 4 `BlockRange` entries of this query block, q [bq, D], k/v [S, D], 4 id rows
  [L]/[S] (or None); out o [bq, D], lse [bq]."""
  range_refs, (q_ref, k_ref, v_ref), id_refs, (o_ref, lse_ref) = (
      refs[:4], refs[4:7], refs[7:11], refs[11:])
  block_q, block_k = cfg.blocks.block_q, cfg.blocks.block_k
  q_start = pl.program_id(0) * block_q
  q_QD = q_ref[...]
  score_scale = cfg.scale * LOG2_E

  def body(j, carry, masked):
    acc_QD, m_Q, l_Q = carry
    k_start = j * block_k
    k_KD, v_KD = k_ref[pl.ds(k_start, block_k), :], v_ref[pl.ds(k_start, block_k), :]
    s_QK = plgpu.dot(q_QD, k_KD, trans_b=True) * score_scale
    mask_QK = _tile_mask(cfg, q_start, block_q, k_start, block_k, id_refs, masked)
    if mask_QK is not None:
      s_QK = jnp.where(mask_QK, s_QK, MASK_VALUE)
    m_new_Q = jnp.maximum(m_Q, s_QK.max(axis=-1))
    p_QK = _probabilities(s_QK, m_new_Q, mask_QK)
    rescale_Q = jnp.exp2(m_Q - m_new_Q)
    acc_QD = acc_QD * rescale_Q[:, None] + plgpu.dot(p_QK.astype(v_KD.dtype), v_KD)
    return acc_QD, m_new_Q, l_Q * rescale_Q + p_QK.sum(axis=-1)

  init = (jnp.zeros(q_QD.shape, jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc_QD, m_Q, l_Q = _visit(range_refs, body, init, masked=_has_mask(cfg, id_refs))
  seen_Q = l_Q > 0
  l_Q = jnp.where(seen_Q, l_Q, 1.0)
  o_ref[...] = (acc_QD / l_Q[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen_Q, (m_Q + jnp.log2(l_Q)) / LOG2_E, -jnp.inf)


def _id_specs(ids, grid_to_batch):
  """Whole id rows per batch element (kernels slice the tiles they need)."""
  return [None if x is None else pl.BlockSpec((None, x.shape[1]), lambda *g: (grid_to_batch(*g), 0))
          for x in ids]


def _range_spec(grid_to_batch_block):
  return pl.BlockSpec((None, 1), grid_to_batch_block)


def _compiler_params(num_warps, block_a: int, block_b: int, head_dim: int, num_stages: int):
  """Triton launch: `num_warps` if given, else 4 for small tiles and head dims, else 8."""
  num_warps = num_warps or (4 if block_a * block_b <= 64 * 64 and head_dim <= 64 else 8)
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def forward(q_BLHD, k_BSHD, v_BSHD, ids: masks.MaskIds, kv_range, cfg: KernelConfig):
  """o [B, L, H, D] in q's dtype and lse [B, H, L] float32 (natural log)."""
  if cfg.hopper_forward:
    from vitok_jax.kernels import flash_attention_hopper  # Imports Mosaic GPU.
    return flash_attention_hopper.forward(q_BLHD, k_BSHD, v_BSHD, scale=cfg.scale,
                                          mask=cfg.hopper_mask)
  batch, q_len, heads, head_dim = q_BLHD.shape
  kv_len = k_BSHD.shape[1]
  block_q, group = cfg.blocks.block_q, cfg.group
  grid = (q_len // block_q, batch, heads)
  q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=grid,
      in_specs=[_range_spec(lambda i, b, h: (b, i))] * 4 + [q_spec, kv_spec, kv_spec]
               + _id_specs(ids, lambda i, b, h: b),
      out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q_BLHD.shape, q_BLHD.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      compiler_params=_compiler_params(cfg.blocks.num_warps, block_q, cfg.blocks.block_k,
                                       head_dim, cfg.blocks.num_stages),
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(*kv_range, q_BLHD, k_BSHD, v_BSHD, *ids)


def _backward_refs(refs):
  """(range refs, q, k, v, do, lse, delta refs, id refs, output refs) of a backward kernel."""
  return refs[:4], refs[4:10], refs[10:14], refs[14:]


def _dkdv_kernel(*refs, cfg: KernelConfig):
  """Refs: the `BlockRange` of this key block, q/do [L, D], lse/delta [L], k/v [bk, D], ids; out
  dk/dv [bk, D] for this query head."""
  range_refs, operands, id_refs, (dk_ref, dv_ref) = _backward_refs(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = operands
  block_q, block_k = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
  k_start = pl.program_id(0) * block_k
  k_KD, v_KD = k_ref[...], v_ref[...]

  def body(i, carry, masked):
    dk_KD, dv_KD = carry
    q_start = i * block_q
    q_slice = pl.ds(q_start, block_q)
    q_QD, do_QD = q_ref[q_slice, :], do_ref[q_slice, :]
    s_QK = plgpu.dot(q_QD, k_KD, trans_b=True) * (cfg.scale * LOG2_E)
    mask_QK = _tile_mask(cfg, q_start, block_q, k_start, block_k, id_refs, masked)
    p_QK = _probabilities(s_QK, lse_ref[q_slice] * LOG2_E, mask_QK)
    dv_KD += plgpu.dot(p_QK.astype(do_QD.dtype), do_QD, trans_a=True)
    dp_QK = plgpu.dot(do_QD, v_KD, trans_b=True)
    ds_QK = p_QK * (dp_QK - delta_ref[q_slice][:, None])
    dk_KD += plgpu.dot(ds_QK.astype(q_QD.dtype), q_QD, trans_a=True)
    return dk_KD, dv_KD

  zeros = jnp.zeros(k_KD.shape, jnp.float32)
  dk_KD, dv_KD = _visit(range_refs, body, (zeros, zeros), masked=_has_mask(cfg, id_refs))
  dk_ref[...] = (dk_KD * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KD.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: KernelConfig):
  """Refs: the `BlockRange` of this query block, q/do [bq, D], lse/delta [bq], k/v [S, D], ids;
  out dq [bq, D]."""
  range_refs, operands, id_refs, (dq_ref,) = _backward_refs(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = operands
  block_q, block_k = cfg.blocks.dq_tiles
  q_start = pl.program_id(0) * block_q
  q_QD, do_QD = q_ref[...], do_ref[...]
  lse_Q, delta_Q = lse_ref[...] * LOG2_E, delta_ref[...]

  def body(j, dq_QD, masked):
    k_start = j * block_k
    k_KD, v_KD = k_ref[pl.ds(k_start, block_k), :], v_ref[pl.ds(k_start, block_k), :]
    s_QK = plgpu.dot(q_QD, k_KD, trans_b=True) * (cfg.scale * LOG2_E)
    mask_QK = _tile_mask(cfg, q_start, block_q, k_start, block_k, id_refs, masked)
    p_QK = _probabilities(s_QK, lse_Q, mask_QK)
    ds_QK = p_QK * (plgpu.dot(do_QD, v_KD, trans_b=True) - delta_Q[:, None])
    return dq_QD + plgpu.dot(ds_QK.astype(k_KD.dtype), k_KD)

  dq_QD = _visit(range_refs, body, jnp.zeros(q_QD.shape, jnp.float32),
                 masked=_has_mask(cfg, id_refs))
  dq_ref[...] = (dq_QD * cfg.scale).astype(dq_ref.dtype)


def backward(q_BLHD, k_BSHD, v_BSHD, ids: masks.MaskIds, kv_range, q_range, do_BLHD, lse_BHL,
             delta_BHL, cfg: KernelConfig):
  """dq [B, L, H, D] and dk, dv per query head [B, S, H, D] for the caller's sum over each group.
  Triton: dq in q's dtype, dk/dv in k's without grouped heads, else float32 (accumulation is
  float32); the Hopper backward (`cfg.hopper_backward`): dq float32, dk/dv in k's dtype."""
  if cfg.hopper_backward:
    from vitok_jax.kernels import flash_attention_hopper  # Imports Mosaic GPU.
    return flash_attention_hopper.backward(q_BLHD, k_BSHD, v_BSHD, do_BLHD, lse_BHL, delta_BHL,
                                           scale=cfg.scale, mask=cfg.hopper_mask)
  batch, q_len, heads, head_dim = q_BLHD.shape
  kv_len = k_BSHD.shape[1]
  block_q, block_k, group = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd, cfg.group
  ids = list(ids)

  # dK, dV: one program per (key block, batch, query head) loops over the query blocks.
  whole_q = pl.BlockSpec((None, q_len, None, head_dim), lambda j, b, h: (b, 0, h, 0))
  whole_row = pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0))
  kv_block = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h // group, 0))
  out_block = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
  per_q_head = jax.ShapeDtypeStruct((batch, kv_len, heads, head_dim),
                                    k_BSHD.dtype if group == 1 else jnp.float32)
  dk_BSHD, dv_BSHD = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg),
      grid=(kv_len // block_k, batch, heads),
      in_specs=[_range_spec(lambda j, b, h: (b, j))] * 4
               + [whole_q, kv_block, kv_block, whole_q, whole_row, whole_row]
               + _id_specs(ids, lambda j, b, h: b),
      out_specs=[out_block, out_block],
      out_shape=[per_q_head, per_q_head],
      compiler_params=_compiler_params(cfg.blocks.num_warps_bwd, block_q, block_k, head_dim,
                                       cfg.blocks.num_stages),
      interpret=cfg.interpret,
      name="flash_attention_dkdv",
  )(*q_range, q_BLHD, k_BSHD, v_BSHD, do_BLHD, lse_BHL, delta_BHL, *ids)

  # dQ: one program per (query block, batch, head) loops over the key blocks.
  block_q, block_k = cfg.blocks.dq_tiles
  q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  row_block = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  whole_kv = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
  dq_BLHD = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(q_len // block_q, batch, heads),
      in_specs=[_range_spec(lambda i, b, h: (b, i))] * 4
               + [q_block, whole_kv, whole_kv, q_block, row_block, row_block]
               + _id_specs(ids, lambda i, b, h: b),
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(q_BLHD.shape, q_BLHD.dtype),
      compiler_params=_compiler_params(cfg.blocks.num_warps_bwd, block_q, block_k, head_dim,
                                       cfg.blocks.num_stages),
      interpret=cfg.interpret,
      name="flash_attention_dq",
  )(*kv_range, q_BLHD, k_BSHD, v_BSHD, do_BLHD, lse_BHL, delta_BHL, *ids)
  return dq_BLHD, dk_BSHD, dv_BSHD
