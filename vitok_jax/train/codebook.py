"""Dead-code restart for learned VQ codebooks (VQ, multi-scale VQ), inside the jitted train step.

Every `VectorQuantizer.nearest` call sows its inputs and chosen codes (flax "intermediates",
name "code_pool") when the step asks for them. The train state keeps, per codebook, a count of how
often each code was chosen since the last restart; every `every` steps the codes never chosen in
that window are moved onto random inputs of the current batch (`quantizers.restart_dead_codes`),
and the counts start again. The window usage is logged as `<path>/window_usage`.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from vitok_jax.models import quantizers

POOL = "code_pool"


def _codebook_paths(params) -> list[tuple[str, ...]]:
  flat = flax.traverse_util.flatten_dict(params)
  return [path[:-1] for path in flat if path[-1] == "codebook"]


def init_counts(params) -> dict:
  """{module path "a/b/c": float32 [K] zeros} for every learned codebook in `params`."""
  flat = flax.traverse_util.flatten_dict(params)
  return {"/".join(path): jnp.zeros(flat[path + ("codebook",)].shape[:1], jnp.float32)
          for path in _codebook_paths(params)}


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


def restart(params, counts: dict, batch_pools: dict, step, rng, every: int):
  """Adds this batch's code counts; at steps every−1, 2·every−1, … restarts the unused codes.

  Codebooks without a pool this step (e.g. LARP's stochastic training lookup) are left alone.
  Returns (params, counts, metrics).
  """
  flat = flax.traverse_util.flatten_dict(params)
  counts, metrics = dict(counts), {}
  now = (step + 1) % every == 0
  for i, (name, (vectors_ND, index_N)) in enumerate(sorted(batch_pools.items())):
    key = tuple(name.split("/")) + ("codebook",)
    codebook_KD = flat[key]
    window_K = counts[name] + quantizers.code_histogram(index_N, codebook_KD.shape[0])
    restarted_KD, num = quantizers.restart_dead_codes(
        codebook_KD, window_K, jax.lax.stop_gradient(vectors_ND), jax.random.fold_in(rng, i),
        threshold=0.5)
    flat[key] = jnp.where(now, restarted_KD, codebook_KD)
    counts[name] = jnp.where(now, jnp.zeros_like(window_K), window_K)
    metrics[f"{name}/window_usage"] = jnp.mean(window_K > 0)
    metrics[f"{name}/restarted"] = jnp.where(now, num, 0).astype(jnp.float32)
  return flax.traverse_util.unflatten_dict(flat), counts, metrics
