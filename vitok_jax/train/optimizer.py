"""AdamW with linear warm-up, cosine or linear decay and global-norm clipping, from config.optim."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vitok_jax import config_lib

# Warm-up when optim.warmup_steps is unset: a tenth of the run, at most this many steps.
MAX_AUTO_WARMUP = 1000
# schedule="linear" (VAR's "lin0"): the peak is held for this share of the steps after warm-up.
LINEAR_HOLD = 0.05
SCHEDULES = ("cosine", "linear", "constant")


def default_config(**overrides) -> ml_collections.ConfigDict:
  """config.optim: AdamW(b1, b2, weight_decay), peak lr base_lr × batch_size / 256, linear
  warm-up over warmup_steps (unset: `warmup_steps(total_steps)`, so it follows a
  --config.total_steps override), then `schedule`: "cosine" decay to min_lr_ratio × peak,
  "linear" (VAR's lin0: the peak held for `LINEAR_HOLD` of the rest, then a straight line to
  min_lr_ratio × peak at the last step) or "constant"; and global-norm clipping at clip_norm
  (0 = off)."""
  config = ml_collections.ConfigDict(dict(
      base_lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.0,
      warmup_steps=ml_collections.config_dict.placeholder(int), schedule="cosine",
      min_lr_ratio=0.0, clip_norm=1.0))
  config.update(overrides)
  return config


def warmup_steps(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> int:
  """optim.warmup_steps if set, else min(MAX_AUTO_WARMUP, total_steps // 10) (at least 1)."""
  if optim_cfg.warmup_steps is not None:
    return min(optim_cfg.warmup_steps, total_steps)
  return min(MAX_AUTO_WARMUP, max(total_steps // 10, 1))


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, batch_size: int, total_steps: int):
  """Peak lr = base_lr × batch_size / 256 (ViTok's scaling rule)."""
  peak = optim_cfg.base_lr * batch_size / 256
  warmup = warmup_steps(optim_cfg, total_steps)
  if optim_cfg.schedule == "constant":
    return optax.linear_schedule(0.0, peak, max(warmup, 1)) if warmup else optax.constant_schedule(peak)
  if optim_cfg.schedule == "linear":
    rest = max(total_steps - 1 - warmup, 1)  # VAR reaches the end value at the last step.
    end = peak * optim_cfg.min_lr_ratio

    def linear(step):  # step counts from the end of warm-up; the line is capped at the peak.
      left = jnp.clip((1.0 - step / rest) / (1.0 - LINEAR_HOLD), 0.0, 1.0)
      return end + (peak - end) * left
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), linear],
                                boundaries=[warmup])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=peak * optim_cfg.min_lr_ratio)


# Learned position and level embeddings, which VAR (and Infinity) keep out of weight decay.
NO_DECAY_NAMES = ("pos", "pos_start", "level_emb")


def decay_mask(params):
  """Weight decay on matrices only (kernels, embedding tables), not on biases and norm scales,
  nor on the learned position and level embeddings of `NO_DECAY_NAMES` (VAR's nowd keys)."""
  def decays(path, p):
    names = {getattr(k, "key", None) for k in path}
    return p.ndim >= 2 and not names & set(NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


# Parameters under a module of this name (LARP's AR prior) train at optim.prior_lr_mult × the rate.
PRIOR_SCOPE = "prior"


def in_prior(params):
  """A tree of labels, "prior" for the parameters under a `PRIOR_SCOPE` module, else "rest"."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "prior" if any(getattr(k, "key", None) == PRIOR_SCOPE for k in path)
      else "rest", params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, batch_size: int, total_steps: int):
  """(tx, schedule): global-norm clipping, then AdamW at `schedule`; with optim.prior_lr_mult
  (LARP's configs alone have it) the prior's updates, weight decay included, are scaled by it,
  as a parameter group of that many times the rate."""
  schedule = learning_rate_schedule(optim_cfg, batch_size, total_steps)
  tx = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                   weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  prior_lr_mult = optim_cfg.get("prior_lr_mult", config_lib.ADDED_FIELDS["optim.prior_lr_mult"])
  if prior_lr_mult != 1.0:
    tx = optax.chain(tx, optax.multi_transform(
        {"prior": optax.scale(prior_lr_mult), "rest": optax.identity()}, in_prior))
  if optim_cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), tx)
  return tx, schedule
