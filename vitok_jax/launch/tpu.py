"""Commands for a TPU-VM pod: create it as a queued resource, then run the job on --worker=all."""
from __future__ import annotations

import shlex

from vitok_jax.errors import ConfigError
from vitok_jax.launch.jobspec import JobSpec


def render_tpu_commands(spec: JobSpec) -> list[str]:
  """gcloud commands: queued-resource create, then ssh --worker=all running the job on every host.

  Every host runs one process; jax.distributed finds the pod on its own (--distributed=auto)."""
  missing = [f for f in ("tpu_name", "zone", "accelerator_type") if not getattr(spec, f)]
  if missing:
    raise ConfigError(f"a TPU launch needs {missing}; pass --tpu_name, --zone and --accelerator_type")
  where = f"--zone={spec.zone}" + (f" --project={spec.project}" if spec.project else "")
  env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.base_env().items())
  job = f"cd {spec.repo_dir} && {env + ' ' if env else ''}{spec.shell_command('--distributed=auto')}"
  return [
      f"gcloud compute tpus queued-resources create {spec.tpu_name} --node-id={spec.tpu_name} "
      f"--accelerator-type={spec.accelerator_type} --runtime-version={spec.runtime_version} {where}",
      f"gcloud compute tpus tpu-vm ssh {spec.tpu_name} {where} --worker=all "
      f"--command={shlex.quote(job)}",
  ]
