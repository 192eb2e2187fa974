"""FVD's I3D: TF-SAME padding, agreement with an independent reference forward, converter round trip."""
import jax
import numpy as np
import pytest

from vitok_jax.models.perceptual import i3d, reference, weights


def tf_same(sizes, kernel, stride):
  """TF's SAME rule, written out again here: out = ceil(n / s); pad = (out − 1)·s + k − n, extra after."""
  pads = []
  for n, k, s in zip(sizes, kernel, stride):
    total = max((-(-n // s) - 1) * s + k - n, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def reference_i3d(ops, video, spatial_of):
  """pytorch-i3d's InceptionI3d forward (time-averaged logits), on any `ops` backend."""
  def unit(x, name, kernel=(1, 1, 1), stride=(1, 1, 1)):
    x = ops.conv(x, f"{name}.conv3d", stride, tf_same(spatial_of(x), kernel, stride))
    return ops.relu(ops.bn(x, f"{name}.bn"))

  def pool(x, kernel, stride):
    return ops.max_pool(x, kernel, stride, tf_same(spatial_of(x), kernel, stride))

  def mixed(x, m):
    b0 = unit(x, f"{m}.b0")
    b1 = unit(unit(x, f"{m}.b1a"), f"{m}.b1b", (3, 3, 3))
    b2 = unit(unit(x, f"{m}.b2a"), f"{m}.b2b", (3, 3, 3))
    b3 = unit(pool(x, (3, 3, 3), (1, 1, 1)), f"{m}.b3b")
    return ops.cat([b0, b1, b2, b3])

  x = ops.input(video)
  x = unit(x, "Conv3d_1a_7x7", (7, 7, 7), (2, 2, 2))
  x = pool(x, (1, 3, 3), (1, 2, 2))
  x = unit(x, "Conv3d_2b_1x1")
  x = unit(x, "Conv3d_2c_3x3", (3, 3, 3))
  x = pool(x, (1, 3, 3), (1, 2, 2))
  x = mixed(mixed(x, "Mixed_3b"), "Mixed_3c")
  x = pool(x, (3, 3, 3), (2, 2, 2))
  for m in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
    x = mixed(x, m)
  x = pool(x, (2, 2, 2), (2, 2, 2))
  x = mixed(mixed(x, "Mixed_5b"), "Mixed_5c")
  window = tuple(min(p, n) for p, n in zip((2, 7, 7), spatial_of(x)))
  x = ops.avg_pool(x, window, (1, 1, 1))
  logits = ops.conv(x, "logits.conv3d", bias=True)
  return ops.output(ops.mean_spatial(logits))


def test_tf_same_padding_puts_the_odd_cell_at_the_end():
  assert i3d.same_padding((224,), (7,), (2,)) == ((2, 3),)
  assert i3d.same_padding((16,), (7,), (2,)) == ((2, 3),)
  assert i3d.same_padding((5,), (3,), (2,)) == ((1, 1),)
  assert i3d.same_padding((4,), (2,), (2,)) == ((0, 0),)
  assert i3d.same_padding((56,), (3,), (2,)) == ((0, 1),)
  for n in range(1, 20):
    for k in (1, 2, 3, 7):
      for s in (1, 2):
        assert i3d.same_padding((n,), (k,), (s,)) == tf_same((n,), (k,), (s,))


@pytest.fixture(scope="module")
def variables():
  return reference.random_variables(i3d.init_variables)


@pytest.fixture(scope="module")
def jax_out(variables):
  # 8 frames at 32×32: the feature map ends at 1×1×1 (the (2,7,7) pool shrinks to fit), every
  # SAME pad along the way has an odd total on some axis.
  video = np.random.default_rng(0).uniform(-1, 1, (2, 8, 32, 32, 3)).astype(np.float32)
  return video, np.asarray(jax.jit(i3d.InceptionI3d().apply)(variables, video)["logits"])


def _check(want, got):
  assert np.abs(want).max() > 0.5  # The random weights keep activations O(1): a meaningful check.
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_matches_numpy_reference_forward(variables, jax_out):
  video, got = jax_out
  ops = reference.NumpyOps(weights.variables_to_torch(variables), i3d.BN_EPS)
  _check(reference_i3d(ops, video, lambda x: x.shape[1:4]), got)


def test_matches_torch_reference_forward(variables, jax_out):
  pytest.importorskip("torch")
  video, got = jax_out
  ops = reference.TorchOps(weights.variables_to_torch(variables), i3d.BN_EPS)
  _check(reference_i3d(ops, video, lambda x: tuple(x.shape[2:5])), got)


def test_converter_round_trips_a_state_dict(variables, tmp_path):
  state = weights.variables_to_torch(variables)
  assert state["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)
  assert "logits.conv3d.bias" in state and "Mixed_5c.b3b.bn.running_var" in state
  back = weights.variables_to_torch(i3d.variables_from_torch(state))
  assert back.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(back[k], state[k])
  weights.save(str(tmp_path / "i3d.npz"), i3d.variables_from_torch(state))
  loaded = i3d.load_variables(str(tmp_path / "i3d.npz"))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_converter_cli_reads_torch_files(variables, tmp_path):
  torch = pytest.importorskip("torch")
  from tools import convert_i3d  # pylint: disable=g-import-not-at-top
  state = {k: torch.from_numpy(np.array(v)) for k, v in weights.variables_to_torch(variables).items()}
  torch.save(state, tmp_path / "i3d.pt")
  convert_i3d.main(["--pth", str(tmp_path / "i3d.pt"), "--out", str(tmp_path / "i3d.npz")])
  for a, b in zip(jax.tree.leaves(i3d.load_variables(str(tmp_path / "i3d.npz"))),
                  jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
