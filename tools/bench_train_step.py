r"""Benchmarks the trainer's jitted train step: examples/s, step time, FLOPs and MFU per variant.

  PYTHONPATH=. python tools/bench_train_step.py                      # small CPU set, float32
  PYTHONPATH=. python tools/bench_train_step.py --dtype bfloat16 --batch 64 --steps 20 \
      --variants "S-B/16,c=16,res=256,data=imagenet" --out results.json   # e.g. on an H100

What is timed is the real training step: model, optimizer and state are built as
`train_tokenizer.train` builds them, and the step is `train_tokenizer.make_train_step` jitted with
the same shardings and state donation. The input is a synthetic batch of random normal pixels put
on device once, before timing, so this measures compute only, not the data pipeline (no reading,
decoding, augmentation or host-to-device copies). The step is compiled ahead of time (compile_s),
run --warmup times, then each of --steps timed calls is followed by `block_until_ready` on the new
state and metrics; examples/s is batch / median step time.

FLOPs: the analytic count of `scaling.flops.train_flops_per_example` (matmuls only, 3 × forward,
the MFU convention of REFERENCE.md) and, as a cross-check, XLA's cost analysis of the lowered train
step (forward, backward and optimizer update; before optimisation, `flops.xla_flops`) divided by
the batch. XLA also counts elementwise ops and the optimizer, so it sits a little above the
analytic count; fused attention custom calls (cuDNN, used by attn_impl="auto" for bfloat16 on GPU)
count 0 in XLA: cross-check with --attn_impl xla.

MFU = achieved FLOP/s (analytic) ÷ peak FLOP/s of all devices. The peak per device is
  * CPU: measured in the same run: the best of several [n, n] x [n, n] matmuls in the benchmark
    dtype (2·n³ FLOPs each), reported as "measured matmul peak";
  * GPU: the published dense peak for the device kind (bfloat16; float32 dots run as TF32 under
    XLA's default precision, so the TF32 dense peak); unknown kinds fall back to the measured peak;
  * TPU: the published bfloat16 peak for the device kind (float32 dots run as bfloat16 passes);
  * or --peak_tflops (per device), which overrides all of the above.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax import config_lib
from vitok_jax import kernels
from vitok_jax.errors import ConfigError
from vitok_jax.kernels import attention
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.scaling import flops
from vitok_jax.scaling import record as record_lib
from vitok_jax.train import train_tokenizer

DEFAULT_VARIANTS = ("Mu-Mu/4,c=16,res=32,data=mnist", "Ti-Ti/8,c=16,res=64,data=photos")

# Published dense peaks per device, FLOP/s: (device_kind substring, bfloat16, float32). The first
# match (case-insensitive) wins, so specific names come first. NVIDIA float32 is the TF32 peak.
GPU_PEAKS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.7e12),  # SXM.
    ("H200", 989e12, 494.7e12),
    ("A100", 312e12, 156e12),
)
# TPU: (device_kind substring, bfloat16 peak). jax names v5e "TPU v5 lite" and v5p "TPU v5"/"v5p".
TPU_PEAKS = (
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),
    ("v4", 275e12),
)


MATMUL_REPEATS = 5  # Timed matmuls of the CPU peak measurement; the best one counts.


def measure_matmul_peak(dtype: str, size: int = 2048, repeats: int = MATMUL_REPEATS) -> float:
  """Best-of-`repeats` FLOP/s of one jitted [size, size] x [size, size] matmul (2·size³ FLOPs)."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), dtype)
  b = jax.random.normal(key_b, (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # Compile and warm up.
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def _published_peak(backend: str, device_kind: str, dtype: str) -> tuple[float, str] | None:
  """(FLOP/s per device, source) from the tables above, or None for an unknown device."""
  kind = device_kind.lower()
  if backend == "gpu":
    for name, bf16, fp32 in GPU_PEAKS:
      if name.lower() in kind:
        if dtype == "bfloat16":
          return bf16, f"published {name} bf16 dense peak"
        return fp32, f"published {name} TF32 dense peak (float32 dots run as TF32)"
  if backend == "tpu":
    for name, bf16 in TPU_PEAKS:
      if name in kind:
        note = "" if dtype == "bfloat16" else " (float32 dots run as bf16 passes)"
        return bf16, f"published TPU {name} bf16 dense peak{note}"
  return None


def device_peak(dtype: str, peak_tflops: float | None = None, matmul_size: int = 2048) -> dict:
  """Peak FLOP/s of one device and of all devices, and where the number comes from."""
  device = jax.devices()[0]
  backend = jax.default_backend()
  if peak_tflops:
    per_device, source = peak_tflops * 1e12, "--peak_tflops override"
  elif (published := _published_peak(backend, device.device_kind, dtype)) is not None:
    per_device, source = published
  else:
    per_device = measure_matmul_peak(dtype, matmul_size)
    source = (f"measured matmul peak ({matmul_size}x{matmul_size} {dtype}, "
              f"best of {MATMUL_REPEATS})")
  return {"per_device_tflops": per_device / 1e12, "devices": jax.device_count(),
          "tflops": per_device * jax.device_count() / 1e12, "source": source, "dtype": dtype}


def bench_variant(variant: str, *, batch: int | None, dtype: str, attn_impl: str | None,
                  steps: int, warmup: int, peak: dict) -> dict:
  """Builds the trainer's state and jitted step for `variant` and times `steps` steps after warm-up.

  Returns one result row (see the module docstring for the definitions).
  """
  config = config_lib.load_config(f"vitok:{variant}")
  if batch:
    config.batch_size = batch
  config.model.dtype = dtype
  if attn_impl:
    config.model.attn_impl = attn_impl
  train_tokenizer.validate(config)

  # Exactly the trainer's set-up: replicated state, batch split over a data-parallel mesh.
  mesh = mesh_lib.make_mesh(config.mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  local_batch = mesh_lib.per_process_batch(config.batch_size, mesh)  # Raises if it does not split.
  parts, state, train_step, _ = train_tokenizer.setup_training(config, mesh)
  model = parts.model
  shape = train_tokenizer.pixel_shape(config)
  # Synthetic pixels [B, (T,) H, W, C], put on device once, before timing: no data pipeline in the
  # measurement. Each process makes its rows; global_batch assembles them as the trainer does.
  rng = np.random.default_rng(config.seed + jax.process_index())
  pixels = rng.standard_normal((local_batch, *shape), dtype=np.float32)
  batch_arrays = mesh_lib.global_batch({"image": pixels}, batch_sharding)

  # Compiled once, ahead of time: the same executable is timed and cost-analysed.
  start = time.perf_counter()
  with kernels.recorded_attention() as attention_calls:  # What each attention call runs as.
    lowered = train_step.lower(state, batch_arrays)
    compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  # The lowered step is the whole global program, before XLA's optimisation hands matmuls to
  # cuBLAS on a GPU (`flops.xla_flops`).
  xla_per_example = flops.cost_flops(lowered) / config.batch_size
  analytic_per_example = flops.train_flops_per_example(model, shape)

  for _ in range(warmup):
    state, _ = compiled(state, batch_arrays)
  jax.block_until_ready(state)
  step_s = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready((state, metrics))
    step_s.append(time.perf_counter() - start)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"{variant}: loss is {loss} after {warmup + steps} steps")

  median = float(np.median(step_s))
  examples_per_sec = config.batch_size / median
  achieved_tflops = analytic_per_example * examples_per_sec / 1e12
  device = jax.devices()[0]
  return {
      "variant": variant,
      "batch": config.batch_size,
      "dtype": dtype,
      "attn_impl": record_lib.distinct_calls(attention_calls),
      "pixel_shape": list(shape),
      "device_kind": device.device_kind,
      "backend": jax.default_backend(),
      "device_count": jax.device_count(),
      "warmup_steps": warmup,
      "timed_steps": steps,
      "compile_s": compile_s,
      "step_ms_median": 1e3 * median,
      "step_ms_p90": 1e3 * float(np.percentile(step_s, 90)),
      "step_ms_mean": 1e3 * float(np.mean(step_s)),
      "examples_per_sec": examples_per_sec,
      "train_flops_per_example_analytic": analytic_per_example,
      "train_flops_per_example_xla": xla_per_example,
      "xla_over_analytic": xla_per_example / analytic_per_example,
      "achieved_tflops": achieved_tflops,
      "peak_tflops": peak["tflops"],
      "peak_source": peak["source"],
      "mfu": achieved_tflops / peak["tflops"],
      "final_loss": loss,
  }


TABLE_HEADER = (f"{'variant':38s} {'batch':>5s} {'dtype':>8s} {'ex/s':>9s} {'ms med':>8s} "
                f"{'ms p90':>8s} {'GFLOP/ex':>9s} {'XLA/an':>6s} {'TFLOP/s':>8s} {'MFU':>7s}")


def format_row(r: dict) -> str:
  """One table line of a result row: GFLOP/ex is the analytic train count, XLA/an XLA's over it."""
  return (f"{r['variant']:38s} {r['batch']:5d} {r['dtype']:>8s} {r['examples_per_sec']:9.1f} "
          f"{r['step_ms_median']:8.2f} {r['step_ms_p90']:8.2f} "
          f"{r['train_flops_per_example_analytic'] / 1e9:9.4f} {r['xla_over_analytic']:6.3f} "
          f"{r['achieved_tflops']:8.4f} {r['mfu']:7.2%}")


def format_peak(peak: dict) -> str:
  return (f"peak {peak['tflops']:.4g} TFLOP/s = "
          f"{peak['devices']} x {peak['per_device_tflops']:.4g} "
          f"({peak['source']}) on {jax.default_backend()} '{jax.devices()[0].device_kind}'; "
          "MFU = achieved TFLOP/s (analytic, 3 x forward) / peak")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n", 1)[1])
  parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                      help="configs/vitok.py variant strings")
  parser.add_argument("--batch", type=int, default=32,
                      help="global batch (0 keeps each config's batch_size)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="config.model.dtype (activations/compute; params stay float32)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  parser.add_argument("--attn_impl", choices=attention.IMPLS, default=None,
                      help="config.model.attn_impl (default: the config's, 'auto')")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="peak TFLOP/s per device; overrides the published table / measurement")
  parser.add_argument("--matmul_size", type=int, default=2048,
                      help="n of the n x n matmul that measures the peak where none is published")
  parser.add_argument("--out", default="results.json", help="JSON output path ('' to skip)")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  return args


def main(argv: list[str] | None = None) -> dict:
  """Runs the benchmark; prints the table, writes --out and returns the JSON dict."""
  args = parse_args(argv)
  peak = device_peak(args.dtype, args.peak_tflops, args.matmul_size)
  print(format_peak(peak))
  print(TABLE_HEADER)
  print("-" * len(TABLE_HEADER), flush=True)
  report = {
      "benchmark": "train_tokenizer.make_train_step, jitted with donation, on synthetic "
                   "random-normal pixels on device (compute only, no data pipeline)",
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "peak": peak,
      "results": [],
  }
  for variant in args.variants:
    report["results"].append(bench_variant(variant, batch=args.batch, dtype=args.dtype,
                                           attn_impl=args.attn_impl, steps=args.steps,
                                           warmup=args.warmup, peak=peak))
    print(format_row(report["results"][-1]), flush=True)
    if args.out:  # After each variant: a run stopped at a time limit keeps what it measured.
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
  if args.out:
    print(f"wrote {args.out}")
  return report


if __name__ == "__main__":
  try:
    main()
  except ConfigError as e:
    sys.exit(f"error: {e}")
