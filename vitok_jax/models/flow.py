"""Rectified flow (flow matching) in SiT's convention, ODE samplers, CFG and shortcut few-step sampling.

Convention (SiT's, so SiT/DiT weights and samplers carry over): t = 0 is noise ε ~ N(0, I), t = 1 is
data x₁; x_t = t·x₁ + (1 − t)·ε and the model regresses the velocity v = x₁ − ε. Sampling integrates
dx/dt = v(x, t) from t = 0 to 1; `num_steps` counts grid points as in SiT (num_steps − 1 steps).

Few-step sampling (LLIA's low-latency need) uses the shortcut objective of Frans et al. 2024, "One
Step Diffusion via Shortcut Models", chosen over consistency distillation because it trains in one
stage from scratch with no teacher and needs only a step-size input on the same network. The model
s(x_t, t, d) predicts the average velocity over a step of size d, so x_{t+d} ≈ x_t + d·s(x_t, t, d):
  * d = 0 (the finest level, the instantaneous velocity): the flow-matching loss above;
  * d = 2^-k, k = 0 … K−1 with K = log₂(max_steps), on `bootstrap_fraction` of the batch
    (default ¼): the self-consistency target
        s(x_t, t, 2·h) ≈ ½[s(x_t, t, h) + s(x_t + h·s(x_t, t, h), t + h, h)],   h = d/2,
    under stop-gradient, with t on the grid of multiples of d (so t + d ≤ 1). The finest half step
    h = 1/max_steps is queried as d = 0, so level K−1 bootstraps from the flow-matching velocity
    (the paper's `dt_base = log2(M)` for both). Levels are spread evenly over the bootstrap rows.
  * Sampling with n steps takes d = 1/n (d = 0 once n ≥ max_steps): x ← x + d·s(x, t, d).
Departures from the paper's code: no ±4 clipping of the intermediate target point (it depends on the
data scale), targets use the online parameters unless `target_velocity_fn` (e.g. EMA) is given,
and the flow rows draw continuous t from `sample_t` rather than the 1/max_steps grid. The DiT
embeds the step as the code does, by its level log2(1/d) (log2(M) for d = 0: `step_level`); runs
saved before `objective.shortcut_input` embed d itself (sinusoidal features of d ∈ [0, 1], as t),
where the finest steps start close together (features 0.04 apart for d = 1/64 and 0, against 2.67
a level) and the network has to learn them apart.

Shape suffixes: B batch; arrays without one have any [B, ...] shape.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vitok_jax.errors import ConfigError

T_KINDS = ("uniform", "logit_normal")
ODE_METHODS = ("euler", "heun")
VelocityFn = Callable[..., jax.Array]  # (x_t, t_B) -> v.
# (x_t, t_B, d_B) -> v, or (x_t, t_B, d_B, cond) -> v where a pytree cond of [B, ...] arrays is given.
ShortcutFn = Callable[..., jax.Array]


def _call(velocity_fn: ShortcutFn, x, t_B, d_B, cond):
  return velocity_fn(x, t_B, d_B) if cond is None else velocity_fn(x, t_B, d_B, cond)


def sample_t(rng, batch: int, kind: str = "uniform", mean: float = 0.0, std: float = 1.0):
  """Training times [batch] in (0, 1): "uniform" on [0, 1), or "logit_normal" σ(mean + std·n)."""
  if kind == "uniform":
    return jax.random.uniform(rng, (batch,))
  if kind == "logit_normal":
    t_B = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
    return jnp.clip(t_B, 1e-6, 1 - 1e-6)  # float32 σ saturates to 0 / 1 beyond |z| ≈ 17.
  raise ConfigError(f"unknown t distribution {kind!r}; use one of {T_KINDS}")


def _bcast(t_B, x):
  return t_B.reshape(t_B.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


def interpolate(x1, noise, t_B):
  """(x_t, v): x_t = t·x₁ + (1 − t)·ε and the target velocity v = x₁ − ε."""
  t = _bcast(t_B, x1)
  return t * x1 + (1 - t) * noise, x1 - noise


def flow_matching_loss(velocity_fn: VelocityFn, x1, rng, t_kind: str = "uniform", *,
                       t_mean: float = 0.0, t_std: float = 1.0):
  """Mean squared velocity error on a batch of data x1 [B, ...]; returns (loss, metrics).

  velocity_fn(x_t, t_B) -> v closes over parameters, labels and dropout rngs. t follows `sample_t`
  (uniform by default as in SiT; "logit_normal" with t_mean / t_std as an option).
  """
  rng_t, rng_noise = jax.random.split(rng)
  t_B = sample_t(rng_t, x1.shape[0], t_kind, t_mean, t_std)
  noise = jax.random.normal(rng_noise, x1.shape, x1.dtype)
  x_t, v_target = interpolate(x1, noise, t_B)
  v_pred = velocity_fn(x_t, t_B)
  loss = jnp.mean(jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32)))
  return loss, {"flow_loss": loss, "t_mean": jnp.mean(t_B)}


def sample_ode(velocity_fn: VelocityFn, noise, num_steps: int, method: str = "euler"):
  """Integrates dx/dt = v(x, t) from noise at t = 0 to t = 1 on linspace(0, 1, num_steps).

  num_steps counts grid points (SiT): num_steps − 1 steps; Euler costs one velocity call per step,
  Heun (explicit trapezoid, corrected on every step as in torchdiffeq's heun2) two.
  """
  if method not in ODE_METHODS:
    raise ConfigError(f"unknown ODE method {method!r}; use one of {ODE_METHODS}")
  if num_steps < 2:
    raise ConfigError(f"num_steps={num_steps} counts grid points (SiT) and must be >= 2; "
                      "use 2 for a single step")
  ts = jnp.linspace(0.0, 1.0, num_steps)
  batch = noise.shape[0]

  def step(i, x):
    t0, t1 = ts[i], ts[i + 1]
    h = (t1 - t0).astype(x.dtype)
    v0 = velocity_fn(x, jnp.full((batch,), t0))
    if method == "euler":
      return x + h * v0
    v1 = velocity_fn(x + h * v0, jnp.full((batch,), t1))
    return x + 0.5 * h * (v0 + v1)

  return jax.lax.fori_loop(0, num_steps - 1, step, noise)


def cfg_velocity(apply_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], labels_B,
                 null_label: int, scale: float) -> VelocityFn:
  """Classifier-free guidance: v = v_uncond + scale·(v_cond − v_uncond) as a velocity_fn.

  apply_fn(x, t_B, labels_B, *extra_B) -> v. The returned velocity_fn(x, t_B, *extra_B) passes
  further per-example arrays (e.g. a shortcut step size d_B, so it also serves `sample_shortcut`)
  on to apply_fn. Conditional and unconditional rows run as one batch of 2B. A Python scale of 1
  returns the conditional model itself (exact, and half the compute); a traced scale is computed
  as v_cond + (scale − 1)·(v_cond − v_uncond), which is v_cond at scale 1. Guidance acts on every
  channel (DiT/SiT's demo scripts guide only the first three).
  """
  if isinstance(scale, (int, float)) and scale == 1:
    return lambda x, t_B, *extra_B: apply_fn(x, t_B, labels_B, *extra_B)
  null_B = jnp.full_like(labels_B, null_label)
  twice = lambda a: jnp.concatenate([a, a])

  def velocity_fn(x, t_B, *extra_B):
    v_2B = apply_fn(twice(x), twice(t_B), jnp.concatenate([labels_B, null_B]),
                    *[twice(a) for a in extra_B])
    v_cond, v_uncond = jnp.split(v_2B, 2)
    return v_cond + (scale - 1) * (v_cond - v_uncond)

  return velocity_fn


def _num_levels(max_steps: int) -> int:
  levels = round(math.log2(max_steps)) if max_steps >= 1 else 0
  if max_steps < 2 or 2 ** levels != max_steps:
    raise ConfigError(f"shortcut max_steps={max_steps} must be a power of two >= 2, e.g. 128")
  return levels


# The share of a shortcut batch trained on self-consistency targets (Frans et al.: 1/4).
BOOTSTRAP_FRACTION = 0.25
# The finest step 1/M of a shortcut model (the paper's M = 128), queried as d = 0.
SHORTCUT_MAX_STEPS = 128


def step_level(d_B, max_steps: int = SHORTCUT_MAX_STEPS):
  """The shortcut step d [B] as the paper's code feeds it to the model (`dt_base`): its level
  log2(1/d), and log2(max_steps) for d = 0 (the instantaneous velocity); float32 [B]."""
  d_B = jnp.asarray(d_B, jnp.float32)
  return jnp.where(d_B > 0, -jnp.log2(jnp.where(d_B > 0, d_B, 1.0)), float(math.log2(max_steps)))


def shortcut_loss(velocity_fn: ShortcutFn, x1, rng, *, cond=None,
                  bootstrap_fraction: float = BOOTSTRAP_FRACTION,
                  max_steps: int = SHORTCUT_MAX_STEPS, t_kind: str = "uniform",
                  target_velocity_fn: ShortcutFn | None = None):
  """Shortcut-model loss on data x1 [B, ...]: flow matching at d = 0 plus self-consistency.

  velocity_fn(x, t_B, d_B) -> v, or velocity_fn(x, t_B, d_B, cond) when cond, a pytree of
  per-example [B, ...] arrays (labels), is given. The first round(bootstrap_fraction·B) rows get
  self-consistency targets from target_velocity_fn (default velocity_fn) on just those rows, under
  stop-gradient, so per-example inputs must come through cond (sliced to those rows), not a closure
  over [B] arrays. Labels to drop for CFG are dropped in cond beforehand (dit.drop_labels, model in
  train=False) so the student and its targets see the same ones. Returns (loss, metrics) with the
  flow and bootstrap parts apart.
  """
  if not 0 <= bootstrap_fraction <= 1:
    raise ConfigError(f"bootstrap_fraction={bootstrap_fraction} must be in [0, 1], e.g. 0.25")
  levels = _num_levels(max_steps)
  target_fn = target_velocity_fn or velocity_fn
  batch = x1.shape[0]
  num_boot = round(bootstrap_fraction * batch)
  rng_t, rng_noise, rng_grid = jax.random.split(rng, 3)
  noise = jax.random.normal(rng_noise, x1.shape, x1.dtype)

  # Flow rows: instantaneous velocity, conditioned on d = 0.
  t_flow_B = sample_t(rng_t, batch - num_boot, t_kind)
  x_flow, v_flow = interpolate(x1[num_boot:], noise[num_boot:], t_flow_B)
  xs, ts, ds, targets = [x_flow], [t_flow_B], [jnp.zeros_like(t_flow_B)], [v_flow]

  if num_boot:
    # Level k: step d = 2^-k made of two halves h = d/2; the finest half (1/max_steps) is d = 0.
    level_B = jnp.arange(num_boot) % levels
    d_B = 2.0 ** -level_B.astype(jnp.float32)
    half_B = d_B / 2
    half_cond_B = jnp.where(level_B + 1 >= levels, 0.0, half_B)
    steps_B = 2 ** level_B  # t on the grid of multiples of d, so t + d <= 1.
    t_boot_B = jnp.floor(jax.random.uniform(rng_grid, (num_boot,)) * steps_B) / steps_B
    x_boot, _ = interpolate(x1[:num_boot], noise[:num_boot], t_boot_B)
    cond_boot = jax.tree_util.tree_map(lambda a: a[:num_boot], cond)
    s1 = _call(target_fn, x_boot, t_boot_B, half_cond_B, cond_boot)
    x_mid = x_boot + _bcast(half_B, x_boot) * s1
    s2 = _call(target_fn, x_mid, t_boot_B + half_B, half_cond_B, cond_boot)
    xs.insert(0, x_boot)
    ts.insert(0, t_boot_B)
    ds.insert(0, d_B)
    targets.insert(0, jax.lax.stop_gradient((s1 + s2) / 2))

  v_pred = _call(velocity_fn, jnp.concatenate(xs), jnp.concatenate(ts), jnp.concatenate(ds), cond)
  err_B = jnp.mean(jnp.square(v_pred.astype(jnp.float32)
                              - jnp.concatenate(targets).astype(jnp.float32)),
                   axis=tuple(range(1, x1.ndim)))
  loss = jnp.mean(err_B)
  metrics = {"loss": loss}
  if num_boot < batch:
    metrics["flow_loss"] = jnp.mean(err_B[num_boot:])
  if num_boot:
    metrics["bootstrap_loss"] = jnp.mean(err_B[:num_boot])
  return loss, metrics


def sample_shortcut(velocity_fn: ShortcutFn, noise, num_steps: int, *, cond=None,
                    max_steps: int = SHORTCUT_MAX_STEPS):
  """n = num_steps equal steps x ← x + d·s(x, t, d) from t = 0 to 1 with d = 1/n (n velocity calls).

  Unlike `sample_ode`, num_steps counts steps: 1, 2, 4 … (powers of two up to max_steps are the
  trained step sizes); from n >= max_steps on the model is queried at d = 0, i.e. plain Euler.
  velocity_fn and cond as in `shortcut_loss`; `cfg_velocity` output works as velocity_fn.
  """
  _num_levels(max_steps)
  if num_steps < 1:
    raise ConfigError(f"shortcut num_steps={num_steps} counts steps and must be >= 1")
  batch = noise.shape[0]
  d = 1.0 / num_steps
  d_B = jnp.full((batch,), 0.0 if num_steps >= max_steps else d)

  def step(i, x):
    v = _call(velocity_fn, x, jnp.full((batch,), i * d), d_B, cond)
    return x + d * v

  return jax.lax.fori_loop(0, num_steps, step, noise)
