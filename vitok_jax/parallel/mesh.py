"""Device meshes from config: axes (data, fsdp, tensor), each an ICI part times a DCN part.

config.mesh = {data, fsdp, tensor}: devices per axis within a slice/node (ICI; -1 = the rest), and
{dcn_data, dcn_fsdp, dcn_tensor}: slices/nodes per axis across the data-centre network (DCN). One
config runs on 1 CPU, 8 fake devices, a GPU node, several nodes or a multi-slice TPU pod.
"""
from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vitok_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # The batch is split over both (FSDP is data parallel too).


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                        dcn_data=1, dcn_fsdp=1, dcn_tensor=1))


def _resolve(sizes: dict[str, int], total: int, what: str) -> tuple[int, ...]:
  """Fills one -1 so the product is `total`; raises when the sizes cannot fit."""
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1 or any(sizes[a] == 0 or sizes[a] < -1 for a in AXES):
    raise ConfigError(f"mesh {what} sizes {sizes}: each must be >= 1, and at most one -1 (the rest)")
  fixed = math.prod(sizes[a] for a in AXES if sizes[a] != -1)
  if total % fixed or (not free and fixed != total):
    raise ConfigError(
        f"mesh {what} sizes {sizes} need {fixed} devices{'' if free else ' exactly'}, but there are "
        f"{total}; make their product {'divide' if free else 'equal'} {total} (or use -1 for one axis)")
  return tuple(total // fixed if sizes[a] == -1 else sizes[a] for a in AXES)


def mesh_shapes(mesh_cfg, num_devices: int,
                granules: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ICI shape, DCN shape) over AXES for `num_devices` devices in `granules` DCN groups (slices or
  processes; default: those of jax.devices()), which a dcn_* size of -1 fills."""
  dcn_sizes = {a: mesh_cfg.get(f"dcn_{a}", 1) for a in AXES}
  if -1 not in dcn_sizes.values():
    granules = math.prod(dcn_sizes.values())  # Given; make_mesh checks it against the devices.
  elif granules is None:
    granules, _ = _granules(jax.devices())
  dcn = _resolve(dcn_sizes, granules, "dcn")
  per_granule = num_devices // math.prod(dcn)
  if num_devices % math.prod(dcn):
    raise ConfigError(f"{num_devices} devices do not split into {math.prod(dcn)} DCN groups")
  ici = _resolve({a: mesh_cfg[a] for a in AXES}, per_granule, "ici")
  return ici, dcn


def _granules(devices) -> tuple[int, str]:
  """(number, kind) of the DCN groups among `devices`: "slices" (TPU slices; on CPU and GPU, XLA
  numbers the hosts), else "processes": the processes of a jax.distributed run on one host all
  report slice_index 0."""
  slices = {d.slice_index for d in devices} if hasattr(devices[0], "slice_index") else set()
  if slices and (devices[0].platform == "tpu" or len(slices) > 1):
    return len(slices), "slices"
  return len({d.process_index for d in devices}), "processes"


def check_dcn_groups(dcn: tuple[int, ...], granules: int, where: str) -> None:
  """Raises ConfigError unless the DCN shape `dcn` is 1 or spans all `granules` DCN groups;
  `where` says what holds them, e.g. "the 8 devices are in 2 processes"."""
  if math.prod(dcn) not in (1, granules):
    raise ConfigError(
        f"mesh dcn sizes {dict(zip(AXES, dcn))} ask for {math.prod(dcn)} DCN groups, but {where}; "
        f"set dcn_data/dcn_fsdp/dcn_tensor so their product is {granules} (e.g. dcn_data=-1), or "
        "all to 1 for a single ICI mesh")


def flat_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh of `mesh_cfg`'s global shape (ICI × DCN sizes per axis) laid out in one grid of
  `devices` (default: all), DCN groups or not: `vitok compile --devices N` screens a multi-host
  config (dcn_data=2, say) on the fake devices of one process. Each device holds what it would
  in the real layout; only which devices talk over DCN differs."""
  devices = list(devices if devices is not None else jax.devices())
  dcn_sizes = [mesh_cfg.get(f"dcn_{a}", 1) for a in AXES]
  granules = 1 if -1 in dcn_sizes else math.prod(dcn_sizes)
  ici, dcn = mesh_shapes(mesh_cfg, len(devices), granules)
  return Mesh(np.asarray(devices).reshape([i * d for i, d in zip(ici, dcn)]), AXES)


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all); a hybrid mesh when DCN > 1."""
  mesh_cfg = mesh_cfg if mesh_cfg is not None else default_config()
  devices = list(devices if devices is not None else jax.devices())
  granules, kind = _granules(devices)
  ici, dcn = mesh_shapes(mesh_cfg, len(devices), granules)
  if math.prod(dcn) > 1:
    check_dcn_groups(dcn, granules, f"the {len(devices)} devices are in {granules} {kind}")
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                process_is_granule=kind == "processes")
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices)
    except (NotImplementedError, ValueError, AssertionError):  # Unknown physical topology.
      grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data × fsdp, everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_split(global_batch: int, shards: int, processes: int, where: str = "") -> None:
  """Raises ConfigError unless the global batch splits over `shards` batch shards and `processes`
  processes; `where` adds where they come from."""
  if global_batch % shards or global_batch % processes:
    step = math.lcm(shards, processes)
    raise ConfigError(f"batch_size={global_batch} must be divisible by the {shards} batch shards "
                      f"(mesh data x fsdp) and {processes} processes{where}; use a multiple of "
                      f"{step}, e.g. {max(step, global_batch // step * step)}")


def per_process_batch(global_batch: int, mesh: Mesh) -> int:
  """Rows each process loads; raises when the global batch does not split over shards/processes,
  or when a batch shard spans processes (a tensor axis across hosts), which would have them load
  the same rows (each process reads its own rows of the stream, `process_rows`)."""
  shards, processes = batch_shards(mesh), jax.process_count()
  check_batch_split(global_batch, shards, processes)
  if processes > 1 and isinstance(mesh, Mesh):  # Rows: batch shards; columns: their devices.
    by_shard = np.vectorize(lambda d: d.process_index)(mesh.devices).reshape(shards, -1)
    if (by_shard != by_shard[:, :1]).any():
      raise ConfigError(
          f"mesh {dict(mesh.shape)}: a batch shard spans processes (mesh.tensor="
          f"{mesh.shape['tensor']} crosses hosts), so they would need the same rows, but each "
          f"process loads its own; keep tensor within a process ({jax.local_device_count()} "
          f"devices) and split processes over data or fsdp (e.g. dcn_data=-1)")
  return global_batch // processes


def process_rows(global_batch: int, mesh: Mesh) -> np.ndarray:
  """The rows of a [global_batch, ...] batch array (`batch_sharding`) this process holds,
  ascending: the order `global_batch` takes its local rows in. One block (process p: rows
  p·B .. p·B + B − 1) when the processes split the batch axes' major part (dcn_data); strided
  when fsdp runs across processes (dcn_fsdp), whose rows interleave."""
  shape = (global_batch,)
  rows = set()
  for index in batch_sharding(mesh).addressable_devices_indices_map(shape).values():
    rows.update(range(*index[0].indices(global_batch)))
  return np.array(sorted(rows), np.int64)


def shared_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array every process holds whole (eval labels, a held-out batch) as a global array
  whose leading axis is split over the batch shards, or replicated where they do not divide it."""
  sharding = batch_sharding(mesh) if len(x) % batch_shards(mesh) == 0 else replicated(mesh)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles the global batch from each process's rows (no host gathers everything)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
