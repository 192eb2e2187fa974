"""Dead-code restart (train/codebook.py): counting window, which rows move, and in the trainer."""
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
    params, counts, metrics = codebook.restart(params, counts, {"q": (vectors, index)},
                                               jnp.int32(step), rng, every)
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
    config_lib.load_config("vitok:Mu-Mu/4,c=4,res=16,data=mnist,codebook=512")
