"""Results of a sweep: one table row per run (CSV, Markdown), flags, and the fits/plots it asks for.

Rows come from every runs/*/record.json (plus runs the manifest lists that have none). Columns:
  id, status, the swept keys, params_{encoder,decoder,bottleneck,total}, E, c, tokens_per_example,
  flops_forward (per example), flops_train (per example: 3 × forward; 3.5 for shortcut DiT, and
  LARP's prior counted twice), compute (= flops_train × examples_seen: the model's training
  FLOPs, not counting loss networks such as LPIPS or a GAN discriminator), examples_seen,
  tokens_seen, steps, wall_time_s, and the metrics of the run's last evaluation (at its final
  step, on the EMA params when it keeps an EMA; `vitok eval` adds to them).
A fit or plot names any of these columns, a swept key among them (a dotted config path when the
sweep sweeps one, e.g. "model.decoder").
"""
from __future__ import annotations

import csv
import glob
import json
import math
import numbers
import os
from typing import Any, Sequence

from vitok_jax.errors import ConfigError
from vitok_jax.scaling import fit as fit_lib
from vitok_jax.scaling import sweep as sweep_lib

METRICS = ("eval/psnr", "eval/ssim", "eval/l2")
# A run whose own held-out outputs are not finite blew up; another non-finite metric (an FID of a
# degenerate sample set) is flagged and left out of the fits of its column only.
DIVERGENCE_METRICS = (*METRICS, "eval/loss")
# Metrics where larger is better, by their last name (eval/psnr, gen/cfg_scale=3/class_accuracy):
# the frontier needs the direction.
HIGHER_IS_BETTER = {"psnr", "ssim", "class_accuracy", "inception_score"}
# Generator families whose attention is masked (causal, block-causal). Their records written
# before `masked_attention` counted the hidden pairs too: no FLOPs in the table until `vitok eval`
# recounts them.
MASKED_FAMILIES = ("llamagen", "var", "infinity")


def higher_is_better(metric: str) -> bool:
  return metric.rsplit("/", 1)[-1] in HIGHER_IS_BETTER


def _config_value(config: dict, path: str):
  node = config
  for name in path.split("."):
    if not isinstance(node, dict) or name not in node:
      return None
    node = node[name]
  return node


def _row(record: dict, run_id: str, status: str, swept: Sequence[str], point: dict,
         config: dict | None = None) -> dict:
  """One table row. A generator's record names its frozen tokenizer: its E and c are that
  tokenizer's, and the row says which tokenizer (workdir name, bottleneck) and family. Swept
  values not in `point` come from `config` (default: the record's)."""
  params = record.get("params", {})
  flops = record.get("flops_per_example", {})
  seen = record.get("examples_seen")
  row = {"id": run_id, "status": status}
  for key in swept:
    value = point.get(key, _config_value(
        record.get("config", {}) if config is None else config, key))
    row[key] = "x".join(map(str, value)) if isinstance(value, (list, tuple)) else value
  tok = record.get("tokenizer") if record.get("kind") == "generator" else None
  if tok:
    row.update(family=record.get("family"), tokenizer=os.path.basename(tok["workdir"]),
               bottleneck=tok["bottleneck"])
  row.update({f"params_{k}": params.get(k) for k in ("encoder", "decoder", "bottleneck", "total")})
  measured = dict(
      E=(tok or record).get("E"), c=(tok or record).get("c"),
      code_bits=(tok or record).get("code_bits"),
      tokens_per_example=record.get("tokens_per_example"),
      flops_forward=flops.get("forward", flops.get("forward_xla")), flops_train=flops.get("train"),
      compute=flops["train"] * seen if flops.get("train") and seen else None, examples_seen=seen,
      tokens_seen=record["tokens_per_example"] * seen if seen and record.get(
          "tokens_per_example") else None,
      steps=record.get("steps"), wall_time_s=record.get("wall_time_s"))
  # A swept column (e.g. c) keeps its swept value in rows without a record (pending, failed).
  row.update({k: v for k, v in measured.items() if v is not None or k not in swept})
  if tok and flops and "masked_attention" not in flops and record.get("family") in MASKED_FAMILIES:
    row.update(flops_forward=None, flops_train=None, compute=None, error=[
        f"FLOPs of an older record count the attention pairs its masks hide; `vitok eval "
        f"--workdir {record.get('workdir', run_id)}` recounts them"])
  metrics = record.get("metrics", {})
  for name in sorted(set(METRICS) | set(metrics)):
    row[name] = metrics.get(name)
  bad = sorted(k for k, v in metrics.items()
               if not isinstance(v, (int, float)) or not math.isfinite(v))
  if status == sweep_lib.DONE and bad:
    row["error"] = [f"non-finite {', '.join(bad)}", *row.get("error", [])]
    if set(bad) & set(DIVERGENCE_METRICS):
      row["status"] = sweep_lib.DIVERGED
  return row


def gather(sweep_dir: str, max_attempts: int | None = None) -> list[dict]:
  """Table rows for every run of a sweep directory (or any directory of run dirs: those with a
  record, a config.json or a sweep status, so that failed and unfinished runs are rows too).

  max_attempts (when a run without a record counts as failed) defaults to the one the sweep's
  manifest records, else 2.
  """
  manifest_path = os.path.join(sweep_dir, sweep_lib.MANIFEST)
  manifest = {}
  if os.path.exists(manifest_path):
    manifest = sweep_lib.read_manifest(sweep_dir)
    entries = [(run["id"], os.path.join(sweep_dir, "runs", run["id"]), run["point"])
               for run in manifest["runs"]]
    swept = manifest.get("swept", [])
  else:  # Plain directories of runs: the swept keys are the config fields that differ.
    dirs = sorted({os.path.dirname(p) for name in ("record.json", "config.json", sweep_lib.STATUS)
                   for p in glob.glob(os.path.join(sweep_dir, "**", name), recursive=True)})
    entries = [(os.path.relpath(d, sweep_dir), d, {}) for d in dirs]
    swept = _varying_fields([_run_config(d) for d in dirs])
  max_attempts = max_attempts or manifest.get("max_attempts", 2)
  rows = []
  for run_id, workdir, point in entries:
    status = sweep_lib.run_status(workdir, max_attempts)
    record = _read(os.path.join(workdir, "record.json")) if status == sweep_lib.DONE else {}
    row = _row(record, run_id, status, swept, point,
               config=record.get("config") if record else _run_config(workdir))
    if status in (sweep_lib.FAILED, sweep_lib.DIVERGED):
      row["error"] = sweep_lib.read_status(workdir).get("error", "").strip().splitlines()[-1:]
    rows.append(row)
  return rows


def _run_config(workdir: str) -> dict:
  """The config of a run dir as its record holds it, else its config.json, else {}."""
  for name, read in (("record.json", lambda p: _read(p).get("config", {})),
                     ("config.json", _read)):
    if os.path.exists(path := os.path.join(workdir, name)):
      return read(path)
  return {}


def _read(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _varying_fields(configs: Sequence[dict], prefix: str = "") -> list[str]:
  """Dotted config paths whose values differ across `configs` (e.g. "model.channels"); a section
  some configs lack (a generator's `sample` beside tokenizers) is compared field by field too."""
  keys = sorted({k for c in configs for k in c})
  out = []
  for key in keys:
    values = [c.get(key) for c in configs]
    if any(isinstance(v, dict) for v in values) and all(isinstance(v, (dict, type(None)))
                                                        for v in values):
      out += _varying_fields([v or {} for v in values], f"{prefix}{key}.")
    elif len({json.dumps(v, sort_keys=True) for v in values}) > 1 and key != "variant":
      out.append(prefix + key)
  return out


def columns(rows: Sequence[dict]) -> list[str]:
  """Every key of the rows in first-seen order, without columns that are empty in every row."""
  out = []
  for row in rows:
    out += [k for k in row if k not in out and k != "error"]
  return [k for k in out if k in ("id", "status") or any(r.get(k) is not None for r in rows)]


def write_csv(rows: Sequence[dict], path: str) -> str:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return path


def _format(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, int) and abs(value) >= 10**6:
    return f"{value:.3g}"
  return str(value)


def to_markdown(rows: Sequence[dict], keep: Sequence[str] | None = None) -> str:
  """A GitHub Markdown table of `rows` (all columns, or those in `keep`)."""
  names = [c for c in columns(rows) if keep is None or c in keep]
  lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
  lines += ["| " + " | ".join(_format(row.get(c)) for c in names) + " |" for row in rows]
  return "\n".join(lines)


def unlisted_runs(sweep_dir: str) -> list[str]:
  """Finished runs under SWEEP_DIR/runs that the sweep's manifest does not list (it was expanded
  again with other axes since): `gather` leaves them out of the table and the fits."""
  if not os.path.exists(os.path.join(sweep_dir, sweep_lib.MANIFEST)):
    return []
  listed = {run["id"] for run in sweep_lib.read_manifest(sweep_dir)["runs"]}
  found = glob.glob(os.path.join(sweep_dir, "runs", "*", "record.json"))
  return sorted(set(os.path.basename(os.path.dirname(p)) for p in found) - listed)


def flags(rows: Sequence[dict]) -> list[str]:
  """One line per run that did not finish cleanly (diverged, failed, still pending, or done with
  a non-finite metric)."""
  return [f"{row['id']}: {row['status']}" + (f" ({row['error'][0]})" if row.get("error") else "")
          for row in rows if row["status"] != sweep_lib.DONE or row.get("error")]


def _columns_of_done_rows(rows: Sequence[dict], *keys: str) -> tuple[list[list[float]], list[str]]:
  """([values of each key] over the finished rows where every key is a finite positive number,
  ids of the finished rows left out): a log-space fit cannot use the others, so a run missing
  one of them is left out of that fit (and named in its result)."""
  def ok(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
  done = [r for r in rows if r["status"] == sweep_lib.DONE]
  for key in keys:  # A metric column exists once a run has finished: checked on those.
    if done and all(key not in row for row in done):
      raise ValueError(f"no column {key!r} in the results; the columns are {sorted(done[0])}")
  kept, left_out = [], []
  for r in done:
    (kept if all(ok(r.get(k)) for k in keys) else left_out).append(r)
  return [[r[k] for r in kept] for k in keys], [r["id"] for r in left_out]


def fit_rows(rows: Sequence[dict], specs: Sequence[dict], *, n_boot: int = 100) -> list[dict]:
  """Runs each fit spec on the finished rows.

  A spec is {"x": column, "y": column, "offset": bool} (single power law) or
  {"kind": "two_variable", "n": column, "d": column, "y": column} (L(N, D) with the
  compute-optimal exponents). Returns the fit results with their spec, or {"error": ...}; each
  names the finished runs it left out ("left_out": a column missing, non-finite or ≤ 0).
  """
  out = []
  for spec in specs:
    spec = dict(spec)
    left_out = []
    try:
      if spec.get("kind") == "two_variable":
        (ns, ds, ys), left_out = _columns_of_done_rows(rows, spec["n"], spec["d"], spec["y"])
        result = fit_lib.fit_two_variable(ns, ds, ys, n_boot=n_boot)
      else:
        (xs, ys), left_out = _columns_of_done_rows(rows, spec["x"], spec["y"])
        result = fit_lib.fit_power_law(xs, ys, offset=spec.get("offset", False))
        result["x_values"], result["y_values"] = xs, ys
    except (ValueError, TypeError, KeyError) as e:
      result = {"error": f"{type(e).__name__}: {e}"}
    out.append({"spec": spec, **result, "left_out": left_out})
  return out


def describe_spec(spec: dict) -> str:
  """A fit spec as the `vitok fit` flags that name it: "--x E --y eval/l2 --offset" (and any other
  key it holds, which no flag sets)."""
  if spec.get("kind") == "two_variable":
    text, named = f"--two_variable {spec['n']},{spec['d']} --y {spec['y']}", {"kind", "n", "d", "y"}
  else:
    text = f"--x {spec['x']} --y {spec['y']}" + (" --offset" if spec.get("offset") else "")
    named = {"x", "y", "offset"}
  return text + "".join(f" ({k}={v!r})" for k, v in spec.items() if k not in named)


def describe_fit(result: dict) -> str:
  """"eval/psnr = 9.1·E^0.094 (b 95% CI [0.08, 0.11], R² 0.98, n=5)"."""
  spec = result["spec"]
  if "error" in result:
    return f"{spec}: fit failed: {result['error']}"
  left_out = result.get("left_out")
  left_text = f"; left out: {', '.join(left_out)}" if left_out else ""
  warnings = "".join(f"\n  WARNING: {w}" for w in result.get("warnings", ()))
  if spec.get("kind") == "two_variable":
    return (f"{spec['y']} = {result['E']:.3g} + {result['A']:.3g}/N^{result['alpha']:.3f} + "
            f"{result['B']:.3g}/D^{result['beta']:.3f} (N={spec['n']}, D={spec['d']}, "
            f"R² {result['r2']:.3f}{left_text}); N* ∝ C^{result['a_exponent']:.3f}{warnings}")
  ci = result["ci"]["b"]
  ci_text = f"b {100 * result['ci_level']:.0f}% CI [{_format(ci[0])}, {_format(ci[1])}], "
  offset = f"{result['c']:.4g} + " if "c" in result else ""
  return (f"{spec['y']} = {offset}{result['a']:.4g}·{spec['x']}^{result['b']:.4g} "
          f"({ci_text}R² {result['r2']:.3f}, n={result['n']}{left_text}){warnings}")


def stored_specs(path: str) -> list[dict]:
  """The fit specs of the fits.json at `path`, in order (none when it does not exist)."""
  return [result["spec"] for result in _read(path)] if os.path.exists(path) else []


def save_fits(fit_results: Sequence[dict], path: str) -> list[dict]:
  """Writes `fit_results` as the JSON list at `path`, replacing what was there: every fit in the
  file is over the same rows. report() refits the stored specs too, so `vitok fit --x … --y …`
  calls still add up. Returns the list."""
  with open(path, "w") as f:  # Strict JSON: a value that is not finite (no interval) is null.
    json.dump(_finite_or_none(list(fit_results)), f, indent=1, default=float, allow_nan=False)
  return list(fit_results)


def _finite_or_none(node):
  if isinstance(node, dict):
    return {k: _finite_or_none(v) for k, v in node.items()}
  if isinstance(node, (list, tuple)):
    return [_finite_or_none(v) for v in node]
  if isinstance(node, numbers.Real) and not isinstance(node, int) and not math.isfinite(node):
    return None
  return node


def _spec_key(spec: dict) -> str:
  """A fit spec as sorted JSON, a power law's offset defaulting to False."""
  defaults = {} if spec.get("kind") == "two_variable" else {"offset": False}
  return json.dumps({**defaults, **spec}, sort_keys=True)


def _unique(specs: Sequence[dict]) -> list[dict]:
  """specs without repeats (equal `_spec_key`), first occurrence first."""
  seen, out = set(), []
  for spec in specs:
    if (k := _spec_key(spec)) not in seen:
      seen.add(k)
      out.append(dict(spec))
  return out


# The fit of a sweep dir without a manifest (or one that names none).
DEFAULT_FITS = (dict(x="E", y="eval/l2"),)


def report(sweep_dir: str, *, fits: Sequence[dict] | None = None, plot: bool = True,
           n_boot: int = 100, max_attempts: int | None = None,
           rows: Sequence[dict] | None = None, drop: Sequence[dict] = ()) -> dict:
  """Writes results.csv/.md, fits.json and plots/ into sweep_dir; returns {"rows", "fits",
  "plots", "failed_new", "dropped"}.

  The fits are those stored in sweep_dir/fits.json, then `fits` (default: the sweep manifest's),
  all fitted again on the current rows (`gather(sweep_dir, max_attempts)` unless given), so
  fits.json never mixes fits over different sets of runs. A fit given in `fits` that is not stored
  yet and fails is not stored (`failed_new`), so it does not fail again on every later report;
  the stored and the manifest's fits are kept, failed or not (more finished runs may mend them).
  The manifest's heatmap and frontier specs are plotted too. `drop`: stored fits to remove first
  (ConfigError, before anything is written, for one not stored or one of the manifest's, which
  every report would add back).
  """
  manifest = (sweep_lib.read_manifest(sweep_dir)
              if os.path.exists(os.path.join(sweep_dir, sweep_lib.MANIFEST)) else {})
  path = os.path.join(sweep_dir, "fits.json")
  own = manifest.get("fits", DEFAULT_FITS)
  stored = stored_specs(path)
  dropped = _unique(drop)
  for spec in dropped:
    if _spec_key(spec) not in {_spec_key(s) for s in stored}:
      raise ConfigError(f"vitok fit --drop {describe_spec(spec)}: no such fit in {path}; stored: "
                        + ("; ".join(describe_spec(s) for s in stored) or "none"))
    if _spec_key(spec) in {_spec_key(s) for s in own}:
      raise ConfigError(f"vitok fit --drop {describe_spec(spec)}: it is one of the sweep's own "
                        f"fits (its manifest's, or {describe_spec(DEFAULT_FITS[0])} without one), "
                        "which every report fits again")
  stored = [s for s in stored if _spec_key(s) not in {_spec_key(d) for d in dropped}]
  rows = gather(sweep_dir, max_attempts) if rows is None else rows
  write_csv(rows, os.path.join(sweep_dir, "results.csv"))
  with open(os.path.join(sweep_dir, "results.md"), "w") as f:
    f.write(to_markdown(rows) + "\n")
  requested = fits if fits is not None else own
  specs = _unique([*stored, *requested])
  fit_results = fit_rows(rows, specs, n_boot=n_boot)
  kept = {_spec_key(s) for s in stored} | (
      set() if fits is not None else {_spec_key(s) for s in requested})
  failed_new = [r for r in fit_results if "error" in r and _spec_key(r["spec"]) not in kept]
  fit_results = [r for r in fit_results if not any(r is f for f in failed_new)]
  save_fits(fit_results, path)
  paths = []
  if plot:
    from vitok_jax.scaling import plots
    for spec in dropped:  # Its plot goes too (two-variable fits have none).
      if spec.get("kind") != "two_variable":
        for ext in ("png", "svg"):
          stale = os.path.join(sweep_dir, "plots", f"{plots.fit_plot_name(spec)}.{ext}")
          if os.path.exists(stale):
            os.remove(stale)
    paths = plots.plot_sweep(rows, fit_results, os.path.join(sweep_dir, "plots"),
                             heatmap=manifest.get("heatmap"), frontier=manifest.get("frontier"))
  return {"rows": rows, "fits": fit_results, "plots": paths, "failed_new": failed_new,
          "dropped": dropped}
