"""Attention mask kinds shared by every attention implementation: causal, block-causal, segments.

A mask is never stored as an [L, S] matrix. It is described by per-token integer ids and rebuilt
tile by tile inside the kernels (`tile_mask`); the dense form (`dense_mask`) exists only for the
XLA/cuDNN paths and the tests. Key j is visible from query i when all the requested kinds allow it:

  * causal:        j <= i (top-left aligned, as `jax.nn.dot_product_attention(is_causal=True)`);
  * block-causal:  block_ids[j] <= block_ids[i]. With VAR's ids (the scale index of each token) a
                   token sees every scale up to its own, its own scale in both directions;
  * segments:      segment_ids[j] == segment_ids[i] (packed sequences);
  * padding:       j < kv_len (keys that the kernels appended to fill the last block).

`block_ranges` turns the ids into, per query block, the contiguous range of key blocks that can hold
a visible key, so kernels skip the rest (the saving that makes block-causal beat a dense mask).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax.errors import ConfigError


class MaskIds(NamedTuple):
  """Per-token mask ids, each [batch, length] int32 or None (kind not used)."""
  q_segment_BL: Optional[jax.Array] = None
  kv_segment_BS: Optional[jax.Array] = None
  q_block_BL: Optional[jax.Array] = None
  kv_block_BS: Optional[jax.Array] = None


def var_block_ids(scales: Sequence[int]) -> np.ndarray:
  """Block ids of VAR's token sequence: scale k contributes scales[k]² tokens with id k.

  E.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) → 680 ids (VAR 256p), (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
  → 2240 ids (VAR 512p).
  """
  return np.repeat(np.arange(len(scales), dtype=np.int32), [s * s for s in scales])


def _pair(ids, batch: int, q_len: int, kv_len: int, name: str):
  """Splits `ids` ([L], [B, L] or a (q_ids, kv_ids) pair) into [B, L] and [B, S] int32 arrays."""
  if ids is None:
    return None, None
  if isinstance(ids, (tuple, list)):
    q_ids, kv_ids = ids
  else:
    if q_len != kv_len:
      raise ConfigError(f"{name} of one array needs q_len == kv_len (got {q_len} and {kv_len}); "
                        f"pass a (q_{name}, kv_{name}) pair for cross-attention")
    q_ids = kv_ids = ids

  def fit(x, length, which):
    x = jnp.asarray(x, jnp.int32)
    if x.ndim == 1:
      x = x[None]
    if x.shape[-1] != length or x.shape[0] not in (1, batch) or x.ndim != 2:
      raise ConfigError(f"{which} {name} has shape {x.shape}; expected [{length}] or "
                        f"[{batch}, {length}]")
    return jnp.broadcast_to(x, (batch, length))

  return fit(q_ids, q_len, "query"), fit(kv_ids, kv_len, "key")


def make_ids(batch: int, q_len: int, kv_len: int, *, segment_ids=None, block_ids=None) -> MaskIds:
  """Validates the user's ids and broadcasts them to [batch, length] (see `_pair`)."""
  q_seg, kv_seg = _pair(segment_ids, batch, q_len, kv_len, "segment_ids")
  q_blk, kv_blk = _pair(block_ids, batch, q_len, kv_len, "block_ids")
  return MaskIds(q_seg, kv_seg, q_blk, kv_blk)


def tile_mask(q_pos_Q1, k_pos_1K, *, causal: bool, kv_len: Optional[int] = None,
              q_segment_Q1=None, k_segment_1K=None, q_block_Q1=None, k_block_1K=None):
  """Which keys each query of a tile may see: bool [Q, K], or None when every key is visible.

  Positions and ids come as a column (queries) and a row (keys) so the same code runs in the
  Triton and Mosaic kernels (which build them each their own way) and in `dense_mask`.
  """
  mask = None

  def conj(mask, term):
    return term if mask is None else jnp.logical_and(mask, term)

  if kv_len is not None:
    mask = conj(mask, k_pos_1K < kv_len)
  if causal:
    mask = conj(mask, k_pos_1K <= q_pos_Q1)
  if q_segment_Q1 is not None:
    mask = conj(mask, q_segment_Q1 == k_segment_1K)
  if q_block_Q1 is not None:
    mask = conj(mask, k_block_1K <= q_block_Q1)
  return mask


def dense_mask(ids: MaskIds, q_len: int, kv_len: int, *, causal: bool):
  """The full mask, bool [batch or 1, 1, L, S], or None when nothing is masked."""
  q_pos_L1 = jnp.arange(q_len, dtype=jnp.int32)[:, None]
  k_pos_1S = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
  col = lambda x: None if x is None else x[:, :, None]
  row = lambda x: None if x is None else x[:, None, :]
  mask = tile_mask(q_pos_L1[None], k_pos_1S[None], causal=causal,
                   q_segment_Q1=col(ids.q_segment_BL), k_segment_1K=row(ids.kv_segment_BS),
                   q_block_Q1=col(ids.q_block_BL), k_block_1K=row(ids.kv_block_BS))
  return None if mask is None else mask[:, None]


def _block_summary(ids_BL, block: int, reduce):
  """`reduce` of the ids over each block of `block` tokens: [B, L/block]."""
  batch, length = ids_BL.shape
  return reduce(ids_BL.reshape(batch, length // block, block), axis=-1)


def block_ranges(ids: MaskIds, batch: int, q_len: int, kv_len: int, block_q: int, block_k: int,
                 *, causal: bool):
  """Per query block, the key blocks [lo, hi) that may hold a visible key; and per key block, the
  query blocks that may see it.

  Lengths must be multiples of their blocks (pad first, replicating the last id). The test per block
  pair is conservative (it compares the min/max id of each block), so a range never drops a visible
  key and is exact for sorted ids (VAR scales, packed segments, causal). Keys outside a range are
  masked, so kernels loop from lo to hi only.

  Returns:
    (kv_lo_BN, kv_hi_BN) for the nq = q_len/block_q query blocks and (q_lo_BM, q_hi_BM) for the
    nk = kv_len/block_k key blocks, all int32.
  """
  num_q, num_k = q_len // block_q, kv_len // block_k
  possible_BNM = jnp.ones((batch, num_q, num_k), bool)
  if causal:
    q_last_N = jnp.arange(num_q) * block_q + block_q - 1
    k_first_M = jnp.arange(num_k) * block_k
    possible_BNM &= (k_first_M[None, :] <= q_last_N[:, None])[None]
  if ids.q_segment_BL is not None:
    q_min, q_max = (_block_summary(ids.q_segment_BL, block_q, f) for f in (jnp.min, jnp.max))
    k_min, k_max = (_block_summary(ids.kv_segment_BS, block_k, f) for f in (jnp.min, jnp.max))
    possible_BNM &= ((k_min[:, None, :] <= q_max[:, :, None]) &
                     (q_min[:, :, None] <= k_max[:, None, :]))
  if ids.q_block_BL is not None:
    q_max = _block_summary(ids.q_block_BL, block_q, jnp.max)
    k_min = _block_summary(ids.kv_block_BS, block_k, jnp.min)
    possible_BNM &= k_min[:, None, :] <= q_max[:, :, None]

  def first_last(possible, axis):
    """[lo, hi) of the True entries along `axis`; (0, 0) for a row without any."""
    size = possible.shape[axis]
    any_ = possible.any(axis)
    lo = jnp.argmax(possible, axis)
    hi = size - jnp.argmax(jnp.flip(possible, axis), axis)
    return (jnp.where(any_, lo, 0).astype(jnp.int32), jnp.where(any_, hi, 0).astype(jnp.int32))

  return first_last(possible_BNM, 2), first_last(possible_BNM, 1)
