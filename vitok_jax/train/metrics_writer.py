"""Metrics to a JSONL file (always), the terminal, and TensorBoard when it is installed."""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np


class MetricWriter:
  """Appends {"step": s, name: value, ...} lines to workdir/metrics.jsonl."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard and jax.process_index() == 0:
      try:
        import tensorboardX  # Optional: the "tensorboard" extra.
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.info("TensorBoard writer unavailable (pip install vitok_jax[tensorboard]); JSONL only")

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


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
