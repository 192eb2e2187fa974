"""Variant strings, overrides and the errors a user sees for bad configs."""
import json
import logging
import sys

import pytest

from vitok_jax import ConfigError, config_lib
from vitok_jax.train import train_tokenizer


def load(arg):
  return config_lib.load_config(f"vitok:{arg}")


def test_image_variant_decodes_sizes_patch_and_options():
  c = load("S-B/16,c=16,res=256,data=imagenet")
  assert (c.model.encoder, c.model.decoder, tuple(c.model.patch)) == ("S", "B", (16, 16))
  assert c.model.channels == 16 and c.data.res == 256 and c.data.frames == 1
  assert c.data.name == "tfds" and c.data.tfds_name == "imagenet2012" and c.data.channels == 3
  # Published defaults (REFERENCE.md).
  assert (c.loss.l2, c.loss.l1, c.loss.kl) == (1.0, 0.1, 1e-3)
  assert (c.optim.b1, c.optim.b2, c.optim.base_lr, c.optim.weight_decay) == (0.9, 0.95, 1e-4, 1e-4)


def test_dataset_presets_take_their_published_resolution_unless_given():
  """data=imagenet trains at ViTok's 256p, ucf101 at 128p (the data default, 32, made an ImageNet
  S-B/16 of 4 tokens); a res option wins. The bottleneck sweep's base gets the res its E filter
  assumes."""
  assert load("c=4").data.res == load("S-B/16,data=imagenet").data.res == 256
  assert load("S-B/4x8,data=ucf101").data.res == 128
  assert load("S-B/16,res=64,data=imagenet").data.res == 64
  from vitok_jax.scaling import sweep  # pylint: disable=g-import-not-at-top
  runs = sweep.expand(sweep.load("bottleneck:data=imagenet,steps=50"))
  assert {r.config.data.res for r in runs} == {256}
  for r in runs:
    E = (256 // r.config.model.patch[0]) ** 2 * r.config.model.channels
    assert 64 <= E <= 16384


def test_video_variant_uses_tubelets():
  c = load("S-B/4x8,c=16,frames=16,res=128,data=ucf101")
  assert tuple(c.model.patch) == (4, 8, 8) and c.data.frames == 16 and c.data.image_key == "video"


def test_tiny_default_is_grayscale_mnist():
  c = config_lib.load_config("vitok")
  assert c.data.name == "mnist" and c.data.channels == 1 and c.model.encoder in ("Mu", "Mi", "Ti")


def test_option_values_take_the_field_type():
  c = load("Mu-Mu/4,c=8,res=32,data=mnist,lr=3e-3,steps=1e3,qk_norm=true")
  assert c.optim.base_lr == 3e-3 and c.total_steps == 1000 and c.model.qk_norm is True


@pytest.mark.parametrize("arg,message", [
    ("XL-B/16,data=mnist,res=32", r"model.encoder='XL' is not allowed; use one of \['Mu'"),
    ("S-B/15,res=256,data=imagenet", r"patch size 15 does not divide data.res=256; use one of"),
    ("S-B/4x8,frames=10,res=128,data=ucf101", r"data.frames=10 is not divisible by the tubelet length 4"),
    ("S-B/16,colour=3", r"unknown variant option 'colour'"),
    ("S-B/16,c=sixteen", r"c=sixteen: expected a whole number"),
    ("Mu-Mu/4,c=2.9e0,data=mnist", r"c=2.9e0: expected a whole number"),
    ("Mu-Mu/4,lr=inf,data=mnist", r"lr=inf: expected a finite number"),
    ("Mu-Mu/4,qk_norm=yes,data=mnist", r"qk_norm=yes: expected true or false"),
    ("Mu-Mu/4,c=16,c=8,data=mnist", r"variant option 'c' is given twice"),
    ("S/16,data=mnist", r"must look like ENC-DEC/PATCH"),
    ("Mu-Mu/4,c=0,data=mnist,res=32", r"model.channels \(c\) must be >= 1"),
])
def test_bad_variants_raise_config_errors_naming_the_field(arg, message):
  with pytest.raises(ConfigError, match=message):
    load(arg)


def test_overrides_are_revalidated_by_the_trainer():
  c = load("Mu-Mu/4,c=8,res=32,data=mnist,steps=100")
  c.optim.warmup_steps = 500  # The learning rate would peak at the last step.
  with pytest.raises(ConfigError, match="optim.warmup_steps=500 is longer than the run"):
    train_tokenizer.validate(c)
  c = load("Mu-Mu/4,c=8,res=32,data=mnist")
  c.model.patch = (3, 3)
  with pytest.raises(ConfigError, match="patch size 3 does not divide data.res=32"):
    train_tokenizer.validate(c)
  c.model.patch = (4, 4)
  c.data.frames = 8
  with pytest.raises(ConfigError, match="data.frames=8 but data.name='mnist' holds images"):
    train_tokenizer.validate(c)
  with pytest.raises(ConfigError, match=r"model.patch=\(2, 4, 4\) is a tubelet \(video\) but "
                     "data.name='mnist' holds images; use a P patch"):
    train_tokenizer.validate(load("Mu-Mu/2x4,data=mnist"))
  c.data.name = "moving_mnist"
  with pytest.raises(ConfigError, match="is an image patch but data.frames=8"):
    train_tokenizer.validate(c)


def test_unknown_config_file_lists_known_ones():
  with pytest.raises(ConfigError, match=r"not found; pass a path to a .py config or one of \[.*'vitok'"):
    config_lib.load_config("vitokk:S-B/16")


def test_saved_config_reads_back_equal(tmp_path):
  c = load("Mu-Mi/4x4,c=8,frames=8,res=32,data=moving_mnist")
  config_lib.save_config(c, str(tmp_path))
  back = config_lib.read_config(str(tmp_path))
  assert back.to_dict() == c.to_dict()
  assert json.load(open(tmp_path / "config.json"))["model"]["patch"] == [4, 4, 4]


def test_a_saved_runs_unset_optional_fields_take_command_line_overrides(tmp_path, monkeypatch):
  """`vitok train --config=configs/sweeps/_run.py:RUN --config.optim.warmup_steps=5` on a run that
  left its optional fields unset (null in config.json), and the configs have no other."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  def unset(tree, prefix=""):
    return [k for key, v in tree.items()
            for k in (unset(v, f"{prefix}{key}.") if isinstance(v, dict) else
                      [prefix + key] if v is None else [])]
  config = config_lib.load_config("generator:var/d2,tokenizer=/no/such/run")
  assert set(unset(load("Mu-Mu/4").to_dict()) + unset(config.to_dict())) == set(
      config_lib.OPTIONAL_FIELDS)
  config_lib.save_config(config, str(tmp_path))
  back = config_lib.read_config(str(tmp_path))
  assert back.to_dict() == config.to_dict() and back.model.drop_path is None
  argv = ["vitok", f"--config=configs/sweeps/_run.py:{tmp_path}",
          "--config.optim.warmup_steps=5", "--config.model.drop_path=0.2"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv.
  values = flags.FlagValues()
  flag = config_flags.DEFINE_config_file("config", flag_values=values)
  values(argv)
  assert flag.value.optim.warmup_steps == 5 and flag.value.model.drop_path == 0.2


def test_a_family_set_by_override_is_refused_for_a_new_run(tmp_path):
  """--config.model.family=var on a dit variant would keep DiT's published defaults (constant CFG,
  no weight decay, no stochastic depth): a new run is refused with the variant to use; a run
  saved that way still resumes (its config is checked against the saved one instead)."""
  from vitok_jax.train import train_generator  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("generator:dit/Mi,tokenizer=/no/such/run")
  config.model.family, config.model.size = "var", "d2"
  with pytest.raises(ConfigError, match=r"model.family='var', but the variant 'dit/Mi,.*' made a "
                     r"dit config.*--config generator:var/SIZE"):
    train_generator.train(config, str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()
  train_generator.validate(config, new_run=False)
  var = config_lib.load_config("generator:var/d2,tokenizer=/no/such/run")
  assert (var.sample.cfg_schedule, var.optim.weight_decay, var.model.drop_path) != (
      config.sample.cfg_schedule, config.optim.weight_decay, config.model.drop_path)


@pytest.mark.parametrize("override", [
    "--config.total_steps=1e3", "--config.total_steps=2.0", "--config.total_steps=7",
    "--config.eval.metrics=fid_mnist", "--config.eval.metrics=('fid_mnist', 'lpips')",
    "--config.data.flip=yes", "--config.data.flip=1", "--config.optim.warmup_steps=100",
    "--config.model.patch=(2, 2)", "--config.optim.b1=0.8"])
def test_overrides_parse_as_the_trainer_parses_them(override, monkeypatch):
  """`config_lib.apply_overrides` (what `vitok launch` checks before it submits) takes or refuses
  each override as the trainer's own flags do, with the same value (it refused
  eval.metrics=fid_mnist, which the trainer reads as a 1-tuple, and took total_steps=1e3, which
  the trainer refuses)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  spec = "vitok:Mu-Mi/4,c=8,res=32,data=mnist"
  argv = ["vitok", f"--config={config_lib.resolve_config_path(spec)}", override]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv.
  values = flags.FlagValues()  # The flag `vitok train` declares (cli.py), parsed as it is.
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
  field = override.split("=")[0][len("--config."):]
  try:
    values(argv)
    trainer = values.config.to_dict()
  except flags.Error as e:  # The trainer's refusal: the check must refuse too.
    trainer = e
  if isinstance(trainer, Exception):
    with pytest.raises(ConfigError, match=f"--config.{field}"):
      config_lib.apply_overrides(spec, [override])
  else:
    assert config_lib.apply_overrides(spec, [override]).to_dict() == trainer


def test_metrics_given_as_one_comma_list_get_the_tuple_hint():
  c = load("Mu-Mu/4,c=8,res=32,data=mnist")
  c.eval.metrics = ("fid_mnist,lpips",)  # What --config.eval.metrics=fid_mnist,lpips gives.
  with pytest.raises(ConfigError, match=r"several metrics are a tuple"):
    train_tokenizer.validate(c)


@pytest.mark.parametrize("field,value,message", [
    ("loss.lpips", 1.0, r"loss.lpips > 0 needs perceptual.lpips_weights"),
    ("eval.metrics", ("fid",), r"unknown metrics \['fid'\]; use any of \['lpips'"),
    ("init_from", "/no/such/run", r"init_from='/no/such/run' is not a run directory"),
    ("eval.metrics", ("fvd",), r"has fvd, which scores video clips, but data.frames=1"),
    ("seed", -1, r"seed must be >= 0"),
])
def test_loss_eval_and_stage_two_fields_are_checked(field, value, message):
  c = load("Mu-Mu/4,c=8,res=32,data=mnist")
  c.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError, match=message):
    train_tokenizer.validate(c)
    train_tokenizer.check_files(c)  # Where the run starts: the files it reads.


def test_options_that_switch_a_part_off_say_so(caplog):
  """vq1k_ent turns its entropy loss on (0.1) while other runs keep 0, so their saved configs
  still resume; turning it off, or RoPE off in ViTok (no other position signal), is allowed (an
  ablation) but logged."""
  assert load("Mu-Mu/4,c=8,res=32,data=mnist,quantizer=vq1k_ent").loss.vq_entropy == 0.1
  assert load("Mu-Mu/4,c=8,res=32,data=mnist,quantizer=vq1k").loss.vq_entropy == 0.0
  c = load("Mu-Mu/4,c=8,res=32,data=mnist,quantizer=vq1k_ent,rope=none")
  c.loss.vq_entropy = 0.0
  with caplog.at_level(logging.WARNING):
    train_tokenizer.validate(c)
  assert "loss.vq_entropy=0 turns it off" in caplog.text
  assert "model.rope='none': ViTok's encoder and decoder get no position" in caplog.text


def test_quickstart_tokenizer_is_a_finished_run(tmp_path, monkeypatch):
  """`tokenizer=` left out: the newest finished c=4 quickstart run, not an unfinished one whose
  id sorts last (ids end in a hash of the config)."""
  monkeypatch.chdir(tmp_path)
  runs = tmp_path / "runs" / "quickstart" / "runs"
  for name in ("c4-0aaa", "c4-fff0"):
    (runs / name).mkdir(parents=True)
  with pytest.raises(ConfigError, match="no finished quickstart tokenizer"):
    config_lib.quickstart_tokenizer()
  (runs / "c4-0aaa" / "record.json").write_text("{}")
  assert config_lib.quickstart_tokenizer() == "runs/quickstart/runs/c4-0aaa"


def test_with_options_replaces_and_adds_variant_options():
  base = "Mu-Mu/4,res=32,steps=300,lr=1e-3"
  assert config_lib.with_options(base, "") == base
  assert config_lib.with_options(base, "steps=50,seed=3") == (
      "Mu-Mu/4,res=32,steps=50,lr=1e-3,seed=3")
  assert config_lib.with_options("res=32", "res=16") == "res=16"
  with pytest.raises(ConfigError, match="options only"):
    config_lib.with_options(base, "S-B/16,c=4")


def test_a_sweeps_documented_arg_replaces_its_base_options():
  """quickstart:steps=50 and tokenizer_kinds:steps=50, as their docstrings give them."""
  from vitok_jax.scaling import sweep  # pylint: disable=g-import-not-at-top
  for name in ("quickstart", "tokenizer_kinds"):
    runs = sweep.expand(sweep.load(f"{name}:steps=50"))
    assert {run.config.total_steps for run in runs} == {50}
