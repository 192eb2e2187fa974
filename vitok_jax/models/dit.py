"""DiT / SiT: a class-conditional diffusion transformer on continuous latents, adaLN-zero.

latent x [B, H, W, C] -> patch tokens [B, h·w, C·p·p] -> + fixed 2-D sin-cos positions -> `depth`
adaLN-zero blocks conditioned on c = emb(t) + emb(label) (+ emb(step size) for shortcut models)
-> adaLN final layer -> tokens [B, h·w, p·p·C] -> v [B, H, W, C].

Follows facebookresearch/DiT so its weights carry over: the timestep embedding is [cos, sin] of t as
given (SiT feeds t in [0, 1] unscaled); the position table is [sin, cos] with its first half
encoding the column; a patch is flattened as (c, i, j) on the way in (the Conv2d kernel order) but
read as (i, j, c) by `unpatchify`; the modulation Dense layers and the final projection start at zero,
so every block is the identity and the output is 0 at init. LayerNorms inside blocks carry no
parameters (eps 1e-6). Attention keeps q/k/v separate (DiT's fused qkv splits into them) and uses no
RoPE. The output has the input's channels (no learned sigma: flow matching needs none).

Shape suffixes: B batch, H/W latent rows/columns, C channels, L tokens, D width, F frequencies,
P patch features, M modulation features (6·D in a block, 2·D in the final layer).
"""
from __future__ import annotations

import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax.errors import ConfigError
from vitok_jax.models import flow, vit

FREQ_DIM = 256  # Width of the sinusoidal timestep features, as in DiT.
STEP_INPUTS = ("level", "d")  # How a shortcut DiT embeds its step size d (DiT.step_input).


def timestep_embedding(t_B, dim: int = FREQ_DIM, max_period: float = 10_000.0):
  """[cos(t·f), sin(t·f)] with f = max_period^(-k/half), k < half: [B] -> [B, dim] float32."""
  half = dim // 2
  freqs_F = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args_BF = jnp.asarray(t_B, jnp.float32)[:, None] * freqs_F[None]
  emb_BF = jnp.concatenate([jnp.cos(args_BF), jnp.sin(args_BF)], axis=-1)
  if dim % 2:
    emb_BF = jnp.pad(emb_BF, ((0, 0), (0, 1)))
  return emb_BF


def _sincos_1d(dim: int, pos_L: np.ndarray) -> np.ndarray:
  """[sin(pos·ω), cos(pos·ω)] with ω = 10000^(-k/(dim/2)): [L] -> [L, dim] float64."""
  omega = 1.0 / 10_000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out_LF = np.einsum("l,f->lf", pos_L.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out_LF), np.cos(out_LF)], axis=1)


def pos_embed_2d(width: int, grid: tuple[int, int]) -> np.ndarray:
  """DiT's fixed position table for a row-major (h, w) token grid: [h·w, width] float32.

  The first width/2 features encode the column, the last width/2 the row, each as [sin, cos].
  """
  if width % 4:
    raise ConfigError(f"the 2-D sin-cos position table needs width divisible by 4, got {width}; "
                      "pick another DiT size")
  rows_HW, cols_HW = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  table = np.concatenate([_sincos_1d(width // 2, cols_HW), _sincos_1d(width // 2, rows_HW)], axis=1)
  return table.astype(np.float32)


def patchify(x_BHWC, patch: int):
  """[B, H, W, C] -> [B, h·w, C·p·p], each patch flattened as (c, i, j) like DiT's Conv2d kernel."""
  return einops.rearrange(x_BHWC, "b (h i) (w j) c -> b (h w) (c i j)", i=patch, j=patch)


def unpatchify(tokens_BLP, patch: int, grid: tuple[int, int]):
  """[B, h·w, p·p·C] -> [B, H, W, C], each token read as (i, j, c) like DiT's `unpatchify`."""
  return einops.rearrange(tokens_BLP, "b (h w) (i j c) -> b (h i) (w j) c",
                          h=grid[0], w=grid[1], i=patch, j=patch)


def drop_labels(rng, labels_B, num_classes: int, prob: float):
  """Replaces each label by the null class `num_classes` with probability `prob`.

  The DiT calls this itself when train=True; a caller that needs the same dropped labels for
  several forward passes (e.g. shortcut targets) calls it once and runs the DiT with train=False.
  """
  drop_B = jax.random.uniform(rng, labels_B.shape) < prob
  return jnp.where(drop_B, num_classes, labels_B)


def _init_dense(features: int, axes, init, dtype, name: str) -> nn.Dense:
  """nn.Dense with kernel init `init` (bias zero), both carrying logical axes like `vit.dense`."""
  return nn.Dense(features, dtype=dtype, name=name, kernel_init=vit.partitioned(init, axes),
                  bias_init=vit.partitioned(nn.initializers.zeros, axes[1:]))


def _modulate(x_BLD, shift_BD, scale_BD):
  return x_BLD * (1 + scale_BD[:, None]) + shift_BD[:, None]


def _plain_norm(dtype, name: str):
  """DiT's parameter-free LayerNorm (elementwise_affine=False, eps 1e-6)."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class ScalarEmbedder(nn.Module):
  """DiT's TimestepEmbedder: [B] scalars -> frequency features -> Dense, SiLU, Dense -> [B, D]."""
  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t_B):
    init = nn.initializers.normal(0.02)
    h_BD = _init_dense(self.width, ("freq", "embed"), init, self.dtype, "mlp_in")(
        timestep_embedding(t_B))
    return _init_dense(self.width, ("mlp", "embed"), init, self.dtype, "mlp_out")(nn.silu(h_BD))


class DiTBlock(nn.Module):
  """x + gate·attn(modulate(LN(x))), then x + gate·mlp(modulate(LN(x))); (shift, scale, gate) from c."""
  heads: int
  attn_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, c_BD):
    width = x_BLD.shape[-1]
    x_BLD = vit.constrain(x_BLD, ("batch", "length", "act_embed"))
    mod_BM = _init_dense(6 * width, ("embed", "mlp"), nn.initializers.zeros, self.dtype,
                          "adaln")(nn.silu(c_BD))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod_BM, 6, axis=-1)
    h_BLD = _modulate(_plain_norm(self.dtype, "norm_attn")(x_BLD), shift_a, scale_a)
    h_BLD = vit.Attention(self.heads, attn_impl=self.attn_impl, dtype=self.dtype, name="attn")(h_BLD)
    x_BLD = x_BLD + gate_a[:, None] * h_BLD
    h_BLD = _modulate(_plain_norm(self.dtype, "norm_mlp")(x_BLD), shift_m, scale_m)
    h_BLD = vit.MLP(vit.mlp_dim(width, "gelu"), "gelu", self.dtype, name="mlp")(h_BLD)
    return x_BLD + gate_m[:, None] * h_BLD


class DiT(nn.Module):
  """Class-conditional DiT on [B, H, W, C] latents predicting a velocity of the same shape.

  Labels are ints in [0, num_classes); label `num_classes` is the null class (dropout and CFG).
  With use_step_size the model also takes the step size d of a shortcut model (flow.shortcut_loss),
  embedded by its level (step_input "level": `flow.step_level`, the paper's code) or as d itself
  ("d", runs saved before the choice).
  """
  size: vit.ViTSize
  patch: int
  in_channels: int
  num_classes: int
  class_dropout: float = 0.1
  use_step_size: bool = False
  step_input: str = "level"
  attn_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, t_B, labels_B, *, train: bool, step_size_B=None):
    """v_BHWC = DiT(x_t, t, labels[, d]); t (and d) float [B] in [0, 1].

    train=True drops labels to the null class with probability class_dropout (rng "dropout").
    """
    self._check(x_BHWC, step_size_B)
    grid = (x_BHWC.shape[1] // self.patch, x_BHWC.shape[2] // self.patch)
    width = self.size.width

    tokens_BLP = patchify(x_BHWC, self.patch).astype(self.dtype)
    x_BLD = vit.dense(width, ("patch", "embed"), self.dtype, "patch_embed")(tokens_BLP)
    x_BLD = x_BLD + jnp.asarray(pos_embed_2d(width, grid), self.dtype)[None]

    if train and self.class_dropout > 0:
      labels_B = drop_labels(self.make_rng("dropout"), labels_B, self.num_classes,
                             self.class_dropout)
    class_table = self.param("class_embed",
                             vit.partitioned(nn.initializers.normal(0.02), ("classes", "embed")),
                             (self.num_classes + 1, width))
    c_BD = jnp.asarray(class_table, self.dtype)[labels_B]
    c_BD = c_BD + ScalarEmbedder(width, self.dtype, name="t_embed")(t_B)
    if self.use_step_size:
      step_B = flow.step_level(step_size_B) if self.step_input == "level" else step_size_B
      c_BD = c_BD + ScalarEmbedder(width, self.dtype, name="step_embed")(step_B)

    for i in range(self.size.depth):
      x_BLD = DiTBlock(self.size.heads, self.attn_impl, self.dtype, name=f"block{i}")(x_BLD, c_BD)

    mod_BM = _init_dense(2 * width, ("embed", "mlp"), nn.initializers.zeros, self.dtype,
                          "final_adaln")(nn.silu(c_BD))
    shift_BD, scale_BD = jnp.split(mod_BM, 2, axis=-1)
    x_BLD = _modulate(_plain_norm(self.dtype, "norm_out")(x_BLD), shift_BD, scale_BD)
    out_BLP = _init_dense(self.patch * self.patch * self.in_channels, ("embed", "patch"),
                          nn.initializers.zeros, self.dtype, "final")(x_BLD)
    return unpatchify(out_BLP, self.patch, grid).astype(x_BHWC.dtype)

  def _check(self, x_BHWC, step_size_B):
    if x_BHWC.ndim != 4:
      raise ConfigError(f"DiT takes latents [B, H, W, C], got shape {tuple(x_BHWC.shape)}")
    if x_BHWC.shape[-1] != self.in_channels:
      raise ConfigError(f"DiT in_channels={self.in_channels} but the latents have "
                        f"{x_BHWC.shape[-1]} channels; set in_channels={x_BHWC.shape[-1]}")
    if self.patch < 1:
      raise ConfigError(f"DiT patch={self.patch}; use 1 or 2")
    for size, axis in zip(x_BHWC.shape[1:3], "HW"):
      if size % self.patch:
        raise ConfigError(f"DiT patch={self.patch} does not divide latent {axis}={size}; use patch=1")
    if self.size.width % self.size.heads:
      raise ConfigError(f"DiT width {self.size.width} is not divisible by heads {self.size.heads}")
    if self.step_input not in STEP_INPUTS:
      raise ConfigError(f"DiT step_input={self.step_input!r} must be one of {list(STEP_INPUTS)}")
    if self.use_step_size and step_size_B is None:
      raise ConfigError("DiT(use_step_size=True) needs step_size_B (the shortcut step size d)")
    if not self.use_step_size and step_size_B is not None:
      raise ConfigError("step_size_B given to a DiT without use_step_size; set use_step_size=True")
