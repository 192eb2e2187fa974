"""The one loss module: reconstruction, perceptual and bottleneck terms weighted by config.loss."""
from __future__ import annotations

from typing import Callable, Mapping

import jax.numpy as jnp

from vitok_jax.errors import ConfigError

PIXEL_TERMS = ("l2", "l1", "lpips", "trepa")


def tokenizer_loss(x, recon, aux: dict, loss_cfg: Mapping[str, float],
                   perceptual_fn: Callable | None = None, trepa_fn: Callable | None = None):
  """Weighted sum of the tokenizer's loss terms.

  Args:
    x, recon: pixels in [-1, 1], [B, (T,) H, W, C].
    aux: bottleneck outputs; aux["loss_terms"] maps names (e.g. "kl") to scalars.
    loss_cfg: weights by term name (l2, l1, lpips, and one per bottleneck term).
    perceptual_fn: (x, recon) -> per-example perceptual distance; needed when loss.lpips > 0.
    trepa_fn: (recon, x) -> scalar TREPA of clips [B, T, H, W, C]; needed when loss.trepa > 0.
  Returns:
    (total scalar, dict of every unweighted term, the total, and the bottleneck's own
    diagnostics aux["metrics"] (e.g. codebook usage), which are logged but not optimised).
  """
  diff = recon.astype(jnp.float32) - x.astype(jnp.float32)
  terms = {"l2": jnp.mean(diff**2), "l1": jnp.mean(jnp.abs(diff))}
  if loss_cfg.get("lpips", 0.0) > 0:
    if perceptual_fn is None:
      raise ConfigError("loss.lpips > 0 needs LPIPS weights; set loss.lpips=0 or configure LPIPS")
    terms["lpips"] = jnp.mean(perceptual_fn(x, recon))
  if loss_cfg.get("trepa", 0.0) > 0:
    if trepa_fn is None or x.ndim != 5:
      raise ConfigError("loss.trepa > 0 needs video clips [B, T, H, W, C] and VideoMAE weights; "
                        "set loss.trepa=0 or perceptual.trepa_weights")
    terms["trepa"] = trepa_fn(recon, x)
  terms.update(aux.get("loss_terms", {}))
  missing = [name for name in terms if name not in loss_cfg]
  if missing:
    raise ConfigError(f"loss terms {missing} have no weight; add config.loss.<name>")
  total = sum(loss_cfg[name] * value for name, value in terms.items())
  return total, {**terms, **aux.get("metrics", {}), "loss": total}
