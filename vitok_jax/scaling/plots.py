"""Sweep plots (matplotlib, Agg; each figure saved as PNG and SVG).

  metric vs x (log-log) with the fitted power law and its CI band;
  encoder × decoder heat map of a metric;
  metric vs training compute with the empirical frontier (best run at ≤ C) and its power-law fit.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from vitok_jax.scaling import fit as fit_lib

_DONE = "done"


def _save(fig, out_dir: str, name: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  _thin_log_tick_labels(fig)
  paths = [os.path.join(out_dir, f"{name}.{ext}") for ext in ("png", "svg")]
  for path in paths:
    fig.savefig(path, dpi=130, bbox_inches="tight")
  plt.close(fig)
  return paths


def _log_log(ax, **labels) -> None:
  """Log-log axes with a grid. Within a decade matplotlib labels minor ticks too (2×10¹⁵, 3×10¹⁵,
  …), which collide along x: they are slanted and smaller (and thinned when saved)."""
  ax.set(xscale="log", yscale="log", **labels)
  ax.tick_params(axis="x", which="minor", labelsize=7, labelrotation=35)
  ax.grid(True, which="both", alpha=0.3)


def _thin_log_tick_labels(fig) -> None:
  """Hides each x tick label of a log axis that would overlap one already shown (major labels
  first, then minor ones left to right), as a narrow span of compute labels many minor ticks."""
  fig.canvas.draw()  # Lays out the final ticks and their labels.
  for ax in fig.axes:
    if ax.get_xscale() != "log":
      continue
    lo, hi = sorted(ax.get_xlim())
    shown = []
    for minor in (False, True):
      labels = [t for t in ax.get_xticklabels(minor=minor)
                if t.get_text() and lo <= t.get_position()[0] <= hi]
      for label in sorted(labels, key=lambda t: t.get_position()[0]):
        box = label.get_window_extent()
        if any(box.overlaps(other) for other in shown):
          label.set_visible(False)
        else:
          shown.append(box)


def _safe(name: str) -> str:
  return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def plot_fit(result: dict, out_dir: str) -> list[str]:
  """Scatter of the fitted points, the fitted law and its CI band on log-log axes."""
  spec = result["spec"]
  xs, ys = np.asarray(result["x_values"]), np.asarray(result["y_values"])
  fig, ax = plt.subplots(figsize=(5, 3.8))
  ax.scatter(xs, ys, color="C0", zorder=3, label="runs")
  grid = np.geomspace(xs.min() / 1.3, xs.max() * 1.3, 100)
  band = fit_lib.confidence_band(result, grid)
  ax.fill_between(grid, band[0], band[1], color="C1", alpha=0.25,
                  label=f"{100 * result['ci_level']:.0f}% CI")
  offset = f"{result['c']:.3g} + " if "c" in result else ""
  ax.plot(grid, fit_lib.predict_power_law(result, grid), color="C1",
          label=f"{offset}{result['a']:.3g}·x^{result['b']:.3f}  (R² {result['r2']:.3f})")
  _log_log(ax, xlabel=spec["x"], ylabel=spec["y"], title=f"{spec['y']} vs {spec['x']}")
  ax.legend(fontsize=8)
  return _save(fig, out_dir, fit_plot_name({**spec, "offset": "c" in result}))


def fit_plot_name(spec: dict) -> str:
  """The file name (no extension) of a power-law fit's plot. An offset fit of the same columns
  gets its own file (it would overwrite the plain one)."""
  suffix = "_offset" if spec.get("offset") else ""
  return f"fit_{_safe(spec['y'])}_vs_{_safe(spec['x'])}{suffix}"


def plot_heatmap(rows: Sequence[dict], x: str, y: str, value: str, out_dir: str) -> list[str]:
  """A grid of `value` over two swept keys (e.g. decoder × encoder size), annotated per cell.

  Runs that share a cell (a third key swept too) are averaged, and the cell says how many ("×3").
  """
  done = [r for r in rows if r["status"] == _DONE]
  # Axes in sweep order over every run: a failed run is an empty cell, it does not reorder them.
  xs = list(dict.fromkeys(r.get(x) for r in rows))
  ys = list(dict.fromkeys(r.get(y) for r in rows))
  sums, counts = np.zeros((len(ys), len(xs))), np.zeros((len(ys), len(xs)), int)
  for r in done:
    if isinstance(r.get(value), (int, float)) and math.isfinite(r[value]):
      sums[ys.index(r.get(y)), xs.index(r.get(x))] += r[value]
      counts[ys.index(r.get(y)), xs.index(r.get(x))] += 1
  grid = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
  fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2, 1.0 * len(ys) + 1.5))
  image = ax.imshow(grid, cmap="viridis", origin="lower")
  for i in range(len(ys)):
    for j in range(len(xs)):
      if counts[i, j]:
        text = f"{grid[i, j]:.3g}" + (f"\n×{counts[i, j]}" if counts[i, j] > 1 else "")
        ax.text(j, i, text, ha="center", va="center", color="w", fontsize=8)
  ax.set(xticks=range(len(xs)), xticklabels=xs, yticks=range(len(ys)), yticklabels=ys,
         xlabel=x, ylabel=y, title=value)
  fig.colorbar(image, ax=ax)
  return _save(fig, out_dir, f"heatmap_{_safe(value)}")


def plot_frontier(rows: Sequence[dict], y: str, out_dir: str, *, x: str = "compute",
                  higher_is_better: bool = False) -> list[str]:
  """`y` vs training compute: every run, the empirical frontier and a power law through it."""
  done = [r for r in rows if r["status"] == _DONE and isinstance(r.get(y), (int, float))
          and isinstance(r.get(x), (int, float)) and math.isfinite(r[y])]
  if not done:
    return []
  compute = np.array([r[x] for r in done], np.float64)
  metric = np.array([r[y] for r in done], np.float64)
  front = fit_lib.pareto_frontier(compute, metric, higher_is_better=higher_is_better)
  fig, ax = plt.subplots(figsize=(5, 3.8))
  ax.scatter(compute, metric, color="C0", alpha=0.7, label="runs")
  ax.plot(compute[front], metric[front], "o-", color="C3", label="frontier")
  # A power law through the frontier only where it spans a real range of compute (≥ 1.5×) and has
  # more points than the law has parameters (fit_power_law raises otherwise).
  if len(front) >= 3 and np.all(metric[front] > 0) and np.ptp(np.log(compute[front])) > 0.4:
    law = fit_lib.fit_power_law(compute[front], metric[front])
    grid = np.geomspace(compute[front].min(), compute[front].max(), 50)  # Only where it was fit.
    ax.plot(grid, fit_lib.predict_power_law(law, grid), "--", color="C3", alpha=0.6,
            label=f"frontier fit ∝ C^{law['b']:.3f}")
  _log_log(ax, xlabel=f"{x} (training FLOPs)" if x == "compute" else x, ylabel=y,
           title=f"{y} vs {x}")
  ax.legend(fontsize=8)
  return _save(fig, out_dir, f"frontier_{_safe(y)}")


def plot_sweep(rows: Sequence[dict], fits: Sequence[dict], out_dir: str, *,
               heatmap: dict | None = None, frontier: dict | None = None) -> list[str]:
  """Every plot a sweep asks for; returns the written paths."""
  from vitok_jax.scaling import results  # Only for the metric directions.
  paths = []
  for result in fits:
    if "error" not in result and "x_values" in result:
      paths += plot_fit(result, out_dir)
  if heatmap:
    paths += plot_heatmap(rows, heatmap["x"], heatmap["y"], heatmap["value"], out_dir)
  if frontier:
    paths += plot_frontier(rows, frontier["y"], out_dir, x=frontier.get("x", "compute"),
                           higher_is_better=results.higher_is_better(frontier["y"]))
  return paths
