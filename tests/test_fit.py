"""Power-law fits recover known laws from noisy synthetic data."""
import os

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


def test_too_few_points_for_the_law_raise():
  """As many points as parameters fit exactly (R² = 1, zero-width CI): a clear error instead."""
  with pytest.raises(ValueError, match=r"a\*x\^b needs >= 3 distinct x"):
    fit.fit_power_law([64, 128, 64], [0.1, 0.07, 0.11])
  with pytest.raises(ValueError, match=r"c \+ a\*x\^b needs >= 4 distinct x"):
    fit.fit_power_law([64, 128, 256], [0.1, 0.07, 0.05], offset=True)


@pytest.mark.parametrize("offset,n", [(False, 3), (True, 4)])
def test_smallest_allowed_fit_has_an_informative_ci(offset, n):
  """With one point more than parameters the bootstrap CI brackets the estimate with a real width
  (it was a single value when resamples needed all n points distinct: only permutations)."""
  x = np.geomspace(64, 1024, n)
  y = (0.02 + 0.5 * x ** -0.5) * np.exp(np.random.default_rng(0).normal(0, 0.05, n))
  result = fit.fit_power_law(x, y, offset=offset, n_boot=200)
  assert result["n_boot"] >= 50
  for name, (lo, hi) in result["ci"].items():
    assert lo <= result[name] <= hi, name
    assert hi - lo > 1e-3 * abs(result[name]), (name, lo, hi)


def test_fit_rows_leave_out_runs_missing_a_column():
  """A finished run without one fitted column is left out of that fit (single and L(N, D)); the
  two-variable fit failed on the whole sweep."""
  from vitok_jax.scaling import results  # pylint: disable=g-import-not-at-top
  n, d, loss = _chinchilla_grid(noise=0.0)
  rows = [{"id": str(i), "status": "done", "params": a, "seen": b, "eval/loss": c}
          for i, (a, b, c) in enumerate(zip(n[::2], d[::2], loss[::2]))]
  rows += [{"id": "no_metric", "status": "done", "params": 1e7, "seen": 1e9, "eval/loss": None},
           {"id": "nan", "status": "done", "params": 2e7, "seen": 1e9, "eval/loss": float("nan")},
           {"id": "failed", "status": "failed", "params": 3e7, "seen": 1e9, "eval/loss": 9.0}]
  two, single = results.fit_rows(rows, [dict(kind="two_variable", n="params", d="seen",
                                             y="eval/loss"),
                                        dict(x="params", y="eval/loss")], n_boot=0)
  assert "error" not in two, two
  assert two["n"] == single["n"] == len(n[::2])
  assert two["alpha"] == pytest.approx(0.34, rel=0.05) and two["E"] == pytest.approx(1.7, rel=0.05)


def test_two_variable_bootstrap_resamples_span_both_axes():
  """With one run at the second N, a third of plain resamples hold a single N (α would be
  unidentified and its CI arbitrary); the bootstrap's resamples all span two values of each."""
  n, d = np.array([1e6, 1e6, 1e6, 1e6, 4e6]), np.array([1e8, 2e8, 1e8, 2e8, 1e8])
  sets = fit.two_variable_resamples(n, d, 200, seed=3)
  assert len(sets) == 200
  assert all(len(set(n[ix])) == 2 and len(set(d[ix])) == 2 for ix in sets)
  plain = np.random.default_rng(3).integers(0, 5, (2000, 5))
  assert np.mean([len(set(n[ix])) < 2 for ix in plain]) > 0.2  # What the check leaves out.


def test_metric_directions():
  """The frontier of a generator sweep on class accuracy or Inception Score keeps the highest,
  tagged or not; losses, FIDs and latency the lowest."""
  from vitok_jax.scaling import results
  for metric in ("eval/psnr", "eval/ssim", "gen/class_accuracy", "gen/cfg_scale=3/class_accuracy",
                 "gen/euler/inception_score", "eval/inception_score"):
    assert results.higher_is_better(metric), metric
  for metric in ("eval/l2", "eval/rfid", "gen/fid_mnist", "gen/ms_per_sample", "eval/lpips"):
    assert not results.higher_is_better(metric), metric


def test_frontier_plot_labels_its_x_and_skips_a_two_point_fit(tmp_path, monkeypatch):
  from vitok_jax.scaling import plots  # pylint: disable=g-import-not-at-top
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, out_dir, name: figures.append(fig) or [name])
  rows = [{"status": "done", "tokens_seen": t, "compute": 6 * t, "eval/l2": l}
          for t, l in ((1e6, 0.5), (1e7, 0.3), (1e8, 0.4))]  # A two-point frontier.
  plots.plot_frontier(rows, "eval/l2", str(tmp_path), x="tokens_seen")
  plots.plot_frontier(rows, "eval/l2", str(tmp_path))
  tokens_ax, compute_ax = (fig.axes[0] for fig in figures)
  assert tokens_ax.get_xlabel() == "tokens_seen"
  assert compute_ax.get_xlabel() == "compute (training FLOPs)"
  assert tokens_ax.get_xscale() == tokens_ax.get_yscale() == "log"
  assert len(tokens_ax.get_lines()) == 1  # The frontier, no fitted law through two points.


def test_plain_and_offset_fits_of_the_same_columns_get_their_own_plots(tmp_path):
  from vitok_jax.scaling import plots  # pylint: disable=g-import-not-at-top
  x = np.array([64.0, 128, 256, 512, 1024])
  y = 0.01 + 2.0 * x ** -0.5
  paths = []
  for offset in (False, True):
    result = fit.fit_power_law(x, y, offset=offset, n_boot=0)
    result.update(spec={"x": "E", "y": "eval/l2"}, x_values=list(x), y_values=list(y))
    paths += plots.plot_fit(result, str(tmp_path))
  assert len(set(paths)) == len(paths) == 4  # PNG and SVG of each.
  assert all(os.path.exists(p) for p in paths)


def test_heatmap_axes_keep_sweep_order_when_a_run_failed(tmp_path, monkeypatch):
  from vitok_jax.scaling import plots  # pylint: disable=g-import-not-at-top
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, out_dir, name: figures.append(fig) or [name])
  sizes = ["Mu", "Mi", "Ti"]
  rows = [{"status": "failed" if (e, d) == ("Mu", "Mu") else "done", "enc": e, "dec": d,
           "eval/psnr": 20.0 + 10 * i + j}
          for i, e in enumerate(sizes) for j, d in enumerate(sizes)]
  plots.plot_heatmap(rows, "dec", "enc", "eval/psnr", str(tmp_path))
  ax = figures[0].axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == sizes
  assert [t.get_text() for t in ax.get_yticklabels()] == sizes
  cells = [t.get_text() for t in ax.texts]
  assert len(cells) == 8 and "20" not in cells  # The failed run's cell is empty.
