"""Quantiser kernels behind one function each, so bottlenecks never pick an implementation.

  bsq(z, ...)                   binary spherical quantisation (Infinity/BSQ), `reference.BSQOutput`;
  vq_nearest(z, codebook, ...)  nearest codebook entry (LlamaGen / VAR), (index, distance).

impl: "xla" (the jnp reference, fused by XLA), "pallas" (the kernels of bsq_pallas.py and
vq_pallas.py; interpreted on CPU) or "auto" (`resolve_impl`). There is no cuDNN quantiser.
"""
from __future__ import annotations

from typing import Optional

from vitok_jax.errors import ConfigError
from vitok_jax.kernels import bsq_pallas
from vitok_jax.kernels import policy
from vitok_jax.kernels import reference
from vitok_jax.kernels import vq_pallas

IMPLS = ("auto", "pallas", "xla")


def resolve_impl(impl: str, *, backend: Optional[str] = None) -> str:
  """"pallas" or "xla": "auto" takes the kernel on a hardware-validated GPU/TPU with one device
  (`policy.pallas_allowed`)."""
  if impl not in IMPLS:
    hint = " (there is no cuDNN quantiser)" if impl == "cudnn" else ""
    raise ConfigError(f"quantiser impl={impl!r} is unknown{hint}; use one of {IMPLS}")
  if impl != "auto":
    return impl
  backend = backend or policy.backend()
  allowed = policy.pallas_allowed(backend, needs_one_device=True)
  return "pallas" if backend in ("gpu", "tpu") and allowed else "xla"


def bsq(z_ND, *, inv_temperature: float = 100.0, impl: str = "auto") -> reference.BSQOutput:
  """BSQ of latents z [..., d]: quantised (straight-through), packed codes, entropy statistics.

  See `reference.BSQOutput` for the fields; the entropy penalty of the BSQ paper is
  `token_entropy − γ·codebook_entropy` (both differentiable in z).
  """
  if resolve_impl(impl) == "pallas":
    return bsq_pallas.bsq(z_ND, inv_temperature=inv_temperature)
  return reference.bsq(z_ND, inv_temperature=inv_temperature)


def vq_nearest(z_ND, codebook_KD, *, normalize: bool = True, impl: str = "auto"):
  """Nearest entry of codebook [K, D] for each token of z [..., D], first index on ties.

  Returns (index [...] int32, squared distance [...] float32); with normalize, both sides are
  l2-normalised first (cosine lookup). The Pallas kernel never builds the tokens × K distances.
  """
  if resolve_impl(impl) == "pallas":
    return vq_pallas.vq_nearest(z_ND, codebook_KD, normalize=normalize)
  return reference.vq_nearest(z_ND, codebook_KD, normalize=normalize)
