"""AdamW with linear warm-up + cosine decay and global-norm clipping, from config.optim."""
from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, batch_size: int, total_steps: int):
  """Peak lr = base_lr × batch_size / 256 (ViTok's scaling rule)."""
  peak = optim_cfg.base_lr * batch_size / 256
  warmup = min(optim_cfg.warmup_steps, total_steps)
  if optim_cfg.schedule == "constant":
    return optax.linear_schedule(0.0, peak, max(warmup, 1)) if warmup else optax.constant_schedule(peak)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=peak * optim_cfg.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices only (kernels), not on biases and norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, batch_size: int, total_steps: int):
  schedule = learning_rate_schedule(optim_cfg, batch_size, total_steps)
  tx = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                   weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  if optim_cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), tx)
  return tx, schedule
