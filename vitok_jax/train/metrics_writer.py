"""Metrics to a JSONL file (always), the terminal, and TensorBoard when it is installed."""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from vitok_jax import config_lib


class MetricWriter:
  """Appends {"step": s, name: value, ...} lines to workdir/metrics.jsonl.

  A resumed run (`resume_step`: the checkpoint it restored) first drops the lines of later steps,
  which the launch before it wrote past its last checkpoint and this one writes again, so the
  file stays one row per step and metric set, in step order.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      _keep_steps_up_to(self.path, resume_step)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard and jax.process_index() == 0:
      try:
        import tensorboardX  # Optional: the "tensorboard" extra.
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.info("TensorBoard writer unavailable (pip install vitok_jax[tensorboard]); JSONL only")

  def has_row(self, step: int, *, prefix: str) -> bool:
    """Whether the file has a row at `step` with a metric named `prefix`…, e.g. "eval/"."""
    self._file.flush()
    return any(row["step"] == step and any(k.startswith(prefix) for k in row)
               for row in read_jsonl(self.path))

  def write(self, step: int, metrics: dict) -> None:
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _keep_steps_up_to(path: str, last_step: int) -> None:
  """Rewrites the JSONL file at `path` without its rows past `last_step` (and a line cut short by
  a crash)."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if row.get("step", 0) <= last_step:
        kept.append(json.dumps(row) + "\n")
  with config_lib.atomic_write(path) as f:
    f.writelines(kept)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
