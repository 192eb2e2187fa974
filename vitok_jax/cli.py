"""The `vitok` command: one entry point, one subcommand per job.

  vitok train   --config vitok:"Mu-Mi/4,c=16,data=mnist" --workdir runs/mnist [--config.x.y=value ...]
  vitok train   --config generator:"dit/Mi,tokenizer=runs/mnist" --workdir runs/mnist_dit
  vitok eval    --workdir runs/mnist   (a generator run: --sample cfg_scale=3 re-scores its samples)
  vitok sample  --workdir runs/mnist_dit --num_samples 100
  vitok tokenize --workdir runs/mnist_vq --split train --out runs/mnist_vq/store_train.npz
  vitok compile --config vitok:"L-L/16,c=16,res=256,data=imagenet" --devices 64 --device_memory_gb 16
  vitok launch  local|slurm|tpu --config ... --workdir ... [--processes N ...] [--dry_run]
  vitok sweep   quickstart --sweep_dir runs/quickstart [--parallel N] [--target local|slurm|tpu]
  vitok results runs/quickstart
  vitok fit     runs/quickstart [--x E --y eval/psnr [--offset]] [--drop]

--config takes NAME:VARIANT (a file in configs/) or PATH.py:VARIANT; --config.a.b=v overrides a field.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import sys
import traceback
from typing import Any

from absl import flags
from ml_collections import config_flags

from vitok_jax import config_lib
from vitok_jax.errors import ConfigError, DataError, TrainingDiverged

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "NAME:VARIANT or PATH.py:VARIANT, e.g. vitok:'Mu-Mi/4,c=16,data=mnist'.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, images, record.")
flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs "
                    "(or VITOK_COORDINATOR); SLURM and TPU pods are detected without it.")
flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
flags.DEFINE_enum("distributed", "detect", ["detect", "auto", "off"],
                  "detect: coordinator flags/env or a SLURM job; auto: jax.distributed.initialize() "
                  "with jax's own detection (TPU pods); off: single process.")
flags.DEFINE_string("compilation_cache", os.environ.get("VITOK_COMPILATION_CACHE", ""),
                    "Persistent XLA compilation cache directory shared across runs.")
flags.DEFINE_list("metrics", [], "eval: dataset-level metrics to add, e.g. fid_mnist,lpips,rfid "
                  "(weights from config.eval.*; the MNIST classifier is trained once and cached).")
flags.DEFINE_string("sample", "", "eval / sample of a generator run: config.sample overrides k=v, "
                    "e.g. cfg_scale=3,num_steps=20 or few_steps=(1,2); eval tags its metrics "
                    "gen/cfg_scale=3/...")
flags.DEFINE_integer("num_samples", 100, "sample: how many (labels cycle over the classes).")
flags.DEFINE_string("out", "", "sample: PNG path; tokenize: npz path (default in --workdir).")
flags.DEFINE_string("split", "train", "tokenize: the data split to tokenize.")
flags.DEFINE_integer("max_examples", 0, "tokenize: stop after this many examples (0 = all).")
flags.DEFINE_integer("devices", 0, "compile: fake CPU devices to compile for (0 = this machine's).")
flags.DEFINE_float("device_memory_gb", 0.0, "compile: memory per device to check the config "
                   "against (0 = skip), e.g. 16 for TPU v5e, 80 for H100.")
# sweep / results / fit.
flags.DEFINE_string("sweep_dir", None, "sweep: where the sweep lives (default runs/SWEEP_NAME).")
flags.DEFINE_integer("parallel", None, "sweep: runs at once on this machine (default: the sweep's); "
                     "on a GPU machine each gets an equal share of the GPUs.")
flags.DEFINE_integer("max_attempts", None, "sweep: tries per run before it counts as failed "
                     "(default: the sweep's); a re-run with a larger value retries failed runs. "
                     "results/fit: default the value the sweep directory's manifest records.")
flags.DEFINE_enum("target", "local", ["local", "slurm", "tpu"], "sweep: run here, write an sbatch "
                  "job array (SWEEP_DIR/sweep.sbatch) or a script running the runs in turn on one "
                  "TPU pod (SWEEP_DIR/sweep_tpu.sh; SWEEP_DIR on a file system the workers mount).")
flags.DEFINE_bool("dry_run", False, "sweep: list the runs and their status, run nothing.")
flags.DEFINE_list("job", [], "sweep --target=slurm/tpu: JobSpec fields as k=v, e.g. "
                  "partition=gpu,gpus_per_node=8,time=12:00:00 or "
                  "tpu_name=...,zone=...,accelerator_type=...,repo_url=...,repo_ref=...")
flags.DEFINE_string("x", None, "fit: column on the x axis (e.g. E, params_total, compute).")
flags.DEFINE_string("y", None, "fit: metric column (e.g. eval/psnr, eval/l2).")
flags.DEFINE_bool("offset", False, "fit: also fit an irreducible term, y = c + a·x^b.")
flags.DEFINE_string("two_variable", None, "fit: N,D columns for L(N, D) = E + A/N^α + B/D^β with "
                    "--y as L, e.g. params_total,tokens_seen.")
flags.DEFINE_bool("drop", False, "fit: remove the fit named by --x/--y[/--offset] or "
                  "--two_variable from fits.json instead of adding it.")
flags.DEFINE_integer("n_boot", 100, "fit: bootstrap resamples for the confidence intervals of "
                     "the two-variable fit L(N, D) (a single power law has t intervals).")

DEFAULT_CONFIG = "vitok"


def _cmd_train(workdir: str) -> int:
  """Train a tokenizer or a generator from --config into --workdir (resumes from checkpoints).

  Without --config: the config of the run already in --workdir, else the vitok config's default.
  """
  config = _CONFIG.value
  if config.get("kind") == "generator":
    from vitok_jax.train import train_generator
    record = train_generator.train(config, workdir)
    keys = ("workdir", "metrics", "params", "tokenizer")
  else:
    from vitok_jax.train import train_tokenizer
    record = train_tokenizer.train(config, workdir)
    keys = ("workdir", "metrics", "E", "params")
  if record is not None:
    print(json.dumps({k: record[k] for k in keys}, indent=1))
  return 0


def _check_out(path: str, suffixes: tuple[str, ...]) -> None:
  """Raises ConfigError, before any work, for an --out that cannot take the file: a directory,
  another file type, or a directory that cannot be made or written."""
  if not path:
    return
  if os.path.isdir(path):
    raise ConfigError(f"--out={path} is a directory; give a file, e.g. "
                      f"{os.path.join(path, 'out' + suffixes[0])}")
  if not path.lower().endswith(suffixes):
    raise ConfigError(f"--out={path} must end in {' or '.join(suffixes)}")
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--out={path}: cannot make its directory ({e})") from None
  if not os.access(parent, os.W_OK):
    raise ConfigError(f"--out={path}: its directory {parent} is not writable")


def _cmd_sample(workdir: str) -> int:
  """Class-conditional samples of a generator run --workdir: a PNG grid (--out, --sample k=v).

  --sample overrides config.sample, e.g. cfg_scale=3.
  """
  from vitok_jax.train import train_generator
  _check_out(FLAGS.out, (".png", ".jpg", ".jpeg"))
  overrides = _sample_overrides(FLAGS.sample)
  print(train_generator.sample_workdir(workdir, FLAGS.num_samples, FLAGS.out, **overrides))
  return 0


def _cmd_tokenize(workdir: str) -> int:
  """Tokenize a --split of a tokenizer run's data into an npz store (codes and/or latents)."""
  from vitok_jax.train import codes
  if FLAGS.max_examples < 0:
    raise ConfigError(f"--max_examples={FLAGS.max_examples} must be >= 0 (0 = the whole split)")
  _check_out(FLAGS.out, (".npz",))
  out = FLAGS.out or os.path.join(workdir, f"store_{FLAGS.split}.npz")
  print(codes.tokenize_workdir(workdir, out, split=FLAGS.split, max_examples=FLAGS.max_examples))
  return 0


def _cmd_eval(workdir: str) -> int:
  """Evaluate the latest checkpoint of --workdir on its held-out split; updates record.json.

  A generator run is re-sampled and scored, with --sample overrides (e.g. cfg_scale=3). Without
  --config the run's own config is used, so --config.eval.x=v overrides apply to it.
  """
  from vitok_jax.train import train_generator, train_tokenizer
  config = _CONFIG.value  # The run's own unless --config named another.
  if config_lib.read_config(workdir).get("kind") == "generator":
    if FLAGS.metrics:
      raise ConfigError(f"--metrics={','.join(FLAGS.metrics)} applies to tokenizer runs; a "
                        "generator run reports its gen/* metrics (gFID with "
                        "--config.eval.inception_weights=PATH); drop --metrics")
    if config is not None:  # Sample settings go in --sample, which tags the metrics.
      from vitok_jax.train import loop
      loop.check_evaluated_as_trained(workdir, config, fixed=("sample",))
    overrides = _sample_overrides(FLAGS.sample)
    print(json.dumps(train_generator.evaluate_workdir(
        workdir, overrides, eval_config=None if config is None else config.eval), indent=1))
    return 0
  if FLAGS.sample:
    raise ConfigError(f"--sample={FLAGS.sample} applies to generator runs; {workdir} is a "
                      "tokenizer run (its eval settings: --config.eval.x=v, --metrics)")
  metrics = train_tokenizer.evaluate_workdir(workdir, config, tuple(FLAGS.metrics))
  print(json.dumps(metrics, indent=1))
  return 0


def _sample_overrides(text: str) -> dict[str, Any]:
  """"k=v,k2=v2" -> {k: v, k2: v2}; a comma inside brackets stays in its value: few_steps=(1,2)."""
  items, depth, start = [], 0, 0
  for i, char in enumerate(text):
    depth += (char in "([{") - (char in ")]}")
    if char == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
  items.append(text[start:])
  return dict(_parse_value(item.strip()) for item in items if item.strip())


def _parse_value(item: str) -> tuple[str, Any]:
  """"key=value" -> (key, the value as a Python literal when it is one, else the string)."""
  key, sep, text = item.partition("=")
  if not sep:
    raise ConfigError(f"--sample {item!r}: use key=value, e.g. cfg_scale=3")
  try:
    return key, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return key, text


def _cmd_compile(workdir: str) -> int:
  """Compile the train step for a mesh without running it; report per-device memory (AOT)."""
  del workdir
  from vitok_jax.parallel import mesh as mesh_lib
  from vitok_jax.train import train_tokenizer
  config = _CONFIG.value
  if FLAGS.device_memory_gb < 0:
    raise ConfigError(f"--device_memory_gb={FLAGS.device_memory_gb:g}: pass the memory of one "
                      "device in GiB (e.g. 80 for an H100), or 0 to skip the check")
  if config.get("kind") == "generator":
    raise ConfigError("vitok compile takes tokenizer configs (vitok:VARIANT); a generator's "
                      "memory shows in its run (`vitok train --config generator:...`)")
  # Fake devices are one process: a multi-host mesh (dcn_*) is laid out in one grid.
  mesh = mesh_lib.flat_mesh(config.mesh) if FLAGS.devices else mesh_lib.make_mesh(config.mesh)
  report = train_tokenizer.compile_train_step(config, mesh)
  report["variant"] = config.variant
  if FLAGS.device_memory_gb:
    report["device_memory_bytes"] = int(FLAGS.device_memory_gb * 2**30)
    report["fits"] = report["per_device_bytes"] <= report["device_memory_bytes"]
  print(json.dumps(report, indent=1))
  gib = report["per_device_bytes"] / 2**30
  verdict = "" if "fits" not in report else (
      "  fits" if report["fits"] else f"  DOES NOT FIT in {FLAGS.device_memory_gb:g} GiB per device")
  print(f"{config.variant}: {gib:.2f} GiB per device on mesh {report['mesh']}{verdict}")
  return 0 if report.get("fits", True) else 3


def _cmd_launch(argv: list[str]) -> int:
  """Launch a job on local processes, SLURM or a TPU pod (`vitok launch TARGET --help`)."""
  from vitok_jax.launch import launch_args
  return launch_args.main(argv)


def _cmd_sweep(args: list[str]) -> int:
  """Run a sweep (configs/sweeps/NAME[:ARG]), skipping finished runs; then results + fit.

  Interrupted runs resume, failed ones are retried up to --max_attempts.
  """
  from vitok_jax.scaling import sweep as sweep_lib
  if len(args) != 1:
    raise ConfigError(f"usage: vitok sweep SWEEP [--sweep_dir DIR] (SWEEP: one of "
                      f"{_sweep_names()} in configs/sweeps/, or PATH.py[:ARG])")
  spec = args[0]
  name = spec.partition(":")[0]
  if not name.endswith(".py") and not (SWEEPS_DIR / f"{name}.py").exists():
    raise ConfigError(f"no sweep {name!r} in configs/sweeps/: use one of {_sweep_names()} "
                      f"(NAME or NAME:ARG), or PATH.py[:ARG]")
  sweep = sweep_lib.load(spec)
  sweep_dir = FLAGS.sweep_dir or os.path.join("runs", sweep.get("name", "sweep"))
  config_lib.check_workdir(sweep_dir, "--sweep_dir")  # Not gs://..., on any target.
  sweep_lib.check_sweep_dir(sweep, sweep_dir)
  job = _job_fields(sweep, spec, sweep_dir)
  max_attempts = FLAGS.max_attempts if FLAGS.max_attempts is not None else sweep.get(
      "max_attempts", 2)
  if max_attempts < 1:
    raise ConfigError(f"--max_attempts={max_attempts}: each run needs at least one try")
  runs = sweep_lib.expand(sweep, sweep_dir)
  if FLAGS.dry_run:  # Reads the sweep directory, writes nothing.
    for run in runs:
      print(f"{sweep_lib.run_status(run.workdir, max_attempts):9s} {run.id}  {run.point}")
    return 0
  if FLAGS.target == "slurm":  # Each array task gets the job's GPUs.
    from vitok_jax.launch import jobspec
    for run in runs:
      jobspec.check_layout(run.config, nodes=job.get("nodes", 1),
                           gpus_per_node=job.get("gpus_per_node", 0),
                           processes_per_node=job.get("processes_per_node", 1))
  if FLAGS.target == "tpu":  # Each run gets the whole pod.
    from vitok_jax.launch import tpu
    for run in runs:
      tpu.check_layout(run.config, job["accelerator_type"])
  if FLAGS.target == "local":  # Its generators' tokenizers are here (a cluster's may not be).
    from vitok_jax.train import codes  # pylint: disable=g-import-not-at-top
    for tokenizer in sorted({run.config.tokenizer for run in runs
                             if run.config.get("kind") == "generator"}):
      codes.check_tokenizer_run(tokenizer)
  parallel = FLAGS.parallel if FLAGS.parallel is not None else sweep.get("parallel", 1)
  if FLAGS.target == "local" and parallel < 1:  # Before the sweep directory is written.
    raise ConfigError(f"--parallel={parallel}: run at least one run at a time (--parallel >= 1)")
  sweep_lib.prepare(sweep, sweep_dir, spec, max_attempts=max_attempts, runs=runs)
  status = {run.id: sweep_lib.run_status(run.workdir, max_attempts) for run in runs}
  pending = [run for run in runs if status[run.id] == sweep_lib.PENDING]
  if FLAGS.target != "local" and not pending:
    print(f"none of the {len(runs)} runs is left to start ({sweep_lib.count_statuses(status)}): "
          f"`vitok results {sweep_dir}`")
    return 0
  if FLAGS.target == "slurm":
    path = sweep_lib.write_slurm_array(pending, sweep_dir, **job)
    print(f"{len(pending)} of {len(runs)} runs to do: sbatch {path}\n"
          f"(then `vitok results {sweep_dir}` and `vitok fit {sweep_dir}`)")
    return 0
  if FLAGS.target == "tpu":
    path = sweep_lib.write_tpu_script(pending, sweep_dir, **job)
    print(f"{len(pending)} of {len(runs)} runs to do, in turn on TPU pod {job.get('tpu_name')}: "
          f"bash {path}\n({os.path.abspath(sweep_dir)} must be mounted at that path on every "
          f"worker; then `vitok results {sweep_dir}` and `vitok fit {sweep_dir}`)")
    return 0
  try:
    status = sweep_lib.run_local(runs, sweep_dir, max_attempts=max_attempts, parallel=parallel)
  except KeyboardInterrupt:
    print(f"vitok sweep: interrupted; `vitok sweep {spec} --sweep_dir={sweep_dir}` resumes",
          file=sys.stderr)
    return 130
  code = _cmd_results([sweep_dir])
  return code or _cmd_fit([sweep_dir]) or (0 if all(
      s == sweep_lib.DONE for s in status.values()) else 1)


SWEEPS_DIR = config_lib.CONFIGS_DIR / "sweeps"
# JobSpec fields a sweep sets for each run itself; --job cannot set them.
_SWEEP_JOB_FIELDS = ("config", "workdir", "command", "compilation_cache", "overrides", "env")
_TPU_JOB_FIELDS = ("tpu_name", "zone", "accelerator_type")


def _sweep_names() -> list[str]:
  """The sweeps `vitok sweep NAME` finds: configs/sweeps/*.py but the private _*.py."""
  return sorted(p.stem for p in SWEEPS_DIR.glob("*.py") if not p.stem.startswith("_"))


def _job_fields(sweep, spec: str, sweep_dir: str) -> dict[str, Any]:
  """JobSpec fields for --target=slurm/tpu: the sweep's `slurm` ones, then --job k=v; checked."""
  from vitok_jax.launch import jobspec
  if FLAGS.target == "local":
    if FLAGS.job:
      raise ConfigError("--job sets the fields of a SLURM or TPU job; pass it with "
                        "--target=slurm or --target=tpu (a local sweep takes --parallel)")
    return {}
  fields = jobspec.JobSpec.__dataclass_fields__
  settable = [key for key in fields if key not in _SWEEP_JOB_FIELDS]
  if FLAGS.target == "slurm":  # The job array's limit on tasks running at once (0: none).
    settable.append("max_parallel")
  given = [(f"sweep.slurm {key}={value!r}", key, value) for key, value in (
      dict(sweep.get("slurm", None) or {}) if FLAGS.target == "slurm" else {}).items()]
  for item in FLAGS.job:
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"--job {item!r}: use key=value with a key from {settable}")
    given.append((f"--job {item!r}", key, value))
  job = {}
  for where, key, value in given:  # The sweep file's, then --job's (which win).
    if key not in settable:
      raise ConfigError(f"{where}: {key!r} is no job field; use one from {settable}")
    integer = key == "max_parallel" or fields[key].type == "int"
    try:
      job[key] = int(value) if integer else str(value)
    except (TypeError, ValueError):
      raise ConfigError(f"{where}: {key} takes an integer") from None
  missing = [key for key in _TPU_JOB_FIELDS if FLAGS.target == "tpu" and not job.get(key)]
  if missing:
    raise ConfigError(f"--target=tpu needs --job=tpu_name=NAME,zone=ZONE,accelerator_type=TYPE; "
                      f"missing {missing}")
  if job.get("max_parallel", 0) < 0:
    raise ConfigError(f"--job max_parallel={job['max_parallel']}: must be >= 0 (0: no limit)")
  # Raises ConfigError for bad values.
  checked = jobspec.JobSpec(config=spec, workdir=sweep_dir,
                            **{k: v for k, v in job.items() if k != "max_parallel"})
  if FLAGS.target == "tpu":  # An accelerator without a known runtime: before anything is written.
    from vitok_jax.launch import tpu  # pylint: disable=g-import-not-at-top
    tpu.runtime_version(checked)
  return job


def _check_sweep_dir(sweep_dir: str) -> None:
  if not os.path.isdir(sweep_dir):
    raise ConfigError(f"{sweep_dir} is not a directory: pass a sweep directory (e.g. "
                      "runs/quickstart, written by `vitok sweep quickstart`) or a directory of "
                      "runs")


def _gather_runs(sweep_dir: str, finished: bool = False) -> list[dict]:
  """The results rows of sweep_dir's runs; ConfigError if it holds none (with `finished`, none
  finished), as there would be nothing to table or fit."""
  from vitok_jax.scaling import results, sweep as sweep_lib
  _check_sweep_dir(sweep_dir)
  rows = results.gather(sweep_dir, FLAGS.max_attempts)
  if not rows:
    raise ConfigError(f"{sweep_dir} holds no runs (no {sweep_lib.MANIFEST} and no record.json "
                      "under it): run `vitok sweep NAME --sweep_dir DIR` first, or pass a sweep "
                      "directory such as runs/quickstart")
  if finished and not any(row["status"] == sweep_lib.DONE for row in rows):
    statuses = sorted({row["status"] for row in rows})
    raise ConfigError(f"none of the {len(rows)} runs of {sweep_dir} has finished ({statuses}): "
                      f"nothing to fit yet; `vitok sweep` finishes them")
  return rows


def _cmd_results(args: list[str]) -> int:
  """Gather every record.json of SWEEP_DIR into results.csv / results.md; flag failed runs."""
  from vitok_jax.scaling import results
  if len(args) != 1:
    raise ConfigError("usage: vitok results SWEEP_DIR")
  rows = _gather_runs(args[0])
  results.write_csv(rows, os.path.join(args[0], "results.csv"))
  table = results.to_markdown(rows)
  with open(os.path.join(args[0], "results.md"), "w") as f:
    f.write(table + "\n")
  print(results.to_markdown(rows, keep=[c for c in results.columns(rows) if c not in (
      "flops_forward", "params_bottleneck", "tokens_per_example")]))
  for line in results.flags(rows):
    print(f"FLAG {line}")
  if unlisted := results.unlisted_runs(args[0]):
    print(f"NOTE {len(unlisted)} finished run(s) in {args[0]}/runs are not in this sweep's "
          f"manifest (expanded again with other axes), so not in the table or fits: "
          f"{unlisted[:5]}; `vitok results {args[0]}/runs` tables every run")
  print(f"wrote {args[0]}/results.csv and results.md")
  return 0


def _cmd_sweep_book(args: list[str]) -> int:
  """Book a sweep run's trainer exit (RUN_DIR RETURNCODE [LOG]); print the run's status."""
  from vitok_jax.scaling import sweep as sweep_lib
  if len(args) not in (2, 3) or not args[1].lstrip("-").isdigit():
    raise ConfigError("usage: vitok sweep_book RUN_DIR RETURNCODE [LOG] (the SLURM and TPU "
                      "sweep scripts call it after each run)")
  print(sweep_lib.book(args[0], int(args[1]), _run_max_attempts(args[0]), *args[2:]))
  return 0


def _run_max_attempts(run_dir: str) -> int:
  """--max_attempts, else the one the manifest of the run's sweep (SWEEP_DIR/runs/ID) records."""
  from vitok_jax.scaling import sweep as sweep_lib
  if FLAGS.max_attempts is not None:
    return FLAGS.max_attempts
  sweep_dir = os.path.dirname(os.path.dirname(os.path.abspath(run_dir)))
  return sweep_lib.read_manifest(sweep_dir).get("max_attempts", 2)


def _cmd_sweep_claim(args: list[str]) -> int:
  """A SLURM array task's claim on its run (RUN_DIR JOB_ID SECONDS); prints "claimed" or a status.

  The status when the task is to train nothing: done, running elsewhere, failed.
  """
  from vitok_jax.scaling import sweep as sweep_lib
  if len(args) != 3 or not args[2].isdigit():
    raise ConfigError("usage: vitok sweep_claim RUN_DIR JOB_ID SECONDS (the SLURM sweep script "
                      "calls it as each task starts)")
  print(sweep_lib.claim_for_job(args[0], _run_max_attempts(args[0]), args[1], int(args[2])))
  return 0


def _cmd_fit(args: list[str]) -> int:
  """Power-law fits (with confidence intervals) of a sweep's results -> fits.json and plots/."""
  from vitok_jax.scaling import results
  if len(args) != 1:
    raise ConfigError("usage: vitok fit SWEEP_DIR [--x E --y eval/psnr [--offset]] [--drop]")
  rows = _gather_runs(args[0], finished=True)
  fits = None
  if FLAGS.two_variable:
    names = FLAGS.two_variable.split(",")
    if len(names) != 2 or not all(names):
      raise ConfigError(f"--two_variable={FLAGS.two_variable}: pass two columns N,D, e.g. "
                        "params_total,tokens_seen")
    fits = [dict(kind="two_variable", n=names[0], d=names[1], y=FLAGS.y or "eval/l2")]
    if not FLAGS.drop:  # A stored fit whose column has gone can still be dropped.
      _check_fit_columns(rows, args[0], {"--two_variable": names, "--y": [fits[0]["y"]]})
  elif FLAGS.x or FLAGS.y:
    fits = [dict(x=FLAGS.x or "E", y=FLAGS.y or "eval/l2", offset=FLAGS.offset)]
    if not FLAGS.drop:
      _check_fit_columns(rows, args[0], {"--x": [fits[0]["x"]], "--y": [fits[0]["y"]]})
  if FLAGS.drop and not fits:
    raise ConfigError("--drop removes one stored fit: name it with --x/--y (and --offset if it "
                      "has one) or --two_variable N,D, as it was added")
  out = results.report(args[0], fits=[] if FLAGS.drop else fits, n_boot=FLAGS.n_boot, rows=rows,
                       drop=fits if FLAGS.drop else ())
  for spec in out["dropped"]:
    print(f"dropped from fits.json: {results.describe_spec(spec)}")
  for result in out["fits"]:
    print("fit:", results.describe_fit(result))
  print(f"wrote {args[0]}/fits.json" + (f" and {len(out['plots'])} plot files in "
                                        f"{args[0]}/plots" if out["plots"] else ""))
  for result in out["failed_new"]:
    print(f"fit: {results.describe_fit(result)} (not stored in fits.json)")
  return 1 if out["failed_new"] else 0


def _check_fit_columns(rows, sweep_dir: str, flag_columns: dict[str, list[str]]) -> None:
  """Raises ConfigError for a fit column the finished runs (`rows` of sweep_dir) lack (it would be
  kept in fits.json)."""
  from vitok_jax.scaling import results
  known = [c for c in results.columns(rows) if c not in ("id", "status")]
  for flag, names in flag_columns.items():
    for name in names:
      if name not in known:
        raise ConfigError(f"{flag} {name!r} is not a column of {sweep_dir}'s results; use one of "
                          f"{known}")


# The flags each subcommand reads (launch parses its own); another of ours given to it is an error,
# not silently ignored (`vitok train --dry_run` trained).
_RUNTIME_FLAGS = ("config", "workdir", "coordinator", "num_processes", "process_id", "distributed",
                  "compilation_cache")
COMMAND_FLAGS = {
    "train": _RUNTIME_FLAGS,
    "eval": (*_RUNTIME_FLAGS, "metrics", "sample"),
    "sample": (*_RUNTIME_FLAGS, "sample", "num_samples", "out"),
    "tokenize": (*_RUNTIME_FLAGS, "out", "split", "max_examples"),
    "compile": (*(f for f in _RUNTIME_FLAGS if f != "workdir"), "devices", "device_memory_gb"),
    "sweep": ("sweep_dir", "parallel", "max_attempts", "target", "dry_run", "job",
              "x", "y", "offset", "two_variable", "n_boot"),  # Its last step is `vitok fit`.
    "results": ("max_attempts",),
    "fit": ("max_attempts", "x", "y", "offset", "two_variable", "n_boot", "drop"),
    "sweep_book": ("max_attempts",),
    "sweep_claim": ("max_attempts",),
}
# What was likely meant by a flag of another subcommand.
_FLAG_HINTS = {("sweep", "workdir"): "--sweep_dir", ("results", "workdir"): "SWEEP_DIR",
               ("fit", "workdir"): "SWEEP_DIR"}


def _check_flags(command: str) -> None:
  """ConfigError for a flag of ours that `command` does not read (config overrides included)."""
  ours = {name for names in COMMAND_FLAGS.values() for name in names}
  given = sorted({name.split(".")[0] for name in FLAGS
                  if FLAGS[name].present and name.split(".")[0] in ours})
  for name in given:
    if name not in COMMAND_FLAGS[command]:
      users = [c for c, names in COMMAND_FLAGS.items() if name in names]
      hint = _FLAG_HINTS.get((command, name))
      raise ConfigError(f"--{name} does not apply to `vitok {command}` (it is for "
                        f"{', '.join(users)})" + (f"; `vitok {command}` takes {hint}" if hint
                                                  else ""))


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "sample": _cmd_sample,
            "tokenize": _cmd_tokenize, "compile": _cmd_compile, "launch": _cmd_launch,
            "sweep": _cmd_sweep, "results": _cmd_results, "fit": _cmd_fit,
            "sweep_book": _cmd_sweep_book, "sweep_claim": _cmd_sweep_claim}
# Subcommands that take positional arguments (a sweep or sweep directory) instead of --workdir.
POSITIONAL_COMMANDS = ("sweep", "results", "fit", "sweep_book", "sweep_claim")


def _usage() -> str:  # One line per subcommand: its docstring's first.
  lines = [__doc__.strip(), "", "Subcommands:"]
  width = max(map(len, COMMANDS)) + 2
  lines += [f"  {name:{width}s}{fn.__doc__.splitlines()[0]}" for name, fn in COMMANDS.items()]
  lines += ["", "`vitok SUBCOMMAND --help` lists the flags."]
  return "\n".join(lines)


def _resolve_config_arg(argv: list[str], default: str | None) -> list[str]:
  """Rewrites --config NAME:VARIANT to the config file's absolute path; adds `default` if absent."""
  out, found = [], False
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--config" and i + 1 < len(argv):
      arg, i = f"--config={argv[i + 1]}", i + 1
    if arg.startswith("--config="):
      arg, found = "--config=" + config_lib.resolve_config_path(arg.split("=", 1)[1]), True
    out.append(arg)
    i += 1
  if not found and default:  # Before any --config.x=y override, which needs it parsed first.
    out.insert(0, "--config=" + config_lib.resolve_config_path(default))
  return out


def _run_config(argv: list[str]) -> str | None:
  """The config spec of the run in argv's --workdir (its config.json), if there is one."""
  for i, arg in enumerate(argv):
    workdir = (argv[i + 1] if arg == "--workdir" and i + 1 < len(argv) else
               arg.split("=", 1)[1] if arg.startswith("--workdir=") else None)
    path = os.path.join(workdir, "config.json") if workdir else ""
    if path and os.path.exists(path):
      try:
        with open(path) as f:
          saved = json.load(f)
      except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable run config ({e}); pass --config") from None
      if not isinstance(saved, dict) or not {"variant", "model"} <= set(saved):
        raise ConfigError(f"{path} is not the config of a vitok run (no variant / model); pass "
                          "--config, or use another --workdir")
      return f"sweeps/_run:{os.path.abspath(workdir)}"
  return None


def _fake_devices_first(argv: list[str]) -> None:
  """`--devices N` (or `--devices=N`) must reach XLA before jax starts: fake N CPU devices."""
  for i, arg in enumerate(argv):
    if arg == "--devices" and i + 1 < len(argv):
      arg = f"--devices={argv[i + 1]}"
    if arg.startswith("--devices="):
      try:
        n = int(arg.split("=", 1)[1])
      except ValueError:
        raise ConfigError(f"{arg}: pass a number of devices, e.g. --devices=64") from None
      if n < 0:
        raise ConfigError(f"{arg}: pass a number of devices >= 0 (0 = this machine's)")
      if n:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={n}").strip()


def _start_runtime() -> None:
  """Compilation cache and multi-process start-up, before any computation."""
  import jax
  from vitok_jax.parallel import distributed
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if FLAGS.distributed == "auto":
    jax.distributed.initialize()
  elif FLAGS.distributed == "detect":
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)


# Orbax reads a checkpoint's arrays in asyncio tasks; when one read fails, orbax raises and closes
# its event loop while the others are in flight. Each of them then prints its own error after the
# run has said which step failed and why: asyncio (a task's exception never retrieved) or Python (a
# coroutine collected) with TensorStore's spec, a hundred lines apiece, and TensorStore's callbacks
# that the loop is closed (unraisable errors).
_DAMAGED_READ = "Encountered error while reading array index"


def _quiet_damaged_checkpoint_reads() -> None:
  """Drops the echoes of a failed checkpoint read (`_DAMAGED_READ` errors of orbax's other reads;
  TensorStore's callbacks into its closed event loop) from asyncio's log and
  `sys.unraisablehook`, one debug line each; every other error is printed as before."""
  def echo(exc, tb=None) -> bool:
    closed_loop = (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
                   and tb is not None
                   and traceback.extract_tb(tb)[0].name == "call_soon_threadsafe")
    if closed_loop or (isinstance(exc, BaseException) and str(exc).startswith(_DAMAGED_READ)):
      logging.debug("after a failed checkpoint read: %s",
                    str(exc).split(" See full TensorStore details")[0])
      return True
    return False

  if not getattr(sys.unraisablehook, "damaged_reads", False):  # Once per process.
    unraisable_hook = sys.unraisablehook
    quiet_hook = lambda u: None if echo(u.exc_value, u.exc_traceback) else unraisable_hook(u)
    quiet_hook.damaged_reads = True
    sys.unraisablehook = quiet_hook
  asyncio_log = logging.getLogger("asyncio")
  if not any(getattr(f, "damaged_reads", False) for f in asyncio_log.filters):
    quiet = logging.Filter()
    quiet.filter = lambda record: not (record.exc_info and echo(record.exc_info[1]))
    quiet.damaged_reads = True
    asyncio_log.addFilter(quiet)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  command, rest = argv[1], argv[2:]
  if command not in COMMANDS:
    print(f"vitok: unknown subcommand {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  if command == "launch":
    return _cmd_launch(rest)
  if "--help" in rest or "-h" in rest:
    print(f"vitok {command}: {COMMANDS[command].__doc__}\n")
    print(FLAGS.get_help())
    return 0
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  _quiet_damaged_checkpoint_reads()
  try:
    _fake_devices_first(rest)
    # Without --config, train and eval take the run's own config (train resumes the run, not the
    # default into it); a new train run and compile, the default.
    named = any(arg == "--config" or arg.startswith("--config=") for arg in rest)
    default = None if named else (
        (_run_config(rest) if command in ("train", "eval") else None)
        or (DEFAULT_CONFIG if command in ("train", "compile") else None))
    # Defaults again when main() is called twice in one process (tests), also after a parse that
    # failed half-way (its flags stay `present`).
    if FLAGS.is_parsed() or any(FLAGS[name].present for name in FLAGS):
      FLAGS.unparse_flags()
    args = _resolve_config_arg(rest, default)
    try:
      positional = FLAGS([argv[0], *args])[1:]
    except (AttributeError, KeyError, flags.UnrecognizedFlagError):  # A --config.a.b=v typo?
      _check_overrides(args)
      raise
    _check_flags(command)
    if command in POSITIONAL_COMMANDS:  # Each run is its own process; nothing to start here.
      return COMMANDS[command](positional)
    _start_runtime()
    workdir = FLAGS.workdir or os.path.join("runs", "default")
    return COMMANDS[command](workdir)
  except (ConfigError, DataError, flags.Error) as e:
    print(f"vitok {command}: error: {_error_message(e)}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:  # The word is what a sweep books the run as diverged by.
    print(f"vitok {command}: error: TrainingDiverged: {e}", file=sys.stderr)
    return 3
  except KeyboardInterrupt:  # A trainer raises it once a Ctrl-C's checkpoint is saved.
    print(f"vitok {command}: interrupted; the same command resumes from the last checkpoint"
          if command == "train" else f"vitok {command}: interrupted", file=sys.stderr)
    return 130


def _error_message(error: Exception) -> str:
  """The error to show: for a flag error, the ConfigError/DataError behind it, if any.

  ml_collections wraps an error of a config file's get_config() in its traceback's text; the
  original (e.g. "unknown variant option 'foo' ...") already says what to change.
  """
  if isinstance(error, flags.Error):
    inner, seen = error, set()
    while inner is not None and id(inner) not in seen:
      seen.add(id(inner))
      if isinstance(inner, (ConfigError, DataError)) and "Traceback" not in str(inner):
        return str(inner)
      inner = inner.__cause__ or inner.__context__
  return str(error)


def _check_overrides(args: list[str]) -> None:
  """Raises ConfigError for an --config.a.b=v override whose field the --config lacks."""
  spec = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")), None)
  if spec is not None:
    config_lib.apply_overrides(
        spec, [arg for arg in args if arg.startswith("--config.") and "=" in arg])


if __name__ == "__main__":
  sys.exit(main())
