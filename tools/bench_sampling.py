r"""Sampling latency of a DiT: many-step ODE (Euler / Heun) against shortcut few-step sampling.

  PYTHONPATH=. python tools/bench_sampling.py                       # tiny DiT-Mi, 8×8×16 latents
  PYTHONPATH=. python tools/bench_sampling.py --size XL --latent 32,32,4 --patch 2 \
      --cfg_scale 1.5 --out sampling.json                           # DiT-XL/2 at 256p (SD-VAE grid)

One DiT with a step-size input (a shortcut model; at d = 0 it is the flow model the ODE samplers
integrate) and random parameters, so every sampler runs the same network. For each batch size:
`flow.sample_ode` with --ode_steps grid points (SiT's count: ode_steps − 1 steps, Euler one call
each, Heun two) and `flow.sample_shortcut` with n = 1, 2, 4 steps (n calls). Each sampler is jitted
and compiled first, run --warmup times, then the median of --iters runs, each ended by
block_until_ready. Speed-up = the baseline's time (the first ODE method) ÷ the sampler's time, in
the same run on the same device. NFE counts network evaluations per sample (×2 rows under CFG).

--batch_sizes auto is 1,64 on GPU/TPU and 1,4 on CPU (batch 64 × 98 Heun calls takes minutes there).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax.errors import ConfigError
from vitok_jax.eval import timing
from vitok_jax.models import dit, flow, vit


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(","))


def _samplers(args):
  """[(name, steps, nfe, fn(velocity_fn, noise))]: the ODE baselines first."""
  out = []
  for method in args.ode_methods.split(","):
    if method not in flow.ODE_METHODS:
      raise ConfigError(f"--ode_methods has {method!r}; use a subset of {flow.ODE_METHODS}")
    nfe = (args.ode_steps - 1) * (2 if method == "heun" else 1)
    out.append((f"ode_{method}", args.ode_steps, nfe,
                lambda v, n, m=method: flow.sample_ode(lambda x, t: v(x, t, jnp.zeros_like(t)), n,
                                                       args.ode_steps, m)))
  for steps in _ints(args.shortcut_steps):
    out.append((f"shortcut{steps}", steps, steps,
                lambda v, n, s=steps: flow.sample_shortcut(v, n, s, max_steps=args.max_steps)))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="Mi", help="DiT size (vit.GENERATOR_SIZES['dit'])")
  parser.add_argument("--latent", default="8,8,16", help="latent grid H,W,C")
  parser.add_argument("--patch", type=int, default=1)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--ode_steps", type=int, default=50, help="ODE grid points (SiT's count)")
  parser.add_argument("--ode_methods", default="heun,euler", help="the first is the baseline")
  parser.add_argument("--shortcut_steps", default="1,2,4")
  parser.add_argument("--max_steps", type=int, default=128, help="shortcut model's finest 1/d")
  parser.add_argument("--batch_sizes", default="auto", help="e.g. 1,64; auto: 1,64 (1,4 on CPU)")
  parser.add_argument("--cfg_scale", type=float, default=1.0, help="≠ 1 doubles the batch")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attn_impl", default="auto")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--out", default=None, help="JSON file for the results")
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  batch_sizes = ((1, 4) if backend == "cpu" else (1, 64)) if args.batch_sizes == "auto" \
      else _ints(args.batch_sizes)
  height, width, channels = _ints(args.latent)
  model = dit.DiT(vit.decode_size(args.size, "dit"), patch=args.patch, in_channels=channels,
                  num_classes=args.num_classes, use_step_size=True, attn_impl=args.attn_impl,
                  dtype=jnp.dtype(args.dtype))
  x = jnp.zeros((1, height, width, channels))
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0)}, x, jnp.zeros(1), jnp.zeros(1, jnp.int32), train=False,
      step_size_B=jnp.zeros(1))))
  # Random parameters drawn on the host (compiling the init costs more than the benchmark on CPU);
  # kernels ~ N(0, 1/fan_in) keep activations O(1), and adaLN-zero's zeros are replaced too, so
  # the samples are not trivially the noise.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape) / math.sqrt(s.shape[0] if len(s.shape) == 2
                                                                     else 50.0), s.dtype), shapes)
  num_params = vit.param_count(params)

  def run(sampler, params, noise, labels_B):
    apply = lambda x, t, labels, d: model.apply(params, x, t, labels, train=False, step_size_B=d)
    return sampler(flow.cfg_velocity(apply, labels_B, args.num_classes, args.cfg_scale), noise)

  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({backend}); DiT-{args.size}/{args.patch} "
        f"{num_params / 1e6:.2f}M params on {height}×{width}×{channels} latents; cfg_scale "
        f"{args.cfg_scale}; {args.dtype}")
  header = f"{'batch':>5} {'sampler':<11} {'steps':>5} {'NFE':>4} {'ms/batch':>10} " \
           f"{'ms/sample':>10} {'speed-up':>8} {'compile s':>9}"
  print(header)
  rows = []
  for batch in batch_sizes:
    noise = jax.random.normal(jax.random.key(2), (batch, height, width, channels))
    labels_B = jnp.arange(batch, dtype=jnp.int32) % args.num_classes
    baseline_s = None
    for name, steps, nfe, sampler in _samplers(args):
      compile_s, run_s, _ = timing.time_jitted(lambda p, n, lab, s=sampler: run(s, p, n, lab),
                                               (params, noise, labels_B), args.warmup, args.iters)
      baseline_s = baseline_s or run_s
      row = {"batch": batch, "sampler": name, "steps": steps, "nfe": nfe,
             "ms_per_batch": 1e3 * run_s, "ms_per_sample": 1e3 * run_s / batch,
             "speedup": baseline_s / run_s, "compile_s": compile_s}
      rows.append(row)
      print(f"{batch:>5} {name:<11} {steps:>5} {nfe:>4} {row['ms_per_batch']:>10.2f} "
            f"{row['ms_per_sample']:>10.3f} {row['speedup']:>7.1f}× {compile_s:>9.1f}", flush=True)

  result = {"device": device.device_kind, "backend": backend,
            "config": {**vars(args), "batch_sizes": list(batch_sizes)},
            "num_params": num_params, "baseline": rows[0]["sampler"] if rows else None,
            "rows": rows}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
