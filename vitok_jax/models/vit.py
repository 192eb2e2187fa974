"""ViT building blocks: the size table, RoPE (1D and axial 2D/3D), GeGLU/SwiGLU MLPs, pre-norm blocks.

Shape suffixes: B batch, L tokens, D width, H heads, K head_dim, F mlp hidden, P rotary pairs.
Every parameter carries logical axis names so `parallel/` can shard it by a rule table.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax import kernels
from vitok_jax.errors import ConfigError
from vitok_jax.parallel import sharding

# The one table of transformer sizes: name -> (width, depth, heads).
# S/B/L/H follow ViTok's own table (S is wide and shallow); Mu/Mi/Ti are tiny sizes for CPU runs.
SIZES: dict[str, tuple[int, int, int]] = {
    "Mu": (64, 2, 2),
    "Mi": (128, 3, 2),
    "Ti": (192, 4, 3),
    "S": (768, 6, 12),
    "B": (768, 12, 12),
    "L": (1152, 24, 16),
    "H": (1312, 32, 16),
}
# Generators' published tables, same (width, depth, heads) form, plus the tiny CPU sizes.
GENERATOR_SIZES: dict[str, dict[str, tuple[int, int, int]]] = {
    # DiT (and SiT) S/B/L/XL.
    "dit": {"Mu": (64, 2, 2), "Mi": (128, 4, 4), "Ti": (192, 6, 3), "S": (384, 12, 6),
            "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)},
    # LlamaGen B 111M, L 343M, XL 775M, XXL 1.4B, 3B.
    "llamagen": {"Mu": (64, 2, 2), "Mi": (128, 4, 4), "Ti": (192, 6, 3), "B": (768, 12, 12),
                 "L": (1024, 24, 16), "XL": (1280, 36, 20), "XXL": (1536, 48, 24),
                 "3B": (3200, 24, 32)},
    # VAR: width = 64·depth, heads = depth ("d16" … "d30"; d2/d4/d6 for CPU).
    "var": {f"d{d}": (64 * d, d, d) for d in (2, 4, 6, 16, 20, 24, 30)},
    # LARP's AR prior (its GPT-C): gptc-S, as its tokenizers use; Mu for CPU runs.
    "larp_prior": {"Mu": (64, 2, 2), "S": (384, 12, 6)},
}
MLP_KINDS = ("geglu", "swiglu", "gelu")
ROPE_KINDS = ("1d", "axial", "none")


def mlp_dim(width: int, kind: str) -> int:
  """Hidden width: ≈8/3·width for gated MLPs (same params as a 4× plain MLP), 4·width otherwise."""
  if kind == "gelu":
    return 4 * width
  return -(-int(8 * width / 3) // 8) * 8  # Rounded up to a multiple of 8.


@dataclasses.dataclass(frozen=True)
class ViTSize:
  width: int
  depth: int
  heads: int

  @property
  def head_dim(self) -> int:
    return self.width // self.heads


def decode_size(name: str, family: str = "vitok") -> ViTSize:
  """"S" -> ViTSize(768, 6, 12) (ViTok's table), or from GENERATOR_SIZES[family].

  Raises ConfigError for unknown names.
  """
  table = SIZES if family == "vitok" else GENERATOR_SIZES.get(family)
  if table is None:
    raise ConfigError(f"unknown size family {family!r}; use 'vitok' or one of {list(GENERATOR_SIZES)}")
  if name not in table:
    raise ConfigError(f"unknown {family} size {name!r}; use one of {list(table)}")
  width, depth, heads = table[name]
  return ViTSize(width, depth, heads)


def partitioned(init, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, axes: Sequence[str], dtype, name: str,
          kernel_init=nn.initializers.xavier_uniform()) -> nn.Dense:
  """nn.Dense whose kernel carries logical axes `axes` (in, out) and bias axes[1:] (zeros)."""
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=partitioned(kernel_init, axes),
                  bias_init=partitioned(nn.initializers.zeros, axes[1:]))


def constrain(x, axes: Sequence[str | None]):
  """Activation sharding constraint by logical names (a no-op outside a mesh with rules). A
  dimension its mesh axes do not divide (3 heads on tensor=2) is left unconstrained, as its
  parameters are replicated (`sharding.fit_to_shapes`); constraining it costs resharding."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    mesh_axes = nn.logical_to_mesh_axes(tuple(axes))
    axes = [None if sharding.divisible_prefix(m, size, mesh) != m else a
            for a, m, size in zip(axes, mesh_axes, x.shape)]
  return nn.with_logical_constraint(x, tuple(axes))


def rope_tables(grid: Sequence[int], head_dim: int, kind: str, base: float = 10_000.0):
  """Rotation angles for tokens laid out row-major on `grid` (e.g. (h, w) or (t, h, w)).

  "1d" numbers tokens 0..L-1; "axial" splits the head_dim/2 rotary pairs across the grid axes
  (as evenly as possible, earlier axes get the remainder) and rotates each share by that axis' coordinate.
  Returns (sin_LP, cos_LP) float32 numpy arrays with P = head_dim // 2.
  """
  if kind not in ("1d", "axial"):
    raise ConfigError(f"rope={kind!r} is unknown; use one of {ROPE_KINDS}")
  if head_dim % 2:
    raise ConfigError(f"RoPE needs an even head_dim, got {head_dim}; change width or heads")
  num_pairs = head_dim // 2
  if kind == "1d":
    grid = (int(np.prod(grid)),)
  coords_LA = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1)
  coords_LA = coords_LA.reshape(-1, len(grid)).astype(np.float64)
  shares = [num_pairs // len(grid) + (a < num_pairs % len(grid)) for a in range(len(grid))]
  angles = []
  for axis, share in enumerate(shares):
    freqs_P = base ** (-np.arange(share) / max(share, 1))
    angles.append(coords_LA[:, axis:axis + 1] * freqs_P[None])
  angles_LP = np.concatenate(angles, -1)
  return np.sin(angles_LP).astype(np.float32), np.cos(angles_LP).astype(np.float32)


def apply_rope(x_BLHK, sin_LP, cos_LP):
  """Rotates interleaved pairs (x[2i], x[2i+1]) by the angles of each token."""
  x1, x2 = x_BLHK[..., 0::2], x_BLHK[..., 1::2]
  sin, cos = sin_LP[None, :, None, :], cos_LP[None, :, None, :]
  rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return rotated.reshape(x_BLHK.shape).astype(x_BLHK.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with optional RoPE and qk-norm."""
  heads: int
  qk_norm: bool = False
  attn_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, rope=None):
    width = x_BLD.shape[-1]
    head_dim = width // self.heads
    # Plain Dense over the flattened (heads · head_dim) axis, named "heads" (its blocks of head_dim
    # are whole heads, so sharding it over `tensor` splits heads): flax's DenseGeneral inits its
    # kernel flat, where a 3-axis logical annotation cannot be applied.
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, head_dim)
    q_BLHK, k_BLHK, v_BLHK = (split(dense(width, ("embed", "heads"), self.dtype, name)(x_BLD))
                              for name in ("query", "key", "value"))
    if self.qk_norm:
      norm = lambda name: nn.RMSNorm(dtype=self.dtype, name=name,
                                     scale_init=partitioned(nn.initializers.ones, ("kv",)))
      q_BLHK, k_BLHK = norm("query_norm")(q_BLHK), norm("key_norm")(k_BLHK)
    if rope is not None:
      q_BLHK, k_BLHK = apply_rope(q_BLHK, *rope), apply_rope(k_BLHK, *rope)
    q_BLHK = constrain(q_BLHK, ("batch", "length", "act_heads", "act_kv"))
    out_BLHK = kernels.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, impl=self.attn_impl)
    out_BLD = out_BLHK.reshape(*out_BLHK.shape[:-2], width)
    return dense(width, ("heads", "embed"), self.dtype, "out")(out_BLD)


class MLP(nn.Module):
  """GeGLU / SwiGLU (gated) or plain GELU feed-forward."""
  hidden: int
  kind: str = "geglu"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    width = x_BLD.shape[-1]
    if self.kind not in MLP_KINDS:
      raise ConfigError(f"mlp={self.kind!r} is unknown; use one of {MLP_KINDS}")
    if self.kind == "gelu":
      h_BLF = nn.gelu(dense(self.hidden, ("embed", "mlp"), self.dtype, "wi")(x_BLD))
    else:
      act = nn.gelu if self.kind == "geglu" else nn.silu
      h_BLF = act(dense(self.hidden, ("embed", "mlp"), self.dtype, "wi_gate")(x_BLD))
      h_BLF = h_BLF * dense(self.hidden, ("embed", "mlp"), self.dtype, "wi_up")(x_BLD)
    h_BLF = constrain(h_BLF, ("batch", "length", "act_mlp"))
    return dense(width, ("mlp", "embed"), self.dtype, "wo")(h_BLF)


def layer_norm(dtype, name=None):
  return nn.LayerNorm(dtype=dtype, name=name,
                      scale_init=partitioned(nn.initializers.ones, ("embed",)),
                      bias_init=partitioned(nn.initializers.zeros, ("embed",)))


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""
  heads: int
  mlp_hidden: int
  mlp_kind: str = "geglu"
  qk_norm: bool = False
  attn_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, rope=None):
    x_BLD = constrain(x_BLD, ("batch", "length", "act_embed"))
    y = Attention(self.heads, self.qk_norm, self.attn_impl, self.dtype, name="attn")(
        layer_norm(self.dtype, "norm_attn")(x_BLD), rope)
    x_BLD = x_BLD + y
    y = MLP(self.mlp_hidden, self.mlp_kind, self.dtype, name="mlp")(
        layer_norm(self.dtype, "norm_mlp")(x_BLD))
    return x_BLD + y


class Transformer(nn.Module):
  """A stack of `depth` pre-norm blocks with a final LayerNorm; RoPE over the token `grid`."""
  size: ViTSize
  mlp_kind: str = "geglu"
  rope: str = "1d"
  qk_norm: bool = False
  attn_impl: str = "auto"
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, grid: Sequence[int]):
    if x_BLD.shape[-1] != self.size.width:
      raise ConfigError(f"transformer input width {x_BLD.shape[-1]} != size width {self.size.width}")
    rope = None
    if self.rope != "none":
      rope = tuple(jnp.asarray(t) for t in rope_tables(grid, self.size.head_dim, self.rope))
    block_cls = nn.remat(Block) if self.remat else Block
    for i in range(self.size.depth):
      x_BLD = block_cls(self.size.heads, mlp_dim(self.size.width, self.mlp_kind), self.mlp_kind,
                        self.qk_norm, self.attn_impl, self.dtype, name=f"block{i}")(x_BLD, rope)
    return layer_norm(self.dtype, "norm_out")(x_BLD)


def param_count(params) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
