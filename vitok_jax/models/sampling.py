"""Token sampling for autoregressive generators: top-k / top-p filtering, temperature, CFG, and
`sample_ar`, LlamaGen's KV-cached sampling loop under `jax.lax.scan`.

Per position the order is LlamaGen's: CFG on the raw logits, then temperature, then top-k, then
top-p, then a categorical draw (or argmax when temperature == 0).

Shape suffixes: B batch, L sequence, V vocab, R rows of the (possibly doubled) model batch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vitok_jax.errors import ConfigError

CFG_SCHEDULES = ("constant", "linear")


def filter_logits(logits, top_k: int = 0, top_p=1.0):
  """Top-k then nucleus (top-p) filtering over the last axis; dropped entries become -inf.

  Tokens are ranked by logit, ties broken by the lower index (a stable descending sort), so top-k
  keeps exactly min(k, V) entries. Top-p then acts on the softmax of the top-k survivors and keeps
  the shortest ranked prefix whose probability mass is ≥ top_p (token r is kept iff the mass of the
  tokens ranked before it is < top_p; the first token is always kept).

  Args:
    logits: [..., V] float.
    top_k: static int; 0 disables.
    top_p: float in (0, 1] (may be traced); ≥ 1 disables.
  Returns:
    logits with the same shape and dtype.
  """
  if not isinstance(top_k, int) or top_k < 0:
    raise ConfigError(f"top_k must be an int ≥ 0 (0 disables), got {top_k!r}")
  no_top_p = isinstance(top_p, (int, float)) and top_p >= 1.0
  vocab = logits.shape[-1]
  if (top_k == 0 or top_k >= vocab) and no_top_p:
    return logits
  order_V = jnp.argsort(-logits, axis=-1, stable=True)          # Rank r -> token index.
  sorted_V = jnp.take_along_axis(logits, order_V, axis=-1)
  rank_V = jnp.arange(vocab)
  keep_sorted = jnp.ones(sorted_V.shape, bool)
  if 0 < top_k < vocab:
    keep_sorted = rank_V < top_k
    sorted_V = jnp.where(keep_sorted, sorted_V, -jnp.inf)
  if not no_top_p:
    probs_V = jax.nn.softmax(sorted_V.astype(jnp.float32), axis=-1)
    mass_before_V = jnp.cumsum(probs_V, axis=-1) - probs_V
    keep_p = (mass_before_V < top_p) | (rank_V == 0) | (jnp.asarray(top_p) >= 1.0)
    keep_sorted = keep_sorted & keep_p
  # Back to vocabulary order: the rank of each token is the inverse permutation.
  rank_of_token = jnp.argsort(order_V, axis=-1)
  keep = jnp.take_along_axis(jnp.broadcast_to(keep_sorted, logits.shape), rank_of_token, axis=-1)
  return jnp.where(keep, logits, jnp.asarray(-jnp.inf, logits.dtype))


def sample_token(rng, logits, temperature=1.0, top_k: int = 0, top_p=1.0):
  """One token per row of logits [..., V] -> int32 [...].

  temperature == 0 (a Python number) is greedy argmax; otherwise logits / temperature, then
  `filter_logits(top_k, top_p)`, then a categorical draw with `rng`.
  """
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  logits = filter_logits(logits, top_k, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def cfg_logits(cond, uncond, scale):
  """Classifier-free guidance: uncond + scale · (cond − uncond) (scale 1 = conditional)."""
  return uncond + scale * (cond - uncond)


def cfg_scale_at(pos, seq_len: int, cfg_scale, schedule: str = "constant"):
  """The guidance scale used for the token at sequence position `pos` (0 ≤ pos < seq_len).

  "constant": cfg_scale everywhere (LlamaGen's sampler).
  "linear":   1 + (cfg_scale − 1) · pos / (seq_len − 1): 1 for the first token, cfg_scale for the
              last, linear in between (cfg_scale for seq_len == 1). This is the ramp of MAR-style
              "linear" CFG schedules used with LlamaGen-style models, indexed by token position.
  """
  if schedule not in CFG_SCHEDULES:
    raise ConfigError(f"cfg_schedule={schedule!r} is unknown; use one of {CFG_SCHEDULES}")
  if schedule == "constant":
    return jnp.asarray(cfg_scale, jnp.float32)
  frac = jnp.asarray(pos, jnp.float32) / max(seq_len - 1, 1)
  if seq_len == 1:
    frac = jnp.ones_like(frac)
  return 1.0 + (jnp.asarray(cfg_scale, jnp.float32) - 1.0) * frac


def sample_ar(model, params, labels_B, rng, *, temperature=1.0, top_k: int = 0, top_p=1.0,
              cfg_scale=1.0, cfg_schedule: str = "constant"):
  """Samples codes_BL (int32, L = model.seq_len) from a `LlamaGen` with its KV cache.

  The class token is prefilled, then L − 1 `decode_step`s run under one `jax.lax.scan` (jitted).
  With guidance on, the model runs one doubled batch: rows [0, B) carry `labels_B`, rows [B, 2B)
  the null class; per position the logits are `cfg_logits(cond, uncond, cfg_scale_at(...))` and
  the sampled token is fed to both halves. Guidance is off (a batch of B) only when cfg_scale is
  the Python number 1 — a traced / array scale always runs the doubled batch.

  Token i is drawn with `jax.random.split(rng, L)[i]` in both modes, so the result is a pure
  function of (params, labels, rng, settings).

  Args:
    model: a `models.ar.LlamaGen` (hashable; static under jit).
    params: its variables ({"params": ...}) or the bare params tree; boxed or not.
    labels_B: int [B] in [0, num_classes].
    rng: a PRNG key.
    temperature: > 0, or 0 (Python number) for greedy argmax.
    top_k: static int, 0 disables; top_p: in (0, 1], 1 disables (see `filter_logits`).
    cfg_scale: guidance scale; cfg_schedule: "constant" or "linear" (see `cfg_scale_at`).
  Returns:
    codes_BL int32.
  """
  if cfg_schedule not in CFG_SCHEDULES:
    raise ConfigError(f"cfg_schedule={cfg_schedule!r} is unknown; use one of {CFG_SCHEDULES}")
  if not isinstance(top_k, int) or top_k < 0:
    raise ConfigError(f"top_k must be an int ≥ 0 (0 disables), got {top_k!r}")
  if isinstance(top_p, (int, float)) and not 0.0 < top_p <= 1.0:
    raise ConfigError(f"top_p must be in (0, 1] (1 disables), got {top_p}")
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ConfigError(f"temperature must be ≥ 0 (0 = greedy), got {temperature}")
  if jnp.ndim(labels_B) != 1:
    raise ConfigError(f"labels must be a 1-D [batch] int array, got shape {jnp.shape(labels_B)}")
  if "params" not in params:
    params = {"params": params}
  greedy = isinstance(temperature, (int, float)) and temperature == 0
  use_cfg = not (isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0)
  return _sample_ar(model, params, jnp.asarray(labels_B, jnp.int32), rng,
                    jnp.asarray(1.0 if greedy else temperature, jnp.float32),
                    jnp.asarray(top_p, jnp.float32), jnp.asarray(cfg_scale, jnp.float32),
                    top_k=top_k, no_top_p=isinstance(top_p, (int, float)) and top_p >= 1.0,
                    greedy=greedy, use_cfg=use_cfg, cfg_schedule=cfg_schedule)


@functools.partial(jax.jit, static_argnames=("model", "top_k", "no_top_p", "greedy", "use_cfg",
                                             "cfg_schedule"))
def _sample_ar(model, params, labels_B, rng, temperature, top_p, cfg_scale, *, top_k, no_top_p,
               greedy, use_cfg, cfg_schedule):
  batch, seq_len = labels_B.shape[0], model.seq_len
  labels_R = labels_B
  if use_cfg:
    labels_R = jnp.concatenate([labels_B, jnp.full_like(labels_B, model.num_classes)])
  keys = jax.random.split(rng, seq_len)

  def pick(key, logits_RV, pos):
    logits_BV = logits_RV
    if use_cfg:
      scale = cfg_scale_at(pos, seq_len, cfg_scale, cfg_schedule)
      logits_BV = cfg_logits(logits_RV[:batch], logits_RV[batch:], scale)
    if greedy:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return sample_token(key, logits_BV, temperature, top_k, 1.0 if no_top_p else top_p)

  cache = model.init_cache(labels_R.shape[0])
  logits_RV, cache = model.apply(params, labels_R, cache, method=model.prefill)
  first_B = pick(keys[0], logits_RV, 0)

  def step(carry, xs):
    cache, token_B = carry
    pos, key = xs
    token_R = jnp.concatenate([token_B, token_B]) if use_cfg else token_B
    logits_RV, cache = model.apply(params, token_R, pos, cache, method=model.decode_step)
    token_B = pick(key, logits_RV, pos)
    return (cache, token_B), token_B

  _, rest_LB = jax.lax.scan(step, (cache, first_B), (jnp.arange(1, seq_len), keys[1:]))
  return jnp.concatenate([first_B[:, None], rest_LB.T], axis=1).astype(jnp.int32)
