"""Orbax checkpoints of (train state, data iterator): async saves, keep-N, exact resume."""
from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp

from vitok_jax.errors import ConfigError


class Checkpointer:
  """Saves and restores the train state pytree together with the grain iterator state.

  A step directory is committed atomically by orbax, so a run killed mid-save resumes from the
  previous complete checkpoint.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` and the iterator's position; returns whether it saved."""
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores the state into the shapes/shardings of `abstract_state`; moves the iterator in place."""
    return self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                         data=grain.checkpoint.CheckpointRestore(data_iterator)).state

  def restore_state(self, step: int, abstract_state):
    """Restores only the train state (e.g. for evaluation), leaving data iterators alone."""
    return self._restore(step, state=ocp.args.StandardRestore(abstract_state)).state

  def _restore(self, step: int, **items):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      if "do not match" not in str(e) and "shape" not in str(e):
        raise
      raise ConfigError(
          f"checkpoint step {step} in {self.directory} does not match this config (model, "
          f"optimizer or data changed since it was written); use a new --workdir or the "
          f"run's own config ({os.path.dirname(self.directory)}/config.json)") from e

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
