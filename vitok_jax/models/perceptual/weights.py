"""Weight files of the frozen perceptual networks: our .npz format and reading PyTorch's files.

Our format is one .npz per network whose keys are '/'-joined flax param paths ("vgg/conv1_1/kernel")
and whose values are float32 arrays in flax layouts. It loads with numpy alone, so evaluation and
training never need torch; only the converters in tools/ read PyTorch files (the `torch` extra).
"""
from __future__ import annotations

import os

import flax
import numpy as np

from vitok_jax.errors import ConfigError


def save(path: str, params) -> None:
  """Writes a params tree (nested dicts of arrays) as a flat .npz."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # A file object keeps numpy from appending a second ".npz".
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
  with np.load(path) as f:
    flat = {k: f[k] for k in f.files}
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch .pth/.pt state dict as numpy arrays (needs the optional `torch` extra)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading PyTorch weights needs torch: pip install 'vitok_jax[torch]'") from e
  state = torch.load(path, map_location="cpu", weights_only=False)
  if hasattr(state, "state_dict"):  # A pickled or scripted module rather than its state dict.
    state = state.state_dict()
  if "state_dict" in state:
    state = state["state_dict"]
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


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
