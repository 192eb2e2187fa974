"""The data config: defaults and build-time validation."""
from __future__ import annotations

import ml_collections

from vitok_jax.errors import ConfigError

IMAGE_NAMES = ("mnist", "digits", "photos", "lfw", "image_folder")
VIDEO_NAMES = ("moving_mnist", "photo_pans", "video_folder")
NAMES = IMAGE_NAMES + VIDEO_NAMES + ("tfds",)
FOLDER_NAMES = ("image_folder", "video_folder")
SPLITS = ("train", "eval")
# data.folder_split, how one folder (no "{split}" in data.path) is split into train and eval:
#   hash      a file is held out by a hash of its path under data.path, so adding or removing files
#             moves no other file between the splits (with eval_size, the eval_size lowest
#             hashes: files near that rank can move); the folder configs' setting;
#   position  its position in a seeded permutation of the sorted files (runs saved before the field:
#             a file added anywhere reshuffles both splits).
FOLDER_SPLITS = ("hash", "position")
# The variant option data=<preset> (configs/vitok.py) for prepared tfds datasets, beside the
# source names. Their res is the published one (ViTok: ImageNet at 256p, UCF-101 at 128p), unless
# the variant gives res.
PRESETS = {
    "imagenet": dict(name="tfds", tfds_name="imagenet2012", train_split="train",
                     eval_split="validation", channels=3, res=256),
    "ucf101": dict(name="tfds", tfds_name="ucf101", train_split="train", eval_split="test",
                   image_key="video", channels=3, res=128),
}


def single_folder(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the data is one folder that `folder_split` splits (no "{split}" in data.path)."""
  return cfg.name in FOLDER_NAMES and "{split}" not in cfg.path


def default_config() -> ml_collections.ConfigDict:
  """Returns the data config with every field the pipeline reads, at its default."""
  return ml_collections.ConfigDict(dict(
      name="mnist",          # One of NAMES.
      res=32,                # Output height = width, pixels.
      frames=1,              # 1: images [B, H, W, C]; >1: clips [B, T, H, W, C].
      channels=3,            # 1 or 3; grayscale is replicated, RGB is converted to luma.
      path="",               # Folder for image_folder/video_folder; data_dir for tfds and lfw.
      tfds_name="",          # e.g. "imagenet2012".
      train_split="train",   # tfds split (or "{split}" in path) read for split="train".
      eval_split="validation",  # Same for split="eval".
      image_key="image",     # tfds features key of the image ("video" for video datasets).
      frame_stride=1,        # Keep every frame_stride-th source frame in a clip.
      flip=False,            # Random horizontal flip on train.
      crop="center",         # "random": scale-jittered square crop on train; eval is always center.
      crop_scale=0.8,        # Smallest crop area, as a fraction of the largest centred square.
      worker_count=0,        # grain prefetch processes; 0 reads in-process.
      shuffle=True,          # Shuffle train (a fresh order each epoch).
      eval_size=0,           # Held-out examples; 0 = the default for the dataset (see sources).
  ))


def validate(cfg: ml_collections.ConfigDict, split: str = "train") -> None:
  """Raises ConfigError naming the first bad field and the values it accepts."""
  if cfg.name in PRESETS:  # e.g. --config.data.name=imagenet, after the variant set the fields.
    fields = " ".join(f"--config.data.{k}={v}" for k, v in PRESETS[cfg.name].items()
                      if k in ("name", "tfds_name"))
    raise ConfigError(f"data.name={cfg.name!r} is a preset, not a source: give it in the "
                      f"variant (`--config vitok:...,data={cfg.name}`), or set {fields}")
  if cfg.name not in NAMES:
    raise ConfigError(f"data.name={cfg.name!r} is unknown; choose one of {list(NAMES)} (or a "
                      f"preset in the variant: data=<{'|'.join(PRESETS)}>)")
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} is unknown; choose one of {list(SPLITS)}")
  if not isinstance(cfg.res, int) or cfg.res <= 0:
    raise ConfigError(f"data.res={cfg.res!r} must be a positive int (output height = width)")
  if cfg.channels not in (1, 3):
    raise ConfigError(f"data.channels={cfg.channels!r} must be 1 (grayscale) or 3 (RGB)")
  if not isinstance(cfg.frames, int) or cfg.frames < 1:
    raise ConfigError(f"data.frames={cfg.frames!r} must be an int >= 1 (1 = images)")
  if cfg.frames > 1 and cfg.name in IMAGE_NAMES:
    raise ConfigError(
        f"data.frames={cfg.frames} but data.name={cfg.name!r} holds images; set data.frames=1 "
        f"or use a video source: {list(VIDEO_NAMES) + ['tfds']}")
  if not isinstance(cfg.frame_stride, int) or cfg.frame_stride < 1:
    raise ConfigError(f"data.frame_stride={cfg.frame_stride!r} must be an int >= 1")
  if cfg.crop not in ("random", "center"):
    raise ConfigError(f"data.crop={cfg.crop!r} must be 'random' or 'center'")
  if not 0.0 < cfg.crop_scale <= 1.0:
    raise ConfigError(
        f"data.crop_scale={cfg.crop_scale!r} must be in (0, 1] (min crop area fraction)")
  if not isinstance(cfg.worker_count, int) or cfg.worker_count < 0:
    raise ConfigError(
        f"data.worker_count={cfg.worker_count!r} must be an int >= 0 (0 = in-process)")
  if not isinstance(cfg.eval_size, int) or cfg.eval_size < 0:
    raise ConfigError(f"data.eval_size={cfg.eval_size!r} must be an int >= 0 (0 = default)")
  if "folder_split" in cfg and cfg.folder_split not in FOLDER_SPLITS:
    raise ConfigError(
        f"data.folder_split={cfg.folder_split!r} must be one of {list(FOLDER_SPLITS)}")
  if cfg.name in FOLDER_NAMES and not cfg.path:
    raise ConfigError(f"data.name={cfg.name!r} needs data.path: the folder to read")
  if cfg.name == "tfds" and not cfg.tfds_name:
    raise ConfigError("data.name='tfds' needs data.tfds_name, e.g. 'imagenet2012'")
  if cfg.name == "tfds":  # A held-out split that shares examples with train scores training data.
    shared = tfds_overlap(cfg.train_split, cfg.eval_split)
    if shared:
      base = shared.split("[")[0]
      slices = (f", or slices that do not overlap (train_split='{base}[:95%]', "
                f"eval_split='{base}[95%:]')" if base != "all" else "")
      raise ConfigError(
          f"data.eval_split={cfg.eval_split!r} shares examples with data.train_split="
          f"{cfg.train_split!r} ({shared}): the held-out scores would be of training data; use "
          f"another split{slices}")


def _tfds_parts(spec: str, field: str) -> list:
  """The ReadInstructions (or "all") of a tfds split spec such as 'train[:80%]+validation'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    split = tfds.core.ReadInstruction.from_spec(spec)
  except (ValueError, NotImplementedError) as e:
    raise ConfigError(f"data.{field}={spec!r} is not a tfds split: {e}") from None
  parts, stack = [], [split]
  while stack:
    node = stack.pop()
    if hasattr(node, "left"):       # a + b.
      stack += [node.right, node.left]
    else:
      parts.append(node if hasattr(node, "split_name") else "all")
  return parts


_WHOLE = ("%", 0.0, 100.0, False)


def _interval(part) -> tuple[str, float, float, bool] | None:
  """(unit, start, end, from_end) of a ReadInstruction where that needs no split size (a whole
  split is [0, 100)%, an open absolute end is ∞); from_end: a percent boundary counted from the
  split's end, which tfds rounds apart from its positive twin (−50% of 7 examples is 3, 50% is 4).
  None for a negative absolute boundary."""
  if part.from_ is None and part.to is None:
    return _WHOLE
  if part.unit == "%":
    start, end = part.from_ or 0.0, 100.0 if part.to is None else part.to
    return ("%", start % 100 if start < 0 else start, end % 100 if end < 0 else end,
            start < 0 or end < 0)
  if (part.from_ or 0) < 0 or (part.to is not None and part.to < 0):
    return None
  return part.unit, part.from_ or 0, float("inf") if part.to is None else part.to, False


def tfds_overlap(train_split: str, eval_split: str) -> str:
  """A part of `eval_split` that shares examples with `train_split` ("" if none is known to): the
  same split unsliced on either side, or slices in one unit that intersect (or touch, when one
  counts from the split's end). Slices in different units (10% and 1000 examples) need the split's
  size and are not compared."""
  for a in _tfds_parts(train_split, "train_split"):
    for b in _tfds_parts(eval_split, "eval_split"):
      if a == "all" or b == "all":
        return "all"
      if a.split_name != b.split_name:
        continue
      ia, ib = _interval(a), _interval(b)
      touch = ia and ib and (ia[3] or ib[3])  # Rounded apart: one example may be shared.
      if _WHOLE in (ia, ib) or (ia and ib and ia[0] == ib[0] and (
          max(ia[1], ib[1]) < min(ia[2], ib[2])
          or touch and max(ia[1], ib[1]) <= min(ia[2], ib[2]))):
        return repr(b).split("'")[1]  # ReadInstruction('train[70%:]', rounding=...).
  return ""
