"""Analytic FLOP accounting for ViT transformers and the ViTok tokenizer, plus XLA's own count.

Convention (shared/REFERENCE.md, "FLOPs convention"): a matmul [m, k] x [k, n] costs 2·m·n·k
FLOPs; self-attention costs 4·S²·D per layer and example (QKᵀ and AV, D = heads·head_dim), halved
for causal attention; a training step costs 3 × the forward pass (forward + 2 × for the backward).
The ViTok paper's "GFLOPs" count multiply-adds: its S-B/16 at 256p, 34.8, is 69.5 GFLOPs here.

Only matmuls are counted. Norms, biases, activations, RoPE, softmax, residual adds and the
bottleneck's sampling/KL are elementwise, O(tokens·width) (softmax O(S²·heads)), and left out; they
are a few percent of the total at ViT widths and vanish relative to the matmuls as width grows.
All counts are per example, as Python ints (exact, no overflow).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax

from vitok_jax.errors import ConfigError
from vitok_jax.models import bottlenecks, multiscale, tokenizer, vit

# Outputs of the projection into the bottleneck per latent channel: (mean, logvar) for the Gaussian,
# one value for the quantisers. Add an entry for every new bottleneck.
BOTTLENECK_OUT_PER_CHANNEL = {"gaussian": 2, "vq": 1, "vq1k": 1, "vq1k_ent": 1, "bsq": 1,
                              "msvq": 1, "msvq512": 1, "msbsq": 1}


def dense_flops(tokens: int, fan_in: int, fan_out: int) -> int:
  """A Dense layer [tokens, fan_in] x [fan_in, fan_out]: 2·tokens·fan_in·fan_out FLOPs."""
  return 2 * tokens * fan_in * fan_out


def attention_flops(size: vit.ViTSize, tokens: int, causal: bool = False) -> int:
  """QKᵀ and AV of one layer for one example: 4·S²·D FLOPs (S = tokens, D = heads·head_dim).

  Halved when `causal` (only the lower triangle of the S×S scores is needed).
  """
  flops = 4 * tokens * tokens * size.heads * size.head_dim
  return flops // 2 if causal else flops


def mlp_flops(width: int, hidden: int, tokens: int, mlp_kind: str) -> int:
  """One MLP for one example: two matmuls (in, out) for "gelu", three (gate, up, out) for gated.

  At equal `hidden` a gated MLP costs 1.5 × a plain one; with `vit.mlp_dim`'s hidden widths
  (≈8/3·width gated vs 4·width plain) both cost ≈16·tokens·width² FLOPs.
  """
  if mlp_kind not in vit.MLP_KINDS:
    raise ConfigError(f"unknown mlp kind {mlp_kind!r}; use one of {vit.MLP_KINDS}")
  num_matmuls = 2 if mlp_kind == "gelu" else 3
  return num_matmuls * dense_flops(tokens, width, hidden)


def transformer_forward_flops(size: vit.ViTSize, tokens: int, mlp_kind: str,
                              causal: bool = False) -> int:
  """Forward FLOPs of a `vit.Transformer` for one example of `tokens` tokens.

  Per layer: q, k, v and out projections (4 × 2·S·D·D), attention scores and AV (4·S²·D) and the
  MLP (gate included for gated kinds). Norms and other elementwise ops are ignored (see module
  docstring).
  """
  inner = size.heads * size.head_dim
  projections = 4 * dense_flops(tokens, size.width, inner)
  mlp = mlp_flops(size.width, vit.mlp_dim(size.width, mlp_kind), tokens, mlp_kind)
  return size.depth * (projections + attention_flops(size, tokens, causal) + mlp)


def _check_pixels(model: tokenizer.ViTok, pixel_shape: Sequence[int]) -> tuple[int, ...]:
  """Validates (H, W, C) / (T, H, W, C) against the model and returns the token grid."""
  if pixel_shape[-1] != model.pixel_channels:
    raise ConfigError(f"pixel_shape {tuple(pixel_shape)} has {pixel_shape[-1]} channels but the "
                      f"model expects pixel_channels={model.pixel_channels}")
  return tokenizer.token_grid(pixel_shape[:-1], model.patch)


def tokens_per_example(model: tokenizer.ViTok, pixel_shape: Sequence[int]) -> int:
  """Number of latent tokens N for one example of shape (H, W, C) or (T, H, W, C): the patch/tubelet
  tokens of ViTok, the learned queries (model.num_queries) of LARP."""
  grid = _check_pixels(model, pixel_shape)
  return model.num_queries if model.bottleneck == "larp" else math.prod(grid)


def bottleneck_floats(model: tokenizer.ViTok, pixel_shape: Sequence[int]) -> int:
  """E = N·c: floats in the latent of one example (the scaling variable of ViTok)."""
  return tokens_per_example(model, pixel_shape) * model.latent_channels


def code_bits_per_example(model: tokenizer.ViTok, pixel_shape: Sequence[int]) -> float | None:
  """Bits in the discrete codes of one example (None for a continuous bottleneck).

  VQ: tokens × log2 K; BSQ: tokens × c; multi-scale: the tokens of every scale of the schedule;
  LARP: N queries × log2 K. Compares tokenizer kinds at equal bits.
  """
  if model.bottleneck == "larp":
    _check_pixels(model, pixel_shape)
    return model.num_queries * math.log2(model.codebook_size)
  if model.bottleneck == "gaussian":
    _check_pixels(model, pixel_shape)
    return None
  module, tokens = _quantizer_tokens(model, pixel_shape)
  bsq = isinstance(module, bottlenecks.BSQBottleneck) or (
      isinstance(module, bottlenecks.MultiScaleBottleneck) and module.quantizer == "bsq")
  return float(tokens * (model.latent_channels if bsq else math.log2(module.codebook_size)))


def _quantizer_tokens(model: tokenizer.ViTok, pixel_shape: Sequence[int]):
  """(the bottleneck module, tokens it quantises per example: every scale's for multi-scale)."""
  grid = _check_pixels(model, pixel_shape)
  module = bottlenecks.build(model.bottleneck, model.latent_channels, model.codebook_size)
  tokens = math.prod(grid)
  if isinstance(module, bottlenecks.MultiScaleBottleneck):
    tokens = multiscale.token_count(multiscale.scale_schedule(module.schedule, grid[-1]))
  return module, tokens


def codebook_flops(model: tokenizer.ViTok, pixel_shape: Sequence[int]) -> int:
  """The distances of a learned codebook's lookup for one example: 2·tokens·c·K (for a multi-scale
  VQ, the tokens of every scale); 0 for the Gaussian and BSQ, which have no codebook matmul. At
  small widths and large codebooks this rivals the ViTs (c = 8, K = 16384: 2.6·10⁵ per token)."""
  if model.bottleneck not in bottlenecks.LEARNED_CODEBOOK:
    _check_pixels(model, pixel_shape)
    return 0
  module, tokens = _quantizer_tokens(model, pixel_shape)
  return dense_flops(tokens, model.latent_channels, module.codebook_size)


def tokenizer_forward_flops(model: tokenizer.ViTok, pixel_shape: Sequence[int]) -> dict[str, int]:
  """Forward FLOPs of `model` (encode + decode) for one example of shape (H, W, C) or (T, H, W, C).

  Returns a dict with the parts "patch_embed", "encoder", "bottleneck", "latent_embed", "decoder",
  "to_pixels" and their sum "total". Bottleneck sampling (sample=True) is elementwise and ignored.
  """
  if model.bottleneck == "larp":
    return larp_forward_flops(model, pixel_shape)
  if model.bottleneck not in BOTTLENECK_OUT_PER_CHANNEL:
    raise ConfigError(f"no FLOP count for bottleneck {model.bottleneck!r}; add it to "
                      f"BOTTLENECK_OUT_PER_CHANNEL (known: {list(BOTTLENECK_OUT_PER_CHANNEL)})")
  tokens = tokens_per_example(model, pixel_shape)
  patch_dim = math.prod(model.patch) * model.pixel_channels
  latent_out = BOTTLENECK_OUT_PER_CHANNEL[model.bottleneck] * model.latent_channels
  parts = {
      "patch_embed": dense_flops(tokens, patch_dim, model.encoder.width),
      "encoder": transformer_forward_flops(model.encoder, tokens, model.mlp_kind),
      "bottleneck": (dense_flops(tokens, model.encoder.width, latent_out)
                     + codebook_flops(model, pixel_shape)),
      "latent_embed": dense_flops(tokens, model.latent_channels, model.decoder.width),
      "decoder": transformer_forward_flops(model.decoder, tokens, model.mlp_kind),
      "to_pixels": dense_flops(tokens, model.decoder.width, patch_dim),
  }
  parts["total"] = sum(parts.values())
  return parts


def larp_forward_flops(model, pixel_shape: Sequence[int]) -> dict[str, int]:
  """Forward FLOPs of a `larp.LARP` for one example, in the parts of `tokenizer_forward_flops` plus
  "prior".

  The encoder runs over P patch tokens + N queries, the decoder over N latents + P patch queries;
  the bottleneck projects the N query outputs to c and scores them against the K codes
  (2·N·c·K, as `codebook_flops` for the other codebooks); the prior (causal, SwiGLU) runs over N − 1 codes, then scores them against the K
  codes ((N − 1)·c·K). Elementwise work over the codebook (normalising it, the softmax over K) is
  not counted: at tiny sizes it is a noticeable share of XLA's count.
  """
  patches = math.prod(_check_pixels(model, pixel_shape))
  queries, channels, prior = model.num_queries, model.latent_channels, model.prior
  patch_dim = math.prod(model.patch) * model.pixel_channels
  parts = {
      "patch_embed": dense_flops(patches, patch_dim, model.encoder.width),
      "encoder": transformer_forward_flops(model.encoder, patches + queries, model.mlp_kind),
      "bottleneck": (dense_flops(queries, model.encoder.width, channels)
                     + dense_flops(queries, channels, model.codebook_size)),
      "prior": (2 * dense_flops(queries - 1, channels, prior.width)
                + transformer_forward_flops(prior, queries - 1, "swiglu", causal=True)
                + dense_flops(queries - 1, channels, model.codebook_size)),
      "latent_embed": dense_flops(queries, channels, model.decoder.width),
      "decoder": transformer_forward_flops(model.decoder, queries + patches, model.mlp_kind),
      "to_pixels": dense_flops(patches, model.decoder.width, patch_dim),
  }
  parts["total"] = sum(parts.values())
  return parts


def train_flops_per_example(model: tokenizer.ViTok, pixel_shape: Sequence[int]) -> int:
  """Training FLOPs of one example: 3 × the forward total (backward ≈ 2 × forward), LARP's prior
  twice (its scheduled-sampling round, `larp.LARPBottleneck`).

  Rematerialisation (model.remat) recomputes the forward but is not counted, as MFU conventions go.
  Frozen loss networks (LPIPS's VGG at loss.lpips > 0, ~40 GFLOPs per 256² image forward) and a GAN
  discriminator are not counted either: this is the tokenizer's own compute.
  """
  parts = tokenizer_forward_flops(model, pixel_shape)
  return 3 * (parts["total"] + parts.get("prior", 0))


def masked_attention_flops(calls: Sequence[dict]) -> int:
  """FLOPs of the (query, key) pairs that the masks of traced attention calls hide (entries of a
  `kernels.recorded_attention` list): 4·head_dim per pair and head (q·kᵀ and p·v), which XLA counts
  for a masked dense attention and the convention leaves out (attention halved for causal, a
  block-causal mask's share for VAR). A call whose mask is not known when tracing (segment ids, a
  dense mask) counts none of its pairs as hidden."""
  return sum(4 * c["batch"] * c["heads"] * c["head_dim"] * (c["q_len"] * c["kv_len"]
                                                             - c["visible_pairs"])
             for c in calls if c.get("visible_pairs") is not None)


def xla_flops(fn: Callable[..., Any], *args) -> float:
  """FLOPs XLA's cost analysis reports for `jax.jit(fn)` lowered for `args` (whole call).

  `args` may be arrays or `jax.ShapeDtypeStruct`s (nothing is executed). XLA counts 2·m·n·k per dot
  plus one FLOP per elementwise/reduction op (transcendentals are reported separately), so it sits
  a few percent above the analytic matmul-only count. Custom calls (e.g. cuDNN fused attention,
  Pallas kernels) are opaque and count 0: compare against models built with attn_impl="xla"
  ("auto" resolves to "xla" on CPU and for float32).

  The module is counted as lowered, before XLA's optimisation: on a GPU the compiled executable
  hands its matmuls to cuBLAS as custom calls, which its cost analysis missed (a ViTok train step
  on an H100, jax 0.11.2: 0.3–0.4% of the analytic count, 11% with XLA attention). On CPU both
  counts agree.
  """
  return cost_flops(jax.jit(fn).lower(*args))


def cost_flops(program) -> float:
  """FLOPs of a lowered (`jax.stages.Lowered`: the whole program, every device's share) or
  compiled (one device's share under SPMD) program by XLA's cost analysis.

  Older jax returns a list of dicts (one per HLO module), newer a dict; the flops are summed.
  """
  cost = program.cost_analysis()
  return float(sum(c.get("flops", 0.0) for c in ([cost] if isinstance(cost, dict) else cost or ())))
