"""Bottlenecks between encoder and decoder: project to `channels` per token and regularise.

Each bottleneck maps h_BND (encoder output) -> (z_BNC, aux); aux["loss_terms"] holds the named
regulariser terms (scalars) that `train/losses.py` weights by config.loss.<name>, aux["metrics"]
scalars that are only logged (codebook health).

Discrete bottlenecks also return aux["codes"] (integers) and have `decode_codes(codes, grid)` ->
z_BNC, so codes are data: encode -> codes -> store -> decode_codes -> ViTok.decode -> pixels.
  vq     LlamaGen VQ (16384 × c, cosine lookup); vq1k: 1024 codes; vq1k_ent: + entropy loss.
  bsq    BSQ: c bits per token, implicit 2^c codebook, codes packed to uint32 words.
  msvq   VAR multi-scale residual VQ (4096 codes, φ refiners); codes: per-scale maps.
         Scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16): VAR's 256p (16 × 16 tokens).
  msvq512  msvq on VAR's 512p scales (1, 2, 3, 4, 6, 9, 13, 18, 24, 32) (32 × 32 tokens).
  msbsq  Infinity multi-scale residual BSQ.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitok_jax.errors import ConfigError
from vitok_jax.models import multiscale, quantizers
from vitok_jax.models.vit import partitioned


class GaussianBottleneck(nn.Module):
  """Diagonal Gaussian posterior N(mean, exp(logvar)) with c channels per token and a KL to N(0, I).

  KL is the mean over batch, tokens and channels (as in ViTok's code), so its weight (1e-3) is
  independent of the token count.
  """
  channels: int
  logvar_min: float = -30.0
  logvar_max: float = 20.0

  @nn.compact
  def __call__(self, h_BND, *, sample: bool):
    moments_BN2C = nn.Dense(
        2 * self.channels, name="to_moments",
        kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "latent")),
        bias_init=partitioned(nn.initializers.zeros, ("latent",)))(h_BND.astype(jnp.float32))
    mean_BNC, logvar_BNC = jnp.split(moments_BN2C, 2, axis=-1)
    logvar_BNC = jnp.clip(logvar_BNC, self.logvar_min, self.logvar_max)
    z_BNC = mean_BNC
    if sample:
      noise_BNC = jax.random.normal(self.make_rng("sample"), mean_BNC.shape, mean_BNC.dtype)
      z_BNC = mean_BNC + jnp.exp(0.5 * logvar_BNC) * noise_BNC
    kl = 0.5 * jnp.mean(mean_BNC**2 + jnp.exp(logvar_BNC) - 1.0 - logvar_BNC)
    return z_BNC, {"mean": mean_BNC, "logvar": logvar_BNC, "loss_terms": {"kl": kl}}


def _to_latent(channels: int, name: str = "to_latent") -> nn.Dense:
  return nn.Dense(channels, name=name,
                  kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "latent")),
                  bias_init=partitioned(nn.initializers.zeros, ("latent",)))


def square_grid(num_tokens: int) -> int:
  """Side of the square token grid of a multi-scale bottleneck (h·h = N)."""
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise ConfigError(f"multi-scale quantisers need a square token grid, got {num_tokens} tokens")
  return side


class VQBottleneck(nn.Module):
  """Linear to c channels, then LlamaGen VQ (l2-normalised inputs and codes, straight-through).

  Loss terms: codebook, commit (and vq_entropy when with_entropy). aux["codes"]: [B, N] int32.
  """
  channels: int
  codebook_size: int = 16384
  normalize: bool = True
  with_entropy: bool = False
  impl: str = "auto"

  def setup(self):
    self.to_latent = _to_latent(self.channels)
    self.quantizer = quantizers.VectorQuantizer(self.channels, self.codebook_size, self.normalize,
                                                with_entropy=self.with_entropy, impl=self.impl)

  def __call__(self, h_BND, *, sample: bool):
    del sample  # Deterministic lookup.
    z_BNC, index_BN, terms, metrics = self.quantizer(self.to_latent(h_BND.astype(jnp.float32)))
    return z_BNC, {"codes": index_BN, "loss_terms": terms, "metrics": metrics}

  def decode_codes(self, index_BN, grid=None):
    del grid
    return self.quantizer.lookup(index_BN)


class BSQBottleneck(nn.Module):
  """Linear to d = c channels, then BSQ: q = sign(u)/√d, u = z/‖z‖ (straight-through).

  Loss terms: bsq_entropy ((token entropy − γ·codebook entropy) / inverse temperature, as
  BSQ-ViT's code; the inverse temperature is Infinity's 100, BSQ-ViT's default is 1), bsq_commit.
  aux["codes"]: [B, N, ceil(d/32)] uint32, bit 0 the most significant.
  """
  channels: int
  inv_temperature: float = 100.0
  gamma: float = 1.0
  impl: str = "auto"

  def setup(self):
    self.to_latent = _to_latent(self.channels)

  def __call__(self, h_BND, *, sample: bool):
    del sample
    q_BNC, words_BNW, terms, metrics = quantizers.bsq_quantize(
        self.to_latent(h_BND.astype(jnp.float32)), inv_temperature=self.inv_temperature,
        gamma=self.gamma, impl=self.impl)
    return q_BNC, {"codes": words_BNW, "loss_terms": terms, "metrics": metrics}

  def decode_codes(self, words_BNW, grid=None):
    del grid
    return quantizers.bits_to_codes(quantizers.unpack_bits(words_BNW, self.channels))


class MultiScaleBottleneck(nn.Module):
  """Linear to c channels on a square h × h token grid, then `multiscale.ResidualQuantizer`.

  aux["codes"]: tuple of per-scale maps; `decode_codes` accepts any prefix of them.
  """
  channels: int
  quantizer: str = "vq"
  schedule: str = "var"
  codebook_size: int = 4096
  upsample: str = "bicubic"
  num_phi: int = 4
  impl: str = "auto"

  def setup(self):
    self.to_latent = _to_latent(self.channels)
    self.residual = multiscale.ResidualQuantizer(
        self.channels, self.quantizer, self.schedule, self.codebook_size, upsample=self.upsample,
        num_phi=self.num_phi, impl=self.impl)

  def __call__(self, h_BND, *, sample: bool):
    del sample
    batch, tokens, _ = h_BND.shape
    side = square_grid(tokens)
    f_BHWC = self.to_latent(h_BND.astype(jnp.float32)).reshape(batch, side, side, self.channels)
    f_hat_BHWC, codes, terms, metrics = self.residual(f_BHWC)
    return f_hat_BHWC.reshape(batch, tokens, self.channels), {
        "codes": codes, "loss_terms": terms, "metrics": metrics,
        "latent": f_BHWC.reshape(batch, tokens, self.channels)}  # Before quantisation.

  def decode_codes(self, codes, grid):
    """codes of the first k scales -> z_BNC on the full token grid (h, w)."""
    f_hat_BHWC = self.residual.decode_codes(codes, grid[-1])
    return f_hat_BHWC.reshape(f_hat_BHWC.shape[0], -1, self.channels)


BOTTLENECKS = {
    "gaussian": GaussianBottleneck,
    "vq": VQBottleneck,
    "vq1k": functools.partial(VQBottleneck, codebook_size=1024),
    # + LlamaGen's entropy loss (weight config.loss.vq_entropy), which spreads tokens over codes.
    "vq1k_ent": functools.partial(VQBottleneck, codebook_size=1024, with_entropy=True),
    "bsq": BSQBottleneck,
    "msvq": MultiScaleBottleneck,
    "msvq512": functools.partial(MultiScaleBottleneck, schedule="var512"),
    "msbsq": functools.partial(MultiScaleBottleneck, quantizer="bsq", schedule="infinity",
                               upsample="bilinear", num_phi=0),
}
# Bottlenecks whose codebook is a parameter (dead-code restart applies: train/codebook.py).
LEARNED_CODEBOOK = ("vq", "vq1k", "vq1k_ent", "msvq", "msvq512")
# Multi-scale bottlenecks: they quantise a square 2-D (h × h) token map, so images only.
MULTI_SCALE = ("msvq", "msvq512", "msbsq")


def build(kind: str, channels: int, codebook_size: int = 0, **kwargs) -> nn.Module:
  """The bottleneck `kind` with c = channels; codebook_size > 0 overrides a learned codebook's size."""
  if kind not in BOTTLENECKS:
    raise ConfigError(f"bottleneck={kind!r} is unknown; use one of {list(BOTTLENECKS)} (or larp)")
  if codebook_size:
    if kind not in LEARNED_CODEBOOK:
      raise ConfigError(f"codebook_size={codebook_size} applies to a learned codebook "
                        f"{list(LEARNED_CODEBOOK)} (or larp), not bottleneck={kind!r}")
    kwargs["codebook_size"] = codebook_size
  return BOTTLENECKS[kind](channels, **kwargs)
