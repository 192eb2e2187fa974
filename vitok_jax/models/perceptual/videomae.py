"""VideoMAE-v2 ViT features and LatentSync's TREPA temporal-representation alignment loss.

VideoMAE-v2 encoder (the fine-tuned classifier minus its head), as LatentSync's TREPA uses it:
frames [B, T, 224, 224, 3] in [0, 1] (no mean/std normalisation) -> tubelet embedding Conv3d
(2, 14, 14) -> tokens ordered (t, h, w) + a fixed sinusoid table whose columns interleave sin/cos ->
pre-norm blocks (LayerNorm eps 1e-6; attention with q and v biases but no k bias; exact-erf GELU
MLP) -> mean over all tokens -> fc_norm LayerNorm (eps 1e-6) = the clip feature [B, D].

TREPA(fake, real) = MSE(l2_normalise(f(fake)), l2_normalise(f(real))) where each clip in [−1, 1] is
bicubic-resized to 224 (torch semantics, A = −0.75, no antialias), mapped by x/2 + 0.5 and clamped
to [0, 1]. LatentSync weights it by 10. Module and param names follow the PyTorch checkpoint
(patch_embed.proj, blocks.{i}.attn.qkv / q_bias / v_bias / proj, mlp.fc1/fc2, fc_norm).
Shape suffixes: B batch, T time, L tokens, D width, H heads, K head_dim, F mlp hidden.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax import kernels
from vitok_jax.errors import ConfigError
from vitok_jax.models.perceptual import resize, weights

RESOLUTION = 224
LN_EPS = 1e-6
TREPA_WEIGHT = 10.0  # LatentSync's trepa_loss_weight.
HOW_TO_CONVERT = ("python tools/convert_videomae.py --pth vit_g_hybrid_pt_1200e_ssv2_ft.pth "
                  "--size g/14 --out videomae_g14.npz")


@dataclasses.dataclass(frozen=True)
class VideoMAESize:
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int = 14
  tubelet: int = 2
  # Published weights, trained on clips of PRETRAINED_FRAMES at RESOLUTION: their position table
  # is that token grid's (g/14: 8 × 16 × 16). False: a size without them (its table follows the
  # clip).
  pretrained: bool = True


PRETRAINED_FRAMES = 16  # VideoMAE-v2's clip length, and LatentSync's.
# LatentSync uses vit_giant_patch14_224 (ViT-g: 1408 wide, 40 deep, 16 heads, mlp_ratio 48/11).
SIZES = {
    "g/14": VideoMAESize(1408, 40, 16, 6144),
    "B/16": VideoMAESize(768, 12, 12, 3072, patch=16),
    "Mu/8": VideoMAESize(64, 2, 2, 128, patch=8, pretrained=False),  # Tests and CPU smoke runs.
}


def sinusoid_table(num_tokens: int, width: int) -> np.ndarray:
  """VideoMAE's fixed position table [L, D]: angle pos / 10000^(2·(j//2)/D), sin on even j, cos on odd."""
  pos = np.arange(num_tokens, dtype=np.float64)[:, None]
  j = np.arange(width)
  angles = pos / np.power(10000.0, 2 * (j // 2) / width)
  table = np.where(j % 2 == 0, np.sin(angles), np.cos(angles))
  return table.astype(np.float32)


class Block(nn.Module):
  size: VideoMAESize
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    s = self.size
    head_dim = s.width // s.heads
    h = nn.LayerNorm(LN_EPS, dtype=self.dtype, name="norm1")(x_BLD)
    # qkv has no bias of its own: q and v get separate biases and k none (VideoMAE / BEiT).
    q_bias = self.param("q_bias", nn.initializers.zeros, (s.width,))
    v_bias = self.param("v_bias", nn.initializers.zeros, (s.width,))
    qkv = nn.Dense(3 * s.width, use_bias=False, dtype=self.dtype, name="qkv")(h)
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    q_BLHK, k_BLHK, v_BLHK = jnp.split(qkv.reshape(*qkv.shape[:2], 3, s.heads, head_dim), 3, axis=2)
    attn_BLHK = kernels.attention.dot_product_attention(
        q_BLHK[:, :, 0], k_BLHK[:, :, 0], v_BLHK[:, :, 0])
    x_BLD = x_BLD + nn.Dense(s.width, dtype=self.dtype, name="proj")(
        attn_BLHK.reshape(*attn_BLHK.shape[:2], s.width))
    h = nn.LayerNorm(LN_EPS, dtype=self.dtype, name="norm2")(x_BLD)
    h = nn.gelu(nn.Dense(s.mlp_dim, dtype=self.dtype, name="fc1")(h), approximate=False)
    return x_BLD + nn.Dense(s.width, dtype=self.dtype, name="fc2")(h)


class VideoMAEFeatures(nn.Module):
  """Frames [B, T, H, W, 3] in [0, 1] -> clip features [B, D] (fc_norm of the token mean)."""
  size: VideoMAESize
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTHWC):
    s = self.size
    kernel = (s.tubelet, s.patch, s.patch)
    if any(n % k for n, k in zip(x_BTHWC.shape[1:4], kernel)):
      raise ConfigError(f"VideoMAE needs T divisible by {s.tubelet} and H, W by {s.patch}; "
                        f"got {x_BTHWC.shape[1:4]}")
    tokens = nn.Conv(s.width, kernel, strides=kernel, padding="VALID", dtype=self.dtype,
                     name="patch_embed")(x_BTHWC.astype(self.dtype))
    x_BLD = tokens.reshape(tokens.shape[0], -1, s.width)  # Row-major (t, h, w), as torch's flatten.
    x_BLD = x_BLD + sinusoid_table(x_BLD.shape[1], s.width).astype(x_BLD.dtype)
    for i in range(s.depth):
      x_BLD = Block(s, self.dtype, name=f"blocks_{i}")(x_BLD)
    pooled = jnp.mean(x_BLD.astype(jnp.float32), axis=1)
    return nn.LayerNorm(LN_EPS, name="fc_norm")(pooled)


def preprocess(video_BTHWC, resolution: int = RESOLUTION):
  """TREPA's input: [-1, 1] clips -> torch-bicubic resize to 224 -> x/2 + 0.5 clamped to [0, 1], RGB."""
  x = video_BTHWC.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
  if x.shape[2:4] != (resolution, resolution):
    x = resize.resize_bicubic_torch(x, resolution, resolution)
  return jnp.clip(x / 2 + 0.5, 0.0, 1.0)


def _l2_normalize(v_BD):
  """torch F.normalize(p=2, dim=1): v / max(‖v‖, 1e-12)."""
  return v_BD / jnp.maximum(jnp.linalg.norm(v_BD, axis=-1, keepdims=True), 1e-12)


def trepa_loss(params, size: VideoMAESize, fake_BTHWC, real_BTHWC, resolution: int = RESOLUTION,
               dtype=jnp.float32):
  """LatentSync's TREPA: MSE between L2-normalised VideoMAE features of fake and real clips (scalar).

  Unweighted; multiply by TREPA_WEIGHT (10) as LatentSync does. Gradients flow into `fake` only.
  """
  net = VideoMAEFeatures(size, dtype)
  frozen = jax.lax.stop_gradient(params)
  both = jnp.concatenate([fake_BTHWC, jax.lax.stop_gradient(real_BTHWC)])
  feats = _l2_normalize(net.apply({"params": frozen}, preprocess(both, resolution)))
  fake, real = jnp.split(feats, 2)
  return jnp.mean(jnp.square(fake - real))


def init_params(rng, size: VideoMAESize, frames: int = 4) -> dict:
  x = jnp.zeros((1, frames, 2 * size.patch, 2 * size.patch, 3))
  return jax.jit(VideoMAEFeatures(size).init)(rng, x)["params"]


def params_to_torch(params, size: VideoMAESize) -> dict[str, np.ndarray]:
  """Our params in the PyTorch checkpoint's naming (for reference checks and a future converter)."""
  p = jax.tree.map(np.asarray, params)
  state = {"patch_embed.proj.weight": p["patch_embed"]["kernel"].transpose(4, 3, 0, 1, 2),
           "patch_embed.proj.bias": p["patch_embed"]["bias"],
           "fc_norm.weight": p["fc_norm"]["scale"], "fc_norm.bias": p["fc_norm"]["bias"]}
  for i in range(size.depth):
    b, prefix = p[f"blocks_{i}"], f"blocks.{i}"
    state[f"{prefix}.attn.qkv.weight"] = b["qkv"]["kernel"].T
    state[f"{prefix}.attn.q_bias"], state[f"{prefix}.attn.v_bias"] = b["q_bias"], b["v_bias"]
    for ours, theirs in (("proj", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
      state[f"{prefix}.{theirs}.weight"] = b[ours]["kernel"].T
      state[f"{prefix}.{theirs}.bias"] = b[ours]["bias"]
    for norm in ("norm1", "norm2"):
      state[f"{prefix}.{norm}.weight"] = b[norm]["scale"]
      state[f"{prefix}.{norm}.bias"] = b[norm]["bias"]
  return state


def params_from_torch(state, size: VideoMAESize) -> dict:
  """Inverse of `params_to_torch`; the classifier's keys (head.*, norm.*) are dropped. Any other
  key this model does not read (layer scale's gamma_1/2, a learned pos_embed: another variant)
  is a ConfigError, since converting without it would give other features."""
  s = _Recording({k: np.asarray(v, np.float32) for k, v in state.items()})
  params = {"patch_embed": {"kernel": s["patch_embed.proj.weight"].transpose(2, 3, 4, 1, 0),
                            "bias": s["patch_embed.proj.bias"]},
            "fc_norm": {"scale": s["fc_norm.weight"], "bias": s["fc_norm.bias"]}}
  for i in range(size.depth):
    prefix = f"blocks.{i}"
    block = {"qkv": {"kernel": s[f"{prefix}.attn.qkv.weight"].T},
             "q_bias": s[f"{prefix}.attn.q_bias"], "v_bias": s[f"{prefix}.attn.v_bias"]}
    for ours, theirs in (("proj", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
      block[ours] = {"kernel": s[f"{prefix}.{theirs}.weight"].T, "bias": s[f"{prefix}.{theirs}.bias"]}
    for norm in ("norm1", "norm2"):
      block[norm] = {"scale": s[f"{prefix}.{norm}.weight"], "bias": s[f"{prefix}.{norm}.bias"]}
    params[f"blocks_{i}"] = block
  if unread := sorted(k for k in s if k not in s.read and not k.startswith(("head.", "norm."))):
    raise ConfigError(f"the VideoMAE checkpoint has {len(unread)} keys a VideoMAE-v2 {size} model "
                      f"does not read, e.g. {unread[:4]}: another variant (layer scale, learned "
                      f"positions?) that this converter does not support")
  return params


class _Recording(dict):
  """A dict that records each key read (in `.read`)."""

  def __init__(self, items):
    super().__init__(items)
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)


def load_trepa_fn(weights_path: str, size: str = "g/14", dtype=jnp.float32):
  """(fake, real) -> scalar TREPA loss (unweighted) from our .npz of VideoMAE-v2 params."""
  if size not in SIZES:
    raise ConfigError(f"unknown VideoMAE size {size!r}; use one of {list(SIZES)}")
  params = jax.tree.map(jnp.asarray, weights.load(weights_path, "VideoMAE-v2 weights", HOW_TO_CONVERT))
  return functools.partial(trepa_loss, params, SIZES[size], dtype=dtype)
