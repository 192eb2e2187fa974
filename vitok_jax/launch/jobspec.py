"""The one job description every launcher renders: what to run, where, on how many processes."""
from __future__ import annotations

import dataclasses
import re
import shlex

from vitok_jax import config_lib
from vitok_jax.errors import ConfigError


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

  def shell_command(self, *extra: str) -> str:
    return " ".join(shlex.quote(a) for a in self.vitok_args(*extra))

  def check_config(self) -> None:
    """Loads the job's config as its processes will (with the overrides) and raises ConfigError
    where `vitok train` would, and where its mesh does not fit the job's GPUs, before anything is
    written or submitted."""
    config = config_lib.apply_overrides(config_lib.load_config(self.config), self.overrides)
    if self.command == "train":
      from vitok_jax import train  # pylint: disable=g-import-not-at-top
      train.validate(config)
    check_mesh(config.mesh, nodes=self.nodes, gpus_per_node=self.gpus_per_node)

  def base_env(self) -> dict[str, str]:
    env = dict(self.env)
    if self.compilation_cache:
      env["VITOK_COMPILATION_CACHE"] = self.compilation_cache
    return env


def check_mesh(mesh_cfg, *, nodes: int, gpus_per_node: int) -> None:
  """Raises ConfigError when `mesh_cfg` does not fit nodes × gpus_per_node GPUs (nothing to check
  for a CPU job: its device count is the processes')."""
  if not gpus_per_node:
    return
  from vitok_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  try:
    mesh_lib.mesh_shapes(mesh_cfg, nodes * gpus_per_node)
  except ConfigError as e:
    raise ConfigError(f"{e} (the job has nodes × gpus_per_node = {nodes} × {gpus_per_node} "
                      "GPUs)") from None
