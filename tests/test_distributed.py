"""Multi-process training on 127.0.0.1 and checkpoints across topologies; launch scripts."""
import dataclasses
import os
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from vitok_jax import ConfigError, config_lib
from vitok_jax.launch import JobSpec, local_commands, render_sbatch, render_tpu_commands
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.train import train_tokenizer

TINY = ("vitok:Mu-Mu/4,c=8,res=16,data=mnist,batch=16,lr=2e-3")
# A constant learning rate, so a run's first 10 steps do not depend on its total_steps.
COMMON = ["--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
          "--config.log_every=5", "--config.ckpt_every=5", "--config.eval_every=1000",
          "--config.eval_examples=32"]


def _vitok(devices, *args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                        f"--xla_force_host_platform_device_count={devices}"}
  out = subprocess.run([sys.executable, "-m", "vitok_jax.cli", *args], capture_output=True,
                       text=True, env=env, timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout + out.stderr


def _params(workdir):
  config = config_lib.read_config(str(workdir))
  mesh = mesh_lib.make_mesh(mesh_lib.default_config(), jax.devices()[:1])
  step, params, _ = train_tokenizer.restore_params(str(workdir), config, mesh)
  return step, jax.tree.map(np.asarray, params)


def test_two_processes_train_then_resume_on_another_mesh_and_process_count(tmp_path):
  """2 processes x 4 devices (a hybrid mesh: fsdp=2 over the processes as DCN groups, data=4
  within each, so each process holds every other row of the batch) train 10 steps; 1 process x
  8 devices (fsdp=8) resumes to step 20. Equals one device training 20 steps: each process loaded
  the examples of its rows, the checkpoint moved across topologies and the data stream continued
  where it stopped."""
  moved, reference = tmp_path / "moved", tmp_path / "reference"
  log = _vitok(4, "launch", "local", "--processes=2", f"--config={TINY},steps=10",
               f"--workdir={moved}", "--config.mesh.data=-1", "--config.mesh.fsdp=1",
               "--config.mesh.dcn_fsdp=-1", *COMMON)
  logs = [open(moved / "logs" / f"process_{i}.log").read() for i in range(2)]
  assert "Process 1 of 2, 4 local / 8 global devices" in logs[1], logs[1][-2000:] + log
  assert "'data': 4, 'fsdp': 2" in logs[0], logs[0][-2000:]
  assert _params(moved)[0] == 10

  out = _vitok(8, "train", f"--config={TINY},steps=20", f"--workdir={moved}",
               "--config.mesh.data=1", "--config.mesh.fsdp=8", *COMMON)
  assert "Resumed from step 10" in out and "'data': 1, 'fsdp': 8" in out
  _vitok(1, "train", f"--config={TINY},steps=20", f"--workdir={reference}", *COMMON)

  step_a, params_a = _params(moved)
  step_b, params_b = _params(reference)
  assert step_a == step_b == 20
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), params_a, params_b)


def test_local_launcher_sets_coordinator_and_process_ids():
  spec = JobSpec(config="vitok:Mu-Mu/4", workdir="/tmp/w", processes_per_node=3,
                 overrides=("--config.total_steps=5",), compilation_cache="/tmp/xla")
  commands = local_commands(spec, port=4321)
  assert [env["VITOK_PROCESS_ID"] for _, env in commands] == ["0", "1", "2"]
  assert {env["VITOK_COORDINATOR"] for _, env in commands} == {"127.0.0.1:4321"}
  assert all(env["VITOK_NUM_PROCESSES"] == "3" and env["VITOK_COMPILATION_CACHE"] == "/tmp/xla"
             for _, env in commands)
  argv = commands[0][0]
  assert argv[-4:] == ["train", "--config=vitok:Mu-Mu/4", "--workdir=/tmp/w",
                       "--config.total_steps=5"]


def test_local_launcher_stops_the_others_when_a_process_fails_and_shows_its_log(
    tmp_path, monkeypatch, capsys):
  """Process 1 fails at once; process 0 (which would wait on it for a minute) is stopped and the
  failure's code and log tail are reported."""
  import time  # pylint: disable=g-import-not-at-top
  from vitok_jax.launch import local  # pylint: disable=g-import-not-at-top
  sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
  failing = [sys.executable, "-c", "import sys; print('boom: no data'); sys.exit(3)"]
  monkeypatch.setattr(local, "local_commands", lambda *_: [(sleeper, {}), (failing, {})])
  start = time.time()
  code = local.launch_local(JobSpec(config="vitok", workdir=str(tmp_path), processes_per_node=2),
                            gpus=[], poll_s=0.05)
  err = capsys.readouterr().err
  assert code == 3 and time.time() - start < 30
  assert "process 1 exited 3 (the first to fail), processes [0] were stopped; exit codes [-15, 3]" \
      in err, err
  assert "boom: no data" in err


def test_slurm_script_runs_one_process_per_gpu_with_the_first_node_as_coordinator(tmp_path):
  spec = JobSpec(config="vitok:S-B/16,c=16,res=256,data=imagenet", workdir="/scratch/sb16",
                 nodes=4, processes_per_node=8, gpus_per_node=8, partition="gpu", time="02:00:00",
                 compilation_cache="/scratch/xla")
  script = render_sbatch(spec)
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00", "#SBATCH --signal=TERM@120",
               "#SBATCH --requeue", 'export VITOK_NUM_PROCESSES="$SLURM_NTASKS"',
               "export VITOK_COMPILATION_CACHE=/scratch/xla"):
    assert line in script.splitlines(), line
  assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in script
  srun = [l for l in script.splitlines() if l.startswith("srun ")]
  assert len(srun) == 1 and 'VITOK_PROCESS_ID="$SLURM_PROCID"' in srun[0]
  # Process i takes entry i of the GPUs SLURM gave the job (not GPU i; i where it set none).
  assert 'export CUDA_VISIBLE_DEVICES="${gpus[$SLURM_LOCALID]:-$SLURM_LOCALID}"' in srun[0]
  task = shlex.split(srun[0])[-1].split("exec ")[0] + 'echo "$CUDA_VISIBLE_DEVICES"'
  for given, want in (("4,5,6,7", "6"), (None, "2"), ("3", "3")):  # "3": bound per task.
    env = {**os.environ, "SLURM_LOCALID": "2"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update({"CUDA_VISIBLE_DEVICES": given} if given else {})
    out = subprocess.run(["bash", "-c", task], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == want, out.stderr
  assert "vitok train --config=vitok:S-B/16,c=16,res=256,data=imagenet --workdir=/scratch/sb16" in srun[0]
  # The script is valid bash.
  path = tmp_path / "job.sbatch"
  path.write_text(script)
  assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
  # One process per node drives all its GPUs: no per-process CUDA_VISIBLE_DEVICES.
  one_per_node = render_sbatch(JobSpec(config="vitok", workdir="/w", nodes=2, gpus_per_node=8))
  assert "CUDA_VISIBLE_DEVICES" not in one_per_node


def test_tpu_commands_use_queued_resources_and_all_workers():
  spec = JobSpec(config="vitok:L-L/16", workdir="/gcs/bucket/ll", tpu_name="pod", zone="us-east5-b",
                 accelerator_type="v5litepod-64", compilation_cache="gs://bucket/xla")
  create, run = render_tpu_commands(spec)
  assert create.startswith("gcloud compute tpus queued-resources create pod --node-id=pod")
  assert "--accelerator-type=v5litepod-64" in create
  assert "tpu-vm ssh pod --zone=us-east5-b --worker=all" in run
  assert "--distributed=auto" in run and "VITOK_COMPILATION_CACHE=gs://bucket/xla" in run
  assert "test -f" not in run  # A config of configs/ is in the checkout.
  _, run = render_tpu_commands(dataclasses.replace(spec, config="/gcs/bucket/cfg.py:L-L/16"))
  assert "test -f /gcs/bucket/cfg.py ||" in run  # A config file every worker must see.
  with pytest.raises(ConfigError, match="a TPU launch needs"):
    render_tpu_commands(JobSpec(config="vitok", workdir="/w"))
  with pytest.raises(ConfigError, match="is a URL.*/gcs/bucket/ll"):  # Runs write local files.
    JobSpec(config="vitok", workdir="gs://bucket/ll")


def test_job_spec_rejects_bad_layouts():
  with pytest.raises(ConfigError, match="must be 1 .* or gpus_per_node"):
    JobSpec(config="vitok", workdir="/w", processes_per_node=3, gpus_per_node=8)
  with pytest.raises(ConfigError, match="must look like --config.a.b=value"):
    JobSpec(config="vitok", workdir="/w", overrides=("--steps=3",))


def test_compile_reports_memory_and_flags_a_config_that_does_not_fit():
  out = _vitok(8, "compile", "--config=vitok:Mu-Mi/4,c=8,res=32,data=mnist,batch=64",
               "--devices=8", "--config.mesh.data=1", "--config.mesh.fsdp=4",
               "--config.mesh.tensor=2", "--device_memory_gb=1")
  assert "GiB per device on mesh {'data': 1, 'fsdp': 4, 'tensor': 2}  fits" in out
  # A two-node config (dcn_data=2 of fsdp=4 nodes), screened on one process's fake devices.
  out = _vitok(8, "compile", "--config=vitok:Mu-Mi/4,c=8,res=32,data=mnist,batch=64",
               "--devices=8", "--config.mesh.data=1", "--config.mesh.fsdp=4",
               "--config.mesh.dcn_data=2")
  assert "GiB per device on mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in out
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  tight = subprocess.run([sys.executable, "-m", "vitok_jax.cli", "compile",
                          "--config=vitok:Mu-Mi/4,c=8,res=32,data=mnist,batch=64", "--devices=8",
                          "--device_memory_gb=0.001"], capture_output=True, text=True, env=env)
  assert tight.returncode == 3 and "DOES NOT FIT in 0.001 GiB per device" in tight.stdout
  # A batch the mesh cannot split is refused before anything is built, as `train` refuses it.
  split = subprocess.run([sys.executable, "-m", "vitok_jax.cli", "compile",
                          "--config=vitok:Mu-Mi/4,c=8,res=32,data=mnist,batch=12", "--devices=8"],
                         capture_output=True, text=True, env=env)
  assert split.returncode == 2 and "batch_size=12 must be divisible by the 8 batch shards" in (
      split.stderr), split.stderr
