"""Runs the same tiny config for 20 steps on several meshes of 8 fake CPU devices; prints losses.

Run by tests/test_parallel.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.
Output: one JSON line {mesh name: [loss per step]}.
"""
import json
import sys

import jax

from vitok_jax import config_lib, data
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.train import train_tokenizer

MESHES = {
    "single": dict(data=1, fsdp=1, tensor=1),
    "data8": dict(data=8, fsdp=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def losses(mesh_sizes, steps):
  config = config_lib.load_config("vitok:Mu-Mu/4,c=8,res=16,data=mnist,batch=16,lr=2e-3")
  config.mesh.update(mesh_sizes)
  devices = jax.devices()[:1] if mesh_sizes == MESHES["single"] else jax.devices()
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  _, state, train_step, _ = train_tokenizer.setup_training(config, mesh)
  it = data.build_iterator(config.data, "train", batch_size=config.batch_size, seed=config.seed)
  out = []
  for _ in range(steps):
    state, metrics = train_step(state, mesh_lib.global_batch(next(it), mesh_lib.batch_sharding(mesh)))
    out.append(float(metrics["loss"]))
  return out


if __name__ == "__main__":
  steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
  assert jax.device_count() == 8, jax.devices()
  print(json.dumps({name: losses(sizes, steps) for name, sizes in MESHES.items()}))
