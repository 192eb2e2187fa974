"""Launchers: one JobSpec rendered to local processes, a SLURM batch script or TPU-pod commands."""
from vitok_jax.launch.jobspec import JobSpec
from vitok_jax.launch.local import launch_local, local_commands
from vitok_jax.launch.slurm import render_sbatch
from vitok_jax.launch.tpu import render_tpu_commands

__all__ = ["JobSpec", "launch_local", "local_commands", "render_sbatch", "render_tpu_commands"]
