"""Codebook maintenance (train/codebook.py): restart window and rows, EMA updates, in the trainer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok_jax import ConfigError, config_lib
from vitok_jax.models import multiscale
from vitok_jax.train import codebook, train_tokenizer


def test_restart_moves_only_codes_unused_over_the_window():
  K, D, every = 6, 3, 3
  codebook_KD = jnp.arange(K * D, dtype=jnp.float32).reshape(K, D)
  params = {"q": {"codebook": codebook_KD}, "other": {"kernel": jnp.ones(2)}}
  counts = codebook.init_counts(params)
  assert list(counts) == ["q"] and counts["q"].shape == (K,)
  vectors = -jnp.ones((4, D)) * jnp.arange(1, 5)[:, None]   # Rows nothing else equals.
  rng = jax.random.key(0)
  used = [jnp.array([0, 0, 1, 1]), jnp.array([2, 0, 0, 0]), jnp.array([0, 1, 0, 0])]
  for step, index in enumerate(used):
    params, counts, _, metrics = codebook.update(params, counts, {}, {"q": (vectors, index)},
                                                 jnp.int32(step), rng, restart_every=every,
                                                 ema_decay=0.0)
    if step < every - 1:  # Counting only.
      np.testing.assert_array_equal(params["q"]["codebook"], codebook_KD)
      assert float(metrics["q/restarted"]) == 0
  # Window codes {0, 1, 2} stay; 3, 4, 5 (never chosen) now sit on batch inputs; counts reset.
  new = np.asarray(params["q"]["codebook"])
  np.testing.assert_array_equal(new[:3], np.asarray(codebook_KD[:3]))
  for row in new[3:]:
    assert any(np.array_equal(row, v) for v in np.asarray(vectors))
  assert float(metrics["q/restarted"]) == 3 and float(metrics["q/window_usage"]) == 0.5
  np.testing.assert_array_equal(counts["q"], 0)
  np.testing.assert_array_equal(params["other"]["kernel"], 1)


def test_ema_update_equals_numpy_and_a_restart_resets_the_ema_sum():
  K, D, decay = 4, 2, 0.9
  codebook_KD = jnp.asarray(np.random.default_rng(0).normal(size=(K, D)), jnp.float32)
  params = {"q": {"codebook": codebook_KD}}
  z = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], np.float32)
  index = np.array([0, 0, 2])
  ema = codebook.init_ema(params)
  new, counts, ema, metrics = codebook.update(
      params, codebook.init_counts(params), ema, {"q": (jnp.asarray(z), jnp.asarray(index))},
      jnp.int32(0), jax.random.key(0), restart_every=1, ema_decay=decay)
  hist = np.array([2.0, 0.0, 1.0, 0.0])
  want_counts = (1 - decay) * hist
  want_sums = decay * np.asarray(codebook_KD) + (1 - decay) * np.stack(
      [z[:2].sum(0), np.zeros(2), z[2], np.zeros(2)])
  n, eps = want_counts.sum(), 1e-5
  smoothed = (want_counts + eps) / (n + K * eps) * n
  np.testing.assert_allclose(ema["q"]["counts"], want_counts, rtol=1e-6)
  # Codes 1 and 3 were unused in the window (restart_every=1): they moved onto batch inputs, and
  # their EMA sums were reset so that sums / smoothed counts is the new code.
  got = np.asarray(new["q"]["codebook"])
  for k in (0, 2):
    np.testing.assert_allclose(got[k], want_sums[k] / smoothed[k], rtol=1e-5)
    np.testing.assert_allclose(ema["q"]["sums"][k], want_sums[k], rtol=1e-6)
  for k in (1, 3):
    assert any(np.allclose(got[k], row) for row in z)
    np.testing.assert_allclose(np.asarray(ema["q"]["sums"][k]) / smoothed[k], got[k], rtol=1e-5)
  assert float(metrics["q/restarted"]) == 2


def test_trainer_step_sets_the_codebook_to_its_ema_statistics():
  config = config_lib.load_config("vitok:Mu-Mu/4,c=4,res=16,data=mnist,batch=8,quantizer=vq1k,"
                                  "codebook=64,codebook_ema=0.9")
  parts = train_tokenizer.build_components(config)
  x = jax.random.uniform(jax.random.key(0), (8, 16, 16, 1), minval=-1, maxval=1)
  state = train_tokenizer.init_state(parts, config, x[:1])
  step = jax.jit(train_tokenizer.make_train_step(parts, config))
  for _ in range(2):
    state, _ = step(state, {"image": x})
  stats = state.codebook_ema["bottleneck/quantizer"]
  assert float(stats["counts"].sum()) > 0
  from vitok_jax.models import quantizers  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(state.params["bottleneck"]["quantizer"]["codebook"],
                             stats["sums"] / quantizers.laplace_smoothed(stats["counts"])[:, None],
                             rtol=1e-5)


def test_multiscale_vq_sows_every_scale_residual():
  module = multiscale.ResidualQuantizer(4, "vq", "var", codebook_size=32, num_phi=0)
  f = jax.random.normal(jax.random.key(1), (2, 5, 5, 4))
  variables = module.init(jax.random.key(2), f)
  (_, codes, _, _), sown = module.apply(variables, f, mutable=["intermediates"])
  (vectors, index), = codebook.pools(sown["intermediates"]).values()
  tokens = 2 * multiscale.token_count(module.scales(5))
  assert vectors.shape == (tokens, 4) and index.shape == (tokens,)
  np.testing.assert_array_equal(index, np.concatenate([np.asarray(c).reshape(-1) for c in codes]))


def test_trainer_restarts_a_collapsed_multiscale_codebook(tmp_path):
  config = config_lib.load_config(
      "vitok:Mu-Mu/4,c=4,res=16,data=mnist,batch=16,lr=2e-3,quantizer=msvq,codebook=256,"
      "restart=2,steps=4")
  config.log_every, config.eval_every, config.ckpt_every, config.eval_examples = 2, 100, 100, 32
  train_tokenizer.train(config, str(tmp_path))
  rows = [r for r in map(__import__("json").loads, open(tmp_path / "metrics.jsonl"))
          if "bottleneck/residual/vq/restarted" in r]
  # The uniform(±1/K) init collapses onto few codes; the first restart spreads the codebook.
  assert rows[0]["bottleneck/residual/vq/restarted"] > 128
  assert rows[-1]["vq/usage"] > rows[0]["vq/usage"]


def test_restart_and_codebook_size_need_a_learned_codebook():
  with pytest.raises(ConfigError, match="learned codebook"):
    config_lib.load_config("vitok:Mu-Mu/4,c=4,res=16,data=mnist,quantizer=bsq,restart=10")
  with pytest.raises(ConfigError, match="learned codebook"):
    config_lib.load_config("vitok:Mu-Mu/4,c=4,res=16,data=mnist,codebook_ema=0.99")
  stage2 = config_lib.load_config("vitok:Mu-Mu/4,c=4,res=16,data=mnist,quantizer=vq1k,restart=5")
  stage2.gan.enabled = True
  with pytest.raises(ConfigError, match="frozen encoder"):
    train_tokenizer.validate(stage2)
  with pytest.raises(ConfigError, match="learned codebook"):
    config_lib.load_config("vitok:Mu-Mu/4,c=4,res=16,data=mnist,codebook=512")
