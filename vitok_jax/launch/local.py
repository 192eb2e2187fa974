"""N processes on this machine joined through a coordinator on 127.0.0.1."""
from __future__ import annotations

import os
import portpicker
import subprocess
import sys

from vitok_jax.launch.jobspec import JobSpec


def local_commands(spec: JobSpec, port: int) -> list[tuple[list[str], dict[str, str]]]:
  """(argv, extra environment) of each process."""
  out = []
  for pid in range(spec.num_processes):
    env = spec.base_env()
    if spec.num_processes > 1:
      env.update(VITOK_COORDINATOR=f"127.0.0.1:{port}", VITOK_NUM_PROCESSES=str(spec.num_processes),
                 VITOK_PROCESS_ID=str(pid))
    argv = [sys.executable, "-m", "vitok_jax.cli", *spec.vitok_args()[1:]]
    out.append((argv, env))
  return out


def launch_local(spec: JobSpec, *, dry_run: bool = False, port: int | None = None) -> int:
  """Runs every process, logs to WORKDIR/logs/process_N.log; returns the worst exit code."""
  port = port or portpicker.pick_unused_port()
  commands = local_commands(spec, port)
  if dry_run:
    for argv, env in commands:
      print(" ".join(f"{k}={v}" for k, v in env.items()), " ".join(argv))
    return 0
  log_dir = os.path.join(spec.workdir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  procs = []
  for pid, (argv, env) in enumerate(commands):
    log = open(os.path.join(log_dir, f"process_{pid}.log"), "w")
    procs.append((subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                   stderr=subprocess.STDOUT), log))
  codes = []
  for proc, log in procs:
    codes.append(proc.wait())
    log.close()
  return max(codes, key=abs)
