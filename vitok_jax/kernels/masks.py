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
a visible key, so kernels skip the rest (the saving that makes block-causal beat a dense mask), and
the run inside it of blocks that are wholly visible, where kernels build no mask.
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


# VAR's scale schedules by sequence length: 256p (10 scales, 680 tokens) and 512p (2240 tokens).
VAR_SCALES = {680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}


def var_block_ids(scales: Sequence[int]) -> np.ndarray:
  """Block ids of VAR's token sequence: scale k contributes scales[k]² tokens with id k.

  E.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) → 680 ids (VAR 256p), (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
  → 2240 ids (VAR 512p).
  """
  return np.repeat(np.arange(len(scales), dtype=np.int32), [s * s for s in scales])


def static_ids(ids) -> Optional[np.ndarray]:
  """ids of one sequence known when tracing ([L] or [1, L]: numpy, a list, or a jax array closed
  over) as numpy [L]; None for traced or per-example ids, a (q_ids, kv_ids) pair, or None."""
  if ids is None or isinstance(ids, tuple):
    return None
  try:
    ids = np.asarray(ids)
  except jax.errors.TracerArrayConversionError:
    return None
  if ids.ndim == 2 and ids.shape[0] == 1:
    ids = ids[0]
  return ids.astype(np.int32) if ids.ndim == 1 else None  # int32, as `make_ids` reads them.


def visible_pairs(q_len: int, kv_len: int, *, causal: bool = False,
                  block_ids=None) -> Optional[int]:
  """The (query, key) pairs of one sequence that a mask lets attend, for FLOP counts: L·S without
  a mask; the causal triangle (query i sees keys ≤ i); block-causal of static ids [L] (L = S: key
  j visible from query i iff ids[j] ≤ ids[i]). None where it is not known when tracing (traced or
  per-example ids) or both masks are given."""
  if block_ids is None:
    return int(np.minimum(np.arange(1, q_len + 1), kv_len).sum()) if causal else q_len * kv_len
  ids = static_ids(block_ids)
  if causal or ids is None or not len(ids) == q_len == kv_len:
    return None
  return int(np.searchsorted(np.sort(ids), ids, side="right").sum())


def _pair(ids, batch: int, q_len: int, kv_len: int, name: str):
  """Splits `ids` ([L], [B, L] or a (q_ids, kv_ids) tuple; a list is an array, not a pair) into
  [B, L] and [B, S] int32 arrays."""
  if ids is None:
    return None, None
  if isinstance(ids, tuple):
    if len(ids) != 2:
      raise ConfigError(f"{name} as a tuple is a (q_{name}, kv_{name}) pair; got {len(ids)} "
                        "items (pass one sequence's ids as an array or a list)")
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


class BlockRange(NamedTuple):
  """Per block of one axis, which blocks of the other axis a kernel visits, each [B, n] int32:
  [lo, hi) may hold a visible pair (the rest are skipped) and [full_lo, full_hi), inside it, are
  visible in every pair (the kernel builds no mask there). lo ≤ full_lo ≤ full_hi ≤ hi."""
  lo: jax.Array
  hi: jax.Array
  full_lo: jax.Array
  full_hi: jax.Array


def block_ranges(ids: MaskIds, batch: int, q_len: int, kv_len: int, block_q: int, block_k: int,
                 *, causal: bool, kv_valid: Optional[int] = None, skip: bool = True):
  """Per query block the key blocks to visit, and per key block the query blocks.

  Lengths must be multiples of their blocks (pad first, replicating the last id); `kv_valid` is the
  true key count when keys were padded. The tests per block pair compare the min/max id of each
  block: a skipped tile never holds a visible pair and a "full" tile never a hidden one, and both
  are exact for sorted ids (VAR scales, packed segments, causal). Full tiles form the first
  contiguous run of them in the range (all of them for sorted ids). With `skip=False` every tile
  is visited, masked (the dense-mask baseline of the benchmarks).

  Returns:
    (kv: BlockRange over the nq = q_len/block_q query blocks, q: BlockRange over the
     nk = kv_len/block_k key blocks).
  """
  num_q, num_k = q_len // block_q, kv_len // block_k
  q_first_N = jnp.arange(num_q) * block_q
  k_first_M = jnp.arange(num_k) * block_k
  possible_BNM = jnp.ones((batch, num_q, num_k), bool)
  full_BNM = jnp.broadcast_to((k_first_M + block_k <= (kv_valid or kv_len))[None, None],
                              possible_BNM.shape)
  if causal:
    possible_BNM &= (k_first_M[None, :] <= q_first_N[:, None] + block_q - 1)[None]
    full_BNM &= (k_first_M[None, :] + block_k - 1 <= q_first_N[:, None])[None]
  summary = lambda ids_BL, block: (_block_summary(ids_BL, block, jnp.min)[:, :, None],
                                   _block_summary(ids_BL, block, jnp.max)[:, :, None])
  if ids.q_segment_BL is not None:
    (q_min, q_max), (k_min, k_max) = (summary(ids.q_segment_BL, block_q),
                                      summary(ids.kv_segment_BS, block_k))
    k_min, k_max = jnp.swapaxes(k_min, 1, 2), jnp.swapaxes(k_max, 1, 2)
    possible_BNM &= (k_min <= q_max) & (q_min <= k_max)
    full_BNM &= (q_min == q_max) & (k_min == k_max) & (k_min == q_min)
  if ids.q_block_BL is not None:
    (q_min, q_max), (k_min, k_max) = (summary(ids.q_block_BL, block_q),
                                      summary(ids.kv_block_BS, block_k))
    k_min, k_max = jnp.swapaxes(k_min, 1, 2), jnp.swapaxes(k_max, 1, 2)
    possible_BNM &= k_min <= q_max
    full_BNM &= k_max <= q_min
  if not skip:
    possible_BNM, full_BNM = jnp.ones_like(possible_BNM), jnp.zeros_like(full_BNM)

  def ranges(axis):
    """BlockRange along `axis`; lo = hi = 0 for a row without any possible block."""
    size = possible_BNM.shape[axis]
    first = lambda x: jnp.argmax(x, axis)
    any_, any_full = possible_BNM.any(axis), full_BNM.any(axis)
    lo = jnp.where(any_, first(possible_BNM), 0)
    hi = jnp.where(any_, size - first(jnp.flip(possible_BNM, axis)), 0)
    full_lo = jnp.where(any_full, first(full_BNM), lo)
    # The full run ends at the first non-full block after its start.
    index = jax.lax.broadcasted_iota(jnp.int32, full_BNM.shape, axis)
    after = ~full_BNM & (index >= jnp.expand_dims(full_lo, axis))
    full_hi = jnp.where(any_full, jnp.where(after.any(axis), first(after), size), lo)
    return BlockRange(*(x.astype(jnp.int32) for x in (lo, hi, full_lo, full_hi)))

  return ranges(2), ranges(1)
