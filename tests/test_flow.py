"""Rectified flow: SiT's convention, samplers on a learned 2-D mixture, CFG, shortcut few-step sampling."""
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitok_jax import ConfigError
from vitok_jax.models import flow

# Three well-separated components with unequal weights.
MEANS = np.array([(-2.5, -1.5), (2.5, -1.5), (0.0, 2.5)], np.float32)
WEIGHTS = np.array([0.5, 0.3, 0.2])
STD = 0.35
NUM_SAMPLES = 2000
SHORTCUT_MAX_STEPS = 32


def _sample_mixture(rng, n):
  rng_k, rng_x = jax.random.split(rng)
  k_B = jax.random.choice(rng_k, len(WEIGHTS), (n,), p=jnp.asarray(WEIGHTS))
  return jnp.asarray(MEANS)[k_B] + STD * jax.random.normal(rng_x, (n, 2))


def _mixture_stats(x_B2):
  """(weights [3], means [3, 2]) of samples assigned to the nearest true mean."""
  x_B2 = np.asarray(x_B2)
  k_B = np.argmin(((x_B2[:, None] - MEANS[None]) ** 2).sum(-1), axis=1)
  weights = np.bincount(k_B, minlength=len(MEANS)) / len(x_B2)
  means = np.stack([x_B2[k_B == k].mean(0) for k in range(len(MEANS))])
  return weights, means


class _VelocityNet(nn.Module):
  """MLP v(x, t[, d]) on 2-D points, with a few Fourier features of t."""
  width: int = 64

  @nn.compact
  def __call__(self, x_B2, t_B, d_B=None):
    angles_BF = jnp.pi * t_B[:, None] * jnp.arange(1, 4)
    feats = [x_B2, t_B[:, None], jnp.sin(angles_BF), jnp.cos(angles_BF)]
    if d_B is not None:
      feats += [d_B[:, None], jnp.log2(d_B[:, None] + 1 / 256) / 8]
    h_BD = jnp.concatenate(feats, axis=-1)
    for _ in range(3):
      h_BD = nn.silu(nn.Dense(self.width)(h_BD))
    return nn.Dense(2)(h_BD)


def _train(shortcut: bool, steps: int, batch: int):
  net = _VelocityNet()
  d_init = jnp.zeros(1) if shortcut else None
  params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1), d_init)
  tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps, alpha=0.05))

  def loss_fn(params, rng):
    rng_data, rng_loss = jax.random.split(rng)
    x1 = _sample_mixture(rng_data, batch)
    if shortcut:
      return flow.shortcut_loss(lambda x, t, d: net.apply(params, x, t, d), x1, rng_loss,
                                max_steps=SHORTCUT_MAX_STEPS)
    return flow.flow_matching_loss(lambda x, t: net.apply(params, x, t), x1, rng_loss)

  def step(carry, rng):
    params, opt_state = carry
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), metrics

  rngs = jax.random.split(jax.random.key(1), steps)
  (params, _), metrics = jax.jit(lambda c: jax.lax.scan(step, c, rngs))((params, tx.init(params)))
  return net, params, metrics


@pytest.fixture(scope="module")
def flow_model():
  net, params, metrics = _train(shortcut=False, steps=500, batch=256)
  assert np.isfinite(metrics["flow_loss"]).all()
  return lambda x, t: net.apply(params, x, t)


@pytest.fixture(scope="module")
def shortcut_model():
  net, params, metrics = _train(shortcut=True, steps=1000, batch=512)
  assert np.isfinite(metrics["loss"]).all()
  return lambda x, t, d: net.apply(params, x, t, d)


@pytest.fixture(scope="module")
def noise():
  return jax.random.normal(jax.random.key(5), (NUM_SAMPLES, 2))


def _ode(velocity_fn, noise, num_steps, method):
  return jax.jit(lambda n: flow.sample_ode(velocity_fn, n, num_steps, method))(noise)


def test_interpolant_is_noise_at_0_and_data_at_1():
  x1, eps = jnp.full((2, 3), 4.0), jnp.full((2, 3), -1.0)
  x_t, v = flow.interpolate(x1, eps, jnp.array([0.0, 1.0]))
  np.testing.assert_array_equal(x_t[0], eps[0])
  np.testing.assert_array_equal(x_t[1], x1[1])
  np.testing.assert_array_equal(v, x1 - eps)
  x_t, _ = flow.interpolate(x1, eps, jnp.array([0.25, 0.75]))
  np.testing.assert_allclose(x_t[:, 0], [0.25 * 4 - 0.75, 0.75 * 4 - 0.25])


def test_loss_and_euler_agree_with_the_exact_velocity_of_a_point_mass():
  """Data = the point c: v*(x, t) = (c − x)/(1 − t) has zero loss and Euler lands on c exactly."""
  c = jnp.array([1.5, -2.0])
  exact = lambda x, t: (c - x) / (1 - t[:, None])
  loss, metrics = flow.flow_matching_loss(exact, jnp.tile(c, (256, 1)), jax.random.key(0))
  assert float(loss) < 1e-8 and 0.4 < float(metrics["t_mean"]) < 0.6
  x = flow.sample_ode(exact, jax.random.normal(jax.random.key(1), (8, 2)), 5, "euler")
  np.testing.assert_allclose(x, jnp.tile(c, (8, 1)), atol=1e-5)


def test_sample_t():
  t_B = flow.sample_t(jax.random.key(0), 20_000, "logit_normal")
  assert float(t_B.min()) > 0 and float(t_B.max()) < 1
  assert abs(float(jnp.median(t_B)) - 0.5) < 0.02  # σ(N(0, 1)) has median 1/2 ...
  assert float(jnp.mean(jnp.abs(t_B - 0.5) < 0.1)) > 0.3  # ... and is peaked there (uniform: 0.2).
  shifted = flow.sample_t(jax.random.key(0), 20_000, "logit_normal", mean=1.0)
  assert float(jnp.median(shifted)) > 0.7
  u_B = flow.sample_t(jax.random.key(0), 20_000, "uniform")
  assert float(u_B.min()) >= 0 and float(u_B.max()) < 1 and abs(float(u_B.mean()) - 0.5) < 0.01
  with pytest.raises(ConfigError, match="unknown t distribution"):
    flow.sample_t(jax.random.key(0), 4, "normal")


def test_generator_config_draws_t_uniformly_by_default_as_sit():
  """SiT's convention: t uniform by default, logit-normal an option (REFERENCE.md)."""
  from vitok_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vitok_jax.train import train_generator  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("generator:dit/Mu,tokenizer=x")
  assert config.objective.t_sampling == "uniform"
  config.objective.t_sampling = "logit_normal"
  train_generator.validate(config)
  config.objective.t_sampling = "normal"
  with pytest.raises(ConfigError, match="objective.t_sampling"):
    train_generator.validate(config)


def test_sampler_arguments_are_checked():
  v = lambda x, t: x
  with pytest.raises(ConfigError, match="counts grid points"):
    flow.sample_ode(v, jnp.zeros((1, 2)), 1)
  with pytest.raises(ConfigError, match="unknown ODE method"):
    flow.sample_ode(v, jnp.zeros((1, 2)), 4, "rk4")
  with pytest.raises(ConfigError, match="power of two"):
    flow.sample_shortcut(lambda x, t, d: x, jnp.zeros((1, 2)), 2, max_steps=24)


def test_cfg_scale_one_is_the_conditional_model_and_guides_otherwise():
  def apply_fn(x, t_B, labels_B):
    return x * t_B[:, None] + jnp.sin(labels_B.astype(jnp.float32))[:, None] * 3.7

  x, t_B, labels_B = jax.random.normal(jax.random.key(0), (4, 3)), jnp.linspace(0.1, 0.9, 4), \
      jnp.array([0, 1, 2, 3])
  cond = apply_fn(x, t_B, labels_B)
  np.testing.assert_array_equal(flow.cfg_velocity(apply_fn, labels_B, 10, 1.0)(x, t_B), cond)
  traced = jax.jit(lambda s: flow.cfg_velocity(apply_fn, labels_B, 10, s)(x, t_B))
  np.testing.assert_array_equal(traced(1.0), cond)
  uncond = apply_fn(x, t_B, jnp.full_like(labels_B, 10))
  np.testing.assert_allclose(traced(4.0), uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
  # Extra per-example inputs (a shortcut step size) are passed on, doubled with the batch.
  with_d = lambda x, t_B, labels_B, d_B: apply_fn(x, t_B, labels_B) * d_B[:, None]
  d_B = jnp.array([1.0, 0.5, 0.25, 0.0])
  guided = flow.cfg_velocity(with_d, labels_B, 10, 4.0)(x, t_B, d_B)
  np.testing.assert_allclose(guided, (uncond + 4.0 * (cond - uncond)) * d_B[:, None], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(flow.cfg_velocity(with_d, labels_B, 10, 1)(x, t_B, d_B),
                                cond * d_B[:, None])


def test_flow_matching_recovers_the_mixture(flow_model, noise):
  for method, num_steps in (("euler", 51), ("heun", 11)):
    weights, means = _mixture_stats(_ode(flow_model, noise, num_steps, method))
    np.testing.assert_allclose(weights, WEIGHTS, atol=0.04, err_msg=method)
    np.testing.assert_allclose(means, MEANS, atol=0.2, err_msg=method)


def test_heun_beats_euler_at_few_steps(flow_model, noise):
  reference = _ode(flow_model, noise, 101, "heun")
  for num_steps in (4, 6):
    error = {m: float(jnp.mean(jnp.linalg.norm(_ode(flow_model, noise, num_steps, m) - reference,
                                               axis=-1)))
             for m in flow.ODE_METHODS}
    assert error["heun"] < 0.5 * error["euler"], (num_steps, error)


def test_shortcut_few_step_samples_keep_the_mixture_weights(shortcut_model, noise):
  sample = lambda n: jax.jit(lambda x: flow.sample_shortcut(
      shortcut_model, x, n, max_steps=SHORTCUT_MAX_STEPS))(noise)
  many_weights, many_means = _mixture_stats(sample(SHORTCUT_MAX_STEPS))
  np.testing.assert_allclose(many_weights, WEIGHTS, atol=0.05)
  np.testing.assert_allclose(many_means, MEANS, atol=0.25)
  for num_steps in (1, 2, 4):
    weights, means = _mixture_stats(sample(num_steps))
    np.testing.assert_allclose(weights, many_weights, atol=0.1, err_msg=f"{num_steps} steps")
    np.testing.assert_allclose(means, MEANS, atol=0.5, err_msg=f"{num_steps} steps")


def test_shortcut_loss_targets_and_cond_slicing():
  """d = 0 rows regress x₁ − ε; bootstrap rows see their own cond rows and a stop-gradient target."""
  x1 = jnp.ones((8, 2))
  cond = {"labels": jnp.arange(8), "scale": jnp.full((8,), 2.0)}

  @jax.jit
  def run(cond):
    calls = []  # (rows, cond rows, d_B) of each call, returned from the same trace.

    def velocity_fn(x, t_B, d_B, cond):
      calls.append((x.shape[0], cond["labels"].shape[0], d_B))
      return jnp.zeros_like(x) + cond["scale"][:, None] * d_B[:, None]

    _, metrics = flow.shortcut_loss(velocity_fn, x1, jax.random.key(0), cond=cond, max_steps=4)
    return metrics, calls

  metrics, calls = run(cond)
  # Two target calls on the 2 bootstrap rows (levels 0, 1: half steps 1/2 and 1/4 -> d 1/2, 0),
  # then the student on all 8 rows (d 1 and 1/2 for bootstrap rows, 0 for flow rows).
  assert [c[:2] for c in calls] == [(2, 2), (2, 2), (8, 8)]
  np.testing.assert_array_equal(calls[0][2], [0.5, 0.0])
  np.testing.assert_array_equal(calls[2][2], [1.0, 0.5] + [0.0] * 6)
  # Bootstrap target: mean of two equal half-step velocities 2·h_cond = [1, 0]; student 2·d = [2, 1].
  np.testing.assert_allclose(metrics["bootstrap_loss"], 1.0)
  grads = jax.jit(jax.grad(lambda s: flow.shortcut_loss(
      lambda x, t, d: jnp.zeros_like(x) + s * d[:, None], x1, jax.random.key(0), max_steps=4,
      bootstrap_fraction=1.0)[0]))(2.0)
  # Only the student's s·d depends on s through the loss: d(mean((s·d − sg(target))²))/ds.
  target = np.array([2.0 * 0.5, 2.0 * 0.0] * 4)  # The half-step velocities s·h_cond.
  d = np.array([1.0, 0.5] * 4)
  np.testing.assert_allclose(grads, np.mean(2 * (2.0 * d - target) * d), rtol=1e-5)


def test_bench_sampling_smoke(tmp_path):
  """tools/bench_sampling.py end to end at its smallest (two compiles)."""
  path = pathlib.Path(__file__).resolve().parent.parent / "tools" / "bench_sampling.py"
  spec = importlib.util.spec_from_file_location("bench_sampling", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / "sampling.json"
  result = bench.main(["--size", "Mu", "--latent", "4,4,4", "--batch_sizes", "2", "--ode_steps", "3",
                       "--ode_methods", "euler", "--shortcut_steps", "1", "--warmup", "0",
                       "--iters", "1", "--out", str(out)])
  report = json.loads(out.read_text())
  assert report == json.loads(json.dumps(result))
  assert [(r["sampler"], r["nfe"]) for r in report["rows"]] == [("ode_euler", 2), ("shortcut1", 1)]
  assert report["rows"][0]["speedup"] == 1.0 and all(r["ms_per_sample"] > 0 for r in report["rows"])
