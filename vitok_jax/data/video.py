"""Synthetic-motion clips made of real pixels: bouncing MNIST digits and camera pans over photos.

Each clip is a pure function of (split, index): no state, so any worker can render any index and a
resumed run sees the same clips. Eval clips use held-out digits/photos only.
"""
from __future__ import annotations

import functools

import numpy as np

from vitok_jax.data import bundled
from vitok_jax.data import transforms

_SEED = 7_301  # Base of the per-clip generators; the split is mixed in so train != eval.
NUM_CLIPS = {"train": 10_000, "eval": 1_000}


def _clip_rng(split: str, index: int) -> np.random.Generator:
  return np.random.default_rng((_SEED, 1 if split == "eval" else 0, index))


def _time_steps(frames: int, stride: int) -> np.ndarray:
  """Source time steps [frames] of the kept frames: 0, stride, 2 * stride, ..."""
  return np.arange(frames, dtype=np.float64) * stride


def digit_size(res: int) -> int:
  """Digit side in pixels: Moving MNIST's 28 px on a 64 px canvas, scaled to res."""
  return max(4, round(res * 28 / 64))


@functools.lru_cache(maxsize=8)
def _digit_pool(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
  """MNIST's own train/eval digits (the default 10% split), resized: uint8 [N, size, size]."""
  x, y = bundled.mnist(split)
  return bundled.resize_all(x, size, 1)[..., 0], y


class MovingMnist:
  """Two MNIST digits bouncing off the walls: uint8 [frames, res, res, 1], label of the first.

  Speeds are 0.5..1.5 px per source step at res 32 (scaled with res); frame_stride skips steps.
  """

  num_digits = 2

  def __init__(self, split: str, num_clips: int, res: int, frames: int, stride: int):
    self.split, self.num_clips = split, num_clips
    self.res, self.frames, self.stride = res, frames, stride
    self.digits, self.labels = _digit_pool(split, digit_size(res))

  def __len__(self) -> int:
    return self.num_clips

  def __getitem__(self, index: int) -> dict:
    rng = _clip_rng(self.split, index)
    k, d, res = self.num_digits, self.digits.shape[1], self.res
    ids = rng.integers(0, len(self.digits), k)
    lim = res - d
    angle = rng.uniform(0, 2 * np.pi, k)
    speed = rng.uniform(0.5, 1.5, k) * res / 32
    p0 = rng.uniform(0, lim, (k, 2))
    v = speed[:, None] * np.stack([np.sin(angle), np.cos(angle)], -1)
    p = p0[:, None] + v[:, None] * _time_steps(self.frames, self.stride)[None, :, None]
    # Unfold straight-line motion into the box: reflecting off a wall is a triangle wave.
    p = np.mod(p, 2 * lim)
    p = np.rint(np.where(p > lim, 2 * lim - p, p)).astype(np.int64)  # [k, T, (y, x)]
    video = np.zeros((self.frames, res, res), np.uint8)
    for j in range(k):
      for t in range(self.frames):
        y, x = p[j, t]
        view = video[t, y:y + d, x:x + d]
        np.maximum(view, self.digits[ids[j]], out=view)  # Overlaps stay bright, as in Moving MNIST.
    return {"image": video[..., None], "label": int(self.labels[ids[0]])}


class PhotoPans:
  """A camera panning (<= 1% of the short side per step) and zooming (<= 1% per step) over a photo.

  uint8 [frames, res, res, C]; label = the photo's id. Start and end windows lie inside the photo
  and every frame's window is their linear blend, so no frame reads outside the picture.
  """

  pan_per_step = 0.01
  zoom_per_step = 0.01

  def __init__(self, split: str, num_clips: int, res: int, frames: int, stride: int):
    self.split, self.num_clips = split, num_clips
    self.res, self.frames, self.stride = res, frames, stride
    self.photos = bundled.photos(split)

  def __len__(self) -> int:
    return self.num_clips

  def __getitem__(self, index: int) -> dict:
    rng = _clip_rng(self.split, index)
    pid, photo = self.photos[index % len(self.photos)]
    h, w = photo.shape[:2]
    m = min(h, w)
    steps = (self.frames - 1) * self.stride
    s0 = m * rng.uniform(0.3, 0.8)
    s1 = np.clip(s0 * np.exp(rng.uniform(-1, 1) * self.zoom_per_step * steps), 0.2 * m, m)
    size = np.array([w, h], np.float64)
    c0 = rng.uniform(s0 / 2, size - s0 / 2)
    angle = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(0, self.pan_per_step) * m * steps * np.array([np.cos(angle), np.sin(angle)])
    c1 = np.clip(c0 + shift, s1 / 2, size - s1 / 2)
    t = _time_steps(self.frames, self.stride) / max(steps, 1)
    video = []
    for ti in t:
      s = s0 + (s1 - s0) * ti
      cx, cy = c0 + (c1 - c0) * ti
      video.append(transforms.resize(photo, (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2),
                                     self.res))
    return {"image": np.stack(video), "label": pid}
