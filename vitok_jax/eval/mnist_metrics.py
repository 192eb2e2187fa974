"""Embedded-data generation metrics on MNIST: FID-MNIST and class accuracy of conditional samples.

Both use the small classifier of models/perceptual/mnist_classifier.py (trained once, cached in the
work dir): FID-MNIST is the Fréchet distance between its 128-d features of real and generated digits;
class accuracy is how often it reads a class-conditional sample as the class it was asked for.
"""
from __future__ import annotations

import numpy as np

from vitok_jax.eval import fid
from vitok_jax.eval import perceptual_metrics
from vitok_jax.eval import visualize
from vitok_jax.models.perceptual import mnist_classifier


def feature_stats(params, images_BHWC, batch_size: int = 500) -> fid.GaussianStats:
  """Streaming feature statistics of images [N, H, W, C] in [-1, 1], as saved 8-bit images hold
  them (`visualize.as_saved`), at full float32 precision."""
  stats = fid.StreamingStats(mnist_classifier.FEATURE_DIM)
  features = perceptual_metrics.full_precision(mnist_classifier.features)
  for i in range(0, len(images_BHWC), batch_size):
    stats.update(features(params, visualize.as_saved(images_BHWC[i:i + batch_size])))
  return stats.finalize()


def fid_mnist(params, real_BHWC, fake_BHWC) -> float:
  """FID-MNIST between real and generated (or reconstructed) digits, both in [-1, 1]."""
  return fid.fid_from_stats(feature_stats(params, real_BHWC), feature_stats(params, fake_BHWC))


def class_accuracy(params, samples_BHWC, labels_B) -> float:
  """Fraction of samples the classifier assigns to the class they were conditioned on (read as
  saved 8-bit images hold them)."""
  labels = perceptual_metrics.full_precision(mnist_classifier.predict_labels)(
      params, visualize.as_saved(samples_BHWC))
  return float(np.mean(labels == np.asarray(labels_B)))
