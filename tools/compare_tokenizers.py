r"""Paired comparison of tokenizer runs on the same held-out images: per-example LPIPS and PSNR.

  python tools/compare_tokenizers.py --workdirs runs/plain,runs/lpips_gan \
      --lpips_weights weights/lpips_vgg.npz --examples 1024 --out compare.json

Every run reconstructs the same first --examples images of the eval split of the first run's data
config; the table gives each run's mean ± standard error and, against the first run, the mean
paired difference ± its standard error and the fraction of images where the run is better. A
paired difference is far tighter than two separate means: most of the spread is in the images.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from vitok_jax import config_lib, data
from vitok_jax.errors import ConfigError
from vitok_jax.eval import reconstruction
from vitok_jax.models.perceptual import lpips
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.train import train_tokenizer


def eval_images(config, examples: int) -> np.ndarray:
  """The first `examples` images [N, H, W, C] in [-1, 1] of the run's eval split."""
  return np.concatenate(list(data.held_out_images(config.data, config.batch_size, examples)))


def reconstruct(workdir: str, images: np.ndarray, batch_size: int) -> np.ndarray:
  config = config_lib.read_config(workdir)
  mesh = mesh_lib.make_mesh(mesh_lib.default_config(), jax.devices()[:1])
  _, params, shardings = train_tokenizer.restore_params(workdir, config, mesh)
  eval_step = train_tokenizer.jit_eval_step(train_tokenizer.build_model(config), mesh,
                                            shardings.params)
  out = []
  for start in range(0, len(images), batch_size):
    x = images[start:start + batch_size]
    rows = len(x)
    x = np.concatenate([x, np.zeros((batch_size - rows, *x.shape[1:]), x.dtype)])
    recon, _ = eval_step(params, x, np.arange(batch_size) < rows)
    out.append(np.asarray(recon)[:rows])
  return np.concatenate(out)


def per_example(images, recon, lpips_fn, batch_size: int) -> dict[str, np.ndarray]:
  psnr = np.asarray(reconstruction.psnr(images, recon))  # As `vitok eval` computes it.
  distance = np.concatenate([np.asarray(lpips_fn(images[i:i + batch_size],
                                                 recon[i:i + batch_size]))
                             for i in range(0, len(images), batch_size)])
  return {"lpips": distance, "psnr": psnr}


def summarize(values: np.ndarray) -> dict:
  return {"mean": float(values.mean()), "sem": float(values.std(ddof=1) / np.sqrt(len(values)))}


def compare(workdirs: list[str], lpips_weights: str, examples: int, batch_size: int) -> dict:
  configs = [config_lib.read_config(w) for w in workdirs]
  for workdir, config in zip(workdirs[1:], configs[1:]):
    if (config.data.name, config.data.res, config.data.channels) != (
        configs[0].data.name, configs[0].data.res, configs[0].data.channels):
      raise ConfigError(f"{workdir} was trained on other data than {workdirs[0]}; compare runs "
                        "with the same data.name, data.res and data.channels")
  images = eval_images(configs[0], examples)
  lpips_fn = lpips.load_perceptual_fn(lpips_weights)
  scores = {w: per_example(images, reconstruct(w, images, batch_size), lpips_fn, batch_size)
            for w in workdirs}
  base = scores[workdirs[0]]
  result = {"examples": len(images), "runs": {}}
  for workdir, score in scores.items():
    entry = {name: summarize(v) for name, v in score.items()}
    if workdir != workdirs[0]:
      entry["minus_first"] = {name: summarize(v - base[name]) for name, v in score.items()}
      entry["fraction_better"] = {"lpips": float(np.mean(score["lpips"] < base["lpips"])),
                                  "psnr": float(np.mean(score["psnr"] > base["psnr"]))}
    result["runs"][workdir] = entry
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdirs", required=True, help="comma-separated runs, the first the base")
  parser.add_argument("--lpips_weights", required=True, help="tools/convert_lpips.py output")
  parser.add_argument("--examples", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--out", default="", help="JSON output")
  args = parser.parse_args(argv)
  result = compare(args.workdirs.split(","), args.lpips_weights, args.examples, args.batch_size)
  for workdir, entry in result["runs"].items():
    line = "  ".join(f"{m} {entry[m]['mean']:.5f}±{entry[m]['sem']:.5f}" for m in ("lpips", "psnr"))
    if "minus_first" in entry:
      d, better = entry["minus_first"], entry["fraction_better"]
      line += (f"  Δlpips {d['lpips']['mean']:+.5f}±{d['lpips']['sem']:.5f}"
               f" (better on {better['lpips']:.0%})  Δpsnr {d['psnr']['mean']:+.3f}"
               f"±{d['psnr']['sem']:.3f}")
    print(f"{workdir}: {line}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
