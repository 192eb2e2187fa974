"""A SLURM batch script for a JobSpec: srun one process per GPU (or node); node 0 coordinates."""
from __future__ import annotations

import shlex

from vitok_jax.launch.jobspec import JobSpec


def render_sbatch(spec: JobSpec, *, sweep_log: str = "") -> str:
  """The sbatch script.

  #SBATCH --output goes to WORKDIR/logs, which must exist before the job starts (SLURM does not
  create it): `vitok launch slurm` creates it when it writes the script (launch_args.write_sbatch).

  SIGTERM reaches the trainer 120 s before the time limit (--signal=TERM@120) or on pre-emption;
  it saves a checkpoint and exits 0 without writing WORKDIR/record.json. Such an exit ends the job
  as COMPLETED, which no --requeue relaunches, so for `train` the script itself requeues the job
  (`scontrol requeue`) when srun succeeded but the run is not finished; the requeued job resumes
  from the checkpoint. A failed srun ends the script (set -e) and is not requeued. --requeue lets
  SLURM requeue the job after a node failure or a pre-emption it performs itself.

  `sweep_log` (a run of a sweep, whose output goes there): every exit of the trainer is booked
  into the run's sweep_status.json by `vitok sweep_book` (attempts, the error's tail), and the job
  requeues itself while the run is pending: pre-empted, or failed with attempts left.
  """
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
            f"workdir={shlex.quote(spec.workdir)}",
            'mkdir -p "$workdir/logs"',
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f'export VITOK_COORDINATOR="$head_node:{spec.coordinator_port}"',
            'export VITOK_NUM_PROCESSES="$SLURM_NTASKS"']
  lines += [f"export {k}={shlex.quote(v)}" for k, v in spec.base_env().items()]
  per_task = 'export VITOK_PROCESS_ID="$SLURM_PROCID"; '
  if spec.gpus_per_node and spec.processes_per_node == spec.gpus_per_node > 1:
    per_task += 'export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"; '  # One GPU per process.
  srun = ("srun --kill-on-bad-exit=1 bash -c "
          f"{shlex.quote(per_task + 'exec ' + spec.shell_command())}")
  if sweep_log and spec.command == "train":
    lines += ["rc=0", f"{srun} || rc=$?",
              f'status=$(vitok sweep_book "$workdir" "$rc" {sweep_log})',
              'echo "vitok: run $workdir: $status (trainer exit $rc)" >&2',
              'if [ "$status" = pending ]; then',
              '  echo "vitok: requeueing job $SLURM_JOB_ID: the run resumes from its checkpoint" '
              '>&2',
              '  scontrol requeue "$SLURM_JOB_ID"',
              "  exit 0",
              "fi",
              'exit "$rc"']
    return "\n".join(lines) + "\n"
  lines.append(srun)
  if spec.command == "train":
    lines += ['if [ ! -f "$workdir/record.json" ]; then',
              '  echo "vitok: stopped before the end (time limit or pre-emption): requeueing job '
              '$SLURM_JOB_ID, which resumes from the checkpoint" >&2',
              '  scontrol requeue "$SLURM_JOB_ID"',
              "fi"]
  return "\n".join(lines) + "\n"
