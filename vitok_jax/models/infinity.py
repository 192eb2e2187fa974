"""Infinity: bitwise next-scale prediction on multi-scale residual BSQ, with self-correction.

The transformer is `var.VAR(head="bitwise", bits=d)`: d binary logits per token (interleaved
(d, 2) pairs, bit 0 the most significant), trained with `var.bitwise_loss`. What is Infinity's own:

  * `self_correction_inputs`: the teacher-forced inputs and bit labels of one batch of latents, with
    a random fraction of the teacher-forced bits flipped (Infinity's "bitwise self-correction").
  * `sample_infinity`: `var.sample_var` with every bit drawn from its own 2-way softmax and
    Infinity's constant CFG (cfg·cond + (1 − cfg)·uncond).

The multi-scale BSQ is Infinity's: per scale, the residual f − f_hat is area-downsampled, quantised
to q = sign(u)/√d with u = r/‖r‖ (0 -> −1; bit = 1 where q > 0), bilinearly upsampled
(align_corners=False) and added to f_hat; the next input is f_hat resized to the next scale with
the same bilinear mode (Infinity's `z_interplote_up` = trilinear on [B, C, 1, h, w], no antialias,
in `flip_requant` and in its sampler; VAR area-downsamples instead), as
`multiscale.ResidualQuantizer(quantizer="bsq", upsample="bilinear", num_phi=0)` does.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vitok_jax.errors import ConfigError
from vitok_jax.models import multiscale, quantizers, var


def flip_bits(bits_BND, rng, flip_prob_max: float):
  """Flips each bit of sample b with probability p_b, p_b ~ U[0, flip_prob_max).

  Args:
    bits_BND: bool [B, ...] bits (any trailing shape).
    rng: PRNG key (split into one key for p and one for the flips).
    flip_prob_max: upper end of p (Infinity: 0.3).
  Returns:
    (flipped bool [B, ...], p_B float32 [B]).
  """
  key_p, key_flip = jax.random.split(rng)
  batch = bits_BND.shape[0]
  p_B = jax.random.uniform(key_p, (batch,), jnp.float32) * flip_prob_max
  p_B1 = p_B.reshape((batch,) + (1,) * (bits_BND.ndim - 1))
  flip = jax.random.uniform(key_flip, bits_BND.shape) < p_B1
  return jnp.logical_xor(bits_BND, flip), p_B


def self_correction_inputs(f_BHWC, scales: Sequence[int], rng, flip_prob_max: float = 0.3, *,
                           flip_scales: int | None = None, upsample: str = "bilinear",
                           input_resize: str = ""):
  """Teacher inputs and bit labels with bitwise self-correction (Infinity's `flip_requant`).

  Per scale k: r_k = area_down(f − f_hat, s_k); its bits (r > 0, i.e. u > 0) are scale k's labels;
  the input of scale k + 1 is f_hat resized to s_{k+1} with `input_resize` (Infinity: bilinear).
  The token used to build f_hat is those bits with a fraction p of them flipped (p ~ U[0,
  flip_prob_max) per sample and scale; `flip_bits` with key k of `jax.random.split(rng, K)`), so the
  residual of later scales, and hence their labels, is the re-quantised residual given the
  corrupted f_hat: the model learns to correct its own mistakes. With flip_prob_max = 0 this is
  plain teacher forcing (`ResidualQuantizer.teacher_inputs` of the BSQ codes).

  Infinity draws one p per scale for the whole batch in steps of 0.01; here p is per sample.

  Args:
    f_BHWC: latents [B, h, h, d] (stop-gradient: inputs and labels are data).
    scales: the sides s_0 < … < s_{K−1} = h.
    rng: PRNG key.
    flip_prob_max: upper end of the flip fraction (Infinity: 0.3); 0 disables.
    flip_scales: corrupt only the first this many scales (Infinity's noise_apply_layers); None: all.
    upsample: "bilinear" (Infinity) or another `multiscale.RESIZES` mode.
    input_resize: the next-scale input's resize; "" (default) is `upsample`, Infinity's
      z_interplote_up, as `ResidualQuantizer.next_scale_input` does for quantizer="bsq".
  Returns:
    (inputs_BLC float32 [B, L − s_0², d], bit_labels_BLd int32 [B, L, d]).
  """
  f_BHWC = jax.lax.stop_gradient(f_BHWC.astype(jnp.float32))
  batch, size, _, dim = f_BHWC.shape
  if scales[-1] != size or f_BHWC.shape[2] != size:
    raise ConfigError(f"the last scale {scales[-1]} must be the latent side (latents "
                      f"{f_BHWC.shape}); pass multiscale.scale_schedule(name, h)")
  input_resize = multiscale.input_resize_mode("bsq", upsample, input_resize)
  for name, mode in (("upsample", upsample), ("input_resize", input_resize)):
    if mode not in multiscale.RESIZES:
      raise ConfigError(f"{name}={mode!r}; use one of {list(multiscale.RESIZES)}")
  keys = jax.random.split(rng, len(scales))
  f_hat_BHWC = jnp.zeros_like(f_BHWC)
  inputs, labels = [], []
  for k, side in enumerate(scales):
    r_BsC = multiscale.resize(f_BHWC - f_hat_BHWC, (side, side), "area")
    bits_BsC = r_BsC > 0
    labels.append(bits_BsC.reshape(batch, -1, dim))
    if flip_prob_max > 0 and (flip_scales is None or k < flip_scales):
      bits_BsC, _ = flip_bits(bits_BsC, keys[k], flip_prob_max)
    f_hat_BHWC = f_hat_BHWC + multiscale.resize(quantizers.bits_to_codes(bits_BsC), (size, size),
                                                upsample)
    if k + 1 < len(scales):
      nxt = scales[k + 1]
      inputs.append(multiscale.resize(f_hat_BHWC, (nxt, nxt), input_resize)
                    .reshape(batch, -1, dim))
  inputs_BLC = (jnp.concatenate(inputs, axis=1) if inputs
                else jnp.zeros((batch, 0, dim), jnp.float32))
  return inputs_BLC, jnp.concatenate(labels, axis=1).astype(jnp.int32)


def sample_infinity(model: var.VAR, params, labels_B, rng, next_input: var.NextInput, *,
                    cfg_scale: float | None = 3.0, top_k: int = 0, top_p: float = 1.0,
                    temperature: float = 1.0, cfg_schedule: str = "constant"):
  """Samples packed BSQ codes of every scale (uint32 [B, s, s, W] each) with a bitwise VAR.

  Each bit is drawn from its own 2-way softmax (top_k = 1: greedy; larger top_k is a no-op);
  cfg_schedule "constant" is Infinity's cfg·cond + (1 − cfg)·uncond (cfg = 1: conditional).
  next_input: e.g. `var.residual_next_input(ResidualQuantizer(d, "bsq", ...,
  upsample="bilinear", num_phi=0), {}, h)`. See `var.sample_var` for the rest.
  """
  if model.head != "bitwise":
    raise ConfigError(f"sample_infinity needs VAR(head='bitwise'), got head={model.head!r}")
  return var.sample_var(model, params, labels_B, rng, next_input, cfg_scale=cfg_scale,
                        top_k=top_k, top_p=top_p, temperature=temperature,
                        cfg_schedule=cfg_schedule)
