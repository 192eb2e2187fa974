r"""Converts the published LPIPS-VGG weights (PyTorch) into vitok_jax's .npz (needs the torch extra).

  pip install torch==2.13.0   # or: pip install 'vitok_jax[torch]'
  PYTHONPATH=. python tools/convert_lpips.py --vgg vgg16-397923af.pth \
      --lin <site-packages>/lpips/weights/v0.1/vgg.pth --out weights/lpips_vgg.npz

--vgg is torchvision's ImageNet VGG16 file (keys features.{i}.weight/bias); --lin is the lpips
package's v0.1 linear-head file (keys lin{k}.model.1.weight). A full LPIPS module state dict
(net.slice{s}.{i}.* and lin{k}.*) can be given as --vgg alone. The output loads with numpy only:
set it as the trainer's LPIPS weights path. Shapes are checked against the architecture before
the file is written, and the written file is re-loaded and run once.
"""
from __future__ import annotations

import argparse

import numpy as np

from vitok_jax.models.perceptual import lpips, weights


def convert(vgg_path: str, lin_path: str | None, out_path: str) -> dict:
  state = weights.read_torch_state_dict(vgg_path)
  if lin_path:
    state.update(weights.read_torch_state_dict(lin_path))
  return weights.convert_torch(state, lpips.params_from_torch, lpips.init_params, out_path,
                               "LPIPS weights")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vgg", required=True, help="torchvision VGG16 (or full LPIPS) state dict")
  parser.add_argument("--lin", default=None, help="lpips v0.1 vgg.pth (lin heads)")
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  convert(args.vgg, args.lin, args.out)
  rng = np.random.default_rng(0)
  x, y = rng.uniform(-1, 1, (2, 1, 32, 32, 3)).astype(np.float32)
  value = float(lpips.make_perceptual_fn(lpips.load_params(args.out))(x, y)[0])
  print(f"LPIPS(two uniform-noise images) = {value:.4f}")


if __name__ == "__main__":
  main()
