"""Multi-scale residual quantisers (VAR VQ, Infinity BSQ): schedules, torch resizes, prefixes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok_jax import ConfigError
from vitok_jax.kernels import masks
from vitok_jax.models import multiscale, tokenizer, vit


def test_schedules():
  assert multiscale.scale_schedule("var", 16) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  assert multiscale.token_count(multiscale.scale_schedule("var", 16)) == 680
  assert multiscale.scale_schedule("infinity", 64) == multiscale.SCHEDULES["infinity"]
  assert multiscale.scale_schedule("var", 8) == (1, 2, 3, 4, 5, 6, 8)
  assert multiscale.scale_schedule("var512", 32) == masks.VAR_SCALES[2240]
  assert multiscale.token_count(multiscale.scale_schedule("var512", 32)) == 2240


@pytest.mark.parametrize("bottleneck,scales", [("msvq", (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 32)),
                                               ("msvq512", masks.VAR_SCALES[2240])])
def test_a_32_by_32_token_map_is_quantised_on_its_bottlenecks_schedule(bottleneck, scales):
  """msvq keeps the schedule its runs trained with at side 32; msvq512 is VAR's 512p one."""
  model = tokenizer.ViTok(vit.ViTSize(32, 1, 2), vit.ViTSize(32, 1, 2), (2, 2), 1, 4,
                          bottleneck=bottleneck, codebook_size=16)
  rngs = {"params": jax.random.key(0), "sample": jax.random.key(1)}
  image = jnp.zeros((1, 64, 64, 1))
  variables = jax.eval_shape(lambda: model.init(rngs, image, sample=False))
  _, aux, _ = jax.eval_shape(lambda v: model.apply(v, image, sample=False, rngs=rngs,
                                                method=model.encode), variables)
  assert tuple(c.shape[1] for c in aux["codes"]) == scales


def test_area_matrix_overlapping_windows():
  m = multiscale.area_matrix(3, 16)  # Windows [0, 6), [5, 11), [10, 16).
  np.testing.assert_allclose(m[0, :6], 1 / 6)
  np.testing.assert_allclose(m[1, 5:11], 1 / 6)
  assert m[1, 4] == 0 and m[1, 11] == 0
  np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mode,sizes", [("area", [(16, 3), (16, 5), (16, 13), (8, 6)]),
                                        ("bicubic", [(3, 16), (5, 16), (13, 16), (1, 8)]),
                                        ("bilinear", [(3, 16), (6, 8), (2, 16)])])
def test_resize_matches_torch(mode, sizes):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  for in_size, out_size in sizes:
    x = rng.normal(size=(2, in_size, in_size, 3)).astype(np.float32)
    ours = multiscale.resize(jnp.asarray(x), (out_size, out_size), mode)
    kw = {} if mode == "area" else {"align_corners": False}
    ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                          size=(out_size, out_size), mode=mode, **kw)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_phi_index_var_ticks():
  # linspace(1/12, 11/12, 4) against k/9: k = 2 and 7 are exact ties in reals; float64 decides.
  assert [multiscale.phi_index(k, 10) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


# φ of each of VAR's 10 scales for K φ refiners, by VAR's PhiPartiallyShared rule (ticks
# linspace(1/3/K, 1 − 1/3/K, K) for K = 4, its setting, and linspace(1/2/K, 1 − 1/2/K, K) otherwise;
# argmin over |tick − k/9|, first on ties).
VAR_PHI_OF_SCALE = {1: [0] * 10, 2: [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
                    3: [0, 0, 0, 0, 1, 1, 1, 2, 2, 2], 4: [0, 0, 1, 1, 1, 2, 2, 3, 3, 3],
                    6: [0, 0, 1, 1, 2, 3, 3, 4, 5, 5]}


@pytest.mark.parametrize("num_phi", VAR_PHI_OF_SCALE)
def test_phi_index_matches_var_for_any_number_of_phis(num_phi):
  assert [multiscale.phi_index(k, 10, num_phi) for k in range(10)] == VAR_PHI_OF_SCALE[num_phi]


def test_negative_num_phi_is_a_config_error():
  module = multiscale.ResidualQuantizer(4, "vq", "var", codebook_size=8, num_phi=-1)
  with pytest.raises(ConfigError, match="num_phi"):
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4, 4, 4)))


@pytest.mark.parametrize("bottleneck", ["msvq", "msbsq"])
def test_multiscale_bottleneck_rejects_video_token_grids(bottleneck):
  """A (t, h, w) grid of 4·4·4 = 64 tokens used to be quantised as one made-up 8×8 image."""
  def init(patch, shape):
    model = tokenizer.ViTok(vit.ViTSize(32, 1, 2), vit.ViTSize(32, 1, 2), patch, 1, 4,
                            bottleneck=bottleneck)
    rngs = {"params": jax.random.key(0), "sample": jax.random.key(1)}
    return jax.eval_shape(lambda: model.init(rngs, jnp.zeros(shape), sample=False))
  with pytest.raises(ConfigError, match="square 2-D token map.*grid \\(4, 4, 4\\)"):
    init((1, 4, 4), (1, 4, 16, 16, 1))
  init((4, 4), (1, 32, 32, 1))   # An 8 × 8 image grid is fine.


def _quantizer(kind: str, channels: int = 4):
  if kind == "vq":
    return multiscale.ResidualQuantizer(channels, "vq", "var", codebook_size=512, num_phi=0)
  return multiscale.ResidualQuantizer(channels, "bsq", "infinity", upsample="bilinear", num_phi=0)


def _smooth_latents(size=16, channels=4):
  """Low-frequency maps, the kind an encoder's latents are, so coarse scales explain most of it."""
  coarse = jax.random.normal(jax.random.key(0), (4, 4, 4, channels))
  fine = 0.2 * jax.random.normal(jax.random.key(1), (4, size, size, channels))
  return multiscale.resize(coarse, (size, size), "bicubic") + fine


def test_var_reconstruction_error_falls_with_each_scale():
  module = _quantizer("vq")
  f = _smooth_latents()
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(2), f))["params"]
  # A data-like codebook (samples of the residuals' scale), as training would make it.
  params["vq"]["codebook"] = jax.random.normal(jax.random.key(3), (512, 4)) * 0.7
  f_hat, codes, terms, _ = jax.jit(lambda p, f: module.apply({"params": p}, f))(params, f)
  assert [c.shape[1] for c in codes] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
  decode = jax.jit(lambda p, c: module.apply({"params": p}, c, 16, method=module.decode_codes))
  errors = [float(jnp.mean((decode(params, codes[:k]) - f) ** 2)) for k in range(1, len(codes) + 1)]
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  np.testing.assert_allclose(np.asarray(decode(params, codes)), np.asarray(f_hat), atol=1e-5)
  assert set(terms) == {"commit", "codebook"}


def test_var_straight_through_and_phi():
  module = multiscale.ResidualQuantizer(4, "vq", "var", codebook_size=64)
  f = _smooth_latents(8)
  variables = nn.meta.unbox(jax.jit(module.init)(jax.random.key(4), f))
  assert {"phi_0", "phi_1", "phi_2", "phi_3"} <= set(variables["params"])
  w = jax.random.normal(jax.random.key(5), f.shape)
  grad = jax.grad(lambda f: jnp.sum(module.apply(variables, f)[0] * w))(f)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(w), atol=1e-6)


def test_infinity_bsq_codes_decode_to_f_hat():
  module = _quantizer("bsq", channels=6)
  f = _smooth_latents(8, 6)
  variables = jax.jit(module.init)(jax.random.key(6), f)
  f_hat, codes, terms, metrics = jax.jit(module.apply)(variables, f)
  assert [c.shape[1] for c in codes] == [1, 2, 4, 6, 8]
  assert all(c.dtype == jnp.uint32 and c.shape[-1] == 1 for c in codes)
  np.testing.assert_allclose(np.asarray(module.apply(variables, codes, 8, method=module.decode_codes)),
                             np.asarray(f_hat), atol=1e-5)
  assert set(terms) == {"bsq_commit", "bsq_entropy"} and "bsq/bit_entropy_min" in metrics


def _torch_bilinear_1d(x, out_size: int, axis: int):
  """numpy reference of torch `bilinear`/`trilinear`, align_corners=False, no antialias, one axis:
  src = max((i + 0.5)·in/out − 0.5, 0), taps ⌊src⌋ and ⌊src⌋ + 1 (clamped), weight src − ⌊src⌋."""
  in_size = x.shape[axis]
  rows = []
  for i in range(out_size):
    src = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = int(np.floor(src))
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    lam = src - i0
    rows.append((1 - lam) * np.take(x, i0, axis) + lam * np.take(x, i1, axis))
  return np.stack(rows, axis)


def _torch_area_1d(x, out_size: int, axis: int):
  """numpy reference of torch `area` (adaptive average pooling) on one axis."""
  in_size = x.shape[axis]
  rows = [np.take(x, np.arange(i * in_size // out_size, -(-(i + 1) * in_size // out_size)),
                  axis).mean(axis) for i in range(out_size)]
  return np.stack(rows, axis)


def torch_resize(x_BHWC, side: int, mode: str):
  """[B, H, W, C] -> [B, side, side, C] as torch `interpolate(mode)` (numpy, float64)."""
  one_d = {"bilinear": _torch_bilinear_1d, "area": _torch_area_1d}[mode]
  return one_d(one_d(np.asarray(x_BHWC, np.float64), side, 1), side, 2)


@pytest.mark.parametrize("in_size,out_size", [(16, 1), (16, 2), (16, 6), (16, 12), (8, 6),
                                              (6, 16), (3, 16), (12, 13)])
def test_bilinear_matches_numpy_torch_reference_down_and_up(in_size, out_size):
  """No torch needed: downsampling has no antialias (taps 2 pixels however far apart), and
  jax.image.resize(antialias=False) agrees with it too."""
  x = np.random.default_rng(0).normal(size=(2, in_size, in_size, 3)).astype(np.float32)
  ref = torch_resize(x, out_size, "bilinear")
  ours = multiscale.resize(jnp.asarray(x), (out_size, out_size), "bilinear")
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)
  jax_ref = jax.image.resize(jnp.asarray(x), (2, out_size, out_size, 3), "bilinear",
                             antialias=False)
  np.testing.assert_allclose(np.asarray(jax_ref), ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["vq", "bsq"])
def test_next_scale_input_is_area_for_var_and_bilinear_for_infinity(kind):
  """Teacher inputs at non-power-of-two scale ratios (16 -> 1, 3, 5, 6, 12, 13, ...): VAR
  area-downsamples f_hat (`var` schedule), Infinity resizes it bilinearly (z_interplote_up)."""
  module = _quantizer(kind, channels=4)
  assert module.next_input_resize == {"vq": "area", "bsq": "bilinear"}[kind]
  f = _smooth_latents(16, 4)
  variables = nn.meta.unbox(jax.jit(module.init)(jax.random.key(2), f))
  if kind == "vq":   # A data-like codebook (the init is ±1/K), so f_hat is not ~0.
    variables["params"]["vq"]["codebook"] = jax.random.normal(jax.random.key(3), (512, 4)) * 0.7
  _, codes, _, _ = jax.jit(module.apply)(variables, f)
  scales = module.scales(16)
  assert scales == {"vq": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                    "bsq": (1, 2, 4, 6, 8, 12, 16)}[kind]
  inputs = jax.jit(lambda v, c: module.apply(v, c, 16, method=module.teacher_inputs))(
      variables, codes)
  refs, other = [], []
  for k in range(len(scales) - 1):
    f_hat = np.asarray(module.apply(variables, codes[:k + 1], 16, method=module.decode_codes))
    mode, wrong = ("area", "bilinear") if kind == "vq" else ("bilinear", "area")
    refs.append(torch_resize(f_hat, scales[k + 1], mode).reshape(f.shape[0], -1, 4))
    other.append(torch_resize(f_hat, scales[k + 1], wrong).reshape(f.shape[0], -1, 4))
  np.testing.assert_allclose(np.asarray(inputs), np.concatenate(refs, 1), atol=1e-5)
  assert np.abs(np.asarray(inputs) - np.concatenate(other, 1)).max() > 1e-2   # It matters.
  # An explicit input_resize overrides the family's rule.
  area_bsq = multiscale.ResidualQuantizer(4, "bsq", "infinity", upsample="bilinear", num_phi=0,
                                          input_resize="area")
  assert area_bsq.next_input_resize == "area"
