"""Device meshes. For now one `data` axis over every device (pure data parallelism)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vitok_jax.errors import ConfigError


def data_parallel_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, everything else replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_process_batch(global_batch: int, mesh: Mesh) -> int:
  """Rows each process loads; raises when the global batch does not split over devices/processes."""
  devices, processes = mesh.devices.size, jax.process_count()
  if global_batch % devices:
    raise ConfigError(f"batch_size={global_batch} must be divisible by the {devices} devices; use "
                      f"{max(devices, global_batch // devices * devices)}")
  return global_batch // processes


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles the global batch from each process's rows (no host gathers everything)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
