"""Infinity: bitwise head layout, KV cache, bitwise self-correction, sampling with constant CFG."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok_jax.models import infinity, multiscale, quantizers, sampling, var, vit

SIZE, BITS, CLASSES = 4, 6, 3
SCALES = multiscale.scale_schedule("infinity", SIZE)   # (1, 2, 4): 21 tokens.


def random_params(module, seed, *args):
  """Params of `module.init(*args)` drawn with numpy (no init compile; every gate non-zero)."""
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  rng = np.random.default_rng(seed)

  def draw(x):
    fan_in = int(np.prod(x.shape[:-1])) if x.ndim >= 2 else 10
    return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(fan_in), x.dtype)
  return jax.tree.map(draw, nn.meta.unbox(boxed))["params"]


@pytest.fixture(scope="module")
def setup():
  model = var.VAR(vit.ViTSize(32, 2, 2), SCALES, BITS, CLASSES, head="bitwise", attn_impl="xla")
  residual = multiscale.ResidualQuantizer(BITS, "bsq", "infinity", upsample="bilinear", num_phi=0)
  f = jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, BITS))
  _, codes, _, _ = jax.jit(lambda f: residual.apply({}, f))(f)
  inputs = jax.jit(lambda c: residual.apply({}, c, SIZE, method=residual.teacher_inputs))(codes)
  labels = jnp.array([0, 2])
  params = random_params(model, 1, inputs, labels)
  forward = jax.jit(lambda p, x, y: model.apply(
      {"params": p}, x, y, capture_intermediates=lambda m, _: m.name == "head",
      mutable=["intermediates"]))
  return {"model": model, "residual": residual, "f": f, "codes": codes, "inputs": inputs,
          "labels": labels, "params": params, "forward": forward}


def test_bitwise_head_is_interleaved_and_bit0_is_msb(setup):
  logits, state = setup["forward"](setup["params"], setup["inputs"], setup["labels"])
  raw = np.asarray(state["intermediates"]["head"]["__call__"][0])
  assert raw.shape == (2, 21, 2 * BITS) and logits.shape == (2, 21, BITS, 2)
  for i in range(BITS):          # Output 2i + j is the logit of bit i = j.
    for j in range(2):
      np.testing.assert_array_equal(np.asarray(logits[..., i, j]), raw[..., 2 * i + j])
  # Greedy sampling of bits, packed: bit 0 is the most significant.
  bits = np.random.default_rng(0).integers(0, 2, (2, 4, BITS))
  bit_logits = np.where(np.arange(2) == bits[..., None], 10.0, -10.0)
  sampled = sampling.sample_token(jax.random.key(0, impl="rbg"), jnp.asarray(bit_logits), top_k=1)
  np.testing.assert_array_equal(np.asarray(sampled), bits)
  words = np.asarray(quantizers.pack_bits(sampled.astype(bool)))
  expected = np.array([[int("".join(map(str, b)), 2) for b in row] for row in bits])
  np.testing.assert_array_equal(words[..., 0], expected)
  np.testing.assert_array_equal(np.asarray(var.bit_labels((words.reshape(2, 2, 2, 1),), BITS)),
                                bits)


def test_kv_cache_matches_block_causal_forward(setup):
  model, params, inputs, labels = (setup[k] for k in ("model", "params", "inputs", "labels"))
  full, _ = setup["forward"](params, inputs, labels)
  decode = jax.jit(lambda p, k, x, c: model.apply({"params": p}, k, x, labels, c,
                                                   method=var.VAR.decode_scale), static_argnums=1)
  offsets, cache, out = var.scale_offsets(SCALES), var.init_cache(model, 2), []
  for k in range(len(SCALES)):
    x = None if k == 0 else inputs[:, offsets[k] - 1:offsets[k + 1] - 1]
    logits, cache = decode(params, k, x, cache)
    out.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(out, 1)), np.asarray(full), atol=1e-5,
                             rtol=1e-5)
  # Block-causal: a token of scale 1 changes scales ≥ 1 only.
  moved, _ = setup["forward"](params, inputs.at[:, 1].add(1.0), labels)
  diff_L = np.abs(np.asarray(moved) - np.asarray(full)).max(axis=(0, 2, 3))
  assert diff_L[:1].max() == 0.0 and diff_L[1:].min() > 1e-6


def test_self_correction_without_flips_is_teacher_forcing(setup):
  inputs, labels = jax.jit(lambda f: infinity.self_correction_inputs(
      f, SCALES, jax.random.key(0), 0.0))(setup["f"])
  np.testing.assert_allclose(np.asarray(inputs), np.asarray(setup["inputs"]), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(labels),
                                np.asarray(var.bit_labels(setup["codes"], BITS)))
  assert labels.shape == (2, 21, BITS) and labels.dtype == jnp.int32


def _torch_bilinear(x_BHWC, side: int):
  """numpy torch `bilinear` (= Infinity's `trilinear` on [B, C, 1, h, w]), align_corners=False, no
  antialias: per axis src = max((i + 0.5)·in/out − 0.5, 0), taps ⌊src⌋, ⌊src⌋ + 1 (clamped)."""
  for axis in (1, 2):
    n, rows = x_BHWC.shape[axis], []
    for i in range(side):
      src = max((i + 0.5) * n / side - 0.5, 0.0)
      i0, lam = int(np.floor(src)), src - np.floor(src)
      i1 = min(i0 + 1, n - 1)
      rows.append((1 - lam) * np.take(x_BHWC, i0, axis) + lam * np.take(x_BHWC, i1, axis))
    x_BHWC = np.stack(rows, axis)
  return x_BHWC


def _numpy_self_correction(f, scales, rng, flip_prob_max):
  """Reference (Infinity's `flip_requant`): area-down residual, bits r > 0, flip (masks from
  `flip_bits`), bilinear up; the next input is f_hat *bilinearly* resized (z_interplote_up)."""
  batch, size, _, dim = f.shape
  keys = jax.random.split(rng, len(scales))
  area = lambda x, s: np.einsum("hH,wW,BHWC->BhwC", multiscale.area_matrix(s, x.shape[1]),
                                multiscale.area_matrix(s, x.shape[2]), x)
  f_hat, inputs, labels = np.zeros_like(f), [], []
  for k, s in enumerate(scales):
    r = area(f - f_hat, s) if s != size else f - f_hat
    bits = r > 0
    labels.append(bits.reshape(batch, -1, dim))
    mask = np.asarray(infinity.flip_bits(jnp.zeros(bits.shape, bool), keys[k], flip_prob_max)[0])
    flipped = bits ^ mask
    f_hat = f_hat + _torch_bilinear(np.where(flipped, 1.0, -1.0) / np.sqrt(dim), size)
    if k + 1 < len(scales):
      inputs.append(_torch_bilinear(f_hat, scales[k + 1]).reshape(batch, -1, dim))
  return np.concatenate(inputs, 1), np.concatenate(labels, 1).astype(np.int32)


def test_self_correction_labels_are_requantised_residuals(setup):
  f, rng = setup["f"], jax.random.key(5, impl="rbg")
  inputs, labels = jax.jit(lambda f: infinity.self_correction_inputs(f, SCALES, rng, 0.3))(f)
  ref_inputs, ref_labels = _numpy_self_correction(np.asarray(f, np.float64), SCALES, rng, 0.3)
  np.testing.assert_allclose(np.asarray(inputs), ref_inputs, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(labels), ref_labels)
  # The first scale's labels are the clean ones; later ones follow the corrupted f_hat.
  clean = np.asarray(var.bit_labels(setup["codes"], BITS))
  np.testing.assert_array_equal(np.asarray(labels)[:, :1], clean[:, :1])
  assert (np.asarray(labels)[:, 1:] != clean[:, 1:]).any()


@pytest.mark.parametrize("flip_prob_max", [0.0, 0.3])
def test_next_scale_input_is_bilinear_at_non_power_of_two_ratios(flip_prob_max):
  """16 × 16 latents, schedule (1, 2, 4, 6, 8, 12, 16): inputs are f_hat bilinearly resized
  (16 -> 6 and 16 -> 12 tap two pixels each, unlike area); training (self-correction with no
  flips) and sampling (`next_scale_input` via `teacher_inputs`) build the same inputs."""
  scales = multiscale.scale_schedule("infinity", 16)
  assert scales == (1, 2, 4, 6, 8, 12, 16)
  f = jax.random.normal(jax.random.key(7), (2, 16, 16, BITS))
  rng = jax.random.key(8, impl="rbg")
  inputs, labels = jax.jit(lambda f: infinity.self_correction_inputs(
      f, scales, rng, flip_prob_max))(f)
  assert inputs.shape == (2, multiscale.token_count(scales) - 1, BITS)
  ref_inputs, ref_labels = _numpy_self_correction(np.asarray(f, np.float64), scales, rng,
                                                  flip_prob_max)
  np.testing.assert_allclose(np.asarray(inputs), ref_inputs, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(labels), ref_labels)
  if flip_prob_max:
    return
  residual = multiscale.ResidualQuantizer(BITS, "bsq", "infinity", upsample="bilinear", num_phi=0)
  assert residual.next_input_resize == "bilinear"
  _, codes, _, _ = jax.jit(lambda f: residual.apply({}, f))(f)
  teacher = jax.jit(lambda c: residual.apply({}, c, 16, method=residual.teacher_inputs))(codes)
  np.testing.assert_allclose(np.asarray(teacher), np.asarray(inputs), atol=1e-5)
  # VAR's rule (area) would give other inputs here: the test tells the two apart.
  area_inputs, _ = infinity.self_correction_inputs(f, scales, rng, 0.0, input_resize="area")
  assert np.abs(np.asarray(area_inputs) - ref_inputs).max() > 1e-2


def test_flip_fraction_is_about_p():
  flipped, p_B = jax.jit(lambda k: infinity.flip_bits(jnp.zeros((16, 64, 64), bool), k, 0.3))(
      jax.random.key(1))
  p_B = np.asarray(p_B)
  assert (p_B >= 0).all() and (p_B < 0.3).all() and p_B.std() > 0.03
  np.testing.assert_allclose(np.asarray(flipped).mean(axis=(1, 2)), p_B, atol=0.03)


def test_bitwise_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, BITS, 2)).astype(np.float32)
  bits = rng.integers(0, 2, (2, 5, BITS))
  loss, metrics = var.bitwise_loss(jnp.asarray(logits), jnp.asarray(bits))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, bits[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), ce.mean(), rtol=1e-5)
  correct = logits.argmax(-1) == bits
  np.testing.assert_allclose(float(metrics["bit_accuracy"]), correct.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["token_accuracy"]), correct.all(-1).mean(), rtol=1e-6)


def test_sample_infinity_cfg_one_is_conditional(setup):
  model, params, residual = setup["model"], setup["params"], setup["residual"]
  fn = var.residual_next_input(residual, {}, SIZE)
  labels, rng = jnp.array([1, 2]), jax.random.key(3, impl="rbg")   # rbg: compiles fast.
  plain = infinity.sample_infinity(model, params, labels, rng, fn, cfg_scale=None)
  assert [c.shape for c in plain] == [(2, s, s, 1) for s in SCALES]
  assert all(c.dtype == jnp.uint32 and int(c.max()) < 2**BITS for c in plain)
  one = infinity.sample_infinity(model, params, labels, rng, fn, cfg_scale=1.0)
  for a, b in zip(plain, one):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  guided = infinity.sample_infinity(model, params, labels, rng, fn, cfg_scale=4.0)
  assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(plain, guided))


def test_sample_infinity_top_k_and_top_p_act_on_each_bit(setup):
  """top_k = 1 is greedy per bit and a tiny top_p keeps only each bit's likelier value: the same
  codes (so the family can pass both through), unlike plain sampling."""
  model, params, residual = setup["model"], setup["params"], setup["residual"]
  fn = var.residual_next_input(residual, {}, SIZE)
  labels, rng = jnp.array([1, 2]), jax.random.key(3, impl="rbg")
  greedy = infinity.sample_infinity(model, params, labels, rng, fn, cfg_scale=None, top_k=1)
  nucleus = infinity.sample_infinity(model, params, labels, jax.random.key(4, impl="rbg"), fn,
                                     cfg_scale=None, top_p=0.01)
  for a, b in zip(greedy, nucleus):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  plain = infinity.sample_infinity(model, params, labels, rng, fn, cfg_scale=None)
  assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(plain, greedy))


def test_residual_bsq_passes_infinity_straight_through_gradient(setup):
  """Infinity's multi-scale BSQ passes its straight-through gradient as I to u = z/‖z‖
  (`quantize_new`), √d times BSQ-ViT's I/√d, which `bsq_unit_gradient=False` gives."""
  residual, f = setup["residual"], setup["f"]
  w = jax.random.normal(jax.random.key(3), f.shape)
  grad = lambda quantizer: jax.grad(lambda f: jnp.sum(quantizer.apply({}, f)[0] * w))(f)
  bsq_vit = residual.clone(bsq_unit_gradient=False)
  assert residual.bsq_unit_gradient
  np.testing.assert_allclose(np.asarray(grad(residual)), np.sqrt(BITS) * np.asarray(grad(bsq_vit)),
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(grad(bsq_vit)).max()) > 0
