"""LARP: query encoder, stochastic VQ, causal AR prior, loss terms, config, trainer and codes store."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitok_jax import ConfigError, config_lib, data
from vitok_jax.models import dit, larp, vit
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.scaling import flops
from vitok_jax.scaling import record as record_lib
from vitok_jax.train import codes as codes_lib
from vitok_jax.train import train_tokenizer
from vitok_jax.train.metrics_writer import read_jsonl

SIZE = vit.ViTSize(32, 1, 2)
TINY = "Mu-Mu/4,c=8,res=16,data=mnist,batch=16,lr=2e-3,quantizer=larp,queries=8"


def _model(num_queries=7, codebook_size=64, patch=(4, 4)):
  return larp.LARP(SIZE, SIZE, patch, 1, 8, num_queries=num_queries, codebook_size=codebook_size,
                   prior=SIZE)


def _init(model, x):
  return jax.jit(lambda x: nn.meta.unbox(model.init({"params": jax.random.key(0)}, x, sample=False)))(x)


def _images(batch=2, res=16):
  return jax.random.uniform(jax.random.key(9), (batch, res, res, 1), minval=-1, maxval=1)


def _init_plain(module, x):
  return jax.jit(lambda x: nn.meta.unbox(module.init(jax.random.key(0), x))["params"])(x)


def _encode(model):
  return jax.jit(lambda v, x: model.apply(v, x, method=model.encode)[:2])


@pytest.fixture(scope="module")
def tiny():
  model = _model()
  x = _images()
  return model, _init(model, x), x


@pytest.mark.parametrize("num_queries,shape,patch", [(7, (2, 16, 16, 1), (4, 4)),
                                                     (16, (2, 16, 16, 1), (4, 4)),
                                                     (16, (2, 4, 8, 8, 1), (2, 4, 4))])
def test_shapes_for_any_number_of_queries(num_queries, shape, patch):
  """Shapes only (jax.eval_shape: traced, not compiled); the values are checked below."""
  model = _model(num_queries, patch=patch)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(
      lambda x: nn.meta.unbox(model.init({"params": jax.random.key(0)}, x, sample=False)), x)
  recon, aux = jax.eval_shape(
      lambda v, x: model.apply(v, x, sample=True, rngs={"sample": jax.random.key(2)}), variables, x)
  z, _, grid = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables, x)
  assert recon.shape == x.shape and recon.dtype == jnp.float32
  assert aux["codes"].shape == (2, num_queries) and aux["codes"].dtype == jnp.int32
  assert z.shape == (2, num_queries, 8)
  assert set(aux["loss_terms"]) == {"larp_vq", "larp_prior"}
  assert {"larp/usage", "larp/perplexity", "larp/prior_accuracy"} <= set(aux["metrics"])
  assert set(variables["params"]) == {"patch_embed", "encoder", "bottleneck", "latent_embed",
                                      "decoder", "to_pixels"}
  assert variables["params"]["encoder"]["queries"].shape == (num_queries, 32)


def test_too_few_queries_is_a_config_error():
  with pytest.raises(ConfigError, match="num_queries >= 2"):
    jax.eval_shape(lambda x: _model(num_queries=1).init(jax.random.key(0), x, sample=False),
                   _images())


def test_encoder_appends_queries_and_keeps_the_last_n():
  encoder = larp.QueryEncoder(SIZE, num_queries=5)
  tokens = jax.random.normal(jax.random.key(3), (2, 16, 32))
  params = _init_plain(encoder, tokens)
  apply = jax.jit(lambda p: encoder.apply({"params": p}, tokens))
  out = apply(params)
  assert out.shape == (2, 5, 32)
  queries = jnp.broadcast_to(params["queries"], (2, 5, 32))
  full = jax.jit(lambda p, x: vit.Transformer(SIZE, rope="none").apply({"params": p}, x, (21,)))(
      params["vit"], jnp.concatenate([tokens, queries], 1))
  np.testing.assert_allclose(out, full[:, -5:], atol=1e-6)
  # Perturbing the init of query 2 changes z (its own row most). Not by a constant vector: the
  # pre-norm LayerNorms remove that.
  bumped = jax.tree.map(lambda p: p, params)
  bumped["queries"] = params["queries"].at[2].add(jax.random.normal(jax.random.key(1), (32,)))
  delta = np.abs(np.asarray(apply(bumped) - out)).max(axis=(0, 2))
  assert delta[2] > 1e-2 and delta.argmax() == 2


def test_model_z_depends_on_the_queries(tiny):
  model, variables, x = tiny
  pre = jax.jit(lambda v: model.apply(v, x, method=lambda m, x: m.bottleneck_layer.to_latent(
      m.encoder_net(m.patch_embed(larp.tokenizer.patchify(x, m.patch))))))
  bumped = jax.tree.map(lambda p: p, variables)
  bumped["params"]["encoder"]["queries"] = variables["params"]["encoder"]["queries"].at[0].add(
      jax.random.normal(jax.random.key(1), (32,)))
  delta = np.abs(np.asarray(pre(bumped) - pre(variables))).max(axis=(0, 2))
  assert delta[0] > 1e-2 and delta.argmax() == 0


def test_prior_is_causal_position_i_predicts_code_i_plus_1(tiny):
  model, variables, x = tiny
  z, aux = _encode(model)(variables, x)
  logits_fn = jax.jit(lambda z: model.apply(
      variables, z, method=lambda m, z: m.bottleneck_layer.prior_logits(z)))
  logits = np.asarray(logits_fn(z))
  assert logits.shape == (2, 6, 64)  # Rows predict codes 1..6.
  unit = model.apply(variables, method=lambda m: m.bottleneck_layer.quantizer.codes())
  for j in range(7):
    changed = z.at[:, j].set(unit[(aux["codes"][0, j] + 1) % 64])
    new = np.asarray(logits_fn(changed))
    # Row i scores code i + 1: rows predicting codes <= j (rows < j) never see code j.
    np.testing.assert_array_equal(new[:, :j], logits[:, :j])
    if j < 6:
      assert np.abs(new[:, j] - logits[:, j]).max() > 1e-4


def test_prior_logits_are_cosines_of_its_normalised_prediction(tiny):
  """LARP scores code k by cos(prior(z_q)_i, e_k) (its l2-normalised prediction, temperature 1)."""
  model, variables, x = tiny
  z, _ = _encode(model)(variables, x)
  logits, raw = jax.jit(lambda z: model.apply(variables, z, method=lambda m, z: (
      m.bottleneck_layer.prior_logits(z), m.bottleneck_layer.prior_net(z[:, :-1]))))(z)
  unit = np.asarray(model.apply(variables, method=lambda m: m.bottleneck_layer.quantizer.codes()))
  raw = np.asarray(raw, np.float64)
  expected = raw / np.linalg.norm(raw, axis=-1, keepdims=True) @ unit.T
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)
  assert np.abs(np.asarray(logits)).max() <= 1 + 1e-5


def test_stochastic_codes_follow_softmax_of_cosine_over_temperature():
  cos = np.array([1.0, 0.98, 0.95, 0.5])
  codes = np.stack([cos, np.sqrt(1 - cos**2), np.zeros(4)], -1)  # Unit rows, cos to z = e_x.
  z = jnp.asarray([[[1.0, 0.0, 0.0]]])
  draws = jax.vmap(lambda k: larp.stochastic_codes(k, z, jnp.asarray(codes), 0.03))(
      jax.random.split(jax.random.key(0), 4000)).reshape(-1)
  expected = np.exp(cos / 0.03 - (cos / 0.03).max())
  expected /= expected.sum()
  np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=4) / 4000, expected, atol=0.03)


def test_codes_are_argmax_at_eval_and_sampled_at_train():
  neck = larp.LARPBottleneck(8, codebook_size=16, prior=SIZE)
  h = jax.random.normal(jax.random.key(4), (4, 16, 32))
  variables = _init(neck, h)
  def codes_and_cos(v, h, sample, seed):
    _, aux = neck.apply(v, h, sample=sample, rngs={"sample": jax.random.key(seed)})
    z = neck.apply(v, h, method=lambda m, h: larp.quantizers.l2_normalize(m.to_latent(h)))
    return aux["codes"], z @ neck.apply(v, method=lambda m: m.quantizer.codes()).T
  run = jax.jit(codes_and_cos, static_argnums=2)
  eval_codes, cos = run(variables, h, False, 0)
  np.testing.assert_array_equal(eval_codes, np.argmax(cos, -1))
  train = lambda seed: np.asarray(run(variables, h, True, seed)[0])
  np.testing.assert_array_equal(train(1), train(1))
  assert (train(1) != train(2)).any() and (train(1) != eval_codes).any()
  assert (train(1) == eval_codes).mean() > 0.2  # Sharp (T = 0.03), not uniform over 16.


def test_scheduled_sampling_replaces_a_growing_share_of_the_priors_input():
  """LARP's mix_ss: ratio min(0.5·progress/0.3, 0.5) of tokens 1..N−1 replaced by codes sampled
  from the first round; the prior loss is the mean of both rounds (teacher forcing alone at
  progress 0, and without a progress)."""
  np.testing.assert_allclose([larp.scheduled_sampling_ratio(p) for p in (0.0, 0.15, 0.3, 1.0)],
                             [0.0, 0.25, 0.5, 0.5])
  neck = larp.LARPBottleneck(8, codebook_size=16, prior=SIZE)
  h = jax.random.normal(jax.random.key(4), (64, 16, 32))
  variables = _init(neck, h)
  run = jax.jit(lambda v, h, progress, seed: neck.apply(
      v, h, sample=True, progress=progress, rngs={"sample": jax.random.key(seed)}))
  # No progress: one teacher-forced round. Progress 0: the second round's input is z_q itself.
  # (Compared within one program: across two, a code drawn at a near tie can differ.)
  plain = neck.apply(variables, h, sample=True, rngs={"sample": jax.random.key(1)})[1]
  assert "larp/prior_ce_scheduled" not in plain["metrics"]
  at_start = run(variables, h, 0.0, 1)[1]["metrics"]
  assert float(at_start["larp/prior_ce_scheduled"]) == pytest.approx(
      float(at_start["larp/prior_ce_teacher_forced"]), rel=1e-5)
  zq, aux = run(variables, h, 1.0, 1)
  logits = neck.apply(variables, zq, method=neck.prior_logits)
  mixed = neck.apply(variables, zq, logits, 1.0, method=neck.scheduled_round,
                     rngs={"sample": jax.random.key(2)})
  replaced = np.asarray(jnp.any(mixed != zq, axis=-1))
  assert not replaced[:, 0].any() and 0.4 < replaced[:, 1:].mean() < 0.6
  unit = np.asarray(neck.apply(variables, method=lambda m: m.quantizer.codes()))
  rows = np.asarray(mixed)[replaced]
  assert np.abs(rows @ unit.T).max(-1).min() == pytest.approx(1.0, abs=1e-5)  # Codes, unit rows.
  first = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, aux["codes"][:, 1:])))
  metrics = aux["metrics"]
  assert float(metrics["larp/prior_ce_teacher_forced"]) == pytest.approx(first, rel=1e-5)
  assert float(aux["loss_terms"]["larp_prior"]) == pytest.approx(
      (first + float(metrics["larp/prior_ce_scheduled"])) / 2, rel=1e-5)
  # The second round sees other inputs: its loss is not the teacher-forced one.
  assert float(metrics["larp/prior_ce_scheduled"]) != pytest.approx(first, rel=1e-3)


def test_straight_through_gradient_reaches_the_encoder(tiny):
  model, variables, x = tiny
  def recon_loss(params):
    recon, _ = model.apply({"params": params}, x, sample=True, rngs={"sample": jax.random.key(5)})
    return jnp.mean((recon - x) ** 2)
  grads = jax.jit(jax.grad(recon_loss))(variables["params"])
  for path in (("encoder", "queries"), ("patch_embed", "kernel"), ("bottleneck", "to_latent", "kernel")):
    leaf = grads
    for key in path:
      leaf = leaf[key]
    assert np.abs(np.asarray(leaf)).max() > 0, path
  # The reconstruction does not train the prior or the codebook (only the VQ and prior terms do).
  assert np.abs(np.asarray(grads["bottleneck"]["prior"]["to_latent"]["kernel"])).max() == 0


def test_prior_ce_and_vq_terms_equal_numpy(tiny):
  model, variables, x = tiny
  z, aux = _encode(model)(variables, x)
  # z is the unit code vector (the straight-through forward value).
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
  logits = np.asarray(jax.jit(lambda v, z: model.apply(
      v, z, method=lambda m, z: m.bottleneck_layer.prior_logits(z)))(variables, z), np.float64)
  labels = np.asarray(aux["codes"])[:, 1:]
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = log_z - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(aux["loss_terms"]["larp_prior"]), ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(aux["metrics"]["larp/prior_accuracy"]),
                             (logits.argmax(-1) == labels).mean(), rtol=1e-6)
  unit_z = lambda m, x: larp.quantizers.l2_normalize(m.bottleneck_layer.to_latent(m.encoder_net(
      m.patch_embed(larp.tokenizer.patchify(x, m.patch)) + larp.sincos_table(32, (4, 4)))))
  u = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method=unit_z))(variables, x))
  mse = np.mean((np.asarray(z) - u) ** 2)
  np.testing.assert_allclose(float(aux["loss_terms"]["larp_vq"]), 1.25 * mse, rtol=1e-4)


def test_codes_decode_through_the_codes_store_decoder(tiny):
  model, variables, x = tiny
  recon, aux = jax.jit(lambda v, x: model.apply(v, x, sample=False))(variables, x)
  decoded = codes_lib.decode_fn(model, (4, 4))(variables["params"], aux["codes"])
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(recon), atol=1e-5)


def test_sincos_table_matches_dit_in_2d():
  np.testing.assert_allclose(larp.sincos_table(32, (3, 5)), dit.pos_embed_2d(32, (3, 5)), atol=1e-6)
  assert larp.sincos_table(64, (2, 2, 2)).shape == (8, 64)


def test_config_options_and_errors():
  config = config_lib.load_config(f"vitok:{TINY}")
  assert config.model.bottleneck == "larp" and config.model.num_queries == 8
  assert config.loss.larp_vq == 0.1 and config.loss.larp_prior == 0.06
  assert isinstance(train_tokenizer.build_model(config), larp.LARP)
  with pytest.raises(ConfigError, match="queries=N"):
    config_lib.load_config("vitok:Mu-Mu/4,c=8,res=16,data=mnist,quantizer=larp")
  with pytest.raises(ConfigError, match="only applies to bottleneck=larp"):
    config_lib.load_config("vitok:Mu-Mu/4,c=8,res=16,data=mnist,queries=8")


def test_prior_dropout_is_on_in_training_only():
  """GPT-C's dropout in the prior: training outputs vary with the "sample" rng; eval, or a rate
  of 0, gives the same outputs as a prior without it."""
  x = jax.random.normal(jax.random.key(1), (2, 6, 8))
  drop, plain = larp.ARPrior(SIZE, dropout=0.5), larp.ARPrior(SIZE)
  params = plain.init(jax.random.key(0), x)
  run = lambda model, train, key=0: model.apply(params, x, train=train,
                                                rngs={"sample": jax.random.key(key)})
  assert not np.allclose(run(drop, True, 1), run(drop, True, 2))
  np.testing.assert_array_equal(run(drop, False), run(plain, False))
  np.testing.assert_array_equal(run(larp.ARPrior(SIZE, dropout=0.0), True), run(plain, False))


def test_prior_size_and_learning_rate_follow_larps_training_scripts():
  """LARP's prior is gptc-S (12 × 384, 6 heads) beside the published encoder sizes, Mu beside the
  CPU ones, and trains at 50× the rate (its scripts' optimizer.prior_lr_mult): with equal
  gradients its first AdamW update is 50× the others', weight decay included. Runs saved before
  the fields resume as they trained (Mu, 1×); other kinds' configs have neither field."""
  from vitok_jax.train import loop, optimizer  # pylint: disable=g-import-not-at-top
  cpu = config_lib.load_config(f"vitok:{TINY}")
  assert (cpu.model.prior_size, cpu.optim.prior_lr_mult) == ("Mu", 50.0)
  published = config_lib.load_config("vitok:B-B/16,c=16,quantizer=larp,queries=256")
  assert larp.from_config(published.model, 3).prior == vit.ViTSize(384, 12, 6)
  assert larp.from_config(cpu.model, 1).prior == vit.ViTSize(64, 2, 2)
  gaussian = config_lib.load_config("vitok:Mu-Mu/4,c=8,res=16,data=mnist")
  assert "prior_size" not in gaussian.model and "prior_lr_mult" not in gaussian.optim
  params = {"encoder": {"w": jnp.ones((3, 2))}, "bottleneck": {"prior": {"w": jnp.ones((3, 2))}}}
  grads = jax.tree.map(lambda p: 0.1 * p, params)
  cpu.optim.schedule, cpu.optim.warmup_steps = "constant", 0  # The full rate at the first step.
  for mult, ratio in ((50.0, 50.0), (1.0, 1.0)):
    cpu.optim.prior_lr_mult = mult
    tx, _ = optimizer.make_optimizer(cpu.optim, 256, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["bottleneck"]["prior"]["w"],
                               ratio * updates["encoder"]["w"], rtol=1e-6)
    assert float(jnp.abs(updates["encoder"]["w"]).min()) > 0
  saved = config_lib.load_config(f"vitok:{TINY}")
  del saved.model["prior_size"], saved.model["prior_dropout"], saved.optim["prior_lr_mult"]
  assert larp.from_config(saved.model, 1).prior == vit.ViTSize(64, 2, 2)  # Saved before them.
  assert larp.from_config(saved.model, 1).prior_dropout == 0.0
  assert larp.from_config(cpu.model, 1).prior_dropout == 0.1
  assert loop.config_changes(saved, config_lib.load_config(f"vitok:{TINY}")) == [
      "model.prior_dropout: (absent: 0.0) → 0.1", "optim.prior_lr_mult: (absent: 1.0) → 50.0"]
  for field, value, says in (("model.prior_size", "B", "model.prior_size='B' is not allowed"),
                             ("optim.prior_lr_mult", 0.0, "prior_lr_mult must be > 0")):
    bad = config_lib.load_config(f"vitok:{TINY}")
    bad.update_from_flattened_dict({field: value})
    with pytest.raises(ConfigError, match=says):
      train_tokenizer.validate(bad)


def test_flops_count_the_queries_and_the_prior():
  model = _model()
  parts = flops.tokenizer_forward_flops(model, (16, 16, 1))
  assert flops.tokens_per_example(model, (16, 16, 1)) == 7
  assert parts["encoder"] == flops.transformer_forward_flops(SIZE, 16 + 7, "geglu")
  assert parts["prior"] > 0 and parts["total"] == sum(v for k, v in parts.items() if k != "total")
  # Training runs the prior twice (scheduled sampling): XLA's count of the loss gradient grows by
  # about 3 × the prior's forward when the second round is on.
  assert flops.train_flops_per_example(model, (16, 16, 1)) == 3 * (parts["total"] + parts["prior"])
  x = jax.ShapeDtypeStruct((4, 16, 16, 1), jnp.float32)
  params = jax.eval_shape(
      lambda x: nn.meta.unbox(model.init(jax.random.key(0), x, sample=False)), x)
  def grad_flops(progress):
    def loss(p, x):
      recon, aux = model.apply(p, x, sample=True, progress=progress,
                               rngs={"sample": jax.random.key(1)})
      return jnp.mean((recon - x) ** 2) + sum(aux["loss_terms"].values())
    return flops.xla_flops(jax.grad(loss), params, x) / 4
  assert grad_flops(0.5) - grad_flops(None) == pytest.approx(3 * parts["prior"], rel=0.2)


@pytest.mark.slow  # ~30 s on 2 idle cores, minutes on busy ones.
def test_trains_writes_record_and_codes_round_trip(tmp_path):
  config = config_lib.load_config(f"vitok:{TINY},steps=30")
  config.log_every, config.eval_every, config.ckpt_every, config.eval_examples = 10, 100, 100, 32
  workdir = str(tmp_path / "larp")
  record = train_tokenizer.train(config, workdir)
  on_disk = record_lib.read(workdir)
  assert on_disk["E"] == record["E"] == 8 * 8 and on_disk["tokens_per_example"] == 8
  assert on_disk["params"]["total"] == sum(on_disk["params"][k] for k in ("encoder", "decoder", "bottleneck"))
  # Matmuls only: XLA also counts the elementwise work over the 8192-code codebook, a visible share
  # at this tiny size.
  assert 0.8 < on_disk["flops_per_example"]["analytic_over_xla"] < 1.1
  assert all(np.isfinite(v) for v in on_disk["metrics"].values())
  train_rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert all(np.isfinite(r["larp_prior"]) and np.isfinite(r["larp_vq"]) for r in train_rows)
  # The trainer passes its progress: the prior trains with scheduled sampling.
  assert all(r["larp_prior"] == pytest.approx((r["larp/prior_ce_teacher_forced"]
                                               + r["larp/prior_ce_scheduled"]) / 2, rel=1e-4)
             for r in train_rows)
  print({k: round(v, 4) for k, v in train_rows[-1].items() if k.startswith(("l2", "larp"))},
        on_disk["metrics"])

  _, params, _ = train_tokenizer.restore_params(workdir, config, mesh_lib.make_mesh(config.mesh))
  store = codes_lib.tokenize(config, params, split="eval", max_examples=16, batch_size=16)
  assert store["codes"].shape == (16, 8) and store["codes"].dtype == np.int32
  assert 0 <= store["codes"].min() and store["codes"].max() < 8192
  batch = next(data.build_iterator(config.data, split="eval", batch_size=16, seed=config.seed))
  np.testing.assert_array_equal(batch["label"], store["labels"])
  model = train_tokenizer.build_model(config)
  recon, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, sample=False))(params, batch["image"])
  np.testing.assert_array_equal(aux["codes"], store["codes"])
  decoded = codes_lib.decode_fn(model, (4, 4))(params, store["codes"])
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(recon), atol=1e-5)


def test_record_lists_each_attention_call_of_the_forward(tmp_path):
  """The run record's attention_impl is what tracing the forward saw: the encoder over patches
  and queries, the decoder, and the prior's causal attention over the codes."""
  config = config_lib.load_config(f"vitok:{TINY},steps=1")
  model = train_tokenizer.build_model(config)
  x = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
  params = jax.eval_shape(lambda x: nn.meta.unbox(model.init(
      {"params": jax.random.key(0)}, x, sample=False))["params"], x)
  record = record_lib.tokenizer_record(config, model, params, (16, 16, 1), wall_time=1.0,
                                       metrics={}, workdir=str(tmp_path))
  calls = [(c["impl"], c["mask"], c["q_len"], c["kv_len"]) for c in record["attention_impl"]]
  # Encoder and decoder over 16 patches + 8 queries; the prior over the first 7 of 8 codes.
  assert calls == [("xla", "none", 16 + 8, 16 + 8), ("xla", "causal", 7, 7)]
