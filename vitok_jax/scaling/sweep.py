"""Sweeps: a base config plus axes, expanded to runs with stable ids, executed anywhere, resumable.

A sweep file in configs/sweeps/ defines get_config(arg) returning a ConfigDict:
  base       "vitok:Mu-Mu/4,res=32,data=mnist": the config spec every run starts from.
  axes       [("product", {key: [values]}), ("zip", {key: [values], key2: [values]}), ...];
             axes combine as a product of their own products/zips. A key without a dot is a variant
             option of the base config file (appended to its variant string, so derived fields such
             as warm-up follow); a dotted key is a config path set afterwards ("model.patch").
  filters    [fn(point) -> bool]: keep only the points every filter accepts.
  overrides  [fn(point, config) -> {path: value}]: per-point fields, e.g. steps for a compute
             budget.
  max_attempts, parallel: failed runs are retried up to max_attempts in all (a pre-emption is no
             attempt); runs executed at once (on a GPU machine each gets an equal share of GPUs).
  fits, heatmap, frontier: what `vitok fit` fits and plots (see scaling/results.py).
  slurm      JobSpec fields (partition, account, gpus_per_node, time, ...) for --target=slurm.

Layout of a sweep directory:
  sweep.json                     the manifest: spec, every run's id, label and point, analysis spec.
  compilation_cache/             one persistent XLA cache for every run (VITOK_COMPILATION_CACHE).
  runs/ID/config.json            the run's resolved config; ID = label + hash of that config.
  runs/ID/sweep_status.json      attempts, pre-emptions and the last failure; runs/ID/sweep.log
                                 its output;
  runs/ID/sweep.pid              the trainer's pid while it runs; runs/ID/sweep.lock the lock
                                 sweeps take to start or book a run.
  runs/ID/sweep.lease            a SLURM array task's claim on the run while its job lasts.
  runs/ID/record.json            written by the trainer when the run finished: the run is done.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import ml_collections

from vitok_jax import config_lib
from vitok_jax.errors import ConfigError

# `vitok train --config=RUN_CONFIG:WORKDIR` trains from the resolved config a sweep wrote there.
RUN_CONFIG = str(config_lib.CONFIGS_DIR / "sweeps" / "_run.py")
MANIFEST = "sweep.json"
STATUS = "sweep_status.json"
PID = "sweep.pid"                # Present while a sweep's trainer runs: another sweep leaves it be.
LOCK = "sweep.lock"              # flock'ed while a sweep takes or releases the run (`_claim`).
# A SLURM array task's hold on its run (`claim_for_job`): {"job", "host", "until"}; the run is
# running until the task books its exit, the job's time limit ("until") passes or squeue no
# longer lists the job (`_lease`).
LEASE = "sweep.lease"
# Statuses a run can have; "pending" includes runs interrupted part-way (they resume).
DONE, PENDING, RUNNING, FAILED, DIVERGED = "done", "pending", "running", "failed", "diverged"
# sweep_status.json of a run stopped by SIGTERM after a checkpoint (exit 0, no record.json): it is
# pending (resumes from the checkpoint) and the stop used none of its attempts.
PREEMPTED = "preempted"


@dataclasses.dataclass
class Run:
  """One point of a sweep."""
  id: str                     # label-hash; stable while the resolved config is unchanged.
  label: str                  # Human-readable swept values, e.g. "c4".
  point: dict[str, Any]       # Swept key -> value.
  config: ml_collections.ConfigDict
  workdir: str = ""


def load(spec: str) -> ml_collections.ConfigDict:
  """A sweep by name ("quickstart", a file in configs/sweeps/) or "path.py[:arg]"."""
  path, sep, arg = spec.partition(":")
  if not path.endswith(".py"):
    path = f"sweeps/{path}"
  sweep = config_lib.load_config(path + sep + arg)
  for field in ("base", "axes"):
    if field not in sweep:
      raise ConfigError(f"sweep {spec!r} has no `{field}`; see vitok_jax/scaling/sweep.py")
  return sweep


def points(axes: Sequence[tuple[str, dict[str, Sequence]]]) -> list[dict[str, Any]]:
  """The product over axes of each axis's product or zip of values, in axis order."""
  out = [{}]
  for axis in axes:
    if (not isinstance(axis, (tuple, list)) or len(axis) != 2 or not hasattr(axis[1], "items")
        or any(isinstance(v, str) or not isinstance(v, Sequence) for v in axis[1].values())):
      raise ConfigError(f"sweep axis {axis!r}: write each axis as (kind, {{key: [values]}}), "
                        "kind 'product' or 'zip', e.g. ('product', {'c': [1, 2, 4]})")
    kind, values = axis
    keys = list(values)
    if kind == "product":
      combos = list(itertools.product(*values.values()))
    elif kind == "zip":
      lengths = {key: len(v) for key, v in values.items()}
      if len(set(lengths.values())) > 1:
        raise ConfigError(f"zip axis needs equal lengths, got {lengths}")
      combos = list(zip(*values.values()))
    else:
      raise ConfigError(f"axis kind {kind!r} must be 'product' or 'zip'")
    out = [{**p, **dict(zip(keys, combo))} for p in out for combo in combos]
  return out


def set_path(config: ml_collections.ConfigDict, path: str, value) -> None:
  """config["a"]["b"] = value for path "a.b"; the field must exist."""
  node, leaf = config_lib.field_parent(config, path, f"sweep key {path!r}")
  node[leaf] = tuple(value) if isinstance(value, list) else value


def resolve(base: str, point: dict[str, Any],
            overrides: Sequence[Callable] = ()) -> ml_collections.ConfigDict:
  """The config of one point: base spec + variant options, then config paths, then overrides."""
  options = [f"{k}={v}" for k, v in point.items() if "." not in k]
  spec = base
  if options:
    spec += ("," if ":" in base and not base.endswith(":") else ":" if ":" not in base else "")
    spec += ",".join(options)
  config = config_lib.load_config(spec)
  for key, value in point.items():
    if "." in key:
      set_path(config, key, value)
  for override in overrides:
    for path, value in override(point, config).items():
      set_path(config, path, value)
  from vitok_jax import train  # The checks `vitok train` makes, on the fields set last.
  train.validate(config)
  return config


def config_hash(config: ml_collections.ConfigDict) -> str:
  """Hex digest of the resolved config (sorted JSON): equal configs, equal runs."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()


def label(point: dict[str, Any]) -> str:
  """{"c": 4, "model.patch": (8, 8)} -> "c4-patch8x8" (safe in paths and shells)."""
  parts = []
  for key, value in point.items():
    value = "x".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    parts.append(re.sub(r"[^A-Za-z0-9.]+", "_", key.split(".")[-1] + value))
  return "-".join(parts) or "run"


def _check_axes_set_fields_once(base: str, swept: set[str]) -> None:
  """ConfigError when a swept field is also set by the base's variant options (the axes would
  win), or by two swept keys: a variant option and its config path (c and model.channels)."""
  _, base_options = config_lib.split_variant(base.partition(":")[2])
  paths = config_lib.option_paths(base)
  field = lambda key: paths.get(key, key)
  clash = sorted(key for key in base_options if field(key) in {field(k) for k in swept})
  if clash:
    raise ConfigError(f"the sweep's base {base!r} sets {clash}, which its axes sweep (the axes "
                      "would win); leave them out of the base or the sweep argument")
  by_field: dict[str, list[str]] = {}
  for key in sorted(swept):
    by_field.setdefault(field(key), []).append(key)
  twice = [keys for keys in by_field.values() if len(keys) > 1]
  if twice:
    raise ConfigError(f"the sweep's axes set one field under two keys: {twice}; sweep it under one")


def expand(sweep: ml_collections.ConfigDict, sweep_dir: str = "") -> list[Run]:
  """The sweep's runs (filters applied, duplicates dropped), with workdirs under sweep_dir/runs."""
  runs, seen = [], set()
  all_points = points(sweep.axes)
  _check_axes_set_fields_once(sweep.base, {key for point in all_points for key in point})
  filters = list(sweep.get("filters", None) or ())
  overrides = list(sweep.get("overrides", None) or ())
  for point in all_points:
    if not all(keep(point) for keep in filters):
      continue
    config = resolve(sweep.base, point, overrides)
    run_id = f"{label(point)}-{config_hash(config)[:10]}"
    if run_id not in seen:
      seen.add(run_id)
      workdir = os.path.join(os.path.abspath(sweep_dir), "runs", run_id) if sweep_dir else ""
      if not workdir or not os.path.exists(os.path.join(workdir, "config.json")):  # A new run.
        from vitok_jax import train  # pylint: disable=g-import-not-at-top
        train.validate(config, new_run=True)
      runs.append(Run(run_id, label(point), point, config, workdir))
  if not runs:
    raise ConfigError("the sweep expands to no runs (check its axes and filters)")
  return runs


def analysis_spec(sweep: ml_collections.ConfigDict) -> dict:
  """The plain-data parts of a sweep that `vitok results`/`vitok fit` read back from sweep.json."""
  out = {}
  for key in ("metric", "fits", "heatmap", "frontier"):
    if key in sweep:
      value = sweep[key]
      out[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return json.loads(json.dumps(out, default=str))


def prepare(sweep: ml_collections.ConfigDict, sweep_dir: str, spec: str = "",
            max_attempts: int | None = None, runs: Sequence[Run] | None = None) -> list[Run]:
  """Expands the sweep (unless its `runs` are given), writes the manifest and every run's
  config.json; returns the runs.

  The manifest records max_attempts (default: the sweep's, else 2) for `vitok results`/`fit`.
  """
  check_sweep_dir(sweep, sweep_dir)
  runs = list(runs) if runs is not None else expand(sweep, sweep_dir)
  os.makedirs(sweep_dir, exist_ok=True)
  manifest = {"spec": spec, "name": sweep.get("name", ""), "base": sweep.base,
              "max_attempts": max_attempts or sweep.get("max_attempts", 2),
              "swept": list(dict.fromkeys(k for run in runs for k in run.point)),
              "runs": [{"id": r.id, "label": r.label, "point": r.point} for r in runs],
              **analysis_spec(sweep)}
  config_lib.write_json(os.path.join(sweep_dir, MANIFEST), manifest)
  for run in runs:
    if not os.path.exists(os.path.join(run.workdir, "config.json")):
      config_lib.save_config(run.config, run.workdir)
  return runs


def check_sweep_dir(sweep: ml_collections.ConfigDict, sweep_dir: str) -> None:
  """ConfigError when sweep_dir holds another sweep (its manifest names another): its manifest
  would be replaced and its runs dropped from the table and fits. The same sweep with other
  arguments (other axes) is fine: its earlier runs stay, listed by `results.unlisted_runs`."""
  path = os.path.join(sweep_dir, MANIFEST)
  if not os.path.exists(path):
    return
  held, name = read_manifest(sweep_dir).get("name", ""), sweep.get("name", "")
  if held and name and held != name:
    raise ConfigError(f"{sweep_dir} holds the sweep {held!r}, not {name!r}: running {name!r} there "
                      f"would replace its manifest; use another --sweep_dir (default runs/{name})")


def read_manifest(sweep_dir: str) -> dict:
  path = os.path.join(sweep_dir, MANIFEST)
  if not os.path.exists(path):
    raise ConfigError(f"{path} not found: {sweep_dir} is not a sweep directory")
  with open(path) as f:
    return json.load(f)


def read_status(workdir: str) -> dict:
  """The run's sweep bookkeeping: {"attempts", "status", "error"} (empty if never launched)."""
  path = os.path.join(workdir, STATUS)
  if not os.path.exists(path):
    return {"attempts": 0}
  with open(path) as f:
    return json.load(f)


def run_status(workdir: str, max_attempts: int) -> str:
  """done (record.json written) / running (by some sweep) / diverged / failed (out of attempts) /
  pending (to start or resume)."""
  if os.path.exists(os.path.join(workdir, "record.json")):
    return DONE
  if _alive(os.path.join(workdir, PID)) or _lease(workdir) is not None:
    return RUNNING
  return _booked_status(workdir, max_attempts)


def _lease(workdir: str) -> dict | None:
  """The run's SLURM lease while it lasts (its time is not up and, where `squeue` can tell, its
  job is still queued or running: a cancelled job frees its run), else None."""
  path = os.path.join(workdir, LEASE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    lease = json.load(f)
  return lease if lease["until"] > time.time() and not _job_gone(lease["job"]) else None


def _job_gone(job: str) -> bool:
  """Whether SLURM says job `job` is no longer queued or running; False where it cannot tell
  (no `squeue` here, or it failed)."""
  if not shutil.which("squeue"):
    return False
  try:
    out = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True,
                         text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return False
  if out.returncode == 0:
    return not out.stdout.strip()
  return "invalid job id" in out.stderr.lower()  # Gone from the controller's memory too.


def claim_for_job(workdir: str, max_attempts: int, job: str, seconds: float) -> str:
  """A SLURM array task's claim on its run as it starts (`vitok sweep_claim`): "claimed" when the
  run is pending, or held by this job (requeued); else the run's status (done, running under
  another job or sweep, failed, diverged), and the task trains nothing. So two arrays of one
  sweep directory, or an array and a local sweep, never train a run twice at once. The lease
  lasts `seconds` (the job's time limit): a job killed without booking frees the run then."""
  with _locked(workdir):
    lease, status = _lease(workdir), run_status(workdir, max_attempts)
    held = lease is not None and lease["job"] == job and status == RUNNING  # By this job.
    if status != PENDING and not held:
      return status
    config_lib.write_json(os.path.join(workdir, LEASE), {"job": job, "host": socket.gethostname(),
                                               "until": time.time() + seconds})
    return "claimed"


def _booked_status(workdir: str, max_attempts: int) -> str:
  """diverged / failed / pending from the run's sweep_status.json alone."""
  status = read_status(workdir)
  if status.get("status") == DIVERGED:
    return DIVERGED
  if status.get("status") == FAILED and status["attempts"] >= max_attempts:
    return FAILED
  return PENDING


def _process_identity(pid: int) -> dict:
  """What tells process `pid` from a later one given its number: the host, and on Linux the boot
  and the process's start time (field 22 of /proc/PID/stat, clock ticks since boot); None where
  unknown."""
  def read(path):
    try:
      with open(path) as f:
        return f.read()
    except OSError:
      return None
  stat = read(f"/proc/{pid}/stat")
  boot = read("/proc/sys/kernel/random/boot_id")
  return {"pid": pid, "host": socket.gethostname(), "boot": boot and boot.strip(),
          # After the ")" ending the command name, which may hold spaces: field 3 onwards.
          "start": stat and stat.rpartition(")")[2].split()[19]}


def _alive(pid_path: str) -> bool:
  """Whether the trainer a sweep recorded in pid_path is still running: a process of that number
  is (signal 0 only probes), and it is the one recorded, not a later one given the same number
  after a reboot or a container restart. A pid file of another host counts as alive: that host's
  sweep holds the run (delete the file if that sweep is gone)."""
  try:
    with open(pid_path) as f:
      text = f.read()
  except OSError:
    return False
  try:
    recorded = json.loads(text)
  except ValueError:
    return False
  if isinstance(recorded, int):  # A pid file written before identities were recorded.
    recorded = {"pid": recorded}
  if recorded.get("host", socket.gethostname()) != socket.gethostname():
    return True
  try:
    os.kill(recorded["pid"], 0)
  except (OSError, KeyError, TypeError):
    return False
  now = _process_identity(recorded["pid"])
  return all(recorded.get(key) in (None, now[key]) for key in ("boot", "start"))


def train_command(run: Run) -> list[str]:
  """argv that trains (or resumes) a run from the config the sweep wrote into its workdir."""
  return [sys.executable, "-m", "vitok_jax.cli", "train", f"--config={RUN_CONFIG}:{run.workdir}",
          f"--workdir={run.workdir}"]


def _log_tail(path: str, chars: int = 2000) -> str:
  with open(path, "rb") as f:
    f.seek(max(os.path.getsize(path) - chars, 0))
    return f.read().decode(errors="replace")


class _Summary:
  """One-line live summary: done / running / failed and an ETA from finished-run durations."""

  def __init__(self, total: int, parallel: int, log: Callable[[str], None]):
    self.total, self.parallel, self.log = total, parallel, log
    self.durations: list[float] = []
    self.start = time.time()

  def __call__(self, counts: dict[str, int], event: str) -> None:
    remaining = counts.get(PENDING, 0) + counts.get(RUNNING, 0)
    if self.durations and remaining:
      eta = sum(self.durations) / len(self.durations) * remaining / min(self.parallel, remaining)
      eta_text = f"ETA {_seconds(eta)}"
    else:
      eta_text = "ETA ?" if remaining else "finished"
    self.log(f"[sweep {_seconds(time.time() - self.start)}] "
             f"{counts.get(DONE, 0)}/{self.total} done, "
             f"{counts.get(RUNNING, 0)} running, {counts.get(FAILED, 0)} failed, "
             f"{counts.get(DIVERGED, 0)} diverged, {counts.get(PENDING, 0)} pending; {eta_text}"
             f"  ({event})")


def _seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes}m{seconds:02d}s"


def run_local(runs: Sequence[Run], sweep_dir: str, *, parallel: int = 1, max_attempts: int = 2,
              command: Callable[[Run], list[str]] = train_command,
              log: Callable[[str], None] = print, poll_s: float = 0.5,
              gpus: Sequence[str] | None = None) -> dict[str, str]:
  """Executes the unfinished runs as subprocesses, `parallel` at a time; returns id -> status.

  Finished runs are skipped; interrupted ones resume (the trainer restarts from its checkpoint). A
  run that fails is retried until it has used `max_attempts`, except a diverged one
  (deterministic: it would diverge again); a run pre-empted from outside (SIGTERM: it saved a
  checkpoint and exited 0 without record.json) is resumed without using an attempt. Ctrl-C /
  SIGTERM of the sweep sends SIGTERM to the running trainers, which checkpoint and exit, and the
  same call later resumes them. Every run shares one compilation cache,
  sweep_dir/compilation_cache.

  `gpus`: GPU ids (None: launch.local.visible_gpus(), none on CPU) split into `parallel` equal
  shares; each running trainer gets a free share as CUDA_VISIBLE_DEVICES. A ConfigError says so
  when `parallel` does not divide the number of GPUs.
  """
  from vitok_jax.launch import local
  if parallel < 1:
    raise ConfigError(f"parallel={parallel}: run at least one run at a time (--parallel >= 1)")
  env = dict(os.environ, VITOK_COMPILATION_CACHE=os.path.join(os.path.abspath(sweep_dir),
                                                               "compilation_cache"))
  free_gpus = local.split_gpus(local.visible_gpus(env) if gpus is None else gpus, parallel,
                               "parallel runs (--parallel)") or [None] * parallel
  status = {run.id: run_status(run.workdir, max_attempts) for run in runs}
  queue = [run for run in runs if status[run.id] == PENDING]
  summary = _Summary(len(runs), parallel, log)
  summary(count_statuses(status), f"{len(queue)} of {len(runs)} to run")
  running: dict[str, tuple[subprocess.Popen, Run, float, Any, str | None]] = {}
  previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # SLURM/`kill` stop us like Ctrl-C.
  try:
    while queue or running:
      while queue and len(running) < parallel:
        run = queue.pop(0)
        if not _claim(run.workdir, max_attempts):  # Another sweep started it meanwhile.
          status[run.id] = run_status(run.workdir, max_attempts)
          summary(count_statuses(status), f"{run.id} {status[run.id]} (another sweep)")
          continue
        share = free_gpus.pop(0)
        logfile = open(os.path.join(run.workdir, "sweep.log"), "ab")
        # A new session: a Ctrl-C in the terminal reaches only the sweep, which stops the trainers
        # with SIGTERM (their checkpoint-and-exit path) rather than killing them mid-step.
        process = subprocess.Popen(
            command(run), stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
            env=env if share is None else dict(env, CUDA_VISIBLE_DEVICES=share))
        _write_pid(run.workdir, process.pid)
        running[run.id] = (process, run, time.time(), logfile, share)
        status[run.id] = RUNNING
        summary(count_statuses(status), f"started {run.id}")
      time.sleep(poll_s)
      for run_id, (process, run, started, logfile, share) in list(running.items()):
        if process.poll() is None:
          continue
        logfile.close()
        del running[run_id]
        free_gpus.append(share)
        with _locked(run.workdir):  # No other sweep sees the run before it is booked.
          status[run_id] = finish(run.workdir, process.returncode, max_attempts)
          os.remove(os.path.join(run.workdir, PID))
        if status[run_id] == DONE:
          summary.durations.append(time.time() - started)
        elif status[run_id] == PENDING:  # Pre-empted, or failed with attempts left: resumes.
          queue.append(run)
        summary(count_statuses(status), f"{run_id} {status[run_id]} (exit {process.returncode})")
  except KeyboardInterrupt:
    log(f"[sweep] interrupted: stopping {len(running)} run(s); the same command resumes them")
    for process, *_ in running.values():
      process.terminate()
    for process, run, _, logfile, _ in running.values():
      try:
        process.wait(timeout=120)
      except subprocess.TimeoutExpired:
        process.kill()
      logfile.close()
      with _locked(run.workdir):
        os.remove(os.path.join(run.workdir, PID))
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
  return status


def _claim(workdir: str, max_attempts: int) -> bool:
  """Takes the run for this sweep if it is still pending and no live process holds its pid file:
  writes this process's pid there (the trainer's replaces it). Check and write happen under an
  exclusive lock on workdir/sweep.lock, so of two sweeps on one directory only one starts a run;
  a pid file whose process is gone (a killed sweep's) is taken over."""
  with _locked(workdir):
    if run_status(workdir, max_attempts) != PENDING:
      return False
    _write_pid(workdir, os.getpid())
    return True


@contextlib.contextmanager
def _locked(workdir: str):
  """An exclusive lock on workdir/sweep.lock between sweeps on this machine (flock)."""
  with open(os.path.join(workdir, LOCK), "a") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as e:  # A file system without flock (Lustre mounted noflock, NFS nolock).
      print(f"vitok sweep: cannot lock {lock.name} ({e}); going on without the lock",
            file=sys.stderr)
    yield  # The lock goes with the file.


def _write_pid(workdir: str, pid: int) -> None:
  """Replaces workdir's pid file (the process's `_process_identity`) in one step."""
  config_lib.write_json(os.path.join(workdir, PID), _process_identity(pid), indent=None)


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt


def checkpoint_step(workdir: str) -> int | None:
  """The newest committed orbax step directory (named by its step) of workdir/checkpoints: what
  `checkpoint.latest_step` reads, without importing jax and orbax (1.5 s on a CPU machine) into
  `vitok sweep_book` at every SLURM task's end."""
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
  return max(steps, default=None)


def book(workdir: str, returncode: int, max_attempts: int, log: str = "") -> str:
  """`finish` under the run's lock (`vitok sweep_book`: a SLURM task or the TPU script); ends
  the SLURM task's lease."""
  with _locked(workdir):
    if os.path.exists(lease := os.path.join(workdir, LEASE)):
      os.remove(lease)
    return finish(workdir, returncode, max_attempts, log)


def finish(workdir: str, returncode: int, max_attempts: int, log: str = "") -> str:
  """Books the exit of a run's trainer into its sweep_status.json; returns its status now (see
  `run_status`). Local sweeps call it as each trainer exits; the SLURM and TPU scripts through
  `vitok sweep_book`, with their own `log` of its output (default: workdir/sweep.log).

  The trainer writes record.json only at the end of a finished run; on SIGTERM it saves a
  checkpoint and exits 0 without one. So exit 0 + checkpoint + no record = pre-empted: pending,
  no attempt used. Any other exit without a record is a failed attempt, and so is a second
  pre-emption at the same checkpoint step (no step trained in between: e.g. a time limit shorter
  than start-up, which would otherwise requeue the job for ever).
  """
  if os.path.exists(os.path.join(workdir, "record.json")):
    return DONE
  state = read_status(workdir)
  state["returncode"] = returncode
  step = checkpoint_step(workdir)
  stalled = state.get("status") == PREEMPTED and state.get("preempted_at_step") == step
  if returncode == 0 and step is not None and not stalled:
    state.update(status=PREEMPTED, preempted_at_step=step,
                 preemptions=state.get("preemptions", 0) + 1)
    config_lib.write_json(os.path.join(workdir, STATUS), state)
    return run_status(workdir, max_attempts)
  log = log or os.path.join(workdir, "sweep.log")
  tail = _log_tail(log) if os.path.exists(log) else f"(no log at {log})"
  if returncode == 0:
    tail += ("\nexited 0 without record.json or a checkpoint" if step is None else
             f"\npre-empted again at checkpoint step {step}, no step trained since the last stop "
             "(a time limit shorter than start-up plus a checkpoint interval?)")
  state["attempts"] = state.get("attempts", 0) + 1
  state["status"] = DIVERGED if "TrainingDiverged" in tail else FAILED
  state["error"] = tail[-600:]
  config_lib.write_json(os.path.join(workdir, STATUS), state)
  return run_status(workdir, max_attempts)


def count_statuses(status: dict[str, str]) -> dict[str, int]:
  """{status: how many runs have it} of an id -> status map."""
  counts: dict[str, int] = {}
  for value in status.values():
    counts[value] = counts.get(value, 0) + 1
  return counts


def _job_spec(run_config: str, workdir: str, sweep_dir: str, **fields):
  from vitok_jax.launch import jobspec
  return jobspec.JobSpec(config=run_config, workdir=workdir, compilation_cache=os.path.join(
      os.path.abspath(sweep_dir), "compilation_cache"), **fields)


def render_slurm_array(runs: Sequence[Run], sweep_dir: str, *, max_parallel: int = 0,
                       **job_fields) -> str:
  """An sbatch script running `runs` as a job array, one task per run (task i trains runs[i]).

  The header and srun line come from the launch JobSpec renderer, written for a placeholder run
  directory that each array task fills in from its index. Each task books its run's exit as a
  local sweep does (`finish`, through `vitok sweep_book`) and requeues itself while the run is
  pending (pre-empted, or failed with attempts left); requeued tasks resume from checkpoints.
  """
  from vitok_jax.launch import slurm
  placeholder = "__VITOK_RUN_DIR__"
  spec = _job_spec(f"{RUN_CONFIG}:{placeholder}", placeholder, sweep_dir,
                   job_name=job_fields.pop("job_name", "vitok-sweep"), **job_fields)
  logs = os.path.join(os.path.abspath(sweep_dir), "logs")
  # The inner `bash -c '...'` expands the exported VITOK_RUN_DIR in the trainer's arguments.
  script = slurm.render_sbatch(spec, sweep_log=shlex.quote(logs) + (
      '"/slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}.out"'),
                               variables={placeholder: "VITOK_RUN_DIR"})
  script = script.replace(f"#SBATCH --output={placeholder}/logs/slurm-%j.out",
                          f"#SBATCH --output={slurm.sbatch_value(logs + '/slurm-%A_%a.out')}\n"
                          f"#SBATCH --array=0-{len(runs) - 1}"
                          + (f"%{max_parallel}" if max_parallel else ""))
  dirs = " ".join(shlex.quote(run.workdir) for run in runs)
  select = (f"run_dirs=({dirs})\n"
            'export VITOK_RUN_DIR="${run_dirs[$SLURM_ARRAY_TASK_ID]}"\n')
  script = script.replace("set -euo pipefail\n", "set -euo pipefail\n" + select)
  script = script.replace(f"workdir={placeholder}\n", 'workdir="${VITOK_RUN_DIR}"\n')
  if placeholder in script:
    raise AssertionError(f"{placeholder} left in the sweep's sbatch script")
  return script


def write_slurm_array(runs: Sequence[Run], sweep_dir: str, **job_fields) -> str:
  """Writes render_slurm_array(...) to sweep_dir/sweep.sbatch and creates sweep_dir/logs, where
  #SBATCH --output points (SLURM does not create it); returns the script's path."""
  script = render_slurm_array(runs, sweep_dir, **job_fields)  # Raises before anything is written.
  os.makedirs(os.path.join(sweep_dir, "logs"), exist_ok=True)
  path = os.path.join(sweep_dir, "sweep.sbatch")
  with open(path, "w") as f:
    f.write(script)
  return path


def tpu_commands(runs: Sequence[Run], sweep_dir: str, **job_fields) -> list[str]:
  """Lines of a bash script running `runs` one after another on one TPU pod.

  The pod (JobSpec tpu_name, zone, accelerator_type, ...) is provisioned once (created or reused,
  waited on until ACTIVE, the repository installed with repo_url), then each run is one
  `ssh --worker=all ... vitok_jax.cli train` of its config; a failed run is reported and the next
  one starts; each run's output is appended to its sweep.log and its exit booked
  (`vitok sweep_book`). A finished run is skipped (the script run again); an unreachable pod (ssh
  exit 255) stops the script without booking an attempt. sweep_dir must be on a file system every
  worker mounts at the same path (NFS, Filestore, gcsfuse): the workers read each run's
  config.json there and write its checkpoints and record.json there, which this machine reads
  back; each job checks that its config is visible.
  """
  from vitok_jax.launch import tpu
  sweep_dir = os.path.abspath(sweep_dir)
  # The workers run from their own checkout (repo_dir): the run config file relative to it.
  run_config = os.path.relpath(RUN_CONFIG, config_lib.CONFIGS_DIR.parent)
  specs = [_job_spec(f"{run_config}:{run.workdir}", run.workdir, sweep_dir, **job_fields)
           for run in runs]
  pod = specs[0]
  lines = ["#!/bin/bash",
           f"# vitok sweep: {len(runs)} run(s) in turn on TPU pod {pod.tpu_name}; {sweep_dir} must "
           "be mounted at that path on every worker.",
           tpu.provision_command(pod)]
  unreachable = ("vitok sweep: the pod is unreachable (ssh exit 255); stopping without booking "
                 "it as an attempt: run `vitok sweep ... --target=tpu` again once it is back")
  for run, spec in zip(runs, specs):
    log = shlex.quote(os.path.join(run.workdir, "sweep.log"))
    lines += [f"# {run.id}",
              f"if [ -f {shlex.quote(os.path.join(run.workdir, 'record.json'))} ]; then",
              f'  echo "vitok sweep: run {run.id}: done already" >&2',  # A script run again.
              "else",
              "  " + tpu.job_command(spec, require=[os.path.join(run.workdir, "config.json")])
              + f" 2>&1 | tee -a {log}",
              "  rc=${PIPESTATUS[0]}",
              f'  if [ "$rc" = 255 ]; then echo {shlex.quote(unreachable)} >&2; exit 255; fi',
              # Booked as a local sweep books it: attempts, the error's tail, pre-emptions.
              f'  echo "vitok sweep: run {run.id}: $(vitok sweep_book {shlex.quote(run.workdir)} '
              '"$rc") (exit $rc)" >&2',
              "fi"]
  done = f"vitok sweep: done; vitok results {sweep_dir} reads the records"
  lines += [f"echo {shlex.quote(done)}", f"# Release the pod: {tpu.release_command(pod)}"]
  return lines


def write_tpu_script(runs: Sequence[Run], sweep_dir: str, **job_fields) -> str:
  """Writes tpu_commands(...) to sweep_dir/sweep_tpu.sh; returns its path."""
  script = "\n".join(tpu_commands(runs, sweep_dir, **job_fields)) + "\n"  # Raises first.
  path = os.path.join(sweep_dir, "sweep_tpu.sh")
  with open(path, "w") as f:
    f.write(script)
  return path
