"""ViTok: a ViT auto-encoder tokenizer for images and video with a continuous bottleneck.

pixels [B, (T,) H, W, C] -> patch/tubelet tokens [B, N, q·p·p·C] -> encoder ViT -> bottleneck
z [B, N, c] -> decoder ViT -> tokens -> pixels. E = N·c floats per example is the scaling variable.
"""
from __future__ import annotations

import math
from typing import Sequence

import einops
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from vitok_jax.errors import ConfigError
from vitok_jax.models import bottlenecks, vit


def token_grid(pixel_shape: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
  """(H, W) with (p, p) -> (H/p, W/p); (T, H, W) with (q, p, p) -> (T/q, H/p, W/p)."""
  if len(pixel_shape) != len(patch):
    raise ConfigError(f"patch {tuple(patch)} needs inputs with {len(patch)} spatio-temporal axes, "
                      f"got shape {tuple(pixel_shape)}")
  for size, p, axis in zip(pixel_shape, patch, "THW"[-len(patch):]):
    if size % p:
      ok = [d for d in (1, 2, 4, 8, 16, 32) if size % d == 0]
      raise ConfigError(f"patch size {p} does not divide {axis}={size}; use one of {ok}")
  return tuple(s // p for s, p in zip(pixel_shape, patch))


def patchify(x, patch: Sequence[int]):
  """[B, H, W, C] -> [B, h·w, p·p·C]; [B, T, H, W, C] -> [B, t·h·w, q·p·p·C] (row-major grid)."""
  if len(patch) == 2:
    return einops.rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=patch[0], p2=patch[1])
  return einops.rearrange(x, "b (t q) (h p1) (w p2) c -> b (t h w) (q p1 p2 c)",
                          q=patch[0], p1=patch[1], p2=patch[2])


def unpatchify(tokens, patch: Sequence[int], grid: Sequence[int]):
  """Inverse of `patchify` for a token grid (h, w) or (t, h, w)."""
  if len(patch) == 2:
    return einops.rearrange(tokens, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c",
                            h=grid[0], w=grid[1], p1=patch[0], p2=patch[1])
  return einops.rearrange(tokens, "b (t h w) (q p1 p2 c) -> b (t q) (h p1) (w p2) c",
                          t=grid[0], h=grid[1], w=grid[2], q=patch[0], p1=patch[1], p2=patch[2])


class ViTok(nn.Module):
  """Encoder ViT -> bottleneck (c channels per token) -> decoder ViT."""
  encoder: vit.ViTSize
  decoder: vit.ViTSize
  patch: tuple[int, ...]          # (p, p) for images, (q, p, p) for video tubelets.
  pixel_channels: int             # C of the input pixels.
  latent_channels: int            # c of the bottleneck.
  bottleneck: str = "gaussian"
  mlp_kind: str = "geglu"
  rope: str = "1d"
  qk_norm: bool = False
  attn_impl: str = "auto"
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  codebook_size: int = 0   # > 0: a learned codebook's size instead of the bottleneck's default.

  def setup(self):
    transformer = lambda size, name: vit.Transformer(
        size, self.mlp_kind, self.rope, self.qk_norm, self.attn_impl, self.remat, self.dtype, name=name)
    dense = lambda features, axes, name: vit.dense(features, axes, self.dtype, name)
    patch_dim = math.prod(self.patch) * self.pixel_channels
    self.patch_embed = dense(self.encoder.width, ("patch", "embed"), "patch_embed")
    self.encoder_vit = transformer(self.encoder, "encoder")
    self.bottleneck_layer = bottlenecks.build(self.bottleneck, self.latent_channels,
                                              self.codebook_size, name="bottleneck")
    self.latent_embed = dense(self.decoder.width, ("latent", "embed"), "latent_embed")
    self.decoder_vit = transformer(self.decoder, "decoder")
    self.to_pixels = dense(patch_dim, ("embed", "patch"), "to_pixels")

  def encode(self, x, *, sample: bool = False):
    """x: [B, H, W, C] or [B, T, H, W, C] in [-1, 1] -> (z [B, N, c], aux, token grid)."""
    grid = token_grid(x.shape[1:-1], self.patch)
    if self.bottleneck in bottlenecks.MULTI_SCALE and (len(grid) != 2 or grid[0] != grid[1]):
      # Else a (t, h, w) grid whose t·h·w is a square would be quantised as one made-up image.
      raise ConfigError(f"bottleneck={self.bottleneck!r} quantises a square 2-D token map, got the "
                        f"token grid {tuple(grid)}; use it on square images with a P×P patch, or "
                        f"a single-scale quantizer (vq, vq1k, bsq) for video")
    h_BND = self.encoder_vit(self.patch_embed(patchify(x.astype(self.dtype), self.patch)), grid)
    z_BNC, aux = self.bottleneck_layer(h_BND, sample=sample)
    return z_BNC, aux, grid

  def decode(self, z_BNC, grid: Sequence[int]):
    """z [B, N, c] on a token grid -> pixels [B, (T,) H, W, C] (float32)."""
    h_BND = self.decoder_vit(self.latent_embed(z_BNC.astype(self.dtype)), grid)
    tokens = self.to_pixels(h_BND).astype(jnp.float32)
    return unpatchify(tokens, self.patch, grid)

  def __call__(self, x, *, sample: bool = True):
    """Reconstruction [same shape as x] and aux (bottleneck outputs and loss terms)."""
    z_BNC, aux, grid = self.encode(x, sample=sample)
    return self.decode(z_BNC, grid), aux


def from_config(model_cfg: ml_collections.ConfigDict, pixel_channels: int) -> ViTok:
  """Builds the tokenizer of config.model (validated by configs' `validate`); bottleneck="larp"
  builds `larp.LARP` (same interface)."""
  if model_cfg.bottleneck == "larp":
    from vitok_jax.models import larp  # pylint: disable=g-import-not-at-top  (larp imports us)
    return larp.from_config(model_cfg, pixel_channels)
  return ViTok(
      encoder=vit.decode_size(model_cfg.encoder),
      decoder=vit.decode_size(model_cfg.decoder),
      patch=tuple(model_cfg.patch),
      pixel_channels=pixel_channels,
      latent_channels=model_cfg.channels,
      bottleneck=model_cfg.bottleneck,
      mlp_kind=model_cfg.mlp,
      rope=model_cfg.rope,
      qk_norm=model_cfg.qk_norm,
      attn_impl=model_cfg.attn_impl,
      remat=model_cfg.remat,
      dtype=jnp.dtype(model_cfg.dtype),
      codebook_size=model_cfg.get("codebook_size", 0),
  )
