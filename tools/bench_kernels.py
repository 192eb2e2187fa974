r"""Benchmarks the Pallas kernels against XLA, cuDNN and jax's own Pallas ops, measured in one run.

  PYTHONPATH=. python tools/bench_kernels.py --out kernels.json --plot kernels.png   # GPU / TPU
  PYTHONPATH=. python tools/bench_kernels.py --tiny                                   # CPU check

Attention (batch × heads × L × head_dim, self-attention): forward and forward+backward TFLOP/s of
  pallas        ours (`flash_attention`, the kernels for this backend: on an H100/H200
                unmasked, causal and block-causal attention runs on the Mosaic GPU kernels,
                `flash_attention_hopper`),
  pallas_hopper ours on the Hopper kernels for both passes (`hopper=True`), masked rows too
                (causal, block-causal: `flash_attention_hopper.PrefixMask`),
  pallas_hopper_fwd  ours with the Hopper forward and the Triton backward (`hopper="forward"`),
  pallas_triton ours on Triton only (`hopper=False`),
  pallas_dense  ours on Triton visiting every tile with the mask (`skip_blocks=False`):
                block-causal rows only, the saving of skipping measured on one kernel,
  pallas_padded  ours with `policy.HOPPER_UNPADDED` and `HOPPER_SKIP_PADDED_QUERIES` unset: the
                Hopper kernels get the arrays padded to whole 128-token tiles (680 → 768) and
                walk the tiles of query padding too (the path before both flags),
  pallas_padded_skip_padded  padded, but skipping the tiles of query padding alone,
  pallas_bwd_in_order  ours with the Hopper backward waiting for dV's and dP's matmuls before dS
                at every head dim (`flash_attention_hopper.DS_DURING_DV_HEAD_DIMS` empty),
  pallas_bwd_descriptors_before_loop  ours with the Hopper backward computing the wgmma
                descriptors of its resident K and V tiles before its loop at every head dim
                (`DESCRIPTORS_IN_LOOP_HEAD_DIMS` empty; the default computes them in each step at
                head dim 128, where before the loop they spill),
  xla, cudnn    `jax.nn.dot_product_attention(implementation=...)` (cuDNN: GPU, half precision),
  jax_pallas    jax's reference Pallas op (GPU: pallas.ops.gpu.attention.mha; TPU:
                pallas.ops.tpu.flash_attention),
  jax_mgpu      jax's Hopper Pallas op (pallas.ops.gpu.attention_mgpu, Mosaic GPU: warp-specialised
                wgmma with TMA copies), unmasked only; it runs in float16 (its P·V product is
                hard-wired to f16, so bf16 inputs do not compile) and applies no logit scale:
                same shapes and FLOPs, a timing baseline, not the same function,
for every L in --lengths and head_dim in --head_dims, causal or not (--causal), plus block-causal at
VAR's lengths (680 = 256p, 2240 = 512p) against the same mask given densely to XLA/cuDNN. FLOPs
are the useful ones: 4·B·H·D per visible (query, key) pair forward, 2.5× that backward (the
FlashAttention convention), identical for every implementation, so TFLOP/s ratios are speed ratios.
A row's visible_fraction is the share of pairs its mask shows: 1 / visible_fraction bounds what
skipping hidden pairs can gain over a dense visit at the same speed per pair (VAR: 1.61× at 680,
1.53× at 2240; less in whole tiles).

Quantisers: BSQ (N tokens × d) and VQ nearest code (N tokens, K codes × D) as GB/s of the bytes they
must move (read z and the codebook, write the outputs) against the device's peak memory bandwidth,
and as speed ratios against the jnp reference (`kernels.reference`, fused by XLA); for BSQ also a
plain copy of z (Pallas in the same layout, and XLA) as the bandwidth this shape can reach, and
the same at larger token counts (--bsq_more_tokens: a 64 MB array is near the size of an H100's
L2 cache, and even a copy of it reaches about 70% of the peak; the target is checked at --bsq's
shape, the others are reported beside it). For VQ
the compiled memory profile (XLA temp bytes) shows whether a tokens × codebook buffer exists.

Timing: each function is jitted and compiled first, run --warmup times, then the median of --iters
samples, each the mean of --back_to_back calls dispatched together and ended by one
block_until_ready (`eval.timing.time_jitted`): the device's time, not the launch round trip, which
would dominate a kernel of tens of microseconds. On CPU the Pallas kernels run in interpret mode:
the numbers test this script, not the kernels (the JSON says so: "interpret": true).
--breakdown (CUDA) adds each GPU kernel's own time within one call (`timing.kernel_times`,
CUPTI): for attention fwd+bwd, e.g. our forward and backward kernels against cuDNN's, and the XLA
ops around them (padding, delta, dq's zeros and cast). Targets
(H100, bf16) are checked where measurable and reported "pending" otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import numpy as np

from vitok_jax.eval import timing
from vitok_jax.kernels import bsq_pallas
from vitok_jax.kernels import flash_attention as flash
from vitok_jax.kernels import masks
from vitok_jax.kernels import policy
from vitok_jax.kernels import reference
from vitok_jax.kernels import vq_pallas

VAR_SCALES = {**masks.VAR_SCALES, 55: (1, 2, 3, 4, 5)}  # 55: the CPU check (--tiny).
# Peak HBM bandwidth, bytes/s, by device_kind substring (first match wins, specific names first).
PEAK_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("A100", 2.0e12),
                  ("TPU v5 lite", 8.19e11), ("TPU v5e", 8.19e11), ("TPU v5", 2.765e12),
                  ("TPU v4", 1.228e12), ("TPU v6", 1.64e12))
# Dense bf16 matrix peak, FLOP/s (vendor datasheets, SXM parts), for MFU.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
                   ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
                   ("TPU v4", 275e12), ("TPU v6", 918e12))
# Ours with `policy` flags set otherwise while jit traces it: the paths they replaced.
POLICY_IMPLS = {
    "pallas_padded": dict(HOPPER_UNPADDED=False, HOPPER_SKIP_PADDED_QUERIES=False),
    "pallas_padded_skip_padded": dict(HOPPER_UNPADDED=False, HOPPER_SKIP_PADDED_QUERIES=True),
}
# Ours with constants of the Hopper kernels set otherwise while jit traces the whole step (the
# backward reads them when it is traced): the orders they replaced, and variants not yet taken.
HOPPER_KERNEL_IMPLS = {"pallas_bwd_in_order": dict(DS_DURING_DV_HEAD_DIMS=()),
                       "pallas_bwd_descriptors_before_loop": dict(DESCRIPTORS_IN_LOOP_HEAD_DIMS=())}
ATTENTION_IMPLS = ("pallas", "pallas_hopper", "pallas_hopper_fwd", "pallas_triton",
                   "pallas_dense", *POLICY_IMPLS, *HOPPER_KERNEL_IMPLS, "xla", "cudnn",
                   "jax_pallas", "jax_mgpu")
# jax_mgpu's tiles: two consumer warpgroups of 64 queries, 128 keys per step, two steps in
# flight; backward tiles 64 × 64 (its own benchmark's and tests' settings).
JAX_MGPU_CONFIG = dict(block_q=64, block_kv=128, max_concurrent_steps=2, block_q_dkv=64,
                       block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)


def _attention_fn(impl: str, *, causal: bool, block_ids, interpret: bool, block_sizes=None):
  """f(q, k, v) -> out in [B, L, H, D] for one implementation (ours with `block_sizes` if given)."""
  backend = jax.default_backend()
  if impl in POLICY_IMPLS or impl in HOPPER_KERNEL_IMPLS:
    return _with_settings(_attention_fn("pallas", causal=causal, block_ids=block_ids,
                                        interpret=interpret, block_sizes=block_sizes),
                          *_settings(impl))
  if impl in ("pallas", "pallas_hopper", "pallas_hopper_fwd", "pallas_triton", "pallas_dense"):
    hopper = {"pallas_hopper": True, "pallas_hopper_fwd": "forward", "pallas_triton": False,
              "pallas_dense": False}.get(impl)
    return functools.partial(flash.flash_attention, causal=causal, block_ids=block_ids,
                             interpret=interpret, block_sizes=block_sizes,
                             skip_blocks=impl != "pallas_dense", hopper=hopper)
  if impl in ("xla", "cudnn"):
    mask = None
    if block_ids is not None:  # The dense equivalent of the block-causal mask.
      mask = (block_ids[None, :] <= block_ids[:, None])[None, None]
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal, mask=mask,
                             implementation=impl)
  if impl == "jax_pallas":
    if block_ids is not None:
      raise NotImplementedError("jax's Pallas attention has no block-causal mask")
    if backend == "tpu":
      from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
      return lambda q, k, v: jnp.swapaxes(tpu_flash.flash_attention(
          *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), causal=causal,
          sm_scale=q.shape[-1] ** -0.5), 1, 2)
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    return lambda q, k, v: gpu_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5,
                                             causal=causal, interpret=interpret)
  if impl == "jax_mgpu":
    if block_ids is not None or causal or interpret or backend != "gpu":
      raise NotImplementedError("jax_mgpu: unmasked attention on a Hopper GPU only")
    from jax.experimental.pallas.ops.gpu import attention_mgpu
    config = attention_mgpu.TuningConfig(**JAX_MGPU_CONFIG)
    return lambda q, k, v: attention_mgpu.attention(q, k, v, config)
  raise ValueError(impl)


def _settings(impl: str):
  """(module, {name: value}) that an ablation impl sets while traced."""
  if impl in POLICY_IMPLS:
    return policy, POLICY_IMPLS[impl]
  from vitok_jax.kernels import flash_attention_hopper  # Imports Mosaic GPU.
  return flash_attention_hopper, HOPPER_KERNEL_IMPLS[impl]


def _with_settings(fn, module, flags: dict):
  """fn with these module constants set while it runs, i.e. while jit traces it. The `policy`
  flags are read by the forward, which hands the backward its kernel settings, so they hold for
  its vjp too; the Hopper kernels' own constants need the whole step traced under them."""
  def run(*args):
    saved = {name: getattr(module, name) for name in flags}
    for name, value in flags.items():
      setattr(module, name, value)
    try:
      return fn(*args)
    finally:
      for name, value in saved.items():
        setattr(module, name, value)
  return run


def _fwd_bwd(fn):
  """Forward + backward of sum(out · do): the work of one training step's attention."""
  def step(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return vjp(do)
  return step


def _with_kernel_times(entry: dict, key: str, compiled, args, calls: int) -> dict:
  """entry with kernel_times(...) under `key`, or the error that stopped it there."""
  try:
    return {**entry, key: timing.kernel_times(compiled, args, calls)}
  except Exception as e:  # noqa: BLE001  Timings without a breakdown are still worth keeping.
    return {**entry, key: {"error": timing.error_summary(e)}}


def _with_kernel_bandwidth(entry: dict, moved: int, peak: float, only: str = "") -> dict:
  """entry (with "kernels" from `_with_kernel_times`) with the fraction of the peak bandwidth that
  `moved` bytes take in its kernels' own time, without launch gaps: all of them, or with `only`
  those whose name holds it (BSQ's Pallas kernel without the XLA reductions after it)."""
  own_ms = timing.named_kernels_ms(entry.get("kernels", {}), only)
  if own_ms is None:
    return entry
  key = f"{only}_kernel_fraction_of_peak" if only else "kernels_fraction_of_peak"
  return {**entry, key: moved / (own_ms / 1e3) / peak}


def _visible_pairs(q_len: int, causal: bool, block_ids) -> float:
  if block_ids is not None:
    return float(np.sum(block_ids[None, :] <= block_ids[:, None]))
  return q_len * (q_len + 1) / 2 if causal else float(q_len * q_len)


def bench_attention(*, batch, heads, q_len, head_dim, dtype, causal, block_ids, impls, warmup,
                    iters, interpret, peak_flops=None, block_sizes=None, back_to_back=1,
                    breakdown=False):
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (batch, q_len, heads, head_dim)
  q, k, v, do = (jax.random.normal(key, shape, dtype) for key in keys)
  pairs = _visible_pairs(q_len, causal, block_ids)
  fwd_flops = 4.0 * batch * heads * head_dim * pairs
  row = {"batch": batch, "heads": heads, "q_len": q_len, "head_dim": head_dim,
         "dtype": jnp.dtype(dtype).name, "mask": "block_causal" if block_ids is not None else
         ("causal" if causal else "none"), "fwd_flops": fwd_flops,
         "visible_fraction": pairs / q_len**2, "impls": {}}
  ids = None if block_ids is None else jnp.asarray(block_ids)
  for impl in impls:
    entry = {}
    args = (q, k, v, do)
    if impl == "jax_mgpu":
      args = tuple(x.astype(jnp.float16) for x in args)
      entry["dtype"] = "float16"
    try:
      fn = _attention_fn(impl, causal=causal, block_ids=ids, interpret=interpret,
                         block_sizes=block_sizes)
      _, fwd_s, _ = timing.time_jitted(fn, args[:3], warmup, iters, back_to_back)
      step_fn = _fwd_bwd(fn)
      if impl in HOPPER_KERNEL_IMPLS:
        step_fn = _with_settings(step_fn, *_settings(impl))
      _, step_s, step = timing.time_jitted(step_fn, args, warmup, iters, back_to_back)
      entry = {**entry, "fwd_ms": 1e3 * fwd_s, "fwd_bwd_ms": 1e3 * step_s,
               "fwd_tflops": fwd_flops / fwd_s / 1e12,
               "fwd_bwd_tflops": 3.5 * fwd_flops / step_s / 1e12}
      if breakdown:
        entry = _with_kernel_times(entry, "fwd_bwd_kernels", step, args, iters)
      if peak_flops:
        entry["fwd_mfu"] = entry["fwd_tflops"] * 1e12 / peak_flops
        entry["fwd_bwd_mfu"] = entry["fwd_bwd_tflops"] * 1e12 / peak_flops
    except Exception as e:  # noqa: BLE001  An unsupported baseline is reported, not fatal.
      entry = {"error": timing.error_summary(e)}
    row["impls"][impl] = entry
  ours = row["impls"].get("pallas", {})
  for impl, entry in row["impls"].items():
    if impl != "pallas" and "fwd_ms" in entry and "fwd_ms" in ours:
      row[f"speedup_vs_{impl}"] = {"fwd": entry["fwd_ms"] / ours["fwd_ms"],
                                   "fwd_bwd": entry["fwd_bwd_ms"] / ours["fwd_bwd_ms"]}
  return row


def _lookup(table, device):
  """(name, value) of the first table entry whose name is in the device kind, else (None, None)."""
  for name, value in table:
    if name.lower() in device.device_kind.lower():
      return name, value
  return None, None


def _peak_bandwidth(device) -> tuple[float, str]:
  name, peak = _lookup(PEAK_BANDWIDTH, device)
  if name:
    return peak, f"published HBM bandwidth of {name}"
  x = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB: read once, written once.
  _, seconds, _ = timing.time_jitted(lambda x: x + 1, (x,), 1, 5)
  return 2 * x.nbytes / seconds, "measured copy bandwidth (x + 1 on 256 MiB)"


def _temp_bytes(compiled):
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001  Not every backend reports it.
    return None


def _pallas_copy(block: int, interpret: bool):
  """z [N, d] → a copy, in tiles of `block` tokens: the BSQ kernel's tiling without its math."""
  def kernel(z_ref, out_ref):
    out_ref[...] = z_ref[...]

  def copy(z):
    spec = pl.BlockSpec((block, z.shape[1]), lambda t: (t, 0))
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(z.shape[0], block),), in_specs=[spec], out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(z.shape, z.dtype),
        compiler_params=(pltriton.CompilerParams(num_warps=4, num_stages=1)
                         if jax.default_backend() == "gpu" and not interpret else None),
        interpret=interpret, name="copy")(z)
  return copy


def bench_bsq(*, tokens, dim, dtype, warmup, iters, interpret, peak, params=None,
              back_to_back=1, breakdown=False):
  z = jax.random.normal(jax.random.key(0), (tokens, dim), dtype)
  itemsize = jnp.dtype(dtype).itemsize
  moved = 2 * tokens * dim * itemsize + tokens * -(-dim // 32) * 4  # z in, quantized + codes out.
  kernel = lambda z: bsq_pallas.bsq(z, interpret=interpret, **(params or {}))
  result = {"tokens": tokens, "dim": dim, "dtype": jnp.dtype(dtype).name, "bytes": moved,
            "launch": params or "defaults"}
  for name, fn in (("pallas", kernel), ("jnp", reference.bsq)):
    _, seconds, compiled = timing.time_jitted(fn, (z,), warmup, iters, back_to_back)
    result[name] = {"ms": 1e3 * seconds, "gb_per_s": moved / seconds / 1e9,
                    "fraction_of_peak": moved / seconds / peak}
    if breakdown:
      result[name] = _with_kernel_bandwidth(
          _with_kernel_times(result[name], "kernels", compiled, (z,), iters), moved, peak)
  result["speedup_vs_jnp"] = result["jnp"]["ms"] / result["pallas"]["ms"]
  result["pallas"] = _with_kernel_bandwidth(result["pallas"], moved, peak, only="bsq")
  # Ceilings for this shape: z read and written once (no codes, no statistics) by a Pallas copy in
  # 512-token tiles and by XLA (z · 2).
  copied = 2 * tokens * dim * itemsize
  result["copy"] = {}
  for name, fn in (("pallas", _pallas_copy(min(512, tokens), interpret)),
                   ("xla", lambda z: z * 2)):
    _, seconds, compiled = timing.time_jitted(fn, (z,), warmup, iters, back_to_back)
    result["copy"][name] = {"ms": 1e3 * seconds, "gb_per_s": copied / seconds / 1e9,
                            "fraction_of_peak": copied / seconds / peak}
    if breakdown:
      result["copy"][name] = _with_kernel_bandwidth(_with_kernel_times(
          result["copy"][name], "kernels", compiled, (z,), iters), copied, peak)
  return result


def bench_vq(*, tokens, codes, dim, warmup, iters, interpret, peak, params=None,
             back_to_back=1, breakdown=False):
  z = jax.random.normal(jax.random.key(0), (tokens, dim))
  codebook = jax.random.normal(jax.random.key(1), (codes, dim))
  moved = 4 * (tokens * dim + codes * dim + 2 * tokens)
  result = {"tokens": tokens, "codes": codes, "dim": dim, "bytes": moved,
            "tokens_x_codes_bytes": 4 * tokens * codes}
  kernel = lambda z, e: vq_pallas.vq_nearest(z, e, interpret=interpret, **(params or {}))
  for name, fn in (("pallas", kernel), ("jnp", reference.vq_nearest)):
    _, seconds, compiled = timing.time_jitted(fn, (z, codebook), warmup, iters, back_to_back)
    result[name] = {"ms": 1e3 * seconds, "gb_per_s": moved / seconds / 1e9,
                    "fraction_of_peak": moved / seconds / peak,
                    "temp_bytes": _temp_bytes(compiled)}
    if breakdown:
      result[name] = _with_kernel_times(result[name], "kernels", compiled, (z, codebook), iters)
  result["speedup_vs_jnp"] = result["jnp"]["ms"] / result["pallas"]["ms"]
  temp = result["pallas"]["temp_bytes"]
  result["no_tokens_x_codes_buffer"] = (None if temp is None
                                        else temp < result["tokens_x_codes_bytes"])
  return result


def check_targets(report) -> dict:
  """The issue's H100 targets: True/False where measured on a GPU, else "pending" or "not
  measured" (no rows of that shape, or the baseline not among --impls). BSQ's bandwidth both per
  call (wall clock, with the XLA reductions after the kernel and the gaps between launches) and
  of its Pallas kernel alone (CUPTI, with --breakdown), at --bsq's size and, separately, at the
  largest of --bsq_more_tokens (the target names no size)."""
  names = ("fwd_bwd_vs_cudnn>=1.0", "fwd_bwd_vs_xla>=2.0", "block_causal_vs_dense>=1.5",
           "bsq_bandwidth>=0.7", "bsq_kernel_bandwidth>=0.7",
           "bsq_kernel_bandwidth>=0.7_largest_tokens", "vq_vs_jnp>=3_and_no_buffer")
  if report["backend"] != "gpu":
    return {name: "pending (needs an H100)" for name in names}
  big = [r for r in report["attention"] if r["q_len"] >= 4096 and r["head_dim"] == 128
         and r["dtype"] == "bfloat16" and r["mask"] != "block_causal"]
  var = [r for r in report["attention"] if r["mask"] == "block_causal"]
  ratios = lambda rows, *impls: [r[f"speedup_vs_{impl}"]["fwd_bwd"] for r in rows
                                 for impl in impls if f"speedup_vs_{impl}" in r]
  # Against the faster of XLA and cuDNN on each row that has either.
  best_dense = [min(ratios([r], "xla", "cudnn")) for r in var if ratios([r], "xla", "cudnn")]

  def at_least(values, bound, why="not measured (no such rows or baseline)"):
    return min(values) >= bound if values else why
  bsq_kernel = report["bsq"]["pallas"].get("bsq_kernel_fraction_of_peak")
  largest = max([report["bsq"], *report.get("bsq_more_tokens", [])], key=lambda r: r["tokens"])
  largest_kernel = largest["pallas"].get("bsq_kernel_fraction_of_peak")
  return {
      "fwd_bwd_vs_cudnn>=1.0": at_least(ratios(big, "cudnn"), 1.0),
      "fwd_bwd_vs_xla>=2.0": at_least(ratios(big, "xla"), 2.0),
      "block_causal_vs_dense>=1.5": at_least(best_dense, 1.5),
      "bsq_bandwidth>=0.7": report["bsq"]["pallas"]["fraction_of_peak"] >= 0.7,
      "bsq_kernel_bandwidth>=0.7": at_least([] if bsq_kernel is None else [bsq_kernel], 0.7,
                                            "not measured (needs --breakdown)"),
      "bsq_kernel_bandwidth>=0.7_largest_tokens": at_least(
          [] if largest_kernel is None else [largest_kernel], 0.7,
          "not measured (needs --breakdown)"),
      "vq_vs_jnp>=3_and_no_buffer": (report["vq"]["speedup_vs_jnp"] >= 3.0
                                     and bool(report["vq"]["no_tokens_x_codes_buffer"])),
  }


def plot(report, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  dense = [r for r in report["attention"] if r["mask"] != "block_causal"]
  head_dims = sorted({r["head_dim"] for r in dense})
  fig, axes = plt.subplots(1, 2 * len(head_dims) + 1, figsize=(5 * (2 * len(head_dims) + 1), 4))
  for col, (head_dim, phase) in enumerate((d, p) for d in head_dims for p in ("fwd", "fwd_bwd")):
    ax = axes[col]
    rows = [r for r in dense if r["head_dim"] == head_dim]
    for impl in report["impls"]:
      points = [(r["q_len"], r["impls"][impl][f"{phase}_tflops"]) for r in rows
                if f"{phase}_tflops" in r["impls"].get(impl, {})]
      if points:
        ax.plot(*zip(*points), marker="o", label=impl)
    ax.set(xscale="log", xlabel="sequence length", ylabel="TFLOP/s",
           title=f"{phase}, head_dim {head_dim}")
    ax.legend()
  ax = axes[-1]
  labels, values = [], []
  for r in report["attention"]:
    if r["mask"] == "block_causal":
      for impl, ratio in ((k[len("speedup_vs_"):], v) for k, v in r.items()
                          if k.startswith("speedup_vs_")):
        labels.append(f"VAR L={r['q_len']}\nvs {impl}")
        values.append(ratio["fwd_bwd"])
  for name in ("bsq", "vq"):
    labels.append(f"{name.upper()}\nvs jnp")
    values.append(report[name]["speedup_vs_jnp"])
  ax.bar(range(len(values)), values)
  ax.axhline(1.0, color="k", lw=0.5)
  ax.set_xticks(range(len(values)), labels, fontsize=7)
  ax.set(ylabel="speed-up of ours (fwd+bwd for attention)", title="block-causal and quantisers")
  suffix = " (CPU, Pallas interpreted: not kernel speed)" if report["interpret"] else ""
  fig.suptitle(f"{report['device_kind']}{suffix}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # "" → none (quantisers only).
  parser.add_argument("--tiny", action="store_true",
                      help="CPU-sized problem (default on CPU): checks the script, not the kernels")
  parser.add_argument("--lengths", type=ints, default=None, help="default 256,...,16384")
  parser.add_argument("--head_dims", type=ints, default=None, help="default 64,128")
  parser.add_argument("--var_lengths", type=ints, default=None, help="default 680,2240")
  parser.add_argument("--var_head_dim", type=int, default=None, help="default 64 (VAR's)")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--heads", type=int, default=None)
  parser.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny)")
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--impls", default=",".join(ATTENTION_IMPLS))
  parser.add_argument("--bsq", type=ints, default=None, help="tokens,dim; default 1048576,32")
  parser.add_argument("--bsq_more_tokens", type=ints, default=None,
                      help="BSQ again at these token counts (same dim), e.g. whether a larger "
                           "array comes nearer the peak bandwidth; default 4194304,16777216 "
                           "(none with --tiny)")
  parser.add_argument("--vq", type=ints, default=None,
                      help="tokens,codes,dim; default 65536,16384,8")
  parser.add_argument("--warmup", type=int, default=None)
  parser.add_argument("--iters", type=int, default=None)
  parser.add_argument("--back_to_back", type=int, default=None,
                      help="calls per timed sample (default 10; 1 with --tiny)")
  parser.add_argument("--tiles", default=None,
                      help="tools/tune_kernels.py JSON: its best tiles instead of the defaults")
  parser.add_argument("--breakdown", action="store_true",
                      help="also each GPU kernel's time in a call (CUPTI; CUDA only): attention "
                           "fwd+bwd, BSQ and VQ, e.g. our kernels against cuDNN's and the XLA ops "
                           "around them")
  parser.add_argument("--out", default="bench_kernels.json")
  parser.add_argument("--plot", default=None, help="PNG path for the plot")
  args = parser.parse_args(argv)
  tiny = args.tiny or jax.default_backend() == "cpu"
  defaults = dict(lengths=(64, 128), head_dims=(32,), var_lengths=(55,), var_head_dim=32, batch=1,
                  heads=2, dtype="float32", bsq=(2048, 32), bsq_more_tokens=(), vq=(512, 1024, 8),
                  warmup=1,
                  iters=2, back_to_back=1) if tiny \
      else dict(lengths=(256, 512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128),
                var_lengths=(680, 2240), var_head_dim=64, batch=None, heads=16, dtype="bfloat16",
                bsq=(1 << 20, 32), bsq_more_tokens=(1 << 22, 1 << 24), vq=(65536, 16384, 8),
                warmup=3, iters=10,
                back_to_back=10)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.tiny = tiny
  if args.breakdown and jax.default_backend() != "gpu":
    parser.error(f"--breakdown times kernels with CUPTI, on a CUDA GPU; this is "
                 f"{jax.default_backend()}: leave it out here")
  unknown = set(args.impls.split(",")) - set(ATTENTION_IMPLS)
  if unknown:  # Fails here, before any timing.
    raise ValueError(f"--impls: unknown {sorted(unknown)}; use some of {ATTENTION_IMPLS}")
  return args


def load_tiles(path):
  """(bsq kwargs, vq kwargs, {head_dim or "block_causal_<L>": BlockSizes}) of a tune_kernels.py
  JSON's best entries."""
  with open(path) as f:
    tuned = json.load(f)
  only = lambda best, names: {k: v for k, v in (best or {}).items() if k in names}
  fields = {f.name for f in dataclasses.fields(flash.BlockSizes)}
  attention = {int(d) if d.isdigit() else d: flash.BlockSizes(**only(r["best"], fields))
               for d, r in tuned.get("attention", {}).items() if r.get("best")}
  return (only(tuned.get("bsq", {}).get("best"), inspect.signature(bsq_pallas.bsq).parameters),
          only(tuned.get("vq", {}).get("best"),
               inspect.signature(vq_pallas.vq_nearest).parameters),
          attention)


def _save(report, path: str):
  with open(path, "w") as f:
    json.dump(report, f, indent=1)


def main(argv=None):
  """Quantisers, then block-causal rows, then the dense sweep; the JSON is rewritten after each
  result, so a run stopped early keeps what it measured (`plot` also works on a loaded JSON)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  device = jax.devices()[0]
  interpret = jax.default_backend() == "cpu"
  impls = tuple(args.impls.split(","))
  dtype = jnp.dtype(args.dtype)
  peak, peak_source = _peak_bandwidth(device)
  peak_flops = _lookup(PEAK_BF16_FLOPS, device)[1] if dtype == jnp.bfloat16 else None
  report = {"backend": jax.default_backend(), "device_kind": device.device_kind,
            "jax_version": jax.__version__, "interpret": interpret, "tiny": args.tiny,
            "impls": impls, "dtype": dtype.name, "peak_bandwidth_gb_per_s": peak / 1e9,
            "peak_bandwidth_source": peak_source, "peak_bf16_tflops": (peak_flops or 0) / 1e12,
            "timing": {"warmup": args.warmup, "samples": args.iters,
                       "back_to_back": args.back_to_back}, "attention": []}
  bsq_params, vq_params, attention_tiles = load_tiles(args.tiles) if args.tiles else ({}, {}, {})
  report["tiles"] = {"bsq": bsq_params, "vq": vq_params, "attention": {
      d: dataclasses.asdict(b) for d, b in attention_tiles.items()}}
  timed = dict(warmup=args.warmup, iters=args.iters, back_to_back=args.back_to_back,
               breakdown=args.breakdown)
  report["bsq"] = bench_bsq(tokens=args.bsq[0], dim=args.bsq[1], dtype=dtype,
                            interpret=interpret, peak=peak, params=bsq_params, **timed)
  report["bsq_more_tokens"] = [
      bench_bsq(tokens=tokens, dim=args.bsq[1], dtype=dtype, interpret=interpret, peak=peak,
                params=bsq_params, **timed) for tokens in args.bsq_more_tokens]
  report["vq"] = bench_vq(tokens=args.vq[0], codes=args.vq[1], dim=args.vq[2],
                          interpret=interpret, peak=peak, params=vq_params, **timed)
  print(json.dumps({k: report[k] for k in ("bsq", "bsq_more_tokens", "vq")}), flush=True)
  _save(report, args.out)
  common = dict(heads=args.heads, dtype=dtype, interpret=interpret, peak_flops=peak_flops,
                **timed)
  # A constant token count per step (16k) keeps every length's work comparable and in memory.
  batch_for = lambda length: args.batch or max(1, 16384 // length)
  for length in args.var_lengths:
    ids = masks.var_block_ids(VAR_SCALES[length])
    row = bench_attention(batch=batch_for(length), q_len=length, head_dim=args.var_head_dim,
                          causal=False, block_ids=ids,
                          block_sizes=attention_tiles.get(f"block_causal_{length}"),
                          impls=tuple(i for i in impls if not i.startswith("jax_")),
                          **common)
    report["attention"].append(row)
    print(json.dumps(row), flush=True)
    _save(report, args.out)
  for head_dim in args.head_dims:
    for length in args.lengths:
      row = bench_attention(batch=batch_for(length), q_len=length, head_dim=head_dim,
                            causal=args.causal, block_ids=None,
                            impls=tuple(i for i in impls if i != "pallas_dense"),
                            block_sizes=attention_tiles.get(head_dim), **common)
      report["attention"].append(row)
      print(json.dumps(row), flush=True)
      _save(report, args.out)
  report["targets"] = check_targets(report)
  print(json.dumps(report["targets"], indent=1), flush=True)
  _save(report, args.out)
  if args.plot:
    plot(report, args.plot)
  return report


if __name__ == "__main__":
  main()
