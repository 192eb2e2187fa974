"""Fused binary spherical quantisation (BSQ): one Pallas pass over the latents.

Per tile of tokens the kernel reads z once and writes: the quantised latents sign(u)/√d (u = z/‖z‖),
the packed codes, and per-program sums of the soft bit probabilities, their binary entropies and
the hard bits (the entropy penalty's statistics) as rows of one array, which the wrapper adds up
in one reduction. The backward is the straight-through estimator (sign(u) ≈ u, then the 1/√d
scale) through the l2 normalisation plus the exact gradient of the statistics; it is elementwise
per token, so plain jnp (one XLA fusion) does it in one pass too.

The same kernel lowers to Triton (GPU) and Mosaic (TPU): 2-D blocks whose last two dims are whole
(codes, stats) or tile multiples, and with `steps` = 1 (the default off GPU) no in-kernel loop.
Semantics: `reference.bsq`.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from vitok_jax.errors import ConfigError
from vitok_jax.kernels import reference

# Launch (block_tokens, steps, num_warps) from tools/tune_kernels.py on an H100 (1M × 32 bf16,
# docs/kernels/tuned_bsq_h100.json): 32 tokens × 16 tiles per program, 2 warps, 0.093 ms per call;
# one tile of 64 or 128 tokens per program, 4 warps, 0.105 ms (0.085 ms in another run: tiles are
# within the noise); the precise math 0.128 ms; the jnp version 0.46 ms. A later sweep
# (docs/kernels/tuned_bsq_kernel_times_h100.json) ranked them otherwise per call (0.08–0.15 ms,
# mostly launch noise); timed by CUPTI, the kernel alone took 0.061 ms with this launch and
# 0.058–0.062 for the best ten. Elsewhere (TPU, the CPU interpreter) one tile of 64 per program.
# On an H200 (docs/kernels/bsq_prefetch_h200.json, CUPTI) loading tiles two steps ahead of their
# math (`prefetch`) took this launch's kernel from 55% to 59% of HBM at 1M tokens and from 61% to
# 67% at 16M, where 8 tokens × 64 tiles, 1 warp reached 70.5% (51% at 1M): inputs of
# `LARGE_TOKENS` or more take that launch ("gpu_large"). Three tiles ahead or more was slower.
DEFAULT_LAUNCH = {"gpu": (32, 16, 2), "gpu_large": (8, 64, 1), "other": (64, 1, 4)}
LARGE_TOKENS = 1 << 22
DEFAULT_PREFETCH = 2
_STATS = ("prob", "entropy", "bit")  # The per-program sums, one row each.
STAT_ROWS = 4  # Their rows in the kernel's output (Triton's blocks are powers of two).
_LOG2_E, _LN_2 = 1.4426950408889634, 0.6931471805599453


class _Math(NamedTuple):
  """The kernel's transcendentals, f32 → f32."""
  exp2: Callable
  log2: Callable
  reciprocal: Callable


def _ptx_approx(instruction: str) -> Callable:
  """x ↦ PTX `instruction`.approx.ftz.f32 of x (Triton only): one special-function-unit op where
  libdevice's precise versions take tens of instructions; relative error about 2⁻²²."""
  def apply(x):
    [y] = pltriton.elementwise_inline_asm(
        f"{instruction}.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return y
  return apply


PRECISE_MATH = _Math(exp2=jnp.exp2, log2=jnp.log2, reciprocal=lambda x: 1.0 / x)
PTX_APPROX_MATH = _Math(exp2=_ptx_approx("ex2"), log2=_ptx_approx("lg2"),
                        reciprocal=_ptx_approx("rcp"))


def _bsq_kernel(z_ref, quantized_ref, codes_ref, sums_ref, *, dim: int, num_tokens: int,
                padded: bool, logit_scale: float, integer_pack: bool, block: int, prefetch: int,
                math_: _Math):
  """z [steps·bn, dp] → quantized [steps·bn, dp], codes [steps·bn, words], sums [STAT_ROWS, dp]
  (rows: `_STATS`, then zeros).

  The program walks its `steps` tiles of `block` tokens (a loop the compiler can pipeline: the
  next tile's load overlaps this one's math) and adds each tile's statistics elementwise into
  [bn, dp] accumulators, reduced over tokens once at the end. Per-column and per-token quantities
  are built as [1, dp] / [bn, 1] rows and broadcast, so the per-element work is the quantisation
  and three transcendentals (`math_`). Padding (tokens past `num_tokens`, columns past `dim`) is
  masked out of the sums only where the shapes have any. With `prefetch` = k the loop carries the
  next k tiles, loaded k steps before their math (the last steps load their own tile again), so
  that a program keeps loads in flight while it computes, whatever the compiler pipelines.
  """
  rows, padded_dim = z_ref.shape
  steps = rows // block
  inv_sqrt_d = 1.0 / math.sqrt(dim)
  column_1D = jax.lax.broadcasted_iota(jnp.int32, (1, padded_dim), 1)
  # Pack: word w holds bits 32w.., its first bit most significant: a sum of distinct powers of two
  # per row. GPU: one int32 sum per word (2^31 wraps to the sign bit, as the OR would). TPU: a
  # float sum per 16-bit half (exact below 2^24), which Mosaic reduces natively.
  word_of_1D, index_in_word_1D = column_1D // 32, column_1D % 32
  shift_1D = jnp.minimum(32, dim - 32 * word_of_1D) - 1 - index_in_word_1D

  def pack(bit_ND, word):
    if integer_pack:
      weight_1D = jnp.where((word_of_1D == word) & (column_1D < dim),
                            jnp.left_shift(1, jnp.clip(shift_1D, 0, 31)), 0)
      return jnp.sum(jnp.where(bit_ND, weight_1D, 0), axis=1, keepdims=True)
    halves = []
    for half in range(2):
      in_half_1D = ((word_of_1D == word) & (column_1D < dim) & (shift_1D >= 16 * half)
                    & (shift_1D < 16 * half + 16))
      weight_1D = jnp.where(
          in_half_1D, jnp.left_shift(1, jnp.clip(shift_1D - 16 * half, 0, 15)).astype(jnp.float32),
          0.0)
      halves.append(jnp.sum(jnp.where(bit_ND, weight_1D, 0.0), axis=1, keepdims=True)
                    .astype(jnp.int32))
    return jnp.left_shift(halves[1], 16) | halves[0]

  load = lambda step: z_ref[pl.ds(jnp.minimum(step, steps - 1) * block, block), :]

  def tile(step, z_raw_ND, sums):
    tokens = pl.ds(step * block, block)
    z_ND = z_raw_ND.astype(jnp.float32)
    inv_norm_N1 = 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(z_ND * z_ND, axis=1, keepdims=True)),
                                    reference.NORM_EPS)
    u_ND = z_ND * inv_norm_N1
    bit_ND = u_ND > 0  # sign(0) → −1: a zero coordinate is bit 0, as Infinity's quantiser.
    quantized_ref[tokens, :] = jnp.where(bit_ND, inv_sqrt_d, -inv_sqrt_d).astype(
        quantized_ref.dtype)
    for word in range(codes_ref.shape[1]):
      codes_ref[tokens, pl.ds(word, 1)] = pack(bit_ND, word)
    # σ(x) and its binary entropy softplus(x) − x·σ(x) = |x|·e/(1 + e) + ln(1 + e), e = exp(−|x|):
    # three transcendentals per element (base 2, `math_`), the rest multiply-adds.
    a_ND = logit_scale * jnp.abs(u_ND)
    e_ND = math_.exp2(a_ND * -_LOG2_E)
    inv_1pe_ND = math_.reciprocal(1.0 + e_ND)
    ep_ND = e_ND * inv_1pe_ND
    p_ND = jnp.where(bit_ND, inv_1pe_ND, ep_ND)
    stats = (p_ND, a_ND * ep_ND + _LN_2 * math_.log2(1.0 + e_ND), bit_ND.astype(jnp.float32))
    if padded:
      token_N1 = (first_token + step * block
                  + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0))
      counted_ND = jnp.logical_and(token_N1 < num_tokens, column_1D < dim)  # Not padding.
      stats = tuple(jnp.where(counted_ND, v, 0.0) for v in stats)
    return tuple(total + v for total, v in zip(sums, stats))

  first_token = pl.program_id(0) * rows  # Read outside the loop (the interpreter needs it so).
  zeros = (jnp.zeros((block, padded_dim), jnp.float32),) * 3
  if steps == 1:
    sums = tile(0, load(0), zeros)
  elif not prefetch:
    sums = jax.lax.fori_loop(0, steps, lambda step, sums: tile(step, load(step), sums), zeros)
  else:
    def step_ahead(step, carry):
      sums, ahead = carry  # ahead: tiles step … step + prefetch − 1.
      return tile(step, ahead[0], sums), (*ahead[1:], load(step + prefetch))
    sums, _ = jax.lax.fori_loop(0, steps, step_ahead,
                                (zeros, tuple(load(i) for i in range(prefetch))))
  for row, total_ND in enumerate(sums):
    sums_ref[pl.ds(row, 1), :] = jnp.sum(total_ND, axis=0, keepdims=True)
  sums_ref[pl.ds(len(sums), STAT_ROWS - len(sums)), :] = jnp.zeros(
      (STAT_ROWS - len(sums), padded_dim), jnp.float32)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("inv_temperature", "block_tokens", "steps",
                                             "num_warps", "num_stages", "prefetch", "interpret",
                                             "triton", "integer_pack", "fast_math"))
def _bsq_forward(z_ND, *, inv_temperature: float, block_tokens: int, steps: int, num_warps: int,
                 num_stages: Optional[int], prefetch: int, interpret: bool, triton: bool,
                 integer_pack: bool, fast_math: bool):
  """z [N, d] → quantized [N, d], codes [N, words] uint32, sums of p, H(p), bits: [d] each."""
  num_tokens, dim = z_ND.shape
  words = -(-dim // 32)
  block = min(block_tokens, max(8, pl.next_power_of_2(num_tokens)))
  steps = max(1, min(steps, -(-num_tokens // block)))
  rows = block * steps  # Tokens per program.
  prefetch = min(prefetch, steps - 1)
  padded_n = _round_up(num_tokens, rows)
  # Triton tiles are powers of two; the extra zero coordinates are excluded from codes and sums.
  padded_dim = pl.next_power_of_2(dim) if triton else dim
  padded_words = pl.next_power_of_2(words) if triton else words
  z_ND = jnp.pad(z_ND, ((0, padded_n - num_tokens), (0, padded_dim - dim)))
  programs = padded_n // rows
  quantized, codes, sums = pl.pallas_call(
      functools.partial(_bsq_kernel, dim=dim, num_tokens=num_tokens,
                        padded=(padded_n, padded_dim) != (num_tokens, dim),
                        logit_scale=reference.bsq_logit_scale(dim, inv_temperature),
                        integer_pack=integer_pack, block=block, prefetch=prefetch,
                        math_=PTX_APPROX_MATH if fast_math else PRECISE_MATH),
      grid=(programs,),
      in_specs=[pl.BlockSpec((rows, padded_dim), lambda t: (t, 0))],
      out_specs=[pl.BlockSpec((rows, padded_dim), lambda t: (t, 0)),
                 pl.BlockSpec((rows, padded_words), lambda t: (t, 0)),
                 pl.BlockSpec((None, STAT_ROWS, padded_dim), lambda t: (t, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct(z_ND.shape, z_ND.dtype),
                 jax.ShapeDtypeStruct((padded_n, padded_words), jnp.int32),
                 jax.ShapeDtypeStruct((programs, STAT_ROWS, padded_dim), jnp.float32)],
      # On GPU, Triton explicitly: pallas_call's default GPU lowering (Mosaic GPU) copies at most
      # 256 elements per dimension asynchronously.
      compiler_params=(pltriton.CompilerParams(
          num_warps=num_warps, num_stages=num_stages or (1 if steps == 1 else 3))
                       if triton else None),
      interpret=interpret,
      name="bsq",
  )(z_ND)
  totals = sums.sum(0)[:len(_STATS), :dim]  # One reduction over the programs.
  return (quantized[:num_tokens, :dim],
          jax.lax.bitcast_convert_type(codes[:num_tokens, :words], jnp.uint32), *totals)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _bsq(z_ND, inv_temperature, launch):
  """launch: the static keyword arguments of `_bsq_forward` but inv_temperature."""
  return _bsq_forward(z_ND, inv_temperature=inv_temperature, **dict(launch))


def _bsq_fwd(z_ND, inv_temperature, launch):
  return _bsq(z_ND, inv_temperature, launch), z_ND


def _bsq_bwd(inv_temperature, launch, z_ND, cotangents):
  """Straight-through to u = z/‖z‖ for the quantised output (d q/du = I/√d), exact for the
  statistics."""
  del launch
  g_quantized_ND, _, g_prob_sum_D, g_entropy_sum_D, _ = cotangents
  dim = z_ND.shape[-1]
  z32_ND = z_ND.astype(jnp.float32)
  norm_N1 = jnp.maximum(jnp.sqrt(jnp.sum(z32_ND * z32_ND, axis=-1, keepdims=True)),
                        reference.NORM_EPS)
  u_ND = z32_ND / norm_N1
  logit_scale = reference.bsq_logit_scale(dim, inv_temperature)
  x_ND = logit_scale * u_ND
  p_ND = jax.nn.sigmoid(x_ND)
  # dσ(x)/dx = p(1 − p); dH(σ(x))/dx = −x·p(1 − p).
  g_u_ND = (g_quantized_ND.astype(jnp.float32) / math.sqrt(dim)
            + logit_scale * p_ND * (1 - p_ND) * (g_prob_sum_D - x_ND * g_entropy_sum_D))
  # Jacobian of z/‖z‖ is (I − u·uᵀ)/‖z‖.
  g_z_ND = (g_u_ND - u_ND * jnp.sum(u_ND * g_u_ND, axis=-1, keepdims=True)) / norm_N1
  return (g_z_ND.astype(z_ND.dtype),)


_bsq.defvjp(_bsq_fwd, _bsq_bwd)


def bsq_sums(z_ND, *, inv_temperature: float = 100.0, block_tokens: Optional[int] = None,
             steps: Optional[int] = None, num_warps: Optional[int] = None,
             num_stages: Optional[int] = None, prefetch: int = DEFAULT_PREFETCH,
             interpret: Optional[bool] = None,
             integer_pack: Optional[bool] = None, fast_math: Optional[bool] = None):
  """The kernel's outputs for z [..., d]: quantized [..., d], codes [..., words] uint32 and the
  sums over tokens of P(bit = 1), H(P(bit)) and the hard bits, [d] each (differentiable in z).

  Sums rather than means so that shards add up (`quantize.bsq` under a mesh); see `bsq`.
  """
  backend = jax.default_backend()
  interpret = backend == "cpu" if interpret is None else interpret
  *lead, dim = z_ND.shape
  triton = backend == "gpu" and not interpret
  kind = ("gpu_large" if math.prod(lead) >= LARGE_TOKENS else "gpu") if triton else "other"
  block_tokens, steps, num_warps = (default if value is None else value for value, default in
                                    zip((block_tokens, steps, num_warps), DEFAULT_LAUNCH[kind]))
  if fast_math and not triton:
    raise ConfigError("fast_math=True is PTX (Triton on GPU); leave it None elsewhere")
  if num_stages is not None and num_stages < 1:
    raise ConfigError(f"num_stages={num_stages}: a pipelining depth of at least 1, or None")
  if prefetch < 0:
    raise ConfigError(f"prefetch={prefetch}: the tiles loaded ahead, 0 or more")
  launch = dict(block_tokens=int(block_tokens), steps=int(steps), num_warps=int(num_warps),
                num_stages=None if num_stages is None else int(num_stages), prefetch=int(prefetch),
                interpret=bool(interpret), triton=triton,
                integer_pack=backend != "tpu" if integer_pack is None else bool(integer_pack),
                fast_math=triton if fast_math is None else bool(fast_math))
  quantized, codes, prob_sum, entropy_sum, bit_sum = _bsq(
      z_ND.reshape(-1, dim), float(inv_temperature), tuple(sorted(launch.items())))
  return (quantized.reshape(z_ND.shape), codes.reshape(*lead, codes.shape[-1]), prob_sum,
          entropy_sum, bit_sum)


def output_from_sums(quantized, codes, prob_sum_D, entropy_sum_D, bit_sum_D,
                     num_tokens: int) -> reference.BSQOutput:
  """`reference.BSQOutput` from `bsq_sums`' outputs over `num_tokens` tokens in all."""
  bit_prob = prob_sum_D / max(1, num_tokens)
  return reference.BSQOutput(
      quantized=quantized, codes=codes, bit_prob=bit_prob,
      token_entropy=entropy_sum_D.sum() / max(1, num_tokens),
      codebook_entropy=reference.binary_entropy(bit_prob).sum(),
      bit_usage=jax.lax.stop_gradient(bit_sum_D) / max(1, num_tokens))


def bsq(z_ND, *, inv_temperature: float = 100.0, block_tokens: Optional[int] = None,
        steps: Optional[int] = None, num_warps: Optional[int] = None,
        num_stages: Optional[int] = None, prefetch: int = DEFAULT_PREFETCH,
        interpret: Optional[bool] = None,
        integer_pack: Optional[bool] = None,
        fast_math: Optional[bool] = None) -> reference.BSQOutput:
  """Pallas BSQ of z [..., d]: the `reference.BSQOutput` of `reference.bsq`, in one fused pass.

  Args:
    z_ND: latents [..., d], float32 or bfloat16.
    inv_temperature: β of the soft bit probability σ(4·β·u/√d) (Infinity uses 100).
    block_tokens: tokens per tile (shrunk for small inputs).
    steps: tiles per program, walked in a loop (shrunk for small inputs).
    (These two and num_warps default to `DEFAULT_LAUNCH` of the backend and size.)
    num_warps: warps per program (GPU).
    num_stages: Triton's software pipelining depth of the tile loop (GPU; default 3 with a loop,
      else 1).
    prefetch: tiles the loop loads ahead of their math (`_bsq_kernel`).
    interpret: run in the Pallas interpreter; default: on CPU.
    integer_pack: pack the codes with one int32 sum per word (default: except on TPU, which
      packs with float sums per 16-bit half).
    fast_math: the statistics' exp2, log2 and reciprocal as PTX approximations (`_ptx_approx`;
      default: on GPU, the only place they exist) instead of the precise library calls.
  """
  sums = bsq_sums(z_ND, inv_temperature=inv_temperature, block_tokens=block_tokens,
                  steps=steps, num_warps=num_warps, num_stages=num_stages, prefetch=prefetch,
                  interpret=interpret,
                  integer_pack=integer_pack, fast_math=fast_math)
  return output_from_sums(*sums, num_tokens=math.prod(z_ND.shape[:-1]))
