"""Multi-process start-up: jax.distributed.initialize from flags, environment, SLURM or a TPU pod.

Order of precedence: an explicit coordinator (flags, or VITOK_COORDINATOR / VITOK_NUM_PROCESSES /
VITOK_PROCESS_ID as the local and SLURM launchers set them), then jax's own cluster auto-detection
(SLURM with more than one task, multi-host TPU VMs), else a single process.
"""
from __future__ import annotations

import logging
import os

import jax

from vitok_jax.errors import ConfigError

_initialized = False


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


# What jax's SLURM detection reads; srun sets them for every task of a job step. A batch script
# or an salloc shell has SLURM_JOB_ID and SLURM_NTASKS too, but no step: a process started there
# directly is the only one, and jax.distributed.initialize() would fail ("coordinator_address
# should be defined") or wait for tasks that never start.
_SLURM_TASK_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")


def _slurm_tasks() -> int:
  """Tasks of this SLURM job step (0 when this process was not started by srun)."""
  if not all(os.environ.get(name) for name in _SLURM_TASK_VARS):
    return 0
  return _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS") or 0


def detected_cluster() -> str | None:
  """'slurm', 'tpu' or None for what jax would auto-detect here."""
  if _slurm_tasks() > 1:
    return "slurm"
  if (_env_int("SLURM_NTASKS") or 0) > 1 and "SLURM_JOB_ID" in os.environ:
    logging.warning("SLURM job with SLURM_NTASKS=%s, but this process is not one of several "
                    "srun tasks: running as a single process (launch with srun, e.g. `vitok "
                    "launch slurm`, for one process per task)", os.environ["SLURM_NTASKS"])
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
    return "tpu"
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the job's processes (no-op for a single process or when already initialised)."""
  global _initialized
  if _initialized:
    return
  coordinator = coordinator or os.environ.get("VITOK_COORDINATOR")
  num_processes = num_processes if num_processes is not None else _env_int("VITOK_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("VITOK_PROCESS_ID")
  if coordinator:
    if num_processes is None or process_id is None:
      raise ConfigError(f"coordinator {coordinator} given without num_processes and process_id; "
                        "pass --num_processes and --process_id (or VITOK_NUM_PROCESSES/VITOK_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if num_processes == 1:
      _initialized = True
      return
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives.
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif cluster := detected_cluster():
    logging.info("Auto-detected a %s cluster: initialising jax.distributed", cluster)
    jax.distributed.initialize()
  _initialized = True
  if jax.process_count() > 1:
    logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
