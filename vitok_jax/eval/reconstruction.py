"""Reconstruction metrics on pixels in [-1, 1]: PSNR and SSIM (dm-pix), per example."""
from __future__ import annotations

import dm_pix
import jax.numpy as jnp


def to_unit(x):
  """[-1, 1] -> [0, 1], clipped (the range PSNR/SSIM are reported in)."""
  return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def _frames(x):
  """[B, T, H, W, C] -> [B·T, H, W, C]; images pass through."""
  return x.reshape((-1,) + x.shape[-3:])


def psnr(x, recon):
  """PSNR in dB per example ([B]); for video the mean over frames of the per-frame PSNR."""
  batch = x.shape[0]
  return dm_pix.psnr(_frames(to_unit(x)), _frames(to_unit(recon))).reshape(batch, -1).mean(-1)


def ssim(x, recon):
  """SSIM per example ([B]) with an 11×11 Gaussian window; for video the mean over frames."""
  batch = x.shape[0]
  x, recon = _frames(to_unit(x)), _frames(to_unit(recon))
  size = min(11, x.shape[1], x.shape[2])
  size -= 1 - size % 2  # The Gaussian window must be odd.
  return dm_pix.ssim(x, recon, filter_size=size).reshape(batch, -1).mean(-1)
