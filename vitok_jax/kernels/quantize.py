"""Quantiser kernels behind one function each, so bottlenecks never pick an implementation.

  bsq(z, ...)                   binary spherical quantisation (Infinity/BSQ), `reference.BSQOutput`;
  vq_nearest(z, codebook, ...)  nearest codebook entry (LlamaGen / VAR), (index, distance).

impl: "xla" (the jnp reference, fused by XLA), "pallas" (the kernels of bsq_pallas.py and
vq_pallas.py; interpreted on CPU) or "auto" (`resolve_impl`). There is no cuDNN quantiser.
Under a mesh the kernels run per shard of the batch (the leading axis, see `shard`); BSQ's
statistics are then summed over the shards before they become means and entropies.
"""
from __future__ import annotations

import math
from typing import Optional

from jax.sharding import PartitionSpec as P

from vitok_jax.errors import ConfigError
from vitok_jax.kernels import bsq_pallas
from vitok_jax.kernels import policy
from vitok_jax.kernels import reference
from vitok_jax.kernels import shard
from vitok_jax.kernels import vq_pallas
from vitok_jax.parallel import sharding

IMPLS = ("auto", "pallas", "xla")


def resolve_impl(impl: str, *, backend: Optional[str] = None) -> str:
  """"pallas" or "xla": "auto" takes the kernel on a hardware-validated GPU/TPU
  (`policy.pallas_allowed`)."""
  if impl not in IMPLS:
    hint = " (there is no cuDNN quantiser)" if impl == "cudnn" else ""
    raise ConfigError(f"quantiser impl={impl!r} is unknown{hint}; use one of {IMPLS}")
  if impl != "auto":
    return impl
  backend = backend or policy.backend()
  return "pallas" if backend in ("gpu", "tpu") and policy.pallas_allowed(backend) else "xla"


def _check_tokens(z_ND, what: str) -> None:
  """A ConfigError for latents with no tokens (an empty batch), on every impl alike."""
  if z_ND.ndim < 1 or math.prod(z_ND.shape[:-1]) == 0:
    raise ConfigError(f"{what} got latents of shape {tuple(z_ND.shape)}: no tokens to quantise "
                      "(an empty batch?)")


def _batch_sharding(z_ND):
  """(mesh, batch axes) to run a kernel per shard of z's leading axis, or (None, None)."""
  mesh = sharding.active_mesh()
  if mesh is None or z_ND.ndim < 2:
    return None, None
  axes = shard.divisible_axes("batch", z_ND.shape[0], mesh)
  return (mesh, axes) if axes is not None else (None, None)


def bsq(z_ND, *, inv_temperature: float = 100.0, impl: str = "auto") -> reference.BSQOutput:
  """BSQ of latents z [..., d]: quantised (straight-through), packed codes, entropy statistics.

  See `reference.BSQOutput` for the fields; the entropy penalty of the BSQ paper is
  `token_entropy − γ·codebook_entropy` (both differentiable in z).
  """
  _check_tokens(z_ND, "bsq")
  if resolve_impl(impl) != "pallas":
    return reference.bsq(z_ND, inv_temperature=inv_temperature)
  mesh, axes = _batch_sharding(z_ND)
  if mesh is None:
    return bsq_pallas.bsq(z_ND, inv_temperature=inv_temperature)

  def kernel(z):  # Each shard's sums get a leading axis of one, to be added up outside.
    quantized, codes, *sums_D = bsq_pallas.bsq_sums(z, inv_temperature=inv_temperature)
    return (quantized, codes, *(s[None] for s in sums_D))

  quantized, codes, *sums_SD = shard.run(kernel, z_ND, mesh=mesh, in_specs=(P(axes),),
                                         out_specs=(P(axes),) * 5)
  return bsq_pallas.output_from_sums(quantized, codes, *(s.sum(0) for s in sums_SD),
                                     num_tokens=math.prod(z_ND.shape[:-1]))


def vq_nearest(z_ND, codebook_KD, *, normalize: bool = True, impl: str = "auto"):
  """Nearest entry of codebook [K, D] for each token of z [..., D], first index on ties.

  Returns (index [...] int32, squared distance [...] float32); with normalize, both sides are
  l2-normalised first (cosine lookup). The Pallas kernel never builds the tokens × K distances.
  """
  _check_tokens(z_ND, "vq_nearest")
  if resolve_impl(impl) != "pallas":
    return reference.vq_nearest(z_ND, codebook_KD, normalize=normalize)
  kernel = lambda z, codebook: vq_pallas.vq_nearest(z, codebook, normalize=normalize)
  mesh, axes = _batch_sharding(z_ND)
  if mesh is None:
    return kernel(z_ND, codebook_KD)
  return shard.run(kernel, z_ND, codebook_KD, mesh=mesh, in_specs=(P(axes), P()),
                   out_specs=(P(axes), P(axes)))
