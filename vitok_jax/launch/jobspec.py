"""The one job description every launcher renders: what to run, where, on how many processes."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
from typing import Mapping

from vitok_jax import config_lib
from vitok_jax.errors import ConfigError

# A SLURM job's coordinator port: coordinator_port + SLURM_JOB_ID modulo this, so jobs (and array
# tasks, each its own job id) sharing a node do not collide.
PORT_SPREAD = 20000
# The trainer's warning before a SLURM time limit (#SBATCH --signal=TERM@120): it saves then.
SIGNAL_LEAD_S = 120
UNLIMITED_S = 10 ** 9  # A SLURM job without a time limit, in seconds (about 32 years).


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """A `vitok` job. Processes = nodes × processes_per_node (one per GPU, or one per host)."""
  config: str                                  # "vitok:VARIANT" or "path.py:VARIANT".
  workdir: str
  command: str = "train"                       # The vitok subcommand each process runs.
  overrides: tuple[str, ...] = ()              # e.g. ("--config.total_steps=1000",).
  nodes: int = 1
  processes_per_node: int = 1
  gpus_per_node: int = 0
  compilation_cache: str = ""                  # Persistent XLA cache shared by all runs.
  coordinator_port: int = 12355
  env: tuple[tuple[str, str], ...] = ()        # Extra environment, (name, value) pairs.
  # SLURM.
  job_name: str = "vitok"
  partition: str = ""
  account: str = ""
  time: str = "24:00:00"
  cpus_per_task: int = 8
  # TPU VM pods (queued resources).
  tpu_name: str = ""
  zone: str = ""
  project: str = ""
  accelerator_type: str = ""                   # e.g. "v5litepod-64".
  runtime_version: str = ""                    # "": picked from accelerator_type (launch/tpu.py).
  repo_dir: str = "~/vitok_jax"                # Checkout on every TPU worker.
  repo_url: str = ""                           # Set: cloned into repo_dir and pip-installed there.
  repo_ref: str = ""                           # With repo_url: the commit, tag or branch checked out.

  def __post_init__(self):
    if self.nodes < 1 or self.processes_per_node < 1:
      raise ConfigError(f"nodes={self.nodes} and processes_per_node={self.processes_per_node} "
                        "must be >= 1")
    if self.gpus_per_node and self.processes_per_node not in (1, self.gpus_per_node):
      raise ConfigError(f"processes_per_node={self.processes_per_node} must be 1 (one process "
                        f"drives all {self.gpus_per_node} GPUs) or gpus_per_node (one per GPU)")
    if self.gpus_per_node < 0 or self.cpus_per_task < 1:
      raise ConfigError(f"gpus_per_node={self.gpus_per_node} must be >= 0 and cpus_per_task="
                        f"{self.cpus_per_task} >= 1")
    if not 1024 <= self.coordinator_port <= 65535 - PORT_SPREAD:
      raise ConfigError(f"coordinator_port={self.coordinator_port}: use 1024.."
                        f"{65535 - PORT_SPREAD} (a SLURM job adds its job id modulo {PORT_SPREAD})")
    if slurm_seconds(self.time) <= 2 * SIGNAL_LEAD_S:
      raise ConfigError(f"time={self.time!r}: the trainer is told to save {SIGNAL_LEAD_S} s before "
                        f"the limit, so give a job more than {2 * SIGNAL_LEAD_S} s")
    config_lib.check_workdir(self.workdir)
    if self.repo_ref and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", self.repo_ref):
      raise ConfigError(f"repo_ref={self.repo_ref!r}: a commit, tag or branch name (letters, "
                        "digits, '.', '_', '/', '-', starting with a letter or digit)")
    if self.repo_ref and not self.repo_url:
      raise ConfigError(f"repo_ref={self.repo_ref!r} pins the checkout that repo_url clones on "
                        "every TPU worker; pass --repo_url too (without it repo_dir is run as it "
                        "is)")
    for override in self.overrides:
      if not override.startswith("--config."):
        raise ConfigError(f"override {override!r} must look like --config.a.b=value")

  @property
  def num_processes(self) -> int:
    return self.nodes * self.processes_per_node

  def vitok_args(self, *extra: str) -> list[str]:
    """argv of the job's command (the same on every process)."""
    return ["vitok", self.command, f"--config={self.config}", f"--workdir={self.workdir}",
            *self.overrides, *extra]

  def shell_command(self, *extra: str, variables: Mapping[str, str] | None = None) -> str:
    """The job's command line, each argument quoted for bash.

    variables: {token: NAME}: a token within an argument becomes "${NAME}", which the shell running
    the command expands (quoted: a value with spaces stays one argument).
    """
    return " ".join(_quote(a, variables or {}) for a in self.vitok_args(*extra))

  def check_config(self) -> None:
    """Loads the job's config as its processes will (with the overrides) and raises ConfigError
    where `vitok train` would, and where its mesh does not fit the job's GPUs or TPU slice, before
    anything is written, submitted or provisioned."""
    config = config_lib.apply_overrides(self.config, self.overrides)
    if self.command == "train":
      from vitok_jax import train  # pylint: disable=g-import-not-at-top
      new_run = not os.path.exists(os.path.join(self.workdir, "config.json"))
      train.validate(config, new_run=new_run)
    if self.accelerator_type:
      from vitok_jax.launch import tpu  # pylint: disable=g-import-not-at-top
      tpu.check_layout(config, self.accelerator_type)
    else:
      check_layout(config, nodes=self.nodes, gpus_per_node=self.gpus_per_node,
                   processes_per_node=self.processes_per_node)

  def base_env(self) -> dict[str, str]:
    env = dict(self.env)
    if self.compilation_cache:
      env["VITOK_COMPILATION_CACHE"] = self.compilation_cache
    return env


def slurm_seconds(time: str) -> int:
  """A SLURM time limit in seconds: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS; no limit
  (UNLIMITED, INFINITE or 0) is UNLIMITED_S."""
  if str(time).upper() in ("UNLIMITED", "INFINITE", "0"):
    return UNLIMITED_S
  match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(time))
  if not match:
    raise ConfigError(f"time={time!r} is no SLURM time limit; use HH:MM:SS, D-HH:MM:SS or MM")
  days, *parts = match.groups()
  parts = [int(p) for p in parts if p is not None]
  if days is not None:  # D-HH[:MM[:SS]]
    parts += [0] * (3 - len(parts))
    return ((int(days) * 24 + parts[0]) * 60 + parts[1]) * 60 + parts[2]
  if len(parts) == 3:
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]
  return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)  # MM or MM:SS


def _quote(arg: str, variables: Mapping[str, str]) -> str:
  for token, name in variables.items():
    if token in arg:
      return f'"${{{name}}}"'.join(_quote(part, variables) if part else ""
                                   for part in arg.split(token))
  return shlex.quote(arg)


def check_layout(config, *, nodes: int, gpus_per_node: int, processes_per_node: int = 1) -> None:
  """Raises ConfigError where `vitok train` of `config` would on nodes × gpus_per_node GPUs: a
  mesh that does not fit them (`check_mesh`), a batch that does not split over the mesh's batch
  shards and the job's processes."""
  shapes = check_mesh(config.mesh, nodes=nodes, gpus_per_node=gpus_per_node,
                      processes_per_node=processes_per_node)
  from vitok_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  if shapes is not None:  # tensor is the minor mesh axis: its groups are consecutive devices.
    tensor = shapes[0][mesh_lib.AXES.index("tensor")]
    per_process = gpus_per_node // processes_per_node
    if per_process % tensor:
      raise ConfigError(
          f"mesh.tensor={tensor} spans processes ({per_process} GPU(s) each), which would have to "
          "load the same rows; keep tensor within a process (one process per node drives all its "
          "GPUs) or use tensor=1")
  if shapes is not None:
    check_batch_layout(config, shapes, nodes * processes_per_node,
                       f"the job has nodes × gpus_per_node = {nodes} × {gpus_per_node} GPUs")


def check_batch_layout(config, shapes: tuple[tuple[int, ...], tuple[int, ...]], processes: int,
                       job: str) -> None:
  """ConfigError unless config.batch_size splits over the batch shards of the mesh of `shapes`
  (ICI, DCN) and over `processes`; `job` says what runs it."""
  from vitok_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  if "batch_size" in config:
    shards = math.prod(ici * dcn for axis, ici, dcn in zip(mesh_lib.AXES, *shapes)
                       if axis in mesh_lib.BATCH_AXES)
    mesh_lib.check_batch_split(config.batch_size, shards, processes, f" ({job})")


def check_mesh(mesh_cfg, *, nodes: int, gpus_per_node: int,
               processes_per_node: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """The mesh's (ICI shape, DCN shape) on nodes × gpus_per_node GPUs, or ConfigError when
  `mesh_cfg` does not fit them in the DCN groups `mesh.make_mesh` will find: the nodes, or on one
  node its processes. None for a CPU job (nothing to check: its device count is the processes')."""
  if not gpus_per_node:
    return None
  granules, kind = (nodes, "nodes") if nodes > 1 else (processes_per_node, "processes")
  return mesh_on(mesh_cfg, nodes * gpus_per_node, granules, f"its GPUs are in {granules} {kind}",
                 f"the job has nodes × gpus_per_node = {nodes} × {gpus_per_node} GPUs")


def mesh_on(mesh_cfg, devices: int, granules: int, where: str,
            job: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The mesh's (ICI shape, DCN shape) on `devices` in `granules` DCN groups (`where` says what
  holds them), or the ConfigError `mesh.make_mesh` would raise, with `job` saying what runs it."""
  from vitok_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  try:
    ici, dcn = mesh_lib.mesh_shapes(mesh_cfg, devices, granules=granules)
    mesh_lib.check_dcn_groups(dcn, granules, where)
  except ConfigError as e:
    raise ConfigError(f"{e} ({job})") from None
  return ici, dcn
