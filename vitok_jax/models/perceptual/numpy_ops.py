"""Plain-numpy layers in PyTorch's conventions: the torch-free reference that the ports are checked against.

Each perceptual network (LPIPS-VGG, FID Inception, I3D) has a numpy forward in the tests that walks a
*PyTorch-named state dict* with these ops, while the JAX module runs the converted params; agreement
checks the architecture and the converter together. Layouts: activations channels-last
[N, *spatial, C]; weights as PyTorch stores them, [O, I, *kernel]. float64 throughout.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np


def _taps(kernel: Sequence[int]):
  return itertools.product(*(range(k) for k in kernel))


def _window(x, offset, stride, out_shape):
  """x[:, o0::s0, o1::s1, ...] cut to out_shape along the spatial axes."""
  index = (slice(None),) + tuple(slice(o, o + s * (n - 1) + 1, s)
                                 for o, s, n in zip(offset, stride, out_shape))
  return x[index]


def _out_shape(spatial, kernel, stride):
  return tuple((n - k) // s + 1 for n, k, s in zip(spatial, kernel, stride))


def pad(x, padding: Sequence[tuple[int, int]], value: float = 0.0):
  """Pads the spatial axes of [N, *spatial, C] by (before, after) pairs."""
  return np.pad(x, [(0, 0), *padding, (0, 0)], constant_values=value)


def conv(x, weight, bias=None, stride=None, padding=None):
  """N-d convolution (cross-correlation, as torch): x [N, *S, I], weight [O, I, *K] -> [N, *S', O]."""
  kernel = weight.shape[2:]
  stride = stride or (1,) * len(kernel)
  if padding is not None:
    x = pad(x, padding)
  out_shape = _out_shape(x.shape[1:-1], kernel, stride)
  out = np.zeros((x.shape[0], *out_shape, weight.shape[0]), np.float64)
  for tap in _taps(kernel):
    out += _window(x, tap, stride, out_shape) @ weight[(slice(None), slice(None), *tap)].T
  if bias is not None:
    out += bias
  return out


def max_pool(x, kernel, stride, padding=None):
  """Max pool; padded cells never win (torch pads max-pooling with -inf)."""
  if padding is not None:
    x = pad(x, padding, -np.inf)
  out_shape = _out_shape(x.shape[1:-1], kernel, stride)
  return np.max([_window(x, tap, stride, out_shape) for tap in _taps(kernel)], axis=0)


def avg_pool(x, kernel, stride, padding=None, count_include_pad: bool = True):
  """Average pool; with count_include_pad=False each cell divides by its number of real inputs."""
  ones = np.ones((1, *x.shape[1:-1], 1))
  if padding is not None:
    x, ones = pad(x, padding), pad(ones, padding)
  out_shape = _out_shape(x.shape[1:-1], kernel, stride)
  total = sum(_window(x, tap, stride, out_shape) for tap in _taps(kernel))
  if count_include_pad:
    return total / math.prod(kernel)
  return total / sum(_window(ones, tap, stride, out_shape) for tap in _taps(kernel))


def batch_norm(x, state: dict, prefix: str, eps: float):
  """Inference BatchNorm from a state dict's {prefix}.weight/bias/running_mean/running_var."""
  scale = state[f"{prefix}.weight"] / np.sqrt(state[f"{prefix}.running_var"] + eps)
  return (x - state[f"{prefix}.running_mean"]) * scale + state[f"{prefix}.bias"]


def relu(x):
  return np.maximum(x, 0.0)


def resize_linear(x, out_spatial: Sequence[int]):
  """torch interpolate(mode='bilinear'/'trilinear', align_corners=False, antialias=False).

  Per axis: source coordinate (i + 0.5)·in/out − 0.5, clamped below at 0; the two taps floor and
  floor+1 (clamped to the last pixel) are mixed linearly. Applied separably over the spatial axes.
  """
  for axis, n_out in enumerate(out_spatial, start=1):
    n_in = x.shape[axis]
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    x = np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac
  return x
