"""StyleGAN2-style residual discriminator for ViTok's GAN stage (stage 2).

[B, H, W, C] in [-1, 1] -> 1×1 "fromRGB" -> residual blocks, each two 3×3 convs + 2× average-pool
down-sampling with a 1×1 skip (summed and scaled by 1/√2), until 4×4 -> minibatch standard deviation
channel -> 3×3 conv -> dense -> one real/fake logit per image [B]. Leaky ReLU 0.2 throughout.

Simplified from StyleGAN2: no equalised learning rate and no blur before down-sampling (plain
average pooling); widths double per block from `channels` up to `max_channels`. Video [B, T, H, W, C]
is judged frame by frame (logits [B·T]). Shape suffixes: B batch, H/W spatial, C channels.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from vitok_jax.errors import ConfigError
from vitok_jax.models.vit import constrain, partitioned

LEAK = 0.2
# He init with an untruncated normal: XLA's CPU compile of truncated_normal (erfinv) costs seconds
# per kernel shape, which dominates building a small discriminator in tests and CPU runs.
HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _conv(features: int, kernel: int, name: str, use_bias: bool = True, dtype=jnp.float32):
  # Output channels on "embed" (fsdp): the kernels and their Adam moments are split like the
  # tokenizer's (inputs can be 3 or C + 1 wide: RGB, the minibatch-std channel).
  return nn.Conv(features, (kernel, kernel), padding="SAME", use_bias=use_bias, dtype=dtype,
                 name=name, kernel_init=partitioned(HE_NORMAL, (None, None, None, "embed")))


def minibatch_stddev(x_BHWC, group_size: int = 4):
  """Appends one channel: the std over a group of examples, averaged over features and pixels.

  It lets the discriminator see a batch's lack of variety (StyleGAN). As in StyleGAN's reshape
  [G, B/G, ...], a group is strided: examples b, b + B/G, b + 2·B/G, …; the group size G shrinks
  to the largest divisor of the batch not above group_size.
  """
  batch = x_BHWC.shape[0]
  group = max(g for g in range(1, min(group_size, batch) + 1) if batch % g == 0)
  y = x_BHWC.astype(jnp.float32).reshape(group, batch // group, *x_BHWC.shape[1:])
  std_M = jnp.sqrt(jnp.var(y, axis=0) + 1e-8).mean(axis=(1, 2, 3))  # One value per group member.
  std_B = jnp.tile(std_M, group)
  channel = jnp.broadcast_to(std_B[:, None, None, None], x_BHWC.shape[:-1] + (1,))
  return jnp.concatenate([x_BHWC, channel.astype(x_BHWC.dtype)], axis=-1)


class ResBlock(nn.Module):
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    down = lambda v: nn.avg_pool(v, (2, 2), strides=(2, 2))
    skip = _conv(self.features, 1, "skip", use_bias=False, dtype=self.dtype)(down(x_BHWC))
    h = nn.leaky_relu(_conv(x_BHWC.shape[-1], 3, "conv0", dtype=self.dtype)(x_BHWC), LEAK)
    h = nn.leaky_relu(_conv(self.features, 3, "conv1", dtype=self.dtype)(down(h)), LEAK)
    return (h + skip) / math.sqrt(2.0)


class StyleGANDiscriminator(nn.Module):
  """Real/fake logits [B] (or [B·T] for video) for images in [-1, 1]."""
  channels: int = 64
  max_channels: int = 512
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x_BHWC = x.reshape((-1,) + x.shape[-3:]).astype(self.dtype)
    size = x_BHWC.shape[1]
    if x_BHWC.shape[2] != size or size < 4 or size & (size - 1):
      raise ConfigError(f"the discriminator needs square power-of-two images >= 4, got "
                        f"{x_BHWC.shape[1:3]}; set data.res to 16, 32, 64, ...")
    # Activations split over the batch (FSDP gathers each conv's kernel, split by channel).
    by_batch = lambda v: constrain(v, ("batch", None, None, "act_embed"))
    h = by_batch(nn.leaky_relu(_conv(self.channels, 1, "from_rgb", dtype=self.dtype)(x_BHWC),
                               LEAK))
    for i in range(int(math.log2(size)) - 2):
      h = by_batch(ResBlock(min(self.channels * 2 ** (i + 1), self.max_channels), self.dtype,
                            name=f"block{i}")(h))
    h = minibatch_stddev(h)
    h = by_batch(nn.leaky_relu(_conv(h.shape[-1] - 1, 3, "final_conv", dtype=self.dtype)(h), LEAK))
    h = constrain(h.reshape(h.shape[0], -1), ("batch", "act_embed"))
    dense = lambda features, name, axes: nn.Dense(
        features, dtype=self.dtype, name=name,
        kernel_init=partitioned(HE_NORMAL, axes))
    width = min(self.channels * 2 ** int(math.log2(size) - 2), self.max_channels)
    h = nn.leaky_relu(dense(width, "final_dense", ("embed", "mlp"))(h), LEAK)
    return dense(1, "logit", ("mlp", None))(h)[:, 0].astype(jnp.float32)
