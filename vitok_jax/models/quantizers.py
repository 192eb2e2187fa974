"""Discrete quantisers: LlamaGen VQ, BSQ (Infinity / BSQ-ViT), bit packing and codebook health.

The nearest-code search and the BSQ statistics come from `vitok_jax.kernels` (XLA reference or
Pallas); this module adds the parameters, the straight-through estimators, the losses and the
metrics. Every loss term is unweighted: config.loss.<name> weights it (commit 0.25, codebook 1.0).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax import kernels
from vitok_jax.kernels import reference
from vitok_jax.models.vit import partitioned

l2_normalize = reference.l2_normalize
pack_bits = reference.pack_bits  # bool [..., d] -> uint32 [..., ceil(d/32)], first bit the MSB.


def straight_through(x, x_q):
  """x_q forward, identity gradient to x backward."""
  return x + jax.lax.stop_gradient(x_q - x)


def unpack_bits(words_NW, dim: int):
  """Inverse of `pack_bits`: uint32 [..., ceil(d/32)] -> bool [..., d] (numpy or jax input)."""
  xp = np if isinstance(words_NW, np.ndarray) else jnp
  index_D = np.arange(dim)
  word_bits_D = np.minimum(32, dim - 32 * (index_D // 32))
  shift_D = (word_bits_D - 1 - index_D % 32).astype(np.uint32)
  words_ND = xp.take(words_NW.astype(xp.uint32), index_D // 32, axis=-1)
  return ((words_ND >> shift_D) & xp.uint32(1)).astype(bool)


def bits_to_codes(bits_ND):
  """bool [..., d] -> BSQ code vectors ±1/√d (bit 1 -> +1/√d)."""
  dim = bits_ND.shape[-1]
  return jnp.where(bits_ND, 1.0, -1.0) / math.sqrt(dim)


# --------------------------------------------------------------------------------------------
# Codebook health.


def code_usage_metrics(index, codebook_size: int, prefix: str = "vq") -> dict:
  """Batch usage statistics of integer codes `index` [...] in [0, K).

  usage: fraction of the K codes hit at least once; dead: K − used (in this batch); perplexity:
  exp(H) of the code histogram (K when uniform). Batch-level, so with fewer tokens than codes usage
  is bounded by tokens/K; aggregate `code_histogram` over many batches for a run-level number.
  """
  counts_K = code_histogram(index, codebook_size)
  probs_K = counts_K / jnp.maximum(counts_K.sum(), 1.0)
  used = jnp.sum(counts_K > 0)
  entropy = -jnp.sum(jnp.where(probs_K > 0, probs_K * jnp.log(jnp.where(probs_K > 0, probs_K, 1.0)), 0.0))
  return {f"{prefix}/usage": used / codebook_size, f"{prefix}/dead": (codebook_size - used).astype(jnp.float32),
          f"{prefix}/perplexity": jnp.exp(entropy)}


def code_histogram(index, codebook_size: int):
  """float32 [K] count of each code in `index`."""
  return jnp.zeros((codebook_size,), jnp.float32).at[index.reshape(-1)].add(1.0)


def bit_metrics(bit_usage_D, prefix: str = "bsq") -> dict:
  """Per-bit balance of BSQ codes from the fraction of tokens with bit = 1 (hard).

  bit_entropy_{min,mean}: H(bit) in bits (1 = balanced); imbalance: max |P(1) − 0.5|.
  """
  h_D = reference.binary_entropy(bit_usage_D) / math.log(2.0)
  return {f"{prefix}/bit_entropy_min": h_D.min(), f"{prefix}/bit_entropy_mean": h_D.mean(),
          f"{prefix}/imbalance": jnp.max(jnp.abs(bit_usage_D - 0.5))}


def bsq_code_metrics(q_ND, words_NW, prefix: str = "bsq", max_bits: int = 16) -> dict:
  """Per-code health of BSQ codes (per-bit balance misses bits that move together).

  Cheap enough for every train step: a 2^{d'} histogram and a d × d matmul over the batch.
  code_usage / code_perplexity: of the code formed by the first d' = min(d, max_bits) bits (the
  whole code when d <= 16): fraction of the 2^{d'} codes hit, and exp(H) of their histogram (2^{d'}
  when uniform; batch-level, so at most the number of tokens). bit_correlation: mean |Pearson
  correlation| of the ±1 bits over distinct pairs (0 for independent bits, 1 when every bit copies
  one; a constant bit counts as uncorrelated, `bit_entropy_min` flags it). 0 when d = 1.

  Args:
    q_ND: quantised codes [..., d] (bit i is 1 where q_i > 0).
    words_NW: the same codes packed, uint32 [..., ceil(d/32)] (`pack_bits`: bit 0 the MSB).
  """
  dim = q_ND.shape[-1]
  sub = min(dim, max_bits)
  # Word 0 holds bits 0 … min(d, 32) − 1 with bit 0 the most significant: shift off the rest.
  word0_N = words_NW[..., 0].reshape(-1).astype(jnp.uint32)
  code_N = (word0_N >> jnp.uint32(min(dim, 32) - sub)).astype(jnp.int32)
  usage = code_usage_metrics(code_N, 2**sub, prefix)
  signs_ND = jnp.where(q_ND.reshape(-1, dim) > 0, 1.0, -1.0).astype(jnp.float32)
  mean_D = signs_ND.mean(0)
  cov_DD = (jnp.einsum("nd,ne->de", signs_ND, signs_ND, precision="highest") / signs_ND.shape[0]
            - mean_D[:, None] * mean_D[None, :])
  std_D = jnp.sqrt(jnp.clip(jnp.diagonal(cov_DD), 0.0))
  corr_DD = cov_DD / jnp.maximum(std_D[:, None] * std_D[None, :], 1e-12)
  off_diagonal = 1.0 - jnp.eye(dim, dtype=jnp.float32)
  mean_abs_corr = jnp.sum(jnp.abs(corr_DD) * off_diagonal) / max(dim * (dim - 1), 1)
  return {f"{prefix}/code_usage": usage[f"{prefix}/usage"],
          f"{prefix}/code_perplexity": usage[f"{prefix}/perplexity"],
          f"{prefix}/bit_correlation": mean_abs_corr}


def vq_entropy_loss(affinity_NK, temperature: float = 0.01):
  """LlamaGen's entropy loss: mean per-token entropy − entropy of the mean code distribution.

  affinity = −distance; softmax(affinity / T). Minimising it makes each token confident and the
  batch spread over codes. log-probabilities clamp at 1e-5 as in LlamaGen (`compute_entropy_loss`).
  """
  probs_NK = jax.nn.softmax(affinity_NK / temperature, axis=-1)
  log_probs_NK = jax.nn.log_softmax(affinity_NK / temperature + 1e-5, axis=-1)
  avg_probs_K = probs_NK.mean(0)
  avg_entropy = -jnp.sum(avg_probs_K * jnp.log(avg_probs_K + 1e-5))
  sample_entropy = -jnp.mean(jnp.sum(probs_NK * log_probs_NK, axis=-1))
  return sample_entropy - avg_entropy


# --------------------------------------------------------------------------------------------
# Codebook maintenance (pure functions: they need state outside params, see `ema_update`).


def ema_update(ema_counts_K, ema_sums_KD, z_ND, index_N, decay: float = 0.99, eps: float = 1e-5):
  """One EMA codebook step (VQ-VAE-2): returns (counts, sums, codebook).

  counts ← decay·counts + (1−decay)·histogram; sums ← decay·sums + (1−decay)·Σ_{tokens→k} z;
  codebook_k = sums_k / Laplace-smoothed counts_k. The trainer keeps (counts, sums) in a non-param
  collection and writes the codebook back instead of a gradient step.
  """
  codebook_size = ema_counts_K.shape[0]
  onehot_NK = jax.nn.one_hot(index_N.reshape(-1), codebook_size, dtype=jnp.float32)
  z_ND = z_ND.reshape(-1, z_ND.shape[-1]).astype(jnp.float32)
  counts_K = decay * ema_counts_K + (1 - decay) * onehot_NK.sum(0)
  sums_KD = decay * ema_sums_KD + (1 - decay) * onehot_NK.T @ z_ND
  return counts_K, sums_KD, sums_KD / laplace_smoothed(counts_K, eps)[:, None]


def laplace_smoothed(counts_K, eps: float = 1e-5):
  """(counts + ε) / (n + K·ε) · n with n = Σ counts: no code's count is 0 (VQ-VAE-2 / sonnet)."""
  total = counts_K.sum()
  return (counts_K + eps) / (total + counts_K.shape[0] * eps) * total


def restart_dead_codes(codebook_KD, usage_K, z_ND, rng, threshold: float = 1e-3):
  """Replaces codes whose (EMA) usage is below `threshold` by random tokens of the batch.

  Returns (codebook, number restarted). Random tokens sit where the data is, so a restarted code
  is immediately some token's nearest code.
  """
  dead_K = usage_K < threshold
  picks_K = jax.random.randint(rng, (codebook_KD.shape[0],), 0, z_ND.shape[0])
  codebook_KD = jnp.where(dead_K[:, None], z_ND[picks_K].astype(codebook_KD.dtype), codebook_KD)
  return codebook_KD, dead_K.sum()


# --------------------------------------------------------------------------------------------
# Quantisers on [..., C] latents.


class VectorQuantizer(nn.Module):
  """LlamaGen VQ: cosine lookup in a learned codebook [K, C] with straight-through gradients.

  Returns (z_q [..., C], index [...] int32, loss_terms, metrics). With `normalize` the output is the
  unit-norm code z_n + sg(e_n − z_n); codebook = mean((e_n − sg(z_n))²) and commit =
  mean((sg(e_n) − z_n)²) over all elements (LlamaGen weights them 1 and β = 0.25).
  """
  channels: int
  codebook_size: int = 16384
  normalize: bool = True
  entropy_temperature: float = 0.01
  with_entropy: bool = False   # LlamaGen's entropy loss (a tokens × K softmax): off by default.
  # "uniform": LlamaGen's uniform(−1/K, 1/K) rows, stored at unit length when `normalize` (as
  # LlamaGen's VectorQuantizer does); "kaiming": LARP's kaiming_uniform_ rows (fan-in C, length
  # about √2). The normalised lookup's gradient scales as 1/‖e‖, so rows left at length ~1/K
  # would take nearly all of the clipped global gradient norm.
  codebook_init: str = "uniform"
  impl: str = "auto"

  def setup(self):
    if self.codebook_init == "kaiming":
      init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform", in_axis=-1, out_axis=-2)
    elif self.codebook_init == "uniform":
      bound = 1.0 / self.codebook_size
      def init(key, shape):
        rows = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        return l2_normalize(rows) if self.normalize else rows
    else:
      raise ValueError(f"codebook_init={self.codebook_init!r}: use 'uniform' or 'kaiming'")
    self.codebook = self.param("codebook", partitioned(init, (None, "latent")),
                               (self.codebook_size, self.channels))

  def codes(self):
    """The codebook as the decoder sees it: [K, C] (unit rows when normalize)."""
    return l2_normalize(self.codebook) if self.normalize else self.codebook

  def lookup(self, index):
    """int codes [...] -> code vectors [..., C]."""
    return jnp.take(self.codes(), index, axis=0)

  def nearest(self, z_NC):
    """(index [...] int32, code vectors [..., C]) of the nearest codes (first index on ties)."""
    index, _ = kernels.vq_nearest(z_NC, self.codebook, normalize=self.normalize, impl=self.impl)
    # For dead-code restart (train/codebook.py); a no-op unless "intermediates" is mutable.
    self.sow("intermediates", "code_pool", (z_NC, index))
    return index, self.lookup(index)

  def __call__(self, z_NC):
    z_NC = l2_normalize(z_NC) if self.normalize else z_NC.astype(jnp.float32)
    index, e_NC = self.nearest(z_NC)
    terms = {"codebook": jnp.mean((e_NC - jax.lax.stop_gradient(z_NC)) ** 2),
             "commit": jnp.mean((jax.lax.stop_gradient(e_NC) - z_NC) ** 2)}
    if self.with_entropy:
      z_flat = z_NC.reshape(-1, z_NC.shape[-1])
      codes_KC = self.codes()
      dist_NK = (jnp.sum(z_flat**2, -1, keepdims=True) + jnp.sum(codes_KC**2, -1)
                 - 2.0 * z_flat @ codes_KC.T)
      terms["vq_entropy"] = vq_entropy_loss(-dist_NK, self.entropy_temperature)
    return straight_through(z_NC, e_NC), index, terms, code_usage_metrics(index, self.codebook_size)


def scale_gradient(x, scale: float):
  """x forward, `scale` times its gradient backward."""
  held = jax.lax.stop_gradient(x)
  return held + scale * (x - held)


def bsq_quantize(z_NC, *, inv_temperature: float = 100.0, gamma: float = 1.0, impl: str = "auto",
                 unit_gradient: bool = False):
  """BSQ of z [..., d]: (q [..., d] straight-through, codes uint32 [..., ceil(d/32)], terms, metrics).

  q = sign(u)/√d (0 -> −1) with u = z/‖z‖, gradient I/√d to u (BSQ-ViT's straight-through), or
  I with `unit_gradient` (Infinity's `quantize_new`, z + sg(sign(z)/√d − z)). Terms (BSQ-ViT's;
  Infinity's released training-time entropy term is 0): bsq_entropy = (E_tokens[Σ_i H(p_i)] −
  γ·Σ_i H(E_tokens[p_i])) / β, p_i = σ(4·β·u_i/√d) the soft P(bit i = 1), β the inverse
  temperature (the division keeps the penalty's gradient from growing with β); bsq_commit =
  mean((sg(q) − u)²) (weighted 0 by default: BSQ-ViT's configs set β_commit = 0 and Infinity's
  released code computes none). Metrics: codebook usage per bit (`bit_metrics`) and per code
  (`bsq_code_metrics`), and the two entropies (not divided by β).
  """
  out = kernels.bsq(z_NC, inv_temperature=inv_temperature, impl=impl)
  quantized = out.quantized
  if unit_gradient:
    quantized = scale_gradient(quantized, math.sqrt(z_NC.shape[-1]))
  u_NC = l2_normalize(z_NC)
  terms = {"bsq_entropy": (out.token_entropy - gamma * out.codebook_entropy) / inv_temperature,
           "bsq_commit": jnp.mean(
               (jax.lax.stop_gradient(out.quantized.astype(jnp.float32)) - u_NC) ** 2)}
  metrics = {**bit_metrics(out.bit_usage), **bsq_code_metrics(out.quantized, out.codes),
             "bsq/token_entropy": out.token_entropy, "bsq/codebook_entropy": out.codebook_entropy}
  return quantized, out.codes, terms, metrics
