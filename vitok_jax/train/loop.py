"""What every trainer's loop shares: the train state, pre-emption, divergence and ETA helpers.

Both trainers (tokenizer, generator) follow the same contract: the noise rng of step s is
fold_in(seed key, s) and the data position is the step, so a checkpoint of the state alone resumes
a run exactly; SIGTERM (or jax's pre-emption notice) saves a checkpoint and stops cleanly.
"""
from __future__ import annotations

import signal
from typing import Any

import flax
import jax
import numpy as np
from jax.experimental import multihost_utils


class TrainingDiverged(FloatingPointError):
  """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # Same tree as params when config.ema_decay > 0, else an empty dict.
  disc: Any = flax.struct.field(default_factory=dict)  # gan.DiscState in the GAN stage, else {}.


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
