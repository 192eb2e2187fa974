"""Random-access sources (len + getitem) for every data.name, and make_source to pick one.

A source yields records {"image": uint8 [H, W, C] or a clip [frames, H, W, C], "label": int} (tfds
videos yield "video": [N, H, W, C], clipped by transforms.prepare; video files yield their clip
slots, decoded there); crop/resize to data.res happens later in transforms.prepare, except for
bundled sets, which are resized once here.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os

import numpy as np
from PIL import Image, ImageOps

from vitok_jax import config_lib
from vitok_jax.data import bundled
from vitok_jax.data import transforms
from vitok_jax.data import video
from vitok_jax.data.video_files import count_frames
from vitok_jax.errors import ConfigError, DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
PHOTO_CROPS_PER_PHOTO = 1000
PHOTO_EVAL_CROPS = 500
_PHOTO_SEED = 5_113
_MAX_LISTED = 5  # Bad paths named in a warning; the rest are counted.


class ArraySource:
  """In-memory arrays: uint8 images [N, ...] and int labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": int(self.labels[index])}


class PhotoCrops:
  """Square crops of scikit-image photos, a pure function of (split, index), rendered at res.

  Crop sides are log-uniform between res (no upsampling where the photo allows) and the photo's
  short side, so one epoch mixes textures at many scales. Eval crops come from held-out photos.
  """

  def __init__(self, split: str, num_crops: int, res: int):
    self.split, self.num_crops, self.res = split, num_crops, res
    self.photos = bundled.photos(split)

  def __len__(self) -> int:
    return self.num_crops

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng((_PHOTO_SEED, 1 if self.split == "eval" else 0, index))
    pid, photo = self.photos[index % len(self.photos)]
    h, w = photo.shape[:2]
    m = min(h, w)
    s = np.exp(rng.uniform(np.log(min(self.res, m)), np.log(m)))
    x0, y0 = rng.uniform(0, w - s), rng.uniform(0, h - s)
    return {"image": transforms.resize(photo, (x0, y0, x0 + s, y0 + s), self.res), "label": pid}


def decode_image(path: str) -> np.ndarray:
  """An image file -> uint8 [H, W, 1 or 3] (EXIF rotation applied, alpha/palette -> RGB).

  16-bit grayscale (PIL modes "I;16*", and "I" as older Pillow opens 16-bit PNGs) is scaled by
  255/65535: PIL's own convert would clip every value above 255 to white.
  """
  try:
    with Image.open(path) as img:
      img = ImageOps.exif_transpose(img)
      if img.mode.startswith("I"):
        wide = np.asarray(img).astype(np.float64)
        x = np.rint(np.clip(wide, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
      else:
        img = img if img.mode in ("L", "RGB") else img.convert("RGB")
        x = np.asarray(img)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{path}: cannot decode image ({e}); fix or remove the file") from None
  return x[..., None] if x.ndim == 2 else x


class ImageFiles:
  """Image files decoded with PIL on access."""

  def __init__(self, files: list[str], labels: list[int]):
    self.files, self.labels = files, labels

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    return {"image": decode_image(self.files[index]), "label": self.labels[index]}


class VideoClips:
  """Clips of video files: non-overlapping slots (path, first frame, room) of a clip's span each.

  A record names its slot ({"video_file", "start", "room", "label"}); transforms.prepare decodes
  it (`video_files.decode_clip`), in train from a random start up to `room` frames later (the
  frames after the slot, at most a span less one), so any frame that leaves the video room for a
  clip can start one, and in eval at the slot's start.
  """

  def __init__(self, clips: list[tuple[str, int, int]], labels: list[int]):
    self.clips, self.labels = clips, labels

  def __len__(self) -> int:
    return len(self.clips)

  def __getitem__(self, index: int) -> dict:
    path, start, room = self.clips[index]
    return {"video_file": path, "start": start, "room": room, "label": self.labels[index]}


class TfdsRecords:
  """A tfds ArrayRecord data source; features[image_key] is an image or a list of frames.

  indices: the records it holds (default: all), e.g. an evenly spaced eval_size of them.
  min_frames: a video record with fewer frames is a DataError naming the record.
  """

  def __init__(self, source, image_key: str, label_key: str | None, *,
               indices: np.ndarray | None = None, min_frames: int = 1):
    self.source, self.image_key, self.label_key = source, image_key, label_key
    self.indices, self.min_frames = indices, min_frames

  def __len__(self) -> int:
    return len(self.source) if self.indices is None else len(self.indices)

  def __getitem__(self, index: int) -> dict:
    if self.indices is not None:
      index = int(self.indices[index])
    record = self.source[index]
    x = record[self.image_key]
    x = np.stack(x) if isinstance(x, (list, tuple)) else np.asarray(x)
    if x.ndim == 2:  # A grayscale image stored without a channel axis.
      x = x[..., None]
    if x.ndim == 4 and len(x) < self.min_frames:
      raise DataError(f"tfds record {index} ({self.image_key}) has {len(x)} frames; a clip "
                      f"needs {self.min_frames} (data.frames, data.frame_stride): lower those, "
                      "or rebuild the dataset without videos that short")
    label = int(record[self.label_key]) if self.label_key else 0
    return {"video" if x.ndim == 4 else "image": x, "label": label}


def _warn_bad(path: str, bad: list[str], what: str) -> None:
  if bad:
    logging.warning("data.path=%s: %d unreadable %s file(s) are skipped, e.g. %s", path, len(bad),
                    what, bad[:_MAX_LISTED])


def _list_files(path: str, kind: str) -> list[str]:
  exts = IMAGE_EXTS if kind == "image" else VIDEO_EXTS
  if not os.path.isdir(path):
    raise DataError(f"data.path={path}: no such folder; point data.path at a folder of {kind}s")
  files, seen = [], set()
  for root, dirs, names in os.walk(path, followlinks=True):  # Class folders may be links.
    # Sorted: os.walk order is the file system's, sorting makes splits reproducible. Hidden
    # folders and files (.ipynb_checkpoints, ._x.jpg) are no data. A folder reached again (a link
    # to one above it) is walked once.
    seen.add(os.path.realpath(root))
    dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                     and os.path.realpath(os.path.join(root, d)) not in seen)
    files += [os.path.join(root, n) for n in sorted(names)
              if n.lower().endswith(exts) and not n.startswith(".")]
  if not files:
    raise DataError(f"data.path={path}: folder has no {kind}s ({'/'.join(exts)}); "
                    f"point data.path at a folder of {kind}s")
  return files


def _check_image(path: str) -> None:
  """Raises if `path` is not a whole image: PIL's verify, plus a full decode of a JPEG (or MPO)
  with no end-of-image marker near its end or of a BMP, whose truncation verify does not see."""
  with Image.open(path) as img:
    fmt = img.format
    img.verify()
  if fmt in ("JPEG", "MPO"):  # MPO: a JPEG with more frames (phones, stereo cameras).
    with open(path, "rb") as fh:
      fh.seek(max(0, os.path.getsize(path) - 1024))
      if b"\xff\xd9" in fh.read():
        return
  elif fmt != "BMP":
    return
  with Image.open(path) as img:
    img.load()


def scan_folder(path: str, kind: str = "image") -> tuple[list[str], list[str]]:
  """(readable files, unreadable files) under `path`, recursively, in sorted order.

  Checks every header (PIL open + verify, or PyAV open + a frame count by demuxing), and decodes a
  JPEG that lacks its end marker (truncated) and a BMP in full: about 0.1-1 ms per image and a few
  ms per video, so minutes for ImageNet-sized folders; use tfds for those. Unreadable files are
  logged with a count; raises DataError when none is readable.
  """
  if kind not in ("image", "video"):
    raise ConfigError(f"scan_folder kind={kind!r} must be 'image' or 'video'")
  good, bad = [], []
  for f in _list_files(path, kind):
    try:
      if kind == "image":
        _check_image(f)
      elif count_frames(f) < 1:
        raise DataError(f"{f}: no frames")
      good.append(f)
    except Exception:  # pylint: disable=broad-except
      bad.append(f)
  _warn_bad(path, bad, kind)
  if not good:
    raise DataError(f"data.path={path}: none of its {len(bad)} {kind} files can be decoded, e.g. "
                    f"{bad[:_MAX_LISTED]}; replace them with readable files")
  return good, bad


def _class_names(folder: str, kind: str) -> list[str] | None:
  """The class folders of `folder`: its top sub-folders that hold `kind` files, sorted (an empty
  or hidden folder is no class); None when files sit at its top (not a tree of classes)."""
  tops = {os.path.relpath(f, folder).split(os.sep)[0] for f in _list_files(folder, kind)}
  if any(os.path.isfile(os.path.join(folder, t)) for t in tops):
    return None
  return sorted(tops)


def _folder_labels(root: str, files: list[str], classes: list[str] | None = None,
                   classes_root: str = "") -> list[int]:
  """Label = rank of a file's top sub-folder name among `classes` (default: the sub-folders
  holding `files`) when every file sits in one, else 0 for all.

  classes: those of the train folder (`classes_root`) of a data.path='.../{split}' layout, so both
  splits share one class index (an eval folder lacking a class would otherwise shift the labels
  after it).
  """
  tops = [os.path.relpath(f, root).split(os.sep)[0] for f in files]
  at_root = sum(os.path.isfile(os.path.join(root, t)) for t in tops)
  if at_root:
    if at_root < len(files):
      logging.warning("data.path=%s: %d of its %d files sit at its top, beside class folders, so "
                      "every label is 0; move them into a class folder for class labels", root,
                      at_root, len(files))
    return [0] * len(files)
  index = {c: i for i, c in enumerate(sorted(set(tops)) if classes is None else classes)}
  if unknown := sorted(set(tops) - set(index)):
    raise DataError(f"{root}: class folders {unknown[:_MAX_LISTED]} are not in the train folder "
                    f"{classes_root}, so they have no label; the splits must share their classes")
  return [index[t] for t in tops]


def _evenly_spaced(n: int, k: int) -> np.ndarray:
  """k of range(n) spread over it, not the first k: a folder is sorted by class (and a tfds split
  may be), so a prefix would hold only the first few classes."""
  return np.linspace(0, n, k, endpoint=False).astype(int)


def _folder_split(cfg, split: str, kind: str) -> tuple[str, list[str], list[int]]:
  """Folder, files, labels of `split`: data.path with "{split}", or a held-out 10% of one folder."""
  if "{split}" in cfg.path:
    field = "train_split" if split == "train" else "eval_split"
    folder = cfg.path.format(split=cfg[field])
    if not os.path.isdir(folder):
      raise DataError(f"data.path={cfg.path} with data.{field}={cfg[field]!r}: no such folder "
                      f"{folder}; set data.{field} to the name of the {split} folder")
    files, _ = scan_folder(folder, kind)
    train_folder = cfg.path.format(split=cfg.train_split)  # Its class folders index both splits.
    classes = _class_names(train_folder, kind) if os.path.isdir(train_folder) else None
    labels = _folder_labels(folder, files, classes, classes_root=train_folder)
    if split == "eval" and 0 < cfg.eval_size < len(files):
      idx = _evenly_spaced(len(files), cfg.eval_size)
      files, labels = [files[i] for i in idx], [labels[i] for i in idx]
    return folder, files, labels
  files, _ = scan_folder(cfg.path, kind)
  if len(files) < 2:
    raise DataError(f"data.path={cfg.path}: {len(files)} readable {kind} file; holding out an eval "
                    "set needs >= 2, or give separate folders with data.path='.../{split}'")
  labels = _folder_labels(cfg.path, files)
  if cfg.get("folder_split", config_lib.ADDED_FIELDS["data.folder_split"]) == "hash":
    idx = hashed_split_indices([os.path.relpath(f, cfg.path) for f in files], split, cfg.eval_size)
  else:
    idx = bundled.split_indices(len(files), split, cfg.eval_size)
  return cfg.path, [files[i] for i in idx], [labels[i] for i in idx]


def hashed_split_indices(names: list[str], split: str, eval_size: int = 0) -> np.ndarray:
  """Indices of `split` among `names` (paths under the folder), ascending: eval holds the names
  whose hash falls in its first `bundled.EVAL_FRACTION` (at least one name, never all), or the
  `eval_size` lowest hashes. By default a name's side depends on the name alone, so files added to
  or removed from the folder move no other file across. With eval_size it depends on how its hash
  ranks: an added file can push an eval file into train, a removed eval file pull a train file
  into eval."""
  n = len(names)
  bundled.check_eval_size(n, eval_size, eval_size)
  digest = lambda name: hashlib.sha256(name.replace(os.sep, "/").encode()).digest()[:8]
  rank = np.array([int.from_bytes(digest(name), "big") for name in names], np.uint64)
  order = np.argsort(rank, kind="stable")
  if eval_size:
    n_eval = eval_size
  else:
    below = rank < np.uint64(int(bundled.EVAL_FRACTION * 2**64))
    n_eval = min(max(int(below.sum()), 1), n - 1)
  held_out = np.zeros(n, bool)
  held_out[order[:n_eval]] = True
  return np.flatnonzero(held_out if split == "eval" else ~held_out)


def _video_folder(cfg, split: str) -> VideoClips:
  folder, files, labels = _folder_split(cfg, split, "video")
  span = (cfg.frames - 1) * cfg.frame_stride + 1
  clips, clip_labels, short = [], [], []
  for f, label in zip(files, labels):
    n = count_frames(f)
    if n < span:
      short.append(f"{f} ({n} frames)")
    starts = range(0, n - span + 1, span)
    clips += [(f, s, min(span - 1, n - span - s)) for s in starts]
    clip_labels += [label] * len(starts)
  if short:
    logging.warning("data.path=%s: %d video(s) shorter than the %d frames a clip needs are "
                    "skipped, e.g. %s", folder, len(short), span, short[:_MAX_LISTED])
  if not clips:
    raise DataError(
        f"data.path={folder}: every {split} video is shorter than data.frames={cfg.frames} at "
        f"data.frame_stride={cfg.frame_stride} (= {span} frames), e.g. {short[:_MAX_LISTED]}; "
        "lower data.frames or data.frame_stride, or add longer videos")
  return VideoClips(clips, clip_labels)


def _tfds_dir(cfg) -> str:
  """The data_dir holding cfg.tfds_name ("name[/config][:version]") prepared as ArrayRecord.

  Checked on disk first: tfds.data_source's own errors for a missing dataset are misleading.
  """
  data_dir = os.path.expanduser(
      cfg.path or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  name, _, version = cfg.tfds_name.partition(":")
  # name/version/ or, for builders with configs, name/config/version/.
  infos = glob.glob(os.path.join(data_dir, name, "**", "dataset_info.json"), recursive=True)
  version_dirs = [os.path.dirname(f) for f in infos
                  if not version or os.path.basename(os.path.dirname(f)) == version]
  if not version_dirs:
    raise DataError(
        f"tfds dataset {cfg.tfds_name!r} is not prepared at {data_dir}: prepare it with "
        f"`tfds build {name} --data_dir={data_dir} --file_format=array_record` or point data.path "
        "at the data_dir that holds it")
  if not any(glob.glob(os.path.join(d, "*.array_record-*")) for d in version_dirs):
    raise DataError(
        f"tfds dataset {cfg.tfds_name!r} at {data_dir} has no ArrayRecord files (random access "
        f"needs them); rebuild with `tfds build {name} --data_dir={data_dir} "
        "--file_format=array_record`")
  return data_dir


def _tfds(cfg, split: str) -> TfdsRecords:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = _tfds_dir(cfg)
  tfds_split = cfg.train_split if split == "train" else cfg.eval_split
  try:
    source = tfds.data_source(cfg.tfds_name, split=tfds_split, data_dir=data_dir, download=False)
  except ModuleNotFoundError as e:
    raise DataError(
        f"tfds dataset {cfg.tfds_name!r} needs {e.name} to build its features (tfds.features.Video "
        "does); pip install tensorflow-cpu, or convert the videos to a data.name='video_folder'"
    ) from None
  except ValueError as e:
    if "split" not in str(e).lower():
      raise DataError(f"tfds dataset {cfg.tfds_name!r} at {data_dir}: {e}") from None
    field = "data.train_split" if split == "train" else "data.eval_split"
    raise ConfigError(f"{field}={tfds_split!r}: {e}; set {field} to one of them") from None
  features = source.dataset_info.features
  if cfg.image_key not in features:
    raise ConfigError(f"data.image_key={cfg.image_key!r} is not a feature of {cfg.tfds_name!r}; "
                      f"choose one of {list(features.keys())}")
  shape = getattr(features[cfg.image_key], "shape", ())
  if cfg.frames > 1 and len(shape) == 3:  # [H, W, C]: an image feature, not a clip's [T, H, W, C].
    raise ConfigError(f"data.frames={cfg.frames} reads clips, but feature {cfg.image_key!r} of "
                      f"{cfg.tfds_name!r} is an image of shape {shape}; set data.frames=1 or "
                      f"data.image_key to a video feature")
  indices = None
  if split == "eval" and 0 < cfg.eval_size < len(source):
    indices = _evenly_spaced(len(source), cfg.eval_size)
  return TfdsRecords(source, cfg.image_key, "label" if "label" in features else None,
                     indices=indices, min_frames=(cfg.frames - 1) * cfg.frame_stride + 1)


def _photos_size(cfg, split: str) -> int:
  if split == "eval":
    return cfg.eval_size or PHOTO_EVAL_CROPS
  return PHOTO_CROPS_PER_PHOTO * bundled.num_photos("train")


def _clips_size(cfg, split: str) -> int:
  return cfg.eval_size if split == "eval" and cfg.eval_size else video.NUM_CLIPS[split]


def make_source(cfg, split: str):
  """The random-access source of `split` ("train" or "eval") for a validated data config."""
  name, res, ch = cfg.name, cfg.res, cfg.channels
  if name == "mnist":
    return ArraySource(*bundled.mnist_resized(split, cfg.eval_size, res, ch))
  if name == "digits":
    return ArraySource(*bundled.digits_resized(split, cfg.eval_size, res, ch))
  if name == "lfw":
    return ArraySource(*bundled.lfw_resized(cfg.path, split, cfg.eval_size, res, ch))
  if name == "photos":
    return PhotoCrops(split, _photos_size(cfg, split), res)
  if name == "moving_mnist":
    if res < 8:
      raise ConfigError(f"data.res={res}: moving_mnist needs res >= 8 for digits to move")
    return video.MovingMnist(split, _clips_size(cfg, split), res, cfg.frames, cfg.frame_stride)
  if name == "photo_pans":
    return video.PhotoPans(split, _clips_size(cfg, split), res, cfg.frames, cfg.frame_stride)
  if name == "image_folder":
    _, files, labels = _folder_split(cfg, split, "image")
    return ImageFiles(files, labels)
  if name == "video_folder":
    return _video_folder(cfg, split)
  if name == "tfds":
    return _tfds(cfg, split)
  raise ConfigError(f"data.name={name!r} has no source")


def num_examples(cfg, split: str) -> int:
  """Examples in `split` over all processes, without decoding pixels where the size is known."""
  if cfg.name == "mnist":
    return len(bundled.split_indices(bundled.mnist_size(), split, cfg.eval_size))
  if cfg.name == "digits":
    return len(bundled.split_indices(bundled.DIGITS_SIZE, split, cfg.eval_size))
  if cfg.name == "photos":
    return _photos_size(cfg, split)
  if cfg.name in ("moving_mnist", "photo_pans"):
    return _clips_size(cfg, split)
  return len(make_source(cfg, split))
