"""Orbax checkpoints of the train state: async saves, keep-N, restore onto any mesh.

The data position needs no checkpoint of its own: the training stream is a pure function of
(seed, global batch index) (see vitok_jax.data.pipeline), so the restored `state.step` is where
the data iterator resumes, on any number of processes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import orbax.checkpoint as ocp

from vitok_jax.errors import ConfigError


class Checkpointer:
  """A step directory is committed atomically by orbax, so a run killed mid-save resumes from the
  previous complete checkpoint (the trainer's Checkpointer removes such a half-written save).

  read_only: for readers of another run's checkpoints (eval, tokenize, a generator's tokenizer),
  which may be open while that run trains: nothing is created or cleaned up.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state",),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only, read_only=read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Starts an (async) save of `state`; returns whether it saved."""
    return self.manager.save(step, force=force,
                             args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

  def restore(self, step: int, abstract_state):
    """Restores into the shapes, dtypes and shardings of `abstract_state` (arrays or
    jax.ShapeDtypeStruct with .sharding), whatever mesh the checkpoint was written from.

    A state field that is empty in `abstract_state` (e.g. TrainState.code_counts without codebook
    restart) may be absent from a checkpoint written before the field existed.
    """
    try:
      return self._restore(step, abstract_state)
    except ValueError as e:
      if "do not match" not in str(e) and "shape" not in str(e):
        raise
      fields = ({f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
                if dataclasses.is_dataclass(abstract_state) else {})
      on_disk = set(self.manager.item_metadata(step).state.keys())
      missing = [k for k in fields if k not in on_disk]
      if missing and all(fields[k] == {} for k in missing):
        try:
          present = self._restore(step, {k: v for k, v in fields.items() if k in on_disk})
          return abstract_state.replace(**present)
        except ValueError:
          pass
      raise ConfigError(
          f"checkpoint step {step} in {self.directory} does not match this config (model or "
          f"optimizer changed since it was written); use a new --workdir or the run's own config "
          f"({os.path.dirname(self.directory)}/config.json)") from e

  def restore_newest_intact(self, abstract_state, *, is_main: bool = True,
                            barrier: Callable[[], None] = lambda: None):
    """(step, state) of the newest checkpoint that restores into `abstract_state`. Newer steps
    that fail to read (a damaged save: files missing or truncated after a full disk, a broken
    copy) are moved aside to corrupt_STEP by the main process once an older step has restored,
    so that the run goes on from there and saves those steps anew; `barrier` then waits for it on
    every process. When no step restores, the newest's error is raised and nothing is moved. A
    checkpoint that does not match the config (ConfigError) is raised at once."""
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state)
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except  Any damage to the files.
        logging.warning("checkpoint step %d in %s does not restore (%s: %s); trying the one "
                        "before", step, self.directory, type(e).__name__, str(e)[:300])
        failed.append((step, e))
        continue
      if failed:
        if is_main:
          for bad, _ in failed:
            os.rename(os.path.join(self.directory, str(bad)),
                      os.path.join(self.directory, f"corrupt_{bad}"))
        barrier()
        self.manager.reload()
        logging.warning("resuming from step %d; the damaged step(s) %s were moved to %s/corrupt_*",
                        step, [bad for bad, _ in failed], self.directory)
      return step, state
    raise failed[0][1]

  def _restore(self, step: int, abstract_state):
    return self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def latest_step(workdir: str) -> int | None:
  """The latest committed checkpoint step of the run in `workdir` (None: it has none), read
  without opening the run for writing."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  ckpt = Checkpointer(directory, read_only=True)
  step = ckpt.latest_step()
  ckpt.close()
  return step
