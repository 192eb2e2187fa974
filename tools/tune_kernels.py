r"""Sweeps the Pallas kernels' tiles and launch settings on this device; keeps the fastest correct.

  PYTHONPATH=. python tools/tune_kernels.py --out tuned.json            # GPU (minutes)
  PYTHONPATH=. python tools/bench_kernels.py --tiles tuned.json ...     # benchmark with them

Every candidate is first checked against `kernels.reference` on the tuning problem (BSQ: identical
codes and bit usage, bit probabilities within 1e-4, token entropy within rtol 1e-4; VQ: identical
indices; attention: outputs and gradients within bf16 tolerance) and only then timed (median of
--iters samples of --back_to_back calls after --warmup, compile excluded,
`eval.timing.time_jitted`).
Problems:
  bsq        --bsq_tokens (default 1M) tokens × 32 bits, bf16 (Infinity's latent); on CUDA each
             candidate's Pallas kernel is also timed alone (CUPTI: "kernel_ms");
  vq         65536 tokens, 16384 codes × 8 (LlamaGen's codebook);
  attention  batch·L = 16k tokens, 16 heads, L = --length, bf16, per head dim: first the forward
             tiles (forward time), then the dK/dV tiles and then the dQ tiles (forward+backward
             time, the forward fixed at its best); with --var_lengths also block-causal at VAR's
             lengths, head dim 64 (the tiles bench_kernels.py then uses for those rows).
The JSON holds every candidate's time and the best per kernel (BSQ on CUDA: by "kernel_ms"); it
is rewritten after each kernel, so a sweep stopped early keeps what it found. The winners become
the defaults in the kernel modules (by hand, with the measurement named in the commit).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vitok_jax.eval import timing
from vitok_jax.kernels import bsq_pallas
from vitok_jax.kernels import flash_attention as flash
from vitok_jax.kernels import masks
from vitok_jax.kernels import reference
from vitok_jax.kernels import vq_pallas

# Tiles of tokens × tiles walked per program × warps, with integer packing and PTX approximate
# math (the GPU defaults: (32, 16, 2) at 1M tokens, (8, 64, 1) from LARGE_TOKENS on; the rest of
# the neighbourhood is for other sizes and devices), a few with the tile loop's pipelining depth
# set, all loading two tiles ahead (the default `prefetch`) but a few; the float packing and the
# precise math once each for comparison.
BSQ_CANDIDATES = ([dict(block_tokens=b, steps=s, num_warps=w, integer_pack=True)
                   for b, s, w in ((32, 1, 1), (64, 1, 2), (64, 1, 4), (128, 1, 4), (128, 1, 8),
                                   (256, 1, 4), (256, 1, 8), (512, 1, 8), (128, 4, 4), (64, 16, 4),
                                   (32, 16, 2), (32, 8, 2), (32, 32, 2), (32, 64, 2), (64, 16, 2),
                                   (64, 32, 2), (16, 32, 1), (32, 16, 1))]
                  + [dict(block_tokens=b, steps=s, num_warps=w, num_stages=n, integer_pack=True)
                     for b, s, w, n in ((32, 16, 2, 2), (32, 16, 2, 4), (32, 32, 2, 4),
                                        (64, 8, 4, 4), (16, 32, 1, 4))]
                  + [dict(block_tokens=b, steps=s, num_warps=w, prefetch=p, integer_pack=True)
                     for b, s, w, p in ((32, 16, 2, 0), (8, 64, 1, 0), (8, 64, 1, 2),
                                        (16, 32, 1, 3))]
                  + [dict(block_tokens=128, steps=1, num_warps=4, integer_pack=False),
                     dict(block_tokens=128, steps=1, num_warps=4, fast_math=False)])
# Multiply-adds (LlamaGen's 8 dims) and the tiled dot (TF32×3 on GPU) over tiles and warps.
VQ_CANDIDATES = ([dict(block_tokens=t, block_codes=c, num_warps=w, fma=True)
                  for t, c, w in ((64, 64, 4), (128, 64, 8), (64, 128, 8), (32, 128, 4))]
                 + [dict(block_tokens=t, block_codes=c, num_warps=w, fma=False)
                    for t, c, w in ((64, 64, 4), (128, 64, 4), (128, 128, 8), (64, 128, 4),
                                    (128, 256, 8), (256, 128, 8))])
# (block_q, block_k, num_warps, num_stages) of the forward.
FORWARD_CANDIDATES = [(128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                      (64, 64, 4, 2), (128, 128, 8, 3)]
# (block_q_bwd, block_k_bwd, num_warps_bwd) of dK/dV; then (block_q_dq, block_k_dq) of dQ.
DKDV_CANDIDATES = [(64, 64, 8), (64, 64, 4), (32, 128, 8), (32, 64, 4), (64, 128, 8),
                   (16, 128, 8)]
DQ_CANDIDATES = [(64, 64), (128, 32), (128, 64), (64, 32)]
# Block-causal at VAR's lengths also tries smaller tiles, which skip more of the hidden pairs
# (at 680 tokens a 128 × 64 forward grid visits 0.89 of L², 32 × 32 0.71; 0.62 are visible).
VAR_CANDIDATES = (FORWARD_CANDIDATES + [(64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 4, 3)],
                  DKDV_CANDIDATES + [(32, 32, 4)], DQ_CANDIDATES + [(32, 32)])


class Runs(NamedTuple):
  """How each candidate is timed (`timing.time_jitted`): untimed calls, then the median of `iters`
  samples of `back_to_back` calls."""
  warmup: int
  iters: int
  back_to_back: int = 1


def _time(fn, args, runs: Runs, kernel: str = ""):
  """{"ms": wall-clock ms per call}; with `kernel` on CUDA also "kernel_ms", the CUPTI time of
  the GPU kernels whose name holds it (without the XLA ops around them and the gaps), or
  "kernel_ms_error" (the wall-clock time is kept)."""
  try:
    _, seconds, compiled = timing.time_jitted(fn, args, *runs)
  except Exception as e:  # noqa: BLE001  Reported, not fatal.
    return {"error": timing.error_summary(e)}
  result = {"ms": 1e3 * seconds}
  if kernel and jax.default_backend() == "gpu":
    try:
      own_ms = timing.named_kernels_ms(timing.kernel_times(compiled, args, runs.iters), kernel)
      if own_ms is None:
        raise ValueError(f"no GPU kernel named like {kernel!r} in the call")
      result["kernel_ms"] = own_ms
    except Exception as e:  # noqa: BLE001  The wall-clock time stands without it.
      result["kernel_ms_error"] = timing.error_summary(e)
  return result


def _best(results):
  """The fastest correct candidate: by its kernel's own time where every timed one has it (BSQ on
  CUDA: per call, at 1M tokens, launch noise outweighs the candidates' differences), else per
  call."""
  ok = [r for r in results if r.get("correct") and "ms" in r]
  key = "kernel_ms" if ok and all("kernel_ms" in r for r in ok) else "ms"
  return min(ok, key=lambda r: r[key]) if ok else None


def _sweep(name, candidates, kernel, args, check, runs, kernel_name: str = ""):
  """Each candidate's kwargs with its check (`check(outputs)` -> dict with "correct") and time
  (`_time`, the kernel `kernel_name`'s own too)."""
  results = []
  for params in candidates:
    fn = lambda *a, p=params: kernel(*a, **p)
    try:
      checked = check(jax.jit(fn)(*args))
    except Exception as e:  # noqa: BLE001  A candidate that does not compile is reported.
      results.append({**params, "error": f"{type(e).__name__}: {str(e)[:200]}"})
      continue
    results.append({**params, **checked, **_time(fn, args, runs, kernel_name)})
    print(name, results[-1], flush=True)
  return results


def bsq_launches(text: str, error) -> list[dict]:
  """'b,s,w[,p];...' → BSQ candidates (block_tokens, steps, num_warps, prefetch); `error(msg)` on
  a malformed entry."""
  keys = ("block_tokens", "steps", "num_warps", "prefetch")
  candidates = []
  for entry in text.split(";"):
    try:
      values = [int(x) for x in entry.split(",")]
    except ValueError:
      values = []
    if not 3 <= len(values) <= 4 or min(values[:3]) < 1 or min(values[3:], default=0) < 0:
      error(f"--bsq_launches entry {entry!r}: block_tokens,steps,num_warps[,prefetch], integers")
    candidates.append(dict(zip(keys, values), integer_pack=True))
  return candidates


def tune_bsq(runs, candidates, tokens=1 << 20, dim=32):
  z = jax.random.normal(jax.random.key(0), (tokens, dim), jnp.bfloat16)
  ref = jax.jit(reference.bsq)(z)
  check = lambda out: {"correct": bool(jnp.array_equal(out.codes, ref.codes)) and bool(
      jnp.allclose(out.bit_prob, ref.bit_prob, atol=1e-4)) and bool(
          jnp.allclose(out.token_entropy, ref.token_entropy, rtol=1e-4, atol=1e-5)) and bool(
              jnp.array_equal(out.bit_usage, ref.bit_usage))}
  results = _sweep("bsq", candidates, bsq_pallas.bsq, (z,), check, runs, kernel_name="bsq")
  return {"problem": {"tokens": tokens, "dim": dim, "dtype": "bfloat16"},
          "reference_ms": _time(reference.bsq, (z,), runs).get("ms"),
          "candidates": results, "best": _best(results)}


def tune_vq(runs, candidates, tokens=65536, codes=16384, dim=8):
  z = jax.random.normal(jax.random.key(0), (tokens, dim))
  codebook = jax.random.normal(jax.random.key(1), (codes, dim))
  ref_index, _ = jax.jit(reference.vq_nearest)(z, codebook)

  def check(out):
    # Float summation order may flip an exact near-tie; more than a handful is a bug.
    mismatches = int(jnp.sum(out[0] != ref_index))
    return {"mismatches": mismatches, "correct": mismatches <= tokens // 10000}

  results = _sweep("vq", candidates, vq_pallas.vq_nearest, (z, codebook), check, runs)
  return {"problem": {"tokens": tokens, "codes": codes, "dim": dim},
          "reference_ms": _time(reference.vq_nearest, (z, codebook), runs).get("ms"),
          "candidates": results, "best": _best(results)}


def _attention_problem(length, head_dim, heads=16, tokens=16384):
  batch = max(1, tokens // length)
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(k, (batch, length, heads, head_dim), jnp.bfloat16) for k in keys]


def _fwd_bwd(attend):
  def step(q, k, v, do):
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(do))
  return step


def _close(actual, expected, tol):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  return float(np.abs(actual - expected).max()) <= tol * max(1.0, float(np.abs(expected).max()))


def tune_attention(head_dim, length, runs, candidates, tokens=16384, block_ids=None):
  """candidates: (forward, dkdv, dq) lists as FORWARD_/DKDV_/DQ_CANDIDATES; block_ids: tune the
  block-causal mask with these ids (VAR) instead of unmasked attention."""
  forward_candidates, dkdv_candidates, dq_candidates = candidates
  q, k, v, do = _attention_problem(length, head_dim, tokens=tokens)
  ids = None if block_ids is None else jnp.asarray(block_ids)
  ref = jax.jit(_fwd_bwd(lambda q, k, v: reference.attention(q, k, v, block_ids=ids)[0]))(
      q, k, v, do)

  def run(blocks, with_backward):
    """Checks (the forward, or everything) against the reference, then times the same."""
    entry = dataclasses.asdict(blocks)
    # The Triton kernels' tiles: on Hopper the unmasked forward would otherwise run on the Mosaic
    # GPU kernel, which has tiles of its own (`flash_attention_hopper`).
    attend = lambda q, k, v: flash.flash_attention(q, k, v, block_ids=ids, block_sizes=blocks,
                                                   hopper=False)
    fn = _fwd_bwd(attend) if with_backward else (lambda q, k, v, do: (attend(q, k, v),))
    try:
      outs = jax.jit(fn)(q, k, v, do)
      # The tests' bf16 tolerances: 3e-2 on the output, twice that on the gradients.
      entry["correct"] = all(_close(a, b, 3e-2 if i == 0 else 6e-2)
                             for i, (a, b) in enumerate(zip(outs, ref)))
    except Exception as e:  # noqa: BLE001
      return {**entry, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    entry.update(_time(fn, (q, k, v, do), runs))
    print(f"attention d={head_dim} L={length}{'' if ids is None else ' block-causal'}", entry,
          flush=True)
    return entry

  def best_blocks(results, fallback):
    """The BlockSizes of the fastest correct entry (entries are its fields plus results)."""
    best = _best(results)
    fields = {f.name for f in dataclasses.fields(flash.BlockSizes)}
    return flash.BlockSizes(**{k: v for k, v in best.items() if k in fields}) if best else fallback

  base = flash.DEFAULT_BLOCK_SIZES["gpu"]
  forward = [run(dataclasses.replace(base, block_q=bq, block_k=bk, num_warps=w, num_stages=s),
                 False) for bq, bk, w, s in forward_candidates]
  after_forward = best_blocks(forward, base)
  dkdv = [run(dataclasses.replace(after_forward, block_q_bwd=bq, block_k_bwd=bk, num_warps_bwd=w,
                                  block_q_dq=None, block_k_dq=None), True)
          for bq, bk, w in dkdv_candidates]
  after_dkdv = best_blocks(dkdv, after_forward)
  dq = [run(dataclasses.replace(after_dkdv, block_q_dq=bq, block_k_dq=bk), True)
        for bq, bk in dq_candidates]
  return {"problem": {"length": length, "head_dim": head_dim, "heads": 16, "dtype": "bfloat16",
                      "mask": "none" if ids is None else "block_causal"},
          "forward": forward, "dkdv": dkdv, "dq": dq, "best": _best(dq) or _best(dkdv)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="tuned_kernels.json")
  parser.add_argument("--kernels", default="bsq,vq,attention")
  parser.add_argument("--head_dims", default="128,64",
                      help="unmasked attention at --length per head dim ('' for none)")
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--bsq_tokens", type=int, default=1 << 20, help="BSQ's problem size")
  parser.add_argument("--bsq_launches", default="",
                      help="BSQ candidates instead of BSQ_CANDIDATES: block_tokens,steps,"
                           "num_warps[,prefetch];... (e.g. '32,16,2,2;32,4,2,1')")
  parser.add_argument("--var_lengths", default="",
                      help="also tune block-causal attention at these VAR lengths (680,2240), "
                           "head dim 64: JSON keys block_causal_<L>, used by bench_kernels.py")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--back_to_back", type=int, default=10,
                      help="calls per timed sample")
  parser.add_argument("--tiny", action="store_true",
                      help="CPU check of this script: tiny problems, two candidates per kernel")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  runs = Runs(args.warmup, args.iters, 1 if args.tiny else args.back_to_back)
  var_lengths = [int(x) for x in args.var_lengths.split(",") if x]
  unknown = sorted(set(var_lengths) - set(masks.VAR_SCALES))
  if unknown:
    parser.error(f"--var_lengths {unknown}: VAR's lengths are {sorted(masks.VAR_SCALES)}")
  if args.bsq_launches and "bsq" not in args.kernels.split(","):
    parser.error("--bsq_launches needs bsq in --kernels")
  pick = (lambda c: c[:2]) if args.tiny else (lambda c: c)
  bsq_size = dict(tokens=256, dim=32) if args.tiny else dict(tokens=args.bsq_tokens)
  vq_size = dict(tokens=128, codes=256) if args.tiny else {}
  attention_size = dict(tokens=128) if args.tiny else {}
  report = {"device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "timing": {"warmup": runs.warmup, "samples": runs.iters,
                       "back_to_back": runs.back_to_back}}

  def save():
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)

  kernels = args.kernels.split(",")
  if "bsq" in kernels:
    candidates = (bsq_launches(args.bsq_launches, parser.error) if args.bsq_launches
                  else BSQ_CANDIDATES)
    report["bsq"] = tune_bsq(runs, pick(candidates), **bsq_size)
    save()
  if "vq" in kernels:
    report["vq"] = tune_vq(runs, pick(VQ_CANDIDATES), **vq_size)
    save()
  if "attention" in kernels:
    report["attention"] = {}
    for head_dim in (int(d) for d in args.head_dims.split(",") if d):
      report["attention"][str(head_dim)] = tune_attention(
          head_dim, args.length, runs,
          tuple(pick(c) for c in (FORWARD_CANDIDATES, DKDV_CANDIDATES, DQ_CANDIDATES)),
          **attention_size)
      save()
    for length in var_lengths:
      report["attention"][f"block_causal_{length}"] = tune_attention(
          64, length, runs, tuple(pick(c) for c in VAR_CANDIDATES),
          block_ids=masks.var_block_ids(masks.VAR_SCALES[length]))
      save()
  print(json.dumps({name: (report[name]["best"] if name != "attention" else
                           {d: r["best"] for d, r in report[name].items()})
                    for name in ("bsq", "vq", "attention") if name in report}, indent=1))
  return report


if __name__ == "__main__":
  main()
