r"""Saves the Inception statistics of a data split: gFID's reference (config.eval.gfid_reference).

  PYTHONPATH=. python tools/fid_reference.py --tokenizer runs/in256_tokenizer \
      --inception_weights pt_inception.npz --split train --out imagenet256_train_stats.npz

The images are the tokenizer run's data (its config.data) as its eval reads them: the size its
samples decode to, centre-cropped, unflipped, in the fixed one-pass order of the split, all on this
process. --examples N keeps the first N of that order (a sample of the split, not its first
classes). Published ImageNet gFIDs (ADM, DiT, LlamaGen, VAR) score 50k samples against the whole
training set's statistics; ADM's VIRTUAL_imagenet256_labeled.npz holds those as mu / sigma and
works as a reference as it is (they come from TensorFlow's Inception graph, whose resize is not
the half-pixel one ours and pytorch-fid's use). The output holds mu [2048], sigma [2048, 2048]
(ddof 1) and count.
"""
from __future__ import annotations

import argparse

import ml_collections

from vitok_jax import config_lib
from vitok_jax.eval import perceptual_metrics
from vitok_jax.train import train_generator


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokenizer", required=True, help="a tokenizer run: its config.data")
  parser.add_argument("--inception_weights", required=True,
                      help="tools/convert_inception.py's .npz")
  parser.add_argument("--out", required=True, help=".npz to write")
  parser.add_argument("--split", default="train", help="train or eval")
  parser.add_argument("--examples", type=int, default=0, help="first N of the split (0: all)")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--data_path", default="", help="in place of the run's data.path")
  args = parser.parse_args(argv)
  config_lib.require(args.examples >= 0, f"--examples={args.examples} must be >= 0 (0: all)")
  config_lib.require(args.batch_size > 0, f"--batch_size={args.batch_size} must be > 0")
  config = config_lib.read_config(args.tokenizer)
  config_lib.require_kind(config, args.tokenizer, "tokenizer")
  if args.data_path:
    config.data.path = args.data_path
  eval_cfg = ml_collections.ConfigDict({"inception_weights": args.inception_weights})
  nets = perceptual_metrics.load_networks(("rfid",), eval_cfg)
  stats = train_generator.inception_stats(nets, config.data, args.batch_size, args.examples,
                                          args.split)
  with config_lib.atomic_write(args.out, "wb") as f:
    stats.save(f)
  print(f"wrote {args.out}: Inception statistics of {stats.count} {config.data.name} "
        f"{args.split} images")
  return args.out


if __name__ == "__main__":
  main()
