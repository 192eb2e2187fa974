"""Orbax checkpoints of the train state: async saves, keep-N, restore onto any mesh.

The data position needs no checkpoint of its own: the training stream is a pure function of
(seed, global batch index) (see vitok_jax.data.pipeline), so the restored `state.step` is where
the data iterator resumes, on any number of processes.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp

from vitok_jax.errors import ConfigError


class Checkpointer:
  """A step directory is committed atomically by orbax, so a run killed mid-save resumes from the
  previous complete checkpoint."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state",),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Starts an (async) save of `state`; returns whether it saved."""
    return self.manager.save(step, force=force,
                             args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

  def restore(self, step: int, abstract_state):
    """Restores into the shapes, dtypes and shardings of `abstract_state` (arrays or
    jax.ShapeDtypeStruct with .sharding), whatever mesh the checkpoint was written from."""
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except ValueError as e:
      if "do not match" not in str(e) and "shape" not in str(e):
        raise
      raise ConfigError(
          f"checkpoint step {step} in {self.directory} does not match this config (model or "
          f"optimizer changed since it was written); use a new --workdir or the run's own config "
          f"({os.path.dirname(self.directory)}/config.json)") from e
    return restored.state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
