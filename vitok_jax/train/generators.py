"""The generator families and the frozen tokenizer they are trained on.

A family turns the tokenizer's store (train/codes.py) into training arrays, builds its model, and
gives the loss and the class-conditional sampler (samples come back as pixels through the frozen
tokenizer). Which tokenizer bottleneck each family needs:

  dit       gaussian        rectified flow on the latent grid (models/dit.py, models/flow.py)
  llamagen  vq, vq1k(_ent)  next-token AR over raster-order codes (models/ar.py, models/sampling.py)
  var       msvq(512)       next-scale AR over the multi-scale codes (models/var.py)
  infinity  msbsq           bitwise next-scale AR with self-correction (models/infinity.py)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax import config_lib
from vitok_jax.errors import ConfigError
from vitok_jax.models import ar, bottlenecks, dit, flow, infinity, multiscale, sampling, var, vit
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.train import codes as codes_lib
from vitok_jax.train import train_tokenizer


class FrozenTokenizer:
  """A trained tokenizer run: config, model, latest params (on `mesh`, which the generator on it
  shares) and its token grid."""

  def __init__(self, workdir: str, mesh=None):
    self.workdir = workdir
    self.config = config_lib.read_config(workdir)
    config_lib.require_kind(self.config, workdir, "tokenizer")
    self.model = train_tokenizer.build_model(self.config)
    self.mesh = mesh or mesh_lib.make_mesh(self.config.mesh)
    self.step, self.params, _ = train_tokenizer.restore_params(workdir, self.config, self.mesh)
    self.pixel_shape = train_tokenizer.pixel_shape(self.config)
    self.grid = tuple(s // p for s, p in zip(self.pixel_shape[:-1], self.config.model.patch))
    self.channels = self.config.model.channels
    self.bottleneck = self.config.model.bottleneck
    # Unbound: its fields (codebook_size, schedule, ...) without the params.
    self.bottleneck_module = bottlenecks.build(self.bottleneck, self.channels,
                                               self.config.model.get("codebook_size", 0))
    self._decode_latents = jax.jit(lambda params, z: self.model.apply(
        {"params": params}, z, self.grid, method=self.model.decode))
    self._decode_codes = codes_lib.decode_fn(self.model, self.grid)

  def store(self, split: str) -> dict[str, np.ndarray]:
    return codes_lib.load_or_tokenize(self.workdir, split, self.mesh)

  def decode_latents(self, z_BNC):
    """Continuous latents [B, N, c] -> pixels."""
    return self._decode_latents(self.params, z_BNC)

  def decode_codes(self, codes):
    """Codes (array, or the tuple of per-scale maps) -> pixels."""
    return self._decode_codes(self.params, codes)

  def residual_apply(self, fn: Callable, *args, params=None):
    """fn(residual_quantizer, *args) run with the tokenizer's multi-scale quantiser params
    (`params`, default this tokenizer's own)."""
    params = self.params if params is None else params
    return self.model.apply({"params": params}, *args,
                            method=lambda m, *a: fn(m.bottleneck_layer.residual, *a))


@contextlib.contextmanager
def swapped(obj, name: str, value):
  """Within the block obj.<name> is `value` (e.g. a FrozenTokenizer's params as a jit's traced
  argument, a Family's model as a clone with other attention), restored after."""
  saved = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, saved)


# config.sample fields that only some samplers read, with the value that means "off": a family
# whose sampler does not read one requires this value (train_generator.validate), so a setting can
# never change the metric tag without changing the samples.
NEUTRAL_SAMPLE_SETTINGS = {"top_k": 0, "top_p": 1.0, "temperature": 1.0, "cfg_schedule": "constant"}
# DiT's ODE settings with their defaults, which the other families must keep in a new run's config
# (`check_new_sample_settings`); runs saved before that check keep whatever they hold.
ODE_SAMPLE_DEFAULTS = {"num_steps": 50, "method": "heun", "few_steps": (1, 2, 4)}

# Training settings only some families read: field -> (those families, the value every config
# carries, configs/generator.py). Another family's new run must keep that value
# (`check_new_training_settings`): set, it would be saved in the run's config with no effect.
FAMILY_TRAINING_SETTINGS = {
    "objective.flip_max": (("infinity",), 0.3),  # Bitwise self-correction's largest flip rate.
    "objective.t_sampling": (("dit",), "uniform"),  # Flow matching's time distribution.
    "model.patch": (("dit",), 1),  # DiT's patch size on the latent grid.
}

# config.sample.cfg_schedule -> var.cfg_weights schedule: "linear" is VAR's ramp
# w_k = 1 + cfg·k/(K − 1) (the first scale unguided), "constant" is w_k = cfg (Infinity's).
VAR_CFG_SCHEDULES = {"linear": "var", "constant": "constant"}


class Family:
  """Interface: arrays(store) -> dict of [N, ...] numpy; model; loss; sample."""
  name: str = ""
  size_family: str = ""
  bottlenecks: tuple[str, ...] = ()
  # The config.sample fields `sample` (and `few_step_samplers`) read.
  sample_fields: tuple[str, ...] = ()

  @classmethod
  def check_sample(cls, sample) -> None:
    """Raises ConfigError for a value of one of `sample_fields` this sampler cannot take."""

  @classmethod
  def check_sample_for(cls, sample, tokenizer: FrozenTokenizer) -> None:
    """Raises ConfigError for a sample setting `tokenizer` makes a no-op (e.g. top_k ≥ its
    codebook size); checked once the tokenizer is loaded, before its codes are."""

  def __init__(self, config, tokenizer: FrozenTokenizer, train_store: dict):
    self.config, self.tokenizer = config, tokenizer
    self.size = vit.decode_size(config.model.size, self.size_family)
    self.dtype = jnp.dtype(config.model.dtype)
    self.model = self.build(train_store)

  def build(self, train_store):
    raise NotImplementedError

  @property
  def tokens_per_example(self) -> int:
    """The tokenizer's tokens of one example the generator models: its latent grid (DiT before
    the generator's own patching, LlamaGen's code sequence)."""
    return int(np.prod(self.tokenizer.grid))

  def arrays(self, store) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def init_inputs(self, batch) -> tuple:
    """Positional model inputs for `init` from a batch of arrays."""
    raise NotImplementedError

  def init(self, rng, batch):
    """Boxed params (logical axis names kept) from one batch."""
    rngs = {"params": rng, "dropout": rng}
    return self.model.init(rngs, *self.init_inputs(batch), train=False)["params"]

  def loss(self, params, batch, rng, train: bool = True) -> tuple[jax.Array, dict]:
    """(loss, metrics) of a batch. train: the training objective (label dropout, Infinity's bit
    flips); False: the clean conditional loss the held-out loss reports."""
    raise NotImplementedError

  def sample(self, params, labels_B, rng, **overrides):
    """Class-conditional samples as pixels [B, H, W, C] in [-1, 1]."""
    raise NotImplementedError

  def few_step_samplers(self) -> dict[str, Callable]:
    """name -> sample-like function for the few-step samplers this family trained (if any)."""
    return {}

  def train_forwards(self, batch_size: int) -> float:
    """A training step's cost per example in forward passes: 3 (forward + backward)."""
    del batch_size
    return 3.0

  def forward_fn(self) -> Callable:
    """(params, batch) -> model outputs: the forward pass whose FLOPs the record reports."""
    return lambda params, batch: self.model.apply(
        {"params": params}, *self.init_inputs(batch), train=False)

  def train_logits(self, params, inputs, labels_B, rng, train: bool = True):
    """The model on (inputs, labels), in train mode where `train` (`rng` drives its label
    dropout), else with every label kept."""
    return self.model.apply({"params": params}, inputs, labels_B, train=train,
                            rngs={"dropout": rng})

  @property
  def null_label(self) -> int:
    return self.config.model.num_classes


class DiTFamily(Family):
  """DiT on the normalised latent grid [h, w, c]; per-channel mean/std from the train store."""
  name, size_family, bottlenecks = "dit", "dit", ("gaussian",)
  sample_fields = ("cfg_scale", "num_steps", "method", "few_steps")

  def build(self, train_store):
    latents = self._grid(train_store["latents"])
    self.mean_C = latents.mean(axis=(0, 1, 2))
    self.std_C = latents.std(axis=(0, 1, 2)) + 1e-6
    m = self.config.model
    h, w = self.tokenizer.grid[-2:]
    if h % m.patch or w % m.patch:
      raise ConfigError(f"model.patch={m.patch} does not divide the latent grid {h}×{w}; use 1 "
                        "or a divisor")
    return dit.DiT(self.size, patch=m.patch, in_channels=self.tokenizer.channels,
                   num_classes=m.num_classes, class_dropout=m.class_dropout,
                   use_step_size=self.config.objective.shortcut,
                   step_input=config_lib.added_field(self.config, "objective.shortcut_input"),
                   attn_impl=m.attn_impl, dtype=self.dtype)

  def _grid(self, latents_NLC):
    if len(self.tokenizer.grid) != 2:
      raise ConfigError("the dit family generates images; its tokenizer must be an image tokenizer "
                        f"(token grid {self.tokenizer.grid})")
    return latents_NLC.reshape(latents_NLC.shape[0], *self.tokenizer.grid, -1)

  def arrays(self, store):
    x = (self._grid(store["latents"]) - self.mean_C) / self.std_C
    return {"x": x.astype(np.float32), "labels": store["labels"].astype(np.int32)}

  def init_inputs(self, batch):
    x = batch["x"]
    return x, jnp.zeros(x.shape[:1]), batch["labels"]

  def init(self, rng, batch):
    x, t, labels = self.init_inputs(batch)
    d = t if self.config.objective.shortcut else None
    return self.model.init({"params": rng}, x, t, labels, train=False, step_size_B=d)["params"]

  def _apply(self, params):
    """(x, t_B, labels_B[, d_B]) -> v; labels already dropped; d = 0 (the instantaneous velocity)
    unless given, for a shortcut model."""
    shortcut = self.config.objective.shortcut

    def apply(x, t_B, labels_B, d_B=None):
      if shortcut and d_B is None:
        d_B = jnp.zeros_like(t_B)
      return self.model.apply({"params": params}, x, t_B, labels_B, train=False, step_size_B=d_B)
    return apply

  def forward_fn(self):
    return lambda params, batch: self._apply(params)(*self.init_inputs(batch))

  def train_forwards(self, batch_size: int) -> float:
    """3, plus for shortcut training the two forward passes (no backward) that make the
    self-consistency targets of its `flow.BOOTSTRAP_FRACTION` of the batch."""
    if not self.config.objective.shortcut:
      return 3.0
    return 3.0 + 2.0 * round(flow.BOOTSTRAP_FRACTION * batch_size) / batch_size

  def loss(self, params, batch, rng, train: bool = True):
    r_drop, r_flow = jax.random.split(rng)
    m, objective = self.config.model, self.config.objective
    # Dropped once here, so the shortcut targets see the same labels as the student.
    labels = dit.drop_labels(r_drop, batch["labels"], m.num_classes,
                             m.class_dropout if train else 0.0)
    apply = self._apply(params)
    if objective.shortcut:
      return flow.shortcut_loss(lambda x, t, d, cond: apply(x, t, cond, d), batch["x"], r_flow,
                                cond=labels, t_kind=objective.t_sampling)
    return flow.flow_matching_loss(lambda x, t: apply(x, t, labels), batch["x"], r_flow,
                                   objective.t_sampling)

  def _guided(self, params, labels_B, scale):
    return flow.cfg_velocity(self._apply(params), labels_B, self.null_label, scale)

  def _to_pixels(self, x_BHWC):
    z = x_BHWC * self.std_C + self.mean_C
    return self.tokenizer.decode_latents(z.reshape(z.shape[0], -1, z.shape[-1]))

  def _noise(self, rng, batch):
    return jax.random.normal(rng, (batch, *self.tokenizer.grid, self.tokenizer.channels))

  def sample(self, params, labels_B, rng, **overrides):
    s = {**self.config.sample.to_dict(), **overrides}
    velocity = self._guided(params, labels_B, s["cfg_scale"])
    x = flow.sample_ode(velocity, self._noise(rng, len(labels_B)), s["num_steps"], s["method"])
    return self._to_pixels(x)

  def few_step_samplers(self):
    if not self.config.objective.shortcut:
      return {}

    def sampler(steps, params, labels_B, rng):
      velocity = self._guided(params, labels_B, self.config.sample.cfg_scale)
      return self._to_pixels(flow.sample_shortcut(velocity, self._noise(rng, len(labels_B)), steps))

    return {f"shortcut{n}": functools.partial(sampler, n) for n in self.config.sample.few_steps}


class LlamaGenFamily(Family):
  """LlamaGen over raster-order VQ codes [L] with a class-token prefix."""
  name, size_family, bottlenecks = "llamagen", "llamagen", ("vq", "vq1k", "vq1k_ent")
  sample_fields = ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p")

  @classmethod
  def check_sample_for(cls, sample, tokenizer):
    check_top_k_below(sample["top_k"], tokenizer.bottleneck_module.codebook_size)

  def build(self, train_store):
    m = self.config.model
    codebook = self.tokenizer.bottleneck_module.codebook_size
    return ar.LlamaGen(self.size, vocab_size=codebook, num_classes=m.num_classes,
                       grid=tuple(self.tokenizer.grid), class_dropout=m.class_dropout,
                       mlp_multiple_of=m.mlp_multiple_of, attn_impl=m.attn_impl, dtype=self.dtype,
                       dropout=config_lib.added_field(self.config, "model.dropout"))

  def arrays(self, store):
    codes = store["codes"]
    return {"codes": codes.reshape(len(codes), -1).astype(np.int32),
            "labels": store["labels"].astype(np.int32)}

  def init_inputs(self, batch):
    return batch["codes"], batch["labels"]

  def loss(self, params, batch, rng, train: bool = True):
    logits = self.train_logits(params, batch["codes"], batch["labels"], rng, train)
    return ar.next_token_loss(logits, batch["codes"])

  def sample(self, params, labels_B, rng, **overrides):
    s = {**self.config.sample.to_dict(), **overrides}
    codes = sampling.sample_ar(self.model, params, labels_B, rng, temperature=s["temperature"],
                               top_k=s["top_k"], top_p=s["top_p"], cfg_scale=s["cfg_scale"],
                               cfg_schedule=s["cfg_schedule"])
    return self.tokenizer.decode_codes(codes)  # [B, L] raster order, as stored.


class VARFamily(Family):
  """VAR over the per-scale VQ maps; teacher inputs come from the tokenizer's quantiser."""
  name, size_family, bottlenecks = "var", "var", ("msvq", "msvq512")
  sample_fields = ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p")
  head = "softmax"

  def build(self, train_store):
    side = self.tokenizer.grid[-1]
    self.scales = multiscale.scale_schedule(self.tokenizer.bottleneck_module.schedule, side)
    m = self.config.model
    vocab = dict(vocab_size=self.tokenizer.bottleneck_module.codebook_size)
    if self.head == "bitwise":
      vocab = dict(bits=self.tokenizer.channels)
    drop_path = drop_path_rate(self.name, self.config, self.size.depth)
    return var.VAR(self.size, scales=self.scales, latent_channels=self.tokenizer.channels,
                   num_classes=m.num_classes, head=self.head, class_dropout=m.class_dropout,
                   attn_impl=m.attn_impl, drop_path=drop_path, **vocab)

  @property
  def tokens_per_example(self) -> int:
    """Every scale's token map: VAR and Infinity predict them all."""
    return sum(s * s for s in self.scales)

  def _per_scale(self, store):
    return tuple(store[f"codes_{k}"] for k in range(len(self.scales)))

  def arrays(self, store):
    per_scale = self._per_scale(store)
    side = self.tokenizer.grid[-1]
    inputs = []
    for i in range(0, len(store["labels"]), 500):  # Teacher inputs, once, in chunks.
      chunk = tuple(jnp.asarray(c[i:i + 500]) for c in per_scale)
      inputs.append(np.asarray(self.tokenizer.residual_apply(
          lambda r, c: r.teacher_inputs(c, side), chunk)))
    return {"inputs": np.concatenate(inputs).astype(np.float32),
            **{f"codes_{k}": c.astype(np.int32) for k, c in enumerate(per_scale)},
            "labels": store["labels"].astype(np.int32)}

  def init_inputs(self, batch):
    return batch["inputs"], batch["labels"]

  def loss(self, params, batch, rng, train: bool = True):
    logits = self.train_logits(params, batch["inputs"], batch["labels"], rng, train)
    return var.var_loss(logits, tuple(batch[f"codes_{k}"] for k in range(len(self.scales))),
                        self.token_weights(train))

  def token_weights(self, train: bool):
    """The training loss's token weights with objective.reweight_by_scale, else None (a plain
    mean, as held out: Infinity's validation loss is unweighted too)."""
    reweight = train and config_lib.added_field(self.config, "objective.reweight_by_scale")
    return var.scale_loss_weights(self.scales) if reweight else None

  def next_input(self) -> var.NextInput:
    """The tokenizer's quantiser making scale k+1's inputs, reading the tokenizer's weights as
    they are now (under `train_generator.make_sampler`, its traced argument). One function
    object per family, so the samplers' per-scale programs compile once."""
    if not hasattr(self, "_next_input_fn"):
      side = self.tokenizer.grid[-1]
      self._next_input_fn = lambda tokenizer_params, f_hat, code_k, k: (
          self.tokenizer.residual_apply(lambda r, f, c: r.next_scale_input(f, c, k, side),
                                        f_hat, code_k, params=tokenizer_params))
    return var.NextInput(self._next_input_fn, self.tokenizer.params)

  @classmethod
  def check_sample(cls, sample) -> None:
    var_cfg_schedule(sample["cfg_schedule"])

  @classmethod
  def check_sample_for(cls, sample, tokenizer):
    if cls.head == "softmax":  # Infinity's bitwise top_k is `check_bitwise_top_k`'s.
      check_top_k_below(sample["top_k"], tokenizer.bottleneck_module.codebook_size)

  def sample(self, params, labels_B, rng, **overrides):
    """cfg_schedule "linear" is VAR's published ramp, "constant" w = cfg at every scale."""
    s = {**self.config.sample.to_dict(), **overrides}
    codes = var.sample_var(self.model, params, labels_B, rng, self.next_input(),
                           cfg_scale=s["cfg_scale"], top_k=s["top_k"], top_p=s["top_p"],
                           temperature=s["temperature"],
                           cfg_schedule=var_cfg_schedule(s["cfg_schedule"]))
    return self.tokenizer.decode_codes(tuple(codes))


class InfinityFamily(VARFamily):
  """Infinity: bitwise head on multi-scale BSQ; teacher inputs re-made each step with bit flips."""
  name, size_family, bottlenecks = "infinity", "var", ("msbsq",)
  head = "bitwise"

  def arrays(self, store):
    f = store["latents"]
    f = f.reshape(len(f), *self.tokenizer.grid, -1)
    return {"f": f.astype(np.float32), "labels": store["labels"].astype(np.int32)}

  def init_inputs(self, batch):
    f = batch["f"]
    inputs = jnp.zeros((f.shape[0], sum(s * s for s in self.scales) - 1, f.shape[-1]))
    return inputs, batch["labels"]

  def loss(self, params, batch, rng, train: bool = True):
    r_flip, r_drop = jax.random.split(rng)
    # The tokenizer's up-sampling mode, which is also the next-scale input's resize (Infinity's
    # z_interplote_up), as in its quantiser's `next_scale_input` that the sampler uses. Held out
    # (train=False): plain teacher forcing, no bits flipped.
    inputs, bits = infinity.self_correction_inputs(
        batch["f"], self.scales, r_flip,
        flip_prob_max=self.config.objective.flip_max if train else 0.0,
        upsample=self.tokenizer.bottleneck_module.upsample)
    logits = self.train_logits(params, inputs, batch["labels"], r_drop, train)
    return var.bitwise_loss(logits, bits, self.token_weights(train))

  @classmethod
  def check_sample(cls, sample) -> None:
    super().check_sample(sample)
    check_bitwise_top_k(sample["top_k"])

  def sample(self, params, labels_B, rng, **overrides):
    """Each bit from its own 2-way softmax: top_k is 0 (off) or 1 (greedy); cfg_schedule
    "constant" is Infinity's, "linear" VAR's ramp."""
    s = {**self.config.sample.to_dict(), **overrides}
    self.check_sample(s)
    codes = infinity.sample_infinity(self.model, params, labels_B, rng, self.next_input(),
                                     cfg_scale=s["cfg_scale"], top_k=s["top_k"], top_p=s["top_p"],
                                     temperature=s["temperature"],
                                     cfg_schedule=var_cfg_schedule(s["cfg_schedule"]))
    return self.tokenizer.decode_codes(tuple(codes))


FAMILIES: dict[str, type[Family]] = {
    f.name: f for f in (DiTFamily, LlamaGenFamily, VARFamily, InfinityFamily)}


def var_cfg_schedule(cfg_schedule: str) -> str:
  """config.sample.cfg_schedule -> the `var.sample_var` schedule (see VAR_CFG_SCHEDULES)."""
  if cfg_schedule not in VAR_CFG_SCHEDULES:
    raise ConfigError(f"sample.cfg_schedule={cfg_schedule!r}; the var/infinity samplers take one "
                      f"of {list(VAR_CFG_SCHEDULES)} (linear: VAR's ramp, constant: Infinity's)")
  return VAR_CFG_SCHEDULES[cfg_schedule]


def check_top_k_below(top_k: int, codebook_size: int) -> None:
  """Raises ConfigError when top_k keeps the whole codebook: a no-op that would only change the
  metric tag."""
  if top_k >= codebook_size:
    raise ConfigError(f"sample.top_k={top_k} keeps all {codebook_size} codes of the tokenizer's "
                      f"codebook and changes nothing; use 0 (off) or a value below "
                      f"{codebook_size}")


def check_bitwise_top_k(top_k: int) -> None:
  """Raises ConfigError unless top_k is 0 or 1: a bit has 2 values, so top_k >= 2 is a no-op."""
  if top_k not in (0, 1):
    raise ConfigError(f"sample.top_k={top_k}: Infinity draws each bit from a 2-way softmax, so "
                      "top_k >= 2 keeps both values and changes nothing; use 0 (off) or 1 "
                      "(greedy), or top_p / temperature")


def drop_path_rate(family: str, config, depth: int) -> float:
  """The last block's stochastic-depth rate of a var / infinity model: model.drop_path; None: the
  family's published rate (VAR: 0.1·depth/24; Infinity: 0.1); absent, as in a run saved before
  the field existed: the rate it trained with (`config_lib.ADDED_FIELDS`)."""
  rate = config_lib.added_field(config, "model.drop_path")
  if rate is None:
    return var.INFINITY_DROP_PATH if family == "infinity" else var.var_drop_path(depth)
  return rate


def check_sample_settings(family: str, sample) -> None:
  """Raises ConfigError for a config.sample setting that `family`'s sampler would ignore.

  sample: config.sample (or a dict of its fields). A field in NEUTRAL_SAMPLE_SETTINGS that the
  family does not read must keep its neutral value; the fields it reads must be values its
  sampler takes (`Family.check_sample`, e.g. Infinity's top_k is 0 or 1).
  """
  _check_unread(family, sample, NEUTRAL_SAMPLE_SETTINGS)
  FAMILIES[family].check_sample(sample)


def check_new_sample_settings(family: str, sample) -> None:
  """`check_sample_settings`, and for a new run also DiT's ODE settings (`ODE_SAMPLE_DEFAULTS`),
  which a family that does not read them must keep at their defaults: set, they would be saved in
  the run's config with no effect."""
  check_sample_settings(family, sample)
  _check_unread(family, sample, ODE_SAMPLE_DEFAULTS)


def check_new_training_settings(family: str, config) -> None:
  """Raises ConfigError for a `FAMILY_TRAINING_SETTINGS` field that `family` does not read, set
  away from the value its config carries (runs saved before this check keep what they hold)."""
  for path, (readers, default) in FAMILY_TRAINING_SETTINGS.items():
    section, key = path.split(".")
    value = config[section][key]
    if family not in readers and value != default:
      raise ConfigError(f"{path}={value!r} has no effect on model.family={family} (it is read "
                        f"by {' and '.join(readers)} only); leave it at {default!r}")


def _check_unread(family: str, sample, neutral_values: dict) -> None:
  fields = FAMILIES[family].sample_fields
  for key, neutral in neutral_values.items():
    value = sample[key]
    if isinstance(value, (list, tuple)):  # A run's config.json holds lists.
      value = tuple(value)
    if key not in fields and value != neutral:
      raise ConfigError(f"sample.{key}={sample[key]!r} has no effect on model.family={family} "
                        f"(its sampler reads {list(fields)}); leave it at {neutral!r}")


def check_sample_overrides(family: str, overrides) -> None:
  """Raises ConfigError for an override (e.g. `vitok eval --sample k=v`) that `family`'s sampler
  does not read: it would change the metric tag but not the samples."""
  fields = FAMILIES[family].sample_fields
  for key in overrides:
    if key not in fields:
      raise ConfigError(f"sample override {key!r} has no effect on model.family={family}; its "
                        f"sampler reads {list(fields)}")


def check_tokenizer(family: str, bottleneck: str) -> None:
  """Raises ConfigError when `family` cannot train on a tokenizer with `bottleneck`."""
  needs = FAMILIES[family].bottlenecks
  if bottleneck not in needs:
    fits = [name for name, f in FAMILIES.items() if bottleneck in f.bottlenecks]
    raise ConfigError(f"model.family={family} needs a tokenizer with bottleneck in {list(needs)}, "
                      f"but config.tokenizer has bottleneck={bottleneck!r}; train one with "
                      f"quantizer={needs[0]} or use family {fits or '(none)'}")

