"""Running a pallas_call on each device's shard under a mesh.

A pallas_call has no partitioning rule: under a multi-device jit XLA gathers its operands and runs
the whole batch on every device. The kernels' wrappers (`attention.per_shard`, `quantize.bsq`,
`quantize.vq_nearest`) therefore call them inside a `jax.shard_map` over the mesh axes that the
logical sharding rules (`parallel.sharding.rules`, under which the trainers trace) give the batch
or the heads. Outside such a context, or on one device, the kernel is called as is. Under
`sharding.rules` the shard_map gets the device mesh (`sharding.active_mesh`), so it also places
inputs the caller left unplaced.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from vitok_jax.parallel import sharding


def divisible_axes(logical: str, size: int, mesh):
  """The mesh axes the logical rules give `logical` ("batch", "act_heads"), cut to the longest
  prefix whose product divides `size` as the parameter shardings are (`fit_to_shapes`); None
  (replicated) if the mesh lacks one of them or not even the first divides."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  if any(name not in mesh.shape for name in names):
    return None
  return sharding.divisible_prefix(axes, size, mesh)


def run(kernel, *args, in_specs, out_specs, mesh):
  """kernel(*args) in a shard_map over `mesh` (no replication checks: the kernels are opaque)."""
  return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)
