"""The dataset-level metric accumulator: streaming results equal direct computations."""
import re

import jax
import ml_collections
import numpy as np
import pytest

from vitok_jax.errors import ConfigError
from vitok_jax.eval import fid, perceptual_metrics, visualize
from vitok_jax.models.perceptual import lpips, mnist_classifier


def _toy_networks():
  """Cheap stand-ins with the real call signatures: deterministic random projections."""
  proj = np.random.default_rng(0).normal(size=(16 * 16, 6))
  bias = np.array([3.0, -2.0, 0.5, 1.0, -4.0])
  feats = lambda x: np.tanh(np.asarray(x).reshape(len(x), -1, x.shape[-1]).mean(-1) @ proj)
  return {
      "lpips": lambda a, b: np.mean((np.asarray(a) - np.asarray(b)) ** 2, axis=(1, 2, 3)),
      # The real net's two logit heads differ by fc's bias; so do these.
      "inception": lambda x: {"pool": feats(x), "logits": feats(x)[:, :5] * 10 + bias,
                              "logits_unbiased": feats(x)[:, :5] * 10},
      "mnist_classifier": feats,
  }


def test_accumulator_equals_one_shot_computation():
  rng = np.random.default_rng(1)
  real = rng.uniform(-1, 1, (30, 16, 16, 1)).astype(np.float32)
  fake = np.clip(real + rng.normal(size=real.shape) * 0.3, -1, 1).astype(np.float32)
  nets = _toy_networks()
  names = ("lpips", "rfid", "inception_score", "fid_mnist")
  acc = perceptual_metrics.MetricAccumulator(names, nets)
  for i in range(0, 30, 8):
    acc.update(real=real[i:i + 8], fake=fake[i:i + 8])
  got = acc.result()
  feats = nets["mnist_classifier"]
  real, fake = (np.asarray(visualize.as_saved(x)) for x in (real, fake))  # What the nets score.
  want_fid = fid.fid_from_stats(fid.stats_of(feats(real)), fid.stats_of(feats(fake)))
  assert got["eval/lpips"] == pytest.approx(float(np.mean(nets["lpips"](real, fake))))
  assert got["eval/rfid"] == pytest.approx(want_fid, rel=1e-9)
  assert got["eval/fid_mnist"] == pytest.approx(want_fid, rel=1e-9)
  # The Inception Score takes pool3 @ W without fc's bias (the original IS code, torch-fidelity).
  assert got["eval/inception_score"] == pytest.approx(
      fid.inception_score(nets["inception"](fake)["logits_unbiased"], 10)[0])
  assert got["eval/inception_score"] != pytest.approx(
      fid.inception_score(nets["inception"](fake)["logits"], 10)[0], rel=1e-3)
  # gFID against saved reference statistics gives the same number.
  ref = perceptual_metrics.MetricAccumulator(("rfid",), nets,
                                             reference_stats={"inception": acc.real_stats("inception")})
  ref.update(fake=fake)
  assert ref.result()["eval/rfid"] == pytest.approx(want_fid, rel=1e-9)


def test_metric_networks_see_pixels_as_a_saved_image_holds_them():
  """Every network gets the 8-bit levels a saved PNG holds (clipped, rounded half up, as the
  image writer rounds): pixels within half a level of one score the same, and out of range
  values as the range's end."""
  levels = np.arange(256, dtype=np.float32).reshape(1, 16, 16, 1)
  x = levels / 127.5 - 1.0
  nudged = x + np.random.default_rng(0).uniform(-0.49, 0.49, x.shape).astype(np.float32) / 127.5
  np.testing.assert_array_equal(np.asarray(visualize.saved_levels(nudged)), levels)
  np.testing.assert_array_equal(visualize._to_uint8(nudged)[..., :1], levels.astype(np.uint8))
  np.testing.assert_array_equal(np.asarray(visualize.as_saved(np.array([-3.0, 2.0]))),
                                [-1.0, 1.0])
  seen = []
  nets = {"mnist_classifier": lambda x: seen.append(np.asarray(x)) or np.zeros((len(x), 2))}
  acc = perceptual_metrics.MetricAccumulator(("fid_mnist",), nets)
  acc.update(real=x, fake=nudged)
  np.testing.assert_array_equal(seen[0], seen[1])
  np.testing.assert_allclose(seen[0], x, atol=1e-6)


def test_metric_networks_trace_at_full_float32_precision():
  """Under `full_precision` the networks' convolutions and matmuls lower at HIGHEST precision
  (TPU's default is one bf16 pass); the same function outside it (training's) keeps DEFAULT."""
  x = np.zeros((1, 28, 28, 1), np.float32)
  params = jax.eval_shape(lambda: mnist_classifier.MNISTClassifier().init(
      jax.random.key(0), x)["params"])
  # Each convolution's and dot's operand precisions, as StableHLO prints them.
  precisions = lambda: re.findall(r"precision (\w+)>|precision = \[(\w+), (\w+)\]",
                                  mnist_classifier.apply.lower(params, x).as_text())
  flat = lambda found: [p for match in found for p in match if p]
  assert set(flat(precisions())) <= {"DEFAULT"}
  seen = flat(perceptual_metrics.full_precision(precisions)())
  assert seen == ["HIGHEST"] * 8  # 2 convolutions and 2 dense layers, 2 operands each.


def test_load_networks_with_real_files(tmp_path):
  # LPIPS from a converted file (random weights) and the cached MNIST classifier.
  shapes = jax.eval_shape(lpips.init_params, jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.05).astype(np.float32), shapes)
  from vitok_jax.models.perceptual import weights  # pylint: disable=g-import-not-at-top
  weights.save(str(tmp_path / "lpips.npz"), params)
  clf = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.1).astype(np.float32),
                     jax.eval_shape(lambda: mnist_classifier.MNISTClassifier().init(
                         jax.random.key(0), np.zeros((1, 28, 28, 1)))["params"]))
  weights.save(str(tmp_path / mnist_classifier.DEFAULT_FILENAME), clf)
  cfg = ml_collections.ConfigDict({"lpips_weights": str(tmp_path / "lpips.npz")})
  nets = perceptual_metrics.load_networks(("lpips", "fid_mnist"), cfg, str(tmp_path))
  assert all(fn.__wrapped__ for fn in nets.values())  # Each at full precision.
  x = rng.uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
  acc = perceptual_metrics.MetricAccumulator(("lpips", "fid_mnist"), nets)
  acc.update(real=x, fake=x)
  out = acc.result()
  assert out["eval/lpips"] == pytest.approx(0.0, abs=1e-6)
  assert abs(out["eval/fid_mnist"]) < 1e-6
  with pytest.raises(ConfigError, match="unknown metrics"):
    perceptual_metrics.load_networks(("psnr2",), cfg)
  with pytest.raises(ConfigError, match=r"\['rfid', 'inception_score'\] need the inception network: "
                     r"set --config\.eval\.inception_weights=FILE \(tools/convert_inception\.py"):
    perceptual_metrics.load_networks(("rfid", "inception_score"), cfg)
  cfg.i3d_weights = str(tmp_path / "missing.npz")  # Set but absent: the file is named.
  with pytest.raises(ConfigError,
                     match=r"\['fvd'\]: eval.i3d_weights='.*missing.npz' does not exist"):
    perceptual_metrics.load_networks(("fvd",), cfg)


def test_a_pytorch_file_given_as_weights_says_to_run_the_converter(tmp_path):
  """torch.save's zip format, a legacy pickle and a bare .npy are no converted .npz: each gets an
  error naming the converter (not numpy's "allow_pickle" advice or a key mismatch)."""
  import pickle  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  from vitok_jax.models.perceptual import weights  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(tmp_path / "zip.pth", "w") as z:  # torch >= 1.6 layout.
    z.writestr("archive/data.pkl", pickle.dumps({}))
    z.writestr("archive/data/0", b"\0" * 16)
  with open(tmp_path / "legacy.pth", "wb") as f:
    pickle.dump({"w": np.zeros(3)}, f)
  np.save(tmp_path / "array.npy", np.zeros(3))
  for name in ("zip.pth", "legacy.pth", "array.npy"):
    with pytest.raises(ConfigError, match=r"is not a converted weight file .* `python tools/conv"):
      weights.load(str(tmp_path / name), "LPIPS weights", "python tools/convert_lpips.py ...")
  weights.save(str(tmp_path / "ok.npz"), {"a": {"b": np.ones(2)}})
  np.testing.assert_array_equal(weights.load(str(tmp_path / "ok.npz"), "x", "y")["a"]["b"], 1.0)


def test_sharded_accumulators_combine_their_processes_like_one(monkeypatch):
  """Two processes' shards of uneven size, combined through a simulated all-gather (a thread per
  process), give exactly the one-process result; `sharded=False` keeps each its own."""
  import threading  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  real = rng.uniform(-1, 1, (30, 16, 16, 1)).astype(np.float32)
  fake = np.clip(real + rng.normal(size=real.shape) * 0.3, -1, 1).astype(np.float32)
  nets, names = _toy_networks(), ("lpips", "rfid", "inception_score", "fid_mnist")
  whole = perceptual_metrics.MetricAccumulator(names, nets)
  whole.update(real=real, fake=fake)
  want = whole.result()

  shards = (slice(0, 17), slice(17, 30))
  process = threading.local()
  barrier, slots = threading.Barrier(2), [None, None]

  def allgather(x):
    slots[process.index] = np.asarray(x)
    barrier.wait()
    out = np.stack(slots)
    barrier.wait()  # Both have read the slots before the next call overwrites them.
    return out

  monkeypatch.setattr(perceptual_metrics.jax, "process_count", lambda: 2)
  monkeypatch.setattr(perceptual_metrics.multihost_utils, "process_allgather", allgather)
  results = [None, None]

  def run(index):
    process.index = index
    acc = perceptual_metrics.MetricAccumulator(names, nets, sharded=True)
    for i in range(shards[index].start, shards[index].stop, 8):
      end = min(i + 8, shards[index].stop)
      acc.update(real=real[i:end], fake=fake[i:end])
    results[index] = acc.result()

  threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  for got in results:
    assert got.keys() == want.keys()
    for name in want:  # LPIPS sums float32 distances batch by batch.
      assert got[name] == pytest.approx(want[name], rel=1e-6 if name == "eval/lpips" else 1e-9)
  alone = perceptual_metrics.MetricAccumulator(names, nets)
  alone.update(real=real[:17], fake=fake[:17])
  assert alone.result()["eval/rfid"] != pytest.approx(want["eval/rfid"], rel=1e-3)
