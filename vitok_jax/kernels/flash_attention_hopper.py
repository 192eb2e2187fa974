"""Flash attention for Hopper GPUs (Pallas → Mosaic GPU): warp-specialised, on wgmma.

Forward: one program (a CTA of three warpgroups) per (head, 2·BLOCK_Q queries, batch). Warpgroups
0 and 1 each own BLOCK_Q query rows (wgmma's M is 64): their Q tile sits in shared memory, the
running max, normaliser and float32 output accumulator in registers (online softmax). Warpgroup 2
only moves data: it streams K and V tiles of BLOCK_K keys with TMA into a ring of `STAGES` shared-
memory slots and refills a slot once both compute warpgroups have released it. S = Q·Kᵀ and
O += P·V run on the tensor cores; a two-party barrier makes the compute warpgroups take turns, one
in its softmax while the other's matmuls run (FlashAttention-3's ping-pong). Learned from jax's
`pallas.ops.gpu.attention_mgpu`; this one takes bfloat16 as well as float16 (P is cast to the
inputs' dtype), applies the logit scale, and saves the logsumexp in the layout and units (natural
log) that the Triton backward (`flash_attention_gpu.backward`) reads, so the two combine.

Backward (`backward`): FlashAttention-3's single pass per key block, five matmuls per tile pair
with dQ added into float32 global memory by TMA reduce-adds (jax's Mosaic GPU backward, like our
Triton one, runs a second pass for dQ: seven matmuls).

Masks: none, or one that shows each query a prefix of the keys (`PrefixMask`: causal,
block-causal with rising ids such as VAR's scales, key padding); with one, the tiles a program's
rows cannot see are skipped and only the tiles they see in part are masked (`flash_attention`
takes them by default while `policy.HOPPER_PREFIX_MASKS` is set). Lengths that are multiples of
8 (`LENGTH_MULTIPLE`; `flash_attention` pads them to whole 128-token tiles unless
`policy.HOPPER_UNPADDED`), head dims 64 and 128 (`flash_attention` pads head dims 33–128), a
positive logit scale: `unsupported_reason` says why a call does not fit. Off the GPU the
kernels can be lowered (the tests export them for CUDA) but not run: jax's Mosaic GPU
interpreter (0.10) has no `run_state` or `plgpu.load` yet. On an H100
(jax 0.11.2, bf16, docs/kernels/bench_hopper_bwd_h100.json): forward 572–598 TFLOP/s at head dim
128 (L 4096–8192), 0.98–1.00× cuDNN's speed; forward+backward 0.92–0.94× cuDNN at head dim 128
and 0.95–0.98× at 64 for L 4096–8192, 1.03–1.15× at L ≤ 1024, 1.29–1.37× our Triton kernels.
Causal, 0.99–1.35× cuDNN fwd+bwd for L 256–8192 (ahead up to 2048; bench_hopper_causal_h100.json,
bench_hopper_default_h100.json); block-causal at VAR's lengths, taken unpadded, 1.80–1.82× /
2.15× cuDNN given the mask densely (bench_hopper_var_variants_h100.json,
bench_hopper_var_h100.json).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

BLOCK_Q = 64  # Query rows per compute warpgroup; a program covers 2·BLOCK_Q.
BLOCK_K = 128  # Keys per pipeline step.
# K/V tiles in flight. Three do not fit at head dim 128 (232,568 bytes of shared memory against the
# H200's 232,448; docs/kernels/hopper_bwd_variants_h200.json, pallas_fwd_stages3).
STAGES = 2
HEAD_DIMS = (64, 128)
# Sequence lengths are multiples of this (TMA moves rows in groups of 8), not of the tiles: the
# tiles that run past the end are read as zeros and their rows past the end are not written (TMA
# drops writes outside the array), keys past the end are masked (`hide_key_tail`), and the
# logsumexp comes out padded to whole programs (`forward`).
LENGTH_MULTIPLE = 8
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
LOG2_E = math.log2(math.e)
_COMPUTE_WARPGROUPS = 2


def unsupported_reason(q_BLHD, k_BSHD, v_BSHD, *, masked: bool = False,
                       mask: Optional["PrefixMask"] = None, scale: float = 1.0) -> Optional[str]:
  """None if `forward` and `backward` take these arrays (or ShapeDtypeStructs), logit scale and
  mask, else why not. masked: the call has a mask, which must then be given as `mask`."""
  batch, q_len, heads, head_dim = q_BLHD.shape
  kv_len, kv_heads = k_BSHD.shape[1], k_BSHD.shape[2]
  if masked and mask is None:
    return ("the Hopper kernel takes masks that show every query a prefix of the keys (causal, "
            "block-causal with rising static ids, key padding), not segment ids or other ids")
  if mask is not None and not (mask.causal or mask.block_ends or mask.kv_valid):
    return "an empty PrefixMask hides every key; pass mask=None for unmasked attention"
  mask = hide_key_tail(mask, kv_len)  # The mask the kernels run, their own key tail included.
  if mask is not None:
    rows = _COMPUTE_WARPGROUPS * BLOCK_Q
    if mask.q_valid is not None and not (pl.cdiv(q_len, rows) - 1) * rows < mask.q_valid <= q_len:
      # (A program of padding rows alone would wait for key tiles nobody streams.)
      return (f"PrefixMask.q_valid={mask.q_valid} must leave padding in the last {rows}-row "
              f"program only (q_len={q_len})")
    if (mask.causal or mask.block_ends) and q_len != kv_len:
      return f"the Hopper kernel's causal masks need q_len == kv_len, got {q_len} and {kv_len}"
    cuda = _cuda_runtime_version()
    if cuda is not None and 12080 <= cuda < 12091:
      # As jax's causal attention_mgpu: ptxas of these versions miscompiles the in-tile mask.
      return (f"the Hopper kernel's masks are not run with CUDA runtime {cuda} (12.8.0 – "
              "12.9.0 miscompile them, see jax's attention_mgpu)")
  if k_BSHD.shape != v_BSHD.shape or k_BSHD.shape[::3] != (batch, head_dim):
    return f"k and v must be [{batch}, S, kv_heads, {head_dim}], got {k_BSHD.shape}, {v_BSHD.shape}"
  if scale <= 0:  # The running max is taken before scaling.
    return f"the Hopper kernel needs a positive logit scale, got {scale}"
  if not q_BLHD.dtype == k_BSHD.dtype == v_BSHD.dtype:
    return "the Hopper kernel needs q, k and v of one dtype"
  if jnp.dtype(q_BLHD.dtype) not in DTYPES:
    return f"the Hopper kernel takes bfloat16 / float16, not {jnp.dtype(q_BLHD.dtype).name}"
  if head_dim not in HEAD_DIMS:
    return f"the Hopper kernel takes head dims {HEAD_DIMS}, not {head_dim}"
  if q_len % LENGTH_MULTIPLE or kv_len % LENGTH_MULTIPLE or not q_len or not kv_len:
    return (f"the Hopper kernel needs q_len and kv_len positive multiples of {LENGTH_MULTIPLE}, "
            f"got {q_len} and {kv_len}")
  if heads % kv_heads:
    return f"kv_heads={kv_heads} must divide heads={heads}"
  return None


def _cuda_runtime_version() -> Optional[int]:
  """The CUDA runtime version as jax reports it (e.g. 12080), or None without a CUDA jaxlib."""
  from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
  return None if cuda_versions is None else cuda_versions.cuda_runtime_get_version()


def _meet(barrier):
  """The calling warpgroup waits until every warpgroup `barrier` counts has arrived too."""
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


@dataclasses.dataclass(frozen=True)
class PrefixMask:
  """A mask under which query row i sees exactly the keys j < row_end(i), row_end non-decreasing
  in i: causal (row_end = i + 1), block-causal over contiguous blocks of rising ids (VAR's
  scales: a row sees its own block and those before it) or neither (`block_ends` empty), each
  with the keys from `kv_valid` on hidden (padding). Rows that see a key j are then those from
  first_row(j) on, so a tile is visible, hidden or cut from two scalar bounds, and inside a cut
  tile the mask is one comparison with row_end. Both are elementwise on numpy arrays, jnp arrays
  and in-kernel scalars / tiles.

  causal: row_end(i) = i + 1.
  block_ends: the ascending end positions of the blocks, the last one the sequence length
    (`from_block_ids`).
  kv_valid: the true key count when keys were padded, else None.
  At least one of them is set (`unsupported_reason`): with none every key would be hidden.
  q_valid: the true query count when queries were padded, else None. It changes no row's keys
    (a padding row sees what the rows before it see), only the tiles the kernels walk: those
    that hold padding rows alone are skipped, as a padding row's output is sliced off and its
    cotangent is zero, so it adds nothing to dk and dv (`forward_tiles`, `query_steps`).
  """
  causal: bool = False
  block_ends: tuple[int, ...] = ()
  kv_valid: Optional[int] = None
  q_valid: Optional[int] = None

  @classmethod
  def from_block_ids(cls, ids_L, kv_valid: Optional[int] = None) -> Optional["PrefixMask"]:
    """The block-causal mask of ids [L] (key j visible from row i iff ids[j] ≤ ids[i]), or None
    if the ids fall somewhere (then the mask is not a prefix of every row)."""
    ids_L = np.asarray(ids_L)
    if ids_L.ndim != 1 or np.any(np.diff(ids_L) < 0):
      return None
    ends = np.flatnonzero(np.diff(ids_L)) + 1
    return cls(block_ends=tuple(int(e) for e in ends) + (len(ids_L),), kv_valid=kv_valid)

  def row_end(self, q_pos):
    """End (exclusive) of the keys row q_pos sees."""
    if self.causal:
      end = q_pos + 1
    elif self.block_ends:
      end = q_pos * 0 + self.block_ends[-1]
      for block_end in reversed(self.block_ends[:-1]):  # The first block end after q_pos.
        end = jnp.where(q_pos < block_end, block_end, end)
    else:
      end = q_pos * 0 + (self.kv_valid or 0)
    return end if self.kv_valid is None else jnp.minimum(end, self.kv_valid)

  def first_row(self, k_pos, q_len: int):
    """The first row that sees key k_pos (q_len if none does)."""
    if self.causal:
      first = k_pos
    else:
      first = k_pos * 0
      for block_end in self.block_ends[:-1]:  # The start of k_pos's block.
        first = jnp.where(k_pos >= block_end, block_end, first)
    if self.kv_valid is not None:
      first = jnp.where(k_pos >= self.kv_valid, q_len, first)
    return jnp.minimum(first, q_len)

  def visible(self, q_pos, k_pos):
    return k_pos < self.row_end(q_pos)


def _tile_visible(mask: PrefixMask, q_start, k_start, shape, q_axis: int):
  """bool tile (WGMMA layout) of the pairs `mask` shows, queries along `q_axis` from q_start and
  keys along the other axis from k_start."""
  iota = lambda axis: plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)
  return mask.visible(q_start + iota(q_axis), k_start + iota(1 - q_axis))


def _cdiv(a, b: int):
  return lax.div(a + (b - 1), jnp.array(b, jnp.int32))


def _tile_rows(i, size: int, length: int):
  """`pl.ds` of tile i of `size` rows in an array of `length` rows. A static tile that runs past
  the end (TMA reads zeros there and drops the writes) gets a traced start: jax refuses a slice
  past the end where it knows the start."""
  if isinstance(i, int) and (i + 1) * size > length:
    i = jnp.asarray(i, jnp.int32)
  return pl.ds(i * size, size)


def hide_key_tail(mask: Optional[PrefixMask], kv_len: int) -> Optional[PrefixMask]:
  """`mask` with the keys from kv_len on hidden where the last key tile runs past kv_len: TMA
  reads them as zeros, which would otherwise score 0, not -inf."""
  if kv_len % BLOCK_K == 0:
    return mask
  mask = mask or PrefixMask()
  return dataclasses.replace(mask, kv_valid=min(kv_len, mask.kv_valid or kv_len))


def forward_tiles(mask: PrefixMask, q_start, rows: int):
  """(full, end) for the `rows` queries from q_start: they all see the key tiles (of BLOCK_K)
  before `full` whole, some see tiles [full, end) in part, and none sees a tile from `end` on;
  (0, 0) if they are all padding (from `mask.q_valid` on)."""
  end = _cdiv(mask.row_end(q_start + rows - 1), BLOCK_K)
  if mask.q_valid is not None:
    end = jnp.where(q_start >= mask.q_valid, 0, end)
  full = jnp.minimum(lax.div(mask.row_end(q_start), jnp.array(BLOCK_K, jnp.int32)), end)
  return full, end


def query_steps(mask: Optional[PrefixMask], q_len: int) -> int:
  """The query tiles (of BWD_BLOCK_Q) the backward walks: all of them, or with `mask.q_valid`
  those up to the last one that holds a true query."""
  valid = q_len if mask is None or mask.q_valid is None else mask.q_valid
  return -(-valid // BWD_BLOCK_Q)


def backward_tiles(mask: PrefixMask, k_start, keys: int, q_len: int):
  """(first, full) for the `keys` keys from k_start: no query tile (of BWD_BLOCK_Q) before
  `first` sees any of them, tiles [first, full) see them in part (at least one tile, even for keys
  no query sees, e.g. all padding: a wholly masked tile is exact and keeps the loops non-empty),
  and every tile from `full` on, up to `query_steps`, sees them all."""
  q_steps = query_steps(mask, q_len)
  first = jnp.minimum(lax.div(mask.first_row(k_start, q_len), jnp.array(BWD_BLOCK_Q, jnp.int32)),
                      q_steps - 1)
  full = _cdiv(mask.first_row(k_start + keys - 1, q_len), BWD_BLOCK_Q)
  return first, jnp.minimum(jnp.maximum(full, first + 1), q_steps)


def _checked_shapes(q_BLHD, k_BSHD, v_BSHD, scale: float, mask: Optional[PrefixMask]):
  """(batch, q_len, heads, head_dim, kv_len, query heads per kv head); ValueError if the kernels
  do not take these arrays."""
  reason = unsupported_reason(q_BLHD, k_BSHD, v_BSHD, mask=mask, scale=scale)
  if reason:
    raise ValueError(reason)
  batch, q_len, heads, head_dim = q_BLHD.shape
  kv_len, kv_heads = k_BSHD.shape[1], k_BSHD.shape[2]
  return batch, q_len, heads, head_dim, kv_len, heads // kv_heads


def forward(q_BLHD, k_BSHD, v_BSHD, *, scale: float, mask: Optional[PrefixMask] = None):
  """o [B, L, H, D] in q's dtype and lse [B, H, L] float32 (natural log) of
  softmax(scale·q·kᵀ + mask)·v; shapes and dtypes as `unsupported_reason` allows.

  With a `mask`, each warpgroup stops after the last key tile its rows see and masks only the
  tiles its rows see in part; the program streams the tiles its last row sees, and the warpgroup
  that finishes first releases the rest unread and keeps taking turns (jax's causal
  `attention_mgpu` does the same). A warpgroup of padding rows alone (`PrefixMask.q_valid`)
  walks no tile and releases them all.

  Lengths need not be whole tiles (`LENGTH_MULTIPLE`); lse then comes out [B, H, L'] with L'
  the query length rounded up to whole programs (2·BLOCK_Q rows; the rows past L hold the
  logsumexp of zero queries): the backward reads it so."""
  batch, q_len, heads, head_dim, kv_len, group = _checked_shapes(q_BLHD, k_BSHD, v_BSHD, scale,
                                                                 mask)
  mask = hide_key_tail(mask, kv_len)
  dtype = q_BLHD.dtype
  kv_steps = pl.cdiv(kv_len, BLOCK_K)
  padded_q = pl.cdiv(q_len, _COMPUTE_WARPGROUPS * BLOCK_Q) * (_COMPUTE_WARPGROUPS * BLOCK_Q)
  stages = min(STAGES, kv_steps)
  logit_scale = scale * LOG2_E  # Scores in log2 units: the softmax runs on exp2.

  def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scratch):
    (qo_smem, k_smem, v_smem, lse_smem), (k_ready, v_ready, q_ready), (k_free, v_free), turn = (
        scratch)
    b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")

    # Both compute warpgroups meet here: each call hands the tensor cores to the other.
    take_turn = lambda: _meet(turn)

    def program_steps():
      """The key tiles the program streams: all, or with a mask those its last row sees."""
      if mask is None:
        return kv_steps
      rows = _COMPUTE_WARPGROUPS * BLOCK_Q
      return forward_tiles(mask, lax.axis_index("q_blocks") * rows, rows)[1]

    @pl.when(wg < _COMPUTE_WARPGROUPS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_smem, row_lse_smem = qo_smem.at[wg], lse_smem.at[wg]
      q_start = lax.axis_index("q_blocks") * (_COMPUTE_WARPGROUPS * BLOCK_Q) + wg * BLOCK_Q
      if mask is None:
        own_steps = kv_steps
      else:
        full_steps, own_steps = forward_tiles(mask, q_start, BLOCK_Q)
      rows = (b, pl.ds(q_start, BLOCK_Q), h)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_ready.at[wg])
      plgpu.barrier_wait(q_ready.at[wg])
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      m_Q = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), row_layout)
      l_Q = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0.0, jnp.float32), row_layout)
      acc_QD = plgpu.layout_cast(jnp.full((BLOCK_Q, head_dim), 0.0, jnp.float32),
                                 plgpu.Layout.WGMMA)
      plgpu.barrier_wait(k_ready.at[0])
      pl.when(wg == 1)(take_turn)  # Warpgroup 0 goes first.

      def step(i, carry, masked: bool = False):
        acc_QD, m_Q, l_Q = carry
        slot = lax.rem(i, stages)

        def scores(s_ref):
          plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          take_turn()
          return s_ref[...]
        s_QK = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, BLOCK_K), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:  # Every row saw key 0 at step 0, so its running max is finite by now.
          s_QK = jnp.where(_tile_visible(mask, q_start, i * BLOCK_K, s_QK.shape, q_axis=0), s_QK,
                           -jnp.inf)
        m_new_Q = jnp.maximum(m_Q, s_QK.max(axis=1) * logit_scale)
        alpha_Q = jnp.exp2(m_Q - m_new_Q)
        p_QK = jnp.exp2(s_QK * logit_scale - lax.broadcast_in_dim(m_new_Q, s_QK.shape, [0]))
        acc_QD = acc_QD * lax.broadcast_in_dim(alpha_Q, acc_QD.shape, [0])
        l_Q = l_Q * alpha_Q + p_QK.sum(axis=1)
        p_lo_QK = p_QK.astype(dtype)
        # Keeps the softmax ahead of the hand-over below (the order matters to the schedule).
        acc_QD, l_Q, m_new_Q, p_lo_QK = lax.optimization_barrier((acc_QD, l_Q, m_new_Q, p_lo_QK))
        plgpu.barrier_arrive(turn)  # Softmax done: the other warpgroup may start its matmuls.
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(turn)  # The tensor cores are ours again.

        def values(acc_ref):
          plgpu.wgmma(acc_ref, p_lo_QK, v_smem.at[slot])

          @pl.when(i + 1 < own_steps)
          def _():
            plgpu.barrier_wait(k_ready.at[lax.rem(i + 1, stages)])
        acc_QD = pl.run_state(values)(plgpu.ACC.init(acc_QD))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc_QD, m_new_Q, l_Q

      if mask is None:
        acc_QD, m_Q, l_Q = lax.fori_loop(0, kv_steps, step, (acc_QD, m_Q, l_Q))
      else:
        carry = lax.fori_loop(0, full_steps, step, (acc_QD, m_Q, l_Q))
        acc_QD, m_Q, l_Q = lax.fori_loop(full_steps, own_steps,
                                         functools.partial(step, masked=True), carry)

        def release(i, _):
          """A tile only the other warpgroup reads: free its slot, and meet as a step does."""
          plgpu.barrier_arrive(k_free.at[lax.rem(i, stages)])
          plgpu.barrier_arrive(v_free.at[lax.rem(i, stages)])
          take_turn()
          take_turn()
        lax.fori_loop(own_steps, program_steps(), release, None)
      pl.when(wg == 0)(take_turn)  # Balances warpgroup 1's first turn.
      if mask is not None and mask.q_valid is not None:  # Rows of padding alone walked no tile:
        l_Q = jnp.where(l_Q > 0, l_Q, 1.0)  # their output is 0 (and their lse -inf), not NaN.
      acc_QD = acc_QD / lax.broadcast_in_dim(l_Q, acc_QD.shape, [0])
      q_smem[...] = acc_QD.astype(dtype)  # The Q tile is no longer needed: the output goes there.
      row_lse_smem[...] = m_Q / LOG2_E + jnp.log(l_Q)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[rows])
      plgpu.copy_smem_to_gmem(row_lse_smem, lse_ref.at[b, h, pl.ds(q_start, BLOCK_Q)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WARPGROUPS)
    def _stream():
      plgpu.set_max_registers(40, action="decrease")
      kv_h = lax.div(h, jnp.array(group, h.dtype))

      def fetch(i, slot, wait_free: bool):
        """K then V of step i into `slot`, each as soon as its slot is free (K is needed first)."""
        keys = (b, _tile_rows(i, BLOCK_K, kv_len), kv_h)
        for ref, smem, ready, free in ((k_ref, k_smem, k_ready, k_free),
                                       (v_ref, v_smem, v_ready, v_free)):
          if wait_free:
            plgpu.barrier_wait(free.at[slot])
          plgpu.copy_gmem_to_smem(ref.at[keys], smem.at[slot], ready.at[slot])

      steps = program_steps()
      for i in range(stages):
        if mask is None:
          fetch(i, i, wait_free=False)
        else:
          pl.when(i < steps)(functools.partial(fetch, i, i, wait_free=False))

      @pl.loop(0, steps - stages)
      def _(i):
        fetch(i + stages, lax.rem(i, stages), wait_free=True)

  def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
    transforms = _wgmma_transforms(dtype, head_dim)  # (8, 64) tiles, 128-byte swizzle.
    tiles = lambda *shape: plgpu.SMEM(shape, dtype, transforms=transforms)
    smem = (tiles(_COMPUTE_WARPGROUPS, BLOCK_Q, head_dim), tiles(stages, BLOCK_K, head_dim),
            tiles(stages, BLOCK_K, head_dim),
            plgpu.SMEM((_COMPUTE_WARPGROUPS, BLOCK_Q), jnp.float32))
    ready = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS))
    free = (plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS, num_barriers=stages),) * 2
    pl.run_scoped(lambda *scratch: kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scratch),
                  smem, ready, free, plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS),
                  collective_axes="wg")

  return plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct(q_BLHD.shape, dtype),
                jax.ShapeDtypeStruct((batch, heads, padded_q), jnp.float32)),
      grid=(heads, padded_q // (_COMPUTE_WARPGROUPS * BLOCK_Q), batch),
      grid_names=("heads", "q_blocks", "batch"),
      num_threads=_COMPUTE_WARPGROUPS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q_BLHD, k_BSHD, v_BSHD)


# Keys per compute warpgroup in the backward; a program covers 2·BWD_BLOCK_K = BLOCK_K keys, so
# the backward takes what the forward takes (`unsupported_reason`).
BWD_BLOCK_K = BLOCK_K // _COMPUTE_WARPGROUPS
BWD_BLOCK_Q = 64  # Queries per pipeline step of the backward.
# With `PrefixMask.q_valid` the backward must walk no row of a warpgroup the forward skipped (its
# lse is -inf): its query tiles may not straddle the forward's.
assert BLOCK_Q % BWD_BLOCK_Q == 0
# Shortest query length for which `flash_attention` takes the Hopper backward by default: a
# program's prologue and epilogue (K/V in, dK/dV out) pay off over enough query tiles. On the
# H100 fwd+bwd at L = 256 ran 0.66 / 0.40 ms (head dim 128 / 64) against 0.62 / 0.38 with the
# Triton backward, at 1024 1.22 / 0.76 against 1.48 / 0.90
# (docs/kernels/bench_hopper_bwd_h100.json; 512 not measured).
BACKWARD_MIN_Q_LEN = 1024
# Head dims at which a backward step computes dSᵀ while dV's matmul runs (dPᵀ's matmul issued
# first, dSᵀ kept in its registers); at the others it waits for both matmuls. On an H100 (jax
# 0.11.2, bf16, 16 heads; docs/kernels/bench_hopper_bwd_orders_h100.json, whose
# `pallas_bwd_in_order` rows are the other order) at head dim 64 the backward kernel took 1.595
# against 1.665 ms at L = 4096 and 0.298 / 0.594 against 0.305 / 0.610 ms block-causal at VAR's
# 680 / 2240 tokens. At 128, while ptxas spilled registers in this kernel (164 bytes of spill
# stores a thread in the other order, 172 in this one), it took 2.666 against 2.633 ms in a run of
# variants (docs/kernels/hopper_bwd_overlap_variants_h100.json; it also holds two variants
# dropped: the next query tile's Sᵀ issued before this tile's dQ, its exp during dQ's matmul, and
# three ring slots, which at head dim 64 gave the fastest backward kernel but a slower forward).
# Without those spills (`DESCRIPTORS_IN_LOOP_HEAD_DIMS`) it is faster at 128 too: on an H200 the
# backward kernel took 2.499 / 5.008 against 2.542 / 5.149 ms at L = 4096 / 8192 (one process:
# docs/kernels/hopper_bwd_variants_h200.json, `pallas_bwd_ds_during_dv_128` against `pallas`).
DS_DURING_DV_HEAD_DIMS = (64, 128)
# Registers a thread of the backward's (compute, streaming) warpgroups takes (setmaxnreg): the
# launch gives each of its 3 warpgroups 168, so 2·compute + streaming may not pass 3·168 = 504.
# At head dim 128 ptxas spilled 164 bytes a thread before `DESCRIPTORS_IN_LOOP_HEAD_DIMS`. In the
# SASS (the kernel's PTX through ptxas and cuobjdump, H100, jax 0.11.2) most spilled values were
# 8-byte wgmma shared-memory descriptors (a base plus a constant per 16-deep step), computed
# before the query loop and reloaded from local memory before each group of matmuls: 23 loads and
# 3 stores per query tile, against 32 wgmma instructions. Two ways to free registers were slower
# (backward kernel 2.85 / 2.88 ms at L = 4096 in two runs;
# docs/kernels/hopper_bwd_register_variants_h100.json), and were removed: dSᵀ from P rounded to
# bf16, so that the float32 P dies before the matmuls (3.03 ms, spills unchanged; 3.07 ms and 168
# bytes with dSᵀ during dV's matmul too; at head dim 64 0.318 / 0.648 against 0.299 / 0.593 ms at
# VAR's 680 / 2240 tokens), and (232, 40) here (3.02 ms, 208 bytes).
BWD_MAX_REGISTERS = (240, 24)
# Head dims at which each backward step addresses the shared-memory tiles that stay put (its K and
# V rows, and K's column half for dQ) anew, through an index LLVM cannot see is 0, so that their
# wgmma descriptors are computed inside the query loop rather than before it and spilled. The
# H100 backward's PTX with those 24 descriptor computations moved into the loop by hand compiled
# with no spills (ptxas 13.5: 176 bytes without the move, 0 with it). On an H200 (jax 0.11.2, bf16,
# 16 heads) at head dim 128 ptxas reported no spills (164 bytes before) and the backward kernel
# took 2.662 against 2.920 ms at L = 4096 (two processes, docs/kernels/breakdown_4096_h200.json),
# 2.542 / 5.149 against 2.802 / 5.602 ms at L = 4096 / 8192 (one process,
# hopper_bwd_variants_h200.json; its `pallas_bwd_descriptors_before_loop` rows are the other way).
# At head dim 64 (no spills either way) block-causal at VAR's 680 / 2240 tokens took 0.292 /
# 0.595 against 0.291 / 0.591 ms (bench_var_h200.json), so 64 keeps them before the loop.
DESCRIPTORS_IN_LOOP_HEAD_DIMS = (128,)


def backward(q_BLHD, k_BSHD, v_BSHD, do_BLHD, lse_BHL, delta_BHL, *, scale: float,
             mask: Optional[PrefixMask] = None):
  """`_backward`, batchable: under vmap the mapped axis joins the batch (the kernel runs once)."""

  @jax.custom_batching.custom_vmap
  def call(*args):
    return _backward(*args, scale=scale, mask=mask)

  @call.def_vmap
  def _(axis_size, in_batched, *args):
    args = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, batched in zip(args, in_batched)]
    outs = call(*(x.reshape(-1, *x.shape[2:]) for x in args))
    return tuple(x.reshape(axis_size, -1, *x.shape[1:]) for x in outs), (True,) * 3

  return call(q_BLHD, k_BSHD, v_BSHD, do_BLHD, lse_BHL, delta_BHL)


def _backward(q_BLHD, k_BSHD, v_BSHD, do_BLHD, lse_BHL, delta_BHL, *, scale: float,
              mask: Optional[PrefixMask]):
  """dq [B, L, H, D] float32 and dk, dv per query head [B, S, H, D] in q's dtype (rounded per
  head before the caller's float32 sum over a group) of attention under `mask`, from the forward's
  lse [B, H, L'] (natural log; L' ≥ L, as `forward` returns it) and delta = Σ_d o·do [B, H, ≥ L].
  dq is summed by float32 atomics in no fixed order: not bitwise reproducible from run to run.
  Lengths need not be whole tiles (`LENGTH_MULTIPLE`): query rows past L are read as zeros, so
  they add nothing, and the gradients of rows and keys past the ends are not written.

  FlashAttention-3's schedule: one program per (head, 2·BWD_BLOCK_K keys, batch) walks the query
  tiles, so every tile pair costs five matmuls (Sᵀ, dPᵀ, dV, dK, dQ), against seven when dQ gets
  its own pass. Each compute warpgroup owns BWD_BLOCK_K keys (their K, V in shared memory, dK, dV
  in registers): Sᵀ = K·Qᵀ, Pᵀ = exp(Sᵀ − lse), dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − delta)
  (while dV's matmul runs, at the head dims of `DS_DURING_DV_HEAD_DIMS`), dK += dSᵀ·Q. dSᵀ goes
  to shared memory for this step's dQ = dS·K, which is added into dq with TMA reduce-adds
  (float32 in global memory, so dq starts at zero and is not in q's dtype): at head dim 128 each
  warpgroup adds half the columns over all the program's keys once both have written dSᵀ, at 64
  all columns over its own keys (see `split_dq`). Warpgroup 2 streams Q, dO, lse and delta tiles
  into a ring of `STAGES` slots.

  With a `mask` the program starts at the first query tile that sees its first key (the rows
  that see a key are a suffix), masks P up to the first tile that sees all its keys, and both
  warpgroups walk that one range, so they stay in step (a warpgroup's tiles its keys are hidden
  from give P = 0); it stops after the last query tile that holds a true query
  (`PrefixMask.q_valid`: dq of the rows after it stays 0).
  """
  batch, q_len, heads, head_dim, kv_len, group = _checked_shapes(q_BLHD, k_BSHD, v_BSHD, scale,
                                                                 mask)
  mask = hide_key_tail(mask, kv_len)
  # lse and delta in whole programs, so that no query tile of them runs past their end.
  padded_q = pl.cdiv(q_len, _COMPUTE_WARPGROUPS * BLOCK_Q) * (_COMPUTE_WARPGROUPS * BLOCK_Q)
  lse_BHL, delta_BHL = (jnp.pad(x, ((0, 0), (0, 0), (0, padded_q - x.shape[2])))
                        if x.shape[2] < padded_q else x for x in (lse_BHL, delta_BHL))
  dtype = q_BLHD.dtype
  q_steps = query_steps(mask, q_len)
  stages = min(STAGES, q_steps)
  # dQ at head dim 128: each warpgroup adds half the columns over all the program's keys, after
  # both wrote dSᵀ (its own keys over all columns, a [64, 128] float32 accumulator more, ran
  # 0.74–0.77× cuDNN fwd+bwd against 0.93–0.94×); at 64 each adds all columns over its own keys,
  # with twice the reduce-adds and no meeting (0.96–0.97× against 0.91–0.93×):
  # docs/kernels/hopper_bwd_{own,split}_dq_h100.json. dQ staged in swizzled shared memory, or
  # deferred a step, took 0.98–1.02× this one's fwd+bwd time, within the noise; both were dropped
  # (docs/kernels/bench_hopper_variants_h100.json).
  split_dq = head_dim > 64
  ds_during_dv = head_dim in DS_DURING_DV_HEAD_DIMS
  descriptors_in_loop = head_dim in DESCRIPTORS_IN_LOOP_HEAD_DIMS
  dq_cols = head_dim // _COMPUTE_WARPGROUPS if split_dq else head_dim
  # Split: both read a dSᵀ slot, which the next step may not overwrite.
  ds_slots = 2 if split_dq else 1
  logit_scale = scale * LOG2_E
  tiles = _wgmma_transforms(dtype, dq_cols)  # K is read a column half at a time for a split dQ.

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, scratch):
    smem, (k_ready, v_ready, q_ready, do_ready, lse_ready, delta_ready), free, ds_written = scratch
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem = smem
    b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    kv_block_start = lax.axis_index("kv_blocks") * (_COMPUTE_WARPGROUPS * BWD_BLOCK_K)
    if mask is None:
      first_step = 0
    else:
      first_step, full_step = backward_tiles(mask, kv_block_start,
                                             _COMPUTE_WARPGROUPS * BWD_BLOCK_K, q_len)
    # The ring slot of query tile i.
    ring_slot = (lambda i: lax.rem(i, stages)) if mask is None else (
        lambda i: lax.rem(i - first_step, stages))

    meet = lambda: _meet(ds_written)

    @pl.when(wg < _COMPUTE_WARPGROUPS)
    def _compute():
      plgpu.set_max_registers(BWD_MAX_REGISTERS[0], action="increase")
      own = pl.ds(wg * BWD_BLOCK_K, BWD_BLOCK_K)
      k_own, v_own = k_smem.at[own], v_smem.at[own]
      keys = (b, pl.ds(kv_block_start + wg * BWD_BLOCK_K, BWD_BLOCK_K),
              lax.div(h, jnp.array(group, h.dtype)))
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_own, k_ready.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_own, v_ready.at[wg])
      plgpu.barrier_wait(k_ready.at[wg])
      plgpu.barrier_wait(v_ready.at[wg])
      zeros = lambda *shape: plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
      by_query = lambda x_Q, shape: lax.broadcast_in_dim(x_Q, shape, [1])
      tile = (BWD_BLOCK_K, BWD_BLOCK_Q)

      def dq_matmul(dq_acc, ds_slot, k_rows, k_mine):
        """dQ = dS·K of the tile whose dSᵀ is in `ds_slot`: split, our column half over all keys
        (`k_rows`, all of K's rows); else all columns over our keys (`k_mine`, our K rows)."""
        if split_dq:
          plgpu.wgmma(dq_acc, plgpu.transpose_ref(ds_smem.at[ds_slot], (1, 0)),
                      k_rows.at[:, pl.ds(wg * dq_cols, dq_cols)])
        else:
          plgpu.wgmma(dq_acc, plgpu.transpose_ref(ds_smem.at[ds_slot, own], (1, 0)), k_mine)

      def add_dq(dq_QD, i):
        """Adds dQ of query tile i into dq by a TMA reduce-add."""
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # The last add has read dq_smem.
        dq_smem.at[wg][...] = dq_QD * scale
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            dq_smem.at[wg],
            dq_ref.at[b, pl.ds(i * BWD_BLOCK_Q, BWD_BLOCK_Q), h,
                      pl.ds(wg * dq_cols if split_dq else 0, dq_cols)],
            reduction_op="add")

      def step(i, carry, masked: bool = False):
        """dSᵀ, dK, dV and dQ of query tile i; masked: P of the pairs `mask` hides is 0."""
        dk_KD, dv_KD = carry
        slot, ds_slot = ring_slot(i), lax.rem(i, ds_slots)
        q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
        k_rows, k_mine, v_mine = k_smem, k_own, v_own
        if descriptors_in_loop:  # The same tiles, through an index that is 0 but opaque to LLVM.
          zero = lax.optimization_barrier(i) - i
          k_rows = k_smem.at[pl.ds(zero * k_smem.shape[0], k_smem.shape[0])]
          mine = pl.ds((wg + zero) * BWD_BLOCK_K, BWD_BLOCK_K)
          k_mine, v_mine = k_smem.at[mine], v_smem.at[mine]
        plgpu.barrier_wait(q_ready.at[slot])

        def scores(s_ref):
          plgpu.wgmma(s_ref, k_mine, plgpu.transpose_ref(q_tile, (1, 0)))
          return s_ref[...]
        s_KQ = pl.run_scoped(scores, plgpu.ACC(tile, jnp.float32))
        plgpu.barrier_wait(lse_ready.at[slot])
        lse_Q = plgpu.load(lse_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
        p_KQ = jnp.exp2(s_KQ * logit_scale - by_query(lse_Q * LOG2_E, tile))
        if masked:
          keys_start = kv_block_start + wg * BWD_BLOCK_K
          p_KQ = jnp.where(_tile_visible(mask, i * BWD_BLOCK_Q, keys_start, tile, q_axis=1), p_KQ,
                           0.0)
        plgpu.barrier_wait(do_ready.at[slot])

        def ds_from(dp_KQ):
          """dSᵀ = Pᵀ∘(dPᵀ − delta), float32."""
          plgpu.barrier_wait(delta_ready.at[slot])
          delta_Q = plgpu.load(delta_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
          return p_KQ * (dp_KQ - by_query(delta_Q, tile))

        def values(refs):
          """dV += Pᵀ·dO and dPᵀ = V·dOᵀ; with ds_during_dv dPᵀ's matmul first, and then its
          registers take dSᵀ, computed while dV's matmul runs."""
          dv_ref, dp_ref = refs
          if not ds_during_dv:
            plgpu.wgmma(dv_ref, p_KQ.astype(dtype), do_tile)
          plgpu.wgmma(dp_ref, v_mine, plgpu.transpose_ref(do_tile, (1, 0)))
          if ds_during_dv:
            plgpu.wgmma(dv_ref, p_KQ.astype(dtype), do_tile)
            dp_ref[...] = ds_from(plgpu.wgmma_accumulator_load(dp_ref, wait_n=1))
        dv_KD, dp_KQ = pl.run_state(values)((plgpu.ACC.init(dv_KD), plgpu.ACC.init(zeros(*tile))))
        ds_KQ = (dp_KQ if ds_during_dv else ds_from(dp_KQ)).astype(dtype)

        def gradients(refs):
          dk_acc, dq_acc = refs
          plgpu.wgmma(dk_acc, ds_KQ, q_tile)  # Needs only our dSᵀ: runs while we wait below.
          ds_smem.at[ds_slot, own][...] = ds_KQ
          plgpu.commit_smem()
          if split_dq:
            meet()  # Both halves of dSᵀ are written.
          dq_matmul(dq_acc, ds_slot, k_rows, k_mine)
        dk_KD, dq_QD = pl.run_state(gradients)((plgpu.ACC.init(dk_KD),
                                                plgpu.ACC.init(zeros(BWD_BLOCK_Q, dq_cols))))
        plgpu.barrier_arrive(free.at[slot])
        add_dq(dq_QD, i)
        return dk_KD, dv_KD

      carry = (zeros(BWD_BLOCK_K, head_dim), zeros(BWD_BLOCK_K, head_dim))
      start = first_step
      if mask is not None:
        carry = lax.fori_loop(start, full_step, functools.partial(step, masked=True), carry)
        start = full_step
      carry = lax.fori_loop(start, q_steps, step, carry)
      dk_KD, dv_KD = carry
      if split_dq:
        meet()  # The other warpgroup's last dQ has read our K rows: they can hold dK now.
      k_own[...] = (dk_KD * scale).astype(dtype)
      v_own[...] = dv_KD.astype(dtype)
      plgpu.commit_smem()
      out_rows = (b, pl.ds(kv_block_start + wg * BWD_BLOCK_K, BWD_BLOCK_K), h)
      plgpu.copy_smem_to_gmem(k_own, dk_ref.at[out_rows])
      plgpu.copy_smem_to_gmem(v_own, dv_ref.at[out_rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WARPGROUPS)
    def _stream():
      plgpu.set_max_registers(BWD_MAX_REGISTERS[1], action="decrease")

      def fetch(i, slot):
        rows, row_ids = (b, _tile_rows(i, BWD_BLOCK_Q, q_len), h), (b, h, pl.ds(
            i * BWD_BLOCK_Q, BWD_BLOCK_Q))
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[row_ids], lse_smem.at[slot], lse_ready.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[row_ids], delta_smem.at[slot],
                                delta_ready.at[slot])

      for i in range(stages):
        if mask is None:
          fetch(i, i)
        else:
          pl.when(first_step + i < q_steps)(functools.partial(fetch, first_step + i, i))

      @pl.loop(0, q_steps - first_step - stages)
      def _(i):
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(free.at[slot])
        fetch(i + stages if mask is None else first_step + i + stages, slot)

  def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref):
    kv_rows = _COMPUTE_WARPGROUPS * BWD_BLOCK_K
    smem = (plgpu.SMEM((kv_rows, head_dim), dtype, transforms=tiles),
            plgpu.SMEM((kv_rows, head_dim), dtype, transforms=tiles),
            plgpu.SMEM((stages, BWD_BLOCK_Q, head_dim), dtype, transforms=tiles),
            plgpu.SMEM((stages, BWD_BLOCK_Q, head_dim), dtype, transforms=tiles),
            plgpu.SMEM((stages, BWD_BLOCK_Q), jnp.float32),
            plgpu.SMEM((stages, BWD_BLOCK_Q), jnp.float32),
            plgpu.SMEM((ds_slots, kv_rows, BWD_BLOCK_Q), dtype, transforms=tiles),
            plgpu.SMEM((_COMPUTE_WARPGROUPS, BWD_BLOCK_Q, dq_cols), jnp.float32))
    ready = ((plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS),) * 2
             + (plgpu.Barrier(num_barriers=stages),) * 4)
    free = plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS, num_barriers=stages)
    pl.run_scoped(
        lambda *scratch: kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
                                dk_ref, dv_ref, scratch),
        smem, ready, free, plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS),
        collective_axes="wg")

  per_q_head = jax.ShapeDtypeStruct((batch, kv_len, heads, head_dim), dtype)
  mesh = plgpu.Mesh(grid=(heads, pl.cdiv(kv_len, _COMPUTE_WARPGROUPS * BWD_BLOCK_K), batch),
                    grid_names=("heads", "kv_blocks", "batch"),
                    num_threads=_COMPUTE_WARPGROUPS + 1, thread_name="wg")
  # pl.kernel (not plgpu.kernel, which takes no refs) aliases the dq ref in and out: the TMA adds
  # into zeros in place.
  call = pl.kernel(entry, out_type=(per_q_head, per_q_head), mesh=mesh,
                   compiler_params=plgpu.CompilerParams(approx_math=True),
                   name="flash_attention_hopper_bwd")

  def run(refs):
    dq_ref, dk_ref, dv_ref = refs
    dk_ref[...], dv_ref[...] = call(q_BLHD, k_BSHD, v_BSHD, do_BLHD, lse_BHL, delta_BHL, dq_ref)

  return pl.run_state(run)((jnp.zeros(q_BLHD.shape, jnp.float32),
                            jnp.zeros(per_q_head.shape, dtype), jnp.zeros(per_q_head.shape, dtype)))


def _wgmma_transforms(dtype, columns: int):
  """Shared-memory tiles wgmma reads without bank conflicts: rows of `columns` elements (at most
  128 bytes) swizzled over 8-row groups."""
  row_bytes = min(128, columns * jnp.dtype(dtype).itemsize)
  return (plgpu.TilingTransform((8, row_bytes // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(row_bytes))
