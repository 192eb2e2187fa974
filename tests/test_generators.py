"""The generator trainer end to end: every family on a tiny tokenizer of bundled MNIST, the store,
the data stream, exact resume, the record, `vitok sample` / `vitok tokenize`, config errors."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vitok_jax import ConfigError, cli, config_lib, data
from vitok_jax.eval import fid, perceptual_metrics, visualize
from vitok_jax.models import infinity, var, vit
from vitok_jax.models.perceptual import mnist_classifier
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.scaling import flops
from vitok_jax.scaling import record as record_lib
from vitok_jax.train import codes, generators, loop, train_generator, train_tokenizer
from vitok_jax.train.metrics_writer import read_jsonl

# quantizer -> the tokenizer each family trains on (8×8 token grid, so multi-scale schedules fit).
TOKENIZERS = {"gaussian": "", "vq1k": ",quantizer=vq1k", "msvq": ",quantizer=msvq",
              "msbsq": ",quantizer=msbsq"}
FAMILY_TOKENIZER = {"dit": "gaussian", "llamagen": "vq1k", "var": "msvq", "infinity": "msbsq"}
FAMILY_SIZE = {"dit": "Mu", "llamagen": "Mu", "var": "d2", "infinity": "d2"}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
  """name -> workdir of a tiny tokenizer (12 steps) with that bottleneck, trained on first use,
  with a 30-step MNIST classifier cached beside it (the generator's eval would train 600)."""
  root = tmp_path_factory.mktemp("tokenizers")

  class Lazy(dict):
    def __missing__(self, name):
      config = config_lib.load_config(
          f"vitok:Mu-Mu/4,c=4,res=32,data=mnist,batch=16,steps=12,lr=2e-3{TOKENIZERS[name]}")
      config.log_every, config.eval_every, config.eval_examples = 6, 100, 32
      self[name] = str(root / name)
      train_tokenizer.train(config, self[name])
      mnist_classifier.load_or_train(
          os.path.join(self[name], mnist_classifier.DEFAULT_FILENAME), steps=30)
      return self[name]

  return Lazy()


def generator_config(family, tokenizer_dir, steps=6, **overrides):
  ode_steps = ",sample_steps=4" if family == "dit" else ""  # The others' samplers have none.
  shortcut = ",shortcut=true" if overrides.pop("objective.shortcut", False) else ""  # As users do.
  config = config_lib.load_config(
      f"generator:{family}/{FAMILY_SIZE[family]},tokenizer={tokenizer_dir},batch=16,"
      f"steps={steps},lr=1e-3,samples=20{ode_steps}{shortcut}")
  config.log_every, config.eval_every, config.ckpt_every = 3, 1000, 1000
  config.optim.schedule = "constant"
  config.update_from_flattened_dict(overrides)
  return config


# DiT in the fast suite; the others train their own tokenizer kind first (`-m slow`).
@pytest.mark.parametrize("family", ["dit"] + [
    pytest.param(f, marks=pytest.mark.slow) for f in ("llamagen", "var", "infinity")])
def test_every_family_trains_samples_and_writes_its_record(family, tokenizer_dirs, tmp_path):
  workdir = str(tmp_path / family)
  config = generator_config(family, tokenizer_dirs[FAMILY_TOKENIZER[family]])
  record = train_generator.train(config, workdir)
  rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in rows] == [3, 6] and all(np.isfinite(r["loss"]) for r in rows)
  on_disk = record_lib.read(workdir)
  assert on_disk["kind"] == "generator" and on_disk["family"] == family
  assert on_disk["params"]["total"] == record["params"]["total"] > 0
  flop = on_disk["flops_per_example"]  # XLA's count less what the mask hides: 3 forwards a step.
  assert flop["train"] == 3 * flop["forward"] > 0
  assert flop["forward"] == flop["forward_xla"] - flop["masked_attention"]
  # What the forward's attention ran as (on CPU "auto" is XLA), with its family's mask.
  tokenizer_record = record_lib.read(tokenizer_dirs[FAMILY_TOKENIZER[family]])
  assert tokenizer_record["quantizer_impl"] == (None if family == "dit" else "xla")
  [attention] = on_disk["attention_impl"]
  mask = {"dit": "none", "llamagen": "causal", "var": "block_causal", "infinity": "block_causal"}
  assert (attention["impl"], attention["mask"]) == ("xla", mask[family])
  assert attention["q_len"] > 1 and attention["head_dim"] > 0
  # The hidden pairs: none for DiT, the upper triangle for LlamaGen (4·width FLOPs a pair and layer:
  # q·kᵀ and p·v), a block-causal share of L² for VAR and Infinity.
  size = vit.decode_size(FAMILY_SIZE[family], generators.FAMILIES[family].size_family)
  length = attention["q_len"]
  hidden = {"dit": 0, "llamagen": 4 * size.width * size.depth * (length**2 - length * (length + 1)
                                                                  // 2)}
  if family in hidden:
    assert flop["masked_attention"] == hidden[family]
  else:
    assert 0 < flop["masked_attention"] < 4 * size.width * size.depth * length**2
  metrics = on_disk["metrics"]
  assert np.isfinite(metrics["eval/loss"])
  assert 0.0 <= metrics["gen/class_accuracy"] <= 1.0 and np.isfinite(metrics["gen/fid_mnist"])
  assert os.path.exists(os.path.join(workdir, "images", "samples_0000006.png"))
  assert on_disk["tokenizer"]["bottleneck"] == FAMILY_TOKENIZER[family]
  # The tokenizer's discrete size: its record's code bits; a learned codebook's size.
  assert on_disk["tokenizer"]["code_bits"] == tokenizer_record["code_bits"]
  assert (family == "dit") == (on_disk["tokenizer"]["code_bits"] is None)
  codebook = {"dit": None, "llamagen": 1024, "var": 4096, "infinity": None}[family]
  assert on_disk["tokenizer"]["codebook_size"] == codebook
  if family == "llamagen":  # Checked once the tokenizer is loaded, before it is trained on.
    with pytest.raises(ConfigError, match="top_k=1024 keeps all 1024 codes"):
      train_generator.train(generator_config(family, tokenizer_dirs["vq1k"],
                                             **{"sample.top_k": 1024}), str(tmp_path / "k"))
  # The tokenizer tokens of an example it models, counted from the store: every scale for VAR
  # and Infinity, the 8×8 grid for the others.
  store = codes.load_or_tokenize(tokenizer_dirs[FAMILY_TOKENIZER[family]], "eval")
  per_scale = [v.shape[1] * v.shape[2] for k, v in store.items() if k.startswith("codes_")]
  assert on_disk["tokens_per_example"] == (sum(per_scale) if per_scale else 64)
  assert family not in ("var", "infinity") or len(per_scale) > 1
  if family != "dit":  # A record from before `masked_attention`: `vitok eval` recounts it.
    old = dict(forward_xla=flop["forward_xla"], train=3 * flop["forward_xla"])
    record_lib.write({**on_disk, "flops_per_example": old}, workdir)
    train_generator.evaluate_workdir(workdir)
    assert record_lib.read(workdir)["flops_per_example"] == flop


@pytest.mark.parametrize("family", ["dit"] + [
    pytest.param(f, marks=pytest.mark.slow) for f in ("llamagen", "var", "infinity")])
def test_held_out_loss_is_the_clean_conditional_loss(family, tokenizer_dirs):
  """`Family.loss(train=False)`, which `held_out_loss` reports, keeps every label (the same with
  training's label dropout at 0 or 0.9) and flips no bit: without DiT's noise it does not depend
  on the key. The training objective (train=True) with most labels dropped differs from it."""
  losses = {}
  for dropout in (0.0, 0.9):
    config = generator_config(family, tokenizer_dirs[FAMILY_TOKENIZER[family]],
                              **{"model.class_dropout": dropout})
    model, _, eval_arrays = train_generator.build_family(config, mesh_lib.make_mesh(config.mesh))
    batch = {k: v[:8] for k, v in eval_arrays.items()}
    params = nn.meta.unbox(model.init(jax.random.key(0), batch))
    # Off the zero-initialised heads (adaLN-zero, zero logits), where no label would matter.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys)])
    losses[dropout] = [float(model.loss(params, batch, jax.random.key(seed), train=train)[0])
                       for seed, train in ((1, False), (2, False), (1, True))]
  arrays = {k: v[:config.batch_size] for k, v in eval_arrays.items()}  # One batch, as held out.
  assert train_generator.held_out_loss(model, params, arrays, config) == pytest.approx(float(
      model.loss(params, arrays, jax.random.key(config.seed + 7), train=False)[0]), rel=1e-5)
  assert losses[0.9][0] == pytest.approx(losses[0.0][0], rel=1e-6)
  assert losses[0.9][2] != pytest.approx(losses[0.9][0], rel=1e-5)
  if family != "dit":
    assert losses[0.0][1] == pytest.approx(losses[0.0][0], rel=1e-6)


@pytest.mark.parametrize("shortcut", [False, True])
def test_recorded_train_flops_match_xlas_count_of_the_loss_gradient(shortcut, tokenizer_dirs):
  """A shortcut step also runs two target forwards on a quarter of the batch: 3.5 forwards."""
  config = generator_config("dit", tokenizer_dirs["gaussian"], **{"objective.shortcut": shortcut,
                                                                  "batch_size": 8})
  model, _, eval_arrays = train_generator.build_family(config, mesh_lib.make_mesh(config.mesh))
  batch = {k: v[:8] for k, v in eval_arrays.items()}
  params = nn.meta.unbox(model.init(jax.random.key(0), batch))
  forward = flops.xla_flops(model.forward_fn(), params, {k: v[:1] for k, v in batch.items()})
  step = flops.xla_flops(jax.grad(lambda p: model.loss(p, batch, jax.random.key(1))[0]), params)
  assert model.train_forwards(8) == (3.5 if shortcut else 3.0)
  assert step / 8 == pytest.approx(model.train_forwards(8) * forward, rel=0.03)


def test_dit_with_the_shortcut_objective_trains_and_scores_its_few_step_samplers(
    tokenizer_dirs, tmp_path):
  config = generator_config("dit", tokenizer_dirs["gaussian"], steps=3,
                            **{"objective.shortcut": True})
  config.log_every = 3
  record = train_generator.train(config, str(tmp_path / "sc"))
  rows = [r for r in read_jsonl(str(tmp_path / "sc" / "metrics.jsonl")) if "loss" in r]
  assert np.isfinite(rows[-1]["flow_loss"]) and np.isfinite(rows[-1]["bootstrap_loss"])
  for steps in config.sample.few_steps:
    assert 0.0 <= record["metrics"][f"gen/shortcut{steps}/class_accuracy"] <= 1.0
    assert record["metrics"][f"gen/shortcut{steps}/ms_per_sample"] > 0
  # `vitok eval` of a generator run re-scores it at another CFG; tagged metrics join the record.
  assert cli.main(["vitok", "eval", f"--workdir={tmp_path / 'sc'}", "--sample=cfg_scale=2"]) == 0
  metrics = record_lib.read(str(tmp_path / "sc"))["metrics"]
  assert metrics["gen/class_accuracy"] == record["metrics"]["gen/class_accuracy"]
  for name in ("gen/cfg_scale=2/class_accuracy", "gen/cfg_scale=2/shortcut1/class_accuracy"):
    assert 0.0 <= metrics[name] <= 1.0
  with pytest.raises(ConfigError, match="not a config.sample field"):
    train_generator.evaluate_workdir(str(tmp_path / "sc"), {"cfg": 2})


@pytest.mark.slow
def test_gfid_and_inception_score_against_the_tokenizers_held_out_images(tokenizer_dirs, tmp_path):
  """gFID/IS with (random) Inception weights; the real statistics come from the eval split."""
  from vitok_jax.models.perceptual import inception, weights  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "inception.npz")
  weights.save(path, inception.init_variables(jax.random.key(0)))
  config = generator_config("dit", tokenizer_dirs["gaussian"], steps=2)
  config.eval.update(inception_weights=path, gfid_real_examples=32)
  metrics = train_generator.train(config, str(tmp_path / "g"))["metrics"]
  assert np.isfinite(metrics["gen/fid"]) and metrics["gen/fid"] >= 0
  assert 1.0 <= metrics["gen/inception_score"] <= 1008


def test_fid_mnist_of_samples_that_are_the_held_out_digits_is_zero(tokenizer_dirs, monkeypatch):
  """The real digits of FID-MNIST are the tokenizer's held-out split at its resolution (32×32),
  the size its samples decode to: a generator that draws exactly those digits scores ~0, not the
  resize's feature shift (~75 against raw 28×28 digits)."""
  tokenizer = generators.FrozenTokenizer(tokenizer_dirs["gaussian"])
  batches = list(data.held_out_images(tokenizer.config.data, batch_size=64))
  held_out = np.concatenate(batches)
  assert held_out.shape == (500, 32, 32, 1) and [len(b) for b in batches][-1] == 500 - 7 * 64
  assert sum(map(len, data.held_out_images(tokenizer.config.data, 64, limit=70))) == 70
  family = type("Stub", (), {"tokenizer": tokenizer, "sample": None,
                             "few_step_samplers": lambda self: {}})()
  monkeypatch.setattr(train_generator, "held_out_loss", lambda *a: 0.0)
  monkeypatch.setattr(train_generator, "generate", lambda *a: (held_out, 1e-3))
  config = generator_config("dit", tokenizer_dirs["gaussian"], **{"eval.num_samples": 500})
  metrics = train_generator.evaluate(family, None, config, None)
  assert abs(metrics["gen/fid_mnist"]) < 1e-3


def _fid_reference_tool():
  spec = importlib.util.spec_from_file_location(
      "fid_reference", pathlib.Path(__file__).parents[1] / "tools" / "fid_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gfid_against_reference_statistics_saved_by_the_tool(tokenizer_dirs, tmp_path,
                                                             monkeypatch):
  """eval.gfid_reference: gFID against the statistics tools/fid_reference.py saved (here of a
  stand-in network, a fixed random projection to 2048-d, in place of Inception). Samples that
  are the very images the tool read score 0; others score the two sets' Fréchet distance
  computed here in one shot."""
  projection = np.random.default_rng(0).normal(size=(32 * 32, 2048)) / 32
  features = lambda x: np.tanh(np.asarray(x, np.float64).reshape(len(x), -1) @ projection)
  stand_in = lambda x: {"pool": features(x), "logits_unbiased": np.zeros((len(x), 1008))}
  monkeypatch.setattr(perceptual_metrics, "load_networks",
                      lambda names, eval_cfg, workdir=None: {"inception": stand_in})
  tok = tokenizer_dirs["gaussian"]
  weights_file = tmp_path / "inception.npz"
  weights_file.write_bytes(b"")  # Only its existence is checked; the network is the stand-in.
  out = _fid_reference_tool().main([
      "--tokenizer", tok, "--inception_weights", str(weights_file), "--split", "eval",
      "--examples", "48", "--batch_size", "20", "--out", str(tmp_path / "ref.npz")])
  reference = fid.GaussianStats.load(out)
  tokenizer = generators.FrozenTokenizer(tok)
  held_out = next(data.held_out_images(tokenizer.config.data, 48, limit=48))
  assert reference.count == 48 and reference.mu.shape == (2048,)
  train_images = next(data.held_out_images(tokenizer.config.data, 48, limit=48, split="train"))
  family = type("Stub", (), {"tokenizer": tokenizer, "sample": None,
                             "few_step_samplers": lambda self: {}})()
  monkeypatch.setattr(train_generator, "held_out_loss", lambda *a: 0.0)
  config = generator_config("dit", tok, **{"eval.num_samples": 48,
                                           "eval.inception_weights": str(weights_file),
                                           "eval.gfid_reference": out})
  train_generator.check_gfid_files(config.eval)
  scores = {}
  for name, images in (("held_out", held_out), ("train", train_images)):
    monkeypatch.setattr(train_generator, "generate", lambda *a, images=images: (images, 1e-3))
    scores[name] = train_generator.evaluate(family, None, config, None)["gen/fid"]
  as_saved = lambda x: features(visualize.as_saved(x))
  expected = fid.fid_from_stats(fid.stats_of(as_saved(held_out)),
                                fid.stats_of(as_saved(train_images)))
  assert abs(scores["held_out"]) < 1e-6 * expected
  assert expected > 1.0 and scores["train"] == pytest.approx(expected, rel=1e-6)


def test_gfid_reference_errors_and_tags(tokenizer_dirs, tmp_path):
  """A reference without the network, a missing or unfit file: ConfigErrors that say what to do;
  re-evaluating against another reference tags the metrics with it."""
  config = generator_config("dit", tokenizer_dirs["gaussian"])
  config.eval.gfid_reference = str(tmp_path / "ref.npz")
  with pytest.raises(ConfigError, match="gFID also needs --config.eval.inception_weights"):
    train_generator.validate(config)
  weights_file = tmp_path / "inception.npz"
  config.eval.inception_weights = str(weights_file)
  with pytest.raises(ConfigError, match=r"^gFID and Inception Score: eval.inception_weights=.* "
                     r"does not exist"):  # Not the tokenizer metric names rfid, inception_score.
    train_generator.check_gfid_files(config.eval)
  weights_file.write_bytes(b"")
  train_generator.validate(config)
  with pytest.raises(ConfigError, match="not found; tools/fid_reference.py computes them"):
    train_generator.check_gfid_files(config.eval)
  np.savez(tmp_path / "ref.npz", mu=np.zeros(400), sigma=np.eye(400))  # FVD-sized statistics.
  with pytest.raises(ConfigError, match="are 400-d, not Inception's 2048-d"):
    train_generator.check_gfid_files(config.eval)
  np.savez(tmp_path / "ref.npz", mu=np.zeros(2048))
  with pytest.raises(ConfigError, match=r"unreadable: .* not the statistics' \['sigma'\]"):
    train_generator.check_gfid_files(config.eval)
  np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048), arr_0=np.zeros(3))
  train_generator.check_gfid_files(config.eval)  # ADM's files hold images beside mu, sigma.
  run_eval = generator_config("dit", tokenizer_dirs["gaussian"]).eval
  assert train_generator.eval_tags(run_eval, config.eval) == {"reference": "ref"}
  assert train_generator.eval_tags(config.eval, run_eval) == {"reference": "held_out"}
  assert train_generator.eval_tags(run_eval, run_eval) == {}


def test_generator_flops_count_attention_whatever_it_runs_as(tokenizer_dirs, tmp_path):
  """The record's FLOPs are the XLA-attention model's even when attention runs as a kernel (a
  custom call XLA's cost analysis does not count); the record still says what it ran as."""
  records = {}
  for impl in ("pallas", "xla"):
    config = generator_config("dit", tokenizer_dirs["gaussian"], **{"model.attn_impl": impl})
    family, train_arrays, _ = train_generator.build_family(config, mesh_lib.make_mesh(config.mesh))
    example = {k: v[:1] for k, v in train_arrays.items()}
    params = nn.meta.unbox(family.init(jax.random.key(0), example))
    records[impl] = train_generator.generator_record(
        config, family, params, wall_time=1.0, metrics={}, workdir=str(tmp_path),
        examples_per_sec=None, example=example, train_examples=1)
    if impl == "pallas":  # What XLA counts for the kernel's model itself.
      as_run = flops.xla_flops(family.forward_fn(), params, example)
  assert [c["impl"] for c in records["pallas"]["attention_impl"]] == ["pallas_gpu"]  # Interpreted.
  counted = records["pallas"]["flops_per_example"]["forward_xla"]
  assert counted == records["xla"]["flops_per_example"]["forward_xla"] > 0
  assert as_run != counted


def test_store_holds_latents_and_is_cached(tokenizer_dirs):
  gaussian = codes.load_or_tokenize(tokenizer_dirs["gaussian"], "eval")
  assert gaussian["latents"].shape[1:] == (64, 4) and "codes" not in gaussian
  assert len(gaussian["labels"]) == len(gaussian["latents"]) == 500   # The whole eval split.
  again = codes.load_or_tokenize(tokenizer_dirs["gaussian"], "eval")
  np.testing.assert_array_equal(again["latents"], gaussian["latents"])


def test_a_tokenizer_trained_on_a_mesh_this_machine_lacks_still_makes_its_store(tokenizer_dirs,
                                                                                 tmp_path):
  """The store is made on the generator's mesh (`vitok tokenize`: this machine's devices), not the
  tokenizer's training mesh: one saved as fsdp=8 (8 GPUs, say) tokenizes on this one device."""
  workdir = tmp_path / "tok"
  shutil.copytree(tokenizer_dirs["gaussian"], workdir, ignore=shutil.ignore_patterns("store_*"))
  saved = json.loads((workdir / "config.json").read_text())
  saved["mesh"].update(data=1, fsdp=8)
  (workdir / "config.json").write_text(json.dumps(saved))
  reference = codes.load_or_tokenize(tokenizer_dirs["gaussian"], "eval")
  out = codes.tokenize_workdir(str(workdir), str(tmp_path / "part.npz"), max_examples=20)
  with np.load(out) as part:
    np.testing.assert_allclose(part["latents"], reference["latents"][:20], atol=1e-5)
  mesh = mesh_lib.make_mesh(mesh_lib.default_config())
  store = generators.FrozenTokenizer(str(workdir), mesh).store("eval")
  np.testing.assert_allclose(store["latents"], reference["latents"], atol=1e-5)


@pytest.mark.slow
def test_store_holds_codes_of_the_discrete_bottlenecks(tokenizer_dirs):
  vq = codes.load_or_tokenize(tokenizer_dirs["vq1k"], "eval")
  assert vq["codes"].shape[1:] == (64,) and vq["codes"].max() < 1024
  msbsq = codes.load_or_tokenize(tokenizer_dirs["msbsq"], "eval")
  sides = [msbsq[f"codes_{k}"].shape[1] for k in range(5)]
  assert sides == [1, 2, 4, 6, 8] and msbsq["latents"].shape[1:] == (64, 4)


def test_batches_are_a_function_of_the_batch_index_and_split_over_processes():
  arrays = {"x": np.arange(10) * 10, "labels": np.arange(10)}
  stream = train_generator.Batches(arrays, 4, seed=3)
  seen = [next(stream)["labels"] for _ in range(5)]        # 20 rows = two epochs.
  assert sorted(np.concatenate(seen[:2]).tolist() + seen[2][:2].tolist()) == list(range(10))
  np.testing.assert_array_equal(next(stream)["x"], arrays["x"][stream.rows(5)])
  resumed = train_generator.Batches(arrays, 4, seed=3, start_batch=3)
  np.testing.assert_array_equal(next(resumed)["labels"], seen[3])
  halves = [next(train_generator.Batches(arrays, 4, seed=3, start_batch=1, process_index=p,
                                         process_count=2))["labels"] for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), seen[1])


def test_resumed_run_equals_an_uninterrupted_one(tokenizer_dirs, tmp_path):
  tok = tokenizer_dirs["gaussian"]
  straight = str(tmp_path / "straight")
  train_generator.train(generator_config("dit", tok, steps=8, **{"eval.num_samples": 0}), straight)
  split = str(tmp_path / "split")
  config = generator_config("dit", tok, steps=8, **{"eval.num_samples": 0, "ckpt_every": 4})
  first = ml_collections.ConfigDict(config.to_dict())
  first.total_steps = 4
  train_generator.train(first, split)                      # Stops at step 4, as if pre-empted.
  train_generator.train(config, split)                     # Resumes to 8.
  params = []
  for workdir in (straight, split):
    cfg = config_lib.read_config(workdir)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    family, train_arrays, _, state, _, _ = train_generator.setup(cfg, mesh)
    ckpt = train_generator.checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    params.append(jax.tree.map(np.asarray, ckpt.restore(ckpt.latest_step(), state).params))
    ckpt.close()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *params)


def test_resuming_with_another_config_is_refused_before_tokenizing(tokenizer_dirs, tmp_path,
                                                                    monkeypatch):
  """A generator relaunched with a config that would train the rest differently (here the
  learning rate) is refused before its tokenizer is loaded and its stores are read or made."""
  workdir = str(tmp_path / "gen")
  config = generator_config("dit", tokenizer_dirs["gaussian"], steps=2, **{"eval.num_samples": 0})
  train_generator.train(config, workdir)
  config.total_steps = 4
  config.optim.base_lr *= 2
  monkeypatch.setattr(generators, "FrozenTokenizer",
                      lambda *a: pytest.fail("loaded the tokenizer before refusing the config"))
  with pytest.raises(ConfigError, match=r"would change optim\.base_lr"):
    train_generator.train(config, workdir)


def test_a_run_on_a_tokenizer_trained_on_since_is_not_resumed(tokenizer_dirs, tmp_path):
  """The tokenizer trained two more steps after the generator started: the generator's codes
  would change mid-run, so resuming or evaluating it is an error, raised before the store is
  remade. The finished run relaunched returns its record."""
  import shutil  # pylint: disable=g-import-not-at-top
  tok = str(tmp_path / "tok")
  shutil.copytree(tokenizer_dirs["gaussian"], tok)
  workdir = str(tmp_path / "gen")
  config = generator_config("dit", tok, steps=2, **{"eval.num_samples": 0})
  train_generator.train(config, workdir)
  tok_config = config_lib.read_config(tok)
  tok_config.total_steps += 2
  train_tokenizer.train(tok_config, tok)
  assert train_generator.train(config, workdir)["steps"] == 2  # Finished: its record stands.
  config.total_steps = 4
  with pytest.raises(ConfigError, match=r"at its step 12; that tokenizer is now at step 14"):
    train_generator.train(config, workdir)
  with np.load(os.path.join(tok, "store_train.npz")) as store:  # Refused before re-tokenizing.
    assert int(store["step"]) == 12
  with pytest.raises(ConfigError, match=r"so evaluating or sampling it would mix"):
    train_generator.evaluate_workdir(workdir)
  # A generator pointed at its tokenizer's workdir: the tokenizer run is named, not a diff.
  with pytest.raises(ConfigError, match=rf"^{tok} holds a tokenizer run; this generator needs a "
                     r"new --workdir$"):
    train_generator.train(config, tok)


def test_codes_of_an_unfinished_tokenizer_are_warned_about(tokenizer_dirs, tmp_path, caplog):
  """A tokenizer stopped before its total_steps gives codes of that step: a generator of them is
  warned that it cannot resume once the tokenizer trains on; a finished one is not warned."""
  import shutil  # pylint: disable=g-import-not-at-top
  finished, tok = tokenizer_dirs["gaussian"], str(tmp_path / "tok")
  shutil.copytree(finished, tok)
  config = config_lib.read_config(tok)
  config.total_steps = 40  # As a run stopped at step 12 of 40.
  config_lib.save_config(config, tok)
  with caplog.at_level("WARNING"):
    codes.load_or_tokenize(finished, "eval")
    assert "unfinished" not in caplog.text
    codes.load_or_tokenize(tok, "eval")
  assert f"tokenizer {tok} is at step 12 of its 40 (unfinished)" in caplog.text


def test_config_errors_name_the_field(tokenizer_dirs, tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match="FAMILY/SIZE"):
    config_lib.load_config("generator:gan/B,tokenizer=x")
  with pytest.raises(ConfigError, match="model.size"):
    config_lib.load_config("generator:dit/d16,tokenizer=x")
  monkeypatch.chdir(tmp_path)  # No quickstart sweep here: no default tokenizer either.
  with pytest.raises(ConfigError, match="run `vitok sweep quickstart` first"):
    config_lib.load_config("generator:dit/Mu")
  c4 = tmp_path / "runs" / "quickstart" / "runs" / "c4-0123456789"
  c4.mkdir(parents=True)
  with pytest.raises(ConfigError, match="no finished quickstart tokenizer"):
    config_lib.load_config("generator:dit/Mu")  # Not finished: no record.json.
  (c4 / "record.json").write_text("{}")
  assert config_lib.load_config("generator:dit/Mu").tokenizer == str(c4)
  with pytest.raises(ConfigError, match="needs a tokenizer with bottleneck in"):
    train_generator.train(generator_config("llamagen", tokenizer_dirs["gaussian"]), str(tmp_path))
  with pytest.raises(ConfigError, match="is not a run directory"):
    train_generator.train(generator_config("dit", str(tmp_path / "missing")), str(tmp_path / "g"))


def test_cli_tokenize_and_sample(tokenizer_dirs, tmp_path, monkeypatch, capsys):
  # An --out that cannot take the file is refused before anything is tokenized or sampled.
  spy = lambda *a, **kw: pytest.fail("worked before checking --out")
  monkeypatch.setattr(codes, "tokenize_workdir", spy)
  monkeypatch.setattr(train_generator, "sample_workdir", spy)
  for command, bad, says in [("tokenize", tmp_path, "is a directory"),
                             ("tokenize", tmp_path / "store.png", "must end in .npz"),
                             ("sample", tmp_path / "grid", "must end in .png or .jpg"),
                             ("sample", tmp_path / "f.txt" / "grid.png", "cannot make")]:
    (tmp_path / "f.txt").write_text("a file")
    assert cli.main(["vitok", command, f"--workdir={tokenizer_dirs['gaussian']}",
                     f"--out={bad}"]) == 2
    assert says in capsys.readouterr().err
  monkeypatch.undo()
  out = str(tmp_path / "store.npz")
  assert cli.main(["vitok", "tokenize", f"--workdir={tokenizer_dirs['gaussian']}", "--split=eval",
                   f"--out={out}", "--max_examples=20"]) == 0
  with np.load(out) as store:
    assert store["latents"].shape == (20, 64, 4) and store["labels"].shape == (20,)
  workdir = str(tmp_path / "dit")
  train_generator.train(generator_config("dit", tokenizer_dirs["gaussian"], steps=2,
                                         **{"eval.num_samples": 0}), workdir)
  png = str(tmp_path / "grid.png")
  assert cli.main(["vitok", "sample", f"--workdir={workdir}", "--num_samples=20",
                   f"--out={png}"]) == 0
  from PIL import Image  # pylint: disable=g-import-not-at-top
  width, height = Image.open(png).size
  assert width == 10 * (32 + 2) and height == 2 * (32 + 2)
  calls = []  # --sample reaches sample_workdir's overrides.
  monkeypatch.setattr(train_generator, "sample_workdir", lambda *a, **kw: calls.append(kw) or "")
  assert cli.main(["vitok", "sample", f"--workdir={workdir}", "--sample=cfg_scale=5"]) == 0
  # Commas inside brackets stay with their value.
  assert cli.main(["vitok", "sample", f"--workdir={workdir}",
                   "--sample=few_steps=(1,2), method=euler,cfg_scale=1.5"]) == 0
  assert calls == [{"cfg_scale": 5}, {"few_steps": (1, 2), "method": "euler", "cfg_scale": 1.5}]


def test_a_run_of_the_wrong_kind_or_a_bad_sample_value_is_a_clear_error(tokenizer_dirs, tmp_path,
                                                                          capsys, monkeypatch):
  tok = tokenizer_dirs["gaussian"]
  workdir = str(tmp_path / "dit")
  train_generator.train(generator_config("dit", tok, steps=2, **{"eval.num_samples": 0}),
                        workdir)
  for args, says in [
      (["sample", f"--workdir={tok}"], "is a tokenizer run, not a generator run"),
      (["tokenize", f"--workdir={workdir}"], "is a generator run, not a tokenizer run"),
      (["sample", f"--workdir={workdir}", "--sample=cfg_scale=abc"], "sample overrides"),
      (["sample", f"--workdir={workdir}", "--num_samples=0"], "draw at least one sample"),
      (["eval", f"--workdir={workdir}", "--metrics=lpips"], "--metrics=lpips applies to tokenizer "
       "runs; a generator run reports its gen/* metrics")]:
    assert cli.main(["vitok", *args]) == 2
    assert says in capsys.readouterr().err
  with pytest.raises(ConfigError, match="is a generator run, not a tokenizer run"):
    train_generator.train(generator_config("dit", workdir), str(tmp_path / "on_a_generator"))
  # A run saved before eval.gfid_reference existed takes it as an override (read_config fills
  # it in): here the file it names is missing, which the re-evaluation says before sampling.
  saved = json.loads((tmp_path / "dit" / "config.json").read_text())
  del saved["eval"]["gfid_reference"]
  (tmp_path / "dit" / "config.json").write_text(json.dumps(saved))
  (tmp_path / "inception.npz").write_bytes(b"")
  argv = ["vitok", "eval", f"--workdir={workdir}",
          f"--config.eval.inception_weights={tmp_path / 'inception.npz'}",
          f"--config.eval.gfid_reference={tmp_path / 'ref.npz'}"]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections finds --config.x overrides there.
  assert cli.main(argv) == 2
  assert "ref.npz' not found; tools/fid_reference.py computes them" in capsys.readouterr().err
  argv = ["vitok", "eval", f"--workdir={workdir}", "--config.sample.cfg_scale=7"]
  monkeypatch.setattr(sys, "argv", argv)  # A sample setting goes in --sample (tagged).
  assert cli.main(argv) == 2
  assert "it would change sample.cfg_scale: 1.5 → 7.0" in capsys.readouterr().err
  # Re-evaluated with another sample count than the run's (0): its FID is tagged with the count.
  eval_config = config_lib.read_config(workdir).eval
  eval_config.num_samples = 10
  metrics = train_generator.evaluate_workdir(workdir, eval_config=eval_config)
  assert "gen/num_samples=10/fid_mnist" in metrics and "gen/fid_mnist" not in metrics


def test_num_classes_below_the_datas_labels_is_a_config_error(tokenizer_dirs, tmp_path):
  """Labels past the class table would be looked up out of range (NaN losses, reported as a
  divergence); the run refuses to start instead, naming the label count."""
  config = generator_config("dit", tokenizer_dirs["gaussian"], steps=2,
                            **{"model.num_classes": 5})
  with pytest.raises(ConfigError, match=r"model.num_classes=5, but the tokenizer's train data "
                     r"has labels up to 9; set model.num_classes >= 10"):
    train_generator.train(config, str(tmp_path / "dit"))


def test_a_partial_store_is_not_a_generators_training_set(tokenizer_dirs, tmp_path):
  """`vitok tokenize --max_examples` into the default store path: the generator's store is remade
  from the whole split, and its record says how many examples it trained on."""
  tok = tokenizer_dirs["gaussian"]
  assert cli.main(["vitok", "tokenize", f"--workdir={tok}", "--split=train",
                   "--max_examples=20"]) == 0
  record = train_generator.train(generator_config("dit", tok, steps=2, **{"eval.num_samples": 0}),
                                 str(tmp_path / "dit"))
  whole = len(codes.load_or_tokenize(tok, "train")["labels"])
  assert record["train_examples"] == whole > 20


def test_samples_of_a_short_last_batch_reuse_the_compiled_sampler(monkeypatch):
  """20 samples in batches of 16: the last batch is padded to 16, so nothing recompiles inside
  the timed loop (which inflated ms_per_sample), and the time is per row run (32), not per sample
  asked for (20)."""
  import types  # pylint: disable=g-import-not-at-top
  traces = []

  def sample_fn(params, labels_B, rng):
    del rng
    traces.append(labels_B.shape)
    return jnp.broadcast_to(labels_B[:, None].astype(jnp.float32) + params, (labels_B.shape[0], 3))

  tokenizer = types.SimpleNamespace(params=0.0, mesh=mesh_lib.make_mesh(devices=jax.devices()[:1]))
  config = ml_collections.ConfigDict({"batch_size": 16})
  labels = train_generator.sample_labels(20, 10)
  clock = iter(range(100))  # Each timed batch takes one "second".
  monkeypatch.setattr(train_generator.time, "time", lambda: next(clock))
  pixels, seconds = train_generator.generate(sample_fn, 1.0, labels, config, jax.random.key(0),
                                             tokenizer)
  assert traces == [(16,)] and pixels.shape == (20, 3)
  assert seconds == 2 / 32
  np.testing.assert_array_equal(pixels[:, 0], labels + 1.0)


SHARDED_EVAL = """
import json, sys
import jax
from vitok_jax.train import train_generator
split, make = [], train_generator.make_sampler
over_batch_shards = jax.sharding.PartitionSpec(("data", "fsdp"))
def spy(sample_fn, tokenizer):
  sampler = make(sample_fn, tokenizer)
  def call(params, tokenizer_params, labels, key):
    split.append(labels.sharding.spec == over_batch_shards)
    return sampler(params, tokenizer_params, labels, key)
  return call
train_generator.make_sampler = spy
metrics = train_generator.evaluate_workdir(sys.argv[1])
print(json.dumps({"metrics": metrics, "split": split, "devices": jax.device_count()},
                 default=float))
"""


def test_eval_on_eight_devices_samples_a_share_per_device(tokenizer_dirs, tmp_path):
  """`vitok eval` of a DiT on 8 devices (mesh data=8): the labels reach the sampler split over the
  batch shards (each device samples 2 of 16; every device sampled all 16 before) and the metrics
  equal one device's."""
  workdir = str(tmp_path / "dit")
  train_generator.train(generator_config("dit", tokenizer_dirs["gaussian"], steps=2), workdir)
  one = train_generator.evaluate_workdir(workdir)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
         + " --xla_force_host_platform_device_count=8"}
  run = subprocess.run([sys.executable, "-c", SHARDED_EVAL, workdir], env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8 and out["split"] and all(out["split"]), out["split"]
  eight = out["metrics"]
  np.testing.assert_allclose(eight["eval/loss"], one["eval/loss"], rtol=1e-4)
  np.testing.assert_allclose(eight["gen/fid_mnist"], one["gen/fid_mnist"], rtol=1e-2)
  assert abs(eight["gen/class_accuracy"] - one["gen/class_accuracy"]) <= 0.1


def test_sampler_takes_the_tokenizer_weights_as_an_argument(tokenizer_dirs):
  """The compiled sampler reads the frozen tokenizer's weights from its arguments (zeroing them
  changes the pixels with no retrace), and the tokenizer keeps its concrete weights afterwards."""
  config = generator_config("dit", tokenizer_dirs["gaussian"], **{"sample.num_steps": 2})
  family, _, eval_arrays = train_generator.build_family(config, mesh_lib.make_mesh(config.mesh))
  params = family.init(jax.random.key(0), {k: v[:2] for k, v in eval_arrays.items()})
  tokenizer = family.tokenizer
  traces = []
  sampler = train_generator.make_sampler(
      lambda p, l, r: traces.append(1) or family.sample(p, l, r), tokenizer)
  labels, key = np.arange(2, dtype=np.int32), jax.random.key(1)
  pixels = sampler(params, tokenizer.params, labels, key)
  zeroed = sampler(params, jax.tree.map(lambda x: x * 0, tokenizer.params), labels, key)
  assert pixels.shape == (2, 32, 32, 1) and len(traces) == 1
  assert float(np.abs(np.asarray(pixels) - np.asarray(zeroed)).max()) > 1e-3
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(tokenizer.params))


def test_var_samplers_read_the_tokenizer_weights_they_are_given(tokenizer_dirs):
  """VAR's per-scale steps are compiled once and cached, but the quantiser weights that make each
  next scale's inputs (codebook, φ) are their argument: a second evaluation's sampler (a new
  trace) runs, and samples with other tokenizer weights are those an uncompiled call gives."""
  config = generator_config("var", tokenizer_dirs["msvq"])
  family, _, eval_arrays = train_generator.build_family(config, mesh_lib.make_mesh(config.mesh))
  params = nn.meta.unbox(family.init(jax.random.key(0), {k: v[:2] for k, v in eval_arrays.items()}))
  # Noise on the initialisation (whose logits hardly depend on the inputs), and greedy draws: the
  # codes follow the inputs the tokenizer's weights make.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), params)
  tokenizer = family.tokenizer
  codes_of = lambda p, l, r: var.sample_var(family.model, p, l, r, family.next_input(), top_k=1)
  labels, key = np.arange(2, dtype=np.int32), jax.random.key(1)
  first = train_generator.make_sampler(codes_of, tokenizer)(params, tokenizer.params, labels, key)
  other = jax.tree.map(lambda x: -3 * x, tokenizer.params)
  second = train_generator.make_sampler(codes_of, tokenizer)(params, other, labels, key)
  with generators.swapped(tokenizer, "params", other):
    uncompiled = codes_of(params, labels, key)
  for a, b in zip(second, uncompiled):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(first, second))


def _family_stub(family_cls, config, monkeypatch, module, sampler_name):
  """A family without a tokenizer or params; its sampler call's kwargs land in the returned dict."""
  family = family_cls.__new__(family_cls)
  family.config, family.model, family._next_input_fn = config, None, object()
  family.tokenizer = type("Tok", (), {"decode_codes": staticmethod(lambda codes: codes),
                                      "params": None})()
  seen = {}
  monkeypatch.setattr(module, sampler_name, lambda *a, **kw: seen.update(kw) or ())
  return family, seen


@pytest.mark.parametrize("family", ["var", "infinity"])
def test_var_and_infinity_samplers_get_every_sample_setting(family, monkeypatch):
  """top_k, top_p, temperature and cfg_schedule reach the sampler (a --sample override must change
  the samples, not just the metric tag); cfg_schedule "linear" is VAR's ramp."""
  config = config_lib.load_config(f"generator:{family}/d2,tokenizer=x")
  assert config.sample.cfg_schedule == {"var": "linear", "infinity": "constant"}[family]
  cls, module, name = {"var": (generators.VARFamily, var, "sample_var"),
                       "infinity": (generators.InfinityFamily, infinity, "sample_infinity")}[family]
  stub, seen = _family_stub(cls, config, monkeypatch, module, name)
  stub.sample(None, np.zeros(2, np.int32), None)
  assert seen["cfg_schedule"] == {"var": "var", "infinity": "constant"}[family]
  top_k = 1 if family == "infinity" else 200
  stub.sample(None, np.zeros(2, np.int32), None, top_k=top_k, top_p=0.9, temperature=0.5,
              cfg_schedule="constant" if family == "var" else "linear", cfg_scale=2.0)
  assert seen == {"cfg_scale": 2.0, "top_k": top_k, "top_p": 0.9, "temperature": 0.5,
                  "cfg_schedule": "constant" if family == "var" else "var"}


def test_family_objective_defaults_and_who_may_set_them():
  """Infinity's released training weighs its loss by scale (`var.scale_loss_weights`); VAR's is a
  plain mean; a family without scales refuses the setting. LlamaGen trains with dropout 0.1; the
  others have none to set."""
  assert config_lib.load_config("generator:infinity/d2,tokenizer=x").objective.reweight_by_scale
  assert not config_lib.load_config("generator:var/d2,tokenizer=x").objective.reweight_by_scale
  assert config_lib.load_config("generator:var/d2,tokenizer=x,reweight=True").objective[
      "reweight_by_scale"]
  for family in ("dit/Mu", "llamagen/Mu"):
    config = config_lib.load_config(f"generator:{family},tokenizer=x")
    config.objective.reweight_by_scale = True
    with pytest.raises(ConfigError, match="objective.reweight_by_scale weighs the scales"):
      train_generator.validate(config)
  # Stochastic depth: None takes the family's published rate; the families without it refuse one.
  assert config_lib.load_config("generator:var/d2,tokenizer=x").model.drop_path is None
  rate = lambda family, **model: generators.drop_path_rate(
      family, ml_collections.ConfigDict({"model": model}), depth=16)
  assert rate("var", drop_path=None) == pytest.approx(0.1 * 16 / 24)
  assert rate("infinity", drop_path=None) == 0.1 and rate("var", drop_path=0.05) == 0.05
  assert rate("var") == 0.0  # A run saved before the field: trained without.
  config = config_lib.load_config("generator:dit/Mu,tokenizer=x")
  assert config.model.drop_path == 0.0
  config.model.drop_path = 0.1
  with pytest.raises(ConfigError, match="model.drop_path is VAR's and Infinity's"):
    train_generator.validate(config)
  # LlamaGen's dropout (0.1 in its training) is its own.
  assert config_lib.load_config("generator:llamagen/Mu,tokenizer=x").model.dropout == 0.1
  for family in ("dit/Mu", "var/d2", "infinity/d2"):
    config = config_lib.load_config(f"generator:{family},tokenizer=x")
    assert config.model.dropout == 0.0
    config.model.dropout = 0.1
    with pytest.raises(ConfigError, match="model.dropout is LlamaGen's"):
      train_generator.validate(config)


def test_sample_settings_a_family_ignores_are_config_errors():
  """Early, in validation: a setting the family's sampler does not read, and Infinity's no-op
  top_k >= 2 (each bit is a 2-way softmax)."""
  for key, value in (("top_p", 0.9), ("top_k", 50), ("temperature", 0.7),
                     ("cfg_schedule", "linear")):
    config = config_lib.load_config("generator:dit/Mu,tokenizer=x")
    config.sample[key] = value
    with pytest.raises(ConfigError, match=f"sample.{key}=.* has no effect on model.family=dit"):
      train_generator.validate(config)
  config = config_lib.load_config("generator:infinity/d2,tokenizer=x")
  for top_k in (0, 1):
    config.sample.top_k = top_k
    train_generator.validate(config)
  config.sample.top_k = 200
  with pytest.raises(ConfigError, match="2-way softmax"):
    train_generator.validate(config)
  with pytest.raises(ConfigError, match="2-way softmax"):
    generators.check_sample_settings("infinity", {**config.sample.to_dict(), "top_k": 2})
  for family in ("var", "infinity"):  # A schedule their samplers do not know.
    config = config_lib.load_config(f"generator:{family}/d2,tokenizer=x")
    config.sample.cfg_schedule = "cosine"
    with pytest.raises(ConfigError, match="sample.cfg_schedule='cosine'"):
      train_generator.validate(config)
  config = config_lib.load_config("generator:llamagen/Mu,tokenizer=x")
  config.sample.update(top_k=50, top_p=0.9, temperature=0.7, cfg_schedule="linear")
  train_generator.validate(config)
  # DiT's ODE settings on the AR families: in a new run's config, saved but read by no sampler;
  # a run saved before this check keeps them (resumed, evaluated, sampled).
  for key, value in (("method", "euler"), ("num_steps", 7), ("few_steps", (1,))):
    for family in ("llamagen/Mu", "var/d2", "infinity/d2"):
      changed = config_lib.load_config(f"generator:{family},tokenizer=x")
      changed.sample[key] = value
      with pytest.raises(ConfigError, match=f"sample.{key}=.* has no effect on model.family="):
        train_generator.validate(changed, new_run=True)
      train_generator.validate(changed)
  with pytest.raises(ConfigError, match="sample.num_steps=7 has no effect"):
    config_lib.load_config("generator:llamagen/Mu,tokenizer=x,sample_steps=7")
  as_saved = config_lib.load_config("generator:var/d2,tokenizer=x").sample.to_dict()
  generators.check_new_sample_settings("var", {**as_saved, "few_steps": [1, 2, 4]})  # A list.
  # `vitok eval --sample` / `vitok sample` overrides the sampler does not read.
  with pytest.raises(ConfigError, match="'num_steps' has no effect on model.family=var"):
    generators.check_sample_overrides("var", {"num_steps": 10})
  with pytest.raises(ConfigError, match="'top_p' has no effect on model.family=dit"):
    generators.check_sample_overrides("dit", {"cfg_scale": 2, "top_p": 0.9})
  generators.check_sample_overrides("infinity", {"top_p": 0.9, "cfg_schedule": "linear"})


def test_training_settings_a_family_ignores_are_config_errors_for_new_runs():
  """flip_max (Infinity), t_sampling and patch (DiT) set on another family: refused for a new run
  (the variant's options included), kept by a run saved before the check; the families that read
  them take them."""
  changes = {"objective.flip_max": 0.1, "objective.t_sampling": "logit_normal", "model.patch": 2}
  for path, value in changes.items():
    readers, kept = generators.FAMILY_TRAINING_SETTINGS[path]
    section, key = path.split(".")
    for family in ("dit/Mu", "llamagen/Mu", "var/d2", "infinity/d2"):
      config = config_lib.load_config(f"generator:{family},tokenizer=x")
      assert config[section][key] == kept
      config[section][key] = value
      if family.partition("/")[0] in readers:
        train_generator.validate(config, new_run=True)
        continue
      with pytest.raises(ConfigError, match=f"{path}={value!r} has no effect on model.family="):
        train_generator.validate(config, new_run=True)
      train_generator.validate(config)  # Saved before the check: resumed as it is.
  with pytest.raises(ConfigError, match="objective.flip_max=0.2 has no effect on model.family=var"):
    config_lib.load_config("generator:var/d2,tokenizer=x,flip=0.2")


def test_a_new_shortcut_run_embeds_the_step_level_and_a_saved_one_keeps_d():
  """shortcut=true in the variant sets objective.shortcut_input="level" (the paper's code); only
  those configs carry it (other run ids unchanged). A shortcut run saved without it trains on
  with d (ADDED_FIELDS), and relaunching it with a new config is a config change. Turned on or
  off by override, a new run is refused (it would embed d, or carry an unread field)."""
  config = config_lib.load_config("generator:dit/Mu,tokenizer=x,shortcut=true")
  assert config.objective.shortcut_input == "level"
  plain = config_lib.load_config("generator:dit/Mu,tokenizer=x")
  assert "shortcut_input" not in plain.objective
  saved = ml_collections.ConfigDict(config.to_dict())
  del saved.objective["shortcut_input"]
  assert config_lib.added_field(saved, "objective.shortcut_input") == "d"
  train_generator.validate(saved)  # Resumed as it is.
  assert loop.config_changes(saved, config) == [
      "objective.shortcut_input: (absent: 'd') → 'level'"]
  assert loop.config_changes(plain, plain) == []
  plain.objective.shortcut = True
  with pytest.raises(ConfigError, match="objective.shortcut set by override embeds the step size"):
    train_generator.validate(plain, new_run=True)
  config.objective.shortcut = False
  with pytest.raises(ConfigError, match="objective.shortcut_input has no effect without"):
    train_generator.validate(config, new_run=True)
  config.objective.update(shortcut=True, shortcut_input="log")
  with pytest.raises(ConfigError, match="objective.shortcut_input"):
    train_generator.validate(config)


def test_a_top_k_that_keeps_the_whole_codebook_is_a_config_error():
  """top_k ≥ the tokenizer's codebook size is a no-op for the softmax heads (it would only change
  the metric tag); Infinity's bitwise head has its own rule (top_k 0 or 1)."""
  def tokenizer(codebook_size):
    return type("Tok", (), {"bottleneck_module": type("B", (), {"codebook_size": codebook_size})})
  for cls in (generators.LlamaGenFamily, generators.VARFamily):
    cls.check_sample_for({"top_k": 1023}, tokenizer(1024))
    cls.check_sample_for({"top_k": 0}, tokenizer(1024))
    with pytest.raises(ConfigError, match="top_k=1024 keeps all 1024 codes"):
      cls.check_sample_for({"top_k": 1024}, tokenizer(1024))
  generators.InfinityFamily.check_sample_for({"top_k": 1}, tokenizer(4096))
  generators.DiTFamily.check_sample_for({"top_k": 0}, tokenizer(0))


def test_swapped_sets_an_attribute_for_a_block_and_restores_it_after_an_error():
  import types  # pylint: disable=g-import-not-at-top
  family = types.SimpleNamespace(model="flash")
  with pytest.raises(ValueError):
    with generators.swapped(family, "model", "xla"):
      assert family.model == "xla"
      raise ValueError
  assert family.model == "flash"


def test_sample_labels_cycle_the_classes_and_spread_fewer_samples_over_all_of_them():
  """A grid of C columns has one class per column; fewer samples than classes are spread evenly
  over the class range (gFID on 500 samples of ImageNet's 1000 classes sees all parts of it)."""
  np.testing.assert_array_equal(train_generator.sample_labels(25, 10), np.arange(25) % 10)
  few = train_generator.sample_labels(500, 1000)
  assert len(set(few.tolist())) == 500 and few.min() == 0 and few.max() == 998
  assert np.all(np.diff(few) == 2)
