"""Per-example pixel ops (crop, resize, flip, channels) as grain transforms.

Records are dicts {"image": uint8 [H, W, C] or a clip [frames, H, W, C], "label": int}, or carry
"video": uint8 [N, H, W, C] (a whole video) instead of "image". Pixels stay uint8 through
crop/resize and are normalised once per batch, in one vectorised op.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np
from PIL import Image

from vitok_jax.data import video_files
from vitok_jax.errors import DataError

# ITU-R BT.601 luma, the weights PIL's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [..., C] with C in {1, 3, 4} -> uint8 [..., channels]."""
  c = x.shape[-1]
  if c == 4:  # Alpha carries no pixels for a tokenizer.
    x, c = x[..., :3], 3
  if c == channels:
    return x
  if channels == 3:
    return np.repeat(x, 3, axis=-1)
  return np.rint(x.astype(np.float32) @ _LUMA)[..., None].astype(np.uint8)


def center_box(h: int, w: int) -> tuple[float, float, float, float]:
  """The largest centred square, as a PIL box (x0, y0, x1, y1) in pixels."""
  s = min(h, w)
  x0, y0 = (w - s) / 2, (h - s) / 2
  return (x0, y0, x0 + s, y0 + s)


def random_box(h: int, w: int, rng: np.random.Generator,
               min_scale: float) -> tuple[float, float, float, float]:
  """A square covering U(min_scale, 1) of the centred square's area, uniformly placed."""
  s = min(h, w) * np.sqrt(rng.uniform(min_scale, 1.0))
  x0, y0 = rng.uniform(0, w - s), rng.uniform(0, h - s)
  return (x0, y0, x0 + s, y0 + s)


def resize(frame: np.ndarray, box, res: int) -> np.ndarray:
  """uint8 [H, W, C] cropped to `box` (float pixels) and resized to [res, res, C].

  PIL's bicubic filter widens with the down-scaling factor, so shrinking is antialiased.
  """
  img = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
  out = np.asarray(img.resize((res, res), Image.BICUBIC, box=box))
  return out[..., None] if out.ndim == 2 else out


def resize_frames(video: np.ndarray, box, res: int) -> np.ndarray:
  """uint8 [T, H, W, C] -> [T, res, res, C], every frame with the same crop box."""
  h, w = video.shape[1:3]
  if (h, w) == (res, res) and tuple(box) == (0, 0, w, h):
    return video
  return np.stack([resize(f, box, res) for f in video])


def temporal_crop(video: np.ndarray, frames: int, stride: int,
                  rng: np.random.Generator | None) -> np.ndarray:
  """[N, H, W, C] -> [frames, H, W, C]: every stride-th frame from a random (or centred) start."""
  span = (frames - 1) * stride + 1
  n = video.shape[0]
  if n < span:
    raise DataError(
        f"a clip has {n} frames but data.frames={frames} at data.frame_stride={stride} needs "
        f"{span}; lower data.frames or data.frame_stride, or drop the short videos")
  start = rng.integers(0, n - span + 1) if rng is not None else (n - span) // 2
  return video[start:start + span:stride]


@dataclasses.dataclass(frozen=True)
class Options:
  """The fields of the data config that per-example ops read."""
  res: int
  frames: int
  frame_stride: int
  channels: int
  crop: str = "center"
  crop_scale: float = 1.0
  flip: bool = False

  @classmethod
  def from_config(cls, cfg) -> Options:
    return cls(res=cfg.res, frames=cfg.frames, frame_stride=cfg.frame_stride,
               channels=cfg.channels, crop=cfg.crop, crop_scale=cfg.crop_scale, flip=cfg.flip)


def prepare(record: dict, opt: Options, rng: np.random.Generator | None) -> dict:
  """A source record -> {"image": uint8 [res, res, C] or [T, res, res, C], "label": int32}.

  With `rng` None the op is deterministic (eval): centre crop, middle clip (of a video file, its
  slot's start), no flip.
  """
  if "video" in record:  # A whole video: pick the clip here, where train has an rng.
    x = temporal_crop(np.asarray(record["video"]), opt.frames, opt.frame_stride, rng)
  elif "video_file" in record:  # A clip's slot in a video file (`sources.VideoClips`): likewise.
    offset = 0 if rng is None else int(rng.integers(0, record["room"] + 1))
    x = video_files.decode_clip(record["video_file"], record["start"] + offset, opt.frames,
                                opt.frame_stride)
  else:
    x = np.asarray(record["image"])
    x = x[None] if x.ndim == 3 else x
    if x.shape[0] != opt.frames:
      raise DataError(f"a record holds {x.shape[0]} frame(s) of shape {x.shape[1:]} but "
                      f"data.frames={opt.frames}; set data.frames to match or read a video dataset")
  h, w = x.shape[1:3]
  if rng is not None and opt.crop == "random":
    box = random_box(h, w, rng, opt.crop_scale)
  else:
    box = center_box(h, w)
  x = resize_frames(x, box, opt.res)
  if rng is not None and opt.flip and rng.random() < 0.5:
    x = x[:, :, ::-1]
  x = to_channels(x, opt.channels)
  if opt.frames == 1:
    x = x[0]
  return {"image": np.ascontiguousarray(x), "label": np.int32(record.get("label", 0))}


@dataclasses.dataclass(frozen=True)
class Prepare(grain.transforms.Map):
  """Deterministic (eval) preprocessing."""
  opt: Options

  def map(self, element):
    return prepare(element, self.opt, None)


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
  """Train preprocessing; grain seeds `rng` from (seed, index), so resuming redraws the same."""
  opt: Options

  def random_map(self, element, rng):
    return prepare(element, self.opt, rng)


def normalize(batch: dict) -> dict:
  """uint8 images -> float32 in [-1, 1]; labels stay int32."""
  image = batch["image"].astype(np.float32)
  image *= 1.0 / 127.5
  image -= 1.0
  return {"image": image, "label": batch["label"]}
