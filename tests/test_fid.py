"""Fréchet distance, streaming statistics and Inception Score."""
import numpy as np
import pytest
from scipy import linalg

from vitok_jax.eval import fid


def _random_spd(rng, dim, rank=None):
  a = rng.normal(size=(dim, rank or dim))
  return a @ a.T / dim


def test_frechet_distance_closed_form_for_commuting_gaussians():
  # Diagonal covariances commute, so tr((S1 S2)^½) = Σ sqrt(s1_i s2_i) exactly.
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  s1, s2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
  rng = np.random.default_rng(1)
  s1, s2 = _random_spd(rng, 16), _random_spd(rng, 16)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  covmean = linalg.sqrtm(s1 @ s2).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(20, 64))  # Fewer samples than dimensions: rank-19 covariance.
  stats = fid.stats_of(x)
  assert abs(fid.fid_from_stats(stats, stats)) < 1e-9
  other = fid.stats_of(rng.normal(size=(20, 64)))
  value = fid.fid_from_stats(stats, other)
  assert np.isfinite(value) and value > 0


def test_streaming_stats_equal_one_shot():
  rng = np.random.default_rng(3)
  # Large offset: the naive Σxxᵀ - nμμᵀ formula would lose many digits here.
  x = rng.normal(size=(103, 12)).astype(np.float32) * 0.1 + 1000.0
  stream = fid.StreamingStats(12)
  for chunk in np.array_split(x, [1, 7, 40, 41, 100]):
    stream.update(chunk)
  got, want = stream.finalize(), fid.stats_of(x)
  assert got.count == 103
  np.testing.assert_allclose(got.mu, want.mu, rtol=1e-14)
  np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-9, atol=1e-12)


def test_stats_round_trip(tmp_path):
  stats = fid.stats_of(np.random.default_rng(4).normal(size=(10, 3)))
  stats.save(tmp_path / "s.npz")
  loaded = fid.GaussianStats.load(tmp_path / "s.npz")
  np.testing.assert_array_equal(loaded.sigma, stats.sigma)
  assert loaded.count == 10


def test_fid_of_samples_approaches_closed_form():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(20000, 4))
  b = rng.normal(size=(20000, 4)) * 2.0 + 1.0
  # N(0, I) vs N(1, 4I): 4·1 + 4·(1 + 4 - 2·2) = 8.
  assert fid.fid_from_stats(fid.stats_of(a), fid.stats_of(b)) == pytest.approx(8.0, rel=0.05)


def test_inception_score_bounds():
  confident = np.eye(10)[np.arange(1000) % 10] * 50.0  # Sharp and uniformly spread classes.
  assert fid.inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)
  assert fid.inception_score(np.zeros((1000, 10)))[0] == pytest.approx(1.0)


def test_inception_score_uses_every_example_in_uneven_splits():
  """Chunks [i·N // splits, (i + 1)·N // splits) as in the original code: N = 3, splits = 2 gives
  chunks {0} (IS 1) and {1, 2} (two sharp distinct classes: IS 2), mean 1.5."""
  sharp = np.eye(3)[[0, 0, 1]] * 60.0
  mean, std = fid.inception_score(sharp, splits=2)
  assert mean == pytest.approx(1.5, rel=1e-9) and std == pytest.approx(0.5, rel=1e-9)
  with pytest.raises(ValueError, match="at least splits=10"):
    fid.inception_score(sharp)
