"""The resolved config of one sweep run: get_config(WORKDIR) reads WORKDIR/config.json.

A sweep (vitok_jax/scaling/sweep.py) writes each run's config there and launches
  vitok train --config=configs/sweeps/_run.py:WORKDIR --workdir=WORKDIR
so a run trains, resumes and re-evaluates from exactly the config its id hashes.
"""
from vitok_jax import config_lib


def get_config(workdir: str):
  return config_lib.read_config(workdir)
