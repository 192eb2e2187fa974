"""LARP: a holistic tokenizer with learned queries, stochastic VQ and a jointly trained AR prior.

Wang et al. 2024, "LARP: Tokenizing Videos with a Learned Autoregressive Generative Prior"
(shared/REFERENCE.md, "LARP"; official code hywang66/LARP).

  encoder  [patch tokens + fixed sin-cos positions, N learned queries] -> ViT (unmasked) -> keep
           the last N tokens -> linear to c -> l2-normalise.
  VQ       cosine lookup in a unit-norm codebook [K, c]; training samples each code from
           softmax(cos / 0.03), eval takes the argmax; output z + sg(e − z) (straight-through).
  decoder  [latents + fixed 1-D sin-cos positions, patch queries (fixed sin-cos grid positions +
           a learned type embedding)] -> ViT (unmasked) -> keep the last n_patch tokens -> pixels.
  prior    a small causal transformer over the quantised sequence z_q (gradients flow back into
           the encoder through the straight-through z_q, as in LARP): position i predicts code
           i + 1 with logits = cos(prior(z_q)_i, sg(e_k)) (LARP's l2-normalised prediction and
           latent_ce_temperature = 1).

Loss terms (weighted by config.loss, defaults from LARP's config): larp_vq = codebook + 0.25·commit
(weight 0.1) and larp_prior = the prior's cross-entropy (weight 0.06).

Scheduled sampling (LARP's mix_ss, n_rounds 2): given the training progress (step / steps), the
prior runs a second round on its input with a fraction min(0.5·progress/0.3, 0.5) of the tokens
(1..N−1) replaced by codes sampled from the first round's softmax, and the prior loss is the mean
of both rounds' cross-entropies (avg_loss_over_rounds). Without a progress (eval, `vitok eval`)
the prior is teacher-forced only.

The codes are a 1-D sequence of N integers per example (aux["codes"] [B, N] int32), not a grid:
`decode_codes` -> `LARP.decode(z, grid)` needs only the pixel token `grid` to lay out the output.
Shape suffixes: B batch, N queries (latent tokens), L sequence, P patch tokens, D width, C latent
channels, K codebook size.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vitok_jax import config_lib
from vitok_jax.errors import ConfigError
from vitok_jax.models import ar, bottlenecks, quantizers, tokenizer, vit

NAME = "larp"                               # config.model.bottleneck of a LARP tokenizer.
PRIOR_SIZE = vit.decode_size("Mu", "larp_prior")  # The prior for CPU runs (LARP uses gptc-S).
QUERY_INIT_STD = 0.02                       # LARP's query_init_std (timm's Gaussian init).
SS_MAX_RATIO, SS_PEAK_PROGRESS = 0.5, 0.3   # LARP's mix_ss_max_ratio, mix_ss_peak_steps_ratio.


def scheduled_sampling_ratio(progress):
  """The share of the prior's input tokens replaced by its own samples at `progress` in [0, 1]."""
  return jnp.minimum(SS_MAX_RATIO * progress / SS_PEAK_PROGRESS, SS_MAX_RATIO)


def sincos_table(width: int, grid: Sequence[int]) -> np.ndarray:
  """Fixed sin-cos positions of a row-major token `grid` (any number of axes): [prod(grid), width].

  Each axis gets an even share of the features (last axis first), each share [sin, cos] with
  frequencies 10000^(−k/(share/2)); left-over features are zero. For a 2-D grid and width % 4 == 0
  this is DiT's table (`dit.pos_embed_2d`); for a 1-D grid it is the 1-D table.
  """
  share = (width // len(grid)) // 2 * 2
  if share == 0:
    raise ConfigError(f"width {width} is too small for sin-cos positions over {len(grid)} axes")
  coords = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
  omega_F = 1.0 / 10_000.0 ** (np.arange(share // 2, dtype=np.float64) / (share / 2.0))
  parts = []
  for coord in reversed(coords):
    angles_LF = coord.reshape(-1, 1) * omega_F[None]
    parts += [np.sin(angles_LF), np.cos(angles_LF)]
  table = np.concatenate(parts, axis=1)
  table = np.pad(table, ((0, 0), (0, width - table.shape[1])))
  return table.astype(np.float32)


def stochastic_codes(rng, z_BNC, codes_KC, temperature: float):
  """Samples code indices [B, N] int32 from softmax(cos(z, e_k) / temperature) (unit z and e)."""
  cos_BNK = jnp.einsum("bnc,kc->bnk", z_BNC.astype(jnp.float32), codes_KC.astype(jnp.float32))
  return jax.random.categorical(rng, cos_BNK / temperature, axis=-1).astype(jnp.int32)


def _context_then_queries(transformer: nn.Module, context_BLD, queries_BQD):
  """Runs `transformer` (unmasked) over [context, queries] and keeps the Q query outputs."""
  x_BLD = jnp.concatenate([context_BLD, queries_BQD.astype(context_BLD.dtype)], axis=1)
  return transformer(x_BLD, (x_BLD.shape[1],))[:, -queries_BQD.shape[1]:]


class QueryEncoder(nn.Module):
  """N learned queries appended to the (position-embedded) patch tokens; returns [B, N, D]."""
  size: vit.ViTSize
  num_queries: int
  mlp_kind: str = "geglu"
  qk_norm: bool = False
  attn_impl: str = "auto"
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens_BPD):
    queries_ND = self.param("queries", vit.partitioned(nn.initializers.normal(QUERY_INIT_STD),
                                                       (None, "embed")),
                            (self.num_queries, self.size.width))
    queries_BND = jnp.broadcast_to(queries_ND, (tokens_BPD.shape[0], *queries_ND.shape))
    transformer = vit.Transformer(self.size, self.mlp_kind, "none", self.qk_norm, self.attn_impl,
                                  self.remat, self.dtype, name="vit")
    return _context_then_queries(transformer, tokens_BPD, queries_BND)


class PatchDecoder(nn.Module):
  """Latents (+ 1-D sin-cos) then one query per patch (sin-cos grid + type embedding) -> [B, P, D]."""
  size: vit.ViTSize
  mlp_kind: str = "geglu"
  qk_norm: bool = False
  attn_impl: str = "auto"
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, latents_BND, grid: Sequence[int]):
    width = self.size.width
    query_type_D = self.param("query_type", vit.partitioned(
        nn.initializers.normal(QUERY_INIT_STD), ("embed",)), (width,))
    queries_PD = jnp.asarray(sincos_table(width, grid)) + query_type_D
    queries_BPD = jnp.broadcast_to(queries_PD, (latents_BND.shape[0], *queries_PD.shape))
    latents_BND = latents_BND + jnp.asarray(sincos_table(width, (latents_BND.shape[1],)),
                                            latents_BND.dtype)
    transformer = vit.Transformer(self.size, self.mlp_kind, "none", self.qk_norm, self.attn_impl,
                                  self.remat, self.dtype, name="vit")
    return _context_then_queries(transformer, latents_BND, queries_BPD)


class ARPrior(nn.Module):
  """Causal Llama blocks (`ar.LlamaBlock`, 1-D RoPE) over c-dim tokens: [B, L, C] -> [B, L, C].

  Output i depends on inputs 0..i only.
  """
  size: vit.ViTSize = PRIOR_SIZE
  attn_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  # Where train: dropout of the input embedding and of each block's attention and MLP outputs
  # (GPT-C's embd_pdrop, resid_pdrop; its attention-probability dropout is not applied), drawn
  # from the "sample" rng stream.
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BLC, train: bool = False):
    channels, length = x_BLC.shape[-1], x_BLC.shape[1]
    h_BLD = vit.dense(self.size.width, ("latent", "embed"), self.dtype, "embed_in")(
        x_BLC.astype(self.dtype))
    h_BLD = nn.Dropout(self.dropout, rng_collection="sample")(h_BLD, deterministic=not train)
    sin_LP, cos_LP = (jnp.asarray(t) for t in vit.rope_tables((length,), self.size.head_dim, "1d"))
    hidden = vit.mlp_dim(self.size.width, "swiglu")
    for i in range(self.size.depth):
      h_BLD, _ = ar.LlamaBlock(self.size.heads, hidden, self.attn_impl, self.dtype, self.dropout,
                               "sample", name=f"block{i}")(h_BLD, sin_LP, cos_LP, train=train)
    h_BLD = vit.layer_norm(self.dtype, "norm_out")(h_BLD)
    return vit.dense(channels, ("embed", "latent"), self.dtype, "to_latent")(h_BLD)


class LARPBottleneck(nn.Module):
  """Linear to c, l2-normalise, stochastic cosine VQ, and the AR prior's cross-entropy.

  (z_q [B, N, C], aux): aux["codes"] [B, N] int32; aux["loss_terms"] larp_vq (codebook +
  commit_weight·commit, means over all elements as LlamaGen) and larp_prior; aux["metrics"] code
  usage (larp/usage, dead, perplexity), the unweighted codebook/commit and prior top-1 accuracy.
  """
  channels: int
  codebook_size: int = 8192
  temperature: float = 0.03
  commit_weight: float = 0.25
  prior: vit.ViTSize = PRIOR_SIZE
  prior_dropout: float = 0.0
  attn_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.to_latent = bottlenecks._to_latent(self.channels)  # pylint: disable=protected-access
    self.quantizer = quantizers.VectorQuantizer(self.channels, self.codebook_size, normalize=True,
                                                codebook_init="kaiming")
    self.prior_net = ARPrior(self.prior, self.attn_impl, self.dtype, self.prior_dropout,
                             name="prior")

  def prior_logits(self, zq_BNC, train: bool = False):
    """[B, N − 1, K]: row i scores code i + 1 from z_q[:, :i + 1]: the cosine of the prior's
    l2-normalised prediction with each code (codebook under stop-gradient), as LARP's
    `ar_predict` and `calculate_logits_and_ar_pred_cont`; with its dropout where train."""
    out_BLC = quantizers.l2_normalize(
        self.prior_net(zq_BNC[:, :-1], train=train).astype(jnp.float32))
    return out_BLC @ jax.lax.stop_gradient(self.quantizer.codes()).T

  def scheduled_round(self, zq_BNC, logits_BLK, progress):
    """The prior's second-round input: z_q with tokens 1..N−1 replaced, each with probability
    `scheduled_sampling_ratio(progress)`, by a code sampled from the first round's logits."""
    rng_codes, rng_mask = jax.random.split(self.make_rng("sample"))
    sampled_BL = jax.random.categorical(rng_codes, logits_BLK, axis=-1)
    sampled_BLC = jax.lax.stop_gradient(self.quantizer.lookup(sampled_BL))
    replace_BL1 = jax.random.uniform(rng_mask, (*sampled_BL.shape, 1)) < scheduled_sampling_ratio(
        progress)
    rest_BLC = jnp.where(replace_BL1, sampled_BLC, zq_BNC[:, 1:])
    return jnp.concatenate([zq_BNC[:, :1], rest_BLC], axis=1)

  def __call__(self, h_BND, *, sample: bool, progress=None):
    z_BNC = quantizers.l2_normalize(self.to_latent(h_BND.astype(jnp.float32)))
    if sample:
      index_BN = stochastic_codes(self.make_rng("sample"), z_BNC, self.quantizer.codes(),
                                  self.temperature)
      e_BNC = self.quantizer.lookup(index_BN)
    else:
      index_BN, e_BNC = self.quantizer.nearest(z_BNC)
    codebook = jnp.mean((e_BNC - jax.lax.stop_gradient(z_BNC)) ** 2)
    commit = jnp.mean((jax.lax.stop_gradient(e_BNC) - z_BNC) ** 2)
    zq_BNC = quantizers.straight_through(z_BNC, e_BNC)
    logits_BLK = self.prior_logits(zq_BNC, train=sample)
    labels_BL = index_BN[:, 1:]
    prior_ce = optax.softmax_cross_entropy_with_integer_labels(logits_BLK, labels_BL).mean()
    metrics = {**quantizers.code_usage_metrics(index_BN, self.codebook_size, prefix="larp"),
               "larp/codebook": codebook, "larp/commit": commit,
               "larp/prior_accuracy": jnp.mean(jnp.argmax(logits_BLK, -1) == labels_BL)}
    if sample and progress is not None:  # LARP's second round, the loss averaged over both.
      second_BLK = self.prior_logits(self.scheduled_round(zq_BNC, logits_BLK, progress),
                                     train=True)
      second_ce = optax.softmax_cross_entropy_with_integer_labels(second_BLK, labels_BL).mean()
      metrics.update({"larp/prior_ce_teacher_forced": prior_ce,
                      "larp/prior_ce_scheduled": second_ce})
      prior_ce = (prior_ce + second_ce) / 2
    terms = {"larp_vq": codebook + self.commit_weight * commit, "larp_prior": prior_ce}
    return zq_BNC, {"codes": index_BN, "loss_terms": terms, "metrics": metrics}

  def decode_codes(self, index_BN, grid=None):
    """int codes [B, N] -> unit code vectors [B, N, C] (the decoder's input)."""
    del grid
    return self.quantizer.lookup(index_BN)


class LARP(nn.Module):
  """Holistic tokenizer: N learned queries -> stochastic VQ codes [B, N] -> decoder -> pixels.

  Same interface as `tokenizer.ViTok`: `encode(x, sample=...) -> (z [B, N, C], aux, grid)`,
  `decode(z, grid) -> pixels`, `__call__(x, sample=True) -> (recon, aux)`, and
  `bottleneck_layer.decode_codes(codes, grid)` for the codes store. `grid` is the pixel token grid
  (H/p, W/p) or (T/q, H/p, W/p), from which the decoder's patch queries are laid out.
  """
  encoder: vit.ViTSize
  decoder: vit.ViTSize
  patch: tuple[int, ...]          # (p, p) for images, (q, p, p) for video tubelets.
  pixel_channels: int             # C of the input pixels.
  latent_channels: int            # c of the codes.
  num_queries: int = 32           # N latent tokens (LARP: 1024).
  codebook_size: int = 8192
  temperature: float = 0.03       # Of the stochastic code sampling at train time.
  prior: vit.ViTSize = PRIOR_SIZE
  prior_dropout: float = 0.0      # The prior's dropout in training (LARP's GPT-C: 0.1).
  mlp_kind: str = "geglu"
  qk_norm: bool = False
  attn_impl: str = "auto"
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @property
  def bottleneck(self) -> str:
    """The config name (code that reads `model.bottleneck`, e.g. FLOP counts, sees "larp")."""
    return NAME

  def setup(self):
    if self.num_queries < 2:
      raise ConfigError(f"LARP needs num_queries >= 2 (the prior predicts code i + 1 from codes "
                        f"<= i), got {self.num_queries}; set queries=N, e.g. queries=32")
    common = dict(mlp_kind=self.mlp_kind, qk_norm=self.qk_norm, attn_impl=self.attn_impl,
                  remat=self.remat, dtype=self.dtype)
    dense = lambda features, axes, name: vit.dense(features, axes, self.dtype, name)
    self.patch_embed = dense(self.encoder.width, ("patch", "embed"), "patch_embed")
    self.encoder_net = QueryEncoder(self.encoder, self.num_queries, **common, name="encoder")
    self.bottleneck_layer = LARPBottleneck(
        self.latent_channels, self.codebook_size, self.temperature, prior=self.prior,
        prior_dropout=self.prior_dropout, attn_impl=self.attn_impl, dtype=self.dtype,
        name="bottleneck")
    self.latent_embed = dense(self.decoder.width, ("latent", "embed"), "latent_embed")
    self.decoder_net = PatchDecoder(self.decoder, **common, name="decoder")
    self.to_pixels = dense(math.prod(self.patch) * self.pixel_channels, ("embed", "patch"),
                           "to_pixels")

  def encode(self, x, *, sample: bool = False, progress=None):
    """x: [B, H, W, C] or [B, T, H, W, C] in [-1, 1] -> (z_q [B, N, c], aux, token grid).
    progress: the training step / steps, for the prior's scheduled sampling (with sample)."""
    grid = tokenizer.token_grid(x.shape[1:-1], self.patch)
    tokens_BPD = self.patch_embed(tokenizer.patchify(x.astype(self.dtype), self.patch))
    tokens_BPD = tokens_BPD + jnp.asarray(sincos_table(self.encoder.width, grid), self.dtype)
    z_BNC, aux = self.bottleneck_layer(self.encoder_net(tokens_BPD), sample=sample,
                                       progress=progress)
    return z_BNC, aux, grid

  def decode(self, z_BNC, grid: Sequence[int]):
    """z [B, N, c] -> pixels [B, (T,) H, W, C] (float32) on the pixel token `grid`."""
    if z_BNC.shape[1] != self.num_queries:
      raise ConfigError(f"LARP decodes {self.num_queries} latent tokens, got {z_BNC.shape[1]}")
    h_BPD = self.decoder_net(self.latent_embed(z_BNC.astype(self.dtype)), tuple(grid))
    return tokenizer.unpatchify(self.to_pixels(h_BPD).astype(jnp.float32), self.patch, grid)

  def __call__(self, x, *, sample: bool = True, progress=None):
    """Reconstruction [same shape as x] and aux (codes, loss terms incl. the prior CE, metrics)."""
    z_BNC, aux, grid = self.encode(x, sample=sample, progress=progress)
    return self.decode(z_BNC, grid), aux


def from_config(model_cfg: ml_collections.ConfigDict, pixel_channels: int) -> LARP:
  """The LARP of config.model (bottleneck="larp", num_queries = N; rope is not used). A run saved
  before the prior's fields trains on as it did (`config_lib.ADDED_FIELDS`)."""
  legacy = config_lib.ADDED_FIELDS
  return LARP(
      encoder=vit.decode_size(model_cfg.encoder),
      decoder=vit.decode_size(model_cfg.decoder),
      patch=tuple(model_cfg.patch),
      pixel_channels=pixel_channels,
      latent_channels=model_cfg.channels,
      num_queries=model_cfg.num_queries,
      mlp_kind=model_cfg.mlp,
      qk_norm=model_cfg.qk_norm,
      attn_impl=model_cfg.attn_impl,
      remat=model_cfg.remat,
      dtype=jnp.dtype(model_cfg.dtype),
      prior=vit.decode_size(model_cfg.get("prior_size", legacy["model.prior_size"]),
                            "larp_prior"),
      prior_dropout=model_cfg.get("prior_dropout", legacy["model.prior_dropout"]),
      **({"codebook_size": model_cfg.codebook_size} if model_cfg.get("codebook_size") else {}),
  )
