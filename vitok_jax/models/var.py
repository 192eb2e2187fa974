"""VAR: next-scale prediction on multi-scale residual codes (Tian et al. 2024), and its sampler.

The token sequence is the concatenation of the K scales of a `multiscale` schedule, row-major within
a scale (L = Σ s_k² tokens, 680 at VAR's 256p). Token positions of scale k predict scale k's codes;
their inputs are the start token (scale 0, from the class embedding) or the cumulative f_hat of
scales < k area-downsampled to scale k (`ResidualQuantizer.teacher_inputs`, L − s_0² tokens).

The transformer is VAR's: GPT-2-like pre-LN blocks with AdaLN class conditioning (per block a
Linear(silu(class embedding)) gives gate/scale/shift for attention and MLP; LayerNorms without
affine), a GELU(tanh) MLP of 4·width, a learned level (scale) embedding plus a learned absolute
position embedding, an AdaLN before the head and a block-causal mask (scale k sees scales ≤ k, its
own scale both ways), initialised as VAR's `init_weights` (`var_init`). Attention uses VAR's
released setting: l2-normalised q and k with a learned per-head scale (init 4, clamped at 100), so
the logit scale passed to attention is 1 (the alternative, 0.25/√head_dim on raw q·k, is not
implemented). q, k and v each have a bias (VAR has
none on k; with l2-normalised keys it is a harmless extra).

Heads: "softmax" (Linear(width, vocab_size), VAR) or "bitwise" (Linear(width, 2·d) read as
interleaved (d, 2) pairs: output 2i + j is the logit of bit i = j, bit 0 the most significant when
packed; Infinity). Logits are float32: [B, L, V] or [B, L, d, 2].

Sampling (`sample_var`) runs scale by scale with a KV cache: scale k's tokens are one chunk that
attends to the cache of scales < k and to itself; each scale is one jitted program (sizes differ).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitok_jax import kernels
from vitok_jax.errors import ConfigError
from vitok_jax.kernels import masks
from vitok_jax.models import multiscale, quantizers, sampling, vit
from vitok_jax.models.vit import constrain, dense, partitioned

HEADS = ("softmax", "bitwise")
CFG_SCHEDULES = ("var", "constant")
MAX_ATTN_SCALE = 100.0   # VAR clamps the learned per-head attention scale at log(100).


# VAR's init_weights as its README trains: Linear kernels and embeddings a truncated normal of
# std √(1/(3·width)), biases 0; the heads' kernel × 0.02 (hd0), the AdaLN Linears' × 0.5 (aln)
# but the blocks' gate rows (g1, g2) × `adaln_gate_init(depth)` (alng), and each block's attention
# output and fc2 ÷ √(2·depth).
INIT_HEAD, INIT_ADALN = 0.02, 0.5


def adaln_gate_init(depth: int) -> float:
  """VAR's alng: 1e-3 for d16 and d20 (and the shallower sizes here), 1e-4 for d24, 1e-5 for
  d30."""
  return 1e-3 if depth <= 20 else 1e-4 if depth < 30 else 1e-5


def var_init(width: int, scale=1.0):
  """A kernel init: VAR's normal of std √(1/(3·width)) truncated at ±2 (torch's trunc_normal_,
  bounds absolute, so at these stds a plain normal) times `scale`, a number or a vector over the
  output features (the last axis)."""
  std = math.sqrt(1 / width / 3)
  base = jax.nn.initializers.truncated_normal(std, lower=-2 / std, upper=2 / std)

  def init(key, shape, dtype=jnp.float32):
    return base(key, shape, dtype) * jnp.asarray(scale, dtype)
  return init


def var_drop_path(depth: int) -> float:
  """VAR's stochastic-depth rate of its last block: 0.1·depth/24."""
  return 0.1 * depth / 24


INFINITY_DROP_PATH = 0.1  # Infinity's models (layer12 … 48, 2b) use 0.1 at every depth.


def scale_offsets(scales: Sequence[int]) -> tuple[int, ...]:
  """Start of each scale's tokens in the sequence, then the total: (0, 1, 5, 14, …, L)."""
  return tuple(int(x) for x in np.concatenate([[0], np.cumsum([s * s for s in scales])]))


class AdaLNBlock(nn.Module):
  """VAR's AdaLNSelfAttn: x += g1·attn(LN(x)·(1 + s1) + b1); x += g2·mlp(LN(x)·(1 + s2) + b2).

  (g1, g2, s1, s2, b1, b2) = Linear(silu(cond)) split in that order (VAR's `ada_gss`).
  """
  heads: int
  mlp_hidden: int
  attn_impl: str = "auto"
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  depth: int = 1  # The model's blocks: the residual outputs' init is ÷ √(2·depth) (`var_init`).
  drop_path: float = 0.0  # Where train: each residual branch dropped per example at this rate.

  @nn.compact
  def __call__(self, x_BLD, cond_BD, *, block_ids=None, prefix_kv=None, train: bool = False):
    """One block on tokens x [B, L, D].

    Args:
      x_BLD: the tokens of this call (the whole sequence, or one scale's chunk).
      cond_BD: class embedding [B, D].
      block_ids: [L] block-causal ids (full sequence), or None (a chunk sees all keys).
      prefix_kv: (k, v) [B, S, H, K] of earlier scales (cached decoding), or None.
      train: drop paths (`drop_path`; rng stream "dropout").
    Returns:
      (x_BLD, (k_BLHK, v_BLHK)): the new tokens and this call's keys/values for the cache.
    """
    width = x_BLD.shape[-1]
    head_dim = width // self.heads
    ada_scale_6D = np.repeat([adaln_gate_init(self.depth), INIT_ADALN], [2 * width, 4 * width])
    ada_B6D = dense(6 * width, ("embed", "mlp"), self.dtype, "ada",
                    var_init(width, ada_scale_6D))(nn.silu(cond_BD))
    gate1, gate2, scale1, scale2, shift1, shift2 = jnp.split(ada_B6D[:, None, :], 6, axis=-1)
    norm = lambda name: nn.LayerNorm(self.norm_eps, dtype=self.dtype, use_bias=False,
                                     use_scale=False, name=name)

    h_BLD = norm("norm_attn")(x_BLD) * (1.0 + scale1) + shift1
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, head_dim)
    q_BLHK, k_BLHK, v_BLHK = (
        split(dense(width, ("embed", "heads"), self.dtype, name, var_init(width))(h_BLD))
        for name in ("query", "key", "value"))
    log_scale_H = self.param("attn_scale", partitioned(
        nn.initializers.constant(math.log(4.0)), ("heads",)), (self.heads,), jnp.float32)
    scale_H = jnp.exp(jnp.minimum(log_scale_H, math.log(MAX_ATTN_SCALE)))
    q_BLHK = (quantizers.l2_normalize(q_BLHK) * scale_H[:, None]).astype(self.dtype)
    k_BLHK = quantizers.l2_normalize(k_BLHK).astype(self.dtype)
    q_BLHK = constrain(q_BLHK, ("batch", "length", "act_heads", "act_kv"))
    keys_BSHK, values_BSHK = k_BLHK, v_BLHK
    if prefix_kv is not None:
      keys_BSHK = jnp.concatenate([prefix_kv[0].astype(self.dtype), k_BLHK], axis=1)
      values_BSHK = jnp.concatenate([prefix_kv[1].astype(self.dtype), v_BLHK], axis=1)
    out_BLHK = kernels.dot_product_attention(q_BLHK, keys_BSHK, values_BSHK, block_ids=block_ids,
                                             scale=1.0, impl=self.attn_impl)
    residual_init = var_init(width, 1 / math.sqrt(2 * self.depth))
    out_BLD = dense(width, ("heads", "embed"), self.dtype, "out", residual_init)(
        out_BLHK.reshape(*out_BLHK.shape[:-2], width))
    # Stochastic depth: a whole branch per example, the rest scaled by 1 / (1 − rate) (DropPath).
    drop = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(y, deterministic=not train)
    x_BLD = x_BLD + drop(gate1 * out_BLD)

    h_BLD = norm("norm_mlp")(x_BLD) * (1.0 + scale2) + shift2
    h_BLF = nn.gelu(dense(self.mlp_hidden, ("embed", "mlp"), self.dtype, "fc1",
                          var_init(width))(h_BLD))
    h_BLF = constrain(h_BLF, ("batch", "length", "act_mlp"))
    fc2 = dense(width, ("mlp", "embed"), self.dtype, "fc2", residual_init)
    x_BLD = x_BLD + drop(gate2 * fc2(h_BLF))
    return constrain(x_BLD, ("batch", "length", "act_embed")), (k_BLHK, v_BLHK)


class VAR(nn.Module):
  """VAR / Infinity transformer over the tokens of `scales` (see the module docstring).

  Fields:
    size: transformer size (VAR's dN: `vit.decode_size("d16", "var")` = width 1024, 16, 16).
    scales: the side of each scale's square token map, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16).
    latent_channels: C, the tokenizer's channels (the inputs' last axis).
    num_classes: class labels are 0 … num_classes − 1; num_classes is the null class (CFG, dropout).
    head: "softmax" (vocab_size logits) or "bitwise" (bits binary logits).
    vocab_size: codebook size for head="softmax".
    bits: d for head="bitwise" (default latent_channels, as in Infinity's BSQ).
    class_dropout: probability of replacing a label by the null class when train=True (needs a
      "dropout" rng).
    drop_path: the last block's stochastic-depth rate when train=True, rising linearly from 0 at
      the first (VAR: 0.1·depth/24, `var_drop_path`; Infinity: 0.1).
  """
  size: vit.ViTSize
  scales: tuple[int, ...]
  latent_channels: int
  num_classes: int
  head: str = "softmax"
  vocab_size: int = 4096
  bits: int | None = None
  class_dropout: float = 0.1
  attn_impl: str = "auto"
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  drop_path: float = 0.0

  @property
  def num_bits(self) -> int:
    return self.latent_channels if self.bits is None else self.bits

  @property
  def num_tokens(self) -> int:
    return multiscale.token_count(self.scales)

  def _check(self):
    if self.head not in HEADS:
      raise ConfigError(f"VAR head={self.head!r}; use one of {HEADS}")
    if not self.scales or any(b <= a for a, b in zip(self.scales, self.scales[1:])):
      raise ConfigError(f"VAR scales={self.scales} must be a non-empty increasing tuple of sides")
    if self.size.width % self.size.heads:
      raise ConfigError(f"VAR width {self.size.width} is not divisible by heads {self.size.heads}")

  @nn.compact
  def __call__(self, inputs_BLC, labels_B, *, train: bool = False, scale: int | None = None,
               cache=None):
    """Logits of every token (teacher forcing), or of one scale with a KV cache.

    Args:
      inputs_BLC: full mode (scale=None): the L − s_0² teacher inputs [B, L − s_0², C]
        (`ResidualQuantizer.teacher_inputs`). Cached mode: scale k's inputs [B, s_k², C], None for
        k = 0 (the start token).
      labels_B: int class labels [B]; num_classes is the null class.
      train: apply class dropout and drop paths (rng "dropout").
      scale: None for the full block-causal forward, else the scale index k (static).
      cache: with `scale`, the KV cache of `init_cache`, holding scales < k.
    Returns:
      full mode: logits [B, L, V] (softmax) or [B, L, d, 2] (bitwise), float32.
      cached mode: (logits of scale k's s_k² tokens, the cache with scale k written).
    """
    self._check()
    width, scales = self.size.width, self.scales
    offsets = scale_offsets(scales)
    num_first = scales[0] ** 2
    init = lambda axes: partitioned(var_init(width), axes)
    if train and self.class_dropout > 0:
      drop_B = jax.random.uniform(self.make_rng("dropout"), labels_B.shape) < self.class_dropout
      labels_B = jnp.where(drop_B, self.num_classes, labels_B)
    cond_BD = nn.Embed(self.num_classes + 1, width, dtype=self.dtype, name="class_emb",
                       embedding_init=init((None, "embed")))(labels_B)
    pos_start_1SD = self.param("pos_start", init((None, None, "embed")), (1, num_first, width))
    pos_1LD = self.param("pos", init((None, None, "embed")), (1, offsets[-1], width))
    level_emb = nn.Embed(len(scales), width, dtype=self.dtype, name="level_emb",
                         embedding_init=init((None, "embed")))
    word_embed = dense(width, ("latent", "embed"), self.dtype, "word_embed", var_init(width))
    start_BSD = cond_BD[:, None, :] + pos_start_1SD.astype(self.dtype)

    if scale is None:
      if cache is not None:
        raise ConfigError("a VAR cache needs scale=k (decode one scale at a time)")
      start, end, block_ids = 0, offsets[-1], masks.var_block_ids(scales)
      expected = offsets[-1] - num_first
      if inputs_BLC is None or inputs_BLC.shape[1] != expected:
        got = None if inputs_BLC is None else inputs_BLC.shape
        raise ConfigError(f"VAR needs {expected} teacher inputs (scales {scales} minus the first), "
                          f"got {got}; build them with ResidualQuantizer.teacher_inputs")
      x_BLD = start_BSD
      if expected:
        x_BLD = jnp.concatenate([start_BSD, word_embed(inputs_BLC.astype(self.dtype))], axis=1)
    else:
      if not 0 <= scale < len(scales) or cache is None:
        raise ConfigError(f"cached VAR decoding needs 0 <= scale < {len(scales)} and a cache from "
                          f"init_cache (got scale={scale}, cache={'set' if cache else None})")
      start, end, block_ids = offsets[scale], offsets[scale + 1], None
      if scale == 0:
        x_BLD = start_BSD
      else:
        if inputs_BLC is None or inputs_BLC.shape[1] != end - start:
          raise ConfigError(f"scale {scale} needs inputs [B, {end - start}, C]; got "
                            f"{None if inputs_BLC is None else inputs_BLC.shape}")
        x_BLD = word_embed(inputs_BLC.astype(self.dtype))
    levels_L = np.repeat(np.arange(len(scales)), [s * s for s in scales])[start:end]
    x_BLD = (x_BLD + level_emb(jnp.asarray(levels_L))[None]
             + pos_1LD[:, start:end].astype(self.dtype))
    x_BLD = constrain(x_BLD, ("batch", "length", "act_embed"))

    new_cache = []
    drop_paths = np.linspace(0.0, self.drop_path, self.size.depth)
    for i in range(self.size.depth):
      prefix = None if cache is None else tuple(c[:, :start] for c in cache[i])
      x_BLD, kv = AdaLNBlock(self.size.heads, int(self.mlp_ratio * width), self.attn_impl,
                             self.norm_eps, self.dtype, self.size.depth, float(drop_paths[i]),
                             name=f"block{i}")(x_BLD, cond_BD, block_ids=block_ids,
                                               prefix_kv=prefix, train=train)
      if cache is not None:
        new_cache.append(tuple(jax.lax.dynamic_update_slice_in_dim(c, t.astype(c.dtype), start, 1)
                               for c, t in zip(cache[i], kv)))

    # VAR's AdaLNBeforeHead: LN(x)·(1 + scale) + shift, (scale, shift) = Linear(silu(cond)).
    ada_B2D = dense(2 * width, ("embed", "mlp"), self.dtype, "head_ada",
                    var_init(width, INIT_ADALN))(nn.silu(cond_BD))
    head_scale, head_shift = jnp.split(ada_B2D[:, None, :].astype(jnp.float32), 2, axis=-1)
    h_BLD = nn.LayerNorm(self.norm_eps, use_bias=False, use_scale=False, name="head_norm")(
        x_BLD.astype(jnp.float32)) * (1.0 + head_scale) + head_shift
    out = self.vocab_size if self.head == "softmax" else 2 * self.num_bits
    head = dense(out, ("embed", "vocab"), jnp.float32, "head", var_init(width, INIT_HEAD))
    logits = head(h_BLD)
    if self.head == "bitwise":
      logits = bitwise_logits(logits)
    return logits if cache is None else (logits, tuple(new_cache))

  def decode_scale(self, k: int, inputs_BLC, labels_B, cache):
    """Cached decoding of scale k: (logits of its tokens, cache). See `__call__`."""
    return self(inputs_BLC, labels_B, train=False, scale=k, cache=cache)


def init_cache(model: VAR, batch: int, dtype=None):
  """Zero KV cache for all L tokens: per block (k, v), each [batch, L, heads, head_dim]."""
  dtype = model.dtype if dtype is None else dtype
  shape = (batch, model.num_tokens, model.size.heads, model.size.head_dim)
  return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(model.size.depth))


def bitwise_logits(logits_BL2d):
  """Head outputs [..., 2·d] -> [..., d, 2]: output 2i + j is the logit of bit i = j."""
  return logits_BL2d.reshape(*logits_BL2d.shape[:-1], logits_BL2d.shape[-1] // 2, 2)


# --------------------------------------------------------------------------------------------
# Targets and losses.


def flatten_codes(codes: Sequence[jax.Array]):
  """Per-scale int codes [B, s, s] -> [B, L] int32 (row-major within a scale, scales in order)."""
  return jnp.concatenate([c.reshape(c.shape[0], -1) for c in codes], axis=1).astype(jnp.int32)


def bit_labels(codes: Sequence[jax.Array], bits: int):
  """Per-scale packed BSQ codes uint32 [B, s, s, W] -> bit labels int32 [B, L, d] (bit 0 = MSB)."""
  flat = jnp.concatenate([c.reshape(c.shape[0], -1, c.shape[-1]) for c in codes], axis=1)
  return quantizers.unpack_bits(flat, bits).astype(jnp.int32)


def scale_loss_weights(scales: Sequence[int]) -> np.ndarray:
  """[L] token weights of Infinity's reweight_loss_by_scale: a token of scale k weighs s_K/s_k
  (coarse scales' few tokens count more), normalised to sum to 1."""
  weights_L = np.repeat([scales[-1] / s for s in scales], [s * s for s in scales])
  return (weights_L / weights_L.sum()).astype(np.float32)


def _weighted_mean(values_BL, token_weights_L):
  """Mean over tokens and batch, the tokens weighted by `token_weights_L` (summing to 1) if
  given."""
  if token_weights_L is None:
    return values_BL.mean()
  return (values_BL * jnp.asarray(token_weights_L)).sum(-1).mean()


def var_loss(logits_BLV, codes: Sequence[jax.Array], token_weights_L=None):
  """Mean cross-entropy over all tokens of all scales (VAR's L_mean) and metrics.

  Args:
    logits_BLV: [B, L, V] from `VAR(head="softmax")`.
    codes: per-scale int codes [B, s_k, s_k] (the tokenizer's codes tuple).
    token_weights_L: the loss's token weights (`scale_loss_weights`), or None: a plain mean.
  Returns:
    (loss, metrics): metrics ce, accuracy (plain means) and their last-scale values ce_last,
    accuracy_last (VAR's L_tail).
  """
  targets_BL = flatten_codes(codes)
  if targets_BL.shape != logits_BLV.shape[:2]:
    raise ConfigError(f"logits {logits_BLV.shape} do not match the {targets_BL.shape[1]} code "
                      "tokens; the model's scales must be the tokenizer's")
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                          targets_BL)
  correct_BL = (jnp.argmax(logits_BLV, -1) == targets_BL).astype(jnp.float32)
  last = codes[-1][0].size
  return _weighted_mean(ce_BL, token_weights_L), {
      "ce": ce_BL.mean(), "accuracy": correct_BL.mean(), "ce_last": ce_BL[:, -last:].mean(),
      "accuracy_last": correct_BL[:, -last:].mean()}


def bitwise_loss(logits_BLd2, bit_labels_BLd, token_weights_L=None):
  """Infinity's bitwise loss: 2-way cross-entropy per bit, mean over bits and tokens.

  Args:
    logits_BLd2: [B, L, d, 2] from `VAR(head="bitwise")`.
    bit_labels_BLd: {0, 1} ints [B, L, d] (`bit_labels` or `infinity.self_correction_inputs`).
    token_weights_L: the loss's token weights (`scale_loss_weights`), or None: a plain mean.
  Returns:
    (loss, metrics): ce (a plain mean), bit_accuracy, token_accuracy (every bit of a token
    right).
  """
  labels = bit_labels_BLd.astype(jnp.int32)
  if labels.shape != logits_BLd2.shape[:-1]:
    raise ConfigError(f"bit labels {labels.shape} do not match logits {logits_BLd2.shape}; the "
                      "model's scales and bits must be the tokenizer's")
  ce_BLd = optax.softmax_cross_entropy_with_integer_labels(logits_BLd2.astype(jnp.float32), labels)
  correct_BLd = jnp.argmax(logits_BLd2, -1) == labels
  loss = _weighted_mean(ce_BLd.mean(-1), token_weights_L)
  return loss, {"ce": ce_BLd.mean(), "bit_accuracy": correct_BLd.mean(dtype=jnp.float32),
                "token_accuracy": correct_BLd.all(-1).mean(dtype=jnp.float32)}


# --------------------------------------------------------------------------------------------
# Sampling.


def cfg_weights(cfg_scale: float, num_scales: int, schedule: str = "var") -> tuple[float, ...]:
  """Guidance weight w_k of each scale; guided logits = cond + (w_k − 1)·(cond − uncond).

  "var": VAR's ramp t_k = cfg·k/(K − 1) with logits (1 + t_k)·cond − t_k·uncond, i.e.
    w_k = 1 + t_k. The first stage is unguided (w_0 = 1: the conditional model), the last gets
    the full cfg; cfg_scale = 0 is the conditional model everywhere, and VAR's published cfg
    (1.5) means what it means there.
  "constant": Infinity's cfg·cond + (1 − cfg)·uncond at every scale, w_k = cfg (cfg = 1 is the
    conditional model).
  """
  if schedule not in CFG_SCHEDULES:
    raise ConfigError(f"cfg_schedule={schedule!r}; use one of {CFG_SCHEDULES}")
  if schedule == "constant":
    return (float(cfg_scale),) * num_scales
  return tuple(1.0 + cfg_scale * k / max(num_scales - 1, 1) for k in range(num_scales))


class NextInput(NamedTuple):
  """How `sample_var` makes scale k+1's inputs from scale k's codes with a tokenizer's quantiser:
  fn(variables, f_hat [B, h, h, C], codes_k, k) -> (f_hat, inputs [B, s_{k+1}², C]), jax-traceable,
  with f_hat starting at 0; and the `variables` it reads (the tokenizer's weights). Each scale's
  compiled step is cached per fn and takes the variables as an argument: a cached step closing
  over them would keep the first weights (or tracer) it was traced with."""
  fn: Callable
  variables: Any


@functools.lru_cache(maxsize=32)
def _scale_step(model: VAR, next_input_fn, k: int, guided: bool, top_k: int):
  """The jitted program of scale k: decode, guide, sample, next input."""
  side, last = model.scales[k], k == len(model.scales) - 1

  def step(params, next_variables, cache, f_hat_BHWC, inputs_BLC, labels_B, rng, weight, top_p,
           temperature):
    logits, cache = model.apply({"params": params}, k, inputs_BLC, labels_B, cache,
                                method=VAR.decode_scale)
    if guided:
      cond, uncond = jnp.split(logits, 2, axis=0)
      logits = cond + (weight - 1.0) * (cond - uncond)
    # Bitwise logits [..., d, 2]: each bit from its own 2-way softmax.
    tokens = sampling.sample_token(rng, logits, temperature, top_k, top_p)
    batch = tokens.shape[0]
    if model.head == "softmax":
      code = tokens.reshape(batch, side, side)
    else:
      code = quantizers.pack_bits(tokens.astype(bool)).reshape(batch, side, side, -1)
    next_BLC = None
    if not last:
      f_hat_BHWC, next_BLC = next_input_fn(next_variables, f_hat_BHWC, code, k)
      if guided:
        next_BLC = jnp.concatenate([next_BLC, next_BLC], axis=0)
    return code, cache, f_hat_BHWC, next_BLC

  donate = (2,) if jax.default_backend() != "cpu" else ()
  return jax.jit(step, donate_argnums=donate)


def sample_var(model: VAR, params, labels_B, rng, next_input: NextInput, *,
               cfg_scale: float | None = 1.5, top_k: int = 0, top_p: float = 1.0,
               temperature: float = 1.0, cfg_schedule: str = "var"):
  """Samples the codes of every scale for class labels [B], coarse to fine with a KV cache.

  Args:
    model: the VAR (softmax or bitwise head); params: its params.
    labels_B: int class labels [B].
    rng: PRNG key (split into one key per scale; the draws do not depend on cfg).
    next_input: the tokenizer's next-scale inputs, `NextInput` (e.g. `residual_next_input`).
    cfg_scale: guidance, see `cfg_weights` (VAR: ramps as cfg·k/(K − 1), so the first stage is
      unguided and 0 is the conditional model). None skips the null-class half of the batch.
      With guidance, the batch is doubled with the null class and both halves share the inputs.
    top_k, top_p, temperature: see `sampling.sample_token` (top_k=1: greedy; top_p=1 disables).
    cfg_schedule: "var" or "constant" (Infinity).
  Returns:
    tuple of K per-scale codes: int32 [B, s, s] (softmax) or packed uint32 [B, s, s, W] (bitwise).
  """
  if temperature <= 0:
    raise ConfigError(f"temperature={temperature} must be > 0; use top_k=1 for greedy decoding")
  labels_B = jnp.asarray(labels_B, jnp.int32)
  batch, num_scales = labels_B.shape[0], len(model.scales)
  guided = cfg_scale is not None
  weights = cfg_weights(cfg_scale if guided else 0.0, num_scales, cfg_schedule)
  if guided:
    labels_B = jnp.concatenate([labels_B, jnp.full_like(labels_B, model.num_classes)])
  cache = init_cache(model, labels_B.shape[0])
  side = model.scales[-1]
  f_hat_BHWC = jnp.zeros((batch, side, side, model.latent_channels), jnp.float32)
  inputs_BLC, codes = None, []
  for k, key in enumerate(jax.random.split(rng, num_scales)):
    step = _scale_step(model, next_input.fn, k, guided, int(top_k))
    code, cache, f_hat_BHWC, inputs_BLC = step(
        params, next_input.variables, cache, f_hat_BHWC, inputs_BLC, labels_B, key,
        jnp.float32(weights[k]),
        jnp.float32(top_p), jnp.float32(temperature))
    codes.append(code)
  return tuple(codes)


def residual_next_input(residual: multiscale.ResidualQuantizer, variables,
                        size: int) -> NextInput:
  """`sample_var`'s NextInput from a ResidualQuantizer and its variables.

  For a full tokenizer pass its bottleneck's quantiser and the matching sub-tree, e.g.
  `residual_next_input(ResidualQuantizer(...), {"params": tok_params["bottleneck"]["residual"]},
  h)`; Infinity's BSQ (no φ) needs no params: `{}`.
  """
  return NextInput(_residual_next_input_fn(residual, size), variables)


@functools.lru_cache(maxsize=32)
def _residual_next_input_fn(residual: multiscale.ResidualQuantizer, size: int):
  """One function per (quantiser, size), so the per-scale steps compile once for it."""
  def fn(variables, f_hat_BHWC, code, k):
    return residual.apply(variables, f_hat_BHWC, code, k, size,
                          method=multiscale.ResidualQuantizer.next_scale_input)
  return fn
