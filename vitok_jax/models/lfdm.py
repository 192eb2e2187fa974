"""LFDM: image-to-video by generating latent flows (Ni et al. 2023), adapted small.

Stage 1, the latent flow auto-encoder (LFAE): a flow predictor sees a source frame and a driving
frame and returns an absolute sampling grid (identity + predicted offset) and an occlusion map at
the flow resolution (the image side / 2^(levels − 1), e.g. 8×8 for 32×32 frames with three levels).
The source frame's encoder features are warped by the grid at every level (grid and occlusion
resized to the level), blended with the decoder's own features where occluded, and decoded into
the driving frame (as the official LFAE generator's skips: skip·occ + previous·(1 − occ)).

Stage 2: a rectified-flow DiT (models/dit.py, models/flow.py) generates the T − 1 flow + occlusion
maps of a clip as channels of one [h, w, 3·(T − 1)] latent, conditioned on the first frame (the
LFAE encoder's lowest-resolution features, projected and concatenated as extra input channels) and
optionally the class label (CFG as in flow.cfg_velocity). The sampled flows warp the first frame,
through the stage-1 decoder, into a video.

Warping follows torch grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False), the
official code's: the grid is absolute in [−1, 1] with (x, y) order; a grid point samples pixel
coordinates ix = ((x + 1)·W − 1)/2, iy = ((y + 1)·H − 1)/2; each of the four bilinear taps that
falls outside the image contributes zero. The official identity grid is linspace(−1, 1) (pixel
centres at the corners) yet sampled with align_corners=False, so "identity" shifts the image by up
to half a pixel towards the centre: `identity_grid` reproduces that, on purpose. Grids and occlusion
maps of another size are bilinearly resized (align_corners=False, no antialias) and their values
are *not* rescaled: they are absolute coordinates, valid at any resolution.

Departures from the paper and its official code (nihaomiao/CVPR23_LFDM): no MRAA region predictor
(a small conv net predicts the flow directly); the generator is a DiT on flow maps rather than a
3-D U-Net; the frame is the decoder's last conv, with no final pixel blend warp(source)·occ +
out·(1 − occ) that would copy visible pixels through the warp; the LFAE trains on pixel L1 + L2
(`lfae_loss`), not the official VGG-pyramid perceptual and equivariance losses.

Shape suffixes: B batch, T frames, H/W image rows/columns, h/w flow rows/columns, C channels,
F features, K grid channels (2: x, y) or occlusion channels (1), L tokens.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitok_jax.errors import ConfigError
from vitok_jax.models import dit
from vitok_jax.models import flow
from vitok_jax.models import vit

# He init with an untruncated normal (cheap to compile on CPU, as in models/discriminator.py).
HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
FLOW_CHANNELS = 3  # Per frame: grid offset (x, y) and occlusion.


# --- Warping: torch grid_sample semantics. ---


def identity_grid(h: int, w: int) -> jax.Array:
  """The official LFDM/FOMM identity grid: [h, w, 2] float32 with (x, y) = linspace(−1, 1).

  Sampled with align_corners=False this is not an exact identity: it shifts by up to half a pixel.
  """
  if h < 2 or w < 2:
    raise ConfigError(f"identity_grid needs h, w >= 2 (linspace(-1, 1) divides by size - 1), got "
                      f"{h}x{w}; use a larger flow resolution (fewer LFAE levels)")
  x_W = 2 * (jnp.arange(w, dtype=jnp.float32) / (w - 1)) - 1
  y_H = 2 * (jnp.arange(h, dtype=jnp.float32) / (h - 1)) - 1
  xx_HW, yy_HW = jnp.meshgrid(x_W, y_H, indexing="xy")
  return jnp.stack([xx_HW, yy_HW], axis=-1)


def grid_sample(x_BHWC, grid_Bhw2):
  """torch grid_sample(x, grid, "bilinear", "zeros", align_corners=False) in NHWC: [B, h, w, C].

  grid_Bhw2 holds absolute (x, y) in [−1, 1] (points outside sample zeros, tap by tap).
  Differentiable in both x and grid.
  """
  if x_BHWC.ndim != 4 or grid_Bhw2.ndim != 4 or grid_Bhw2.shape[-1] != 2:
    raise ConfigError(f"grid_sample takes x [B, H, W, C] and grid [B, h, w, 2], got "
                      f"{tuple(x_BHWC.shape)} and {tuple(grid_Bhw2.shape)}")
  if grid_Bhw2.shape[0] != x_BHWC.shape[0]:
    raise ConfigError(f"grid_sample batch mismatch: x has {x_BHWC.shape[0]}, grid "
                      f"{grid_Bhw2.shape[0]}; pass one grid per image")
  b, height, width, c = x_BHWC.shape
  grid_Bhw2 = grid_Bhw2.astype(jnp.float32)
  ix_Bhw = ((grid_Bhw2[..., 0] + 1) * width - 1) / 2
  iy_Bhw = ((grid_Bhw2[..., 1] + 1) * height - 1) / 2
  x0_Bhw, y0_Bhw = jnp.floor(ix_Bhw), jnp.floor(iy_Bhw)
  fx_Bhw, fy_Bhw = ix_Bhw - x0_Bhw, iy_Bhw - y0_Bhw
  flat_BLC = x_BHWC.reshape(b, height * width, c)
  out_shape = grid_Bhw2.shape[:3] + (c,)

  def tap(yi_Bhw, xi_Bhw, weight_Bhw):
    valid_Bhw = (xi_Bhw >= 0) & (xi_Bhw <= width - 1) & (yi_Bhw >= 0) & (yi_Bhw <= height - 1)
    idx_Bhw = (jnp.clip(yi_Bhw, 0, height - 1) * width
               + jnp.clip(xi_Bhw, 0, width - 1)).astype(jnp.int32)
    vals_BLC = jnp.take_along_axis(flat_BLC, idx_Bhw.reshape(b, -1, 1), axis=1)
    return vals_BLC.reshape(out_shape) * jnp.where(valid_Bhw, weight_Bhw, 0.0)[..., None]

  out_BhwC = (tap(y0_Bhw, x0_Bhw, (1 - fx_Bhw) * (1 - fy_Bhw))
              + tap(y0_Bhw, x0_Bhw + 1, fx_Bhw * (1 - fy_Bhw))
              + tap(y0_Bhw + 1, x0_Bhw, (1 - fx_Bhw) * fy_Bhw)
              + tap(y0_Bhw + 1, x0_Bhw + 1, fx_Bhw * fy_Bhw))
  return out_BhwC.astype(x_BHWC.dtype)


def resize_grid(grid_BhwK, size: Sequence[int]):
  """Bilinear resize (align_corners=False, no antialias) to size = (H, W): [B, H, W, K].

  For sampling grids and occlusion maps: values are kept as they are (absolute coordinates), only
  the sampling positions change. Returns the input itself when the size already matches.
  """
  height, width = size
  if grid_BhwK.shape[1:3] == (height, width):
    return grid_BhwK
  shape = (grid_BhwK.shape[0], height, width, grid_BhwK.shape[-1])
  return jax.image.resize(grid_BhwK, shape, "bilinear", antialias=False)


def warp(x_BHWC, grid_Bhw2, occlusion_Bhw1=None, prev_BhwC=None):
  """grid_sample(x, grid), blended as warped·occ + prev·(1 − occ): [B, h, w, C].

  Without prev the occluded part is zero (warped·occ, the official generator's choice); without
  occlusion the plain warp. Occlusion of another size than the grid is resized to it.
  """
  out_BhwC = grid_sample(x_BHWC, grid_Bhw2)
  if occlusion_Bhw1 is None:
    if prev_BhwC is not None:
      raise ConfigError("warp got prev without an occlusion map; pass occlusion_Bhw1 to blend")
    return out_BhwC
  occ_Bhw1 = resize_grid(occlusion_Bhw1, out_BhwC.shape[1:3]).astype(out_BhwC.dtype)
  if prev_BhwC is None:
    return out_BhwC * occ_Bhw1
  if prev_BhwC.shape != out_BhwC.shape:
    raise ConfigError(f"warp prev has shape {tuple(prev_BhwC.shape)} but the warped features "
                      f"{tuple(out_BhwC.shape)}; give prev the grid's size and x's channels")
  return out_BhwC * occ_Bhw1 + prev_BhwC * (1 - occ_Bhw1)


# --- Stage 1: the latent flow auto-encoder. ---


def _conv(features: int, name: str, kernel: int = 3, stride: int = 1, init=HE_NORMAL):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME", name=name,
                 kernel_init=vit.partitioned(init, (None, None, None, "mlp")),
                 bias_init=vit.partitioned(nn.initializers.zeros, ("mlp",)))


class ResBlock(nn.Module):
  """x + conv(silu(conv(silu(x)))), the second conv zero-initialised (identity at init)."""

  @nn.compact
  def __call__(self, x_BHWF):
    features = x_BHWF.shape[-1]
    h_BHWF = _conv(features, "conv1")(nn.silu(x_BHWF))
    return x_BHWF + _conv(features, "conv2", init=nn.initializers.zeros)(nn.silu(h_BHWF))


class Encoder(nn.Module):
  """Frame [B, H, W, C] -> features per level: [B, H/2^l, W/2^l, features[l]], l = 0 … L − 1."""
  features: Sequence[int]

  @nn.compact
  def __call__(self, x_BHWC):
    h_BHWF = _conv(self.features[0], "stem")(x_BHWC)
    feats = [ResBlock(name="res0")(h_BHWF)]
    for level, features in enumerate(self.features[1:], start=1):
      h_BHWF = _conv(features, f"down{level}", stride=2)(nn.silu(feats[-1]))
      feats.append(ResBlock(name=f"res{level}")(h_BHWF))
    return feats


class FlowPredictor(nn.Module):
  """(source, driving) [B, H, W, C] -> (grid [B, h, w, 2], occlusion [B, h, w, 1]) at h = H/2^(L−1).

  grid = identity_grid + max_offset·tanh(raw offset) (the bound is ours: unbounded offsets made the
  small LFAE diverge); the offset head starts at zero (grid = identity) and the occlusion logit at
  `occlusion_bias` (mostly visible).
  """
  features: Sequence[int]
  num_res: int = 2
  occlusion_bias: float = 2.0
  max_offset: float = 0.5

  @nn.compact
  def __call__(self, source_BHWC, driving_BHWC):
    h_BHWF = _conv(self.features[0], "stem")(jnp.concatenate([source_BHWC, driving_BHWC], -1))
    for level, features in enumerate(self.features[1:], start=1):
      h_BHWF = _conv(features, f"down{level}", stride=2)(nn.silu(h_BHWF))
      h_BHWF = ResBlock(name=f"res{level}")(h_BHWF)
    for i in range(self.num_res):
      h_BHWF = ResBlock(name=f"mid{i}")(h_BHWF)
    out_Bhw3 = _conv(FLOW_CHANNELS, "head", init=nn.initializers.zeros)(nn.silu(h_BHWF))
    offset_Bhw2 = self.max_offset * jnp.tanh(out_Bhw3[..., :2])  # Bounded: keeps training stable.
    grid_Bhw2 = identity_grid(*out_Bhw3.shape[1:3])[None] + offset_Bhw2
    occlusion_Bhw1 = nn.sigmoid(out_Bhw3[..., 2:] + self.occlusion_bias)
    return grid_Bhw2, occlusion_Bhw1


class Decoder(nn.Module):
  """Source features warped by (grid, occlusion) at every level -> frame [B, H, W, out_channels].

  The lowest level is warp(f, grid)·occ; each higher level upsamples the decoder state and blends in
  the warped skip features where visible: warp(f_l, grid_l, occ_l, prev=state).
  """
  features: Sequence[int]
  out_channels: int
  num_res: int = 2

  @nn.compact
  def __call__(self, feats, grid_Bhw2, occlusion_Bhw1):
    h_BHWF = warp(feats[-1], resize_grid(grid_Bhw2, feats[-1].shape[1:3]), occlusion_Bhw1)
    for i in range(self.num_res):
      h_BHWF = ResBlock(name=f"mid{i}")(h_BHWF)
    for level in range(len(self.features) - 2, -1, -1):
      skip_BHWF = feats[level]
      size = skip_BHWF.shape[1:3]
      h_BHWF = jax.image.resize(h_BHWF, h_BHWF.shape[:1] + size + h_BHWF.shape[-1:], "nearest")
      h_BHWF = _conv(self.features[level], f"up{level}")(nn.silu(h_BHWF))
      skip_BHWF = warp(skip_BHWF, resize_grid(grid_Bhw2, size), occlusion_Bhw1, prev_BhwC=h_BHWF)
      h_BHWF = _conv(self.features[level], f"fuse{level}")(
          jnp.concatenate([h_BHWF, skip_BHWF], -1))
      h_BHWF = ResBlock(name=f"res{level}")(h_BHWF)
    return _conv(self.out_channels, "out", init=nn.initializers.zeros)(nn.silu(h_BHWF))


class LFAE(nn.Module):
  """Latent flow auto-encoder: reconstructs a driving frame from a warped source frame.

  features[l] is the width of level l (level 0 at full resolution, each next one halves H and W);
  the flow lives at the last level. Methods (use `model.apply(params, ..., method=LFAE.x)`):
  __call__ (both halves), predict_flow, encode, decode, animate.
  """
  features: Sequence[int] = (16, 32, 64)
  out_channels: int = 1
  num_res: int = 2

  def setup(self):
    if len(self.features) < 1:
      raise ConfigError("LFAE features must name at least one level, e.g. (16, 32, 64)")
    self.encoder = Encoder(self.features)
    self.flow_net = FlowPredictor(self.features, self.num_res)
    self.decoder = Decoder(self.features, self.out_channels, self.num_res)

  def flow_size(self, image_size: Sequence[int]) -> tuple[int, int]:
    """(h, w) of the flow for frames of size (H, W)."""
    factor = 2 ** (len(self.features) - 1)
    return image_size[0] // factor, image_size[1] // factor

  def _check(self, x_BHWC):
    factor = 2 ** (len(self.features) - 1)
    if x_BHWC.ndim != 4 or x_BHWC.shape[1] % factor or x_BHWC.shape[2] % factor:
      raise ConfigError(f"LFAE with {len(self.features)} levels takes frames [B, H, W, C] with H, W "
                        f"divisible by {factor}, got {tuple(x_BHWC.shape)}; change the data "
                        "resolution or the number of LFAE levels")

  def predict_flow(self, source_BHWC, driving_BHWC):
    """(grid [B, h, w, 2], occlusion [B, h, w, 1]) taking source to driving."""
    self._check(source_BHWC)
    return self.flow_net(source_BHWC, driving_BHWC)

  def encode(self, source_BHWC):
    """Source features, one [B, H/2^l, W/2^l, features[l]] per level (the last is the flow's size)."""
    self._check(source_BHWC)
    return self.encoder(source_BHWC)

  def decode(self, feats, grid_Bhw2, occlusion_Bhw1):
    """Features from `encode`, warped by (grid, occlusion), decoded to a frame [B, H, W, C]."""
    return self.decoder(feats, grid_Bhw2, occlusion_Bhw1)

  def animate(self, source_BHWC, grid_BThw2, occlusion_BThw1):
    """One frame per flow: [B, H, W, C] and T flows -> [B, T, H, W, C] (encodes the source once)."""
    b, t = grid_BThw2.shape[:2]
    feats = self.encode(source_BHWC)
    feats = [jnp.repeat(f, t, axis=0) for f in feats]  # Rows ordered (b, t).
    frames = self.decode(feats, grid_BThw2.reshape(b * t, *grid_BThw2.shape[2:]),
                         occlusion_BThw1.reshape(b * t, *occlusion_BThw1.shape[2:]))
    return frames.reshape(b, t, *frames.shape[1:])

  def __call__(self, source_BHWC, driving_BHWC):
    """{"image": reconstructed driving frame, "grid", "occlusion", "deformed": source pixels warped}.

    "deformed" pads with −1 (black in [−1, 1]) outside the frame: grid_sample of source + 1, − 1.
    """
    grid_Bhw2, occlusion_Bhw1 = self.predict_flow(source_BHWC, driving_BHWC)
    image_BHWC = self.decode(self.encode(source_BHWC), grid_Bhw2, occlusion_Bhw1)
    # Pixels in [−1, 1] warped with −1 (black) rather than 0 (grey) outside the frame.
    deformed_BHWC = grid_sample(source_BHWC + 1, resize_grid(grid_Bhw2, source_BHWC.shape[1:3])) - 1
    return {"image": image_BHWC, "grid": grid_Bhw2, "occlusion": occlusion_Bhw1,
            "deformed": deformed_BHWC}


def clip_pairs(clips_BTHWC):
  """(source, driving) [B·(T−1), H, W, C]: frame 0 of each clip against each later frame."""
  b, t = clips_BTHWC.shape[:2]
  if t < 2:
    raise ConfigError(f"LFDM needs clips of >= 2 frames, got {t}; raise data frames")
  source_BHWC = jnp.repeat(clips_BTHWC[:, 0], t - 1, axis=0)
  driving_BHWC = clips_BTHWC[:, 1:].reshape(b * (t - 1), *clips_BTHWC.shape[2:])
  return source_BHWC, driving_BHWC


def lfae_loss(model: LFAE, params, clips_BTHWC, warp_weight: float = 0.0):
  """Reconstruction loss of every later frame from frame 0: (loss, metrics).

  loss = mean |x̂ − x| + mean (x̂ − x)² (+ warp_weight·mean |deformed − x|, an optional pixel-warp
  term not in LFDM). Frames in [−1, 1]; PSNR is over the [0, 1] range.
  """
  source_BHWC, driving_BHWC = clip_pairs(clips_BTHWC)
  out = model.apply(params, source_BHWC, driving_BHWC)
  err_BHWC = out["image"].astype(jnp.float32) - driving_BHWC
  mse = jnp.mean(jnp.square(err_BHWC))
  loss = jnp.mean(jnp.abs(err_BHWC)) + mse
  if warp_weight:
    loss = loss + warp_weight * jnp.mean(jnp.abs(out["deformed"] - driving_BHWC))
  return loss, {"loss": loss, "mse": mse, "psnr": psnr(mse),
                "occlusion": jnp.mean(out["occlusion"])}


def psnr(mse_pm1):
  """PSNR in dB over the [0, 1] range of a mean squared error measured on [−1, 1] values."""
  return 10 * jnp.log10(4.0 / jnp.maximum(mse_pm1, 1e-12))


# --- Stage 2: a DiT on the flow space. ---


def flows_to_latent(grid_BThw2, occlusion_BThw1, flow_scale: float):
  """T flows -> one latent [B, h, w, 3·T]: per frame (offset·flow_scale, 2·occ − 1), frame-major."""
  offset_BThw2 = (grid_BThw2 - identity_grid(*grid_BThw2.shape[2:4])) * flow_scale
  x_BThw3 = jnp.concatenate([offset_BThw2, 2 * occlusion_BThw1 - 1], axis=-1)
  b, t, h, w, k = x_BThw3.shape
  return x_BThw3.transpose(0, 2, 3, 1, 4).reshape(b, h, w, t * k)


def latent_to_flows(x_BhwF, flow_scale: float):
  """Inverse of `flows_to_latent`: (grid [B, T, h, w, 2], occlusion [B, T, h, w, 1] in [0, 1])."""
  b, h, w, f = x_BhwF.shape
  if f % FLOW_CHANNELS:
    raise ConfigError(f"flow latent has {f} channels, not a multiple of {FLOW_CHANNELS}")
  x_BThw3 = x_BhwF.reshape(b, h, w, f // FLOW_CHANNELS, FLOW_CHANNELS).transpose(0, 3, 1, 2, 4)
  grid_BThw2 = x_BThw3[..., :2] / flow_scale + identity_grid(h, w)
  occlusion_BThw1 = jnp.clip((x_BThw3[..., 2:] + 1) / 2, 0.0, 1.0)
  return grid_BThw2, occlusion_BThw1


class FlowDiT(nn.Module):
  """DiT velocity on flow latents [B, h, w, 3·(T−1)], conditioned on first-frame features.

  cond_BhwF (the LFAE encoder's last level for frame 0) goes through a 1×1 conv to cond_width
  channels and is concatenated to the noisy latent; the DiT (in_channels = flow + cond_width) runs
  on both and its output is cut back to the flow channels. Labels as in dit.DiT (num_classes = 0:
  unconditional, every label is the null class 0).
  """
  size: vit.ViTSize
  flow_channels: int
  cond_width: int = 16
  patch: int = 1
  num_classes: int = 0
  class_dropout: float = 0.1
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BhwF, t_B, labels_B, cond_BhwF, *, train: bool):
    if x_BhwF.shape[-1] != self.flow_channels:
      raise ConfigError(f"FlowDiT flow_channels={self.flow_channels} but the latent has "
                        f"{x_BhwF.shape[-1]}; set flow_channels = 3·(frames − 1)")
    if cond_BhwF.shape[:3] != x_BhwF.shape[:3]:
      raise ConfigError(f"FlowDiT condition {tuple(cond_BhwF.shape)} does not match the flow "
                        f"latent {tuple(x_BhwF.shape)} in batch/rows/columns; pass the LFAE "
                        "encoder's last level")
    cond_BhwF = nn.Conv(self.cond_width, (1, 1), name="cond_proj",
                        kernel_init=vit.partitioned(nn.initializers.lecun_normal(),
                                                    (None, None, None, "embed")),
                        bias_init=vit.partitioned(nn.initializers.zeros, ("embed",)))(cond_BhwF)
    model = dit.DiT(self.size, self.patch, self.flow_channels + self.cond_width,
                    self.num_classes, self.class_dropout if self.num_classes else 0.0,
                    attn_impl=self.attn_impl, name="dit")
    v_BhwF = model(jnp.concatenate([x_BhwF, cond_BhwF.astype(x_BhwF.dtype)], -1), t_B, labels_B,
                   train=train)
    return v_BhwF[..., :self.flow_channels]


def flow_dit_loss(model: FlowDiT, params, x1_BhwF, cond_BhwF, labels_B, rng):
  """Rectified-flow loss (flow.flow_matching_loss) of a FlowDiT on flow latents: (loss, metrics)."""
  rng_loss, rng_drop = jax.random.split(rng)
  velocity_fn = lambda x, t_B: model.apply(params, x, t_B, labels_B, cond_BhwF, train=True,
                                           rngs={"dropout": rng_drop})
  return flow.flow_matching_loss(velocity_fn, x1_BhwF, rng_loss)


def sample_flow_latents(model: FlowDiT, params, cond_BhwF, labels_B, rng, *, num_steps: int = 16,
                        method: str = "euler", cfg_scale: float = 1.0):
  """Flow latents [B, h, w, flow_channels] from noise by flow.sample_ode (CFG on the label)."""
  apply_fn = lambda x, t_B, y_B, c: model.apply(params, x, t_B, y_B, c, train=False)
  guided = flow.cfg_velocity(apply_fn, labels_B, model.num_classes, cfg_scale)
  velocity_fn = lambda x, t_B: guided(x, t_B, cond_BhwF)
  noise = jax.random.normal(rng, cond_BhwF.shape[:3] + (model.flow_channels,))
  return flow.sample_ode(velocity_fn, noise, num_steps, method)


def generate_video(lfae: LFAE, lfae_params, flow_dit: FlowDiT, dit_params, first_BHWC, labels_B,
                   rng, *, flow_scale: float, num_steps: int = 16, method: str = "euler",
                   cfg_scale: float = 1.0):
  """Image-to-video: first frames [B, H, W, C] -> clips [B, T, H, W, C] with frame 0 = the input.

  Samples T − 1 flows with the FlowDiT conditioned on the first frame's features and warps the
  first frame into each later frame with the LFAE decoder.
  """
  feats = lfae.apply(lfae_params, first_BHWC, method=LFAE.encode)
  x_BhwF = sample_flow_latents(flow_dit, dit_params, feats[-1], labels_B, rng,
                               num_steps=num_steps, method=method, cfg_scale=cfg_scale)
  grid_BThw2, occlusion_BThw1 = latent_to_flows(x_BhwF, flow_scale)
  later_BTHWC = lfae.apply(lfae_params, first_BHWC, grid_BThw2, occlusion_BThw1,
                           method=LFAE.animate)
  return jnp.concatenate([first_BHWC[:, None], later_BTHWC.astype(first_BHWC.dtype)], axis=1)


def encode_clips(lfae: LFAE, lfae_params, clips_BTHWC, flow_scale: float):
  """Stage-2 training data from real clips: (flow latent [B, h, w, 3·(T−1)], cond [B, h, w, F]).

  Flows are the stage-1 predictor's, frame 0 to each later frame; cond is frame 0's last-level
  encoder features.
  """
  b, t = clips_BTHWC.shape[:2]
  source_BHWC, driving_BHWC = clip_pairs(clips_BTHWC)
  grid_Bhw2, occlusion_Bhw1 = lfae.apply(lfae_params, source_BHWC, driving_BHWC,
                                         method=LFAE.predict_flow)
  grid_BThw2 = grid_Bhw2.reshape(b, t - 1, *grid_Bhw2.shape[1:])
  occlusion_BThw1 = occlusion_Bhw1.reshape(b, t - 1, *occlusion_Bhw1.shape[1:])
  cond_BhwF = lfae.apply(lfae_params, clips_BTHWC[:, 0], method=LFAE.encode)[-1]
  return flows_to_latent(grid_BThw2, occlusion_BThw1, flow_scale), cond_BhwF


def offset_scale(lfae: LFAE, lfae_params, clips_BTHWC, max_scale: float = 100.0) -> float:
  """flow_scale = 1 / std of the predicted grid offsets on clips (capped at max_scale)."""
  source_BHWC, driving_BHWC = clip_pairs(clips_BTHWC)
  grid_Bhw2, _ = lfae.apply(lfae_params, source_BHWC, driving_BHWC, method=LFAE.predict_flow)
  std = float(jnp.std(grid_Bhw2 - identity_grid(*grid_Bhw2.shape[1:3])))
  return float(min(1.0 / max(std, 1e-6), max_scale))


def init_lfae(model: LFAE, rng, frame_shape: Sequence[int]):
  """Unboxed variables {"params": ...} of an LFAE for frames of shape (H, W, C)."""
  x_1HWC = jnp.zeros((1, *frame_shape), jnp.float32)
  return nn.unbox(jax.jit(lambda r: model.init(r, x_1HWC, x_1HWC))(rng))


def init_flow_dit(model: FlowDiT, rng, flow_size: Sequence[int], cond_features: int):
  """Unboxed variables of a FlowDiT for flow maps of size (h, w) and cond_features channels."""
  h, w = flow_size
  x_1hwF = jnp.zeros((1, h, w, model.flow_channels), jnp.float32)
  cond_1hwF = jnp.zeros((1, h, w, cond_features), jnp.float32)
  labels_1 = jnp.zeros((1,), jnp.int32)
  init = lambda r: model.init({"params": r}, x_1hwF, jnp.zeros((1,)), labels_1, cond_1hwF,
                              train=False)
  return nn.unbox(jax.jit(init)(rng))
