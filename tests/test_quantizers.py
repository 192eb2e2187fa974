"""VQ (LlamaGen) and BSQ quantisers: lookups, straight-through, entropy terms, packing, training."""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vitok_jax.models import bottlenecks, quantizers, tokenizer, vit
from vitok_jax.train import codes as codes_lib


def _np_binary_entropy(p):
  p = np.clip(p, 1e-30, 1 - 1e-16)
  return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def _vq(channels=8, codebook_size=64, **kw):
  module = quantizers.VectorQuantizer(channels, codebook_size, **kw)
  z = jax.random.normal(jax.random.key(0), (3, 20, channels))
  return module, nn.meta.unbox(module.init(jax.random.key(1), z)), z


def test_vq_lookup_equals_numpy_nearest_neighbour():
  module, variables, z = _vq()
  z_q, index, _, _ = module.apply(variables, z)
  codebook = np.asarray(variables["params"]["codebook"], np.float64)
  zn = np.asarray(z, np.float64) / np.linalg.norm(np.asarray(z, np.float64), axis=-1, keepdims=True)
  en = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
  expected = np.argmin(((zn[..., None, :] - en) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(np.asarray(index), expected)
  np.testing.assert_allclose(np.asarray(z_q), en[expected], atol=1e-6)  # Unit-norm code out.


def test_vq_losses_and_straight_through_gradients():
  module, variables, z = _vq(normalize=False)
  w = jax.random.normal(jax.random.key(2), z.shape)

  def out_dot_w(z):
    return jnp.sum(module.apply(variables, z)[0] * w)
  np.testing.assert_allclose(np.asarray(jax.grad(out_dot_w)(z)), np.asarray(w), atol=1e-6)

  _, index, terms, _ = module.apply(variables, z)
  e = np.asarray(variables["params"]["codebook"])[np.asarray(index)]
  expected = np.mean((e - np.asarray(z)) ** 2)
  np.testing.assert_allclose(float(terms["codebook"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(terms["commit"]), expected, rtol=1e-5)
  # codebook moves only the codes, commit only the encoder output.
  loss = lambda p, z, name: module.apply({"params": p}, z)[2][name]
  g_cb_params, g_cb_z = jax.grad(loss, argnums=(0, 1))(variables["params"], z, "codebook")
  g_cm_params, g_cm_z = jax.grad(loss, argnums=(0, 1))(variables["params"], z, "commit")
  assert float(jnp.abs(g_cb_z).max()) == 0 and float(jnp.abs(g_cm_params["codebook"]).max()) == 0
  assert float(jnp.abs(g_cb_params["codebook"]).max()) > 0 and float(jnp.abs(g_cm_z).max()) > 0


def test_vq_codebook_init_rows_as_llamagen_and_larp():
  """LlamaGen stores its uniform(−1/K, 1/K) rows normalised; LARP's kaiming_uniform_ rows are
  uniform(±√(6/C)); without normalisation the rows stay uniform(−1/K, 1/K)."""
  rows = lambda **kw: np.asarray(_vq(channels=16, codebook_size=512, **kw)[1]["params"]["codebook"])
  np.testing.assert_allclose(np.linalg.norm(rows(), axis=-1), 1.0, rtol=1e-5)
  raw = rows(normalize=False)
  assert np.abs(raw).max() <= 1 / 512 and np.abs(raw).max() > 0.9 / 512
  kaiming = rows(codebook_init="kaiming")
  bound = math.sqrt(6 / 16)
  assert np.abs(kaiming).max() <= bound and np.abs(kaiming).max() > 0.95 * bound
  np.testing.assert_allclose(np.linalg.norm(kaiming, axis=-1).mean(), math.sqrt(2), rtol=0.05)
  # At unit rows the lookup's codebook gradient is of the encoder's size, not K times it.
  module, variables, z = _vq(channels=16, codebook_size=512)
  loss = lambda p, z: sum(module.apply({"params": p}, z)[2].values())
  g_params, g_z = jax.grad(loss, argnums=(0, 1))(variables["params"], z)
  assert float(jnp.linalg.norm(g_params["codebook"])) < 10 * float(jnp.linalg.norm(g_z))


def test_vq_entropy_loss_equals_numpy():
  affinity = np.asarray(jax.random.normal(jax.random.key(3), (50, 16))) * 0.05
  logits = affinity / 0.01
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  shifted = logits + 1e-5
  log_probs = shifted - shifted.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  avg = probs.mean(0)
  expected = -np.mean((probs * log_probs).sum(-1)) + np.sum(avg * np.log(avg + 1e-5))
  np.testing.assert_allclose(float(quantizers.vq_entropy_loss(jnp.asarray(affinity))), expected,
                             rtol=1e-4, atol=1e-5)


def test_code_usage_metrics():
  index = jnp.array([0, 0, 1, 3, 3, 3])
  m = quantizers.code_usage_metrics(index, 8)
  p = np.array([2, 1, 3]) / 6
  np.testing.assert_allclose(float(m["vq/usage"]), 3 / 8)
  np.testing.assert_allclose(float(m["vq/dead"]), 5)
  np.testing.assert_allclose(float(m["vq/perplexity"]), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)


def test_ema_update_and_dead_code_restart():
  z = np.asarray(jax.random.normal(jax.random.key(4), (30, 4)))
  index = np.arange(30) % 5
  counts, sums = np.ones(6), np.zeros((6, 4))
  new_counts, new_sums, codebook = quantizers.ema_update(jnp.asarray(counts), jnp.asarray(sums),
                                                         jnp.asarray(z), jnp.asarray(index), decay=0.9)
  hist = np.bincount(index, minlength=6)
  exp_counts = 0.9 * counts + 0.1 * hist
  exp_sums = 0.1 * np.stack([z[index == k].sum(0) if k < 5 else np.zeros(4) for k in range(6)])
  smoothed = (exp_counts + 1e-5) / (exp_counts.sum() + 6e-5) * exp_counts.sum()
  np.testing.assert_allclose(np.asarray(new_counts), exp_counts, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(codebook), exp_sums / smoothed[:, None], rtol=1e-5, atol=1e-6)
  restarted, n = quantizers.restart_dead_codes(codebook, jnp.asarray(hist / 30.0), jnp.asarray(z),
                                               jax.random.key(5))
  assert int(n) == 1  # Code 5 was never used.
  assert any(np.allclose(np.asarray(restarted[5]), row) for row in z)
  np.testing.assert_array_equal(np.asarray(restarted[:5]), np.asarray(codebook[:5]))


@pytest.mark.parametrize("dim", [3, 16, 40])
def test_bsq_unit_norm_pm_entries_and_straight_through(dim):
  z = jax.random.normal(jax.random.key(dim), (2, 10, dim)).at[0, 0, 0].set(0.0)
  q, words, _, _ = quantizers.bsq_quantize(z, impl="xla")
  q = np.asarray(q)
  np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.abs(q), 1 / math.sqrt(dim), rtol=1e-6)
  assert q[0, 0, 0] < 0  # sign(0) -> −1.
  assert words.dtype == jnp.uint32 and words.shape == (2, 10, -(-dim // 32))
  bits = quantizers.unpack_bits(np.asarray(words), dim)
  np.testing.assert_array_equal(bits, np.asarray(z) > 0)
  # Straight-through sign(u) ≈ u, u = z/‖z‖, then the 1/√d scale (BSQ-ViT's code): the gradient
  # is that of u/√d; Infinity's (unit_gradient) that of u.
  w = jax.random.normal(jax.random.key(7), z.shape)
  for unit, scale in ((False, 1 / math.sqrt(dim)), (True, 1.0)):
    grad = jax.grad(lambda z: jnp.sum(
        quantizers.bsq_quantize(z, impl="xla", unit_gradient=unit)[0] * w))(z)
    _, vjp = jax.vjp(lambda z: quantizers.l2_normalize(z) * scale, z)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(vjp(w)[0]), atol=1e-6)


def test_bsq_entropy_terms_equal_numpy():
  dim, beta, gamma = 12, 100.0, 1.0
  z = jax.random.normal(jax.random.key(8), (64, dim)) * 0.02
  _, _, terms, metrics = quantizers.bsq_quantize(z, inv_temperature=beta, gamma=gamma, impl="xla")
  u = np.asarray(z, np.float64)
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  p = 1 / (1 + np.exp(-4 * beta * u / math.sqrt(dim)))  # Soft P(bit = 1).
  token = _np_binary_entropy(p).sum(-1).mean()
  codebook = _np_binary_entropy(p.mean(0)).sum()
  np.testing.assert_allclose(float(metrics["bsq/token_entropy"]), token, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(metrics["bsq/codebook_entropy"]), codebook, rtol=1e-5)
  np.testing.assert_allclose(float(terms["bsq_entropy"]), (token - gamma * codebook) / beta,
                             rtol=1e-4, atol=1e-6)
  hard = (u > 0).mean(0)
  np.testing.assert_allclose(float(metrics["bsq/bit_entropy_mean"]),
                             (_np_binary_entropy(hard) / np.log(2)).mean(), rtol=1e-5)


@pytest.mark.parametrize("dim", [8, 40])
def test_bsq_code_metrics_see_correlated_bits_that_per_bit_balance_misses(dim):
  """Perfectly correlated bits are balanced one by one (bit entropy 1) yet use 2 codes; independent
  random bits use (nearly) all of them. d = 40: the code of the first 16 bits."""
  n, sub = 4096, min(dim, 16)
  quantize = jax.jit(lambda z: quantizers.bsq_quantize(z, impl="xla")[3])
  rng = np.random.default_rng(dim)
  independent = quantize(jnp.asarray(rng.normal(size=(n, dim)), jnp.float32))
  sign_N1 = rng.choice([-1.0, 1.0], size=(n, 1))
  copies = quantize(jnp.asarray(sign_N1 * (1 + rng.random((n, dim))), jnp.float32))
  for metrics in (independent, copies):   # Per bit, both look healthy.
    assert float(metrics["bsq/bit_entropy_min"]) > 0.98
  assert float(copies["bsq/code_perplexity"]) < 2.01
  np.testing.assert_allclose(float(copies["bsq/code_usage"]), 2 / 2**sub)
  np.testing.assert_allclose(float(copies["bsq/bit_correlation"]), 1.0, rtol=1e-5)
  # Near the most a batch of n tokens can show: 2^d' codes, or n distinct ones.
  assert float(independent["bsq/code_perplexity"]) > 0.9 * min(2**sub, n)
  assert float(independent["bsq/bit_correlation"]) < 0.05
  if dim == 8:   # Against numpy: every code hit, exp(H) of the histogram.
    bits = np.asarray(rng.normal(size=(n, dim)) > 0)
    z = np.where(bits, 1.0, -1.0)
    metrics = quantize(jnp.asarray(z, jnp.float32))
    counts = np.bincount((bits * 2 ** np.arange(dim - 1, -1, -1)).sum(-1), minlength=256)
    p = counts[counts > 0] / n
    np.testing.assert_allclose(float(metrics["bsq/code_perplexity"]),
                               np.exp(-(p * np.log(p)).sum()), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["bsq/code_usage"]), (counts > 0).mean())
    corr = np.corrcoef(z.T)[~np.eye(dim, dtype=bool)]
    np.testing.assert_allclose(float(metrics["bsq/bit_correlation"]), np.abs(corr).mean(),
                               rtol=1e-3)


def test_pack_unpack_round_trip_every_width():
  rng = np.random.default_rng(0)
  pack = jax.jit(quantizers.pack_bits)  # One fused compile per width instead of eager op-by-op.
  for dim in range(1, 65):
    bits = rng.random((7, dim)) < 0.5
    words = np.asarray(pack(jnp.asarray(bits)))
    assert words.dtype == np.uint32 and words.shape == (7, -(-dim // 32))
    np.testing.assert_array_equal(quantizers.unpack_bits(words, dim), bits)
    if dim in (1, 31, 32, 33, 64):  # The jnp path of unpack too.
      np.testing.assert_array_equal(np.asarray(quantizers.unpack_bits(jnp.asarray(words), dim)), bits)
    if dim <= 32:  # The code index, bit 0 the most significant.
      expected = (bits.astype(np.uint64) << np.arange(dim - 1, -1, -1, dtype=np.uint64)).sum(-1)
      np.testing.assert_array_equal(words[:, 0], expected)


@pytest.mark.parametrize("name", ["vq1k", "bsq"])
def test_bottleneck_in_vitok_codes_round_trip(name):
  model = tokenizer.ViTok(vit.ViTSize(32, 1, 2), vit.ViTSize(32, 1, 2), (4, 4), 1, 8,
                          bottleneck=name)
  x = jax.random.uniform(jax.random.key(9), (2, 16, 16, 1), minval=-1, maxval=1)
  variables = nn.meta.unbox(model.init({"params": jax.random.key(0)}, x, sample=False))
  recon, aux = jax.jit(lambda v, x: model.apply(v, x, sample=True))(variables, x)
  assert recon.shape == x.shape and set(aux["loss_terms"]) <= set(
      ("commit", "codebook", "vq_entropy", "bsq_entropy", "bsq_commit"))
  z, aux, grid = model.apply(variables, x, method=model.encode)
  decoded = jax.jit(codes_lib.decode_fn(model, grid))(variables["params"], aux["codes"])
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(model.apply(variables, z, grid, method=model.decode)), atol=1e-5)
  assert name in bottlenecks.BOTTLENECKS


def test_bsq_commitment_is_weighted_zero_as_published_and_as_trained_by_older_runs():
  """BSQ-ViT's configs and Infinity's code train BSQ without a commitment term; a run saved
  before `loss.bsq_commit` existed trained it at 0.25 and resumes so."""
  from configs import vitok  # pylint: disable=g-import-not-at-top
  from vitok_jax.train import losses, train_tokenizer  # pylint: disable=g-import-not-at-top
  config = vitok.get_config("Mu-Mu/4,c=8,res=16,data=mnist,quantizer=bsq")
  older = ml_collections.ConfigDict({**config.to_dict(), "loss": {
      k: v for k, v in config.loss.items() if k != "bsq_commit"}})
  model = tokenizer.ViTok(vit.ViTSize(32, 1, 2), vit.ViTSize(32, 1, 2), (4, 4), 1, 8,
                          bottleneck="bsq")
  x = jax.random.uniform(jax.random.key(9), (2, 16, 16, 1), minval=-1, maxval=1)
  variables = nn.meta.unbox(model.init({"params": jax.random.key(0)}, x, sample=False))
  recon, aux = model.apply(variables, x, sample=True)
  commit = float(aux["loss_terms"]["bsq_commit"])
  assert commit > 0
  totals = [float(losses.tokenizer_loss(x, recon, aux, train_tokenizer.loss_weights(c))[0])
            for c in (config, older)]
  assert totals[1] - totals[0] == pytest.approx(0.25 * commit, rel=1e-4)


def _train(quantizer: str, channels: int, steps: int, workdir, **loss):
  from configs import vitok  # pylint: disable=g-import-not-at-top
  from vitok_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from vitok_jax.train import train_tokenizer  # pylint: disable=g-import-not-at-top
  config = vitok.get_config(f"Mu-Mi/4,c={channels},res=32,data=mnist,batch=64,steps={steps},"
                            f"lr=1e-3,quantizer={quantizer}")
  config.eval_every = config.ckpt_every = steps
  config.loss.update(loss)
  train_tokenizer.train(config, str(workdir))   # Any ConfigError fails the test.
  record = [json.loads(line) for line in open(workdir / "metrics.jsonl") if "eval/psnr" in line][-1]
  _, params, _ = train_tokenizer.restore_params(str(workdir), config, mesh_lib.make_mesh(config.mesh))
  return record, codes_lib.load_codes(codes_lib.tokenize(config, params, max_examples=1024))


@pytest.mark.slow
def test_vq_1024_codes_usage_after_training(tmp_path):
  # Plain LlamaGen VQ used 22% of 1024 codes after 400 steps; with its entropy loss 79% after 250.
  record, codes = _train("vq1k_ent", 8, 400, tmp_path)
  stats = codes_lib.codebook_stats(codes, codebook_size=1024)
  assert stats["usage"] >= 0.8, stats
  assert record["eval/psnr"] > 14


@pytest.mark.slow
def test_bsq_bits_balanced_after_training(tmp_path):
  # BSQ-ViT's weight 0.1 leaves the bits unbalanced at inverse temperature 100 (README); 10 is the
  # weight that balances them.
  record, codes = _train("bsq", 16, 400, tmp_path, bsq_entropy=10.0)
  stats = codes_lib.codebook_stats(codes, bits=16)
  assert stats["bit_entropy_min"] >= 0.9, stats
  assert record["eval/psnr"] > 14
