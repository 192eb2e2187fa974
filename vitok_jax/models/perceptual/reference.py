"""Reference backends for checking the perceptual-network ports (used by tests and converters).

A reference forward (in the tests) is written once against a small `ops` interface (conv, bn,
pools, cat) reading a *PyTorch-named* state dict; `NumpyOps` runs it in float64 numpy (always), `TorchOps` in PyTorch (when
installed). The JAX modules run the converted weights, so agreement checks the port and the converter.
"""
import jax
import numpy as np

from vitok_jax.models.perceptual import numpy_ops as npo


def random_variables(init_fn, seed=0):
  """Random variables for the shapes of `init_fn`'s output, drawn by numpy (fast, no XLA compile).

  Kernels are He-normal, biases small, BatchNorm scale ~1 and running variance positive, so
  activations stay O(1) through deep nets and every statistic matters.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = np.prod(leaf.shape[:-1])
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
    elif "'var'" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif "scale" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # Biases and running means.
      value = rng.normal(size=leaf.shape) * 0.1
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init_fn, jax.random.key(seed)))


class NumpyOps:
  """Channels-last float64 numpy."""

  def __init__(self, state, bn_eps):
    self.state = {k: np.asarray(v, np.float64) for k, v in state.items()}
    self.eps = bn_eps

  def input(self, x):
    return np.asarray(x, np.float64)

  def output(self, x):
    return np.asarray(x)

  def conv(self, x, name, stride=1, padding=0, bias=False):
    w = self.state[f"{name}.weight"]
    nd = w.ndim - 2
    stride = (stride,) * nd if isinstance(stride, int) else stride
    padding = (padding,) * nd if isinstance(padding, int) else padding
    pads = [p if isinstance(p, tuple) else (p, p) for p in padding]
    return npo.conv(x, w, self.state[f"{name}.bias"] if bias else None, stride, pads)

  def bn(self, x, name):
    return npo.batch_norm(x, self.state, name, self.eps)

  relu = staticmethod(npo.relu)

  def max_pool(self, x, kernel, stride, padding=0):
    pads = [p if isinstance(p, tuple) else (p, p) for p in _per_axis(padding, len(kernel))]
    return npo.max_pool(x, kernel, stride, pads)

  def avg_pool(self, x, kernel, stride, padding=0, count_include_pad=True):
    pads = [(p, p) for p in _per_axis(padding, len(kernel))]
    return npo.avg_pool(x, kernel, stride, pads, count_include_pad)

  def cat(self, xs):
    return np.concatenate(xs, axis=-1)

  def mean_spatial(self, x):
    return x.mean(axis=tuple(range(1, x.ndim - 1)))

  def linear(self, x, name):
    return x @ self.state[f"{name}.weight"].T + self.state[f"{name}.bias"]


def _per_axis(value, n):
  return (value,) * n if isinstance(value, int) else tuple(value)


class TorchOps:
  """PyTorch (channels-first) float64, with torch's own layers."""

  def __init__(self, state, bn_eps):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.f = torch.nn.functional
    self.state = {k: torch.from_numpy(np.array(v, np.float64)) for k, v in state.items()}
    self.eps = bn_eps

  def input(self, x):
    x = self.torch.from_numpy(np.asarray(x, np.float64))
    return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))

  def output(self, x):
    if x.ndim > 2:
      x = x.permute(0, *range(2, x.ndim), 1)
    return x.numpy()

  def conv(self, x, name, stride=1, padding=0, bias=False):
    w = self.state[f"{name}.weight"]
    conv = {4: self.f.conv2d, 5: self.f.conv3d}[w.ndim]
    b = self.state[f"{name}.bias"] if bias else None
    if padding and isinstance(padding, (tuple, list)) and isinstance(padding[0], tuple):
      # Asymmetric (before, after) per axis: F.pad takes the last axis first.
      x = self.f.pad(x, [p for pair in reversed(padding) for p in pair])
      padding = 0
    return conv(x, w, b, stride=stride, padding=padding)

  def bn(self, x, name):
    s = self.state
    return self.f.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"],
                             s[f"{name}.weight"], s[f"{name}.bias"], training=False, eps=self.eps)

  def relu(self, x):
    return self.f.relu(x)

  def max_pool(self, x, kernel, stride, padding=0):
    pool = {2: self.f.max_pool2d, 3: self.f.max_pool3d}[len(kernel)]
    padding = _per_axis(padding, len(kernel))
    if any(isinstance(p, tuple) for p in padding):
      pairs = [p if isinstance(p, tuple) else (p, p) for p in padding]
      x = self.f.pad(x, [p for pair in reversed(pairs) for p in pair], value=-np.inf)
      padding = 0
    return pool(x, kernel, stride, padding=padding)

  def avg_pool(self, x, kernel, stride, padding=0, count_include_pad=True):
    pool = {2: self.f.avg_pool2d, 3: self.f.avg_pool3d}[len(kernel)]
    return pool(x, kernel, stride, padding=padding, count_include_pad=count_include_pad)

  def cat(self, xs):
    return self.torch.cat(xs, dim=1)

  def mean_spatial(self, x):
    return x.mean(dim=tuple(range(2, x.ndim)))

  def linear(self, x, name):
    return self.f.linear(x, self.state[f"{name}.weight"], self.state[f"{name}.bias"])
