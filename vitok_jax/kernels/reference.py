"""Plain-jnp definitions of what every kernel computes: the semantics the tests hold kernels to.

Each function materialises everything (the S×S scores, the tokens×codebook distances) in float32,
so it is the slow, obviously-right version; the "xla" implementation of the quantisers is this code.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from vitok_jax.kernels import masks

NORM_EPS = 1e-12  # torch F.normalize's clamp on the norm, so a zero vector maps to zero.


def attention(q_BLHD, k_BSHD, v_BSHD, *, causal: bool = False, segment_ids=None, block_ids=None,
              scale: Optional[float] = None, mask_BHLS=None):
  """softmax(scale·q·kᵀ + mask)·v and its logsumexp.

  Args:
    q_BLHD: [batch, q_len, heads, head_dim]; k_BSHD, v_BSHD: [batch, kv_len, kv_heads, head_dim],
      kv_heads divides heads (grouped-query attention).
    causal, segment_ids, block_ids: mask kinds, see `masks`.
    scale: logit scale, default 1/√head_dim.
    mask_BHLS: optional boolean mask broadcastable to [batch, heads, L, S]; True = attend.
  Returns:
    out_BLHD in q's dtype (rows that see no key are 0) and lse_BHL float32 (natural log; -inf for
    rows that see no key).
  """
  batch, q_len, heads, head_dim = q_BLHD.shape
  kv_len, kv_heads = k_BSHD.shape[1], k_BSHD.shape[2]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  group = heads // kv_heads
  k_BSHD = jnp.repeat(k_BSHD, group, axis=2)
  v_BSHD = jnp.repeat(v_BSHD, group, axis=2)
  s_BHLS = scale * jnp.einsum("blhd,bshd->bhls", q_BLHD.astype(jnp.float32),
                              k_BSHD.astype(jnp.float32))
  ids = masks.make_ids(batch, q_len, kv_len, segment_ids=segment_ids, block_ids=block_ids)
  mask = masks.dense_mask(ids, q_len, kv_len, causal=causal)
  if mask_BHLS is not None:
    mask = mask_BHLS if mask is None else jnp.logical_and(mask, mask_BHLS)
  if mask is not None:
    s_BHLS = jnp.where(mask, s_BHLS, -jnp.inf)
  lse_BHL = jax.nn.logsumexp(s_BHLS, axis=-1)
  p_BHLS = jnp.exp(s_BHLS - jnp.where(jnp.isfinite(lse_BHL), lse_BHL, 0.0)[..., None])
  out_BLHD = jnp.einsum("bhls,bshd->blhd", p_BHLS, v_BSHD.astype(jnp.float32))
  return out_BLHD.astype(q_BLHD.dtype), lse_BHL


class BSQOutput(NamedTuple):
  """What the BSQ quantiser returns for latents z [..., d] (N tokens in all).

  quantized: [..., d] in z's dtype, sign(u)/√d forward; backward, straight-through sign(u) ≈ u
    then the 1/√d scale, so d quantized/du = I/√d (u = z/‖z‖), as BSQ-ViT's code (Infinity's
    `quantize_new` passes I: `quantizers.bsq_quantize(unit_gradient=True)`).
  codes: [..., ceil(d/32)] uint32; word w packs bits 32w… (bit = 1 where u > 0), its first bit
    most significant, so for d ≤ 32 it is the code index with bit 0 as the MSB.
  bit_prob: [d] float32, mean over tokens of the soft P(bit = 1) = σ(4·β·u/√d), β the inverse
    temperature.
  token_entropy: float32, mean over tokens of Σ_i H(P(bit i)) in nats (minimise it).
  codebook_entropy: float32, Σ_i H(bit_prob_i) in nats, the factorised entropy of the batch-average
    code distribution (maximise it).
  bit_usage: [d] float32, fraction of tokens with bit = 1 (hard), for codebook-usage logging.
  """
  quantized: jax.Array
  codes: jax.Array
  bit_prob: jax.Array
  token_entropy: jax.Array
  codebook_entropy: jax.Array
  bit_usage: jax.Array


def bsq_logit_scale(dim: int, inv_temperature: float) -> float:
  """x_i = scale·u_i is the logit of P(bit i = 1) (BSQ: σ(4·β·u/√d))."""
  return 4.0 * inv_temperature / math.sqrt(dim)


def binary_entropy_from_logits(x):
  """H(σ(x)) in nats, stable for large |x|: softplus(x) − x·σ(x)."""
  return jax.nn.softplus(x) - x * jax.nn.sigmoid(x)


def binary_entropy(p):
  """H(p) in nats; 0·log 0 = 0."""
  xlogx = lambda t: jnp.where(t > 0, t * jnp.log(jnp.where(t > 0, t, 1.0)), 0.0)
  return -(xlogx(p) + xlogx(1.0 - p))


def pack_bits(bits_ND):
  """bool [..., d] → uint32 [..., ceil(d/32)], each word's first bit most significant."""
  dim = bits_ND.shape[-1]
  words = -(-dim // 32)
  index_D = jnp.arange(dim)
  word_bits_D = jnp.minimum(32, dim - 32 * (index_D // 32))  # Bits held by that bit's word.
  shift_D = (word_bits_D - 1 - index_D % 32).astype(jnp.uint32)
  shifted_ND = bits_ND.astype(jnp.uint32) << shift_D
  padded = jnp.pad(shifted_ND, [(0, 0)] * (bits_ND.ndim - 1) + [(0, 32 * words - dim)])
  return padded.reshape(*bits_ND.shape[:-1], words, 32).sum(-1, dtype=jnp.uint32)


def l2_normalize(x, axis=-1):
  """x / max(‖x‖, eps) in float32; clamping inside the root keeps the gradient at 0 finite."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), NORM_EPS**2))


def bsq(z_ND, *, inv_temperature: float = 100.0) -> BSQOutput:
  """Binary spherical quantisation of z [..., d] (see `BSQOutput`); differentiable in z."""
  dim = z_ND.shape[-1]
  u_ND = l2_normalize(z_ND)
  bits_ND = u_ND > 0
  sign_ND = jnp.where(bits_ND, 1.0, -1.0)
  quantized = ((u_ND + jax.lax.stop_gradient(sign_ND - u_ND)) / math.sqrt(dim)).astype(z_ND.dtype)
  logits_ND = bsq_logit_scale(dim, inv_temperature) * u_ND.reshape(-1, dim)
  bit_prob_D = jax.nn.sigmoid(logits_ND).mean(0)
  return BSQOutput(
      quantized=quantized,
      codes=pack_bits(bits_ND),
      bit_prob=bit_prob_D,
      token_entropy=binary_entropy_from_logits(logits_ND).sum(-1).mean(),
      codebook_entropy=binary_entropy(bit_prob_D).sum(),
      bit_usage=bits_ND.reshape(-1, dim).mean(0, dtype=jnp.float32))


def vq_nearest(z_ND, codebook_KD, *, normalize: bool = True):
  """Nearest codebook entry of each token by squared l2 distance, first index on ties.

  Args:
    z_ND: [..., D] tokens; codebook_KD: [K, D].
    normalize: l2-normalise tokens and codes first (cosine lookup, LlamaGen's VQ).
  Returns:
    index [...] int32 and its squared distance [...] float32 (|z|² + |e|² − 2·z·e, of the
    normalised vectors when normalize).
  """
  z_ND = l2_normalize(z_ND) if normalize else z_ND.astype(jnp.float32)
  e_KD = l2_normalize(codebook_KD) if normalize else codebook_KD.astype(jnp.float32)
  dist_NK = (jnp.sum(z_ND * z_ND, -1, keepdims=True) + jnp.sum(e_KD * e_KD, -1)
             - 2.0 * jnp.einsum("...d,kd->...k", z_ND, e_KD, precision="highest"))
  index = jnp.argmin(dist_NK, axis=-1).astype(jnp.int32)
  return index, jnp.take_along_axis(dist_NK, index[..., None], axis=-1)[..., 0]
