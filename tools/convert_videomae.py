r"""Converts VideoMAE-v2 weights (PyTorch) into vitok_jax's .npz for the TREPA loss.

  pip install torch==2.13.0   # or: pip install 'vitok_jax[torch]'
  PYTHONPATH=. python tools/convert_videomae.py --pth vit_g_hybrid_pt_1200e_ssv2_ft.pth \
      --size g/14 --out weights/videomae_g14.npz

The input is the VideoMAE-v2 ViT state dict (patch_embed.proj, blocks.{i}.attn.qkv with q_bias /
v_bias, blocks.{i}.mlp.fc1/fc2, norm1/norm2, fc_norm), e.g. the ViT-g/14 fine-tuned on
Something-Something v2 that LatentSync's TREPA uses; a training checkpoint that nests it under
"module" or "model" works too. The classifier head is dropped. Shapes are checked against
`videomae.SIZES[--size]` before writing. Use the output as config.perceptual.trepa_weights.
"""
from __future__ import annotations

import argparse
import functools

from vitok_jax.models.perceptual import videomae, weights


def convert(pth_path: str, size: str, out_path: str) -> dict:
  spec = videomae.SIZES[size]
  return weights.convert_and_save(weights.read_torch_state_dict(pth_path),
                                  functools.partial(videomae.params_from_torch, size=spec),
                                  functools.partial(videomae.init_params, size=spec), out_path,
                                  "VideoMAE-v2 weights")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pth", required=True, help="VideoMAE-v2 state dict (.pth)")
  parser.add_argument("--size", default="g/14", choices=sorted(videomae.SIZES))
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  convert(args.pth, args.size, args.out)


if __name__ == "__main__":
  main()
