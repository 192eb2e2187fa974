r"""Converts pytorch-fid's FID Inception weights (PyTorch) into vitok_jax's .npz (needs the torch extra).

  pip install torch==2.13.0   # or: pip install 'vitok_jax[torch]'
  PYTHONPATH=. python tools/convert_inception.py \
      --pth pt_inception-2015-12-05-6726825d.pth --out weights/inception_fid.npz

The input is the file pytorch-fid downloads (FID_WEIGHTS_URL in pytorch_fid/inception.py), a state
dict of torchvision module names (Mixed_5b.branch1x1.conv.weight, ...bn.running_var, fc.weight
[1008, 2048]). Our flax modules carry the same names, so the mapping is name for name; shapes are
checked against the architecture before the file is written. The output loads with numpy only.
"""
from __future__ import annotations

import argparse

from vitok_jax.models.perceptual import inception, weights


def convert(pth_path: str, out_path: str) -> dict:
  return weights.convert_and_save(weights.read_torch_state_dict(pth_path),
                                  inception.variables_from_torch, inception.init_variables,
                                  out_path, "FID Inception weights")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  convert(args.pth, args.out)


if __name__ == "__main__":
  main()
