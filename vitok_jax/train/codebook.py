"""Codebook maintenance for learned VQ codebooks (VQ, multi-scale VQ) inside the jitted train step:
EMA updates (VQ-VAE-2) and dead-code restart.

Every `VectorQuantizer.nearest` call sows its inputs and chosen codes (flax "intermediates",
name "code_pool") when the step asks for them.
- EMA (config.codebook_ema = decay > 0): per codebook the state keeps EMA code counts and sums of
  the inputs assigned to each code; after the optimizer step the codebook is set to
  sums / Laplace-smoothed counts (`quantizers.ema_update`), replacing its gradient update.
- Restart (config.codebook_restart_every = N > 0): the state counts how often each code was chosen
  since the last restart; every N steps the codes never chosen in that window move onto random
  inputs of the current batch (`quantizers.restart_dead_codes`), and the counts start again. With
  EMA too, a restarted code's EMA sum is set so that sums / counts is the new code.
Logged per codebook path: `window_usage`, `restarted`.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from vitok_jax.models import quantizers

POOL = "code_pool"


def _codebooks(params) -> dict[str, jax.Array]:
  """{module path "a/b/c": codebook [K, D]} for every learned codebook in `params`."""
  flat = flax.traverse_util.flatten_dict(params)
  return {"/".join(path[:-1]): value for path, value in flat.items() if path[-1] == "codebook"}


def init_counts(params) -> dict:
  """Restart window: {path: float32 [K] zeros}."""
  return {name: jnp.zeros(cb.shape[:1], jnp.float32) for name, cb in _codebooks(params).items()}


def init_ema(params) -> dict:
  """EMA state: {path: {"counts": [K] zeros, "sums": [K, D] the initial codebook}} (VQ-VAE-2)."""
  return {name: {"counts": jnp.zeros(cb.shape[:1], jnp.float32), "sums": jnp.asarray(cb, jnp.float32)}
          for name, cb in _codebooks(params).items()}


def pools(intermediates) -> dict:
  """{module path: (inputs [N, C], codes [N])} from the sown intermediates of one apply."""
  out = {}
  for path, sown in flax.traverse_util.flatten_dict(intermediates).items():
    if path[-1] != POOL:
      continue
    vectors = jnp.concatenate([z.reshape(-1, z.shape[-1]) for z, _ in sown])
    index = jnp.concatenate([i.reshape(-1) for _, i in sown])
    out["/".join(path[:-1])] = (vectors, index)
  return out


def update(params, counts: dict, ema: dict, batch_pools: dict, step, rng, *, restart_every: int,
           ema_decay: float):
  """One step of codebook maintenance after the optimizer update; returns (params, counts, ema,
  metrics). Codebooks without a pool this step (e.g. LARP's stochastic training lookup) are left
  alone."""
  flat = flax.traverse_util.flatten_dict(params)
  counts, ema, metrics = dict(counts), dict(ema), {}
  for i, (name, (vectors_ND, index_N)) in enumerate(sorted(batch_pools.items())):
    key = tuple(name.split("/")) + ("codebook",)
    codebook_KD, vectors_ND = flat[key], jax.lax.stop_gradient(vectors_ND)
    if ema_decay:
      ema_counts, ema_sums, codebook_KD = quantizers.ema_update(
          ema[name]["counts"], ema[name]["sums"], vectors_ND, index_N, ema_decay)
      codebook_KD = codebook_KD.astype(flat[key].dtype)
    if restart_every:
      now = (step + 1) % restart_every == 0
      window_K = counts[name] + quantizers.code_histogram(index_N, codebook_KD.shape[0])
      restarted_KD, num = quantizers.restart_dead_codes(
          codebook_KD, window_K, vectors_ND, jax.random.fold_in(rng, i), threshold=0.5)
      moved_K = now & (window_K < 0.5)
      codebook_KD = jnp.where(moved_K[:, None], restarted_KD, codebook_KD)
      if ema_decay:  # sums / smoothed counts = the new code.
        smoothed_K = quantizers.laplace_smoothed(ema_counts)
        ema_sums = jnp.where(moved_K[:, None], codebook_KD * smoothed_K[:, None], ema_sums)
      counts[name] = jnp.where(now, jnp.zeros_like(window_K), window_K)
      metrics[f"{name}/window_usage"] = jnp.mean(window_K > 0)
      metrics[f"{name}/restarted"] = jnp.where(now, num, 0).astype(jnp.float32)
    if ema_decay:
      ema[name] = {"counts": ema_counts, "sums": ema_sums}
    flat[key] = codebook_KD
  return flax.traverse_util.unflatten_dict(flat), counts, ema, metrics
