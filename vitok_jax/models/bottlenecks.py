"""Bottlenecks between encoder and decoder: project to `channels` per token and regularise.

Each bottleneck maps h_BND (encoder output) -> (z_BNC, aux); aux["loss_terms"] holds the named
regulariser terms (scalars) that `train/losses.py` weights by config.loss.<name>.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

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


BOTTLENECKS = {"gaussian": GaussianBottleneck}
