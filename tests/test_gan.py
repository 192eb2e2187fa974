"""GAN stage: hinge losses, adaptive weight, discriminator, encoder freezing, a stage-2 step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitok_jax.errors import ConfigError
from vitok_jax.models import discriminator
from vitok_jax.train import gan

# RBG keys: initialising with threefry keys compiles for ~25 s on a loaded 2-core CPU, RBG for ~5 s.
key = lambda seed: jax.random.key(seed, impl="rbg")


def test_hinge_losses():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
  # relu(1 - real) = [0, 0.5]; relu(1 + fake) = [0, 1].
  assert gan.hinge_d_loss(real, fake) == pytest.approx(0.5 * (0.25 + 0.5))
  assert gan.hinge_g_loss(fake) == pytest.approx(1.0)


def test_adaptive_weight_is_gradient_norm_ratio_and_clipped():
  w = gan.adaptive_weight(jnp.array([3.0, 4.0]), jnp.array([0.0, 1.0]), 0.5)
  assert w == pytest.approx(0.5 * 5.0 / (1.0 + 1e-4))
  assert gan.adaptive_weight(jnp.ones(2), jnp.zeros(2), 1.0) == pytest.approx(gan.ADAPTIVE_MAX)


def test_discriminator_shapes_and_video_frames():
  net = discriminator.StyleGANDiscriminator(channels=8, max_channels=32)
  x = jnp.zeros((3, 16, 16, 1))
  params = jax.jit(net.init)(key(0), x)["params"]
  assert set(params) == {"from_rgb", "block0", "block1", "final_conv", "final_dense", "logit"}
  assert net.apply({"params": params}, x).shape == (3,)
  assert net.apply({"params": params}, jnp.zeros((2, 4, 16, 16, 1))).shape == (8,)
  with pytest.raises(ConfigError, match="power-of-two"):
    net.init(key(0), jnp.zeros((1, 24, 24, 1)))


def test_minibatch_stddev_channel():
  x = jnp.concatenate([jnp.zeros((2, 4, 4, 3)), jnp.ones((2, 4, 4, 3)) * 2.0])  # Groups of 4.
  out = discriminator.minibatch_stddev(x)
  assert out.shape == (4, 4, 4, 4)
  np.testing.assert_allclose(out[..., -1], 1.0, rtol=1e-4)  # std of {0, 0, 2, 2} is 1.
  np.testing.assert_allclose(discriminator.minibatch_stddev(x[:3])[..., -1], np.sqrt(8 / 9), rtol=1e-3)


def _toy_generator():
  """A 'tokenizer' with the real param names: encoder parts and decoder parts."""
  params = {"patch_embed": {"kernel": jnp.ones((3,))}, "encoder": {"w": jnp.ones((3,))},
            "bottleneck": {"w": jnp.ones((3,))}, "latent_embed": {"kernel": jnp.ones((3,))},
            "decoder": {"w": jnp.ones((3,))}, "to_pixels": {"kernel": jnp.full((3,), 0.1)}}
  return params


def test_freeze_encoder_updates_only_the_decoder():
  params = _toy_generator()
  tx = gan.freeze_encoder(optax.sgd(1.0), params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name, sub in updates.items():
    expected = -1.0 if name in gan.DECODER_PARAMS else 0.0
    np.testing.assert_array_equal(sub[next(iter(sub))], expected)


def _stage(adaptive=False, start_step=0):
  cfg = gan.default_config()
  cfg.update(enabled=True, channels=8, max_channels=16, adaptive=adaptive, start_step=start_step,
             lr=1e-3)
  return gan.build_gan_stage(cfg)


def _recon_loss_fn(x):
  def recon_loss_fn(params):
    recon = jnp.tanh(x * params["decoder"]["w"][0] + params["to_pixels"]["kernel"][0])
    loss = jnp.mean((recon - x) ** 2)
    return loss, ({"loss": loss}, recon)
  return recon_loss_fn


@pytest.mark.parametrize("adaptive", [False, True])
def test_generator_grads_combine_both_terms(adaptive):
  stage = _stage(adaptive)
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
  disc = stage.init(key(2), x)
  params = _toy_generator()
  fn = _recon_loss_fn(x)
  grads, metrics, recon = gan.generator_grads(fn, stage, params, disc.params, jnp.int32(5))
  nll_grads = jax.grad(lambda p: fn(p)[0])(params)
  g_grads = jax.grad(lambda p: stage.generator_loss(disc.params, fn(p)[1][1]))(params)
  w = metrics["gan_weight"]
  if adaptive:
    expected_w = gan.adaptive_weight(nll_grads["to_pixels"]["kernel"], g_grads["to_pixels"]["kernel"], 0.1)
    assert w == pytest.approx(float(expected_w), rel=1e-5)
  else:
    assert w == pytest.approx(0.1)
  np.testing.assert_allclose(grads["decoder"]["w"], nll_grads["decoder"]["w"] + w * g_grads["decoder"]["w"],
                             rtol=1e-5)
  assert recon.shape == x.shape
  # Before start_step the GAN term is off.
  _, metrics, _ = gan.generator_grads(fn, _stage(adaptive, start_step=10), params, disc.params,
                                      jnp.int32(5))
  assert metrics["gan_weight"] == 0.0


def test_discriminator_step_scores_real_and_fake_batches_apart():
  """The minibatch-stddev groups of the D step are all real or all fake: its logits of the real
  images do not depend on the reconstructions, and its fake logits are those the generator loss
  sees (in one concatenated call each group held reals and their reconstructions)."""
  stage = _stage()
  real = jax.random.uniform(key(1), (4, 16, 16, 1), minval=-1, maxval=1)
  recon_a, recon_b = real * 0.9, jax.random.uniform(key(2), real.shape, minval=-1, maxval=1)
  state = stage.init(key(0), real)
  disc = lambda images: stage.net.apply({"params": state.params}, images)
  for recon in (recon_a, recon_b):
    _, metrics = stage.discriminator_step(state, real, recon, jnp.int32(0))
    np.testing.assert_allclose(metrics["d_logit_real"], disc(real).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["d_logit_fake"], disc(recon).mean(), rtol=1e-5)
    np.testing.assert_allclose(stage.generator_loss(state.params, recon),
                               gan.hinge_g_loss(disc(recon)), rtol=1e-5)


def test_discriminator_learns_real_from_fake_with_hinge_loss():
  stage = _stage(start_step=2)
  rng = np.random.default_rng(0)
  _, xx = np.mgrid[:16, :16] / 15.0
  real = np.stack([np.sin(6 * xx + p)[..., None] for p in rng.uniform(0, 6, 16)]).astype(np.float32)
  fake = rng.uniform(-1, 1, real.shape).astype(np.float32)
  initial = state = stage.init(key(0), real)
  step = jax.jit(stage.discriminator_step)
  losses = []
  for i in range(32):
    state, metrics = step(state, real, fake, jnp.int32(i))
    losses.append(float(metrics["d_loss"]))
    if i == 1:  # Before start_step the discriminator is not updated.
      for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(a, b)
  assert losses[-1] < 0.5 * losses[2]
  assert metrics["d_logit_real"] > metrics["d_logit_fake"]
