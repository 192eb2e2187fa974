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

from vitok_jax.errors import ConfigError, DataError


def describe_error(error: BaseException, limit: int = 300) -> str:
  """"Type: first line" of a failed checkpoint read, then its innermost cause's, which names the
  file (TensorStore's own message ends in a dump of its spec, left out)."""
  def first_line(e):
    text = (str(e).strip().splitlines() or [""])[0]
    return text.split(" See full TensorStore details")[0][:limit]
  def cause(e):  # As the traceback shows it: `raise ... from None` hides the context.
    return e.__cause__ or (None if e.__suppress_context__ else e.__context__)
  root, depth = error, 0
  while cause(root) is not None and depth < 10:
    root, depth = cause(root), depth + 1
  text = f"{type(error).__name__}: {first_line(error)}"
  if root is error:
    return text
  return f"{text.rstrip('.')} (from {type(root).__name__}: {first_line(root)})"


class Checkpointer:
  """A step directory is committed atomically by orbax, so a run killed mid-save resumes from the
  previous complete checkpoint (the trainer's Checkpointer removes such a half-written save).

  read_only: for readers of another run's checkpoints (eval, tokenize, a generator's tokenizer),
  which may be open while that run trains: nothing is created or cleaned up, and a step that does
  not restore is a DataError that says how to mend it (a finished run's relaunch does not look).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
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
    if not self.read_only:  # The trainer passes over a damaged step (`restore_newest_intact`).
      return self._restore_matching(step, abstract_state)
    state, error = self._restore_twice(step, abstract_state)
    if error is not None:
      raise self._not_restored([step], error) from error
    return state

  def _restore_twice(self, step: int, abstract_state):
    """(state, None), or (None, the error) of a step that fails to read twice: once more, since a
    read that failed for a moment is no damage. A state that does not match the config
    (ConfigError) is raised at once."""
    error = None
    for _ in range(2):
      try:
        return self._restore_matching(step, abstract_state), None
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except  Any damage to the files.
        error = e
    return None, error

  def _not_restored(self, steps: list[int], error: Exception) -> DataError:
    """The error for `steps` (newest first) that each failed to read twice, with the way to mend
    them if it is damage; `error` is the newest's."""
    detail = describe_error(error)
    moves = "; ".join(f"mv {os.path.join(self.directory, str(s))} {self._aside_path(s)}"
                      for s in steps)
    older = [s for s in self.manager.all_steps() if s < min(steps)]
    then = (f"it trains on from the newest intact step (the run holds steps {sorted(older)} "
            "before it)" if older else "with no older checkpoint it starts again from step 0")
    return DataError(
        f"checkpoint step{'s' * (len(steps) > 1)} {', '.join(map(str, steps))} in "
        f"{self.directory} do{'es' * (len(steps) == 1)} not restore ({detail}). If the files are "
        f"damaged (a full disk, a broken copy: the error names missing or unreadable files), "
        f"move {'them' if len(steps) > 1 else 'it'} aside (`{moves}`) and "
        f"relaunch the run's training (`vitok train --workdir "
        f"{os.path.dirname(self.directory)}`): {then}; any other error (memory, permissions) is "
        "the message's own")

  def _restore_matching(self, step: int, abstract_state):
    """`restore` but for damage: a state that does not match the config is a ConfigError."""
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
                            all_ok: Callable[[bool], bool] = lambda ok: ok,
                            barrier: Callable[[], None] = lambda: None):
    """(step, state) of the newest checkpoint that restores into `abstract_state` on every process.

    A step that fails to read twice (a damaged save: files missing or truncated after a full
    disk, a broken copy), on any process (`all_ok` agrees a process's outcome across processes),
    is passed over; once an older step restores, the main process moves the damaged newer ones
    aside to corrupt_STEP (kept, not deleted) and `barrier` waits for it on every process, so the
    run goes on from there and saves those steps anew. When no step restores, nothing is moved and
    a DataError names them all, with the moves that start the run again from step 0. A checkpoint
    that does not match the config (ConfigError) is raised at once."""
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      state, error = self._restore_twice(step, abstract_state)
      if not all_ok(error is None):
        logging.warning("checkpoint step %d in %s does not restore%s; trying the one before",
                        step, self.directory, f" ({describe_error(error)})"
                        if error is not None else " on another process")
        failed.append((step, error))
        continue
      if failed:
        if is_main:
          for bad, _ in failed:
            self._move_aside(bad)
        barrier()
        self.manager.reload()
        logging.warning("resuming from step %d; the damaged step(s) %s were moved to %s/corrupt_*",
                        step, [bad for bad, _ in failed], self.directory)
      return step, state
    error = failed[0][1] if failed else None
    if error is None:
      raise RuntimeError(f"checkpoint step {failed[0][0]} in {self.directory} does not restore on "
                         "another process (see its log)")
    raise self._not_restored([step for step, _ in failed], error) from error

  def _aside_path(self, step: int) -> str:
    """Where step N's damaged directory goes: corrupt_N (corrupt_N.1, ... when taken)."""
    target, n = os.path.join(self.directory, f"corrupt_{step}"), 0
    while os.path.exists(target):
      n += 1
      target = os.path.join(self.directory, f"corrupt_{step}.{n}")
    return target

  def _move_aside(self, step: int) -> None:
    os.rename(os.path.join(self.directory, str(step)), self._aside_path(step))

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
