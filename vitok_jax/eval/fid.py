"""Fréchet distance between feature Gaussians, streaming feature statistics and the Inception Score.

Used by rFID/gFID (Inception pool3 features, 2048-d), FVD (I3D logits, 400-d) and FID-MNIST (a small
classifier's features). Everything here is host-side numpy in float64: the statistics are sums over
the whole eval set, and the distance subtracts nearly equal large numbers, where float32 loses digits.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def frechet_distance(mu1_D, sigma1_DD, mu2_D, sigma2_DD) -> float:
  """d² = |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½) between N(mu1, S1) and N(mu2, S2).

  tr((S1 S2)^½) is computed as Σ sqrt(eig(S1^½ S2 S1^½)): that matrix is symmetric PSD, so the
  eigenvalues come from a symmetric solver and are real. Unlike scipy's sqrtm on the non-symmetric
  S1 S2 (pytorch-fid), this needs no eps retry and stays finite when a covariance is singular
  (fewer samples than dimensions).
  """
  mu1, mu2 = np.asarray(mu1_D, np.float64), np.asarray(mu2_D, np.float64)
  s1, s2 = np.asarray(sigma1_DD, np.float64), np.asarray(sigma2_DD, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {s1.shape} vs {s2.shape}")
  sqrt_s1 = _psd_sqrt(s1)
  middle = sqrt_s1 @ s2 @ sqrt_s1
  eigvals = _clip_rank_noise(np.linalg.eigvalsh((middle + middle.T) / 2))
  tr_covmean = np.sum(np.sqrt(eigvals))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _psd_sqrt(s_DD):
  """Symmetric square root of a PSD matrix."""
  eigvals, eigvecs = np.linalg.eigh((s_DD + s_DD.T) / 2)
  return (eigvecs * np.sqrt(_clip_rank_noise(eigvals))) @ eigvecs.T


def _clip_rank_noise(eigvals):
  """Zeroes eigenvalues below numpy's matrix_rank tolerance (D·eps·max): they are rounding noise
  of a singular matrix, and their square roots (~1e-8 each) would otherwise add up to ~1e-6."""
  tol = eigvals.shape[0] * np.finfo(np.float64).eps * max(np.abs(eigvals).max(), 1e-300)
  return np.where(eigvals > tol, eigvals, 0.0)


@dataclasses.dataclass
class GaussianStats:
  """Mean and covariance (ddof=1, as pytorch-fid's np.cov) of a feature set."""
  mu: np.ndarray      # [D]
  sigma: np.ndarray   # [D, D]
  count: int

  def save(self, path: str) -> None:
    np.savez(path, mu=self.mu, sigma=self.sigma, count=self.count)

  @classmethod
  def load(cls, path: str) -> "GaussianStats":
    """Reads our .npz, or a published reference .npz holding mu and sigma (pytorch-fid's; ADM's
    VIRTUAL_imagenet256_labeled.npz, whose other arrays are ignored); count 0 when not stored.
    ValueError when the file has no mu / sigma or their shapes are not [D] and [D, D]."""
    with np.load(path) as f:
      missing = [k for k in ("mu", "sigma") if k not in f]
      if missing:
        raise ValueError(f"{path} holds {sorted(f.keys())}, not the statistics' {missing}")
      stats = cls(f["mu"].astype(np.float64), f["sigma"].astype(np.float64),
                  int(f["count"]) if "count" in f else 0)
    if stats.mu.ndim != 1 or stats.sigma.shape != stats.mu.shape * 2:
      raise ValueError(f"{path}: mu {stats.mu.shape} and sigma {stats.sigma.shape} are not the "
                       "statistics of one feature space ([D] and [D, D])")
    return stats


class StreamingStats:
  """Mean/covariance accumulated batch by batch, equal to the one-shot computation.

  Batches are merged with Chan et al.'s pairwise update of (count, mean, centred scatter M2), so
  no sum of squares of raw features is ever formed: Inception features are non-negative with
  means far from zero, where Σxxᵀ - n·μμᵀ cancels catastrophically.
  """

  def __init__(self, dim: int):
    self.count = 0
    self.mean_D = np.zeros(dim, np.float64)
    self.m2_DD = np.zeros((dim, dim), np.float64)

  def update(self, features_ND) -> None:
    """Adds a batch of features [N, D] (any float dtype; a jax array is copied to the host)."""
    x = np.asarray(features_ND, np.float64)
    x = x.reshape(-1, x.shape[-1])
    if x.shape[-1] != self.mean_D.shape[0]:
      raise ValueError(f"features have {x.shape[-1]} dims, the statistics {self.mean_D.shape[0]}")
    n = x.shape[0]
    if n == 0:
      return
    batch_mean = x.mean(0)
    centred = x - batch_mean
    batch_m2 = centred.T @ centred
    total = self.count + n
    delta = batch_mean - self.mean_D
    self.m2_DD += batch_m2 + np.outer(delta, delta) * (self.count * n / total)
    self.mean_D += delta * (n / total)
    self.count = total

  def merge(self, count: int, mean_D, m2_DD) -> None:
    """Adds another StreamingStats' (count, mean, centred scatter), e.g. another process's."""
    if count == 0:
      return
    total = self.count + count
    delta = np.asarray(mean_D, np.float64) - self.mean_D
    self.m2_DD += np.asarray(m2_DD, np.float64) + np.outer(delta, delta) * (self.count * count / total)
    self.mean_D += delta * (count / total)
    self.count = total

  def finalize(self) -> GaussianStats:
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
    return GaussianStats(self.mean_D.copy(), self.m2_DD / (self.count - 1), self.count)


def stats_of(features_ND) -> GaussianStats:
  """One-shot statistics of a feature array [N, D]."""
  x = np.asarray(features_ND, np.float64)
  return GaussianStats(x.mean(0), np.cov(x, rowvar=False, ddof=1), x.shape[0])


def fid_from_stats(a: GaussianStats, b: GaussianStats) -> float:
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(logits_NK, splits: int = 10) -> tuple[float, float]:
  """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` chunks (Salimans et al.).

  Args:
    logits_NK: class logits (softmax is taken here, in float64).
    splits: the usual 10; chunk i is examples [i·N // splits, (i + 1)·N // splits), so every
      example counts, as in the original code (improved-gan) and torch-fidelity.
  """
  logits = np.asarray(logits_NK, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  n = logits.shape[0]
  if n < splits:
    raise ValueError(f"Inception Score needs at least splits={splits} examples, got {n}")
  scores = []
  for i in range(splits):
    chunk = log_p[i * n // splits:(i + 1) * n // splits]
    log_marginal = np.log(np.exp(chunk).mean(0))
    kl = np.sum(np.exp(chunk) * (chunk - log_marginal), axis=-1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
