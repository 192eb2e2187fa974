"""A SLURM batch script for a JobSpec: srun one process per GPU (or node); node 0 coordinates."""
from __future__ import annotations

import re
import shlex
from typing import Mapping

from vitok_jax.errors import ConfigError
from vitok_jax.launch.jobspec import PORT_SPREAD, SIGNAL_LEAD_S, JobSpec, slurm_seconds


def sbatch_value(value: str) -> str:
  """A value for an #SBATCH line: sbatch ends an argument at unquoted whitespace or '#', so such a
  value is double-quoted; a double quote or a line break in it is a ConfigError."""
  if re.search(r'["\n]', value):
    raise ConfigError(f"{value!r}: a SLURM job path or name cannot hold a double quote or a line "
                      "break; rename it")
  return f'"{value}"' if re.search(r"[\s#']", value) else value


def render_sbatch(spec: JobSpec, *, sweep_log: str = "",
                  variables: Mapping[str, str] | None = None) -> str:
  """The sbatch script.

  #SBATCH --output goes to WORKDIR/logs, which must exist before the job starts (SLURM does not
  create it): `vitok launch slurm` creates it when it writes the script (launch_args.write_sbatch).

  SIGTERM reaches the trainer 120 s before the time limit (--signal=TERM@120) or on pre-emption;
  it saves a checkpoint and exits 0 without writing WORKDIR/record.json. Such an exit ends the job
  as COMPLETED, which no --requeue relaunches, so for `train` the script itself requeues the job
  (`scontrol requeue`) when srun succeeded but the run is not finished and its newest checkpoint
  is newer than the one the job started from; the requeued job resumes from the checkpoint. A
  failed srun ends the script (set -e) and is not requeued. --requeue lets SLURM requeue the job
  after a node failure or a pre-emption it performs itself.

  `sweep_log` (a run of a sweep, whose output goes there): the task first claims its run (`vitok
  sweep_claim`; a run done, failed or running elsewhere is left alone), every exit of the trainer
  is booked into the run's sweep_status.json by `vitok sweep_book` (attempts, the error's tail),
  and the job requeues itself while the run is pending: pre-empted, or failed with attempts left.
  `variables`: tokens of the command's arguments the task's shell expands (`shell_command`).

  One process per GPU: process i of a node takes entry i of the CUDA_VISIBLE_DEVICES SLURM gave
  the job (the allocated GPUs, not necessarily 0..n-1), or GPU i when it set none; a task SLURM
  gave a single GPU keeps it.
  """
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={sbatch_value(spec.job_name)}",
           f"#SBATCH --nodes={spec.nodes}",
           f"#SBATCH --ntasks-per-node={spec.processes_per_node}",
           f"#SBATCH --cpus-per-task={spec.cpus_per_task}",
           f"#SBATCH --time={spec.time}",
           f"#SBATCH --output={sbatch_value(spec.workdir + '/logs/slurm-%j.out')}",
           f"#SBATCH --signal=TERM@{SIGNAL_LEAD_S}",
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
            # sed reads the whole list: `head -n 1` would close the pipe early, and scontrol's
            # SIGPIPE on a long node list would end the script (pipefail).
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
            f'export VITOK_COORDINATOR="$head_node:$(({spec.coordinator_port} + SLURM_JOB_ID % '
            f'{PORT_SPREAD}))"',
            'export VITOK_NUM_PROCESSES="$SLURM_NTASKS"']
  lines += [f"export {k}={shlex.quote(v)}" for k, v in spec.base_env().items()]
  per_task = 'export VITOK_PROCESS_ID="$SLURM_PROCID"; '
  if spec.gpus_per_node and spec.processes_per_node == spec.gpus_per_node > 1:
    per_task += ('IFS=, read -ra gpus <<< "${CUDA_VISIBLE_DEVICES:-}"; '
                 'if [ "${#gpus[@]}" -ne 1 ]; then '  # One entry: SLURM bound this task's GPU.
                 'export CUDA_VISIBLE_DEVICES="${gpus[$SLURM_LOCALID]:-$SLURM_LOCALID}"; fi; ')
  # srun takes --cpus-per-task from sbatch no more (SLURM >= 22.05): without it each task gets 1.
  srun = (f"srun --kill-on-bad-exit=1 --cpus-per-task={spec.cpus_per_task} bash -c "
          f"{shlex.quote(per_task + 'exec ' + spec.shell_command(variables=variables))}")
  if sweep_log and spec.command == "train":
    lines += [f'claim=$(vitok sweep_claim "$workdir" "$SLURM_JOB_ID" {slurm_seconds(spec.time)})',
              'if [ "$claim" != claimed ]; then',
              '  echo "vitok: run $workdir is $claim: this task trains nothing" >&2',
              "  exit 0",
              "fi",
              "rc=0", f"{srun} || rc=$?",
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
  if spec.command != "train":
    return "\n".join(lines + [srun]) + "\n"
  # Requeued only when the stop saved a newer checkpoint than the job started from: a job stopped
  # again before training a step (a time limit shorter than start-up) would requeue for ever.
  # Finished: record.json made at the newest checkpoint (the record of a run extended since, by a
  # larger total_steps, is of an older step), as `loop.finished_record` decides.
  lines += ["newest_step() { ls \"$workdir/checkpoints\" 2>/dev/null | grep -E '^[0-9]+$' | "
            "sort -n | tail -n 1 || true; }",
            # Its top-level "steps" (no other key of a record is named so); "" if it has none.
            "record_step() { sed -n 's/.*\"steps\": *\\([0-9][0-9]*\\).*/\\1/p' "
            "\"$workdir/record.json\" 2>/dev/null | head -n 1 || true; }",
            "started_at=$(newest_step)",
            srun,
            'recorded=$(record_step)',
            'if [ ! -f "$workdir/record.json" ] || { [ -n "$recorded" ] && '
            '[ "$recorded" != "$(newest_step)" ]; }; then',
            '  if [ "$(newest_step)" = "$started_at" ]; then',
            '    echo "vitok: stopped again at checkpoint step ${started_at:-none} without '
            'training a step (is --time shorter than start-up?): not requeueing" >&2',
            "    exit 1",
            "  fi",
            '  echo "vitok: stopped before the end (time limit or pre-emption): requeueing job '
            '$SLURM_JOB_ID, which resumes from the checkpoint" >&2',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi"]
  return "\n".join(lines) + "\n"
