"""InceptionV3 as used by FID: pytorch-fid's "FID Inception" (the TF 2015-12-05 graph), not torchvision's.

It differs from torchvision's InceptionV3 in three places that change FID: the 3×3 average pools of the
A, C and first E blocks exclude padding from the mean (count_include_pad=False), the last E block
max-pools instead, and the classifier has 1008 classes. BatchNorm eps is 1e-3, convs have no bias.

Input: pixels in [-1, 1] (our convention) -> [0, 1], bilinear resize to 299×299 (half-pixel
centres, no antialias, as torch's interpolate) -> 2x − 1. Outputs: the 2048-d pool3 features
(FID) and 1008 logits; the Inception Score takes them without fc's bias ("logits_unbiased"), as
the original IS code does. Module names are the PyTorch ones ("Mixed_5b/branch1x1/conv"),
so `tools/convert_inception.py` maps pt_inception-2015-12-05-6726825d.pth name for name.
Shape suffixes: B batch, H/W spatial, C channels.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitok_jax.models.perceptual import weights

RESOLUTION = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
BN_EPS = 1e-3
HOW_TO_CONVERT = ("python tools/convert_inception.py --pth pt_inception-2015-12-05-6726825d.pth "
                  "--out inception_fid.npz")


def _pads(padding) -> tuple[tuple[int, int], ...]:
  """torch's symmetric `padding` (int or per-axis) as flax's ((lo, hi), (lo, hi))."""
  padding = (padding, padding) if isinstance(padding, int) else padding
  return tuple((p, p) for p in padding)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU."""
  features: int
  kernel: Sequence[int] | int = 1
  stride: int = 1
  padding: Sequence[int] | int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    kernel = (self.kernel, self.kernel) if isinstance(self.kernel, int) else tuple(self.kernel)
    x_BHWC = nn.Conv(self.features, kernel, strides=self.stride, padding=_pads(self.padding),
                     use_bias=False, dtype=self.dtype, name="conv")(x_BHWC)
    x_BHWC = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype,
                          name="bn")(x_BHWC)
    return nn.relu(x_BHWC)


def _avg_pool_3x3_excluding_padding(x_BHWC):
  """TF's SAME 3×3/1 average: border cells average only their real neighbours."""
  return nn.avg_pool(x_BHWC, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x_BHWC, stride: int = 1):
  padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x_BHWC, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nn.Module):  # Mixed_5b/c/d: 35×35.
  pool_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(conv(48, name="branch5x5_1")(x))
    b3 = conv(64, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(conv(96, 3, padding=1, name="branch3x3dbl_2")(b3))
    bp = conv(self.pool_features, name="branch_pool")(_avg_pool_3x3_excluding_padding(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a: 35 -> 17.
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    b3 = conv(384, 3, stride=2, name="branch3x3")(x)
    bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(conv(64, name="branch3x3dbl_1")(x))
    bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, stride=2)], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b..e: 17×17 with factorised 7×7 convs.
  channels_7x7: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(192, **col, name="branch7x7_3")(conv(c7, **row, name="branch7x7_2")(b7))
    bd = conv(c7, name="branch7x7dbl_1")(x)
    for i, (width, shape) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)], start=2):
      bd = conv(width, **shape, name=f"branch7x7dbl_{i}")(bd)
    bp = conv(192, name="branch_pool")(_avg_pool_3x3_excluding_padding(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a: 17 -> 8.
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    b3 = conv(320, 3, stride=2, name="branch3x3_2")(conv(192, name="branch3x3_1")(x))
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, stride=2)], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b (average pool, padding excluded), Mixed_7c (max pool).
  max_pool: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = conv(320, name="branch1x1")(x)
    b3 = conv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, **row, name="branch3x3_2a")(b3),
                          conv(384, **col, name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(conv(448, name="branch3x3dbl_1")(x))
    bd = jnp.concatenate([conv(384, **row, name="branch3x3dbl_3a")(bd),
                          conv(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3_excluding_padding(x)
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Network input (already resized and in [-1, 1]) [B, H, W, 3] -> {"pool": [B, 2048],
  "logits": [B, 1008], "logits_unbiased": [B, 1008] (no fc bias: the Inception Score's)}.

  Any H, W >= 75 runs (the net is convolutional up to the global average pool); FID uses 299.
  """
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x_BHWC)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, self.dtype, name=name)(x)
    x = InceptionB(self.dtype, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, self.dtype, name=name)(x)
    x = InceptionD(self.dtype, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, dtype=self.dtype, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, dtype=self.dtype, name="Mixed_7c")(x)
    pool_BC = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    fc = nn.Dense(NUM_CLASSES, name="fc")
    logits = fc(pool_BC)
    # The Inception Score's logits: pool3 @ W without fc's bias, as the original IS code
    # (matmul with softmax/logits/MatMul's weight) and torch-fidelity's "logits_unbiased".
    unbiased = jnp.matmul(pool_BC, fc.variables["params"]["kernel"],
                          precision=jax.lax.Precision.HIGHEST)
    return {"pool": pool_BC, "logits": logits, "logits_unbiased": unbiased}


def preprocess(x_BHWC, resolution: int = RESOLUTION):
  """Our pixels in [-1, 1] (any size; 1 or 3 channels) -> the network's input [B, 299, 299, 3].

  Values are clipped to [-1, 1] first (what saving the images would do), mapped to [0, 1], resized
  bilinearly without antialias (torch's interpolate(..., align_corners=False)), then mapped by 2x − 1.
  """
  x = (jnp.clip(x_BHWC.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
  if x.shape[-1] == 1:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
  if x.shape[1:3] != (resolution, resolution):
    x = jax.image.resize(x, (x.shape[0], resolution, resolution, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


def init_variables(rng, resolution: int = 75) -> dict:
  """Random variables {"params", "batch_stats"} (shapes do not depend on the resolution)."""
  x = jnp.zeros((1, resolution, resolution, 3))
  return jax.jit(FIDInceptionV3().init)(rng, x)


def variables_from_torch(state) -> dict:
  """Our variables from pytorch-fid's state dict (pt_inception-2015-12-05-6726825d.pth)."""
  bns = {k.rsplit(".", 1)[0] for k in state if k.endswith("running_mean")}
  return weights.variables_from_torch(state, bns)


def load_variables(weights_path: str) -> dict:
  variables = weights.load(weights_path, "FID Inception weights", HOW_TO_CONVERT)
  weights.check_shapes(variables, jax.eval_shape(init_variables, jax.random.key(0)),
                       "FID Inception weights")
  return variables


def make_feature_fn(variables, dtype=jnp.float32):
  """Jitted pixels [B, H, W, C] in [-1, 1] -> {"pool", "logits", "logits_unbiased"} (float32)."""
  net = FIDInceptionV3(dtype)

  @jax.jit
  def features(variables, x_BHWC):
    return net.apply(variables, preprocess(x_BHWC).astype(dtype))

  return functools.partial(features, variables)
