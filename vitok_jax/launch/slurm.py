"""A SLURM batch script for a JobSpec: srun one process per GPU (or per node), coordinator = first node."""
from __future__ import annotations

import shlex

from vitok_jax.launch.jobspec import JobSpec


def render_sbatch(spec: JobSpec) -> str:
  """The sbatch script. SIGTERM arrives 120 s before the time limit or on pre-emption; the trainer
  saves a checkpoint and exits, and --requeue relaunches the same command, which resumes."""
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={spec.job_name}",
           f"#SBATCH --nodes={spec.nodes}",
           f"#SBATCH --ntasks-per-node={spec.processes_per_node}",
           f"#SBATCH --cpus-per-task={spec.cpus_per_task}",
           f"#SBATCH --time={spec.time}",
           f"#SBATCH --output={spec.workdir}/logs/slurm-%j.out",
           "#SBATCH --signal=TERM@120",
           "#SBATCH --requeue"]
  if spec.gpus_per_node:
    lines.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
  if spec.partition:
    lines.append(f"#SBATCH --partition={spec.partition}")
  if spec.account:
    lines.append(f"#SBATCH --account={spec.account}")
  lines += ["set -euo pipefail",
            f"mkdir -p {shlex.quote(spec.workdir)}/logs",
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f'export VITOK_COORDINATOR="$head_node:{spec.coordinator_port}"',
            'export VITOK_NUM_PROCESSES="$SLURM_NTASKS"']
  lines += [f"export {k}={shlex.quote(v)}" for k, v in spec.base_env().items()]
  per_task = 'export VITOK_PROCESS_ID="$SLURM_PROCID"; '
  if spec.gpus_per_node and spec.processes_per_node == spec.gpus_per_node > 1:
    per_task += 'export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"; '  # One GPU per process.
  lines.append(f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(per_task + 'exec ' + spec.shell_command())}")
  return "\n".join(lines) + "\n"
