"""Power-law fits recover known laws from noisy synthetic data."""
import numpy as np
import pytest

from vitok_jax.scaling import fit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_exponent_inside_ci(seed):
  rng = np.random.default_rng(seed)
  x = np.geomspace(64, 16384, 24)
  y = 3.0 * x ** -0.4 * np.exp(rng.normal(0, 0.05, x.size))  # 5% multiplicative noise.
  result = fit.fit_power_law(x, y, n_boot=500, seed=seed)
  lo, hi = result["ci"]["b"]
  assert lo < -0.4 < hi
  assert hi - lo < 0.1  # And the interval is informative.
  assert result["r2"] > 0.95
  assert result["a"] == pytest.approx(3.0, rel=0.25)


def test_power_law_rising_metric():
  """PSNR-like metrics rise with E: a positive exponent."""
  rng = np.random.default_rng(3)
  x = np.geomspace(64, 1024, 5)
  y = 8.0 * x ** 0.12 * np.exp(rng.normal(0, 0.01, x.size))
  result = fit.fit_power_law(x, y, n_boot=300)
  assert result["ci"]["b"][0] < 0.12 < result["ci"]["b"][1]
  assert result["b"] > 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_offset_power_law(sign):
  """y = c + a·x^b: a floor (loss, a > 0) or a ceiling (score, a < 0)."""
  rng = np.random.default_rng(4)
  x = np.geomspace(10, 1e5, 20)
  c, a, b = (0.5, 3.0, -0.4) if sign > 0 else (30.0, -20.0, -0.3)
  y = (c + a * x ** b) * np.exp(rng.normal(0, 0.003, x.size))
  result = fit.fit_power_law(x, y, offset=True, n_boot=300)
  for name, true in (("a", a), ("b", b), ("c", c)):
    lo, hi = result["ci"][name]
    assert lo < true < hi, (name, true, result["ci"])
  assert result["r2"] > 0.99


def test_power_law_rejects_bad_input():
  with pytest.raises(ValueError, match="positive"):
    fit.fit_power_law([1, 2, 3], [1, -1, 2])
  with pytest.raises(ValueError, match="distinct"):
    fit.fit_power_law([2, 2, 2], [1, 2, 3])


def _chinchilla_grid(noise, seed=0):
  rng = np.random.default_rng(seed)
  n, d = [g.ravel() for g in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6))]
  loss = (1.7 + 400 / n ** 0.34 + 410 / d ** 0.28) * np.exp(rng.normal(0, noise, n.size))
  return n, d, loss


def test_two_variable_recovers_exponents():
  n, d, loss = _chinchilla_grid(noise=0.005)
  result = fit.fit_two_variable(n, d, loss)
  assert result["alpha"] == pytest.approx(0.34, rel=0.10)
  assert result["beta"] == pytest.approx(0.28, rel=0.10)
  assert result["E"] == pytest.approx(1.7, rel=0.10)
  assert result["a_exponent"] == pytest.approx(0.28 / 0.62, rel=0.10)
  assert result["r2"] > 0.9


def test_compute_optimal_frontier_slope():
  """N*(C) ∝ C^(β/(α+β)), and it minimises L along C = 6·N·D."""
  law = dict(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
  best = fit.compute_optimal(law, [1e18, 1e21])
  slope = np.diff(np.log(best["n"])) / np.diff(np.log(best["compute"]))
  assert slope[0] == pytest.approx(0.28 / 0.62, rel=1e-9)
  n_grid = best["n"][0] * np.geomspace(0.1, 10, 101)
  losses = fit.predict_two_variable(law, n_grid, 1e18 / 6 / n_grid)
  assert losses.min() == pytest.approx(best["loss"][0], rel=1e-4)


def test_pareto_frontier():
  compute = [1, 2, 3, 4, 5]
  loss = [5.0, 6.0, 4.0, 4.5, 3.0]
  np.testing.assert_array_equal(fit.pareto_frontier(compute, loss), [0, 2, 4])
  np.testing.assert_array_equal(fit.pareto_frontier(compute, loss, higher_is_better=True), [0, 1])
  np.testing.assert_array_equal(fit.pareto_frontier([1, 1, 2], [3.0, 2.0, 1.0]), [1, 2])


def test_plotted_band_brackets_the_fit_and_the_true_law():
  """The CI band of `vitok fit`'s plots: warm-started bootstrap refits around y = c + a·x^b."""
  from vitok_jax.scaling import plots  # pylint: disable=g-import-not-at-top
  x = np.geomspace(1e3, 1e6, 12)
  true = 2.0 + 50.0 * x ** -0.4
  y = true * np.exp(np.random.default_rng(0).normal(0, 0.02, x.size))
  result = fit.fit_power_law(x, y, offset=True, n_boot=0)
  result.update(x_values=list(x), y_values=list(y))
  lo, hi = plots._ci_band(result, x, n_draws=200)
  predicted = fit.predict_power_law(result, x)
  assert np.all(lo <= predicted) and np.all(predicted <= hi)
  assert np.mean((lo <= true) & (true <= hi)) >= 0.8
  assert np.all(hi - lo < 0.1 * predicted) and np.all(hi - lo > 0)
