r"""Where the BSQ kernel's time goes: the kernel against copies of itself with one part changed.

  PYTHONPATH=. python tools/ablate_bsq.py --out ablate_bsq.json   # CUDA: CUPTI kernel times

Each variant is `kernels/bsq_pallas.py` with one edit to its source (asserted to apply exactly
once, so a kernel that has moved on fails loudly here rather than timing something else):
  base          the kernel as it is;
  no_stats      no σ or entropy: the three sums are the hard bits (the copy + norm + sign + pack
                floor of the kernel);
  no_entropy    σ but no entropy (its log2 and multiply-add);
  no_bit_sum    no sum of the hard bits (p summed twice);
  no_pack       codes written as zeros;
  no_quantized  z copied to the quantised output instead of ±1/√d;
  sign_of_z     the bit as z > 0 instead of u > 0 (the same bit; an earlier point in the tile);
  rsqrt_norm    1/‖z‖ as rsqrt instead of sqrt and a division;
  ys            the logit's scale, log₂e and 1/‖z‖ as one factor per token and the entropy summed
                in bits (three multiplies fewer per element);
  ys_no_bit_sum both;
  tile_sums     each tile's statistics summed over its tokens at once, into [1, d] accumulators
                (instead of [tokens, d] ones reduced at the end: fewer registers, a reduction per
                tile).
Each row holds the variant's kernel time and its fraction of the peak bandwidth for the bytes the
real kernel moves (z in, quantised + codes out), whether its codes still equal the reference's,
and its token entropy's error; at 1M and 16M tokens × 32 bits, bf16, over a few launches. Beside
them, a copy of the same array in Pallas (512-token tiles) as the ceiling. Off CUDA it runs a tiny
problem in the interpreter, which checks the edits, not the speed.
"""
from __future__ import annotations

import argparse
import inspect
import json
import types

import jax
import jax.numpy as jnp

from vitok_jax.kernels import bsq_pallas
from vitok_jax.kernels import reference
import bench_kernels
import tune_kernels

_STATS = ("    stats = (p_ND, a_ND * ep_ND + _LN_2 * math_.log2(1.0 + e_ND), "
          "bit_ND.astype(jnp.float32))\n")
_SIGN = """    u_ND = z_ND * inv_norm_N1
    bit_ND = u_ND > 0  # sign(0) → −1: a zero coordinate is bit 0, as Infinity's quantiser.
"""
_LOGITS = """    a_ND = logit_scale * jnp.abs(u_ND)
    e_ND = math_.exp2(a_ND * -_LOG2_E)
"""
_NORM = ("    inv_norm_N1 = 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(z_ND * z_ND, axis=1, "
         "keepdims=True)),\n                                    reference.NORM_EPS)\n")
_FINAL = """  for row, total_ND in enumerate(sums):
    sums_ref[pl.ds(row, 1), :] = jnp.sum(total_ND, axis=0, keepdims=True)
"""
_YS = ((_SIGN, """    ys_ND = z_ND * (inv_norm_N1 * (-logit_scale * _LOG2_E))  # −log₂e·x
    bit_ND = ys_ND < 0
"""), (_LOGITS, """    ay_ND = jnp.abs(ys_ND)  # log₂e·|x|
    e_ND = math_.exp2(-ay_ND)
"""), (_STATS, ("    stats = (p_ND, math_.log2(1.0 + e_ND) + ay_ND * ep_ND, "
                "bit_ND.astype(jnp.float32))\n")),
       (_FINAL, """  for row, (total_ND, unit) in enumerate(zip(sums, (1.0, _LN_2, 1.0))):
    sums_ref[pl.ds(row, 1), :] = unit * jnp.sum(total_ND, axis=0, keepdims=True)
"""))
_TILE_SUMS = (("  zeros = (jnp.zeros((block, padded_dim), jnp.float32),) * 3\n",
               "  zeros = (jnp.zeros((1, padded_dim), jnp.float32),) * 3\n"),
              ("    return tuple(total + v for total, v in zip(sums, stats))\n",
               "    return tuple(total + jnp.sum(v, axis=0, keepdims=True) "
               "for total, v in zip(sums, stats))\n"))
_NO_BIT_SUM = ("bit_ND.astype(jnp.float32))\n", "p_ND)\n")
EDITS = {
    "base": (),
    "no_stats": ((_STATS, "    stats = (bit_ND.astype(jnp.float32),) * 3\n"),),
    "no_entropy": ((_STATS, "    stats = (p_ND, p_ND, bit_ND.astype(jnp.float32))\n"),),
    "no_bit_sum": ((_STATS, _STATS.replace(*_NO_BIT_SUM)),),
    "no_pack": (("      codes_ref[tokens, pl.ds(word, 1)] = pack(bit_ND, word)\n",
                 "      codes_ref[tokens, pl.ds(word, 1)] = jnp.zeros((block, 1), jnp.int32)\n"),),
    "no_quantized": (("    quantized_ref[tokens, :] = jnp.where(bit_ND, inv_sqrt_d, "
                      "-inv_sqrt_d).astype(\n        quantized_ref.dtype)",
                      "    quantized_ref[tokens, :] = z_ref[tokens, :]"),),
    "sign_of_z": (("    bit_ND = u_ND > 0", "    bit_ND = z_ND > 0"),),
    "rsqrt_norm": ((_NORM, "    inv_norm_N1 = jax.lax.rsqrt(jnp.maximum(jnp.sum(z_ND * z_ND, "
                           "axis=1, keepdims=True), reference.NORM_EPS ** 2))\n"),),
    "ys": _YS,
    "tile_sums": _TILE_SUMS,
    "ys_no_bit_sum": _YS[:2] + ((_YS[2][0], _YS[2][1].replace(*_NO_BIT_SUM)),) + _YS[3:],
}
# (block_tokens, steps, num_warps): the GPU default first.
LAUNCHES = ((32, 16, 2), (16, 32, 1), (8, 64, 1))


def variant(name: str) -> types.ModuleType:
  """bsq_pallas with EDITS[name] applied to its source, as a fresh module."""
  source = inspect.getsource(bsq_pallas)
  for old, new in EDITS[name]:
    if source.count(old) != 1:
      raise ValueError(f"{name}: {old!r} is in bsq_pallas.py {source.count(old)} times, not once")
    source = source.replace(old, new)
  module = types.ModuleType(f"bsq_{name}")
  exec(compile(source, f"bsq_pallas.py ({name})", "exec"), module.__dict__)  # noqa: S102
  return module


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", default=None, help="default 1048576,16777216 (1024 off CUDA)")
  parser.add_argument("--variants", default=",".join(EDITS))
  parser.add_argument("--launches", default=";".join(",".join(map(str, x)) for x in LAUNCHES),
                      help="block_tokens,steps,num_warps;... (default: %(default)s)")
  parser.add_argument("--iters", type=int, default=30)
  parser.add_argument("--out", default="ablate_bsq.json")
  args = parser.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  tokens_list = ([int(t) for t in args.tokens.split(",")] if args.tokens
                 else [1 << 20, 1 << 24] if gpu else [1024])
  device = jax.devices()[0]
  peak, peak_source = bench_kernels._peak_bandwidth(device)
  report = {"device_kind": device.device_kind, "jax_version": jax.__version__,
            "peak_bandwidth_gb_per_s": peak / 1e9, "peak_bandwidth_source": peak_source,
            "copy": [], "rows": []}

  # Per call, and on CUDA the named kernel alone (CUPTI), as tune_kernels times its candidates.
  timed = lambda fn, args_, name: tune_kernels._time(fn, args_, tune_kernels.Runs(3, args.iters),
                                                     name)

  modules = {name: variant(name) for name in args.variants.split(",")}
  launches = [tuple(int(x) for x in launch.split(",")) for launch in args.launches.split(";")]
  for tokens in tokens_list:
    z = jax.random.normal(jax.random.key(0), (tokens, 32), jnp.bfloat16)
    moved = 2 * z.size * 2 + tokens * 4
    ref = jax.jit(reference.bsq)(z)
    copy = timed(bench_kernels._pallas_copy(min(512, tokens), not gpu), (z,), "copy")
    if "kernel_ms" in copy:
      copy["fraction_of_peak"] = 2 * z.size * 2 / (copy["kernel_ms"] / 1e3) / peak
    report["copy"].append({"tokens": tokens, **copy})
    for launch in launches:
      for name, module in modules.items():
        kwargs = dict(zip(("block_tokens", "steps", "num_warps"), launch))
        fn = lambda z, module=module, kwargs=kwargs: module.bsq(z, **kwargs)
        out = jax.jit(fn)(z)
        row = {"tokens": tokens, "launch": launch, "variant": name,
               "codes_equal": bool(jnp.array_equal(out.codes, ref.codes)),
               "token_entropy_error": float(jnp.abs(out.token_entropy - ref.token_entropy)),
               **timed(fn, (z,), "bsq")}
        if "kernel_ms" in row:
          row["fraction_of_peak"] = moved / (row["kernel_ms"] / 1e3) / peak
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
          json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
