"""Trains a generator on a frozen tokenizer's store: config -> tokenizer -> store -> family -> loop.

  vitok train --config generator:"dit/Mi,tokenizer=runs/quickstart" --workdir runs/dit

The tokenizer's train/eval splits are tokenized once into WORKDIR_OF_TOKENIZER/store_SPLIT.npz
(train/codes.py). The loop, checkpoints, pre-emption, metrics and record are the tokenizer
trainer's (train/loop.py): a re-run resumes exactly. Each eval draws config.eval.num_samples
class-conditional samples (labels cycling over the classes), decodes them with the tokenizer and,
on MNIST, scores them with the bundled-data classifier: class accuracy and FID-MNIST; plus the
held-out loss on the eval store. Samples go to WORKDIR/images/samples_STEP.png.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vitok_jax import config_lib, data, kernels
from vitok_jax.config_lib import require, require_choice
from vitok_jax.eval import fid, mnist_metrics, perceptual_metrics, visualize
from vitok_jax.models import bottlenecks, dit, vit
from vitok_jax.models.perceptual import mnist_classifier
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.parallel import sharding
from vitok_jax.scaling import flops
from vitok_jax.scaling import record as record_lib
from vitok_jax.train import checkpoint, generators, loop, metrics_writer, optimizer
from vitok_jax.train.loop import TrainState


def validate(config: ml_collections.ConfigDict, new_run: bool = False) -> None:
  """Raises ConfigError naming the first invalid field of a generator config; new_run: also the
  checks that runs saved before them need not pass (`generators.check_new_sample_settings`)."""
  m = config.model
  require_choice(m.family, "model.family", generators.FAMILIES)
  head = config_lib.split_variant(config.get("variant", ""))[0]
  variant_family = head.partition("/")[0] or "dit"
  require(not new_run or "variant" not in config or m.family == variant_family,
          f"model.family={m.family!r}, but the variant {config.get('variant')!r} made a "
          f"{variant_family} config, whose published defaults (CFG, weight decay, dropout, "
          f"stochastic depth, loss weighting) are {variant_family}'s; name the family in the "
          f"variant instead: --config generator:{m.family}/SIZE,...")
  size_family = generators.FAMILIES[m.family].size_family
  require_choice(m.size, f"model.size (the {size_family} table)", vit.GENERATOR_SIZES[size_family])
  require(bool(config.tokenizer), "config.tokenizer is empty; set it to a trained tokenizer's "
          "workdir, e.g. tokenizer=runs/quickstart/runs/c4-…")
  require(m.num_classes >= 1, f"model.num_classes must be >= 1, got {m.num_classes}")
  require(0.0 <= m.class_dropout < 1.0, f"model.class_dropout must be in [0, 1), got {m.class_dropout}")
  require(m.patch in (1, 2, 4), f"model.patch must be 1, 2 or 4, got {m.patch}")
  require_choice(m.dtype, "model.dtype", ("float32", "bfloat16"))
  loop.validate_run(config)
  require_choice(config.objective.t_sampling, "objective.t_sampling", ("uniform", "logit_normal"))
  require(not config.objective.shortcut or m.family == "dit",
          f"objective.shortcut is DiT's few-step objective; model.family={m.family}")
  require_choice(config_lib.added_field(config, "objective.shortcut_input"),
                 "objective.shortcut_input", dit.STEP_INPUTS)
  require(not new_run or not config.objective.shortcut or "shortcut_input" in config.objective,
          "objective.shortcut set by override embeds the step size d as runs from before "
          "objective.shortcut_input did; turn it on in the variant instead (`--config "
          "generator:dit/SIZE,...,shortcut=true`: the step's level log2(1/d), as the paper's code)")
  require(not new_run or config.objective.shortcut or "shortcut_input" not in config.objective,
          "objective.shortcut_input has no effect without objective.shortcut; drop "
          "shortcut=true from the variant rather than overriding objective.shortcut")
  require(0.0 <= config.objective.flip_max < 1.0,
          f"objective.flip_max must be in [0, 1), got {config.objective.flip_max}")
  dropout = config_lib.added_field(config, "model.dropout")
  require(0.0 <= dropout < 1.0, f"model.dropout must be in [0, 1), got {dropout}")
  require(not dropout or m.family == "llamagen",
          f"model.dropout is LlamaGen's (its blocks and embeddings); model.family={m.family} "
          f"has none (leave it 0)")
  drop_path = config_lib.added_field(config, "model.drop_path")
  require(drop_path is None or 0.0 <= drop_path < 1.0,
          f"model.drop_path must be in [0, 1) or None (the family's published rate), got "
          f"{drop_path}")
  require(not drop_path or m.family in ("var", "infinity"),
          f"model.drop_path is VAR's and Infinity's stochastic depth; model.family={m.family} "
          f"has none (leave it 0)")
  require(not config_lib.added_field(config, "objective.reweight_by_scale")
          or m.family in ("var", "infinity"),
          f"objective.reweight_by_scale weighs the scales of var / infinity; model.family="
          f"{m.family} has none")
  s = config.sample
  require_choice(s.method, "sample.method", ("euler", "heun"))
  require_choice(s.cfg_schedule, "sample.cfg_schedule", ("constant", "linear"))
  require(s.num_steps >= 2, f"sample.num_steps counts grid points (SiT): >= 2, got {s.num_steps}")
  require(s.cfg_scale >= 0, f"sample.cfg_scale must be >= 0, got {s.cfg_scale}")
  require(s.temperature > 0, f"sample.temperature must be > 0, got {s.temperature}")
  require(0 < s.top_p <= 1, f"sample.top_p must be in (0, 1], got {s.top_p}")
  require(s.top_k >= 0, f"sample.top_k must be >= 0 (0 disables it), got {s.top_k}")
  # No setting the family's sampler ignores (for a new run, DiT's ODE settings included), nor,
  # for a new run, a training setting it ignores.
  (generators.check_new_sample_settings if new_run else generators.check_sample_settings)(
      m.family, s)
  if new_run:
    generators.check_new_training_settings(m.family, config)
  require(config.eval.num_samples >= 0, f"eval.num_samples must be >= 0, got {config.eval.num_samples}")
  require(not config.eval.get("gfid_reference") or config.eval.get("inception_weights"),
          f"eval.gfid_reference={config.eval.get('gfid_reference')!r} holds gFID's real "
          "statistics; gFID also needs --config.eval.inception_weights=FILE (the network)")


class Batches:
  """The training stream: a pure function of (seed, global batch index), so resume is exact.

  Epoch e visits the rows in permutation(seed, e); global batch b is positions [b·B, (b+1)·B) of
  the concatenated epochs; a process takes the positions of its rows of the global array
  (`rows`, ascending: `mesh.process_rows`), by default block p of B / P.
  """

  def __init__(self, arrays: dict[str, np.ndarray], global_batch: int, seed: int, *,
               start_batch: int = 0, process_index: int = 0, process_count: int = 1,
               rows=None):
    self.arrays, self.global_batch, self.seed = arrays, global_batch, seed
    self.num_rows = len(next(iter(arrays.values())))
    self.batch_index = start_batch
    local = global_batch // process_count
    self.batch_rows = (np.arange(process_index * local, (process_index + 1) * local)
                       if rows is None else np.asarray(rows))
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)}
    return self._perms[epoch]

  def rows(self, batch_index: int) -> np.ndarray:
    positions = batch_index * self.global_batch + self.batch_rows
    epochs, index = np.divmod(positions, self.num_rows)
    return np.array([self._perm(int(e))[i] for e, i in zip(epochs, index)])

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self.rows(self.batch_index)
    self.batch_index += 1
    return {k: v[rows] for k, v in self.arrays.items()}


def build_family(config, mesh) -> tuple[generators.Family, dict, dict]:
  """The family on the frozen tokenizer, and its train and eval arrays (from the stores)."""
  tokenizer = generators.FrozenTokenizer(config.tokenizer, mesh)
  generators.check_tokenizer(config.model.family, tokenizer.bottleneck)
  generators.FAMILIES[config.model.family].check_sample_for(config.sample, tokenizer)
  train_store, eval_store = tokenizer.store("train"), tokenizer.store("eval")
  for split, store in (("train", train_store), ("eval", eval_store)):
    top = int(np.max(store["labels"], initial=-1))
    if top >= config.model.num_classes:  # A class embedding lookup past its table: NaNs.
      raise config_lib.ConfigError(
          f"model.num_classes={config.model.num_classes}, but the tokenizer's {split} data has "
          f"labels up to {top}; set model.num_classes >= {top + 1}")
  family = generators.FAMILIES[config.model.family](config, tokenizer, train_store)
  return family, family.arrays(train_store), family.arrays(eval_store)


# In a generator run: {"workdir", "step"} of the tokenizer checkpoint whose codes it trains on.
TOKENIZER_FILE = "tokenizer.json"


def check_tokenizer_step(workdir: str, tokenizer_dir: str, doing: str) -> None:
  """ConfigError when the generator run in `workdir` was trained on another checkpoint of its
  tokenizer than the tokenizer's latest (it was trained on and its store remade): `doing`
  (resuming, evaluating) would mix the codes of two tokenizers. Checked before anything is
  loaded or tokenized. A run from before TOKENIZER_FILE falls back on its record's tokenizer
  step, if it has one."""
  trained_on = None
  if os.path.exists(path := os.path.join(workdir, TOKENIZER_FILE)):
    with open(path) as f:
      trained_on = json.load(f)["step"]
  elif os.path.exists(path := os.path.join(workdir, "record.json")):
    with open(path) as f:
      trained_on = json.load(f)["tokenizer"]["step"]
  if trained_on is None:
    logging.warning("%s has no %s (a run begun before it was written): the tokenizer checkpoint "
                    "it trained on cannot be checked", workdir, TOKENIZER_FILE)
    return
  now = checkpoint.latest_step(tokenizer_dir)
  if now != trained_on:
    raise config_lib.ConfigError(
        f"{workdir} was trained on the codes of tokenizer {tokenizer_dir} at its step "
        f"{trained_on}; that tokenizer is now at step {now} (its token store is remade for it), "
        f"so {doing} it would mix the codes of two tokenizers. Train a new generator on it (a "
        f"new --workdir).")


def _note_tokenizer_step(workdir: str, tokenizer) -> None:
  config_lib.write_json(os.path.join(workdir, TOKENIZER_FILE),
                        {"workdir": os.path.abspath(tokenizer.workdir), "step": tokenizer.step})


def _example(arrays) -> dict:
  return {k: v[:1] for k, v in arrays.items()}


def init_state(family, tx, config, batch) -> TrainState:
  params = nn.meta.unbox(family.init(jax.random.key(config.seed), batch))
  ema = jax.tree.map(jnp.copy, params) if config.ema_decay else {}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=ema)


def state_shardings(family, tx, config, mesh, batch) -> TrainState:
  param_specs = sharding.param_logical_specs(
      jax.eval_shape(lambda b: family.init(jax.random.key(0), b), batch))
  abstract = jax.eval_shape(functools.partial(init_state, family, tx, config), batch)
  replicated = jax.sharding.PartitionSpec()
  specs = TrainState(
      step=replicated, params=param_specs,
      opt_state=sharding.opt_state_logical_specs(tx, abstract.opt_state, param_specs),
      ema_params=param_specs if config.ema_decay else {})
  return sharding.logical_to_mesh(specs, mesh, shapes=abstract)


def make_train_step(family, tx, schedule, config):
  """(state, batch) -> (state, metrics); rng = fold_in(seed key, step)."""
  base_key = jax.random.key(config.seed + 2)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(base_key, state.step)
    (loss, metrics), grads = jax.value_and_grad(lambda p: family.loss(p, batch, rng),
                                                has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if config.ema_decay:
      ema = optax.incremental_update(params, ema, step_size=1.0 - config.ema_decay)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics

  return train_step


def held_out_loss(family, params, arrays, config, max_examples: int = 2048) -> float:
  """Mean clean conditional loss over the eval store (`Family.loss` with train=False: no label
  dropped, no bit flipped; DiT's noise and times fixed), full batches only, each split over the
  mesh's batch shards as in training."""
  mesh = family.tokenizer.mesh
  loss_fn = jax.jit(sharding.with_rules(lambda p, b, r: family.loss(p, b, r, train=False)[0],
                                        mesh),
                    out_shardings=mesh_lib.replicated(mesh))
  n = min(len(arrays["labels"]), max_examples)
  batch = min(config.batch_size, n)
  losses = [loss_fn(params, {k: mesh_lib.shared_rows(v[i:i + batch], mesh)
                             for k, v in arrays.items()}, jax.random.key(config.seed + 7 + i))
            for i in range(0, n - batch + 1, batch)]
  return float(np.mean(jax.device_get(losses)))


def sample_labels(num: int, num_classes: int) -> np.ndarray:
  """0, 1, …, C−1, 0, 1, …: a grid of `num_classes` columns has one class per column. Fewer
  samples than classes are spread evenly over them (500 of 1000: 0, 2, 4, …), so that gFID and
  class accuracy are not scored on the first classes alone."""
  if num < num_classes:
    return (np.arange(num) * num_classes // num).astype(np.int32)
  return (np.arange(num) % num_classes).astype(np.int32)


def make_sampler(sample_fn, tokenizer):
  """jit of (params, tokenizer params, labels, rng) -> pixels (replicated): the frozen tokenizer's
  weights are an argument of the compiled sampler (closing over them would fold them in as
  constants). Traced under the mesh's rules, so labels split over the batch shards are sampled
  a share per device."""
  def run(params, tokenizer_params, labels_B, rng):
    with generators.swapped(tokenizer, "params", tokenizer_params):
      return sample_fn(params, labels_B, rng)
  return jax.jit(sharding.with_rules(run, tokenizer.mesh),
                 out_shardings=mesh_lib.replicated(tokenizer.mesh))


def generate(sample_fn, params, labels, config, rng, tokenizer) -> tuple[np.ndarray, float]:
  """Samples for `labels` in batches of config.batch_size; returns (pixels, seconds per sample).

  A short last batch runs padded to the compiled batch; the time is per row run, padding included,
  so a partial batch does not inflate it."""
  batch = min(config.batch_size, len(labels))
  sampler = make_sampler(sample_fn, tokenizer)
  fn = lambda params, labels_B, key: sampler(params, tokenizer.params, labels_B, key)
  out, seconds, rows = [], 0.0, 0
  for i in range(0, len(labels), batch):
    chunk = labels[i:i + batch]
    # A short last batch keeps the compiled shape.
    padded = mesh_lib.shared_rows(np.resize(chunk, batch), tokenizer.mesh)
    key = jax.random.fold_in(rng, i)
    if i == 0:
      jax.block_until_ready(fn(params, padded, key))  # Compile outside the timing.
    start = time.time()
    pixels = jax.block_until_ready(fn(params, padded, key))
    seconds += time.time() - start
    rows += batch
    out.append(np.asarray(pixels)[:len(chunk)])
  return np.concatenate(out), seconds / rows


def _is_mnist(tokenizer) -> bool:
  return tokenizer.config.data.name == "mnist"


GFID_METRICS = ("rfid", "inception_score")


def check_gfid_files(eval_cfg) -> None:
  """ConfigError, before training or re-evaluating, when gFID is asked for (eval.inception_weights
  set) and the network's weights or the reference statistics (eval.gfid_reference) are missing
  or unfit."""
  if eval_cfg.get("inception_weights"):
    perceptual_metrics.check_weights(GFID_METRICS, eval_cfg, label="gFID and Inception Score")
    if eval_cfg.get("gfid_reference"):
      perceptual_metrics.load_inception_reference(eval_cfg.gfid_reference)


def eval_tags(run_eval, eval_cfg) -> dict:
  """Tags for re-evaluating a run with `eval_cfg` in place of its own `run_eval`: the settings
  FID depends on, where they differ (a reference file by its name without extension)."""
  tags = {}
  if eval_cfg.num_samples != run_eval.num_samples:
    tags["num_samples"] = eval_cfg.num_samples
  reference = eval_cfg.get("gfid_reference", "")
  if reference != run_eval.get("gfid_reference", ""):
    tags["reference"] = (os.path.splitext(os.path.basename(reference))[0] if reference
                         else "held_out")
  return tags


def gfid_reference(tokenizer, config):
  """(Inception networks, {"inception": real statistics}) for gFID: eval.gfid_reference's saved
  statistics (e.g. a training set's, as published gFIDs use), else the Inception pool features
  of the tokenizer's held-out split (up to eval.gfid_real_examples images), computed once per
  eval."""
  nets = perceptual_metrics.load_networks(GFID_METRICS, config.eval)
  if config.eval.get("gfid_reference"):
    return nets, {"inception": perceptual_metrics.load_inception_reference(
        config.eval.gfid_reference)}
  # The held-out images as the tokenizer's data makes them: the size its samples decode to.
  return nets, {"inception": inception_stats(
      nets, tokenizer.config.data, config.batch_size,
      config.eval.get("gfid_real_examples", 10_000))}


def inception_stats(nets, data_cfg, batch_size: int, limit: int = 0,
                    split: str = "eval") -> fid.GaussianStats:
  """Inception pool statistics of a split of `data_cfg` read once on this process (the eval way:
  no augmentation), up to `limit` images (0: all); nets from `perceptual_metrics.load_networks`."""
  acc = perceptual_metrics.MetricAccumulator(("rfid",), nets)
  for images in data.held_out_images(data_cfg, batch_size, limit, split):
    acc.update(real=images)
  return acc.real_stats("inception")


def evaluate(family, params, config, eval_arrays, *, image_path: str | None = None,
             tag: str = "") -> dict:
  """Held-out loss, and generation metrics of eval.num_samples class-conditional samples.

  Generation metrics are named gen/[TAG/][SAMPLER/]name (e.g. gen/cfg_scale=3/class_accuracy).
  """
  metrics = {"eval/loss": held_out_loss(family, params, eval_arrays, config)}
  if not config.eval.num_samples:
    return metrics
  labels = sample_labels(config.eval.num_samples, config.model.num_classes)
  rng = jax.random.key(config.seed + 11)
  samplers = {"": family.sample, **{f"{k}/": v for k, v in family.few_step_samplers().items()}}
  samplers = {(f"{tag}/" if tag else "") + k: v for k, v in samplers.items()}
  classifier = real = None
  if _is_mnist(family.tokenizer):
    eval_size = family.tokenizer.config.data.eval_size
    path = config.eval.mnist_classifier or mnist_classifier.default_path(
        family.tokenizer.workdir, eval_size)
    classifier = mnist_classifier.load_or_train(path, eval_size=eval_size)
    # The held-out digits as the tokenizer's data makes them (e.g. 32×32 bicubic), the size its
    # samples decode to: raw 28×28 digits would add the resize's feature shift to every FID.
    real = np.concatenate(list(data.held_out_images(family.tokenizer.config.data,
                                                    config.batch_size)))
  inception_nets = reference = None
  if config.eval.get("inception_weights"):
    inception_nets, reference = gfid_reference(family.tokenizer, config)
  for prefix, sample_fn in samplers.items():
    pixels, seconds = generate(sample_fn, params, labels, config, rng, family.tokenizer)
    metrics[f"gen/{prefix}ms_per_sample"] = 1e3 * seconds
    if classifier is not None:
      metrics[f"gen/{prefix}class_accuracy"] = mnist_metrics.class_accuracy(classifier, pixels, labels)
      metrics[f"gen/{prefix}fid_mnist"] = mnist_metrics.fid_mnist(classifier, real, pixels)
    if inception_nets is not None:
      acc = perceptual_metrics.MetricAccumulator(GFID_METRICS, inception_nets, reference)
      for i in range(0, len(pixels), config.batch_size):
        acc.update(fake=pixels[i:i + config.batch_size])
      result = acc.result()
      metrics[f"gen/{prefix}fid"] = result["eval/rfid"]
      metrics[f"gen/{prefix}inception_score"] = result["eval/inception_score"]
    if image_path is not None:
      n = min(config.num_visualize, len(pixels))
      name = prefix.replace("/", "_").rstrip("_")
      visualize.save_sample_grid(f"{image_path}{name}.png", pixels[:n],
                                 columns=config.model.num_classes)
  return metrics


def setup(config, mesh):
  """(family, train arrays, eval arrays, tx, schedule, sharded state, jitted step, shardings)."""
  family, train_arrays, eval_arrays = build_family(config, mesh)
  tx, schedule = optimizer.make_optimizer(config.optim, config.batch_size, config.total_steps)
  example = _example(train_arrays)
  shardings = state_shardings(family, tx, config, mesh, example)
  state = jax.jit(functools.partial(init_state, family, tx, config),
                  out_shardings=shardings)(example)
  step = jax.jit(sharding.with_rules(make_train_step(family, tx, schedule, config), mesh),
                 donate_argnums=0, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)))
  return family, train_arrays, eval_arrays, state, step, shardings


def generator_record(config, family, params, *, wall_time, metrics, workdir, examples_per_sec,
                     example, train_examples: int) -> dict:
  """Run record of a generator: params, FLOPs per example (`generator_flops`), what its attention
  runs as (each distinct call of the forward), the size of its training set, the tokenizer tokens
  of an example it models (`vitok results` multiplies them into tokens_seen), metrics."""
  with kernels.recorded_attention() as attention_calls:
    jax.eval_shape(family.forward_fn(), params, example)
  tok = family.tokenizer
  return {
      "workdir": os.path.abspath(workdir),
      "kind": "generator",
      "variant": config.get("variant", ""),
      "config": config.to_dict(),
      "family": config.model.family,
      "params": {"total": vit.param_count(params)},
      "tokenizer": {"workdir": os.path.abspath(tok.workdir), "bottleneck": tok.bottleneck,
                    "step": tok.step, "grid": list(tok.grid), "c": tok.channels,
                    "E": int(np.prod(tok.grid)) * tok.channels,
                    "codebook_size": tok.bottleneck_module.codebook_size
                                     if tok.bottleneck in bottlenecks.LEARNED_CODEBOOK else None,
                    "code_bits": flops.code_bits_per_example(tok.model, tok.pixel_shape)},
      "flops_per_example": generator_flops(config, family, params, example),
      "attention_impl": record_lib.distinct_calls(attention_calls),
      "train_examples": train_examples,
      "tokens_per_example": family.tokens_per_example,
      **record_lib.run_fields(config, wall_time=wall_time, examples_per_sec=examples_per_sec,
                              metrics=metrics),
  }


def generator_flops(config, family, params, example) -> dict:
  """FLOPs per example: XLA's count of the forward (`forward_xla`), the attention pairs its masks
  hide (`masked_attention`; causal, block-causal), the forward less them, and a training step's
  (`Family.train_forwards` forwards).

  Counted on the model with XLA attention: a cuDNN or Pallas attention (bf16 on a GPU) is a custom
  call that XLA's cost analysis counts as 0.
  """
  with (generators.swapped(family, "model", family.model.clone(attn_impl="xla")),
        kernels.recorded_attention() as counted_calls):
    forward_xla = flops.xla_flops(family.forward_fn(), params, example)
  masked = flops.masked_attention_flops(counted_calls)
  return {"forward_xla": forward_xla, "masked_attention": masked, "forward": forward_xla - masked,
          "train": family.train_forwards(config.batch_size) * (forward_xla - masked)}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Runs (or resumes) generator training; returns the run record, None when pre-empted."""
  with loop.Preemption() as preemption:  # From the start: a stop during set-up is kept.
    return _train(config, workdir, preemption)


def _train(config, workdir: str, preemption: loop.Preemption) -> dict | None:
  validate(config, new_run=not os.path.exists(os.path.join(workdir, "config.json")))
  check_gfid_files(config.eval)  # gFID at every eval: its files must be there now.
  config_lib.check_workdir(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.per_process_batch(config.batch_size, mesh)  # Raises unless the batch splits evenly.
  if (record := loop.finished_record(workdir, config)) is not None:
    return record
  if (latest := checkpoint.latest_step(workdir)) is not None:  # Before it tokenizes anything.
    loop.check_resume(workdir, config, latest)
    if latest:  # A stop during set-up saves step 0, before the tokenizer's step is noted.
      check_tokenizer_step(workdir, config.tokenizer, "resuming")
  family, train_arrays, eval_arrays, state, train_step, _ = setup(config, mesh)
  logging.info("%s/%s: %d params on %s; %d training examples", config.model.family,
               config.model.size, vit.param_count(state.params), dict(mesh.shape),
               len(train_arrays["labels"]))
  is_main, ckpt, state, clock = loop.open_run(config, workdir, state)
  if is_main and not int(state.step):  # The tokenizer checkpoint it trains on.
    _note_tokenizer_step(workdir, family.tokenizer)
  batches = Batches(train_arrays, config.batch_size, config.seed, start_batch=int(state.step),
                    rows=mesh_lib.process_rows(config.batch_size, mesh))
  batch_sharding = mesh_lib.batch_sharding(mesh)
  writer = (metrics_writer.MetricWriter(workdir, resume_step=int(state.step)) if is_main
            else None)

  def evaluate_state(state, step):
    return evaluate(family, loop.eval_params(state, config), config, eval_arrays, image_path=(
        os.path.join(workdir, "images", f"samples_{step:07d}") if is_main else None))

  try:
    result = loop.run(state, config=config, train_step=train_step, ckpt=ckpt, writer=writer,
                      next_batch=lambda: mesh_lib.global_batch(next(batches), batch_sharding),
                      evaluate=evaluate_state, log_name="grad_norm", clock=clock,
                      preemption=preemption)
  finally:
    ckpt.close()
  if result.preempted:
    return None
  eval_metrics = result.eval_metrics or evaluate_state(result.state, int(result.state.step))
  record = generator_record(config, family, loop.eval_params(result.state, config),
                            wall_time=clock.seconds(),
                            metrics=eval_metrics, workdir=workdir,
                            examples_per_sec=result.examples_per_sec,
                            example=_example(train_arrays),
                            train_examples=len(train_arrays["labels"]))
  if is_main:
    record_lib.write(record, workdir)
    writer.close()
  return record


def restore_run(workdir: str, config):
  """(family, train arrays, eval arrays, step, eval params) of a trained generator run's latest
  checkpoint."""
  check_tokenizer_step(workdir, config.tokenizer, "evaluating or sampling")
  mesh = mesh_lib.make_mesh(config.mesh)
  family, train_arrays, eval_arrays, state, _, _ = setup(config, mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  step = ckpt.latest_step()
  if not step:  # None, or the initial state a run stopped during set-up saves.
    ckpt.close()
    raise config_lib.ConfigError(f"{workdir} has no trained checkpoint; train it first")
  state = ckpt.restore(step, state)
  ckpt.close()
  return family, train_arrays, eval_arrays, step, loop.eval_params(state, config)


def apply_sample_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets config.sample fields from `overrides` and validates; ConfigError for a key that is no
  config.sample field or that the family's sampler does not read (it would only change the tag)."""
  for key in overrides:
    require(key in config.sample, f"sample override {key!r} is not a config.sample field; use one "
            f"of {sorted(config.sample)}")
  generators.check_sample_overrides(config.model.family, overrides)
  try:
    config.sample.update(overrides)
  except TypeError as e:  # e.g. cfg_scale=abc, num_steps=2.5: ml_collections keeps field types.
    raise config_lib.ConfigError(f"sample overrides {overrides}: {e}") from None
  validate(config)


def evaluate_workdir(workdir: str, sample_overrides: dict | None = None,
                     eval_config=None) -> dict:
  """Re-evaluates a trained generator run, e.g. at another CFG scale; adds the metrics to its record
  (and recounts its FLOPs when the record predates `masked_attention`).

  sample_overrides: config.sample fields (cfg_scale, num_steps, method, temperature, top_k, ...);
  the generation metrics are then tagged with them: gen/cfg_scale=3/class_accuracy.
  eval_config: replaces the run's config.eval (e.g. with inception_weights for gFID); another
  eval.num_samples or gfid_reference than the run's tags the metrics too (`eval_tags`), as FID
  depends on them.
  """
  config = config_lib.read_config(workdir)
  config_lib.require_kind(config, workdir, "generator")
  tags = {}
  if eval_config is not None:
    tags = eval_tags(config.eval, eval_config)
    config.eval = eval_config
    check_gfid_files(config.eval)
  overrides = dict(sample_overrides or {})
  apply_sample_overrides(config, overrides)
  tag = ",".join(f"{k}={v}" for k, v in sorted({**overrides, **tags}.items()))
  family, train_arrays, eval_arrays, step, params = restore_run(workdir, config)
  metrics = evaluate(family, params, config, eval_arrays, tag=tag, image_path=(
      os.path.join(workdir, "images", f"eval_{step:07d}_") if jax.process_index() == 0 else None))
  fields = {}
  if (os.path.exists(os.path.join(workdir, "record.json")) and "masked_attention" not in
      record_lib.read(workdir).get("flops_per_example", {})):
    # A record from before the masked pairs were left out: recount them.
    fields["flops_per_example"] = generator_flops(config, family, params,
                                                  _example(train_arrays))
  record_lib.add_metrics(workdir, {k: v for k, v in metrics.items() if k.startswith("gen/")},
                         fields)
  return {"step": step, **metrics}


def sample_workdir(workdir: str, num_samples: int, out: str = "", **overrides) -> str:
  """Class-conditional samples of a trained generator run -> a PNG grid (one column per class)."""
  require(num_samples >= 1, f"--num_samples={num_samples}: draw at least one sample")
  config = config_lib.read_config(workdir)
  config_lib.require_kind(config, workdir, "generator")
  apply_sample_overrides(config, overrides)
  family, _, _, step, params = restore_run(workdir, config)
  labels = sample_labels(num_samples, config.model.num_classes)
  sample_fn = lambda p, l, r: family.sample(p, l, r, **overrides)
  pixels, seconds = generate(sample_fn, params, labels, config, jax.random.key(config.seed + 13),
                             family.tokenizer)
  out = out or os.path.join(workdir, "images", f"sample_{step:07d}.png")
  if jax.process_index() == 0:
    visualize.save_sample_grid(out, pixels, columns=config.model.num_classes)
  logging.info("%d samples at %.1f ms each -> %s", num_samples, 1e3 * seconds, out)
  return out
