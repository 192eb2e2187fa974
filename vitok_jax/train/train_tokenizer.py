"""Trains a tokenizer from a config: config -> mesh -> data -> model -> state -> jitted step -> loop.

  vitok train --config vitok:"Mu-Mi/4,c=16,data=mnist" --workdir runs/mnist

The work directory holds config.json, metrics.jsonl, checkpoints/, images/ and record.json.
Re-running the same command resumes from the last checkpoint (params, optimizer, step and the
data iterator's position), so an interrupted run ends exactly where an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vitok_jax import config_lib, data
from vitok_jax.config_lib import require, require_choice
from vitok_jax.errors import DataError
from vitok_jax.eval import perceptual_metrics, reconstruction, visualize
from vitok_jax.models import bottlenecks, larp, tokenizer, vit
from vitok_jax.models.perceptual import lpips, videomae
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.parallel import sharding
from vitok_jax.scaling import record as record_lib
from vitok_jax.train import checkpoint, codebook, gan, losses, loop, metrics_writer, optimizer
from vitok_jax.train.loop import TrainState


@dataclasses.dataclass(frozen=True)
class Components:
  """What a config builds besides the state: the model, its optimizer and the optional losses."""
  model: tokenizer.ViTok
  tx: optax.GradientTransformation
  schedule: Any
  gan_stage: gan.GANStage | None
  perceptual_fn: Any  # (x, recon) -> [B] LPIPS, when loss.lpips > 0.
  trepa_fn: Any = None  # (recon, x) -> scalar TREPA on clips, when loss.trepa > 0.


def validate(config: ml_collections.ConfigDict, new_run: bool = False) -> None:
  """Raises ConfigError naming the first invalid field of a tokenizer config and what is allowed;
  new_run: also the checks that runs saved before them need not pass."""
  m, d = config.model, config.data
  require(not new_run or not data.single_folder(d) or "folder_split" in d,
          f"data.name={d.name!r} set by override holds out part of {d.path or 'its folder'} by "
          f"position in the sorted files, which adding files reshuffles; give the folder in the "
          f"variant instead (`--config vitok:...,data={d.name},path=...`: split by path hashes), "
          f"or separate folders with path=.../{{split}}")
  require(len(m.patch) != 3 or d.name not in data.IMAGE_NAMES,
          f"model.patch={tuple(m.patch)} is a tubelet (video) but data.name={d.name!r} holds "
          f"images; use a P patch (e.g. Mu-Mu/4) for images, or a video source")
  data.validate(d)
  for field in ("encoder", "decoder"):
    require_choice(m[field], f"model.{field}", vit.SIZES)
  require_choice(m.bottleneck, "model.bottleneck", (*bottlenecks.BOTTLENECKS, "larp"))
  if m.bottleneck == "larp":
    require(m.get("num_queries", 0) >= 2, f"bottleneck=larp needs model.num_queries >= 2, got "
            f"{m.get('num_queries', 0)}; set the variant option queries=N, e.g. queries=32")
    require_choice(config_lib.added_field(config, "model.prior_size"), "model.prior_size",
                   vit.GENERATOR_SIZES["larp_prior"])
    mult = config_lib.added_field(config, "optim.prior_lr_mult")
    require(0 < mult < float("inf"), f"optim.prior_lr_mult must be > 0, got {mult}")
    dropout = config_lib.added_field(config, "model.prior_dropout")
    require(0 <= dropout < 1, f"model.prior_dropout must be in [0, 1), got {dropout}")
  else:
    require(not m.get("num_queries", 0), f"model.num_queries={m.num_queries} only applies to "
            f"bottleneck=larp; drop queries=N or set quantizer=larp")
  size = m.get("codebook_size", 0)
  require(size >= 0, f"model.codebook_size must be >= 0 (0 = the bottleneck's default), got {size}")
  require(not size or m.bottleneck in (*bottlenecks.LEARNED_CODEBOOK, "larp"),
          f"model.codebook_size={size} needs a learned codebook (quantizer one of "
          f"{[*bottlenecks.LEARNED_CODEBOOK, 'larp']}), not {m.bottleneck!r}; drop codebook=N")
  require_choice(m.mlp, "model.mlp", vit.MLP_KINDS)
  require_choice(m.rope, "model.rope", vit.ROPE_KINDS)
  if m.rope == "none" and m.bottleneck != "larp":  # An ablation, else a mistake: say which.
    logging.warning("model.rope='none': ViTok's encoder and decoder get no position information "
                    "(it adds no other position embedding), so they are equivariant to permuting "
                    "the patches; use rope one of %s unless that is the point",
                    [k for k in vit.ROPE_KINDS if k != "none"])
  require_choice(m.dtype, "model.dtype", ("float32", "bfloat16"))
  require(m.channels >= 1, f"model.channels (c) must be >= 1, got {m.channels}")
  require(len(m.patch) in (2, 3) and all(p >= 1 for p in m.patch),
          f"model.patch={tuple(m.patch)} must be (p, p) for images or (q, p, p) for video")
  video = len(m.patch) == 3
  require(video == (d.frames > 1),
          f"model.patch={tuple(m.patch)} is {'a tubelet' if video else 'an image patch'} but "
          f"data.frames={d.frames}; use a QxP patch with frames > 1, or P with frames=1")
  for p in m.patch[-2:]:
    require(d.res % p == 0, f"model.patch size {p} does not divide data.res={d.res}; use one of "
            f"{[q for q in (2, 4, 8, 16, 32) if d.res % q == 0]}")
  require(not (video and m.bottleneck in bottlenecks.MULTI_SCALE),
          f"bottleneck={m.bottleneck!r} quantises a square 2-D token map, so images only; use a "
          f"P patch with frames=1, or a single-scale quantizer (vq, vq1k, bsq) for video")
  if video:
    require(d.frames % m.patch[0] == 0,
            f"data.frames={d.frames} is not divisible by the tubelet length {m.patch[0]}; use "
            f"frames in {[m.patch[0] * k for k in (1, 2, 4, 8)]} or change the tubelet")
  for size in (m.encoder, m.decoder):
    width, _, heads = vit.SIZES[size]
    require(width // heads % 2 == 0, f"size {size}: head_dim {width // heads} must be even for RoPE")
  loop.validate_run(config)
  restart, code_ema = config.get("codebook_restart_every", 0), config.get("codebook_ema", 0.0)
  require(restart >= 0, f"codebook_restart_every must be >= 0 (0 = off), got {restart}")
  require(0.0 <= code_ema < 1.0, f"codebook_ema must be in [0, 1) (0 = off), got {code_ema}")
  for field, value in (("codebook_restart_every", restart), ("codebook_ema", code_ema)):
    require(not value or m.bottleneck in bottlenecks.LEARNED_CODEBOOK,
            f"{field}={value} needs a learned codebook (quantizer one of "
            f"{list(bottlenecks.LEARNED_CODEBOOK)}), not {m.bottleneck!r}; set it to 0")
  require(not ((restart or code_ema) and config.gan.enabled and config.gan.freeze_encoder),
          "codebook_restart_every / codebook_ema would change the codebook of a frozen encoder in "
          "the GAN stage; set them to 0 for stage 2")
  for name, weight in config.loss.items():
    require(weight >= 0, f"loss.{name} must be >= 0, got {weight}")
  if m.bottleneck == "vq1k_ent" and not config.loss.get("vq_entropy", 0.0):
    logging.warning("quantizer=vq1k_ent computes LlamaGen's entropy loss, but loss.vq_entropy=0 "
                    "turns it off; set loss.vq_entropy > 0 (0.1 is the default) or use vq1k")
  require(config.loss.lpips == 0 or config.perceptual.lpips_weights,
          "loss.lpips > 0 needs perceptual.lpips_weights: a file made by tools/convert_lpips.py")
  # VGG's four 2×2 pools leave no feature map below 16 pixels (LPIPS would be NaN).
  require((config.loss.lpips == 0 and "lpips" not in config.eval.metrics)
          or d.res >= lpips.MIN_SIZE,
          f"LPIPS (loss.lpips={config.loss.lpips}, eval.metrics={list(config.eval.metrics)}) "
          f"needs frames of at least {lpips.MIN_SIZE} pixels, got data.res={d.res}; raise "
          f"data.res or drop LPIPS")
  if config.loss.get("trepa", 0.0) > 0:
    require(video, f"loss.trepa > 0 is a temporal loss for video (data.frames > 1), got "
            f"frames={d.frames}; set loss.trepa=0 for images")
    require(config.perceptual.trepa_weights, "loss.trepa > 0 needs perceptual.trepa_weights: a "
            "VideoMAE-v2 .npz (videomae.params_from_torch + weights.save)")
    require_choice(config.perceptual.trepa_size, "perceptual.trepa_size", videomae.SIZES)
    size = videomae.SIZES[config.perceptual.trepa_size]
    resolution = config.perceptual.trepa_resolution
    require(d.frames % size.tubelet == 0,
            f"loss.trepa: VideoMAE embeds {size.tubelet}-frame tubelets, which do not divide "
            f"data.frames={d.frames}; use frames divisible by {size.tubelet}")
    require(resolution > 0 and resolution % size.patch == 0,
            f"perceptual.trepa_resolution={resolution} is not a multiple of VideoMAE "
            f"{config.perceptual.trepa_size}'s patch {size.patch}; use e.g. 224")
    # The published weights' fixed position table is for their own token grid: LatentSync
    # interpolates it in time for other clip lengths, upstream VideoMAE-v2 refuses them.
    require(not size.pretrained or (d.frames, resolution) == (videomae.PRETRAINED_FRAMES,
                                                              videomae.RESOLUTION),
            f"loss.trepa with VideoMAE {config.perceptual.trepa_size}: its weights' position "
            f"table is for {videomae.PRETRAINED_FRAMES}-frame clips at {videomae.RESOLUTION} px; "
            f"got data.frames={d.frames}, perceptual.trepa_resolution={resolution}")
  require(video or "fvd" not in config.eval.metrics,
          f"eval.metrics has fvd, which scores video clips, but data.frames={d.frames} (images); "
          "drop fvd (rfid scores images)")
  # Set here; that the files exist is checked where the run starts (`train`).
  perceptual_metrics.check_weights(config.eval.metrics, config.eval, exist=False)
  gan.validate(config.gan, config.init_from)


def check_files(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a file or directory the run reads that is not there (metric weights,
  init_from): checked where the run starts, as a sweep or launch may be expanded on a machine
  that does not mount them."""
  perceptual_metrics.check_weights(config.eval.metrics, config.eval)
  require(not config.init_from or os.path.isdir(config.init_from),
          f"init_from={config.init_from!r} is not a run directory; point it at a trained workdir")


def pixel_shape(config) -> tuple[int, ...]:
  """Shape of one example: (H, W, C) or (T, H, W, C)."""
  d = config.data
  hwc = (d.res, d.res, d.channels)
  return hwc if d.frames == 1 else (d.frames, *hwc)


def build_model(config) -> tokenizer.ViTok:
  return tokenizer.from_config(config.model, pixel_channels=config.data.channels)


def build_components(config, *, with_losses: bool = True) -> Components:
  """Model, optimizer (encoder frozen in the GAN stage when asked), GAN stage, LPIPS loss."""
  model = build_model(config)
  tx, schedule = optimizer.make_optimizer(config.optim, config.batch_size, config.total_steps)
  stage = gan.build_gan_stage(config.gan) if config.gan.enabled else None
  if stage is not None and config.gan.freeze_encoder:
    example = jax.ShapeDtypeStruct((1, *pixel_shape(config)), jnp.float32)
    params = nn.meta.unbox(jax.eval_shape(functools.partial(_init_boxed_params, model, config), example))
    tx = gan.freeze_encoder(tx, params)
  perceptual_fn = trepa_fn = None
  if with_losses and config.loss.lpips > 0:
    perceptual_fn = lpips.load_perceptual_fn(config.perceptual.lpips_weights)
  if with_losses and config.loss.get("trepa", 0.0) > 0:
    p = config.perceptual
    trepa = videomae.load_trepa_fn(p.trepa_weights, p.trepa_size)
    trepa_fn = lambda recon, x: trepa(recon, x, resolution=p.trepa_resolution)
  return Components(model, tx, schedule, stage, perceptual_fn, trepa_fn)


def init_state(parts: Components, config, example_BX) -> TrainState:
  """Initial params (logical-axis boxes removed), optimizer state, EMA copy, discriminator."""
  params = nn.meta.unbox(_init_boxed_params(parts.model, config, example_BX))
  ema = jax.tree.map(jnp.copy, params) if config.ema_decay else {}
  disc = {}
  if parts.gan_stage is not None:
    disc = parts.gan_stage.init(jax.random.key(config.seed + 3), example_BX)
  counts = codebook.init_counts(params) if config.get("codebook_restart_every", 0) else {}
  code_ema = codebook.init_ema(params) if config.get("codebook_ema", 0.0) else {}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=parts.tx.init(params),
                    ema_params=ema, disc=disc, code_counts=counts, codebook_ema=code_ema)


def _init_boxed_params(model, config, example_BX):
  rngs = {"params": jax.random.key(config.seed), "sample": jax.random.key(config.seed + 1)}
  return model.init(rngs, example_BX, sample=False)["params"]


def abstract_state(parts: Components, config) -> TrainState:
  example = jax.ShapeDtypeStruct((1, *pixel_shape(config)), jnp.float32)
  return jax.eval_shape(functools.partial(init_state, parts, config), example)


def state_shardings(parts: Components, config, mesh) -> TrainState:
  """NamedShardings of every leaf of the train state, from the params' logical axis names (the
  GAN stage's discriminator's too)."""
  example = jax.ShapeDtypeStruct((1, *pixel_shape(config)), jnp.float32)
  param_specs = sharding.param_logical_specs(
      jax.eval_shape(functools.partial(_init_boxed_params, parts.model, config), example))
  abstract = abstract_state(parts, config)
  replicated = jax.sharding.PartitionSpec()
  specs = TrainState(
      step=replicated, params=param_specs,
      opt_state=sharding.opt_state_logical_specs(parts.tx, abstract.opt_state, param_specs),
      ema_params=param_specs if config.ema_decay else {},
      disc=parts.gan_stage.logical_specs(example) if parts.gan_stage is not None else {},
      code_counts=jax.tree.map(lambda _: replicated, abstract.code_counts),
      codebook_ema=jax.tree.map(lambda _: replicated, abstract.codebook_ema))
  return sharding.logical_to_mesh(specs, mesh, shapes=abstract)


def loss_weights(config) -> dict[str, float]:
  """config.loss by term name; a run saved before BSQ's commitment had its own weight
  (`loss.bsq_commit`) trained it at the VQ commitment's 0.25."""
  return {**config.loss, "bsq_commit": config_lib.added_field(config, "loss.bsq_commit")}


def make_train_step(parts: Components, config):
  """(state, batch) -> (state, metrics); noise rng = fold_in(seed, step), so resume is exact.

  In the GAN stage the tokenizer also gets weight·hinge generator loss and the discriminator
  takes one step on real vs reconstructed pixels. Codebook maintenance (train/codebook.py): with
  codebook_ema > 0 learned codebooks follow EMA statistics of their inputs, with
  codebook_restart_every > 0 the codes unused over that many steps move onto inputs of the batch.
  """
  base_key = jax.random.key(config.seed + 2)
  model, tx, stage = parts.model, parts.tx, parts.gan_stage
  restart_every = config.get("codebook_restart_every", 0)
  code_ema = config.get("codebook_ema", 0.0)
  maintain = bool(restart_every or code_ema)
  weights = loss_weights(config)
  # LARP's prior trains with scheduled sampling, which follows the run's progress.
  progress = (lambda step: {"progress": step / config.total_steps}) if (
      config.model.bottleneck == larp.NAME) else (lambda step: {})

  def recon_loss_fn(params, x, rng, step):
    (recon, aux), sown = model.apply({"params": params}, x, sample=True, rngs={"sample": rng},
                                     mutable=["intermediates"] if maintain else [],
                                     **progress(step))
    loss, metrics = losses.tokenizer_loss(x, recon, aux, weights, parts.perceptual_fn,
                                          parts.trepa_fn)
    if maintain:
      metrics = {**metrics, "pools": codebook.pools(sown.get("intermediates", {}))}
    return loss, (metrics, recon)

  def train_step(state: TrainState, batch):
    x = batch["image"]
    rng = jax.random.fold_in(base_key, state.step)
    loss_fn = lambda p: recon_loss_fn(p, x, rng, state.step)
    disc, disc_metrics = state.disc, {}
    if stage is None:
      grads, (metrics, _) = jax.grad(loss_fn, has_aux=True)(state.params)
    else:
      grads, metrics, recon = gan.generator_grads(loss_fn, stage, state.params, disc.params,
                                                  state.step)
      disc, disc_metrics = stage.discriminator_step(disc, x, recon, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    counts, ema_stats = state.code_counts, state.codebook_ema
    if maintain:
      params, counts, ema_stats, code_metrics = codebook.update(
          params, counts, ema_stats, metrics.pop("pools"), state.step, jax.random.fold_in(rng, 1),
          restart_every=restart_every, ema_decay=code_ema)
      metrics = {**metrics, **code_metrics}
    ema = state.ema_params
    if config.ema_decay:
      ema = optax.incremental_update(params, ema, step_size=1.0 - config.ema_decay)
    metrics = {**metrics, **disc_metrics, "grad_norm": optax.global_norm(grads),
               "lr": parts.schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema, disc=disc, code_counts=counts,
                         codebook_ema=ema_stats), metrics

  return train_step


def jit_train_step(parts: Components, config, mesh, shardings):
  """The train step jitted for `mesh`: state donated, batch split over data × fsdp."""
  return jax.jit(sharding.with_rules(make_train_step(parts, config), mesh),
                 donate_argnums=0, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)))


def setup_training(config, mesh):
  """Components, sharded initial state and the jitted (donating) train step on `mesh`.

  The state is initialised directly into its shardings (never whole on one host). With
  config.init_from (a finished run's workdir, e.g. stage 1 before the GAN stage) the params
  start from that run's latest checkpoint.
  Returns (components, state, train_step, state_shardings).
  """
  parts = build_components(config)
  shardings = state_shardings(parts, config, mesh)
  example = jnp.zeros((1, *pixel_shape(config)), jnp.float32)
  # Not traced under the axis rules: flax's DenseGeneral inits kernels flat, so their logical
  # constraints would not apply; out_shardings places every leaf.
  state = jax.jit(functools.partial(init_state, parts, config), out_shardings=shardings)(example)
  if config.get("init_from"):
    init_config = config_lib.read_config(config.init_from)
    _, params, _ = restore_params(config.init_from, init_config, mesh)
    check_same_params(params, state.params, f"init_from={config.init_from!r} (variant "
                      f"{init_config.get('variant', '?')!r})", f"this config ({config.variant!r})")
    state = state.replace(params=params,
                          ema_params=jax.tree.map(jnp.copy, params) if config.ema_decay else {})
  return parts, state, jit_train_step(parts, config, mesh, shardings), shardings


def check_same_params(params, expected, name: str, expected_name: str) -> None:
  """ConfigError when two param trees differ in names or shapes: lists the first differences."""
  shapes = lambda tree: {"/".join(str(key.key) for key in path): tuple(leaf.shape)
                         for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, want = shapes(params), shapes(expected)
  diffs = [f"{key}: {got.get(key, 'missing')} vs {want.get(key, 'missing')}"
           for key in sorted(set(got) | set(want)) if got.get(key) != want.get(key)]
  require(not diffs, f"{name} holds params that do not fit {expected_name}: {len(diffs)} differ, "
          f"e.g. {'; '.join(diffs[:3])} (shape there vs here); point it at a run of the same "
          f"model (encoder, decoder, patch, channels, bottleneck)")


def compile_train_step(config, mesh) -> dict:
  """Lowers and compiles the train step for `mesh` from shapes alone (nothing is allocated).

  Returns XLA's per-device memory analysis in bytes and the compile time: screens a sweep's
  configs for out-of-memory before anything is launched.
  """
  validate(config)
  mesh_lib.per_process_batch(config.batch_size, mesh)  # The batch splits over the mesh.
  parts = build_components(config)
  shardings = state_shardings(parts, config, mesh)
  abstract = loop.with_shardings(abstract_state(parts, config), shardings)
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, *pixel_shape(config)), jnp.float32,
                                         sharding=mesh_lib.batch_sharding(mesh))}
  start = time.time()
  compiled = jit_train_step(parts, config, mesh, shardings).lower(abstract, batch).compile()
  memory = compiled.memory_analysis()
  parts = {name: int(getattr(memory, f"{name}_size_in_bytes", 0) or 0)
           for name in ("argument", "output", "temp", "alias", "generated_code")}
  return {"per_device_bytes": parts["argument"] + parts["output"] + parts["temp"] - parts["alias"],
          **{f"{k}_bytes": v for k, v in parts.items()},
          "compile_seconds": time.time() - start, "mesh": dict(mesh.shape),
          "devices": mesh.devices.size, "params": vit.param_count(abstract.params)}


def make_eval_step(model):
  """(params, images, valid) -> (recon, sums of psnr/ssim/l2 over valid rows), posterior mean."""
  def eval_step(params, x, valid_B):
    recon, _ = model.apply({"params": params}, x, sample=False)
    l2_B = jnp.mean((recon - x) ** 2, axis=tuple(range(1, x.ndim)))
    values = {"psnr": reconstruction.psnr(x, recon), "ssim": reconstruction.ssim(x, recon), "l2": l2_B}
    return recon, {k: jnp.sum(jnp.where(valid_B, v, 0.0)) for k, v in values.items()}
  return eval_step


def jit_eval_step(model, mesh, param_shardings):
  return jax.jit(sharding.with_rules(make_eval_step(model), mesh),
                 in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh),
                               mesh_lib.batch_sharding(mesh)),
                 out_shardings=(mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)))


def evaluate(eval_step, params, config, mesh, *, image_path: str | None = None,
             workdir: str | None = None) -> dict:
  """Held-out PSNR/SSIM/L2 over config.eval_examples examples (all of the eval split if 0, less
  its last N mod P with P processes; with P processes rounded up to a multiple of P), plus the
  dataset-level metrics of config.eval.metrics (LPIPS, rFID, FID-MNIST, FVD, ...). The examples
  are the first of the eval split's fixed order (data.build_iterator), so runs of any batch size
  score the same ones.

  Every process reads its shard; a short last batch is padded to the static batch and masked.
  Dataset-level metrics combine every process's shard.
  """
  local_batch = mesh_lib.per_process_batch(config.batch_size, mesh)
  iterator = data.build_iterator(config.data, split="eval", batch_size=local_batch, seed=config.seed)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  names = tuple(config.eval.metrics)
  accumulator = None
  if names:
    networks = perceptual_metrics.load_networks(
        names, config.eval, workdir,
        mnist_eval_size=config.data.eval_size if config.data.name == "mnist" else 0)
    accumulator = perceptual_metrics.MetricAccumulator(names, networks, sharded=True)
  sums, count, limit = {"psnr": 0.0, "ssim": 0.0, "l2": 0.0}, 0, config.eval_examples or math.inf
  for batch in iterator:
    rows = len(batch["image"])
    if config.eval_examples:  # This process's share of what is left, rounded up.
      rows = min(rows, -(-(limit - count) // jax.process_count()))
    x = batch["image"][:rows]
    valid = np.arange(local_batch) < rows
    if rows < local_batch:
      x = np.concatenate([x, np.zeros((local_batch - rows, *x.shape[1:]), x.dtype)])
    recon, batch_sums = eval_step(params, *mesh_lib.global_batch((x, valid), batch_sharding))
    if accumulator is not None or (image_path is not None and count == 0):
      local_recon = loop.local_rows(recon)[:rows]
      if image_path is not None and count == 0:
        n = min(config.num_visualize, rows)  # Not the padding of a short batch.
        visualize.save_reconstructions(image_path, x[:n], local_recon[:n])
      if accumulator is not None:
        accumulator.update(real=x[:rows], fake=local_recon)
    for name, value in jax.device_get(batch_sums).items():
      sums[name] += float(value)
    count += rows * jax.process_count()
    if count >= limit:
      break
  iterator.close()
  if not count:
    raise DataError(f"the eval split of data.name={config.data.name} is empty")
  metrics = {f"eval/{k}": v / count for k, v in sums.items()}
  if accumulator is not None:
    metrics.update(accumulator.result())
  return metrics


# In a tokenizer run: {"train_examples": N}, the size of the train split when it began.
DATA_FILE = "data.json"


def _check_train_examples(workdir: str, train_examples: int, step: int, is_main: bool) -> None:
  """Warns when a resumed run's train split changed size since the run began (files added to
  data.path, say): the data stream is a function of the split, so the run no longer continues the
  stream it was on. Notes the size when the run begins."""
  path = os.path.join(workdir, DATA_FILE)
  if step and os.path.exists(path):
    with open(path) as f:
      began_with = json.load(f)["train_examples"]
    if began_with != train_examples:
      logging.warning("the train split had %d examples when %s began and has %d now: from step %d "
                      "the run reads another data stream than it was on", began_with, workdir,
                      train_examples, step)
    return
  if is_main:
    config_lib.write_json(path, {"train_examples": train_examples})


def train(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Runs (or resumes) training; returns the run record (also written to workdir/record.json),
  or None when pre-empted (a checkpoint was saved; the same command resumes)."""
  with loop.Preemption() as preemption:  # From the start: a stop during set-up is kept.
    return _train(config, workdir, preemption)


def _train(config, workdir: str, preemption: loop.Preemption) -> dict | None:
  validate(config, new_run=not os.path.exists(os.path.join(workdir, "config.json")))
  check_files(config)
  config_lib.check_workdir(workdir)
  if (record := loop.finished_record(workdir, config)) is not None:
    return record
  loop.check_resume(workdir, config)  # Before the model and its state are built.
  mesh = mesh_lib.make_mesh(config.mesh)
  local_batch = mesh_lib.per_process_batch(config.batch_size, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  train_source = data.make_source(config.data, "train")  # A data error before anything is built.
  parts, state, train_step, shardings = setup_training(config, mesh)
  model = parts.model
  logging.info("Mesh %s on %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  is_main, ckpt, state, clock = loop.open_run(config, workdir, state)
  first_step = int(state.step)
  _check_train_examples(workdir, len(train_source), first_step, is_main)
  # The training stream is a function of (seed, global batch index): resume at the step.
  train_iter = data.build_iterator(config.data, split="train", batch_size=local_batch,
                                   seed=config.seed, start_batch=first_step, source=train_source,
                                   rows=mesh_lib.process_rows(config.batch_size, mesh))

  eval_step = jit_eval_step(model, mesh, shardings.params)
  writer = (metrics_writer.MetricWriter(workdir, resume_step=int(state.step)) if is_main
            else None)
  image_dir = os.path.join(workdir, "images")

  def evaluate_state(state, step):
    params = loop.eval_params(state, config)
    return evaluate(eval_step, params, config, mesh, workdir=workdir, image_path=(
        os.path.join(image_dir, f"recon_{step:07d}") if is_main else None))

  try:
    result = loop.run(
        state, config=config, train_step=train_step, ckpt=ckpt, writer=writer,
        next_batch=lambda: mesh_lib.global_batch(next(train_iter), batch_sharding),
        evaluate=evaluate_state, log_name="l2", clock=clock,
        preemption=preemption)
  finally:
    ckpt.close()
    train_iter.close()
  if result.preempted:
    return None
  state, eval_metrics, last_rate = result.state, result.eval_metrics, result.examples_per_sec

  if not eval_metrics:  # Nothing left to train (a finished run re-launched): evaluate the final state.
    params = loop.eval_params(state, config)
    eval_metrics = evaluate(eval_step, params, config, mesh, workdir=workdir)
  record = record_lib.tokenizer_record(
      config, model, jax.eval_shape(lambda p: p, state.params), pixel_shape(config),
      wall_time=clock.seconds(), metrics=eval_metrics, workdir=workdir,
      examples_per_sec=last_rate, train_examples=len(train_source))
  if is_main:
    record_lib.write(record, workdir)
    writer.close()
  return record


def restore_params(workdir: str, config, mesh):
  """(step, params, state shardings) of the latest checkpoint of a run, on `mesh` (EMA params if
  enabled)."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  step = ckpt.latest_step()
  if not step:  # None, or the initial state a run stopped during set-up saves.
    ckpt.close()
    raise DataError(f"{workdir} has no trained checkpoint; train it first with `vitok train "
                    f"--workdir {workdir}`")
  parts = build_components(config, with_losses=False)
  shardings = state_shardings(parts, config, mesh)
  state = ckpt.restore(step, loop.with_shardings(abstract_state(parts, config), shardings))
  ckpt.close()
  return step, (loop.eval_params(state, config)), shardings


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict | None = None,
                     metrics: tuple[str, ...] = ()) -> dict:
  """Evaluates the latest checkpoint of a run on its held-out split (PSNR/SSIM/L2 and `metrics`,
  e.g. ("fid_mnist", "lpips")) and adds the results to its record.json. On another number of
  held-out examples than the run's (`--config.eval_examples`) the metrics are tagged with it,
  eval/eval_examples=50/psnr, beside the run's own."""
  saved = config_lib.read_config(workdir)
  config = saved if config is None else config
  loop.check_evaluated_as_trained(workdir, config)
  if metrics:
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval.metrics = tuple(metrics)
  validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  step, params, shardings = restore_params(workdir, config, mesh)
  eval_step = jit_eval_step(build_model(config), mesh, shardings.params)
  metrics = evaluate(eval_step, params, config, mesh, workdir=workdir, image_path=(
      os.path.join(workdir, "images", f"eval_{step:07d}") if jax.process_index() == 0 else None))
  if config.eval_examples != saved.eval_examples:
    metrics = {k.replace("/", f"/eval_examples={config.eval_examples}/", 1): v
               for k, v in metrics.items()}
  record_lib.add_metrics(workdir, metrics)
  return {"step": step, **metrics}
