"""Dataset-level perceptual metrics of a tokenizer or generator: LPIPS, rFID/gFID, IS, FVD, FID-MNIST.

One accumulator walks the eval split once: each batch of real pixels and their reconstructions (or
generated samples) is pushed through the networks the requested metrics need, and only running
sums and streaming feature statistics are kept, so memory does not grow with the split.

  nets = load_networks(("lpips", "rfid"), config.eval, workdir)
  acc = MetricAccumulator(("lpips", "rfid"), nets)
  for batch: acc.update(real=x, fake=recon)
  acc.result()  # {"eval/lpips": ..., "eval/rfid": ...}

gFID: push generated samples as `fake` and real images as `real` (or start from saved reference
statistics with `reference_stats`). Pixels are in [-1, 1]; images [B, H, W, C], video [B, T, H, W, C]
(image metrics then score frames; FVD scores clips).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from vitok_jax.errors import ConfigError
from vitok_jax.eval import fid
from vitok_jax.eval import visualize
from vitok_jax.models.perceptual import i3d, inception, lpips, mnist_classifier

METRICS = ("lpips", "rfid", "inception_score", "fvd", "fid_mnist")
# Which network each metric needs, and the config.eval field holding that network's weight file.
NETWORK_OF = {"lpips": "lpips", "rfid": "inception", "inception_score": "inception", "fvd": "i3d",
              "fid_mnist": "mnist_classifier"}
WEIGHTS_FIELD = {"lpips": "lpips_weights", "inception": "inception_weights", "i3d": "i3d_weights",
                 "mnist_classifier": "mnist_classifier"}


def check_weights(names: Sequence[str], eval_cfg, *, exist: bool = True, label: str = "") -> None:
  """Raises ConfigError for an unknown metric, or a network a metric needs whose weight file is
  not set in eval_cfg (or, with `exist`, not there); `label` names the metrics in the message
  (default: "metrics [...]"). The MNIST classifier needs none: it is trained and cached when
  missing. Trainers check this before they train, not at the first eval."""
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    hint = ("; several metrics are a tuple: --config.eval.metrics=\"('lpips', 'rfid')\""
            if any("," in n for n in unknown) else "")
    raise ConfigError(f"unknown metrics {unknown}; use any of {list(METRICS)}{hint}")
  for net in sorted({NETWORK_OF[n] for n in names} - {"mnist_classifier"}):
    path = eval_cfg.get(WEIGHTS_FIELD[net]) if eval_cfg is not None else None
    needs = label or f"metrics {[n for n in names if NETWORK_OF[n] == net]}"
    if not path:
      raise ConfigError(f"{needs} need the {net} network: set "
                        f"--config.eval.{WEIGHTS_FIELD[net]}=FILE (tools/convert_{net}.py makes "
                        "it from the published weights; nothing is downloaded)")
    if exist and not os.path.exists(path):
      raise ConfigError(f"{needs}: eval.{WEIGHTS_FIELD[net]}={path!r} does not exist; "
                        f"tools/convert_{net}.py makes it from the published weights")


def load_inception_reference(path: str) -> fid.GaussianStats:
  """Saved real statistics of Inception pool features (an .npz with mu and sigma: ours from
  `tools/fid_reference.py`, pytorch-fid's or ADM's), checked: ConfigError when the file is
  missing, unreadable, not 2048-d or not finite."""
  if not os.path.isfile(path):
    raise ConfigError(f"FID reference statistics {path!r} not found; tools/fid_reference.py "
                      "computes them from a data split (or use a published .npz with mu, sigma)")
  try:
    stats = fid.GaussianStats.load(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"FID reference statistics {path!r} are unreadable: {e}") from None
  if stats.mu.shape != (inception.FEATURE_DIM,):
    raise ConfigError(f"FID reference statistics {path!r} are {stats.mu.shape[0]}-d, not "
                      f"Inception's {inception.FEATURE_DIM}-d pool features")
  if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
    raise ConfigError(f"FID reference statistics {path!r} hold NaN or inf")
  return stats


def full_precision(fn: Callable) -> Callable:
  """fn traced and run with float32 matmuls and convolutions at full precision: a metric's
  network must not compute in one bf16 pass, TPU's default (jit caches each precision apart)."""
  @functools.wraps(fn)
  def run(*args):
    with jax.default_matmul_precision("highest"):
      return fn(*args)
  return run


def load_networks(names: Sequence[str], eval_cfg, workdir: str | None = None,
                  mnist_eval_size: int = 0) -> dict[str, Callable]:
  """Feature functions for the networks that `names` need, from the weight files in eval_cfg,
  at full float32 precision (`full_precision`).

  The MNIST classifier defaults to `mnist_classifier.default_path(workdir, mnist_eval_size)` and is
  trained there if missing, leaving out the held-out digits of data.eval_size = mnist_eval_size.
  """
  check_weights(names, eval_cfg)
  nets = {}
  for net in sorted({NETWORK_OF[n] for n in names}):
    path = eval_cfg.get(WEIGHTS_FIELD[net]) if eval_cfg is not None else None
    if net == "lpips":
      nets[net] = lpips.load_perceptual_fn(path)
    elif net == "inception":
      nets[net] = inception.make_feature_fn(inception.load_variables(path))
    elif net == "i3d":
      nets[net] = i3d.make_feature_fn(i3d.load_variables(path))
    else:
      path = path or mnist_classifier.default_path(workdir or ".", mnist_eval_size)
      params = mnist_classifier.load_or_train(path, eval_size=mnist_eval_size)
      nets[net] = lambda x, params=params: mnist_classifier.features(params, x)
  return {net: full_precision(fn) for net, fn in nets.items()}


def _frames(x):
  return x.reshape((-1,) + x.shape[-3:])


def _allgather(x: np.ndarray) -> np.ndarray:
  """[processes, *x.shape]: every process's x, bit-exact (float64 travels as uint32 pairs)."""
  x = np.ascontiguousarray(x)
  bits = x.view(np.uint32) if x.dtype.itemsize == 8 else x
  gathered = np.asarray(multihost_utils.process_allgather(bits))
  return gathered.view(x.dtype) if x.dtype.itemsize == 8 else gathered


def _allgather_rows(x_ND: np.ndarray) -> np.ndarray:
  """Every process's rows, concatenated in process order (row counts may differ)."""
  counts = _allgather(np.array([len(x_ND)], np.int32))[:, 0]
  padded = np.zeros((int(counts.max()), *x_ND.shape[1:]), x_ND.dtype)
  padded[:len(x_ND)] = x_ND
  return np.concatenate([rows[:n] for rows, n in zip(_allgather(padded), counts)])


class MetricAccumulator:
  """Running sums and feature statistics for `names` over real/fake batches.

  sharded: each process pushes its own shard of the data (a tokenizer's eval split), and
  `result` combines every process's sums and statistics, a collective that all processes call;
  otherwise (every process holding the same data, or one process) each result is its own.
  """

  def __init__(self, names: Sequence[str], networks: dict[str, Callable],
               reference_stats: dict[str, fid.GaussianStats] | None = None, *,
               sharded: bool = False):
    self.names, self.sharded = tuple(names), sharded
    self.nets = networks
    self.lpips_sum, self.lpips_count = 0.0, 0
    self.logits: list[np.ndarray] = []
    self.reference = dict(reference_stats or {})  # Precomputed real statistics, by network.
    self.stats: dict[tuple[str, str], fid.StreamingStats] = {}

  def _push(self, net: str, side: str, features):
    features = np.asarray(features, np.float64)
    key = (net, side)
    if key not in self.stats:
      self.stats[key] = fid.StreamingStats(features.shape[-1])
    self.stats[key].update(features)

  def update(self, real=None, fake=None) -> None:
    """Adds a batch; `real` and `fake` are paired for LPIPS, independent for the distances. Both
    are scored as saved 8-bit images hold them (`visualize.as_saved`)."""
    real, fake = (None if x is None else visualize.as_saved(x) for x in (real, fake))
    if "lpips" in self.names and real is not None and fake is not None:
      distances = np.asarray(self.nets["lpips"](real, fake))
      self.lpips_sum += float(distances.sum())
      self.lpips_count += distances.shape[0]
    for side, x in (("real", real), ("fake", fake)):
      if x is None:
        continue
      if {"rfid", "inception_score"} & set(self.names):
        out = self.nets["inception"](_frames(x))
        if "rfid" in self.names and not (side == "real" and "inception" in self.reference):
          self._push("inception", side, out["pool"])
        if "inception_score" in self.names and side == "fake":
          # Without fc's bias, as the original Inception Score (and torch-fidelity) computes it.
          self.logits.append(np.asarray(out["logits_unbiased"]))
      if "fvd" in self.names and not (side == "real" and "i3d" in self.reference):
        if x.ndim != 5:
          raise ConfigError("fvd needs video [B, T, H, W, C]; drop it from the metrics for images")
        self._push("i3d", side, self.nets["i3d"](x))
      if "fid_mnist" in self.names and not (side == "real" and "mnist_classifier" in self.reference):
        self._push("mnist_classifier", side, self.nets["mnist_classifier"](_frames(x)))

  def real_stats(self, net: str) -> fid.GaussianStats:
    """Statistics of the real side (e.g. to save as reference statistics for later gFID runs)."""
    return self.reference.get(net) or self.stats[(net, "real")].finalize()

  def _combine_processes(self) -> None:
    """Merges every process's LPIPS sums, feature statistics and Inception logits into this one."""
    totals = _allgather(np.array([self.lpips_sum, float(self.lpips_count)], np.float64))
    self.lpips_sum, self.lpips_count = float(totals[:, 0].sum()), int(totals[:, 1].sum())
    for key in sorted(self.stats):
      mine = self.stats[key]
      counts = _allgather(np.array([mine.count], np.int64))[:, 0]
      means, m2s = _allgather(mine.mean_D), _allgather(mine.m2_DD)
      merged = fid.StreamingStats(mine.mean_D.shape[0])
      for count, mean_D, m2_DD in zip(counts, means, m2s):
        merged.merge(int(count), mean_D, m2_DD)
      self.stats[key] = merged
    if "inception_score" in self.names:
      logits = (np.concatenate(self.logits) if self.logits
                else np.zeros((0, inception.NUM_CLASSES), np.float32))
      self.logits = [_allgather_rows(logits)]
    self.sharded = False  # Combined once.

  def result(self) -> dict[str, float]:
    if self.sharded and jax.process_count() > 1:
      self._combine_processes()
    out = {}
    if "lpips" in self.names and self.lpips_count:
      out["eval/lpips"] = self.lpips_sum / self.lpips_count
    for name in ("rfid", "fvd", "fid_mnist"):
      if name in self.names:
        net = NETWORK_OF[name]
        out[f"eval/{name}"] = fid.fid_from_stats(self.real_stats(net),
                                                 self.stats[(net, "fake")].finalize())
    if "inception_score" in self.names and self.logits:
      splits = min(10, sum(len(l) for l in self.logits))
      out["eval/inception_score"] = fid.inception_score(np.concatenate(self.logits), splits)[0]
    return out
