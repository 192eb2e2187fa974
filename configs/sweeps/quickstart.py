r"""The embedded-default scaling sweep: reconstruction vs bottleneck size E on 2 CPU cores.

Five Mu-Mu/4 tokenizers on bundled MNIST at 32x32 (64 tokens), c = 1..16 channels, so
E = tokens × c = 64..1024 floats per image. ViTok: reconstruction improves with E (PSNR rises,
L2 falls). About 1 min per run on 2 idle CPU cores (~5 min in all), ~2.5 min per run when shared.

  vitok sweep quickstart --sweep_dir runs/quickstart
"""
import ml_collections

from vitok_jax import config_lib


def get_config(arg: str = ""):
  """arg: optional variant options for every run, replacing the base's, e.g. "steps=50"."""
  sweep = ml_collections.ConfigDict()
  sweep.name = "quickstart"
  sweep.base = "vitok:" + config_lib.with_options(
      "Mu-Mu/4,res=32,data=mnist,batch=32,steps=300,lr=1e-3", arg)
  sweep.axes = [("product", {"c": [1, 2, 4, 8, 16]})]
  sweep.max_attempts = 2
  sweep.parallel = 1            # Each trainer already uses both cores.
  sweep.metric = "eval/psnr"
  sweep.fits = [dict(x="E", y="eval/psnr"), dict(x="E", y="eval/l2")]
  sweep.frontier = dict(y="eval/l2")
  return sweep
