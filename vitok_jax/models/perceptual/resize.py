"""torch.nn.functional.interpolate(mode='bicubic', align_corners=False) in JAX, as separable matrices.

torch's bicubic is Keys' cubic convolution with A = −0.75 (jax.image.resize uses A = −0.5 and differs
by up to ~0.3), half-pixel centres (source x = (i + 0.5)·in/out − 0.5), the four taps clamped to the
border, and no antialias when shrinking. Built once per (in, out) size in numpy; applied by einsum.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

TORCH_CUBIC_A = -0.75


def _cubic(t, a=TORCH_CUBIC_A):
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


@functools.lru_cache(maxsize=32)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float32 weights of torch's bicubic resize along one axis."""
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src).astype(int)
  frac = src - base
  matrix = np.zeros((n_out, n_in), np.float64)
  for offset in range(-1, 3):
    taps = np.clip(base + offset, 0, n_in - 1)
    np.add.at(matrix, (np.arange(n_out), taps), _cubic(frac - offset))
  return matrix.astype(np.float32)


def resize_bicubic_torch(x_BHWC, height: int, width: int):
  """Bicubic resize of the H, W axes of [..., H, W, C] with torch's semantics (see module doc)."""
  rows = jnp.asarray(bicubic_matrix(x_BHWC.shape[-3], height))
  cols = jnp.asarray(bicubic_matrix(x_BHWC.shape[-2], width))
  x = jnp.einsum("oh,...hwc->...owc", rows, x_BHWC, precision="highest")
  return jnp.einsum("pw,...owc->...opc", cols, x, precision="highest")
