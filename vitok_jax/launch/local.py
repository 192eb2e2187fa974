"""N processes on this machine joined through a coordinator on 127.0.0.1.

On a GPU machine each process gets its own equal share of the GPUs (CUDA_VISIBLE_DEVICES), so
that N processes do not all claim every GPU; on CPU nothing changes.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from typing import Mapping, Sequence

import portpicker

from vitok_jax.errors import ConfigError
from vitok_jax.launch.jobspec import JobSpec


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
  """GPU ids the processes of this machine may use, as CUDA_VISIBLE_DEVICES entries.

  None when JAX_PLATFORMS names no GPU platform (e.g. "cpu": the processes will not use a GPU);
  else CUDA_VISIBLE_DEVICES when set; else the GPUs `nvidia-smi -L` lists (none without it): the
  index of each, or for a GPU split into MIG instances the UUIDs of its instances (`MIG-…`).
  """
  environ = os.environ if environ is None else environ
  platforms = {p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()}
  if platforms and not platforms & {"cuda", "gpu"}:
    return []
  if "CUDA_VISIBLE_DEVICES" in environ:
    ids = [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    return [] if ids == ["-1"] else ids
  nvidia_smi = shutil.which("nvidia-smi")
  if nvidia_smi is None:
    return []
  try:
    listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return []
  if listing.returncode:
    return []
  return _gpus_of_listing(listing.stdout)


def _gpus_of_listing(listing: str) -> list[str]:
  """CUDA_VISIBLE_DEVICES entries of `nvidia-smi -L` output: "GPU 0: …" lines, each followed by
  "  MIG 1g.10gb Device 0: (UUID: MIG-…)" lines when the GPU is split into MIG instances."""
  gpus: list[tuple[str, list[str]]] = []
  for line in listing.splitlines():
    gpu = re.match(r"GPU (\d+):", line)
    mig = re.match(r"\s+MIG .*\(UUID: (MIG-[^)\s]+)\)", line)
    if gpu:
      gpus.append((gpu.group(1), []))
    elif mig and gpus:
      gpus[-1][1].append(mig.group(1))
  return [entry for index, instances in gpus for entry in (instances or [index])]


def split_gpus(gpus: Sequence[str], groups: int, what: str = "processes") -> list[str] | None:
  """CUDA_VISIBLE_DEVICES of each of `groups` concurrent process groups: `gpus` cut into equal
  consecutive shares (["0", "1", "2", "3"], 2 -> ["0,1", "2,3"]). None when there is nothing to
  pin (no GPUs, or one group, which keeps the machine's setting)."""
  if not gpus or groups <= 1:
    return None
  if len(gpus) % groups:
    raise ConfigError(
        f"{len(gpus)} GPUs ({','.join(gpus)}) do not split evenly among {groups} {what}: use a "
        f"number of {what} that divides {len(gpus)}, or choose the GPUs with CUDA_VISIBLE_DEVICES "
        "(vitok launch local: --gpus)")
  share = len(gpus) // groups
  if share > 1 and any(gpu.startswith("MIG-") for gpu in gpus):
    # A CUDA process enumerates a single MIG instance: the rest of a share would sit idle.
    raise ConfigError(
        f"{len(gpus)} GPUs ({','.join(gpus)}) include MIG instances, and a process can use only "
        f"one: run {len(gpus)} {what}, one per instance, or choose the GPUs with "
        "CUDA_VISIBLE_DEVICES (vitok launch local: --gpus)")
  return [",".join(gpus[i * share:(i + 1) * share]) for i in range(groups)]


def local_commands(spec: JobSpec, port: int,
                   gpus: Sequence[str] = ()) -> list[tuple[list[str], dict[str, str]]]:
  """(argv, extra environment) of each process; with `gpus` (ids) process i gets share i of them."""
  shares = split_gpus(gpus, spec.num_processes)
  out = []
  for pid in range(spec.num_processes):
    env = spec.base_env()
    if spec.num_processes > 1:
      env.update(VITOK_COORDINATOR=f"127.0.0.1:{port}", VITOK_NUM_PROCESSES=str(spec.num_processes),
                 VITOK_PROCESS_ID=str(pid))
    if shares:
      env["CUDA_VISIBLE_DEVICES"] = shares[pid]
    argv = [sys.executable, "-m", "vitok_jax.cli", *spec.vitok_args()[1:]]
    out.append((argv, env))
  return out


def launch_local(spec: JobSpec, *, dry_run: bool = False, port: int | None = None,
                 gpus: Sequence[str] | None = None, poll_s: float = 0.5,
                 grace_s: float = 60.0) -> int:
  """Runs every process, logs to WORKDIR/logs/process_N.log; returns 0, or the exit code of the
  first process that failed.

  When a process fails the others are stopped (SIGTERM, then SIGKILL after `grace_s`): without
  it they would wait on it in their next collective. Each failed process's log tail goes to
  stderr. `gpus`: the GPU ids to split among the processes (None: visible_gpus(), []: no
  pinning).
  """
  port = port or portpicker.pick_unused_port()
  commands = local_commands(spec, port, visible_gpus() if gpus is None else gpus)
  if dry_run:
    for argv, env in commands:
      print(" ".join(f"{k}={v}" for k, v in env.items()), " ".join(argv))
    return 0
  log_dir = os.path.join(spec.workdir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  logs = [os.path.join(log_dir, f"process_{pid}.log") for pid in range(len(commands))]
  print(f"vitok launch local: {len(commands)} process(es), logs in {log_dir}", file=sys.stderr)
  procs = []
  for (argv, env), path in zip(commands, logs):
    with open(path, "w") as log:
      procs.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                    stderr=subprocess.STDOUT))
  codes, failed, stop_by, stopped = {}, None, None, []
  while len(codes) < len(procs):
    for pid, proc in enumerate(procs):
      if pid not in codes and (code := proc.poll()) is not None:
        codes[pid] = code
        if code and failed is None:
          failed, stop_by = pid, time.time() + grace_s
          for other, other_proc in enumerate(procs):
            if other_proc.poll() is None:
              other_proc.terminate()
              stopped.append(other)
    if stop_by is not None and time.time() > stop_by:
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
    time.sleep(poll_s)
  if failed is None:
    return 0
  with open(logs[failed]) as f:
    tail = "".join(f.readlines()[-15:])
  print(f"vitok launch local: process {failed} exited {codes[failed]} (the first to fail), "
        f"processes {stopped} were stopped; exit codes {[codes[pid] for pid in sorted(codes)]}; "
        f"the end of {logs[failed]}:\n{tail}", file=sys.stderr)
  return codes[failed] if codes[failed] > 0 else 128 - codes[failed]  # Killed by signal N: 128+N.
