"""VideoMAE-v2 features and the TREPA loss: reference forwards, torch bicubic, loss properties."""
import argparse
import math

import jax
import numpy as np
import pytest

from vitok_jax.errors import ConfigError
from vitok_jax.models.perceptual import reference, resize, videomae, weights

SIZE = videomae.SIZES["Mu/8"]


def numpy_videomae(state, video, size):
  """VideoMAE-v2 forward_features (mean pooling + fc_norm) on a PyTorch-named state dict, float64."""
  s = {k: np.asarray(v, np.float64) for k, v in state.items()}
  w = s["patch_embed.proj.weight"]  # [D, 3, 2, p, p]
  b, t, h, wd, c = video.shape
  kt, kp = size.tubelet, size.patch
  patches = video.reshape(b, t // kt, kt, h // kp, kp, wd // kp, kp, c)
  patches = patches.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, -1, c * kt * kp * kp)
  x = patches @ w.reshape(w.shape[0], -1).T + s["patch_embed.proj.bias"]
  d = size.width
  pos = np.array([[p / math.pow(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(x.shape[1])])
  pos[:, 0::2], pos[:, 1::2] = np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])
  x = x + pos

  def ln(v, name):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * s[f"{name}.weight"] + s[f"{name}.bias"]

  heads, hd = size.heads, d // size.heads
  erf = np.vectorize(math.erf)
  for i in range(size.depth):
    p = f"blocks.{i}"
    hh = ln(x, f"{p}.norm1")
    bias = np.concatenate([s[f"{p}.attn.q_bias"], np.zeros(d), s[f"{p}.attn.v_bias"]])
    qkv = (hh @ s[f"{p}.attn.qkv.weight"].T + bias).reshape(b, -1, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    logits = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * hd ** -0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = (attn @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, -1, d)
    x = x + out @ s[f"{p}.attn.proj.weight"].T + s[f"{p}.attn.proj.bias"]
    hh = ln(x, f"{p}.norm2") @ s[f"{p}.mlp.fc1.weight"].T + s[f"{p}.mlp.fc1.bias"]
    hh = 0.5 * hh * (1 + erf(hh / math.sqrt(2)))
    x = x + hh @ s[f"{p}.mlp.fc2.weight"].T + s[f"{p}.mlp.fc2.bias"]
  return ln(x.mean(1), "fc_norm")


@pytest.fixture(scope="module")
def params():
  return reference.random_variables(lambda key: videomae.init_params(key, SIZE))


def test_sinusoid_table_interleaves_sin_and_cos():
  table = videomae.sinusoid_table(5, 8)
  np.testing.assert_allclose(table[3, 0], np.sin(3.0), rtol=1e-6)
  np.testing.assert_allclose(table[3, 1], np.cos(3.0), rtol=1e-6)
  np.testing.assert_allclose(table[3, 2], np.sin(3.0 / 10000 ** (2 / 8)), rtol=1e-6)


def test_features_match_numpy_reference(params):
  video = np.random.default_rng(0).uniform(0, 1, (2, 4, 16, 16, 3)).astype(np.float32)
  got = jax.jit(videomae.VideoMAEFeatures(SIZE).apply)({"params": params}, video)
  want = numpy_videomae(videomae.params_to_torch(params, SIZE), video.astype(np.float64), SIZE)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_bicubic_matches_torch_semantics():
  x = np.random.default_rng(1).uniform(-1, 1, (1, 9, 13, 2)).astype(np.float32)
  # Torch-free: one output pixel by the formula, taps clamped at the border, A = -0.75.
  def direct(img, oy, ox, out_h, out_w):
    def taps(o, n_in, n_out):
      src = (o + 0.5) * n_in / n_out - 0.5
      base = math.floor(src)
      return [(min(max(base + k, 0), n_in - 1), float(resize._cubic(src - base - k))) for k in (-1, 0, 1, 2)]
    return sum(wy * wx * img[0, iy, ix] for iy, wy in taps(oy, 9, out_h) for ix, wx in taps(ox, 13, out_w))
  got = np.asarray(resize.resize_bicubic_torch(x, 20, 6))
  for oy, ox in ((0, 0), (19, 5), (7, 3), (10, 0)):
    np.testing.assert_allclose(got[0, oy, ox], direct(x, oy, ox, 20, 6), atol=1e-5)
  torch = pytest.importorskip("torch")
  for size in ((224, 224), (20, 6)):
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                           mode="bicubic", align_corners=False)
    np.testing.assert_allclose(resize.resize_bicubic_torch(x, *size),
                               want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_trepa_loss_properties(params):
  rng = np.random.default_rng(2)
  real = rng.uniform(-1, 1, (2, 4, 12, 12, 3)).astype(np.float32)
  loss = jax.jit(lambda f, r: videomae.trepa_loss(params, SIZE, f, r, resolution=16))
  assert float(loss(real, real)) == pytest.approx(0.0, abs=1e-10)
  noisy = [float(loss(np.clip(real + s * rng.normal(size=real.shape), -1, 1).astype(np.float32), real))
           for s in (0.1, 1.0)]
  assert 0 < noisy[0] < noisy[1] <= 4.0 / SIZE.width + 1e-6  # Unit vectors: MSE ≤ 4/D.
  grad = jax.jit(jax.grad(lambda f: videomae.trepa_loss(params, SIZE, f, real, resolution=16)))(real * 0.5)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_torch_state_dict_round_trip(params):
  state = videomae.params_to_torch(params, SIZE)
  assert state["patch_embed.proj.weight"].shape == (SIZE.width, 3, 2, 8, 8)
  back = videomae.params_from_torch({**state, "head.weight": np.zeros(1)}, SIZE)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(jax.tree.map(np.asarray, params))):
    np.testing.assert_array_equal(a, b)
  # A variant with layer scale would convert without it and compute other features.
  with pytest.raises(ConfigError, match="blocks.0.gamma_1"):
    videomae.params_from_torch({**state, "blocks.0.gamma_1": np.ones(SIZE.width)}, SIZE)


def test_converter_cli_reads_a_nested_torch_checkpoint(params, tmp_path):
  torch = pytest.importorskip("torch")
  from tools import convert_videomae  # pylint: disable=g-import-not-at-top
  state = {k: torch.from_numpy(np.array(v)) for k, v in videomae.params_to_torch(params, SIZE).items()}
  state["head.weight"] = torch.zeros(3, SIZE.width)  # The classifier head is dropped.
  # A training checkpoint: the weights under "module" beside the run's arguments.
  torch.save({"module": state, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "videomae.pth")
  convert_videomae.main(["--pth", str(tmp_path / "videomae.pth"), "--size", "Mu/8",
                         "--out", str(tmp_path / "videomae.npz")])
  real = np.random.default_rng(3).uniform(-1, 1, (1, 4, 16, 16, 3)).astype(np.float32)
  trepa = videomae.load_trepa_fn(str(tmp_path / "videomae.npz"), "Mu/8")
  want = videomae.trepa_loss(params, SIZE, real * 0.5, real, resolution=16)
  np.testing.assert_allclose(trepa(real * 0.5, real, resolution=16), want, rtol=1e-6)
  # bfloat16 weights read as float32; a pickle that would run code on load is refused.
  torch.save({"w": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf16.pth")
  assert weights.read_torch_state_dict(str(tmp_path / "bf16.pth"))["w"].dtype == np.float32
  torch.save({"w": torch.ones(2), "x": _RunsCode()}, tmp_path / "code.pth")
  with pytest.raises(ValueError, match="holds more than tensors"):
    weights.read_torch_state_dict(str(tmp_path / "code.pth"))
  assert not _RunsCode.ran
  torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "scripted.pt"))
  with pytest.raises(ValueError, match="is a TorchScript archive"):
    weights.read_torch_state_dict(str(tmp_path / "scripted.pt"))


class _RunsCode:
  """An object whose unpickling would run code (here, set a flag)."""
  ran = False

  def __reduce__(self):
    return (exec, ("_RunsCode.ran = True",))
