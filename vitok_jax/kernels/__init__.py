"""Kernels and the dispatcher that picks an implementation per backend and shape."""
from vitok_jax.kernels.attention import dot_product_attention

__all__ = ["dot_product_attention"]
