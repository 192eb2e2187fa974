r"""ViTok auto-encoder (images and video).

get_config(arg) takes a variant string: model part "ENC-DEC/PATCH" then key=value options.
  "S-B/16,c=16,res=256,data=imagenet"              image, encoder S, decoder B, 16x16 patches, c=16
  "S-B/4x8,c=16,frames=16,res=128,data=ucf101"     video, 4x8x8 tubelets over 16 frames
  "Mu-Mi/4,c=8,res=32,data=mnist,steps=2000"       tiny CPU run on bundled MNIST
Sizes come from vitok_jax.models.vit.SIZES. Defaults are ViTok's published hyper-parameters
(REFERENCE.md): L2 1.0, L1 0.1, LPIPS 1.0 (0 until LPIPS weights are configured), KL 1e-3;
AdamW β=(0.9, 0.95), lr 1e-4 × batch/256, weight decay 1e-4, cosine with warm-up.

  vitok train --config vitok:"Mu-Mi/4,c=8,data=mnist" --workdir runs/mnist --config.total_steps=500
"""
import ml_collections

from vitok_jax import config_lib, data
from vitok_jax.models import larp, vit
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.train import gan, optimizer, train_tokenizer

# The embedded default: a tiny tokenizer on bundled MNIST that trains in minutes on 2 CPU cores.
DEFAULT = "Mu-Mi/4,c=16,res=32,data=mnist,batch=64,steps=500,lr=1e-3"

# Short variant keys -> config paths.
OPTIONS = {
    "c": "model.channels",
    "res": "data.res",
    "frames": "data.frames",
    "data": "data.name",
    "path": "data.path",
    "batch": "batch_size",
    "steps": "total_steps",
    "lr": "optim.base_lr",
    "mlp": "model.mlp",
    "rope": "model.rope",
    "qk_norm": "model.qk_norm",
    "dtype": "model.dtype",
    "seed": "seed",
    "kl": "loss.kl",
    # Discrete bottlenecks (models/bottlenecks.py): vq, vq1k, bsq, msvq(512), msbsq;
    # c = code dim / bits.
    "quantizer": "model.bottleneck",
    # VQ dead-code restart: codes unused for N steps move onto batch inputs (0 = off).
    "restart": "codebook_restart_every",
    "codebook": "model.codebook_size",
    "codebook_ema": "codebook_ema",
    # LARP (quantizer=larp): N learned query tokens, e.g. "Mu-Mi/4,c=8,quantizer=larp,queries=32".
    "queries": "model.num_queries",
}

GRAYSCALE = ("mnist", "digits", "moving_mnist")


def get_config(arg: str = DEFAULT) -> ml_collections.ConfigDict:
  head, options = config_lib.split_variant(arg)
  config = ml_collections.ConfigDict()
  config.variant = arg
  config.seed = 0
  config.batch_size = 256          # Global batch.
  config.total_steps = 100_000
  config.log_every = 50
  config.eval_every = 1000         # Also evaluated at the last step.
  config.eval_examples = 512       # Held-out examples for PSNR/SSIM (0 = the whole eval split).
  config.ckpt_every = 1000
  config.keep_ckpts = 3
  config.ema_decay = 0.0           # 0 disables EMA params; e.g. 0.999.
  config.num_visualize = 8         # Originals vs reconstructions in each eval grid.
  config.codebook_restart_every = 0  # VQ/msvq: restart codes unused over this many steps (0 = off).
  config.codebook_ema = 0.0          # VQ/msvq: EMA codebook decay, e.g. 0.99 (0 = off).

  config.model = ml_collections.ConfigDict(dict(
      encoder="S", decoder="B", patch=(16, 16), channels=16, bottleneck="gaussian",
      mlp="geglu", rope="1d", qk_norm=False, attn_impl="auto", remat=False, dtype="float32",
      num_queries=0,     # LARP's N latent tokens (only with bottleneck="larp").
      codebook_size=0))  # > 0: the learned codebook's size (vq*, msvq, larp), not its default.

  config.data = data.default_config()
  config.data.name = "imagenet"

  # ViTok uses LPIPS 1.0: set loss.lpips=1.0 with perceptual.lpips_weights (tools/convert_lpips.py).
  # commit/codebook: VQ (LlamaGen, VAR) β = 0.25 and 1; vq_entropy: LlamaGen's entropy loss, which
  # only quantizer=vq1k_ent computes (0.1 there, set below); bsq_entropy: BSQ-ViT's entropy penalty
  # weight 0.1 (10 balances the bits, README); bsq_commit: BSQ's commitment, 0 as in BSQ-ViT's
  # configs and Infinity's code; larp_vq (codebook + 0.25·commit) 0.1 and larp_prior (AR prior CE)
  # 0.06 as in LARP. Unused terms are simply not returned.
  config.loss = ml_collections.ConfigDict(dict(
      l2=1.0, l1=0.1, lpips=0.0, kl=1e-3, commit=0.25, codebook=1.0, vq_entropy=0.0,
      bsq_entropy=0.1, bsq_commit=0.0, larp_vq=0.1, larp_prior=0.06, trepa=0.0))
  # TREPA (LatentSync, video only): loss.trepa = 10 with perceptual.trepa_weights, a VideoMAE-v2
  # .npz of size trepa_size ("g/14" as LatentSync; "Mu/8" for CPU smoke runs), clips resized to
  # trepa_resolution (224).
  config.perceptual = ml_collections.ConfigDict(dict(
      lpips_weights="", trepa_weights="", trepa_size="g/14", trepa_resolution=224))
  # Stage 2 (ViTok): gan.enabled=True, init_from=<stage-1 workdir>; decoder fine-tuned, encoder frozen.
  config.gan = gan.default_config()
  config.init_from = ""
  # Held-out metrics beyond PSNR/SSIM, e.g. ("fid_mnist", "lpips", "rfid"), and their weight files.
  config.eval = ml_collections.ConfigDict(dict(
      metrics=(), lpips_weights="", inception_weights="", i3d_weights="", mnist_classifier=""))

  # Devices per mesh axis (-1 = the rest); dcn_* split across nodes/slices. See parallel/mesh.py.
  config.mesh = mesh_lib.default_config()

  config.optim = optimizer.default_config(weight_decay=1e-4)

  if head:
    _set_model(config, head, arg)
  config_lib.apply_options(config, options, OPTIONS, arg)
  if config.model.bottleneck == "vq1k_ent":  # Only there: other runs' configs keep 0 (resume).
    config.loss.vq_entropy = 0.1
  if config.model.bottleneck == larp.NAME:  # LARP's alone (the other kinds' run ids stay).
    # Its AR prior: gptc-S beside the published encoder sizes, Mu beside the CPU ones, with GPT-C's
    # dropout 0.1; trained at 50× the learning rate (LARP's released training scripts:
    # optimizer.prior_lr_mult 50).
    config.model.prior_size = "Mu" if config.model.encoder in ("Mu", "Mi", "Ti") else "S"
    config.model.prior_dropout = 0.1
    config.optim.prior_lr_mult = 50.0
  _set_data(config, options)
  train_tokenizer.validate(config)
  return config


def _set_model(config, head: str, arg: str) -> None:
  """"S-B/16" or "S-B/4x8" -> encoder, decoder, patch (p, p) or (q, p, p)."""
  sizes, sep, patch = head.partition("/")
  encoder, dash, decoder = sizes.partition("-")
  if not sep or not dash:
    raise config_lib.ConfigError(
        f"model part {head!r} of {arg!r} must look like ENC-DEC/PATCH, e.g. S-B/16 or S-B/4x8; "
        f"sizes are {list(vit.SIZES)}")
  config.model.encoder, config.model.decoder = encoder, decoder
  try:
    dims = [int(d) for d in patch.split("x")]
  except ValueError:
    raise config_lib.ConfigError(f"patch {patch!r} in {arg!r} must be P or QxP, e.g. 16 or 4x8") from None
  if len(dims) == 1:
    config.model.patch = (dims[0], dims[0])
  elif len(dims) == 2:
    config.model.patch = (dims[0], dims[1], dims[1])
    if config.data.frames == 1:
      config.data.frames = 16
  else:
    raise config_lib.ConfigError(f"patch {patch!r} in {arg!r} must be P or QxP, e.g. 16 or 4x8")


def _set_data(config, options) -> None:
  preset = data.PRESETS.get(config.data.name)
  if preset:
    config.data.update({k: v for k, v in preset.items() if k != "res" or "res" not in options})
  elif config.data.name in GRAYSCALE:
    config.data.channels = 1
  if data.single_folder(config.data):
    # One folder's eval split by path hashes: adding files moves none between the splits. Only
    # these configs carry the field, so other run ids are unchanged; a folder run saved without
    # it split by position (config_lib.ADDED_FIELDS).
    config.data.folder_split = "hash"
