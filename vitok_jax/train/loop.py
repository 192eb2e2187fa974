"""What every trainer's loop shares: the train state, pre-emption, divergence and ETA helpers.

Both trainers (tokenizer, generator) follow the same contract: the noise rng of step s is
fold_in(seed key, s) and the data position is the step, so a checkpoint of the state alone resumes
a run exactly; SIGTERM (or jax's pre-emption notice) saves a checkpoint and stops cleanly.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable

import flax
import jax
import numpy as np
from jax.experimental import multihost_utils

from vitok_jax import config_lib
from vitok_jax.config_lib import require, require_choice
from vitok_jax.train import checkpoint


def validate_run(config) -> None:
  """Raises ConfigError for the run fields every trainer's config has (batch, steps, cadences,
  optimizer, EMA)."""
  require(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
  require(config.total_steps >= 1, f"total_steps must be >= 1, got {config.total_steps}")
  for field in ("log_every", "eval_every", "ckpt_every"):
    require(config[field] >= 1, f"{field} must be >= 1, got {config[field]}")
  require(config.optim.base_lr > 0, f"optim.base_lr must be > 0, got {config.optim.base_lr}")
  require_choice(config.optim.schedule, "optim.schedule", ("cosine", "constant"))
  require(0.0 <= config.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {config.ema_decay}")


class TrainingDiverged(FloatingPointError):
  """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # Same tree as params when config.ema_decay > 0, else an empty dict.
  disc: Any = flax.struct.field(default_factory=dict)  # gan.DiscState in the GAN stage, else {}.
  # Per-codebook code counts since the last dead-code restart (train/codebook.py), else {}.
  code_counts: Any = flax.struct.field(default_factory=dict)
  # Per-codebook EMA counts and sums (config.codebook_ema > 0), else {}.
  codebook_ema: Any = flax.struct.field(default_factory=dict)


def eval_params(state: TrainState, config):
  """The params a run evaluates and records: the EMA copy when config.ema_decay > 0."""
  return state.ema_params if config.ema_decay else state.params


def start(config, workdir: str) -> bool:
  """Writes config.json on the main process (the record of what ran); returns is_main."""
  is_main = jax.process_index() == 0
  if is_main:
    config_lib.save_config(config, workdir)
  return is_main


def resume(workdir: str, state: TrainState, keep: int):
  """(Checkpointer of workdir/checkpoints, state restored from its latest step if there is one)."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep)
  if (latest := ckpt.latest_step()) is not None:
    state = ckpt.restore(latest, state)
    logging.info("Resumed from step %d in %s", latest, ckpt.directory)
  return ckpt, state


class Preemption:
  """SIGTERM (and on TPU jax's pre-emption notice) -> save a checkpoint and stop cleanly.

  With several processes every one must stop at the same step: jax's pre-emption sync point
  (started by jax.distributed) agrees on it; a single process uses its own SIGTERM handler.
  """

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    self._previous = None
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def check_finite(step: int, metrics: dict, ckpt) -> None:
  """Raises TrainingDiverged when metrics["loss"] is NaN/Inf."""
  if not np.isfinite(float(metrics["loss"])):
    raise TrainingDiverged(divergence_message(step, metrics, ckpt))


def divergence_message(step, metrics, ckpt) -> str:
  last = ckpt.latest_step()
  where = (f"last good checkpoint: step {last} in {ckpt.directory} (re-running resumes from it; "
           "lower optim.base_lr or raise optim.warmup_steps first)") if last is not None else (
               "no checkpoint was written yet; lower optim.base_lr or raise optim.warmup_steps")
  return f"loss is {metrics['loss']} at step {step}; {where}"


def format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def with_shardings(abstract, shardings):
  """Abstract leaves (ShapeDtypeStructs) carrying the given shardings."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)


@dataclasses.dataclass
class LoopResult:
  state: Any
  eval_metrics: dict
  examples_per_sec: float | None
  preempted: bool


def run(state, *, config, train_step: Callable, next_batch: Callable[[], Any], ckpt, writer,
        evaluate: Callable[[Any, int], dict], log_name: str = "loss") -> LoopResult:
  """Steps state.step+1 … config.total_steps: logs every log_every steps (the only host sync),
  checkpoints every ckpt_every, evaluates every eval_every and at the end, stops cleanly on
  pre-emption. `evaluate(state, step)` returns eval metrics; `writer` is None off process 0.
  """
  first_step = int(state.step)
  preemption = Preemption()
  saved_step = first_step

  def save(step, metrics):
    nonlocal saved_step
    check_finite(step, metrics, ckpt)
    if step != saved_step:  # A pre-emption can land on a step just saved.
      ckpt.save(step, state, force=True)
      saved_step = step

  eval_metrics, last_rate, tick, tick_step = {}, None, time.time(), first_step
  try:
    for step in range(first_step + 1, config.total_steps + 1):
      state, metrics = train_step(state, next_batch())
      if step % config.log_every == 0 or step == config.total_steps:
        metrics = jax.device_get(metrics)
        check_finite(step, metrics, ckpt)
        now = time.time()
        rate = (step - tick_step) * config.batch_size / (now - tick)
        eta = (config.total_steps - step) * config.batch_size / max(rate, 1e-9)
        metrics["examples_per_sec"] = last_rate = rate
        tick, tick_step = now, step
        if writer is not None:
          writer.write(step, metrics)
          logging.info("step %d/%d  loss %.4f  %s %.4f  %.1f ex/s  ETA %s", step,
                       config.total_steps, metrics["loss"], log_name, metrics[log_name], rate,
                       format_seconds(eta))
      if step % config.ckpt_every == 0 or step == config.total_steps:
        save(step, jax.device_get(metrics))
      if preemption.reached(step):
        save(step, jax.device_get(metrics))
        ckpt.wait()
        logging.info("Pre-empted at step %d: checkpoint saved in %s; the same command resumes",
                     step, ckpt.directory)
        return LoopResult(state, eval_metrics, last_rate, preempted=True)
      if step % config.eval_every == 0 or step == config.total_steps:
        eval_metrics = evaluate(state, step)
        if writer is not None:
          writer.write(step, eval_metrics)
          logging.info("step %d eval: %s", step,
                       "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()
                                 if isinstance(v, (int, float))))
  finally:
    preemption.close()
    ckpt.wait()
  return LoopResult(state, eval_metrics, last_rate, preempted=False)
