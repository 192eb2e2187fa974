r"""Trains the FID-MNIST classifier on the bundled MNIST and writes its weights (.npz).

  PYTHONPATH=. python tools/train_mnist_classifier.py --out runs/mnist_classifier.npz [--steps 600]
      [--eval_size N]  (the data.eval_size of the runs it scores: their held-out digits left out)

About a minute on 2 CPU cores; the held-out accuracy is printed (≈0.98 at the default 600 steps).
Evaluators call `mnist_classifier.load_or_train(path)`, which does the same on first use.
"""
from __future__ import annotations

import argparse

from vitok_jax.models.perceptual import mnist_classifier, weights


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=mnist_classifier.DEFAULT_FILENAME)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval_size", type=int, default=0, help="data.eval_size (0 = default)")
  args = parser.parse_args(argv)
  if args.eval_size < 0:
    parser.error(f"--eval_size={args.eval_size} must be >= 0 (0 = the default 10%)")
  params, accuracy = mnist_classifier.train(args.steps, seed=args.seed, eval_size=args.eval_size)
  weights.save(args.out, params)
  print(f"wrote {args.out}; held-out accuracy {accuracy:.4f}")


if __name__ == "__main__":
  main()
