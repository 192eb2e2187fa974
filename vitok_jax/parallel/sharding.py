"""Sharding by name: the one table mapping logical axis names to mesh axes.

Parameters carry names such as ("embed", "mlp") (see models/vit.py `partitioned`); activations are
constrained with ("batch", "length", "act_embed"). Parameters are sharded over `fsdp` along
`embed` (FSDP: weights and optimizer state split, gathered per layer) and over `tensor` along
`mlp`/`heads` (tensor parallelism); activations along batch over data × fsdp, and along
heads/mlp over `tensor`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical name -> mesh axis (or axes, or None = replicated). First match wins per dimension;
# flax skips a mesh axis already used by another dimension of the same array.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("patch", None),
    ("latent", None),
    ("vocab", "tensor"),
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
)


def logical_to_mesh(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES, shapes=None):
  """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`.

  With `shapes` (the same tree of arrays / ShapeDtypeStructs, e.g. the abstract train state), a
  dimension whose size the mesh axes of its rule do not divide (width 64 on tensor=3, a bitwise
  head's 2·d logits on tensor=4, 11 class rows) keeps only the leading axes that divide it,
  replicated when none does, and a warning names it. Without `shapes` such a leaf fails later,
  in jit/device_put, with an IndivisibleError that does not name the parameter.
  """
  shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
  if shapes is None:
    return shardings
  return fit_to_shapes(shardings, shapes)


def divisible_prefix(axes, size: int, mesh: Mesh):
  """The longest prefix of mesh `axes` (a name, tuple of names or None) whose product divides
  `size`, in the same form; None when not even the first does."""
  if axes is None:
    return None
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  kept, product = [], 1
  for name in names:
    if size % (product * mesh.shape[name]):
      break
    kept.append(name)
    product *= mesh.shape[name]
  if len(kept) == len(names):
    return axes
  return (kept[0] if len(kept) == 1 else tuple(kept)) if kept else None


def fit_to_shapes(shardings, shapes):
  """`shardings` (a tree of NamedShardings) with every dimension that its mesh axes do not
  divide sharded over fewer axes (see `logical_to_mesh`); logs each change."""
  changed = []

  def fit(path, sharding, leaf):
    if not isinstance(sharding, NamedSharding) or not hasattr(leaf, "shape"):
      return sharding
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    fitted = tuple(divisible_prefix(axes, size, sharding.mesh)
                   for axes, size in zip(spec, leaf.shape))
    if fitted == spec[:len(leaf.shape)]:
      return sharding
    changed.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}: {spec} -> {fitted}")
    return NamedSharding(sharding.mesh, P(*fitted))

  out = jax.tree_util.tree_map_with_path(
      fit, shardings, shapes, is_leaf=lambda x: isinstance(x, NamedSharding))
  if changed:
    more = f"\n  ... and {len(changed) - 10} more" if len(changed) > 10 else ""
    logging.warning("%d arrays have dimensions the mesh axes of their sharding rule do not "
                    "divide; sharded over fewer axes (replicated where none divides):\n  %s%s",
                    len(changed), "\n  ".join(changed[:10]), more)
  return out


def param_logical_specs(boxed_params):
  """Logical PartitionSpecs of a (possibly abstract) boxed params tree from `model.init`."""
  return nn.get_partition_spec(boxed_params)


def opt_state_logical_specs(tx: optax.GradientTransformation, abstract_opt_state, param_specs):
  """Optimizer-state specs: moments follow their parameter's spec, counters are replicated.

  Frozen parameters (optax.multi_transform with set_to_zero) hold a MaskedNode, kept as is.
  """
  masked = optax.transforms.MaskedNode
  return optax.tree_map_params(
      tx, lambda leaf, spec: leaf if isinstance(leaf, masked) else spec, abstract_opt_state,
      param_specs, transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, (P, masked)))


def describe(shardings) -> dict[str, str]:
  """{"path/to/param": "PartitionSpec(...)"}: for golden tests and logs."""
  flat = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, (NamedSharding, P)))[0]
  out = {}
  for path, leaf in flat:
    spec = leaf.spec if isinstance(leaf, NamedSharding) else leaf
    out["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)] = str(tuple(spec))
  return out


# The device mesh of the innermost `rules`: jax's context inside jit holds only its abstract mesh.
_MESH = contextvars.ContextVar("vitok_jax_mesh", default=None)


@contextlib.contextmanager
def rules(mesh: Mesh, axis_rules=LOGICAL_AXIS_RULES):
  """Activates `mesh` (abstractly: usable while tracing under jit) and the logical axis rules,
  so activation constraints in the models resolve to mesh axes."""
  token = _MESH.set(mesh)
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(axis_rules):
      yield
  finally:
    _MESH.reset(token)


def active_mesh():
  """The mesh being traced under: the device `Mesh` of `rules` where it is jax's abstract mesh,
  else that abstract mesh (set some other way), or None; None also for one device. jit caches by
  the abstract mesh: a function traced under `rules(m1)` and called again, with inputs left
  unplaced, under `rules(m2)` of the same shape runs on m1's devices (`with_rules` binds one
  mesh per function, as the trainers use it)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  devices = _MESH.get()
  return devices if devices is not None and devices.abstract_mesh == mesh else mesh


def with_rules(fn, mesh: Mesh, axis_rules=LOGICAL_AXIS_RULES):
  """`fn` traced under `rules(mesh)`, so activation constraints resolve to mesh axes."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with rules(mesh, axis_rules):
      return fn(*args, **kwargs)
  return wrapped
