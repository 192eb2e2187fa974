"""Scaled dot-product attention behind one function, so models never pick an implementation.

Implementations: "xla" (plain einsums, portable reference), "cudnn" (jax.nn's cuDNN fused path,
GPU only) and "auto" (cuDNN on GPU for supported dtypes, else XLA). Pallas kernels plug in here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vitok_jax.errors import ConfigError

IMPLS = ("auto", "xla", "cudnn")


def resolve_impl(impl: str, dtype=jnp.float32) -> str:
  """Maps "auto" to the concrete implementation for this backend and dtype."""
  if impl not in IMPLS:
    raise ConfigError(f"attention impl={impl!r} is unknown; use one of {IMPLS}")
  if impl != "auto":
    return impl
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def dot_product_attention(q_BLHD, k_BSHD, v_BSHD, *, mask_BHLS=None, is_causal=False,
                          impl: str = "auto"):
  """softmax(q·kᵀ/√D + mask)·v.

  Args:
    q_BLHD: queries [batch, q_len, heads, head_dim].
    k_BSHD, v_BSHD: keys/values [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads (GQA).
    mask_BHLS: optional boolean mask broadcastable to [batch, heads, q_len, kv_len]; True = attend.
    is_causal: apply a causal mask (query i sees keys ≤ i).
    impl: "auto" | "xla" | "cudnn".
  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  impl = resolve_impl(impl, q_BLHD.dtype)
  return jax.nn.dot_product_attention(
      q_BLHD, k_BSHD, v_BSHD, mask=mask_BHLS, is_causal=is_causal, implementation=impl)
