"""Multi-scale residual quantisation: VAR (shared VQ codebook + φ refiners) and Infinity (BSQ).

Per scale k of a schedule s_1 < … < s_K = h (latent grid h × h):
  r_k = area_down(f − f_hat_{k−1}, s_k) -> quantise -> up(code, h) -> [φ_k] -> f_hat_k.
The next-scale transformer input is f_hat_k resized to s_{k+1}: `area` in VAR, but Infinity's
`z_interplote_up` (trilinear on [B, C, 1, h, w], i.e. bilinear, align_corners=False) in Infinity
(`ResidualQuantizer.input_resize`).
The resizes are torch's: `area` (adaptive average pooling, overlapping windows when s ∤ h),
`bicubic` (Keys A = −0.75, half-pixel centres, clamped taps, no antialias) and `bilinear`
(align_corners=False, no antialias), each as a [out, in] matrix applied separably.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax.errors import ConfigError
from vitok_jax.models import quantizers

# Published schedules (side lengths of the square token maps).
SCHEDULES = {
    "var": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),                         # VAR 256p: 680 tokens.
    "var512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),                     # VAR 512p: 2240 tokens.
    "infinity": (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64),      # Infinity 1024p.
}


def scale_schedule(name: str, size: int) -> tuple[int, ...]:
  """The published schedule's sides below `size`, then `size` itself: exact at the size it was
  published for ("var" at 16, "var512" at 32, "infinity" at 64). "var" at 32 is (1, …, 16, 32), not
  VAR's 512p schedule: that is "var512" (bottleneck msvq512). The schedule follows from the
  bottleneck's name in a run's config, so a run keeps the one it trained with."""
  if name not in SCHEDULES:
    raise ConfigError(f"scale schedule {name!r} is unknown; use one of {list(SCHEDULES)}")
  return tuple(s for s in SCHEDULES[name] if s < size) + (size,)


def token_count(schedule: Sequence[int]) -> int:
  return sum(s * s for s in schedule)


@functools.lru_cache(maxsize=None)
def area_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] float32: torch `area` = adaptive average pool, rows [⌊i·H/h⌋, ⌈(i+1)·H/h⌉)."""
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m.astype(np.float32)


def _cubic_weights(t: float, a: float) -> list[float]:
  """Keys cubic weights of the taps at offsets −1, 0, 1, 2 for fractional position t."""
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1            # |x| <= 1.
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a      # 1 < |x| < 2.
  return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@functools.lru_cache(maxsize=None)
def bicubic_matrix(out_size: int, in_size: int, a: float = -0.75) -> np.ndarray:
  """[out, in] float32: torch `bicubic`, align_corners=False (A = −0.75, taps clamped)."""
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5     # torch does not clamp the cubic source index.
    x0 = math.floor(src)
    for offset, w in zip(range(-1, 3), _cubic_weights(src - x0, a)):
      m[i, min(max(x0 + offset, 0), in_size - 1)] += w
  return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] float32: torch `bilinear` / `trilinear`, align_corners=False, no antialias."""
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    src = max((i + 0.5) * scale - 0.5, 0.0)   # torch clamps the linear source index at 0.
    x0 = min(int(math.floor(src)), in_size - 1)
    x1 = min(x0 + 1, in_size - 1)
    lam = src - x0
    m[i, x0] += 1.0 - lam
    m[i, x1] += lam
  return m.astype(np.float32)


RESIZES = {"area": area_matrix, "bicubic": bicubic_matrix, "bilinear": bilinear_matrix}


def resize(x_BHWC, size: tuple[int, int], mode: str):
  """Resizes [B, H, W, C] to size (h, w) with a torch `interpolate` mode (identity if same size)."""
  if tuple(size) == x_BHWC.shape[1:3]:
    return x_BHWC
  mh = jnp.asarray(RESIZES[mode](size[0], x_BHWC.shape[1]))
  mw = jnp.asarray(RESIZES[mode](size[1], x_BHWC.shape[2]))
  return jnp.einsum("hH,wW,BHWC->BhwC", mh, mw, x_BHWC, precision="highest")


def input_resize_mode(quantizer: str, upsample: str, input_resize: str = "") -> str:
  """Resize mode of the next-scale input: `input_resize`, or if "" VAR's "area" (quantizer "vq")
  or Infinity's z_interplote_up = the code `upsample` mode (quantizer "bsq": "bilinear")."""
  if input_resize:
    return input_resize
  return "area" if quantizer == "vq" else upsample


def phi_index(k: int, num_scales: int, num_phi: int = 4) -> int:
  """VAR's PhiPartiallyShared: the φ whose tick is nearest k/(K−1); the n = num_phi ticks are
  linspace(1/3/n, 1−1/3/n, n) for n = 4 (VAR's setting) and linspace(1/2/n, 1−1/2/n, n) otherwise.

  Computed in float64 like numpy in VAR (ties exist and argmin takes the first).
  """
  margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
  ticks = np.linspace(margin, 1 - margin, num_phi)
  at = k / (num_scales - 1) if num_scales > 1 else 0.0
  return int(np.argmin(np.abs(ticks - at)))


class Phi(nn.Module):
  """VAR's φ refiner: (1 − r)·h + r·conv3×3(h)."""
  channels: int
  ratio: float = 0.5

  @nn.compact
  def __call__(self, h_BHWC):
    conv = nn.Conv(self.channels, (3, 3), padding="SAME", name="conv")(h_BHWC)
    return (1.0 - self.ratio) * h_BHWC + self.ratio * conv


class ResidualQuantizer(nn.Module):
  """Multi-scale residual quantiser on a square latent map [B, h, h, C].

  quantizer="vq": VAR (shared codebook of `codebook_size`, raw l2 lookup, bicubic up-sampling,
  `num_phi` shared φ). quantizer="bsq": Infinity (implicit 2^C codebook, bilinear up-sampling,
  no φ). Either way the residual passed on between scales is stop-gradient.

  input_resize: how f_hat is resized to the next scale for the transformer's input
  (`next_scale_input`, `teacher_inputs`); "" picks the family's rule: "area" for vq (VAR) and the
  `upsample` mode for bsq (Infinity resizes with z_interplote_up both ways: bilinear).

  __call__ returns (f_hat [B, h, h, C], codes: tuple of per-scale [B, s, s] int32 (vq) or
  [B, s, s, ceil(C/32)] uint32 (bsq), loss_terms, metrics).
  """
  channels: int
  quantizer: str = "vq"
  schedule: str = "var"
  codebook_size: int = 4096
  normalize: bool = False          # VAR looks up raw |z − e|² (no l2-normalisation).
  upsample: str = "bicubic"
  num_phi: int = 4                 # 0 disables the refiners.
  phi_ratio: float = 0.5
  inv_temperature: float = 100.0
  gamma: float = 1.0
  bsq_unit_gradient: bool = True   # Infinity's straight-through: gradient I to u, not I/√d.
  input_resize: str = ""           # "": "area" for vq (VAR), `upsample` for bsq (Infinity).
  impl: str = "auto"

  def setup(self):
    if self.quantizer not in ("vq", "bsq"):
      raise ConfigError(f"multi-scale quantizer={self.quantizer!r}; use 'vq' or 'bsq'")
    if self.num_phi < 0:
      raise ConfigError(f"ResidualQuantizer.num_phi={self.num_phi} must be >= 0 (0 = no φ)")
    for field in ("upsample", "input_resize"):
      mode = getattr(self, field)
      if mode and mode not in RESIZES:
        raise ConfigError(f"ResidualQuantizer.{field}={mode!r}; use one of {list(RESIZES)}"
                          + (" (or '' for the family's rule)" if field == "input_resize" else ""))
    if self.quantizer == "vq":
      self.vq = quantizers.VectorQuantizer(self.channels, self.codebook_size, self.normalize,
                                           impl=self.impl, name="vq")
    self.phis = [Phi(self.channels, self.phi_ratio, name=f"phi_{i}") for i in range(self.num_phi)]

  def scales(self, size: int) -> tuple[int, ...]:
    return scale_schedule(self.schedule, size)

  @property
  def next_input_resize(self) -> str:
    """The resize mode of the next-scale input: "area" (VAR) or `upsample` (Infinity)."""
    return input_resize_mode(self.quantizer, self.upsample, self.input_resize)

  def _refine(self, code_BsC, k: int, scales: Sequence[int]):
    """A scale-k code map -> its full-size contribution to f_hat."""
    h_BHWC = resize(code_BsC, (scales[-1], scales[-1]), self.upsample)
    if self.num_phi:
      h_BHWC = self.phis[phi_index(k, len(scales), self.num_phi)](h_BHWC)
    return h_BHWC

  def __call__(self, f_BHWC):
    f_BHWC = f_BHWC.astype(jnp.float32)
    scales = self.scales(f_BHWC.shape[1])
    f_hat, codes, commit, codebook, extra, metrics = 0.0, [], 0.0, 0.0, [], []
    for k, s in enumerate(scales):
      r_BsC = resize(f_BHWC - jax.lax.stop_gradient(f_hat), (s, s), "area")
      if self.quantizer == "vq":
        index, code_BsC = self.vq.nearest(r_BsC)
        codes.append(index)
      else:
        code_BsC, words, terms, bit_metrics = quantizers.bsq_quantize(
            r_BsC, inv_temperature=self.inv_temperature, gamma=self.gamma, impl=self.impl,
            unit_gradient=self.bsq_unit_gradient)
        codes.append(words)
        extra.append(terms)
        metrics.append(bit_metrics)
      f_hat = f_hat + self._refine(code_BsC, k, scales)
      if self.quantizer == "vq":
        # VAR: the loss is on the cumulative f_hat after every scale.
        commit += jnp.mean((jax.lax.stop_gradient(f_hat) - f_BHWC) ** 2)
        codebook += jnp.mean((f_hat - jax.lax.stop_gradient(f_BHWC)) ** 2)
    if self.quantizer == "vq":
      # Codes carry no gradient to the encoder: VAR's straight-through on the sum.
      f_hat = quantizers.straight_through(f_BHWC, f_hat)
      terms = {"commit": commit / len(scales), "codebook": codebook / len(scales)}
      flat = jnp.concatenate([c.reshape(-1) for c in codes])
      metrics = quantizers.code_usage_metrics(flat, self.codebook_size)
    else:
      # Infinity: the per-scale BSQ terms, averaged over scales (its STE reaches the encoder).
      terms = jax.tree.map(lambda *t: sum(t) / len(t), *extra)
      metrics = jax.tree.map(lambda *m: sum(m) / len(m), *metrics)
    return f_hat, tuple(codes), terms, metrics

  def decode_codes(self, codes: Sequence[jax.Array], size: int):
    """f_hat [B, size, size, C] from the codes of the first len(codes) scales (any prefix)."""
    scales = self.scales(size)
    f_hat = 0.0
    for k, code in enumerate(codes):
      if self.quantizer == "vq":
        code_BsC = self.vq.lookup(code)
      else:
        code_BsC = quantizers.bits_to_codes(quantizers.unpack_bits(code, self.channels))
      f_hat = f_hat + self._refine(code_BsC, k, scales)
    return f_hat

  # ------------------------------------------------------------------------------------------
  # Next-scale prediction inputs (VAR / Infinity transformers).

  def code_vectors(self, code):
    """One scale's codes -> code vectors [B, s, s, C].

    vq: int32 [B, s, s] -> codebook rows; bsq: uint32 words [B, s, s, W] -> ±1/√C from the bits.
    """
    if self.quantizer == "vq":
      return self.vq.lookup(code)
    return quantizers.bits_to_codes(quantizers.unpack_bits(code, self.channels))

  def next_scale_input(self, f_hat_BHWC, code, k: int, size: int):
    """One step of next-scale prediction: adds scale k's codes to f_hat, returns the next input.

    Args:
      f_hat_BHWC: cumulative f_hat of scales < k, float32 [B, size, size, C] (zeros for k = 0).
      code: scale k's codes (int32 [B, s_k, s_k] for vq, uint32 [B, s_k, s_k, W] for bsq).
      k: the scale index (static).
      size: latent side h (the last scale).
    Returns:
      (f_hat_BHWC with scale k added, inputs [B, s_{k+1}², C]): f_hat resized to scale k + 1 with
      `next_input_resize` (VAR: area; Infinity: bilinear), flattened row-major. For the last scale
      (k = K − 1), as in VAR, the second output is f_hat itself flattened ([B, size², C]).
    """
    scales = self.scales(size)
    if not 0 <= k < len(scales):
      raise ConfigError(f"scale index k={k} is outside the {len(scales)} scales {scales}")
    f_hat_BHWC = f_hat_BHWC + self._refine(self.code_vectors(code), k, scales)
    side = scales[k + 1] if k + 1 < len(scales) else size
    next_BsC = resize(f_hat_BHWC, (side, side), self.next_input_resize)
    return f_hat_BHWC, next_BsC.reshape(next_BsC.shape[0], side * side, next_BsC.shape[-1])

  def teacher_inputs(self, codes: Sequence[jax.Array], size: int):
    """The teacher-forced transformer input from the codes of all K scales.

    For k = 0 … K−2 the cumulative f_hat_k resized to scale k + 1 (`next_input_resize`: area for
    VAR, bilinear for Infinity), flattened row-major and concatenated: [B, Σ_k s_k² − s_0², C]
    (679 tokens for VAR's 256p schedule).
    """
    scales = self.scales(size)
    if len(codes) != len(scales):
      raise ConfigError(f"teacher_inputs needs the codes of all {len(scales)} scales {scales}, got "
                        f"{len(codes)}; pass the full codes tuple of the tokenizer")
    batch = codes[0].shape[0]
    f_hat_BHWC = jnp.zeros((batch, size, size, self.channels), jnp.float32)
    inputs = []
    for k in range(len(scales) - 1):
      f_hat_BHWC, next_BsC = self.next_scale_input(f_hat_BHWC, codes[k], k, size)
      inputs.append(next_BsC)
    if not inputs:
      return jnp.zeros((batch, 0, self.channels), jnp.float32)
    return jnp.concatenate(inputs, axis=1)
