r"""Generators on the latents or codes of a trained (frozen) tokenizer of this project.

get_config(arg) takes a variant string: "FAMILY/SIZE" then key=value options, e.g.
  "dit/B,tokenizer=runs/vitok_S-B16"          DiT-B flow matching on a Gaussian (ViTok) tokenizer
  "llamagen/L,tokenizer=runs/vq16k"           LlamaGen-L next-token AR on VQ codes
  "var/d16,tokenizer=runs/msvq"               VAR-d16 next-scale prediction on multi-scale VQ codes
  "infinity/d16,tokenizer=runs/msbsq"         Infinity bitwise AR on multi-scale BSQ (self-correction)
  "dit/Mi,steps=3000,lr=1e-3,batch=64"   tiny CPU run on the quickstart sweep's c=4 tokenizer
Sizes: vitok_jax.models.vit.GENERATOR_SIZES. Which tokenizer bottleneck each family needs is in
vitok_jax.train.generators.FAMILIES. Per family, the published objective and sampler: DiT: SiT's
uniform t (logit-normal with --config.objective.t_sampling=logit_normal), label dropout 0.1, Heun
sampling, CFG; LlamaGen: CFG 2.0; VAR: CFG ramped over the scales (cfg_schedule=linear; VAR's FID
sampler also keeps top_k=900, top_p=0.96 of its 4096 codes, which are not defaults here, where
codebooks are 16–4096 codes: --sample top_k=900,top_p=0.96 at `vitok eval`); Infinity:
constant CFG 3, bit flips up to 0.3, the loss reweighted by scale; stochastic depth (VAR:
0.1·depth/24; Infinity: 0.1); LlamaGen's dropout 0.1 on its blocks' outputs and input embeddings;
weight decay 0 (DiT) or 0.05 (the others). The optimiser is one for all
(`optimizer.default_config`: AdamW β=(0.9, 0.95), lr 1e-4 × batch/256, warm-up then cosine decay,
gradient clipping at 1): LlamaGen's and VAR's betas, not their schedules, nor SiT's. To train with
a paper's own (lr 1e-4 at batch 256 in all three):
  SiT       --config.optim.b2=0.999 --config.optim.schedule=constant --config.optim.warmup_steps=0
            --config.optim.clip_norm=0 --config.ema_decay=0.9999
  LlamaGen  --config.optim.schedule=constant --config.optim.warmup_steps=0
  VAR       --config.optim.schedule=linear --config.optim.min_lr_ratio=0.01
            --config.optim.clip_norm=2 --config.optim.warmup_steps=<total_steps / 50>

  vitok train --config generator --workdir runs/dit    (after `vitok sweep quickstart`)
"""
import os

import ml_collections

from vitok_jax import config_lib
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.train import generators, optimizer, train_generator

# The embedded default: DiT-Mi on the c=4 tokenizer of `vitok sweep quickstart` (used whenever no
# tokenizer=WORKDIR is given).
DEFAULT = "dit/Mi,batch=64,steps=3000,lr=1e-3"

OPTIONS = {
    "tokenizer": "tokenizer",
    "batch": "batch_size",
    "steps": "total_steps",
    "lr": "optim.base_lr",
    "seed": "seed",
    "dropout": "model.class_dropout",
    "patch": "model.patch",
    "cfg": "sample.cfg_scale",
    "sample_steps": "sample.num_steps",
    "sampler": "sample.method",
    "shortcut": "objective.shortcut",
    "flip": "objective.flip_max",
    "reweight": "objective.reweight_by_scale",
    "samples": "eval.num_samples",
    "ema": "ema_decay",
}

# Per-family published defaults applied before the options. cfg_schedule "linear" for var is VAR's
# ramp w_k = 1 + cfg·k/(K − 1); "constant" for infinity is Infinity's w = cfg at every scale.
FAMILY_DEFAULTS = {
    "dit": dict(cfg_scale=1.5, cfg_schedule="constant", weight_decay=0.0),
    "llamagen": dict(cfg_scale=2.0, cfg_schedule="constant", weight_decay=0.05),
    "var": dict(cfg_scale=1.5, cfg_schedule="linear", weight_decay=0.05),
    "infinity": dict(cfg_scale=3.0, cfg_schedule="constant", weight_decay=0.05),
}


def get_config(arg: str = DEFAULT) -> ml_collections.ConfigDict:
  head, options = config_lib.split_variant(arg)
  config = ml_collections.ConfigDict()
  config.kind = "generator"        # `vitok train` dispatches on it.
  config.variant = arg
  config.seed = 0
  config.batch_size = 256
  config.total_steps = 100_000
  config.log_every = 50
  config.eval_every = 5000         # Also evaluated at the last step.
  config.ckpt_every = 1000
  config.keep_ckpts = 3
  config.ema_decay = 0.0           # DiT uses 0.9999 on long runs.
  config.num_visualize = 40        # Samples in each eval grid (4 per class when 10 classes).

  # The trained tokenizer's workdir; its store (codes / latents) is made once, next to it.
  config.tokenizer = ""
  # Settings only some families read take the values the others keep (FAMILY_TRAINING_SETTINGS).
  kept = {path: value for path, (_, value) in generators.FAMILY_TRAINING_SETTINGS.items()}
  config.model = ml_collections.ConfigDict(dict(
      family="dit", size="Mi", patch=kept["model.patch"], class_dropout=0.1, num_classes=10,
      mlp_multiple_of=8, attn_impl="auto", dtype="float32",
      dropout=0.0,   # llamagen: its blocks' and input embeddings' dropout (0.1 in LlamaGen).
      # var, infinity: the last block's stochastic-depth rate; None: the published one (VAR's
      # 0.1·depth/24; Infinity's 0.1); the others have none (0).
      drop_path=ml_collections.config_dict.placeholder(float)))
  # dit: t_sampling uniform (SiT's convention, the default) | logit_normal (σ of a standard
  # normal, an option); shortcut = also train the few-step shortcut objective.
  # infinity: flip_max = bitwise self-correction's largest flip probability.
  # var, infinity: reweight_by_scale = weigh a scale-k token's loss by s_K/s_k (Infinity's released
  # training; VAR's is a plain mean, L_mean).
  config.objective = ml_collections.ConfigDict(dict(
      t_sampling=kept["objective.t_sampling"], shortcut=False,
      flip_max=kept["objective.flip_max"], reweight_by_scale=False))
  # Each family's sampler reads only some fields (generators.FAMILIES[f].sample_fields); the others
  # must keep the neutral values below (top_k 0, top_p 1, temperature 1, cfg_schedule constant).
  # dit: num_steps (grid points), method, few_steps; llamagen/var/infinity: temperature, top_k
  # (infinity: 0 or 1), top_p, cfg_schedule (constant | linear: a ramp from the conditional model).
  config.sample = ml_collections.ConfigDict(dict(
      num_steps=50, method="heun", cfg_scale=1.5, cfg_schedule="constant", temperature=1.0,
      top_k=0, top_p=1.0, few_steps=(1, 2, 4)))
  # Generation metrics of config.eval.num_samples class-conditional samples: class accuracy and
  # FID-MNIST on MNIST tokenizers (classifier cached in the tokenizer's workdir).
  # gFID and Inception Score when inception_weights is set (tools/convert_inception.py): against
  # gfid_reference's saved statistics (tools/fid_reference.py, or ADM's ImageNet .npz, as
  # published gFIDs are), else the tokenizer's held-out images (up to gfid_real_examples).
  config.eval = ml_collections.ConfigDict(dict(num_samples=500, mnist_classifier="",
                                               inception_weights="", gfid_real_examples=10_000,
                                               gfid_reference=""))

  config.mesh = mesh_lib.default_config()
  config.optim = optimizer.default_config(weight_decay=0.0)

  if head:
    _set_model(config, head, arg)
  config_lib.apply_options(config, options, OPTIONS, arg)
  if config.objective.shortcut:
    # How the DiT embeds the step size: its level log2(1/d), as the paper's code. Only shortcut
    # configs carry the field, so other run ids are unchanged; a shortcut run saved without it
    # embeds d itself (config_lib.ADDED_FIELDS).
    config.objective.shortcut_input = "level"
  # Absolute, so a launched run finds it from any directory.
  config.tokenizer = os.path.abspath(config.tokenizer or config_lib.quickstart_tokenizer())
  train_generator.validate(config, new_run=True)
  return config


def _set_model(config, head: str, arg: str) -> None:
  family, sep, size = head.partition("/")
  if not sep or family not in FAMILY_DEFAULTS:
    raise config_lib.ConfigError(
        f"model part {head!r} of {arg!r} must look like FAMILY/SIZE with FAMILY one of "
        f"{list(FAMILY_DEFAULTS)}, e.g. dit/B or var/d16")
  config.model.family, config.model.size = family, size
  defaults = FAMILY_DEFAULTS[family]
  config.sample.cfg_scale = defaults["cfg_scale"]
  config.sample.cfg_schedule = defaults["cfg_schedule"]
  config.optim.weight_decay = defaults["weight_decay"]
  config.objective.reweight_by_scale = family == "infinity"
  config.model.dropout = 0.1 if family == "llamagen" else 0.0
  if family not in ("var", "infinity"):  # Theirs stays None: the published rate for the size.
    config.model.drop_path = 0.0
  if family == "llamagen":
    config.model.mlp_multiple_of = 256 if size not in ("Mu", "Mi", "Ti") else 8
