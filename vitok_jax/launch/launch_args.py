"""`vitok launch TARGET ...`: builds a JobSpec from the command line and renders or runs it."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from vitok_jax.errors import ConfigError
from vitok_jax.launch import jobspec, local, slurm, tpu


def parse(argv: list[str]) -> tuple[str, jobspec.JobSpec, argparse.Namespace]:
  parser = argparse.ArgumentParser(
      prog="vitok launch", description="Run a vitok job on local processes, SLURM or a TPU pod. "
      "Unknown --config.a.b=v arguments are passed to every process as overrides.")
  parser.add_argument("target", choices=("local", "slurm", "tpu"))
  parser.add_argument("--config", required=True, help="NAME:VARIANT or PATH.py:VARIANT")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--command", default="train", choices=("train", "eval"))
  parser.add_argument("--processes", type=int, default=1, help="processes per node")
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus_per_node", type=int, default=0, help="slurm: GPUs to ask per node")
  parser.add_argument("--gpus", default=None,
                      help="local: GPU ids split evenly among the processes (CUDA_VISIBLE_DEVICES "
                      "of each), e.g. 0,1,2,3; default: CUDA_VISIBLE_DEVICES or `nvidia-smi -L`; "
                      "'none': no pinning")
  parser.add_argument("--compilation_cache", default=os.environ.get("VITOK_COMPILATION_CACHE", ""))
  parser.add_argument("--port", type=int, default=12355, help="coordinator port (SLURM)")
  parser.add_argument("--job_name", default="vitok")
  parser.add_argument("--partition", default="")
  parser.add_argument("--account", default="")
  parser.add_argument("--time", default="24:00:00")
  parser.add_argument("--cpus_per_task", type=int, default=8,
                      help="slurm: CPUs of each process (its data pipeline's threads)")
  parser.add_argument("--tpu_name", default="")
  parser.add_argument("--zone", default="")
  parser.add_argument("--project", default="")
  parser.add_argument("--accelerator_type", default="", help="tpu: e.g. v5litepod-64, v5p-128")
  parser.add_argument("--runtime_version", default="",
                      help="tpu: TPU software version; default from the accelerator family "
                      f"({', '.join(f'{k}: {v}' for k, v in tpu.RUNTIME_VERSIONS.items())})")
  parser.add_argument("--repo_dir", default="~/vitok_jax", help="tpu: the checkout on every worker")
  parser.add_argument("--repo_url", default="", help="tpu: git URL cloned into --repo_dir on every "
                      "worker (when missing) and pip-installed; default: --repo_dir must exist")
  parser.add_argument("--repo_ref", default="", help="tpu: with --repo_url, the commit, tag or "
                      "branch every worker checks out before installing (default: as cloned)")
  parser.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
  parser.add_argument("--submit", action="store_true",
                      help="slurm: sbatch the script (without it: write WORKDIR/launch.sbatch)")
  args, overrides = parser.parse_known_args(argv)
  for override in overrides:  # --dry-run: a flag of ours misspelt, not an override.
    flag = override.partition("=")[0]
    meant = "--" + flag.lstrip("-").replace("-", "_")
    # pylint: disable-next=protected-access
    if not flag.startswith("--config.") and meant in parser._option_string_actions:
      raise ConfigError(f"{flag}: did you mean {meant}? (vitok launch's flags are spelt with "
                        "underscores)")
  spec = jobspec.JobSpec(
      config=args.config, workdir=args.workdir, command=args.command, overrides=tuple(overrides),
      nodes=args.nodes, processes_per_node=args.processes, gpus_per_node=args.gpus_per_node,
      compilation_cache=args.compilation_cache, coordinator_port=args.port, job_name=args.job_name,
      partition=args.partition, account=args.account, time=args.time,
      cpus_per_task=args.cpus_per_task, tpu_name=args.tpu_name,
      zone=args.zone, project=args.project, accelerator_type=args.accelerator_type,
      runtime_version=args.runtime_version, repo_dir=args.repo_dir, repo_url=args.repo_url,
      repo_ref=args.repo_ref)
  return args.target, spec, args


def write_sbatch(spec: jobspec.JobSpec, script: str) -> str:
  """Writes `script` (slurm.render_sbatch(spec)) to WORKDIR/launch.sbatch and creates WORKDIR/logs,
  which SLURM needs for #SBATCH --output before the script runs (it does not create directories);
  returns the script's path."""
  os.makedirs(os.path.join(spec.workdir, "logs"), exist_ok=True)
  path = os.path.join(spec.workdir, "launch.sbatch")
  with open(path, "w") as f:
    f.write(script)
  return path


def main(argv: list[str]) -> int:
  try:
    target, spec, args = parse(argv)
    spec.check_config()
    if target == "local":
      if spec.nodes != 1:
        raise ConfigError("a local launch runs on this machine: use --nodes=1")
      gpus = None if args.gpus is None else [] if args.gpus == "none" else args.gpus.split(",")
      return local.launch_local(spec, dry_run=args.dry_run, gpus=gpus)
    if target == "slurm":
      script = slurm.render_sbatch(spec)
      if args.dry_run:
        print(script)
        return 0
      path = write_sbatch(spec, script)
      if not args.submit:
        print(script)
        print(f"wrote {path} (and {spec.workdir}/logs/): sbatch {path}", file=sys.stderr)
        return 0
      os.execvp("sbatch", ["sbatch", path])
    commands = tpu.render_tpu_commands(spec)
    print("\n".join(commands), flush=True)
    if not args.dry_run:
      for command in commands:
        if subprocess.run(["bash", "-c", command], check=False).returncode:
          return 1
    return 0
  except ConfigError as e:
    print(f"vitok launch: error: {e}", file=sys.stderr)
    return 2
