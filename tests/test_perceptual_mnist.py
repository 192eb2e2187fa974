"""The embedded-data classifier: accuracy, FID-MNIST ordering (real < blurred < noise), caching."""
import os

import jax
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from vitok_jax.data import bundled
from vitok_jax.eval import mnist_metrics, perceptual_metrics
from vitok_jax.models.perceptual import mnist_classifier, weights


@pytest.fixture(scope="module")
def trained():
  # A short run (the default is 600 steps); enough for the ordering below and for > 85% accuracy.
  return mnist_classifier.train(steps=60)


def _digits(split):
  x, y = bundled.mnist(split)
  return x.astype(np.float32) / 127.5 - 1.0, y


def test_classifier_learns_mnist(trained):
  _, accuracy = trained
  assert accuracy > 0.85


def test_fid_mnist_orders_real_blurred_noise(trained):
  params, _ = trained
  real, _ = _digits("train")
  held_out, labels = _digits("eval")  # 500 digits the classifier never saw.
  reference = real[:1500]
  blurred = ndimage.gaussian_filter(held_out, sigma=(0, 1.5, 1.5, 0))
  noise = np.random.default_rng(0).uniform(-1, 1, held_out.shape).astype(np.float32)
  scores = {name: mnist_metrics.fid_mnist(params, reference, images)
            for name, images in (("real", held_out), ("blurred", blurred), ("noise", noise))}
  assert scores["real"] < scores["blurred"] < scores["noise"], scores
  assert scores["real"] < 0.2 * scores["blurred"], scores
  # Class accuracy of "class-conditional samples": real digits with their labels vs shuffled labels.
  assert mnist_metrics.class_accuracy(params, held_out, labels) > 0.85
  assert mnist_metrics.class_accuracy(params, held_out, np.roll(labels, 1)) < 0.3


def test_other_resolutions_and_rgb(trained):
  params, _ = trained
  x = np.zeros((2, 32, 32, 3), np.float32)
  assert mnist_classifier.features(params, x).shape == (2, mnist_classifier.FEATURE_DIM)


def test_load_or_train_caches(trained, tmp_path, monkeypatch):
  params, _ = trained
  path = str(tmp_path / "clf.npz")
  monkeypatch.setattr(mnist_classifier, "train", lambda steps, eval_size: (params, 1.0))
  first = mnist_classifier.load_or_train(path)
  monkeypatch.setattr(mnist_classifier, "train", lambda *a, **kw: pytest.fail("retrained"))
  second = mnist_classifier.load_or_train(path)
  np.testing.assert_array_equal(first["conv0"]["kernel"], second["conv0"]["kernel"])
  assert os.listdir(tmp_path) == ["clf.npz"]  # Written through a tmp file, renamed.


def test_only_process_zero_trains_the_classifier(trained, tmp_path, monkeypatch):
  """Process 1 of 2 does not train: it waits at the barrier for process 0's file and loads it, so
  every process scores with the same network."""
  params, _ = trained
  path = str(tmp_path / "clf.npz")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(mnist_classifier, "train",
                      lambda *a, **kw: pytest.fail("process 1 trained"))
  barrier = lambda name: weights.save(path, params)  # Process 0 finishes while 1 waits.
  monkeypatch.setattr(mnist_classifier.multihost_utils, "sync_global_devices", barrier)
  loaded = mnist_classifier.load_or_train(path)
  np.testing.assert_array_equal(loaded["conv0"]["kernel"], params["conv0"]["kernel"])


def test_the_classifier_never_trains_on_digits_a_run_holds_out(trained, tmp_path, monkeypatch):
  """A run with data.eval_size = 1000 holds out twice the default 500 digits: its classifier
  trains on the other 4000 (the default one trains on 4500, half of those 1000 among them), and
  is cached under its own name, so the default-split classifier is not reused for it."""
  read, real_mnist = [], bundled.mnist
  def recording_mnist(split, eval_size=0):
    x, y = real_mnist(split, eval_size)
    read.append((split, len(x), set(map(bytes, x))))
    return x, y
  monkeypatch.setattr(bundled, "mnist", recording_mnist)
  mnist_classifier.train(steps=1, eval_size=1000)
  (train_split, n_train, train_digits), (eval_split, n_eval, eval_digits) = read
  assert (train_split, n_train, eval_split, n_eval) == ("train", 4000, "eval", 1000)
  assert not train_digits & eval_digits
  # The evaluators pass the run's data.eval_size down to where the classifier is cached.
  params, _ = trained
  calls = []
  monkeypatch.setattr(mnist_classifier, "train",
                      lambda steps, eval_size: calls.append(eval_size) or (params, 1.0))
  cfg = ml_collections.ConfigDict({"mnist_classifier": ""})
  perceptual_metrics.load_networks(("fid_mnist",), cfg, str(tmp_path), mnist_eval_size=1000)
  assert calls == [1000] and os.listdir(tmp_path) == ["mnist_classifier_eval1000.npz"]


@pytest.mark.slow
def test_default_classifier_is_accurate():
  _, accuracy = mnist_classifier.train()
  assert accuracy > 0.97
