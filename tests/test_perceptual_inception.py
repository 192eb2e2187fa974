"""FID Inception (pytorch-fid variant): agreement with an independent reference forward, preprocessing, converter."""
import jax
import numpy as np
import pytest

from vitok_jax.models.perceptual import inception, numpy_ops, reference, weights


def reference_inception(ops, x):
  """pytorch-fid's FID InceptionV3 transcribed from torchvision + pytorch-fid, on any `ops` backend."""
  def basic(x, name, stride=1, padding=0):
    return ops.relu(ops.bn(ops.conv(x, f"{name}.conv", stride, padding), f"{name}.bn"))

  def avg_no_pad(x):
    return ops.avg_pool(x, (3, 3), (1, 1), 1, count_include_pad=False)

  def block_a(x, m):
    b1 = basic(x, f"{m}.branch1x1")
    b5 = basic(basic(x, f"{m}.branch5x5_1"), f"{m}.branch5x5_2", padding=2)
    b3 = basic(basic(basic(x, f"{m}.branch3x3dbl_1"), f"{m}.branch3x3dbl_2", padding=1),
               f"{m}.branch3x3dbl_3", padding=1)
    return ops.cat([b1, b5, b3, basic(avg_no_pad(x), f"{m}.branch_pool")])

  def block_b(x, m):
    b3 = basic(x, f"{m}.branch3x3", stride=2)
    bd = basic(basic(basic(x, f"{m}.branch3x3dbl_1"), f"{m}.branch3x3dbl_2", padding=1),
               f"{m}.branch3x3dbl_3", stride=2)
    return ops.cat([b3, bd, ops.max_pool(x, (3, 3), (2, 2))])

  def block_c(x, m):
    b1 = basic(x, f"{m}.branch1x1")
    b7 = basic(x, f"{m}.branch7x7_1")
    b7 = basic(b7, f"{m}.branch7x7_2", padding=(0, 3))
    b7 = basic(b7, f"{m}.branch7x7_3", padding=(3, 0))
    bd = basic(x, f"{m}.branch7x7dbl_1")
    bd = basic(bd, f"{m}.branch7x7dbl_2", padding=(3, 0))
    bd = basic(bd, f"{m}.branch7x7dbl_3", padding=(0, 3))
    bd = basic(bd, f"{m}.branch7x7dbl_4", padding=(3, 0))
    bd = basic(bd, f"{m}.branch7x7dbl_5", padding=(0, 3))
    return ops.cat([b1, b7, bd, basic(avg_no_pad(x), f"{m}.branch_pool")])

  def block_d(x, m):
    b3 = basic(basic(x, f"{m}.branch3x3_1"), f"{m}.branch3x3_2", stride=2)
    b7 = basic(x, f"{m}.branch7x7x3_1")
    b7 = basic(b7, f"{m}.branch7x7x3_2", padding=(0, 3))
    b7 = basic(b7, f"{m}.branch7x7x3_3", padding=(3, 0))
    b7 = basic(b7, f"{m}.branch7x7x3_4", stride=2)
    return ops.cat([b3, b7, ops.max_pool(x, (3, 3), (2, 2))])

  def block_e(x, m, pool):
    b1 = basic(x, f"{m}.branch1x1")
    b3 = basic(x, f"{m}.branch3x3_1")
    b3 = ops.cat([basic(b3, f"{m}.branch3x3_2a", padding=(0, 1)),
                  basic(b3, f"{m}.branch3x3_2b", padding=(1, 0))])
    bd = basic(basic(x, f"{m}.branch3x3dbl_1"), f"{m}.branch3x3dbl_2", padding=1)
    bd = ops.cat([basic(bd, f"{m}.branch3x3dbl_3a", padding=(0, 1)),
                  basic(bd, f"{m}.branch3x3dbl_3b", padding=(1, 0))])
    return ops.cat([b1, b3, bd, basic(pool(x), f"{m}.branch_pool")])

  x = ops.input(x)
  x = basic(x, "Conv2d_1a_3x3", stride=2)
  x = basic(x, "Conv2d_2a_3x3")
  x = basic(x, "Conv2d_2b_3x3", padding=1)
  x = ops.max_pool(x, (3, 3), (2, 2))
  x = basic(x, "Conv2d_3b_1x1")
  x = basic(x, "Conv2d_4a_3x3")
  x = ops.max_pool(x, (3, 3), (2, 2))
  for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = block_a(x, m)
  x = block_b(x, "Mixed_6a")
  for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = block_c(x, m)
  x = block_d(x, "Mixed_7a")
  x = block_e(x, "Mixed_7b", avg_no_pad)
  x = block_e(x, "Mixed_7c", lambda v: ops.max_pool(v, (3, 3), (1, 1), 1))
  pool = ops.mean_spatial(x)
  return ops.output(pool), ops.output(ops.linear(pool, "fc"))


@pytest.fixture(scope="module")
def variables():
  return reference.random_variables(inception.init_variables)


@pytest.fixture(scope="module")
def state(variables):
  return weights.variables_to_torch(variables)


@pytest.fixture(scope="module")
def jax_out(variables):
  # 75×75 is the smallest input the net takes; the network is the same at 299.
  x = np.random.default_rng(0).uniform(-1, 1, (2, 75, 75, 3)).astype(np.float32)
  return x, jax.jit(inception.FIDInceptionV3().apply)(variables, x)


def _check(reference_out, jax_out, state):
  pool, logits = reference_out
  assert np.abs(pool).max() > 0.5  # The random weights keep activations O(1): a meaningful check.
  np.testing.assert_allclose(jax_out["pool"], pool, atol=1e-4)
  np.testing.assert_allclose(jax_out["logits"], logits, atol=1e-4)
  # The Inception Score's logits: pool3 @ W, without fc's bias (original IS, torch-fidelity).
  unbiased = np.asarray(pool, np.float64) @ np.asarray(state["fc.weight"], np.float64).T
  assert np.abs(np.asarray(logits) - unbiased).max() > 0.05  # The random fc bias shows.
  np.testing.assert_allclose(jax_out["logits_unbiased"], unbiased, atol=1e-4)


def test_matches_numpy_reference_forward(state, jax_out):
  x, out = jax_out
  _check(reference_inception(reference.NumpyOps(state, inception.BN_EPS), x), out, state)


def test_matches_torch_reference_forward(state, jax_out):
  pytest.importorskip("torch")
  x, out = jax_out
  _check(reference_inception(reference.TorchOps(state, inception.BN_EPS), x), out, state)


def test_preprocess_is_torch_bilinear_without_antialias():
  x = np.random.default_rng(1).uniform(-1, 1, (1, 32, 40, 3)).astype(np.float32)
  got = np.asarray(inception.preprocess(x))
  want = 2 * numpy_ops.resize_linear((x.astype(np.float64) + 1) / 2, (299, 299)) - 1
  np.testing.assert_allclose(got, want, atol=1e-5)
  down = np.random.default_rng(2).uniform(-1, 1, (1, 512, 400, 1)).astype(np.float32)
  want = 2 * numpy_ops.resize_linear((down.astype(np.float64) + 1) / 2, (299, 299)) - 1
  # Downsizing: torch (and JAX) place the source taps in float32, 2.4e-5 off the float64 positions.
  np.testing.assert_allclose(inception.preprocess(down), np.repeat(want, 3, -1), atol=1e-4)


def test_resize_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(3).uniform(0, 1, (1, 37, 300, 3))
  for size in ((299, 299), (12, 150)):
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                           mode="bilinear", align_corners=False, antialias=False)
    np.testing.assert_allclose(numpy_ops.resize_linear(x, size),
                               want.permute(0, 2, 3, 1).numpy(), atol=1e-12)
  x32 = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(x32, size=(299, 299), mode="bilinear", align_corners=False)
  got = (np.asarray(inception.preprocess(2 * x.astype(np.float32) - 1)) + 1) / 2
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_converter_round_trips_a_state_dict(variables, state, tmp_path):
  back = weights.variables_to_torch(inception.variables_from_torch(state))
  assert back.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(back[k], state[k])
  assert "fc.weight" in state and state["fc.weight"].shape == (1008, 2048)
  assert state["Mixed_7c.branch_pool.bn.running_var"].shape == (192,)
  weights.save(str(tmp_path / "inception.npz"), inception.variables_from_torch(state))
  loaded = inception.load_variables(str(tmp_path / "inception.npz"))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_converter_cli_reads_torch_files(variables, state, tmp_path):
  torch = pytest.importorskip("torch")
  from tools import convert_inception  # pylint: disable=g-import-not-at-top
  torch_state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  torch_state["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)  # As in real files.
  torch.save(torch_state, tmp_path / "pt_inception.pth")
  convert_inception.main(["--pth", str(tmp_path / "pt_inception.pth"), "--out", str(tmp_path / "i.npz")])
  loaded = inception.load_variables(str(tmp_path / "i.npz"))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
