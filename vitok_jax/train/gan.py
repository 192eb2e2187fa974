"""ViTok's GAN stage: hinge losses, fixed or adaptive generator weight, and a stage-2 step.

Stage 2 (ViTok, after VQGAN/StyleGAN practice): start from a stage-1 tokenizer, freeze the encoder
(and bottleneck), fine-tune the decoder on reconstruction + LPIPS + weight·hinge generator loss,
while a StyleGAN discriminator is trained on real vs reconstructed images with the hinge loss.

Config (config.gan): enabled, weight (0.1), adaptive (False), start_step (0), channels (64),
max_channels (512), lr (1e-4), b1 (0.0), b2 (0.99), freeze_encoder (True).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vitok_jax.config_lib import require
from vitok_jax.models import discriminator as disc_lib
from vitok_jax.parallel import sharding

# Tokenizer param subtrees that stage 2 trains; the rest (patch_embed, encoder, bottleneck) is frozen.
DECODER_PARAMS = ("latent_embed", "decoder", "to_pixels")
# The generator's last layer, whose gradient norms set the adaptive weight (VQGAN).
LAST_LAYER = ("to_pixels", "kernel")
ADAPTIVE_MAX = 1e4


def default_config() -> ml_collections.ConfigDict:
  """config.gan's fields and ViTok's stage-2 values."""
  return ml_collections.ConfigDict(dict(
      enabled=False, weight=0.1, adaptive=False, start_step=0, channels=64, max_channels=512,
      lr=1e-4, b1=0.0, b2=0.99, freeze_encoder=True))


def validate(cfg: ml_collections.ConfigDict, init_from: str) -> None:
  """Raises ConfigError for config.gan values that cannot train (when the stage is enabled)."""
  if not cfg.enabled:
    return
  require(cfg.weight >= 0, f"gan.weight must be >= 0, got {cfg.weight}")
  require(cfg.lr > 0, f"gan.lr must be > 0, got {cfg.lr}")
  for field in ("b1", "b2"):
    require(0.0 <= cfg[field] < 1.0, f"gan.{field} must be in [0, 1), got {cfg[field]}")
  require(cfg.start_step >= 0, f"gan.start_step must be >= 0, got {cfg.start_step}")
  require(1 <= cfg.channels <= cfg.max_channels,
          f"gan.channels must be in [1, gan.max_channels={cfg.max_channels}], got {cfg.channels}")
  require(not cfg.freeze_encoder or init_from,
          "gan.freeze_encoder=True freezes a trained encoder: set init_from=<stage-1 workdir>, "
          "or gan.freeze_encoder=False to train the encoder too")


def hinge_d_loss(logits_real, logits_fake):
  """½(E[relu(1 − D(x))] + E[relu(1 + D(G(z)))]) (taming-transformers' scaling)."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
  """−E[D(G(z))]."""
  return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad_last, gan_grad_last, weight: float):
  """weight · ‖∇_last nll‖ / (‖∇_last gan‖ + 1e-4), clipped to [0, 1e4], no gradient (VQGAN eq. 7)."""
  ratio = jnp.linalg.norm(nll_grad_last) / (jnp.linalg.norm(gan_grad_last) + 1e-4)
  return weight * jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_MAX))


def decoder_only_labels(params) -> Any:
  """'train' for the decoder subtrees (DECODER_PARAMS), 'freeze' elsewhere: for optax.multi_transform."""
  return {k: jax.tree.map(lambda _, k=k: "train" if k in DECODER_PARAMS else "freeze", v)
          for k, v in params.items()}


def freeze_encoder(tx: optax.GradientTransformation, params) -> optax.GradientTransformation:
  """`tx` on the decoder; zero updates (and no optimizer state) for the encoder and bottleneck."""
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               decoder_only_labels(params))


@flax.struct.dataclass
class DiscState:
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class GANStage:
  """The discriminator, its optimizer and the two losses of a stage-2 step."""
  net: nn.Module
  tx: optax.GradientTransformation
  cfg: ml_collections.ConfigDict

  def init(self, rng, example_BX) -> DiscState:
    params = nn.meta.unbox(self.net.init(rng, example_BX)["params"])
    return DiscState(params, self.tx.init(params))

  def logical_specs(self, example_BX) -> DiscState:
    """Logical PartitionSpecs of the state `init` makes: the params' axis names, and the same for
    their Adam moments (`sharding.opt_state_logical_specs`)."""
    boxed = jax.eval_shape(lambda x: self.net.init(jax.random.key(0), x)["params"], example_BX)
    params = sharding.param_logical_specs(boxed)
    abstract = jax.eval_shape(lambda x: self.init(jax.random.key(0), x), example_BX)
    return DiscState(params, sharding.opt_state_logical_specs(self.tx, abstract.opt_state, params))

  def generator_loss(self, disc_params, recon):
    """Hinge generator loss of reconstructions (gradients flow into `recon`, not into D)."""
    frozen = jax.lax.stop_gradient(disc_params)
    return hinge_g_loss(self.net.apply({"params": frozen}, recon))

  def discriminator_step(self, state: DiscState, x, recon, step):
    """One D update on real `x` vs (stop-gradient) `recon`; a no-op before cfg.start_step."""
    recon = jax.lax.stop_gradient(recon)

    def loss_fn(params):
      # Real and fake in separate calls (as StyleGAN2-ADA's run_D), so the minibatch-stddev
      # groups are all real or all fake, as in `generator_loss`'s call on reconstructions.
      real = self.net.apply({"params": params}, x)
      fake = self.net.apply({"params": params}, recon)
      return hinge_d_loss(real, fake), (jnp.mean(real), jnp.mean(fake))

    (loss, (real, fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    active = step >= self.cfg.start_step
    params = jax.tree.map(lambda new, old: jnp.where(active, new, old),
                          optax.apply_updates(state.params, updates), state.params)
    opt_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), opt_state, state.opt_state)
    metrics = {"d_loss": loss, "d_logit_real": real, "d_logit_fake": fake}
    return DiscState(params, opt_state), metrics


def build_gan_stage(gan_cfg: ml_collections.ConfigDict) -> GANStage:
  """The discriminator and its Adam(b1, b2) optimizer from config.gan."""
  net = disc_lib.StyleGANDiscriminator(gan_cfg.channels, gan_cfg.max_channels)
  return GANStage(net, optax.adam(gan_cfg.lr, b1=gan_cfg.b1, b2=gan_cfg.b2), gan_cfg)


def generator_grads(recon_loss_fn: Callable, gan: GANStage, params, disc_params, step):
  """Gradients of recon_loss + w·hinge_g for the tokenizer, w fixed or adaptive.

  Args:
    recon_loss_fn: params -> (scalar loss, (metrics dict, recon)); the stage-1 objective.
    gan: the GAN stage; gan.cfg.weight is w (or the adaptive weight's scale).
    params, disc_params: tokenizer and discriminator params.
    step: the current step; the GAN term is off before gan.cfg.start_step.
  Returns:
    (grads, metrics, recon). With adaptive=True the two terms' gradients are taken separately
    (two backward passes) so that w = weight·‖∇_last recon_loss‖/‖∇_last g_loss‖ can scale the second.
  """
  def gan_loss_fn(p):
    loss, (metrics, recon) = recon_loss_fn(p)
    return gan.generator_loss(disc_params, recon), (loss, metrics, recon)

  active = (step >= gan.cfg.start_step).astype(jnp.float32)
  if gan.cfg.adaptive:
    nll_grads, (metrics, recon) = jax.grad(recon_loss_fn, has_aux=True)(params)
    (g_loss, _), gan_grads = jax.value_and_grad(gan_loss_fn, has_aux=True)(params)
    last = lambda tree: tree[LAST_LAYER[0]][LAST_LAYER[1]]
    weight = adaptive_weight(last(nll_grads), last(gan_grads), gan.cfg.weight) * active
    grads = jax.tree.map(lambda a, b: a + weight * b, nll_grads, gan_grads)
  else:
    weight = gan.cfg.weight * active

    def total_fn(p):
      g_loss, (loss, metrics, recon) = gan_loss_fn(p)
      return loss + weight * g_loss, (g_loss, metrics, recon)

    grads, (g_loss, metrics, recon) = jax.grad(total_fn, has_aux=True)(params)
  metrics = {**metrics, "g_loss": g_loss, "gan_weight": weight}
  return grads, metrics, recon
