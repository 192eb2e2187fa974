"""Originals vs reconstructions as a PNG grid (images) or a frame strip PNG + GIF (video)."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from PIL import Image


def saved_levels(x):
  """Pixels in [-1, 1] -> the levels 0…255 (float32) a saved 8-bit image holds: clipped, rounded
  half up. numpy or jax arrays (a global array stays on its devices)."""
  return jnp.floor(jnp.clip((jnp.asarray(x, jnp.float32) + 1.0) * 127.5 + 0.5, 0.0, 255.0))


def as_saved(x):
  """Pixels in [-1, 1] as a saved 8-bit image holds them, back in [-1, 1]: what the metric
  networks score (FID, IS, FVD, LPIPS, FID-MNIST, class accuracy), as the ADM and torch-fidelity
  evaluators read uint8 images."""
  return saved_levels(x) / 127.5 - 1.0


def _to_uint8(x):
  x = np.asarray(saved_levels(x)).astype(np.uint8)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def image_grid(originals, recons, pad: int = 2):
  """[N, H, W, C] pairs -> uint8 [2·(H+pad), N·(W+pad), 3]: originals on top, reconstructions below."""
  rows = []
  for batch in (originals, recons):
    tiles = [np.pad(img, ((pad, 0), (pad, 0), (0, 0)), constant_values=255) for img in _to_uint8(batch)]
    rows.append(np.concatenate(tiles, axis=1))
  return np.concatenate(rows, axis=0)


def save_reconstructions(path_stem: str, originals, recons) -> list[str]:
  """Writes PATH_STEM.png (and PATH_STEM.gif for video [N, T, H, W, C]); returns the paths."""
  os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
  originals, recons = np.asarray(originals), np.asarray(recons)
  if originals.ndim == 4:
    Image.fromarray(image_grid(originals, recons)).save(path_stem + ".png")
    return [path_stem + ".png"]
  # Video: one grid per frame; the strip stacks frames vertically, the GIF plays them.
  frames = [image_grid(originals[:, t], recons[:, t]) for t in range(originals.shape[1])]
  Image.fromarray(np.concatenate(frames, axis=0)).save(path_stem + ".png")
  Image.fromarray(frames[0]).save(path_stem + ".gif", save_all=True, loop=0, duration=120,
                                  append_images=[Image.fromarray(f) for f in frames[1:]])
  return [path_stem + ".png", path_stem + ".gif"]


def save_sample_grid(path: str, samples, columns: int, pad: int = 2) -> str:
  """Generated images [N, H, W, C] -> a PNG grid of `columns` per row (e.g. one row per class
  when the labels cycle through the classes column by column)."""
  samples = _to_uint8(np.asarray(samples))
  rows = -(-len(samples) // columns)
  blank = np.full_like(samples[0], 255)
  tiles = list(samples) + [blank] * (rows * columns - len(samples))
  tiles = [np.pad(t, ((pad, 0), (pad, 0), (0, 0)), constant_values=255) for t in tiles]
  grid = np.concatenate([np.concatenate(tiles[r * columns:(r + 1) * columns], axis=1)
                         for r in range(rows)], axis=0)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(grid).save(path)
  return path
