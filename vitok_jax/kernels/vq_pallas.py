"""Nearest-codebook-entry search in Pallas: tiled distances with a running argmin.

One program per tile of tokens loops over the codebook in tiles of `block_codes`, computing
|e|² − 2·z·eᵀ for one [tokens, codes] tile at a time (|z|², the same for every code, is added to
the winner at the end; where the dot has a spare padded coordinate, as LlamaGen's 8 padded to 16,
|e|² rides in it: the product [z, 1]·[−2·e, |e|²]ᵀ is the whole term) and keeping an elementwise
running minimum and the tile it came from per (token, column of the tile), reduced over the
columns once at the end; the tokens × codebook matrix never exists (LlamaGen's 16384 codes ×
65k tokens would be 4 GiB in float32). Ties go to the first index, as `jnp.argmin`. With
`normalize` the tokens are l2-normalised inside the kernel and the (small) codebook once outside
(cosine lookup).

The same kernel lowers to Triton (GPU) and Mosaic (TPU). On GPU each program streams codebook
tiles from global memory (the whole codebook is small enough to stay in L2: 16384 × 8 float32 is
512 KiB); on TPU the codebook block is resident in VMEM, so very wide codebooks (K·D·4 bytes
beyond a few MiB) would want a grid axis over codes there. Semantics: `reference.vq_nearest`.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from vitok_jax.errors import ConfigError
from vitok_jax.kernels import reference

# GPU tiles from tools/tune_kernels.py on an H100 (65536 tokens, 16384 × 8 codes): the tiled dot
# as TF32×3 took 0.81 ms against 1.37–2.93 ms for the multiply-adds (jnp: 2.96 ms). On an H200
# with |e|² in the dot these tiles stayed the fastest of six (docs/kernels/
# vq_code_norms_in_dot_h200.json: kernel 0.640 ms; 64 × 128: 0.686).
DEFAULT_BLOCK_TOKENS = 128
DEFAULT_BLOCK_CODES = 64
DEFAULT_NUM_WARPS = 4
# |e|² of a padding code: finite, so that its TF32 halves (x − hi) are too; far beyond any code.
_FAR = float(jnp.finfo(jnp.float32).max) / 4


def _vq_kernel(z_ref, codebook_ref, code_sq_ref, index_ref, dist_ref, *, dim: int,
               block_codes: int, normalize: bool, fma: bool, sq_in_codebook: bool,
               dot_precision):
  """z [bn, Dp] (zeros past `dim`), −2·codebook, |e|² [1, Kp] (huge on padding) → index,
  distance [bn, 1].

  codebook: [Kp, Dp] for a tiled dot at `dot_precision`, or [D, Kp] with `fma`, where
  |e|² − 2·z·e is D broadcast multiply-adds per tile onto |e|² (no matrix unit and no padding of
  D to 16; slower than the TF32×3 dot on an H100 at D = 8). With `sq_in_codebook` the codebook's
  coordinate `dim` holds |e|² and z's is set to 1 here (`code_sq_ref` is not read).
  """
  block = z_ref.shape[0]
  z_ND = z_ref[...].astype(jnp.float32)
  z_sq_N1 = jnp.sum(z_ND * z_ND, axis=1, keepdims=True)
  norm_N1 = 1.0
  if normalize:
    norm_N1 = jnp.maximum(jnp.sqrt(z_sq_N1), reference.NORM_EPS)
    z_ND = z_ND / norm_N1
    z_sq_N1 = jnp.sum(z_ND * z_ND, axis=1, keepdims=True)
  if sq_in_codebook:
    z_ND = jnp.where(jax.lax.broadcasted_iota(jnp.int32, z_ND.shape, 1) == dim, 1.0, z_ND)
  column_NK = jax.lax.broadcasted_iota(jnp.int32, (block, block_codes), 1)
  if fma:  # Loop-invariant columns of z, [bn, 1] each (values cannot be sliced in a kernel).
    z_columns = [z_ref[:, pl.ds(d, 1)].astype(jnp.float32) / norm_N1 for d in range(dim)]

  def code_term(codes):
    """|e|² − 2·z·e for this tile's codes: [bn, bc]."""
    if not fma:
      product_NK = jax.lax.dot_general(
          z_ND, codebook_ref[codes, :].astype(jnp.float32), (((1,), (1,)), ((), ())),
          precision=dot_precision, preferred_element_type=jnp.float32)
      return product_NK if sq_in_codebook else code_sq_ref[:, codes] + product_NK
    total_NK = code_sq_ref[:, codes]
    for d, z_N1 in enumerate(z_columns):
      total_NK = total_NK + z_N1 * codebook_ref[pl.ds(d, 1), codes].astype(jnp.float32)
    return total_NK

  # Running minimum per (token, column slot) across code tiles, with the tile it came from,
  # reduced once after the loop: no row reduction inside the loop. A later tile must be strictly
  # smaller, so each slot keeps its first index, and the final reduction takes the smallest index
  # among the slots at the minimum: the first index of the minimum overall.
  def body(j, carry):
    best_NK, best_tile_NK = carry
    term_NK = code_term(pl.ds(j * block_codes, block_codes))
    better_NK = term_NK < best_NK
    return jnp.where(better_NK, term_NK, best_NK), jnp.where(better_NK, j, best_tile_NK)

  num_tiles = code_sq_ref.shape[1] // block_codes
  best_NK, best_tile_NK = jax.lax.fori_loop(
      0, num_tiles, body, (jnp.full((block, block_codes), jnp.inf, jnp.float32),
                           jnp.zeros((block, block_codes), jnp.int32)))
  best_N1 = jnp.min(best_NK, axis=1, keepdims=True)
  index_NK = best_tile_NK * block_codes + column_NK
  index_ref[...] = jnp.min(jnp.where(best_NK == best_N1, index_NK, jnp.iinfo(jnp.int32).max),
                           axis=1, keepdims=True)
  dist_ref[...] = best_N1 + z_sq_N1


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("normalize", "block_tokens", "block_codes",
                                             "num_warps", "fma", "interpret", "triton",
                                             "sq_in_codebook"))
def _vq_nearest(z_ND, codebook_KD, *, normalize: bool, block_tokens: int, block_codes: int,
                num_warps: int, fma: bool, sq_in_codebook: Optional[bool], interpret: bool,
                triton: bool):
  num_tokens, dim = z_ND.shape
  num_codes = codebook_KD.shape[0]
  block = min(block_tokens, max(16, pl.next_power_of_2(num_tokens)))
  block_codes = min(block_codes, max(16, pl.next_power_of_2(num_codes)))
  padded_n, padded_k = _round_up(num_tokens, block), _round_up(num_codes, block_codes)
  # Zero coordinates change no distance; Triton's dot wants power-of-two tiles of at least 16.
  padded_dim = max(16, pl.next_power_of_2(dim)) if triton and not fma else dim
  if sq_in_codebook is None:  # Free where Triton pads D with room to spare (H200, D = 8: the
    # kernel 0.64 against 0.77 ms; where it has none, D = 32, it doubled the dot's width and
    # time); in the interpreter, where the tests run it. Not measured on a TPU: off there.
    sq_in_codebook = not fma and ((triton and padded_dim > dim) or interpret)
  if sq_in_codebook and fma:
    raise ConfigError("sq_in_codebook=True is for the tiled dot: leave it None with fma=True")
  if sq_in_codebook:  # Triton's tiles stay powers of two.
    padded_dim = max(16, pl.next_power_of_2(dim + 1)) if triton else max(padded_dim, dim + 1)
  e_KD = reference.l2_normalize(codebook_KD) if normalize else codebook_KD.astype(jnp.float32)
  code_sq_K = jnp.pad(jnp.sum(e_KD * e_KD, axis=-1), (0, padded_k - num_codes),
                      constant_values=_FAR)  # Padded codes are never nearest.
  e_KD = -2.0 * jnp.pad(e_KD, ((0, padded_k - num_codes), (0, 0)))  # Exact: a power of two.
  if sq_in_codebook:
    e_KD = jnp.concatenate([e_KD, code_sq_K[:, None]], axis=1)
  codebook = e_KD.T if fma else jnp.pad(e_KD, ((0, 0), (0, padded_dim - e_KD.shape[1])))
  z_ND = jnp.pad(z_ND, ((0, padded_n - num_tokens), (0, padded_dim - dim)))
  # Tensor cores at float32 accuracy on GPU: three TF32 products (hi·hi + hi·lo + lo·hi).
  dot_precision = (jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if triton
                   else jax.lax.Precision.HIGHEST)
  column_spec = pl.BlockSpec((block, 1), lambda t: (t, 0))
  index_N1, dist_N1 = pl.pallas_call(
      functools.partial(_vq_kernel, dim=dim, block_codes=block_codes, normalize=normalize,
                        fma=fma, sq_in_codebook=sq_in_codebook, dot_precision=dot_precision),
      grid=(padded_n // block,),
      in_specs=[pl.BlockSpec((block, padded_dim), lambda t: (t, 0)),
                pl.BlockSpec(codebook.shape, lambda t: (0, 0)),
                pl.BlockSpec((1, padded_k), lambda t: (0, 0))],
      out_specs=[column_spec, column_spec],
      out_shape=[jax.ShapeDtypeStruct((padded_n, 1), jnp.int32),
                 jax.ShapeDtypeStruct((padded_n, 1), jnp.float32)],
      # On GPU, Triton explicitly (pallas_call's default GPU lowering is Mosaic GPU, which would
      # stage the whole codebook in shared memory).
      compiler_params=(pltriton.CompilerParams(num_warps=num_warps, num_stages=2) if triton
                       else None),
      interpret=interpret,
      name="vq_nearest",
  )(z_ND, codebook, code_sq_K[None])
  return index_N1[:num_tokens, 0], dist_N1[:num_tokens, 0]


def vq_nearest(z_ND, codebook_KD, *, normalize: bool = True,
               block_tokens: int = DEFAULT_BLOCK_TOKENS, block_codes: int = DEFAULT_BLOCK_CODES,
               num_warps: int = DEFAULT_NUM_WARPS, fma: bool = False,
               sq_in_codebook: Optional[bool] = None, interpret: Optional[bool] = None):
  """Pallas nearest code of z [..., D] in codebook [K, D]: (index [...] int32, dist [...] f32).

  Same result as `reference.vq_nearest` (first index on ties). Not differentiable: gather the codes
  with the index and build the VQ losses from them. Tiles: `block_tokens` × `block_codes`;
  `num_warps` per program (GPU); `fma`: z·e as D multiply-adds instead of a tiled dot (on GPU the
  dot runs on the tensor cores as TF32×3, float32-accurate, and was the faster at LlamaGen's D = 8);
  `sq_in_codebook`: |e|² as one more coordinate of the dot rather than added per tile (default
  where that coordinate is free: Triton's padding of D has room; and in the interpreter).
  """
  backend = jax.default_backend()
  interpret = backend == "cpu" if interpret is None else interpret
  *lead, dim = z_ND.shape
  index, dist = _vq_nearest(
      jax.lax.stop_gradient(z_ND.reshape(-1, dim)), jax.lax.stop_gradient(codebook_KD),
      normalize=normalize, block_tokens=block_tokens, block_codes=block_codes,
      num_warps=num_warps, fma=bool(fma),
      sq_in_codebook=None if sq_in_codebook is None else bool(sq_in_codebook),
      interpret=bool(interpret), triton=backend == "gpu" and not interpret)
  return index.reshape(lead), dist.reshape(lead)
