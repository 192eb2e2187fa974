"""What every trainer's loop shares: the train state, pre-emption, divergence and ETA helpers.

Both trainers (tokenizer, generator) follow the same contract: the noise rng of step s is
fold_in(seed key, s) and the data position is the step, so a checkpoint of the state alone resumes
a run exactly; SIGTERM (or jax's pre-emption notice, or a first Ctrl-C) saves a checkpoint and
stops cleanly, and the relaunch makes up an evaluation the stop skipped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vitok_jax import config_lib, data
from vitok_jax.config_lib import require, require_choice
from vitok_jax.errors import ConfigError, TrainingDiverged
from vitok_jax.models import larp
from vitok_jax.train import checkpoint, optimizer


def validate_run(config) -> None:
  """Raises ConfigError for the run fields every trainer's config has (batch, steps, cadences,
  checkpoints, optimizer, EMA)."""
  require(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
  require(config.seed >= 0, f"seed must be >= 0 (it seeds numpy's and grain's streams), got "
          f"{config.seed}")
  require(config.total_steps >= 1, f"total_steps must be >= 1, got {config.total_steps}")
  for field in ("log_every", "eval_every", "ckpt_every", "keep_ckpts"):
    require(config[field] >= 1, f"{field} must be >= 1, got {config[field]}")
  optim = config.optim
  require(optim.base_lr > 0, f"optim.base_lr must be > 0, got {optim.base_lr}")
  require_choice(optim.schedule, "optim.schedule", optimizer.SCHEDULES)
  require(optim.warmup_steps is None or optim.warmup_steps >= 0,
          f"optim.warmup_steps must be >= 0 (or unset: min(1000, total_steps // 10)), got "
          f"{optim.warmup_steps}")
  require(optim.warmup_steps is None or optim.warmup_steps <= config.total_steps,
          f"optim.warmup_steps={optim.warmup_steps} is longer than the run (total_steps="
          f"{config.total_steps}): the learning rate would peak at its end or never; lower it, "
          "or unset it (min(1000, total_steps // 10))")
  require(0.0 <= optim.min_lr_ratio <= 1.0,
          f"optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}")
  require(optim.clip_norm >= 0, f"optim.clip_norm must be >= 0 (0 = off), got {optim.clip_norm}")
  require(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
  for field in ("b1", "b2"):
    require(0.0 <= optim[field] < 1.0, f"optim.{field} must be in [0, 1), got {optim[field]}")
  require(0.0 <= config.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {config.ema_decay}")
  require(config.get("eval_examples", 0) >= 0,
          f"eval_examples must be >= 0 (0 = the whole eval split), got {config.get('eval_examples')}")


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


# Config fields a resumed run may change: its length (to train on, or stop sooner), when it logs,
# evaluates and checkpoints, what it evaluates with (eval.*, a generator's sample.* settings),
# and its mesh (a checkpoint restores onto any mesh). Anything else would train the rest of the
# run differently from its start (batch, learning rate, data, seed, model, losses).
RESUMABLE_FIELDS = ("variant", "total_steps", "log_every", "eval_every", "ckpt_every",
                    "keep_ckpts", "eval_examples", "eval", "sample", "mesh", "num_visualize",
                    "data.worker_count")


# Added fields (`config_lib.ADDED_FIELDS`) that only some runs read: config -> whether it trains
# with the field.
_is_larp = lambda config: config.model.get("bottleneck") == larp.NAME
_ADDED_FIELD_READ_BY = {
    "loss.bsq_commit": lambda config: config.model.get("bottleneck") in ("bsq", "msbsq"),
    "model.prior_size": _is_larp, "model.prior_dropout": _is_larp, "optim.prior_lr_mult": _is_larp,
    "data.folder_split": lambda config: data.single_folder(config.data),
    "objective.shortcut_input": lambda config: bool(config.objective.get("shortcut"))}


def config_changes(saved, config, fixed: tuple[str, ...] = ()) -> list[str]:
  """"path: saved → new" for each field where `config` differs from the `saved` config of a run,
  but `RESUMABLE_FIELDS` other than `fixed` (compared as config.json stores them). A field only
  one of them has is left out (added to or dropped from the code's config since the run
  started), unless the saved config lacks one of `config_lib.ADDED_FIELDS` and `config` holds
  another value
  than the run had."""
  flat = lambda c: _flatten(json.loads(json.dumps(c.to_dict(), default=str)))
  before, after = flat(saved), flat(config)
  resumable = lambda key: any(key == f or key.startswith(f + ".")
                              for f in RESUMABLE_FIELDS if f not in fixed)
  changes = [f"{key}: {before[key]!r} → {after[key]!r}" for key in sorted(set(before) & set(after))
             if not resumable(key) and before[key] != after[key]]
  return changes + [f"{key}: (absent: {had!r}) → {after[key]!r}"
                    for key, had in config_lib.ADDED_FIELDS.items()
                    if key not in before and key in after and after[key] != had
                    and _ADDED_FIELD_READ_BY.get(key, lambda _: True)(config)]


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def open_run(config, workdir: str, state: TrainState):
  """Starts or resumes the run in workdir: (is_main, Checkpointer of workdir/checkpoints, state
  restored from its latest step if there is one, RunClock). config.json, the record of what ran,
  is written (by the main process) only once the checkpoint has restored into this config's
  state, so a re-launch with a mismatched config raises and leaves the run's record intact: a
  config whose arrays do not fit the checkpoint, or one that differs from the saved config.json
  beyond `RESUMABLE_FIELDS`.
  (The trainers check workdir with `config_lib.check_workdir` before building anything.)
  On resume the initial `state`'s arrays are freed before the restore (they give only its layout),
  so resuming needs the state's memory once, as a fresh start does, not twice: the caller must not
  use them after this call."""
  is_main = jax.process_index() == 0
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_ckpts)
  if (latest := ckpt.latest_step()) is not None:
    try:
      check_resume(workdir, config, latest)
    except ConfigError:
      ckpt.close()
      raise
    layout = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.Array) else x, state)
    for x in jax.tree.leaves(state):
      if isinstance(x, jax.Array) and not x.is_deleted():
        x.delete()
    latest, state = ckpt.restore_newest_intact(
        layout, is_main=is_main,
        all_ok=lambda ok: bool(np.all(multihost_utils.process_allgather(np.array(ok)))),
        barrier=lambda: multihost_utils.sync_global_devices("vitok_checkpoints_moved_aside"))
    logging.info("Resumed from step %d in %s", latest, ckpt.directory)
  if is_main:
    config_lib.save_config(config, workdir)
  return is_main, ckpt, state, RunClock(workdir, int(state.step), is_main=is_main)


def check_resume(workdir: str, config, step: int | None = None) -> None:
  """ConfigError when the run in workdir (at checkpoint `step`, default its latest) cannot resume
  with `config`: one that differs from its saved config.json beyond `RESUMABLE_FIELDS`, or a
  total_steps below the step (its record would say total_steps of params trained more). The
  trainers call it before they build anything (a generator, before it tokenizes); nothing to check
  for a new run."""
  step = checkpoint.latest_step(workdir) if step is None else step
  if step is None:
    return
  _check_resumable(workdir, step, config)
  if step > config.total_steps:
    raise ConfigError(f"{workdir} holds a run at step {step}, past total_steps="
                      f"{config.total_steps}; resume it with --config.total_steps >= {step}, "
                      "or use a new --workdir")


def _check_resumable(workdir: str, step: int, config) -> None:
  """ConfigError when `config` differs from the run's saved config.json beyond
  `RESUMABLE_FIELDS`; a warning when it changes the run's length."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return
  saved = config_lib.read_config(workdir)
  kind, saved_kind = config.get("kind", "tokenizer"), saved.get("kind", "tokenizer")
  if kind != saved_kind:
    raise ConfigError(f"{workdir} holds a {saved_kind} run; this {kind} needs a new --workdir")
  if changes := config_changes(saved, config):
    raise ConfigError(
        f"{workdir} holds a run at step {step} trained with another config; resuming it with "
        f"this one would change {'; '.join(changes)}. Use a new --workdir, or resume with the "
        f"run's own config: --config=sweeps/_run:{workdir}")
  if saved.total_steps != config.total_steps:
    logging.warning("total_steps %d → %d: the learning-rate schedule follows the new length "
                    "from step %d on (a cosine decay or a warm-up of total_steps // 10 changes "
                    "with it)", saved.total_steps, config.total_steps, step)


def check_evaluated_as_trained(workdir: str, config, fixed: tuple[str, ...] = ()) -> None:
  """ConfigError when `config`, the one a re-evaluation (`vitok eval`) of the run in `workdir`
  would use, differs from its saved config beyond `RESUMABLE_FIELDS` (eval.*, eval_examples,
  mesh, ...) other than `fixed`: its record would hold metrics of another model or data than
  the run's."""
  if changes := config_changes(config_lib.read_config(workdir), config, fixed):
    raise ConfigError(f"vitok eval scores {workdir} as it trained; it would change "
                      f"{'; '.join(changes)}. Override eval.* fields only (a generator's sample "
                      "settings: --sample k=v, which tags the metrics)")


def finished_record(workdir: str, config) -> dict | None:
  """The record of a run that has finished: its latest checkpoint is at total_steps (or past) and
  its record.json is of that step (not of a shorter run it was extended from). A relaunch returns
  it as it stands, before building anything, rather than evaluating again and replacing it, which
  would drop the metrics `vitok eval` added (`vitok eval` re-evaluates); config.json stays as the
  record was made. A relaunch with another config raises as a resume would."""
  step, path = checkpoint.latest_step(workdir), os.path.join(workdir, "record.json")
  if step is None or step < config.total_steps or not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  if record.get("steps") != step:
    return None
  _check_resumable(workdir, step, config)
  logging.info("%s finished at step %d; its record.json stands (`vitok eval` re-evaluates)",
               workdir, step)
  return record


class RunClock:
  """Wall-clock seconds of a run over all its launches.

  Every checkpoint adds the run's time so far to workdir/progress.json ({step: seconds}); a
  resumed launch starts from the time recorded for the step it resumed from (time a crashed
  launch spent past its last checkpoint is not counted, as that work is redone).
  """
  FILE = "progress.json"
  KEEP = 20  # Steps remembered: more than the checkpoints a run keeps.

  def __init__(self, workdir: str, step: int, *, is_main: bool):
    self.path, self.is_main = os.path.join(workdir, self.FILE), is_main
    self.saved: dict[str, float] = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.saved = json.load(f)
    self.start = time.time() - self.saved.get(str(step), 0.0)

  def seconds(self) -> float:
    return time.time() - self.start

  def mark(self, step: int) -> None:
    """Records the time at a checkpoint of `step` (main process; later steps of an abandoned
    launch are dropped)."""
    if not self.is_main:
      return
    kept = sorted((int(k), v) for k, v in self.saved.items() if int(k) < step)[-(self.KEEP - 1):]
    self.saved = {**{str(k): v for k, v in kept}, str(step): self.seconds()}
    config_lib.write_json(self.path, self.saved, indent=None, sort_keys=False)  # Step order.


class Preemption:
  """SIGTERM (and on TPU jax's pre-emption notice) -> save a checkpoint and stop cleanly; in a
  single-process run a first Ctrl-C does the same and then raises KeyboardInterrupt as the block
  ends, so the caller (and a shell, a SLURM script, a sweep) sees an interrupt, not a pre-emption
  to resume; a second Ctrl-C interrupts at once. SIGINT is left alone where it is ignored (a
  background job).

  A trainer enters it as it starts (`with Preemption() as preemption:`), so a signal during
  start-up (building the model, tokenizing a store, restoring) is kept: `run` then saves a
  checkpoint before its first step and stops. With several processes every one must stop at the
  same step: jax's pre-emption sync point (started by jax.distributed) agrees on it.
  """

  def __init__(self):
    self.requested = self.interrupted = False
    self._multi = jax.process_count() > 1
    self._previous = {}

  def __enter__(self) -> "Preemption":
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
      if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, exc_type, *exc_info):
    previous, self._previous = self._previous, {}  # A signal now finds nothing to restore.
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    if self.interrupted and exc_type is None:
      raise KeyboardInterrupt  # The checkpoint is saved; now the Ctrl-C stops the caller.

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    if signum == signal.SIGINT:  # The next Ctrl-C raises KeyboardInterrupt at once.
      self.interrupted = True
      if (previous := self._previous.pop(signal.SIGINT, None)) is not None:
        signal.signal(signal.SIGINT, previous)

  def requested_before_start(self) -> bool:
    """Whether this process was asked to stop before training began (single process; several
    agree through `reached` at their first step)."""
    return not self._multi and self.requested

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def check_finite(step: int, metrics: dict, ckpt, params=None) -> None:
  """Raises TrainingDiverged when metrics["loss"] is NaN/Inf, or (given) `params` hold NaN/Inf."""
  if not np.isfinite(float(metrics["loss"])):
    raise TrainingDiverged(divergence_message(f"loss is {metrics['loss']} at step {step}", ckpt))
  if params is not None and not _all_finite(params):
    raise TrainingDiverged(divergence_message(f"the parameters after step {step} hold NaN/Inf",
                                              ckpt))


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.array(True)]))


def divergence_message(what: str, ckpt) -> str:
  """`what` went wrong, then where the run stands and what to change: optim.* is not resumable,
  so a lower rate or longer warm-up is a new run."""
  last = ckpt.latest_step()
  where = (f"its last checkpoint (step {last}, finite) is in {ckpt.directory}, but a resume must "
           "keep the run's config") if last is not None else "no checkpoint was written yet"
  return (f"{what}; {where}: start a new --workdir with a lower optim.base_lr or a longer "
          "optim.warmup_steps")


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
  # Training throughput of this launch: over its log intervals after the first (which holds the
  # compilation), without evaluation and checkpoint time; None when it had no other interval (a
  # rate that is mostly compile time would mislead a results table).
  examples_per_sec: float | None
  preempted: bool


def run(state, *, config, train_step: Callable, next_batch: Callable[[], Any], ckpt, writer,
        evaluate: Callable[[Any, int], dict], log_name: str = "loss",
        clock: RunClock | None = None, preemption: Preemption | None = None) -> LoopResult:
  """Steps state.step+1 … config.total_steps: logs every log_every steps (the only host sync),
  checkpoints every ckpt_every (noting the run's time on `clock`), evaluates every eval_every and
  at the end, stops cleanly when `preemption` (the trainer's, entered) asks; without one, on jax's
  pre-emption notice only (a SIGTERM is not handled).

  `evaluate(state, step)` returns eval metrics named "eval/…"; `writer` is None off process 0. A
  run resumed at an eval step (or its last) whose evaluation metrics.jsonl lacks (the stop came
  between that step's checkpoint and its evaluation) evaluates it first.
  """
  first_step = int(state.step)
  preemption = preemption or Preemption()
  saved_step = first_step

  def save(step, metrics):
    nonlocal saved_step
    check_finite(step, metrics, ckpt, state.params)  # A checkpoint is of finite parameters.
    if step != saved_step:  # A pre-emption can land on a step just saved.
      ckpt.save(step, state, force=True)
      saved_step = step
      if clock is not None:
        clock.mark(step)

  eval_metrics, tick, tick_step = {}, time.time(), first_step
  timed_steps, timed_seconds = 0, 0.0  # Steady-state training time (see LoopResult).

  def end_interval(step: int) -> float:
    """Closes the interval since the last one at `step` (just after a host sync); its rate."""
    nonlocal tick, tick_step, timed_steps, timed_seconds
    now = time.time()
    rate = (step - tick_step) * config.batch_size / (now - tick)
    if tick_step != first_step:
      timed_steps, timed_seconds = timed_steps + step - tick_step, timed_seconds + now - tick
    tick, tick_step = now, step
    return rate

  def result(preempted: bool) -> LoopResult:
    rate = timed_steps * config.batch_size / timed_seconds if timed_steps else None
    return LoopResult(state, eval_metrics, rate, preempted=preempted)

  def evaluate_and_log(step: int) -> dict:
    metrics = evaluate(state, step)
    if writer is not None:
      writer.write(step, metrics)
      logging.info("step %d eval: %s", step, "  ".join(
          f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))))
    return metrics

  try:
    if preemption.requested_before_start():
      if ckpt.latest_step() != first_step:  # A new run: step 0, so that it counts as started.
        ckpt.save(first_step, state, force=True)
        if clock is not None:
          clock.mark(first_step)
      ckpt.wait()
      logging.info("Stopped before step %d: checkpoint in %s; the same command resumes",
                   first_step + 1, ckpt.directory)
      return result(preempted=True)
    if _missed_eval(first_step, config, writer):
      eval_metrics = evaluate_and_log(first_step)
      tick = time.time()
    for step in range(first_step + 1, config.total_steps + 1):
      state, metrics = train_step(state, next_batch())
      if step % config.log_every == 0 or step == config.total_steps:
        metrics = jax.device_get(metrics)
        check_finite(step, metrics, ckpt)
        rate = end_interval(step)
        eta = (config.total_steps - step) * config.batch_size / max(rate, 1e-9)
        metrics["examples_per_sec"] = rate
        if writer is not None:
          writer.write(step, metrics)
          logging.info("step %d/%d  loss %.4f  %s %.4f  %.1f ex/s  ETA %s", step,
                       config.total_steps, metrics["loss"], log_name, metrics[log_name], rate,
                       format_seconds(eta))
      checkpoint_now = step % config.ckpt_every == 0 or step == config.total_steps
      evaluate_now = step % config.eval_every == 0 or step == config.total_steps
      if (checkpoint_now or evaluate_now) and tick_step != step:
        metrics = jax.device_get(metrics)  # A host sync: the interval ends before the pause.
        end_interval(step)
      if checkpoint_now:
        save(step, jax.device_get(metrics))
      if preemption.reached(step):
        save(step, jax.device_get(metrics))
        ckpt.wait()
        logging.info("Pre-empted at step %d: checkpoint saved in %s; the same command resumes",
                     step, ckpt.directory)
        return result(preempted=True)
      if evaluate_now:
        eval_metrics = evaluate_and_log(step)
      if checkpoint_now or evaluate_now:
        tick = time.time()  # Checkpoints and evaluation are not training time.
  finally:
    ckpt.wait()
  return result(preempted=False)


def _missed_eval(step: int, config, writer) -> bool:
  """Whether `step`, where a run resumes, is an eval step (or the last) whose evaluation
  metrics.jsonl lacks (process 0 reads it and tells the others)."""
  if not 0 < step <= config.total_steps or (step % config.eval_every and
                                             step != config.total_steps):
    return False
  missed = writer is not None and not writer.has_row(step, prefix="eval/")
  if jax.process_count() > 1:
    missed = bool(multihost_utils.broadcast_one_to_all(np.int32(missed)))
  return missed
