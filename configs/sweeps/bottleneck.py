r"""ViTok's bottleneck sweep: patch size × channels, i.e. E = (res/patch)² × c, at fixed model size.

arg: extra variant options for the base, e.g. "res=256,data=imagenet,steps=100000" (default: a CPU-
sized MNIST version). Runs with E outside [64, 16384] are filtered out.

  vitok sweep bottleneck --sweep_dir runs/bottleneck
  vitok sweep bottleneck:"res=256,data=imagenet,batch=256,steps=100000" --target=slurm
"""
import ml_collections

from vitok_jax import config_lib
from vitok_jax.errors import ConfigError


def get_config(arg: str = "res=32,data=mnist,batch=32,steps=500,lr=1e-3"):
  _, options = config_lib.split_variant(arg)
  try:
    res = int(options.get("res", 256))
  except ValueError:
    raise ConfigError(f"res={options['res']!r} in bottleneck:{arg!r} must be an integer "
                      "resolution, e.g. bottleneck:\"res=256,data=imagenet\"") from None
  if "res" not in options:  # The base trains at the resolution the filter's E assumes.
    arg = f"res={res},{arg}"
  sweep = ml_collections.ConfigDict()
  sweep.name = "bottleneck"
  sweep.base = f"vitok:S-B/16,{arg}" if res >= 128 else f"vitok:Mu-Mu/4,{arg}"
  patches = [8, 16, 32] if res >= 128 else [2, 4, 8]
  sweep.axes = [("product", {"model.patch": [(p, p) for p in patches], "c": [4, 8, 16, 32, 64]})]
  sweep.filters = [lambda point: 64 <= (res // point["model.patch"][0]) ** 2 * point["c"] <= 16384]
  sweep.max_attempts = 2
  sweep.parallel = 1
  sweep.metric = "eval/psnr"
  sweep.fits = [dict(x="E", y="eval/psnr"), dict(x="E", y="eval/l2")]
  sweep.frontier = dict(y="eval/l2")
  return sweep
