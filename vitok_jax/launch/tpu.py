"""Commands for a TPU-VM pod: a queued resource, waited on until ACTIVE, then the job on every host.

A queued resource goes WAITING_FOR_RESOURCES -> PROVISIONING -> ACTIVE (or FAILED, SUSPENDED);
`gcloud compute tpus tpu-vm ssh --worker=all` only reaches the hosts once it is ACTIVE, so the
provisioning step polls its state. Every host needs this repository at JobSpec.repo_dir: with
JobSpec.repo_url the provisioning step clones (when missing) and pip-installs it on every worker,
first checking out JobSpec.repo_ref (a commit, tag or branch) if set, so that every host runs the
same code; without, the job checks that repo_dir exists and fails with a message naming the fix.
"""
from __future__ import annotations

import os
import shlex
from typing import Sequence

from vitok_jax.errors import ConfigError
from vitok_jax.launch import jobspec
from vitok_jax.launch.jobspec import JobSpec

# Default --runtime-version per accelerator family (the part of accelerator_type before "-N").
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# Queued-resource states from which it never becomes ACTIVE.
FAILED_STATES = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")
POLL_S = 30  # Seconds between state polls; the environment variable VITOK_TPU_POLL_S overrides.
# Per family: (the N of FAMILY-N per JAX device, chips per host of a multi-host slice, the largest
# single-host N). v4-N and v5p-N count TensorCores, two per chip, which is one JAX device
# (megacore); v5litepod-N and v6e-N count chips. One process runs on each host.
SLICE_LAYOUT = {"v4": (2, 4, 8), "v5p": (2, 4, 8), "v5litepod": (1, 4, 8), "v6e": (1, 4, 8)}


def runtime_version(spec: JobSpec) -> str:
  """spec.runtime_version, or the default for the family of spec.accelerator_type."""
  if spec.runtime_version:
    return spec.runtime_version
  family = spec.accelerator_type.rsplit("-", 1)[0]
  if family not in RUNTIME_VERSIONS:
    raise ConfigError(
        f"no default TPU runtime version for accelerator_type={spec.accelerator_type!r} (known "
        f"families: {sorted(RUNTIME_VERSIONS)}); set the runtime version: --runtime_version="
        "tpu-ubuntu2204-base to `vitok launch tpu`, --job=runtime_version=tpu-ubuntu2204-base "
        "to `vitok sweep --target=tpu`")
  return RUNTIME_VERSIONS[family]


def slice_devices(accelerator_type: str) -> tuple[int, int] | None:
  """(JAX devices, hosts) of one TPU slice, e.g. v5p-128 → (64, 16), v5litepod-8 → (8, 1); None
  for a family not in SLICE_LAYOUT."""
  family, _, count = accelerator_type.rpartition("-")
  if family not in SLICE_LAYOUT or not count.isdigit():
    return None
  per_device, chips_per_host, single_host = SLICE_LAYOUT[family]
  devices = int(count) // per_device
  return devices, 1 if int(count) <= single_host else max(1, devices // chips_per_host)


def check_layout(config, accelerator_type: str) -> None:
  """ConfigError where `vitok train` of `config` would fail on one slice of `accelerator_type`,
  before it is provisioned: a mesh that does not fit its devices (one slice is one DCN group, so
  every dcn_* size is 1), a batch that does not split over the mesh and the hosts. An unknown
  family is not checked (its layout is not known here)."""
  shape = slice_devices(accelerator_type)
  if shape is None:
    return
  devices, hosts = shape
  job = f"a {accelerator_type} slice has {devices} devices on {hosts} host(s)"
  shapes = jobspec.mesh_on(config.mesh, devices, 1, "one TPU slice is one DCN group", job)
  jobspec.check_batch_layout(config, shapes, hosts, job)


def _check(spec: JobSpec) -> None:
  missing = [f for f in ("tpu_name", "zone", "accelerator_type") if not getattr(spec, f)]
  if missing:
    raise ConfigError(f"a TPU launch needs {missing}; pass --tpu_name, --zone and "
                      "--accelerator_type")


def _path(path: str) -> str:
  """`path` quoted for a shell, a leading ~/ left unquoted so that it expands on the host."""
  if path.startswith("~/"):
    return "~/" + shlex.quote(path[2:])
  return shlex.quote(path)


def _where(spec: JobSpec) -> str:
  return f"--zone={spec.zone}" + (f" --project={spec.project}" if spec.project else "")


def ssh_all(spec: JobSpec, command: str) -> str:
  """gcloud ssh running the shell `command` on every worker of the pod."""
  return (f"gcloud compute tpus tpu-vm ssh {spec.tpu_name} {_where(spec)} --worker=all "
          f"--command={shlex.quote(command)}")


def release_command(spec: JobSpec) -> str:
  """gcloud command deleting the pod's queued resource (and the pod)."""
  return f"gcloud compute tpus queued-resources delete {spec.tpu_name} {_where(spec)} --force"


def provision_command(spec: JobSpec) -> str:
  """bash lines that get a pod ready: create the queued resource (or reuse one of that name), wait
  until it is ACTIVE (exit 1 on FAILED / SUSPENDING / SUSPENDED / DELETING), and with repo_url clone
  and pip-install the repository on every worker."""
  _check(spec)
  name, where = spec.tpu_name, _where(spec)
  queued = "gcloud compute tpus queued-resources"
  delete = release_command(spec)
  lines = [
      f"{queued} create {name} --node-id={name} --accelerator-type={spec.accelerator_type} "
      f"--runtime-version={runtime_version(spec)} {where} \\",
      f"  || {{ {queued} describe {name} {where} --format='value(name)' >/dev/null \\",
      f"       && echo 'vitok: queued resource {name} exists: using it' >&2; }} || exit 1",
      "while true; do",
      f"  state=$({queued} describe {name} {where} --format='value(state.state)') || exit 1",
      '  case "$state" in',
      "    ACTIVE) break ;;",
      f"    {'|'.join(FAILED_STATES)})",
      f"      echo \"vitok: queued resource {name} is $state and will not become ACTIVE; "
      f"delete it ({delete}) and launch again\" >&2",
      "      exit 1 ;;",
      "  esac",
      f'  echo "vitok: queued resource {name} is ${{state:-?}}; waiting for ACTIVE" >&2',
      f'  sleep "${{VITOK_TPU_POLL_S:-{POLL_S}}}"',
      "done"]
  if spec.repo_url:
    lines.append(ssh_all(spec, install_command(spec)) + " || exit 1")
  return "\n".join(lines)


def install_command(spec: JobSpec) -> str:
  """Shell run on every worker: clone repo_url into repo_dir when missing, check out repo_ref
  (a branch as its latest fetched commit; a ref the remote lacks fails with a message), and
  pip-install the checkout with jax[tpu]."""
  repo = _path(spec.repo_dir)
  steps = [f"{{ test -d {repo} || git clone -q {shlex.quote(spec.repo_url)} {repo}; }}",
           f"cd {repo}"]
  if spec.repo_ref:
    ref = shlex.quote(spec.repo_ref)
    origin_ref = shlex.quote(f"origin/{spec.repo_ref}")
    checkout = (f"git fetch -q --tags origin && {{ git checkout -q --detach {origin_ref} "
                f"2>/dev/null || git checkout -q --detach {ref}; }}")
    steps.append(f"{{ {{ {checkout}; }} || {{ echo \"vitok: repo_ref {spec.repo_ref} could not "
                 "be checked out on TPU worker $(hostname): push it to repo_url, or pass another "
                 "--repo_ref\" >&2; exit 1; }; }")
  steps.append("python3 -m pip install -q -e . 'jax[tpu]'")
  return " && ".join(steps)


def job_command(spec: JobSpec, *, require: Sequence[str] = ()) -> str:
  """gcloud ssh --worker=all running the job from repo_dir on every host, one process per host
  (jax.distributed finds the pod on its own: --distributed=auto). A missing repo_dir, or a missing
  file of `require` (paths the job reads), fails on the worker with a message naming the fix."""
  _check(spec)
  if not os.path.isabs(spec.workdir):
    raise ConfigError(f"--workdir={spec.workdir!r}: a TPU job needs an absolute path, on a file "
                      "system every worker mounts there (a relative one is resolved on each "
                      "worker in its own checkout)")
  # The paths go into the messages as quoted words (adjacent to the double-quoted text), so a
  # quote, $ or backtick in them is printed, not run by the worker's shell.
  repo = _path(spec.repo_dir)
  steps = [f"cd {repo} 2>/dev/null || {{ echo \"vitok: \"{shlex.quote(spec.repo_dir)}\" not "
           "found on TPU worker $(hostname): pass --repo_url to clone and install it there, or "
           f"check out and pip-install vitok_jax at --repo_dir on every worker\" >&2; exit 1; }}"]
  for path in require:
    steps.append(f"test -f {_path(path)} || {{ echo \"vitok: \"{shlex.quote(path)}\" not found "
                 "on TPU worker $(hostname): it must be on a file system every worker mounts at "
                 "the same path (NFS, Filestore, a bucket mounted with gcsfuse)\" >&2; exit 1; }")
  env = [f"{k}={shlex.quote(v)}" for k, v in spec.base_env().items()]
  # `python3 -m` rather than the `vitok` script, which a user install puts off a non-login PATH.
  argv = ["python3", "-m", "vitok_jax.cli", *spec.vitok_args("--distributed=auto")[1:]]
  steps.append(" ".join(env + [shlex.join(argv)]))
  return ssh_all(spec, "; ".join(steps))


def render_tpu_commands(spec: JobSpec) -> list[str]:
  """Two bash snippets, run in order: provision_command (create, wait for ACTIVE, install) and
  job_command (the job on --worker=all; a --config PATH.py must be there on every worker, as a
  path from repo_dir when relative)."""
  config_file = spec.config.partition(":")[0]
  return [provision_command(spec),
          job_command(spec, require=[config_file] if config_file.endswith(".py") else [])]
