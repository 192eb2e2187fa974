"""Kernels and the dispatchers that pick an implementation per backend, shape and mask.

  dot_product_attention(q, k, v, *, mask_BHLS, is_causal, segment_ids, block_ids, scale, impl)
  bsq(z, *, inv_temperature, impl), vq_nearest(z, codebook, *, normalize, impl)
  attention_impl(...), quantize_impl(...): what impl="auto" runs, for the run record;
  recorded_attention(): a context that lists what each attention call traced within runs as.
"""
from vitok_jax.kernels.attention import dot_product_attention
from vitok_jax.kernels.attention import resolve_impl as attention_impl
from vitok_jax.kernels.masks import var_block_ids
from vitok_jax.kernels.quantize import bsq
from vitok_jax.kernels.quantize import resolve_impl as quantize_impl
from vitok_jax.kernels.quantize import vq_nearest
from vitok_jax.kernels.recording import recorded_calls as recorded_attention

__all__ = ["dot_product_attention", "attention_impl", "recorded_attention", "bsq", "vq_nearest",
           "quantize_impl", "var_block_ids"]
