"""LlamaGen: a class-conditional Llama over a VQ token grid (Sun et al. 2024, "Autoregressive Model
Beats Diffusion").

Sequence layout (L = h·w codes, row-major on the token grid `grid` = (h, w)):
  position 0      the class embedding (the null class `num_classes` when dropped), predicts codes[:, 0];
  position i ≥ 1  the embedding of codes[:, i − 1], predicts codes[:, i].
Llama blocks: RMSNorm pre-norm, bias-free attention and SwiGLU, 2-D RoPE. The RoPE table is
LlamaGen's: row 0 (the class token) is all zero (cos = sin = 0, so the class token's q and k are
zero, exactly as in LlamaGen), row i ≥ 1 holds the axial angles of grid position i − 1 (interleaved
pairs; the first half of the pairs rotates by row, the second by column).

Decoding with a KV cache: `init_cache(batch)` preallocates per layer a (k, v) pair of
[B, L, heads, head_dim] arrays; `prefill` writes the class token at slot 0 and `decode_step` the
token at slot `pos` (a traced int), attending to slots ≤ pos. Shapes are static, so both run inside
`jax.lax.scan` / `fori_loop` (see models/sampling.py `sample_ar`).

Shape suffixes: B batch, L sequence (= h·w), S a chunk of it, D width, H heads, K head_dim,
F mlp hidden, V vocab, P rotary pairs.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitok_jax import kernels
from vitok_jax.errors import ConfigError
from vitok_jax.models import vit

INIT_STD = 0.02          # LlamaGen's initializer_range for linear and embedding weights.
NORM_EPS = 1e-5          # LlamaGen's RMSNorm eps.

KVCache = list  # [(k_BLHK, v_BLHK)] * depth.


def swiglu_hidden(width: int, multiple_of: int = 256) -> int:
  """LlamaGen's SwiGLU hidden width: int(8·width/3) rounded up to a multiple of `multiple_of`."""
  if multiple_of < 1:
    raise ConfigError(f"mlp_multiple_of must be ≥ 1, got {multiple_of}")
  hidden = (8 * width) // 3   # == int(2 · 4·width / 3) for positive widths.
  return -(-hidden // multiple_of) * multiple_of


def rope_table(grid: Sequence[int], head_dim: int, base: float = 10_000.0):
  """LlamaGen's 2-D RoPE table for the L = h·w sequence positions.

  Row 0 (class token) is all zero: cos = sin = 0. Row i ≥ 1 holds `vit.rope_tables(grid, head_dim,
  "axial")` at grid position i − 1 (the grid position of the input token codes[:, i − 1]).
  Returns (sin_LP, cos_LP) float32 numpy arrays, P = head_dim // 2.
  """
  sin_LP, cos_LP = vit.rope_tables(grid, head_dim, "axial", base)
  zero_1P = np.zeros_like(sin_LP[:1])
  return (np.concatenate([zero_1P, sin_LP[:-1]], 0), np.concatenate([zero_1P, cos_LP[:-1]], 0))


def _linear(features: int, axes: Sequence[str], dtype, name: str, init_std: float = INIT_STD):
  """Bias-free nn.Dense (Llama has no biases; `vit.dense` always adds one) with logical axes."""
  init = (nn.initializers.normal(init_std) if init_std > 0 else nn.initializers.zeros)
  return nn.Dense(features, use_bias=False, dtype=dtype, name=name,
                  kernel_init=vit.partitioned(init, axes))


def _rms_norm(dtype, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=NORM_EPS, dtype=dtype, name=name,
                    scale_init=vit.partitioned(nn.initializers.ones, ("embed",)))


class LlamaAttention(nn.Module):
  """Causal multi-head attention with RoPE, full-sequence or against a KV cache."""
  heads: int
  attn_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BSD, sin_SP, cos_SP, cache=None, index=None):
    """x_BSD: tokens at positions index + [0, S); cache: (k_BLHK, v_BLHK) or None (then S = L)."""
    width = x_BSD.shape[-1]
    head_dim = width // self.heads
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, head_dim)
    q_BSHK, k_BSHK, v_BSHK = (split(_linear(width, ("embed", "heads"), self.dtype, name)(x_BSD))
                              for name in ("query", "key", "value"))
    q_BSHK = vit.apply_rope(q_BSHK, sin_SP, cos_SP)
    k_BSHK = vit.apply_rope(k_BSHK, sin_SP, cos_SP)
    q_BSHK = vit.constrain(q_BSHK, ("batch", "length", "act_heads", "act_kv"))
    if cache is None:
      out_BSHK = kernels.dot_product_attention(q_BSHK, k_BSHK, v_BSHK, is_causal=True,
                                               impl=self.attn_impl)
    else:
      k_BLHK, v_BLHK = cache
      start = (0, index, 0, 0)
      k_BLHK = jax.lax.dynamic_update_slice(k_BLHK, k_BSHK.astype(k_BLHK.dtype), start)
      v_BLHK = jax.lax.dynamic_update_slice(v_BLHK, v_BSHK.astype(v_BLHK.dtype), start)
      cache = (k_BLHK, v_BLHK)
      q_pos_S = index + jnp.arange(x_BSD.shape[1])
      mask_11SL = (jnp.arange(k_BLHK.shape[1])[None, :] <= q_pos_S[:, None])[None, None]
      # A dense mask over the filled prefix: XLA (the Pallas kernels take no dense mask, and a
      # one-query step gains nothing from them).
      out_BSHK = kernels.dot_product_attention(q_BSHK, k_BLHK.astype(q_BSHK.dtype),
                                               v_BLHK.astype(q_BSHK.dtype), mask_BHLS=mask_11SL,
                                               impl="xla")
    out_BSD = out_BSHK.reshape(*out_BSHK.shape[:-2], width)
    return _linear(width, ("heads", "embed"), self.dtype, "out")(out_BSD), cache


class SwiGLU(nn.Module):
  """Bias-free SwiGLU: w2(silu(w1 x) · w3 x)."""
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BSD):
    width = x_BSD.shape[-1]
    gate_BSF = nn.silu(_linear(self.hidden, ("embed", "mlp"), self.dtype, "w1")(x_BSD))
    h_BSF = gate_BSF * _linear(self.hidden, ("embed", "mlp"), self.dtype, "w3")(x_BSD)
    h_BSF = vit.constrain(h_BSF, ("batch", "length", "act_mlp"))
    return _linear(width, ("mlp", "embed"), self.dtype, "w2")(h_BSF)


class LlamaBlock(nn.Module):
  """x + drop(attn(RMSNorm(x))), then x + drop(SwiGLU(RMSNorm(x))); returns (x, updated cache or
  None). drop: dropout of rate `dropout` where train (LlamaGen's resid_dropout_p, ffn_dropout_p)."""
  heads: int
  mlp_hidden: int
  attn_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  dropout: float = 0.0
  dropout_rng: str = "dropout"  # The rng stream its dropout draws from.

  @nn.compact
  def __call__(self, x_BSD, sin_SP, cos_SP, cache=None, index=None, train: bool = False):
    drop = lambda y: nn.Dropout(self.dropout, rng_collection=self.dropout_rng)(
        y, deterministic=not train)
    x_BSD = vit.constrain(x_BSD, ("batch", "length", "act_embed"))
    y_BSD, cache = LlamaAttention(self.heads, self.attn_impl, self.dtype, name="attn")(
        _rms_norm(self.dtype, "attention_norm")(x_BSD), sin_SP, cos_SP, cache, index)
    x_BSD = x_BSD + drop(y_BSD)
    x_BSD = x_BSD + drop(SwiGLU(self.mlp_hidden, self.dtype, name="mlp")(
        _rms_norm(self.dtype, "ffn_norm")(x_BSD)))
    return x_BSD, cache


class LlamaGen(nn.Module):
  """Class-conditional autoregressive Llama over the codes of a `grid` = (h, w) token map.

  Attributes:
    size: width, depth, heads (`vit.decode_size(name, "llamagen")`).
    vocab_size: codebook size V.
    num_classes: number of classes; index num_classes is the null class (label dropout / CFG).
    grid: (h, w) token grid; sequence length L = h·w, row-major.
    class_dropout: probability of replacing a label by the null class when train=True.
    dropout: when train=True, the dropout rate of each block's attention and MLP outputs and of
      the input embeddings (LlamaGen's resid_dropout_p = ffn_dropout_p = token_dropout_p, 0.1 in
      its training); 0 turns it off.
    mlp_multiple_of: SwiGLU hidden = round_up(int(8·width/3), mlp_multiple_of) (LlamaGen: 256;
      use e.g. 8 or 32 for tiny CPU sizes).
    attn_impl: attention implementation for the full forward (`kernels.IMPLS`); cached decoding
      always uses XLA with a dense prefix mask.
    dtype: compute dtype (parameters stay float32).
  """
  size: vit.ViTSize
  vocab_size: int
  num_classes: int
  grid: tuple[int, int]
  class_dropout: float = 0.1
  mlp_multiple_of: int = 256
  attn_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  dropout: float = 0.0

  def setup(self):
    _validate(self)
    embed = lambda num, axes, name: nn.Embed(
        num, self.size.width, dtype=self.dtype, name=name,
        embedding_init=vit.partitioned(nn.initializers.normal(INIT_STD), axes))
    self.tok_embeddings = embed(self.vocab_size, ("vocab", "embed"), "tok_embeddings")
    # One extra row: the null class at index num_classes.
    self.class_embeddings = embed(self.num_classes + 1, ("classes", "embed"), "class_embeddings")
    hidden = swiglu_hidden(self.size.width, self.mlp_multiple_of)
    self.blocks = [LlamaBlock(self.size.heads, hidden, self.attn_impl, self.dtype, self.dropout)
                   for _ in range(self.size.depth)]
    self.token_dropout = nn.Dropout(self.dropout)
    self.norm = _rms_norm(self.dtype, "norm")
    # LlamaGen initialises the output head to zero.
    self.head = _linear(self.vocab_size, ("embed", "vocab"), self.dtype, "head", init_std=0.0)

  @property
  def seq_len(self) -> int:
    return int(np.prod(self.grid))

  @property
  def null_class(self) -> int:
    return self.num_classes

  def _class_tokens(self, labels_B, train: bool):
    labels_B = jnp.asarray(labels_B, jnp.int32)
    if train and self.class_dropout > 0:
      drop_B = jax.random.bernoulli(self.make_rng("dropout"), self.class_dropout, labels_B.shape)
      labels_B = jnp.where(drop_B, self.null_class, labels_B)
    return self.class_embeddings(labels_B)[:, None]

  def _run(self, x_BSD, index, caches: KVCache | None, train: bool = False):
    """Blocks + final norm + head for tokens at positions index + [0, S); dropout where train."""
    sin_LP, cos_LP = (jnp.asarray(t) for t in rope_table(self.grid, self.size.head_dim))
    num = x_BSD.shape[1]
    sin_SP = jax.lax.dynamic_slice_in_dim(sin_LP, index, num)
    cos_SP = jax.lax.dynamic_slice_in_dim(cos_LP, index, num)
    new_caches = []
    for i, block in enumerate(self.blocks):
      x_BSD, cache = block(x_BSD, sin_SP, cos_SP, None if caches is None else caches[i], index,
                           train)
      new_caches.append(cache)
    logits_BSV = self.head(self.norm(x_BSD))
    return logits_BSV, (None if caches is None else new_caches)

  def __call__(self, codes_BL, labels_B, *, train: bool):
    """Teacher-forced next-token logits.

    Args:
      codes_BL: int codes [B, S], S ≤ L (normally S = L = h·w), row-major on the grid.
      labels_B: int class labels [B] in [0, num_classes] (num_classes = null class).
      train: enables label dropout and `dropout` (rng stream "dropout").
    Returns:
      logits_BSV: float32 [B, S, V]; position i predicts codes_BL[:, i].
    """
    if codes_BL.ndim != 2 or not 1 <= codes_BL.shape[1] <= self.seq_len:
      raise ConfigError(f"codes must be [batch, length ≤ {self.seq_len}] for grid {self.grid}, "
                        f"got shape {codes_BL.shape}; flatten the token grid row-major")
    x_BSD = self._class_tokens(labels_B, train)
    if codes_BL.shape[1] > 1:
      x_BSD = jnp.concatenate([x_BSD, self.tok_embeddings(codes_BL[:, :-1])], axis=1)
    x_BSD = self.token_dropout(x_BSD, deterministic=not train)
    logits_BSV, _ = self._run(x_BSD, 0, None, train)
    return logits_BSV.astype(jnp.float32)

  def init_cache(self, batch: int, dtype=None) -> KVCache:
    """Zero KV cache: per layer (k, v), each [batch, L, heads, head_dim] in `dtype` (default the
    compute dtype). Needs no parameters: call it on the unbound module."""
    shape = (batch, self.seq_len, self.size.heads, self.size.head_dim)
    dtype = dtype or self.dtype
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.size.depth)]

  def prefill(self, labels_B, cache: KVCache):
    """Class token at slot 0 -> (logits_BV for codes[:, 0], cache). No label dropout."""
    logits_B1V, cache = self._run(self._class_tokens(labels_B, False), 0, cache)
    return logits_B1V[:, 0].astype(jnp.float32), cache

  def decode_step(self, tokens_B, pos, cache: KVCache):
    """One cached step at sequence position `pos` (1 ≤ pos < L; may be traced).

    Args:
      tokens_B: int codes[:, pos − 1], the input at position pos.
      pos: the slot to fill; attention sees slots ≤ pos.
      cache: from `prefill` / earlier steps (slots < pos filled).
    Returns:
      (logits_BV predicting codes[:, pos], updated cache).
    """
    x_B1D = self.tok_embeddings(jnp.asarray(tokens_B, jnp.int32))[:, None]
    logits_B1V, cache = self._run(x_B1D, pos, cache)
    return logits_B1V[:, 0].astype(jnp.float32), cache


def _validate(model: LlamaGen) -> None:
  if len(model.grid) != 2 or min(model.grid) < 1:
    raise ConfigError(f"LlamaGen grid must be (h, w) with h, w ≥ 1, got {model.grid}")
  if model.size.width % model.size.heads:
    raise ConfigError(f"width {model.size.width} is not divisible by heads {model.size.heads}; "
                      "change the size")
  if model.size.head_dim % 4:
    raise ConfigError(f"2-D RoPE needs head_dim % 4 == 0 (an even pair count per axis), got "
                      f"head_dim {model.size.head_dim}; change width or heads")
  if model.vocab_size < 1 or model.num_classes < 1:
    raise ConfigError(f"vocab_size and num_classes must be ≥ 1, got {model.vocab_size}, "
                      f"{model.num_classes}")
  if not 0.0 <= model.class_dropout < 1.0:
    raise ConfigError(f"class_dropout must be in [0, 1), got {model.class_dropout}")
  swiglu_hidden(model.size.width, model.mlp_multiple_of)


def next_token_loss(logits_BLV, codes_BL):
  """Mean cross-entropy of logits_BLV against codes_BL, and metrics {"loss", "accuracy"}."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, codes_BL)
  loss = ce_BL.mean()
  accuracy = (jnp.argmax(logits_BLV, -1) == codes_BL).mean()
  return loss, {"loss": loss, "accuracy": accuracy}
