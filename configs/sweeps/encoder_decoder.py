r"""ViTok's encoder × decoder size sweep at fixed E, each run trained for the same compute.

Steps are set per run so that every run spends `budget` training FLOPs (train FLOPs per example ×
batch × steps), the fair comparison across sizes. arg: "cpu" (default, Mu/Mi/Ti on MNIST) or
"imagenet" (S/B/L on ImageNet 256p).

  vitok sweep encoder_decoder --sweep_dir runs/enc_dec
"""
import ml_collections

from vitok_jax.errors import ConfigError
from vitok_jax.scaling import flops
from vitok_jax.train import train_tokenizer

SETTINGS = {
    "cpu": dict(base="vitok:Mu-Mu/4,c=8,res=32,data=mnist,batch=32,lr=1e-3",
                sizes=["Mu", "Mi", "Ti"], budget=4e12),
    "imagenet": dict(base="vitok:S-B/16,c=16,res=256,data=imagenet,batch=256",
                     sizes=["S", "B", "L"], budget=1e20),
}


def steps_for_budget(budget: float):
  """An override: total_steps = budget / (train FLOPs per example × batch), at least 10."""
  def override(point, config):
    del point
    per_example = flops.train_flops_per_example(train_tokenizer.build_model(config),
                                                train_tokenizer.pixel_shape(config))
    steps = max(int(budget / (per_example * config.batch_size)), 10)
    return {"total_steps": steps, "optim.warmup_steps": max(steps // 10, 1)}
  return override


def get_config(arg: str = "cpu"):
  if (arg or "cpu") not in SETTINGS:
    raise ConfigError(f"encoder_decoder:{arg}: the argument is one of {list(SETTINGS)}, e.g. "
                      "`vitok sweep encoder_decoder:imagenet`")
  setting = SETTINGS[arg or "cpu"]
  sweep = ml_collections.ConfigDict()
  sweep.name = f"encoder_decoder_{arg or 'cpu'}"
  sweep.base = setting["base"]
  sweep.axes = [("product", {"model.encoder": setting["sizes"], "model.decoder": setting["sizes"]})]
  sweep.overrides = [steps_for_budget(setting["budget"])]
  sweep.max_attempts = 2
  sweep.parallel = 1
  sweep.metric = "eval/psnr"
  sweep.fits = [dict(x="params_decoder", y="eval/l2")]
  sweep.heatmap = dict(x="model.decoder", y="model.encoder", value="eval/psnr")
  sweep.frontier = dict(y="eval/l2")
  return sweep
