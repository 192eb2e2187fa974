"""LFDM: torch grid_sample semantics against numpy references, the LFAE, the flow-space DiT, the tool."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitok_jax.data import video
from vitok_jax.errors import ConfigError
from vitok_jax.models import lfdm
from vitok_jax.models import vit

TOOL_PATH = pathlib.Path(__file__).resolve().parent.parent / "tools" / "train_lfdm.py"
TINY = (4, 8)  # LFAE widths: 16×16 frames, 8×8 flow.
# unsafe_rbg keys compile far faster than threefry on CPU (XLA compiles dominate these tests).
key = lambda seed: jax.random.key(seed, impl="unsafe_rbg")


def _ref_grid_sample(x, grid):
  """torch grid_sample(bilinear, zeros, align_corners=False), loop by loop, NHWC numpy float64."""
  b, height, width, c = x.shape
  out = np.zeros(grid.shape[:3] + (c,))
  for n in range(b):
    for i in range(grid.shape[1]):
      for j in range(grid.shape[2]):
        gx, gy = grid[n, i, j]
        ix, iy = ((gx + 1) * width - 1) / 2, ((gy + 1) * height - 1) / 2
        x0, y0 = int(np.floor(ix)), int(np.floor(iy))
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
          w = (1 - abs(ix - xx)) * (1 - abs(iy - yy))
          if 0 <= xx < width and 0 <= yy < height:
            out[n, i, j] += w * x[n, yy, xx]
  return out


def _ref_resize_1d(n_in, n_out):
  """torch bilinear (align_corners=False, no antialias) as an [n_out, n_in] matrix."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(np.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    m[i, i0] += 1 - lam
    m[i, i1] += lam
  return m


def _ref_resize(x, size):
  rows, cols = _ref_resize_1d(x.shape[1], size[0]), _ref_resize_1d(x.shape[2], size[1])
  return np.einsum("ih,jw,bhwk->bijk", rows, cols, x)


def test_grid_sample_matches_torch_reference_with_out_of_range_points():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  grid = rng.uniform(-1.4, 1.4, size=(2, 4, 6, 2)).astype(np.float32)
  grid[0, 0, :4] = [[-1, -1], [1, 1], [-1.2, 0.3], [0.2, 1.3]]  # Borders and half-outside taps.
  grid[1, 0, 0] = [5.0, -5.0]  # Entirely outside: zero.
  out = np.asarray(lfdm.grid_sample(jnp.asarray(x), jnp.asarray(grid)))
  np.testing.assert_allclose(out, _ref_grid_sample(x, grid.astype(np.float64)), atol=1e-5)
  assert np.all(out[1, 0, 0] == 0)
  assert out.shape == (2, 4, 6, 3)


def test_grid_sample_gradients_are_finite():
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 2))
  grid = lfdm.identity_grid(4, 4)[None] + 0.13
  g_x, g_grid = jax.jit(jax.grad(lambda a, g: jnp.sum(lfdm.grid_sample(a, g) ** 2),
                                 argnums=(0, 1)))(x, grid)
  assert np.all(np.isfinite(g_x)) and np.all(np.isfinite(g_grid))
  assert np.abs(g_grid).sum() > 0


def test_identity_grid_is_official_and_shifts_slightly():
  grid = np.asarray(lfdm.identity_grid(5, 7))
  assert grid.shape == (5, 7, 2)
  np.testing.assert_allclose(grid[0, :, 0], np.linspace(-1, 1, 7), atol=1e-6)  # x along columns.
  np.testing.assert_allclose(grid[:, 0, 1], np.linspace(-1, 1, 5), atol=1e-6)  # y along rows.
  x = np.random.default_rng(1).normal(size=(1, 5, 7, 2)).astype(np.float32)
  out = np.asarray(lfdm.grid_sample(jnp.asarray(x), jnp.asarray(grid[None])))
  np.testing.assert_allclose(out, _ref_grid_sample(x, grid[None].astype(np.float64)), atol=1e-5)
  assert not np.allclose(out, x, atol=1e-2)  # The official "identity" is not exact …
  np.testing.assert_allclose(out[0, 2, 3], x[0, 2, 3], atol=1e-5)  # … except at the centre,
  np.testing.assert_allclose(out[0, 0, 0], x[0, 0, 0] / 4, atol=1e-5)  # corners lose 3/4.
  with pytest.raises(ConfigError, match="flow resolution"):
    lfdm.identity_grid(1, 4)


def test_warp_occlusion_blend():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
  grid = jnp.asarray(rng.uniform(-1.1, 1.1, size=(2, 4, 4, 2)), jnp.float32)
  prev = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  warped = lfdm.grid_sample(x, grid)
  ones, zeros = jnp.ones((2, 4, 4, 1)), jnp.zeros((2, 4, 4, 1))
  np.testing.assert_allclose(lfdm.warp(x, grid, ones, prev), warped, atol=1e-6)
  np.testing.assert_allclose(lfdm.warp(x, grid, zeros, prev), prev, atol=1e-6)
  occ = jnp.asarray(rng.uniform(size=(2, 4, 4, 1)), jnp.float32)
  np.testing.assert_allclose(lfdm.warp(x, grid, occ, prev), warped * occ + prev * (1 - occ),
                             atol=1e-6)
  np.testing.assert_allclose(lfdm.warp(x, grid, occ), warped * occ, atol=1e-6)
  np.testing.assert_allclose(lfdm.warp(x, grid), warped, atol=1e-6)
  small = jnp.full((2, 2, 2, 1), 0.25)  # Another size: resized to the grid's.
  np.testing.assert_allclose(lfdm.warp(x, grid, small, prev), 0.25 * warped + 0.75 * prev,
                             atol=1e-6)
  with pytest.raises(ConfigError, match="occlusion"):
    lfdm.warp(x, grid, prev_BhwC=prev)


@pytest.mark.parametrize("src,dst", [((4, 4), (8, 8)), ((3, 5), (7, 4)), ((8, 8), (3, 3))])
def test_resize_grid_is_torch_bilinear_and_unscaled(src, dst):
  rng = np.random.default_rng(3)
  grid = rng.uniform(-1, 1, size=(2, *src, 2)).astype(np.float32)
  out = np.asarray(lfdm.resize_grid(jnp.asarray(grid), dst))
  np.testing.assert_allclose(out, _ref_resize(grid.astype(np.float64), dst), atol=1e-5)
  const = np.asarray(lfdm.resize_grid(jnp.full((1, *src, 2), 0.7), dst))
  np.testing.assert_allclose(const, 0.7, atol=1e-6)  # Values are coordinates: not rescaled.


def test_flow_latent_round_trip():
  rng = np.random.default_rng(4)
  grid = lfdm.identity_grid(4, 4)[None, None] + jnp.asarray(rng.normal(size=(2, 3, 4, 4, 2)) * .1,
                                                             jnp.float32)
  occ = jnp.asarray(rng.uniform(size=(2, 3, 4, 4, 1)), jnp.float32)
  x = lfdm.flows_to_latent(grid, occ, 7.0)
  assert x.shape == (2, 4, 4, 9)
  np.testing.assert_allclose(x[..., 3:5], (grid[:, 1] - lfdm.identity_grid(4, 4)) * 7, atol=1e-5)
  grid2, occ2 = lfdm.latent_to_flows(x, 7.0)
  np.testing.assert_allclose(grid2, grid, atol=1e-5)
  np.testing.assert_allclose(occ2, occ, atol=1e-6)


@pytest.fixture(scope="module")
def clips():
  source = video.MovingMnist("train", 4, 16, 3, 2)
  return jnp.asarray(np.stack([source[i]["image"] for i in range(4)]) / 127.5 - 1, jnp.float32)


@pytest.fixture(scope="module")
def lfae(clips):
  model = lfdm.LFAE(TINY, out_channels=1, num_res=1)
  return model, lfdm.init_lfae(model, key(0), clips.shape[2:])


def test_lfae_shapes_identity_init_and_step_lowers_loss(clips, lfae):
  model, variables = lfae
  out = jax.eval_shape(model.apply, variables, clips[:, 0], clips[:, 1])  # Shapes: no compile.
  assert out["image"].shape == (4, 16, 16, 1) and out["deformed"].shape == (4, 16, 16, 1)
  assert out["grid"].shape == (4, 8, 8, 2) and out["occlusion"].shape == (4, 8, 8, 1)
  assert not np.any(variables["params"]["flow_net"]["head"]["kernel"])  # Grid = identity at init.
  assert model.flow_size((16, 16)) == (8, 8)
  feats = jax.eval_shape(lambda v, x: model.apply(v, x, method=lfdm.LFAE.encode), variables,
                         clips[:, 0])
  assert [f.shape for f in feats] == [(4, 16, 16, 4), (4, 8, 8, 8)]

  tx = optax.adam(3e-3)

  @jax.jit
  def step(v, opt_state):
    (loss, _), grads = jax.value_and_grad(lambda p: lfdm.lfae_loss(model, p, clips),
                                          has_aux=True)(v)
    updates, opt_state = tx.update(grads, opt_state, v)
    return optax.apply_updates(v, updates), opt_state, loss

  v, opt_state = variables, tx.init(variables)
  losses = []
  for _ in range(4):
    v, opt_state, loss = step(v, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  with pytest.raises(ConfigError, match="divisible by 2"):
    model.apply(variables, clips[:, 0, :15], clips[:, 1, :15])


def test_flow_dit_samples_clips_of_the_right_shape(clips, lfae):
  model, variables = lfae
  x1, cond = jax.eval_shape(lambda c: lfdm.encode_clips(model, variables, c, 10.0), clips)
  assert x1.shape == (4, 8, 8, 6) and cond.shape == (4, 8, 8, 8)
  flow_dit = lfdm.FlowDiT(vit.ViTSize(32, 1, 2), flow_channels=6, cond_width=4, patch=2,
                          num_classes=10)
  dit_vars = lfdm.init_flow_dit(flow_dit, key(1), (8, 8), 8)
  labels = jnp.array([0, 1, 2, 3])
  x1, cond = jnp.zeros(x1.shape), jnp.zeros(cond.shape)
  loss, metrics = jax.eval_shape(
      lambda v: lfdm.flow_dit_loss(flow_dit, v, x1, cond, labels, key(2)), dit_vars)
  assert loss.shape == () and "flow_loss" in metrics
  out = jax.jit(lambda first, y, rng: lfdm.generate_video(
      model, variables, flow_dit, dit_vars, first, y, rng, flow_scale=10.0, num_steps=2,
      cfg_scale=1.5))(clips[:, 0], labels, key(3))
  assert out.shape == (4, 3, 16, 16, 1)
  np.testing.assert_array_equal(out[:, 0], clips[:, 0])
  assert np.all(np.isfinite(out))
  with pytest.raises(ConfigError, match="flow_channels"):
    flow_dit.apply(dit_vars, x1[..., :3], jnp.zeros(4), labels, cond, train=False)


@pytest.mark.slow
def test_train_tool_stage1_beats_copy_first_frame(tmp_path):
  spec = importlib.util.spec_from_file_location("train_lfdm", TOOL_PATH)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  result = tool.main(["--workdir", str(tmp_path), "--stage1_steps", "300", "--stage2_steps", "50",
                      "--batch", "8", "--train_clips", "256", "--eval_clips", "16",
                      "--frames", "4", "--ode_steps", "4", "--log_every", "100"])
  stage1, stage2 = result["stage1"], result["stage2"]
  assert stage1["recon_psnr"] > stage1["copy_first_psnr"], stage1
  assert np.isfinite(stage2["gen_psnr"]) and stage2["motion_gen"] > 0
  for name in ("metrics.json", "lfae.npz", "flow_dit.npz", "samples.png", "samples.gif"):
    assert (tmp_path / name).exists(), name
