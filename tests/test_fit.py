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
  result = fit.fit_power_law(x, y)
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
  result = fit.fit_power_law(x, y)
  assert result["ci"]["b"][0] < 0.12 < result["ci"]["b"][1]
  assert result["b"] > 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_offset_power_law(sign):
  """y = c + a·x^b: a floor (loss, a > 0) or a ceiling (score, a < 0)."""
  rng = np.random.default_rng(4)
  x = np.geomspace(10, 1e5, 20)
  c, a, b = (0.5, 3.0, -0.4) if sign > 0 else (30.0, -20.0, -0.3)
  y = (c + a * x ** b) * np.exp(rng.normal(0, 0.003, x.size))
  result = fit.fit_power_law(x, y, offset=True)
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


def test_two_variable_needs_more_runs_than_parameters_and_flags_what_it_cannot_fit():
  """5 runs fit L(N, D)'s 5 parameters exactly: refused. A parameter on the search box's edge (the
  runs do not determine it) or a negative R² is named in the result's warnings."""
  n, d, loss = _chinchilla_grid(noise=0.0)
  with pytest.raises(ValueError, match=">= 6 runs"):
    fit.fit_two_variable(n[:5], d[:5], loss[:5])
  assert fit.fit_two_variable(n, d, loss)["warnings"] == []
  assert fit._two_variable_warnings(np.array([0.5, 6.0, 6.0, 0.3, 0.3]), 0.9) == []
  at_edge = fit._two_variable_warnings(np.array([0.5, 6.0, 6.0, 5.0, 0.3]), -0.1)
  assert len(at_edge) == 2 and "alpha on the edge" in at_edge[0] and "R² -0.100" in at_edge[1]


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
  """The CI band of `vitok fit`'s plots around y = c + a·x^b."""
  x = np.geomspace(1e3, 1e6, 12)
  true = 2.0 + 50.0 * x ** -0.4
  y = true * np.exp(np.random.default_rng(0).normal(0, 0.02, x.size))
  result = fit.fit_power_law(x, y, offset=True)
  lo, hi = fit.confidence_band(result, x)
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


def test_power_law_ci_is_the_least_squares_t_interval():
  """a·x^b: the intervals of a and b are ordinary least squares' on (log x, log y) (scipy)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  x = np.geomspace(64, 1024, 5)
  y = 1.3 * x ** -0.6 * np.exp(np.random.default_rng(1).normal(0, 0.15, x.size))
  result = fit.fit_power_law(x, y)
  line, t = stats.linregress(np.log(x), np.log(y)), stats.t.ppf(0.975, 3)
  np.testing.assert_allclose(result["ci"]["b"], [line.slope - t * line.stderr,
                                                 line.slope + t * line.stderr], rtol=1e-9)
  half_log_a = t * line.intercept_stderr
  np.testing.assert_allclose(result["ci"]["a"], np.exp([line.intercept - half_log_a,
                                                        line.intercept + half_log_a]), rtol=1e-9)
  assert result["dof"] == 3


def test_an_undetermined_offset_fit_warns_and_saves_strict_json(tmp_path):
  """Flat noisy data do not determine c + a·x^b: its covariance is not positive, so no interval
  (NaN, null in fits.json, which stays strict JSON) and a warning that says so; a determined fit
  has none."""
  import json  # pylint: disable=g-import-not-at-top
  from vitok_jax.scaling import results  # pylint: disable=g-import-not-at-top
  x = np.array([1, 2, 4, 8, 16.0])
  y = 1 + 0.05 * np.random.default_rng(1).random(5)
  flat = fit.fit_power_law(x, y, offset=True)
  assert np.isnan(flat["ci"]["b"]).all() and "do not determine c + a*x^b" in flat["warnings"][0]
  assert fit.fit_power_law(x, 2 * x**-0.5)["warnings"] == []
  path = str(tmp_path / "fits.json")
  results.save_fits([{"spec": dict(x="E", y="eval/l2", offset=True), **flat}], path)
  saved = json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
  assert saved[0]["ci"]["b"] == [None, None]
  assert "WARNING: the data do not determine" in results.describe_fit(
      {"spec": dict(x="E", y="eval/l2", offset=True), **flat})


def test_offset_ci_is_scipys_curve_fit_covariance():
  """c + a·x^b: the standard errors are scipy's curve_fit ones on log y (a's through the delta
  method: ours is of log|a|)."""
  from scipy import optimize, stats  # pylint: disable=g-import-not-at-top
  x = np.geomspace(1e3, 1e6, 8)
  y = (2.0 + 50.0 * x ** -0.4) * np.exp(np.random.default_rng(2).normal(0, 0.02, x.size))
  result = fit.fit_power_law(x, y, offset=True)
  law = lambda x, c, a, b: np.log(c + a * x ** b)
  params, covariance = optimize.curve_fit(law, x, np.log(y), p0=[result[k] for k in "cab"])
  t = stats.t.ppf(0.975, x.size - 3)
  (c, a, b), (se_c, se_a, se_b) = params, np.sqrt(np.diag(covariance))
  for name, value, se in (("c", c, se_c), ("b", b, se_b)):
    assert result[name] == pytest.approx(value, rel=1e-4), name
    np.testing.assert_allclose(result["ci"][name], [value - t * se, value + t * se], rtol=2e-3,
                               err_msg=name)
  np.testing.assert_allclose(np.log(result["ci"]["a"]),
                             np.log(a) + np.array([-1, 1]) * t * se_a / a, rtol=2e-3)


def test_an_undetermined_offset_law_gets_an_unbounded_interval_not_an_error():
  """Four points the law c + a·x^b barely constrains: a's interval runs out to infinity."""
  x = np.geomspace(1e8, 1e10, 4)
  result = fit.fit_power_law(x, [0.2987, 0.2074, 0.1574, 0.2376], offset=True)
  assert np.isinf(result["ci"]["a"]).any() or result["ci"]["a"][1] > 1e6 * abs(result["a"])
  assert result["ci"]["b"][0] < result["b"] < result["ci"]["b"][1]


@pytest.mark.parametrize("offset,n", [(False, 3), (False, 5), (True, 5)])
def test_ci_covers_the_true_exponent_at_its_level_with_few_points(offset, n):
  """Over simulated sweeps of 3–5 runs the 95% interval holds the true b about 95% of the time
  (a case-resampling bootstrap held it 69% of the time with 3 points, 88% with 5)."""
  rng = np.random.default_rng(n)
  x = np.geomspace(64, 1024, n) if not offset else np.geomspace(1e3, 1e6, n)
  trials, covered = 200, 0
  for _ in range(trials):
    clean = 1.3 * x ** -0.6 if not offset else 2.0 + 50.0 * x ** -0.4
    result = fit.fit_power_law(x, clean * np.exp(rng.normal(0, 0.15 if not offset else 0.02, n)),
                               offset=offset)
    lo, hi = result["ci"]["b"]
    covered += lo <= (-0.4 if offset else -0.6) <= hi
  assert 0.9 <= covered / trials <= 0.99, covered / trials


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
  assert two["left_out"] == single["left_out"] == ["no_metric", "nan"]
  for result in (two, single):
    assert "; left out: no_metric, nan)" in results.describe_fit(result)
  assert two["alpha"] == pytest.approx(0.34, rel=0.05) and two["E"] == pytest.approx(1.7, rel=0.05)
  typo, = results.fit_rows(rows, [dict(x="param", y="eval/loss")])
  assert typo["error"].startswith("ValueError: no column 'param' in the results; the columns are")


def test_a_non_finite_extra_metric_is_flagged_not_a_divergence(tmp_path):
  """A run whose reconstruction metrics are finite stays in the fits of those columns when
  another metric (e.g. an FID added later by `vitok eval`) is NaN; a NaN eval/l2 is diverged."""
  from vitok_jax.scaling import results  # pylint: disable=g-import-not-at-top
  def record(l2, extra, e, psnr):
    return {"E": e, "metrics": {"eval/l2": l2, "eval/psnr": psnr, "eval/fid_extra": extra},
            "steps": 500}
  extra_nan = results._row(record(0.1, float("nan"), 64, 20.0), "a", "done", [], {})
  l2_nan = results._row(record(float("nan"), 1.0, 128, 21.0), "b", "done", [], {})
  clean = results._row(record(0.2, 1.0, 256, 23.0), "c", "done", [], {})
  assert extra_nan["status"] == "done" and l2_nan["status"] == "diverged"
  assert clean["steps"] == 500 and "error" not in clean
  assert results.flags([extra_nan, l2_nan, clean]) == [
      "a: done (non-finite eval/fid_extra)", "b: diverged (non-finite eval/l2)"]
  rows = [extra_nan, l2_nan, clean]
  rows.append(dict(clean, id="d", E=512, **{"eval/psnr": 24.5}))
  psnr, = results.fit_rows(rows, [dict(x="E", y="eval/psnr")])
  assert psnr["n"] == 3 and psnr["left_out"] == []


def test_a_fit_named_with_or_without_its_default_offset_is_one_fit():
  from vitok_jax.scaling import results  # pylint: disable=g-import-not-at-top
  specs = [dict(x="E", y="eval/l2"), dict(x="E", y="eval/psnr"),
           dict(x="E", y="eval/l2", offset=False), dict(x="E", y="eval/l2", offset=True)]
  assert results._unique(specs) == [specs[0], specs[1], specs[3]]


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
  # The law through a frontier is drawn over the frontier's compute, not past its last run.
  rows = [{"status": "done", "compute": c, "eval/l2": l}
          for c, l in zip((1e12, 2e12, 4e12, 8e12, 1.6e13, 3.2e13), (1, .8, .6, .5, .55, .7))]
  plots.plot_frontier(rows, "eval/l2", str(tmp_path))
  frontier, law = figures[-1].axes[0].get_lines()
  assert max(law.get_xdata()) == pytest.approx(max(frontier.get_xdata())) == 8e12


@pytest.mark.parametrize("span", [(1.1e15, 1.9e15), (2e15, 2.5e15), (1.5e15, 9e15)])
def test_frontier_x_labels_do_not_overlap_within_a_decade(tmp_path, span, monkeypatch):
  """Within a decade matplotlib labels minor ticks, which overlap on plain log axes (checked):
  the saved frontier plot shows some of them, none overlapping."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from vitok_jax.scaling import plots  # pylint: disable=g-import-not-at-top

  def visible_overlaps(ax):
    lo, hi = ax.get_xlim()
    boxes = [t.get_window_extent() for t in ax.get_xticklabels(which="both")
             if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]
    return len(boxes), sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])

  plain, ax = plt.subplots(figsize=(5, 3.8))
  ax.plot(span, [0.05, 0.03])
  ax.set(xscale="log", yscale="log")
  plain.canvas.draw()
  assert visible_overlaps(ax)[1] > 0
  plt.close(plain)
  figures = []
  save = plots._save
  monkeypatch.setattr(plots, "_save", lambda fig, *args: figures.append(fig) or save(fig, *args))
  compute = np.geomspace(*span, 5)
  rows = [{"status": "done", "compute": c, "eval/l2": 0.05 * (c / span[0]) ** -0.3}
          for c in compute]
  plots.plot_frontier(rows, "eval/l2", str(tmp_path))
  shown, overlapping = visible_overlaps(figures[0].axes[0])
  assert shown >= 3 and overlapping == 0


def test_plain_and_offset_fits_of_the_same_columns_get_their_own_plots(tmp_path):
  from vitok_jax.scaling import plots  # pylint: disable=g-import-not-at-top
  x = np.array([64.0, 128, 256, 512, 1024])
  y = 0.01 + 2.0 * x ** -0.5
  paths = []
  for offset in (False, True):
    result = fit.fit_power_law(x, y, offset=offset)
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
  # A third key swept too: the runs sharing a cell are averaged and counted, not overwritten.
  figures.clear()
  plots.plot_heatmap(rows + [dict(rows[-1], **{"eval/psnr": 50.0})], "dec", "enc", "eval/psnr",
                     str(tmp_path))
  assert "46\n×2" in [t.get_text() for t in figures[0].axes[0].texts]  # (42 + 50) / 2.
  # A done run flagged for a non-finite value leaves the cell to the others.
  figures.clear()
  plots.plot_heatmap(rows + [dict(rows[-1], **{"eval/psnr": float("nan")})], "dec", "enc",
                     "eval/psnr", str(tmp_path))
  assert "42" in [t.get_text() for t in figures[0].axes[0].texts]
