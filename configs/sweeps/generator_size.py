r"""Generator size sweep: DiT Mu / Mi / Ti on one frozen tokenizer, held-out loss vs params.

The tokenizer defaults to the c=4 run of the quickstart sweep (`vitok sweep quickstart`, the
README's first command: Mu-Mu/4 Gaussian tokenizers on bundled MNIST); pass another trained
tokenizer's workdir as the argument. Each DiT (patch 2 on the 8×8 latent grid: 16 tokens) trains
600 steps; the fit is the held-out flow-matching loss vs generator params (and vs training
compute), with the class accuracy and FID-MNIST of its samples in the table.

  vitok sweep generator_size --sweep_dir runs/generator_size
  vitok sweep generator_size:runs/my_tokenizer --sweep_dir runs/generator_size_mine
"""
import ml_collections

from vitok_jax import config_lib


def get_config(arg: str = ""):
  """arg: the tokenizer's workdir, bare or as tokenizer=WORKDIR (default: the quickstart sweep's
  c=4 run)."""
  tokenizer = arg.removeprefix("tokenizer=") or config_lib.quickstart_tokenizer()
  sweep = ml_collections.ConfigDict()
  sweep.name = "generator_size"
  sweep.base = (f"generator:dit/Mu,tokenizer={tokenizer},patch=2,batch=64,steps=600,lr=4e-3,"
                "samples=200,sample_steps=20")
  sweep.axes = [("product", {"model.size": ["Mu", "Mi", "Ti"]})]
  sweep.max_attempts = 2
  sweep.parallel = 1
  sweep.metric = "eval/loss"
  sweep.fits = [dict(x="params_total", y="eval/loss"), dict(x="compute", y="eval/loss")]
  sweep.frontier = dict(y="eval/loss")
  return sweep
