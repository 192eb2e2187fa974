"""Pallas kernels against the plain-jnp references: outputs and gradients.

On CPU the kernels run in interpret mode; on a GPU/TPU the same tests run them compiled (the check
to pass before adding the backend to `policy.HARDWARE_VALIDATED`).

Tiny tiles (16) and lengths that are not multiples of them keep the interpreter fast and exercise
padding, several key blocks per query block and the block skipping of causal / block-causal /
segment masks. `-m slow` runs the wider grid (head dims 64/128, longer sequences, every mask on both
kernels, both dtypes).
"""
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok_jax import kernels
from vitok_jax.errors import ConfigError
from vitok_jax.kernels import attention
from vitok_jax.kernels import bsq_pallas
from vitok_jax.kernels import flash_attention as flash
from vitok_jax.kernels import flash_attention_hopper as hopper
from vitok_jax.kernels import masks
from vitok_jax.kernels import policy
from vitok_jax.kernels import quantize
from vitok_jax.kernels import reference
from vitok_jax.kernels import vq_pallas

TINY = flash.BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
# Relative to the largest reference entry: float32 is exact up to summation order; bfloat16 tiles
# round probabilities and scores to 8 bits before the matmuls.
# On a GPU, float32 kernel matmuls may run as TF32 (10-bit mantissa).
TOLERANCE = {jnp.float32: 2e-5 if jax.default_backend() == "cpu" else 5e-3, jnp.bfloat16: 3e-2,
             jnp.float16: 1e-2}
# Interpreted on CPU, each kernel flavour runs; on an accelerator only its own (compiled).
ON = {backend: pytest.mark.skipif(jax.default_backend() not in ("cpu", backend),
                                  reason=f"the {backend} kernel does not lower here")
      for backend in ("gpu", "tpu")}


def _assert_close(actual, expected, tol, what):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  err = np.abs(actual - expected).max()
  assert err <= tol * max(1.0, np.abs(expected).max()), f"{what}: max error {err}"


def _qkv(batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
  do = jax.random.normal(keys[3], (batch, q_len, heads, head_dim), dtype)
  return q, k, v, do


def _check_attention(backend, *, batch=2, q_len=50, kv_len=None, heads=4, kv_heads=2,
                     head_dim=32, dtype=jnp.float32, blocks=TINY, hopper=None, **mask):
  """Forward, logsumexp and all three gradients (with a cotangent on the lse too) vs reference."""
  kv_len = q_len if kv_len is None else kv_len
  q, k, v, do = _qkv(batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
  dlse = jax.random.normal(jax.random.key(9), (batch, heads, q_len))

  @functools.partial(jax.jit, static_argnums=0)
  def run(fn):
    (out, lse), vjp = jax.vjp(fn, q, k, v)
    return out, lse, vjp((do, dlse))

  out, lse, grads = run(lambda q, k, v: flash.flash_attention(
      q, k, v, block_sizes=blocks, backend=backend, return_lse=True, hopper=hopper, **mask))
  ref_out, ref_lse, ref_grads = run(lambda q, k, v: reference.attention(q, k, v, **mask))
  tol = TOLERANCE[dtype]
  assert out.dtype == dtype and out.shape == q.shape
  _assert_close(out, ref_out, tol, "out")
  _assert_close(lse, ref_lse, tol, "lse")
  for name, grad, ref_grad, primal in zip("qkv", grads, ref_grads, (q, k, v)):
    assert grad.dtype == primal.dtype and grad.shape == primal.shape
    _assert_close(grad, ref_grad, 2 * tol, f"d{name}")


VAR_IDS = masks.var_block_ids((1, 2, 3, 4, 5))  # 55 tokens in 5 scales.
PACKED = np.array([[0] * 20 + [1] * 13 + [2] * 17, [0] * 50])  # Two batch rows, 3 and 1 segments.

FAST_CASES = {
    "gqa_cross_lengths": dict(kv_len=41),
    "block_causal_bf16": dict(block_ids=VAR_IDS, q_len=55, dtype=jnp.bfloat16),
    "segments_causal_hd64": dict(segment_ids=PACKED, causal=True, head_dim=64, heads=2,
                                 kv_heads=1),
    # dK/dV programs of 64 keys over 16 queries (wider than the forward's key tile: the keys pad
    # to 64); dQ programs of 32 queries over 16 keys.
    "causal_separate_bwd_tiles": dict(causal=True, heads=2, kv_heads=1, blocks=flash.BlockSizes(
        block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=64, block_q_dq=32, block_k_dq=16,
        num_warps=4, num_warps_bwd=4, num_stages=1)),
}


@ON["gpu"]
@pytest.mark.parametrize("case", FAST_CASES)
def test_flash_attention_gpu_kernel_matches_reference(case):
  _check_attention("gpu", **FAST_CASES[case])


@ON["tpu"]
def test_flash_attention_tpu_kernel_matches_reference():
  _check_attention("tpu", block_ids=VAR_IDS, q_len=55, heads=2, kv_heads=1)


SLOW_MASKS = {
    "none": dict(),
    "causal": dict(causal=True),
    "block_causal": dict(block_ids=masks.var_block_ids((1, 2, 3, 4, 5, 6, 8))),  # 155 tokens.
    "segments_causal": dict(segment_ids=np.repeat(np.arange(4), [40, 60, 25, 30]), causal=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param(b, marks=ON[b]) for b in ("gpu", "tpu")])
@pytest.mark.parametrize("mask", SLOW_MASKS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flash_attention_wide_grid(backend, mask, head_dim, dtype):
  blocks = flash.BlockSizes(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32)
  _check_attention(backend, batch=1, q_len=155, heads=4, kv_heads=1, head_dim=head_dim,
                   dtype=dtype, blocks=blocks, **SLOW_MASKS[mask])


@pytest.mark.parametrize("kv_valid", [None, 60])
def test_block_ranges_cover_exactly_the_visible_tiles(kv_valid):
  """For sorted ids the ranges are tight: a tile is visited iff the dense mask shows a pair in it,
  and left unmasked iff it shows every pair (keys past `kv_valid` are padding, never shown)."""
  ids = masks.make_ids(1, 64, 64, block_ids=masks.var_block_ids((1, 2, 3, 4, 5, 3)),
                       segment_ids=np.repeat(np.arange(2), [30, 34]))
  block_ranges = jax.jit(masks.block_ranges, static_argnums=range(1, 6),
                         static_argnames=("causal", "kv_valid", "skip"))
  kv, q = block_ranges(ids, 1, 64, 64, 16, 8, causal=True, kv_valid=kv_valid)
  dense = np.array(masks.dense_mask(ids, 64, 64, causal=True))[0, 0]
  dense[:, kv_valid or 64:] = False
  tiles = dense.reshape(4, 16, 8, 8)
  visible, full = tiles.any((1, 3)), tiles.all((1, 3))
  assert full.any() and (visible & ~full).any()  # Both kinds of tile occur.

  def check(r, n, shown, whole):
    lo, hi, full_lo, full_hi = (int(x[0, n]) for x in r)
    assert (lo, hi) == (np.flatnonzero(shown).min(), np.flatnonzero(shown).max() + 1)
    expected = np.flatnonzero(whole)
    if expected.size:  # Sorted ids: the full tiles are one run, all of it found.
      assert (full_lo, full_hi) == (expected.min(), expected.max() + 1)
    else:
      assert full_lo == full_hi
    assert lo <= full_lo <= full_hi <= hi

  for n in range(4):
    check(kv, n, visible[n], full[n])
  for m in range(8):
    check(q, m, visible[:, m], full[:, m])
  # Without skipping every tile is visited, none unmasked.
  kv, q = block_ranges(ids, 1, 64, 64, 16, 8, causal=True, kv_valid=kv_valid, skip=False)
  for r, size in ((kv, 8), (q, 4)):
    np.testing.assert_array_equal(np.stack([np.asarray(x) for x in r])[:, 0].T,
                                  [[0, size, 0, 0]] * r.lo.shape[1])


def test_block_ranges_full_tiles_are_one_run_for_unsorted_ids():
  """Unsorted segments: fully visible tiles need not be contiguous; the run found is the first
  one, and every tile in it is fully visible."""
  segments = np.array([0] * 8 + [1] * 8 + [0] * 8 + [0] * 8)  # Key blocks 0, 2, 3 match query 0.
  ids = masks.make_ids(1, 32, 32, segment_ids=segments)
  kv, _ = masks.block_ranges(ids, 1, 32, 32, 8, 8, causal=False)
  assert (int(kv.lo[0, 0]), int(kv.hi[0, 0])) == (0, 4)
  assert (int(kv.full_lo[0, 0]), int(kv.full_hi[0, 0])) == (0, 1)
  assert (int(kv.full_lo[0, 2]), int(kv.full_hi[0, 2])) == (0, 1)


def test_flash_attention_dense_visit_gives_the_same_result():
  """skip_blocks=False (every tile visited and masked) equals the default, forward and backward."""
  q, k, v, do = _qkv(1, 55, 55, 2, 1, 32, jnp.float32)
  mask = dict(block_ids=VAR_IDS, causal=True)

  @functools.partial(jax.jit, static_argnums=0)
  def run(skip):
    out, vjp = jax.vjp(lambda q, k, v: flash.flash_attention(
        q, k, v, block_sizes=TINY, skip_blocks=skip, **mask), q, k, v)
    return out, vjp(do)

  for a, b in zip(jax.tree.leaves(run(True)), jax.tree.leaves(run(False))):
    _assert_close(a, b, TOLERANCE[jnp.float32], "skip vs dense visit")


def test_flash_attention_default_tiles_follow_the_mask(monkeypatch):
  """Without block_sizes: the block-causal tiles with block_ids, the general ones otherwise."""
  seen = []
  fit = flash.fit_block_sizes
  monkeypatch.setattr(flash, "fit_block_sizes", lambda blocks, *a: seen.append(blocks) or fit(
      blocks, *a))
  q, k, v, _ = _qkv(1, 55, 55, 2, 1, 32, jnp.float32)
  flash.flash_attention(q, k, v, block_ids=VAR_IDS, backend="gpu")
  flash.flash_attention(q, k, v, causal=True, backend="gpu")
  assert seen == [flash.BLOCK_CAUSAL_BLOCK_SIZES["gpu"], flash.DEFAULT_BLOCK_SIZES["gpu"]]
  assert seen[0] != seen[1]


# Exporting for CUDA from here: the kernels' custom calls are not on jax's stable list.
CUDA_CHECKS = [jax.export.DisabledSafetyCheck.custom_call(name)
               for name in ("mosaic_gpu_v2", "__gpu$xla.gpu.triton")]


def _spy_on_hopper_kernels(monkeypatch, record=lambda name, args, kwargs: name) -> list:
  """What `record(name, args, kwargs)` makes of each call of the Hopper kernels ("forward",
  "backward") from now on, in order; by default their names."""
  calls = []
  for name in ("forward", "backward"):
    kernel = getattr(hopper, name)
    monkeypatch.setattr(hopper, name, functools.partial(
        lambda kernel, name, *a, **kw: calls.append(record(name, a, kw)) or kernel(*a, **kw),
        kernel, name))
  return calls


@pytest.mark.parametrize("mode", [True, "forward"])
def test_hopper_kernel_lowers_for_cuda(mode, monkeypatch):
  """The Mosaic GPU kernels have no interpreter: here flash_attention's forward+backward (grouped
  heads, bf16, under vmap) is lowered for CUDA, on the Hopper kernels for both passes or, with
  "forward", with the Triton backward."""
  monkeypatch.setattr(policy, "is_hopper", lambda device=None: True)
  calls = _spy_on_hopper_kernels(monkeypatch)
  attend = functools.partial(flash.flash_attention, backend="gpu", interpret=False, hopper=mode)

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(out)

  # Under vmap too (over a leading axis, with k and v shared): the kernels batch.
  fwd_bwd = jax.vmap(fwd_bwd, in_axes=(0, None, None))
  q = jax.ShapeDtypeStruct((2, 1, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  text = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=CUDA_CHECKS)(
      q, kv, kv).mlir_module()
  assert "mosaic_gpu" in text
  assert calls == (["forward", "backward"] if mode is True else ["forward"])
  assert ("triton" in text) == (mode == "forward")


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="on a GPU the export carries each Mosaic GPU kernel as serialized "
                    "bytecode, which differed between two lowerings of one kernel (H100, jax "
                    "0.11.2); the lowered text is compared on CPU")
@pytest.mark.parametrize("name,default,named", [
    ("DS_DURING_DV_HEAD_DIMS", (64, 128), 64), ("DS_DURING_DV_HEAD_DIMS", (64, 128), 128),
    ("DESCRIPTORS_IN_LOOP_HEAD_DIMS", (128,), 128)])
def test_hopper_backward_variants_are_set_per_head_dim(name, default, named, monkeypatch):
  """Each of the backward's per-head-dim constants changes the lowered kernel at a head dim it
  names and only there: `DS_DURING_DV_HEAD_DIMS` (64 and 128: dS while dV's matmul runs;
  `tools/bench_kernels.py`'s pallas_bwd_in_order empties it) and `DESCRIPTORS_IN_LOOP_HEAD_DIMS`
  (128; pallas_bwd_descriptors_before_loop empties it)."""
  def lowered(head_dim, dims):
    monkeypatch.setattr(hopper, name, dims)
    x = jax.ShapeDtypeStruct((1, 256, 2, head_dim), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((1, 2, 256), jnp.float32)
    backward = lambda *args: hopper.backward(*args, scale=0.125)
    text = jax.export.export(jax.jit(backward), platforms=["cuda"], disabled_checks=CUDA_CHECKS)(
        x, x, x, x, rows, rows).mlir_module()
    # Without source locations (they name the calling line).
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))
    return re.sub(r" loc\(#loc\d*\)", "", text)
  assert getattr(hopper, name) == default
  other = 64 + 128 - named
  assert lowered(named, (named,)) != lowered(named, ())
  assert lowered(other, (named,)) == lowered(other, ())


@pytest.mark.parametrize("prefix_masks", [False, True])
def test_hopper_masked_kernels_lower_for_cuda(prefix_masks, monkeypatch):
  """VAR's block-causal attention through the dispatcher (numpy block ids, 680 tokens, bf16):
  with `policy.HOPPER_PREFIX_MASKS` it lowers for CUDA on the Hopper kernels, padded to 768 (the
  path without `HOPPER_UNPADDED`) and given the scales' `PrefixMask` with the padded keys hidden;
  without it, on Triton. Causal attention with hopper=True lowers on them too."""
  monkeypatch.setattr(policy, "is_hopper", lambda device=None: True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # Compiled kernels, not interpreted.
  monkeypatch.setattr(policy, "HOPPER_PREFIX_MASKS", prefix_masks)
  monkeypatch.setattr(policy, "HOPPER_UNPADDED", False)
  monkeypatch.setattr(policy, "HOPPER_SKIP_PADDED_QUERIES", False)
  monkeypatch.setattr(hopper, "BACKWARD_MIN_Q_LEN", 0)
  seen = _spy_on_hopper_kernels(monkeypatch, lambda _, a, kw: (a[0].shape[1], kw["mask"]))
  lower = lambda fn, *args: jax.export.export(
      jax.jit(jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), (0, 1, 2))),
      platforms=["cuda"], disabled_checks=CUDA_CHECKS)(*args).mlir_module()
  spec = lambda length, heads: jax.ShapeDtypeStruct((2, length, heads, 64), jnp.bfloat16)
  q, kv = spec(680, 4), spec(680, 2)
  with kernels.recorded_attention() as calls:
    text = lower(lambda q, k, v: kernels.dot_product_attention(q, k, v, block_ids=VAR_680,
                                                               impl="pallas"), q, kv, kv)
  want = hopper.PrefixMask.from_block_ids(VAR_680, kv_valid=680)
  assert seen == ([(768, want)] * 2 if prefix_masks else [])
  for ids in (jnp.asarray(VAR_680), VAR_680[None]):  # The same ids as a jax array or [1, L].
    seen.clear()
    jax.eval_shape(lambda q, k, v: kernels.dot_product_attention(q, k, v, block_ids=ids,
                                                                 impl="pallas"), q, kv, kv)
    assert seen == ([(768, want)] if prefix_masks else [])
  assert {(c["kernel"], c["hopper_mask"]) for c in calls} == {
      ("mosaic_gpu", True) if prefix_masks else ("triton", False)}  # What the record shows.
  assert ("mosaic_gpu" in text) == prefix_masks and ("triton" in text) != prefix_masks
  seen.clear()
  x = spec(512, 4)
  text = lower(lambda q, k, v: flash.flash_attention(q, k, v, causal=True, backend="gpu",
                                                     interpret=False, hopper=True), x, x, x)
  assert seen == [(512, hopper.PrefixMask(causal=True))] * 2 and "triton" not in text


@pytest.mark.parametrize("hopper_mode", [None, "forward"])
def test_skipping_padded_queries_lowers_for_cuda_where_both_passes_are_hopper(hopper_mode,
                                                                             monkeypatch):
  """With `policy.HOPPER_SKIP_PADDED_QUERIES`, VAR's 680 tokens (padded to 768) give both Hopper
  kernels the scales' `PrefixMask` with q_valid=680, and lower for CUDA; with the Triton backward
  ("forward") the mask has no q_valid, as Triton's backward reads every padded row's lse."""
  monkeypatch.setattr(policy, "is_hopper", lambda device=None: True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # Compiled kernels, not interpreted.
  monkeypatch.setattr(hopper, "_cuda_runtime_version", lambda: None)
  monkeypatch.setattr(policy, "HOPPER_SKIP_PADDED_QUERIES", True)
  monkeypatch.setattr(policy, "HOPPER_UNPADDED", False)  # The padded path.
  seen = _spy_on_hopper_kernels(monkeypatch, lambda _, a, kw: kw["mask"])
  attend = functools.partial(flash.flash_attention, block_ids=VAR_680, hopper=hopper_mode)
  x = jax.ShapeDtypeStruct((2, 680, 4, 64), jnp.bfloat16)
  text = jax.export.export(
      jax.jit(jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), (0, 1, 2))),
      platforms=["cuda"], disabled_checks=CUDA_CHECKS)(x, x, x).mlir_module()
  want = hopper.PrefixMask.from_block_ids(VAR_680, kv_valid=680)
  if hopper_mode is None:
    assert seen == [dataclasses.replace(want, q_valid=680)] * 2 and "triton" not in text
  else:
    assert seen == [want] and "triton" in text
  assert "mosaic_gpu" in text
  # 300 tokens in three blocks: Triton's 64-token tiles pad them to 384 (q_valid=300), tiles of
  # 256 to 512, whose 212 padding rows span a whole program, which would wait for key tiles
  # nobody streams: no q_valid.
  x = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)
  for block_q, q_valid in ((64, 300), (256, None)):
    seen.clear()
    tiles = dataclasses.replace(flash.BLOCK_CAUSAL_BLOCK_SIZES["gpu"], block_q=block_q,
                                block_q_bwd=block_q)
    jax.eval_shape(jax.grad(lambda *a: flash.flash_attention(
        *a, block_ids=np.repeat(np.arange(3), 100), block_sizes=tiles, hopper=hopper_mode).astype(
            jnp.float32).sum(), (0, 1, 2)), x, x, x)
    assert [m.q_valid for m in seen] == [q_valid if hopper_mode is None else None] * len(seen)
    assert len(seen) == (2 if hopper_mode is None else 1)


def test_auto_causal_on_hopper_runs_on_the_hopper_kernels(monkeypatch):
  """Where "auto" takes our kernel over cuDNN for causal attention on a Hopper GPU
  (`policy.hopper_ahead`), flash_attention runs it on the Hopper kernels (on Triton it would be
  slower than cuDNN); skip_blocks=False, the dense visit, stays on Triton."""
  monkeypatch.setattr(policy, "is_hopper", lambda device=None: True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # Compiled kernels, not interpreted.
  monkeypatch.setattr(hopper, "_cuda_runtime_version", lambda: None)
  calls = _spy_on_hopper_kernels(monkeypatch)
  spec = lambda length, heads, head_dim: jax.ShapeDtypeStruct((2, length, heads, head_dim),
                                                              jnp.bfloat16)
  for length, head_dim, kernel in ((256, 64, "mosaic_gpu_fwd"), (2048, 128, "mosaic_gpu")):
    q, kv = spec(length, 4, head_dim), spec(length, 2, head_dim)
    with kernels.recorded_attention() as recorded:
      jax.eval_shape(lambda q, k, v: kernels.dot_product_attention(q, k, v, is_causal=True),
                     q, kv, kv)
    assert [(c["impl"], c["kernel"], c["hopper_mask"]) for c in recorded] == [
        ("pallas_gpu", kernel, True)], length
  assert calls == ["forward"] * 2
  jax.eval_shape(functools.partial(flash.flash_attention, causal=True, skip_blocks=False),
                 q, kv, kv)
  assert calls == ["forward"] * 2


@pytest.fixture
def tpu_target(monkeypatch):
  """Lowering for a TPU from this machine: jax's Pallas TPU lowering asks the device for its
  generation, so a v5e ("TPU v5 lite") is named. Mosaic's layout passes run in libtpu, on a TPU
  only: this catches what jax rejects (block shapes, primitives Mosaic has no rule for), not what
  the TPU compiler would."""
  tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
  if not hasattr(tpu_info, "get_device_kind"):
    pytest.skip("this jax asks the TPU for its generation another way")
  monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
  monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # The quantisers' TPU flavour.


def _lower_for_tpu(fn, *args) -> str:
  return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


@pytest.mark.parametrize("mask,head_dim,dtype,kv_heads", [
    ("none", 128, jnp.bfloat16, 4), ("causal", 64, jnp.bfloat16, 2),
    ("block_causal", 64, jnp.float32, 4), ("segments", 80, jnp.bfloat16, 1)])
def test_tpu_kernels_lower_for_tpu(tpu_target, mask, head_dim, dtype, kv_heads):
  """Forward and backward of the TPU flash attention (default tiles, lengths that are not whole
  tiles, grouped heads, ViT-H's head dim 80) lower to three Mosaic kernels for a TPU."""
  length = 680 if mask == "block_causal" else 300
  kwargs = {"none": {}, "causal": {"causal": True},
            "block_causal": {"block_ids": masks.var_block_ids(
                (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))},
            "segments": {"segment_ids": np.arange(length) // 100}}[mask]
  q = jax.ShapeDtypeStruct((2, length, 4, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((2, length, kv_heads, head_dim), dtype)

  def loss(q, k, v):
    out = flash.flash_attention(q, k, v, backend="tpu", interpret=False, **kwargs)
    return out.astype(jnp.float32).sum()

  text = _lower_for_tpu(jax.grad(loss, (0, 1, 2)), q, kv, kv)
  assert text.count("tpu_custom_call") == 3, "forward, dK/dV and dQ kernels"


def test_tpu_quantisers_lower_for_tpu(tpu_target):
  """BSQ (its TPU flavour: float bit packing) and the VQ nearest-code search lower for a TPU."""
  z = jax.ShapeDtypeStruct((1000, 32), jnp.bfloat16)
  bsq_grad = jax.value_and_grad(lambda z: bsq_pallas.bsq(z, interpret=False).token_entropy)
  assert _lower_for_tpu(bsq_grad, z).count("tpu_custom_call") == 1
  z, codebook = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((4096, 8), (16384, 8)))
  vq = lambda z, codebook: vq_pallas.vq_nearest(z, codebook, interpret=False)
  assert _lower_for_tpu(vq, z, codebook).count("tpu_custom_call") == 1


def test_hopper_kernel_says_what_does_not_fit():
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  x = spec((1, 256, 4, 64))
  assert hopper.unsupported_reason(x, x, x) is None
  assert "mask" in hopper.unsupported_reason(x, x, x, masked=True)
  assert "one dtype" in hopper.unsupported_reason(x, x, spec(x.shape, jnp.float16))
  assert "float32" in hopper.unsupported_reason(*[spec(x.shape, jnp.float32)] * 3)
  assert "head dims" in hopper.unsupported_reason(*[spec((1, 256, 4, 32))] * 3)
  assert "multiples of 8" in hopper.unsupported_reason(spec((1, 190, 4, 64)), x, x)
  assert "multiples of 8" in hopper.unsupported_reason(x, *[spec((1, 202, 4, 64))] * 2)
  assert "divide" in hopper.unsupported_reason(x, *[spec((1, 256, 3, 64))] * 2)
  assert "k and v" in hopper.unsupported_reason(x, x, spec((1, 256, 2, 64)))
  assert "positive" in hopper.unsupported_reason(x, x, x, scale=-0.125)
  with pytest.raises(ConfigError, match="'forward'"):
    flash.flash_attention(jnp.zeros(x.shape, x.dtype), *[jnp.zeros(x.shape, x.dtype)] * 2,
                          hopper="backward")
  with pytest.raises(ConfigError, match="skip_blocks=False"):
    flash.flash_attention(*[jnp.zeros(x.shape, x.dtype)] * 3, causal=True, hopper=True,
                          skip_blocks=False)
  if not policy.is_hopper():
    q = jnp.zeros(x.shape, x.dtype)
    with pytest.raises(ConfigError, match="sm_90"):
      flash.flash_attention(q, q, q, hopper=True)


def test_hopper_passes_by_mode_and_length(monkeypatch):
  """Which passes run on the Hopper kernels: by default the forward, and the backward from
  BACKWARD_MIN_Q_LEN queries on (measured slower below) or for block-causal masks; masks that are
  `PrefixMask`s only while `policy.HOPPER_PREFIX_MASKS` is set; both with True, the forward with
  "forward", neither with False or another mask."""
  monkeypatch.setattr(policy, "is_hopper", lambda device=None: True)
  monkeypatch.setattr(hopper, "_cuda_runtime_version", lambda: None)  # Not one masks refuse.
  spec = lambda length: jax.ShapeDtypeStruct((1, length, 4, 64), jnp.bfloat16)
  passes = lambda mode, length, masked=False, mask=None: flash._use_hopper(
      mode, flash._hopper_possible(mode, "gpu", False), masked, mask, 0.125, spec(length),
      spec(length), spec(length))
  assert passes(None, 256) == (True, False)
  assert passes(None, hopper.BACKWARD_MIN_Q_LEN) == (True, True)
  assert passes(True, 256) == (True, True)
  assert passes("forward", 4096) == (True, False)
  assert passes(False, 4096) == (False, False)
  assert passes(None, 4096, masked=True) == (False, False)
  with pytest.raises(ConfigError, match="prefix of the keys"):
    passes(True, 4096, masked=True)  # A mask that is no `PrefixMask` (segment ids).
  causal = hopper.PrefixMask(causal=True)
  assert passes(True, 4096, masked=True, mask=causal) == (True, True)
  assert passes("forward", 256, masked=True, mask=causal) == (True, False)
  assert passes(None, 256, masked=True, mask=causal) == (True, False)
  assert passes(None, 4096, masked=True, mask=causal) == (True, True)
  var = hopper.PrefixMask.from_block_ids(VAR_680)
  assert passes(None, 768, masked=True, mask=var) == (True, True)
  assert passes(None, 4096, masked=True) == (False, False)
  # Without `policy.HOPPER_PREFIX_MASKS` masks stay on Triton unless asked.
  monkeypatch.setattr(policy, "HOPPER_PREFIX_MASKS", False)
  assert passes(None, 4096, masked=True, mask=causal) == (False, False)
  assert passes(True, 256, masked=True, mask=causal) == (True, True)
  # Lengths that are not whole 128-token tiles only where `policy.HOPPER_UNPADDED` chose them.
  assert passes(None, 192) == (False, False)
  with pytest.raises(ConfigError, match="whole 128-token tiles"):
    passes(True, 192)
  assert flash._use_hopper(True, True, False, None, 0.125, spec(192), spec(192), spec(192),
                           unpadded=True) == (True, True)


VAR_680 = masks.var_block_ids((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
# (PrefixMask, padded length, true length) as flash_attention builds them for the Hopper kernels.
PREFIX_CASES = {
    "causal": (hopper.PrefixMask(causal=True, kv_valid=300), 384, 300),
    "block_causal": (hopper.PrefixMask.from_block_ids(VAR_680, kv_valid=680), 768, 680),
    "key_padding": (hopper.PrefixMask(kv_valid=200), 256, 200),
}


def _reference_visible(case: str, length: int, true_length: int) -> np.ndarray:
  """bool [length, length]: the pairs a case's mask shows, from its definition. Padded query rows
  act as the last true row (flash_attention pads the ids by repeating the last one); padded keys
  are hidden."""
  q_BL, k_BL = np.minimum(np.arange(length), true_length - 1)[:, None], np.arange(length)[None]
  visible = np.broadcast_to(k_BL < true_length, (length, length)).copy()
  if case == "causal":
    visible &= k_BL <= np.arange(length)[:, None]
  if case == "block_causal":
    visible &= VAR_680[np.minimum(k_BL, true_length - 1)] <= VAR_680[q_BL]
  return visible


@pytest.mark.parametrize("skip_padded", [False, True], ids=["all_tiles", "skip_padded"])
@pytest.mark.parametrize("case", PREFIX_CASES)
def test_prefix_mask_is_the_mask_and_bounds_its_tiles(case, skip_padded):
  """`PrefixMask` shows exactly the pairs the mask does, every row sees key 0 (the forward's
  running max is finite after its first tile), and the tile bounds of the Hopper kernels hold:
  forward (per warpgroup of 64 rows and per program of 128) key tiles before `full` wholly
  visible, none from `end` on; backward (per program of 128 keys) no query tile before `first`
  sees a key, every tile from `full` on up to `query_steps` sees all of them. With q_valid
  (skip_padded) the same pairs are shown, and the tiles of padding rows alone are walked by
  neither pass: every tile a true row needs still is."""
  mask, length, true_length = PREFIX_CASES[case]
  if skip_padded:
    mask = dataclasses.replace(mask, q_valid=true_length)
  assert PREFIX_CASES["block_causal"][0].block_ends == (1, 5, 14, 30, 55, 91, 155, 255, 424, 680)
  pos = np.arange(length)
  visible = np.asarray(mask.visible(pos[:, None], pos[None, :]))
  np.testing.assert_array_equal(visible, _reference_visible(case, length, true_length))
  assert visible[:, 0].all()
  tiles = lambda x, rows, cols: x.reshape(x.shape[0] // rows, rows, x.shape[1] // cols, cols)
  for rows in (hopper.BLOCK_Q, 2 * hopper.BLOCK_Q):
    by_tile = tiles(visible, rows, hopper.BLOCK_K)
    for t in range(length // rows):
      full, end = (int(x) for x in hopper.forward_tiles(mask, t * rows, rows))
      if skip_padded and t * rows >= true_length:  # Padding rows alone.
        assert (full, end) == (0, 0) and rows == hopper.BLOCK_Q
        continue
      assert 1 <= end and by_tile[t, :, :full].all() and not by_tile[t, :, end:].any()
      assert full == end or not by_tile[t, :, full].all()  # Tight: no whole tile masked.
  keys = 2 * hopper.BWD_BLOCK_K
  by_tile = tiles(visible, hopper.BWD_BLOCK_Q, keys)
  q_steps = hopper.query_steps(mask, length)
  assert q_steps == (-(-true_length // hopper.BWD_BLOCK_Q) if skip_padded
                     else length // hopper.BWD_BLOCK_Q)
  for j in range(length // keys):
    first, full = (int(x) for x in hopper.backward_tiles(mask, j * keys, keys, length))
    assert first < full <= q_steps
    assert not by_tile[:first, :, j].any() and by_tile[full:q_steps, :, j].all()
    assert by_tile[first, :, j].any()  # Tight at the start: the first tile sees a key.


def test_backward_tiles_of_keys_no_query_sees():
  """A program of padding keys only (keys pad past a whole program with large Triton tiles)
  still walks one wholly masked query tile (`backward_tiles` keeps the loops non-empty)."""
  mask = hopper.PrefixMask(kv_valid=300)
  first, full = (int(x) for x in hopper.backward_tiles(mask, 384, 128, 512))
  assert (first, full) == (512 // hopper.BWD_BLOCK_Q - 1, 512 // hopper.BWD_BLOCK_Q)
  assert not np.asarray(mask.visible(np.arange(512)[:, None], np.arange(384, 512)[None])).any()


def test_hopper_mask_checks(monkeypatch):
  x = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
  assert "empty PrefixMask" in hopper.unsupported_reason(x, x, x, masked=True,
                                                         mask=hopper.PrefixMask())
  causal = hopper.PrefixMask(causal=True)
  assert hopper.unsupported_reason(x, x, x, masked=True, mask=causal) is None
  # Query padding only inside the last program's 128 rows (one of padding alone would hang).
  with_q_valid = lambda n: dataclasses.replace(causal, q_valid=n)
  assert hopper.unsupported_reason(x, x, x, masked=True, mask=with_q_valid(129)) is None
  for n in (128, 257):
    assert f"q_valid={n}" in hopper.unsupported_reason(x, x, x, masked=True, mask=with_q_valid(n))
  # CUDA 12.8.0 – 12.9.0 miscompile the in-tile mask (jax's attention_mgpu refuses them too).
  monkeypatch.setattr(hopper, "_cuda_runtime_version", lambda: 12080)
  assert "12080" in hopper.unsupported_reason(x, x, x, masked=True, mask=causal)
  assert hopper.unsupported_reason(x, x, x) is None  # Unmasked: not affected,
  tail = jax.ShapeDtypeStruct((1, 136, 4, 64), jnp.bfloat16)  # but for the key tail's mask.
  assert "12080" in hopper.unsupported_reason(x, tail, tail)


def test_hopper_kernels_take_lengths_in_rows_of_eight():
  """Lengths need not be whole tiles, only multiples of 8 (TMA's row groups): the output comes at
  the query length, lse and gradients at theirs, lse padded to whole 128-row programs, and the key
  tail past the last whole tile is masked."""
  spec = lambda length, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((2, length, 4, 64), dtype)
  q, kv = spec(680), spec(136)
  assert hopper.unsupported_reason(q, kv, kv) is None
  assert "multiples of 8" in hopper.unsupported_reason(spec(681), kv, kv)
  out, lse = jax.eval_shape(functools.partial(hopper.forward, scale=0.125), q, kv, kv)
  assert (out.shape, lse.shape) == (q.shape, (2, 4, 768))
  dq, dk, dv = jax.eval_shape(functools.partial(hopper.backward, scale=0.125), q, kv, kv, q, lse,
                              jax.ShapeDtypeStruct((2, 4, 680), jnp.float32))
  assert (dq.shape, dq.dtype, dk.shape, dv.shape) == (q.shape, jnp.float32, kv.shape, kv.shape)
  assert hopper.hide_key_tail(None, 256) is None
  assert hopper.hide_key_tail(None, 136) == hopper.PrefixMask(kv_valid=136)
  causal = hopper.PrefixMask(causal=True)
  assert hopper.hide_key_tail(causal, 680) == hopper.PrefixMask(causal=True, kv_valid=680)
  assert hopper.hide_key_tail(dataclasses.replace(causal, kv_valid=600), 680).kv_valid == 600
  # q_valid: padding in the last program only, the 128 rows from 256 on at 296 tokens.
  x = spec(296)
  with_q_valid = lambda n: dataclasses.replace(causal, q_valid=n)
  assert hopper.unsupported_reason(x, x, x, masked=True, mask=with_q_valid(257)) is None
  assert "q_valid=256" in hopper.unsupported_reason(x, x, x, masked=True, mask=with_q_valid(256))


@pytest.mark.parametrize("hopper_mode", [None, "forward"])
def test_unpadded_lengths_lower_for_cuda_where_both_passes_are_hopper(hopper_mode, monkeypatch):
  """With `policy.HOPPER_UNPADDED` VAR's 680 tokens reach both Hopper kernels unpadded, with the
  scales' mask (the kernels hide the key tail themselves), and the program lowered for CUDA has
  no array padded to 768 tokens but lse; with the Triton backward ("forward"), as before: 768.
  Lengths that are not multiples of 8, and unmasked calls below the Hopper backward's length,
  keep the padding."""
  monkeypatch.setattr(policy, "is_hopper", lambda device=None: True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # Compiled kernels, not interpreted.
  monkeypatch.setattr(hopper, "_cuda_runtime_version", lambda: None)
  monkeypatch.setattr(policy, "HOPPER_UNPADDED", True)
  monkeypatch.setattr(policy, "HOPPER_SKIP_PADDED_QUERIES", False)  # The masks as they come.
  seen = _spy_on_hopper_kernels(monkeypatch, lambda name, a, kw: (name, a[0].shape[1],
                                                                  kw["mask"]))
  attend = functools.partial(flash.flash_attention, block_ids=VAR_680, hopper=hopper_mode)
  x = jax.ShapeDtypeStruct((2, 680, 4, 64), jnp.bfloat16)
  text = jax.export.export(
      jax.jit(jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), (0, 1, 2))),
      platforms=["cuda"], disabled_checks=CUDA_CHECKS)(x, x, x).mlir_module()
  blocks = hopper.PrefixMask.from_block_ids(VAR_680)
  if hopper_mode is None:
    assert seen == [("forward", 680, blocks), ("backward", 680, blocks)]
    assert "x768x4x64x" not in text and "triton" not in text
  else:
    assert seen == [("forward", 768, dataclasses.replace(blocks, kv_valid=680))]
    assert "x768x4x64x" in text
  # Unmasked (the key tail masked in the kernels), cross-attention with one key tile, mostly
  # past the end, and lengths the kernels refuse or that keep the Triton backward.
  for q_len, kv_len, kwargs, want in ((1032, 1032, {}, 1032), (200, 136, dict(hopper=True), 200),
                                      (1030, 1030, dict(hopper=True), 1152), (296, 296, {}, 384)):
    seen.clear()
    spec = lambda length: jax.ShapeDtypeStruct((1, length, 2, 128), jnp.bfloat16)
    q, kv = spec(q_len), spec(kv_len)
    text = jax.export.export(jax.jit(jax.grad(lambda *a: flash.flash_attention(*a, **kwargs).astype(
        jnp.float32).sum(), (0, 1, 2))), platforms=["cuda"], disabled_checks=CUDA_CHECKS)(
            q, kv, kv).mlir_module()
    assert [n for _, n, _ in seen] == [want] * len(seen) and seen, q_len
    assert ("triton" in text) == (len(seen) == 1), q_len
  # Without the flag, lengths that are not whole tiles never reach the kernels unpadded, also
  # where flash_attention does not pad for them (no prefix masks): Triton.
  monkeypatch.setattr(policy, "HOPPER_UNPADDED", False)
  monkeypatch.setattr(policy, "HOPPER_PREFIX_MASKS", False)
  seen.clear()
  y = jax.ShapeDtypeStruct((1, 192, 2, 64), jnp.bfloat16)
  jax.eval_shape(lambda *a: flash.flash_attention(*a), y, y, y)  # (A new function: traced.)
  assert seen == []


def test_hopper_padding_rounds_only_where_the_kernels_then_take_the_call(monkeypatch):
  monkeypatch.setattr(policy, "HOPPER_UNPADDED", False)  # Padding to whole tiles, not lengths.
  spec = lambda length, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((1, length, 4, 64), dtype)
  pad = lambda prefix, q, k, padded: flash._hopper_padding(prefix, q, k, *padded, 64, 0.125)[:2]
  # Causal self-attention of 300 tokens with 256-query / 64-key Triton tiles (512, 384): one
  # length for both, else the kernels would refuse q_len != kv_len.
  assert pad(hopper.PrefixMask(causal=True), spec(300), spec(300), (512, 384)) == (512, 512)
  # No mask but 192 keys: 256 with the last 64 keys hidden by the mask (kv_valid).
  assert pad(hopper.PrefixMask(), spec(256), spec(192), (256, 192)) == (256, 256)
  # float32: the kernels refuse it, Triton keeps its own padding (704 for VAR's 680, not 768).
  blocks = hopper.PrefixMask.from_block_ids(VAR_680)
  assert pad(blocks, spec(680, jnp.float32), spec(680, jnp.float32), (704, 704)) == (704, 704)
  assert pad(blocks, spec(680), spec(680), (704, 704)) == (768, 768)


def test_prefix_masks_of_flash_attention_arguments():
  """Which flash_attention masks the Hopper kernels can take, and as what."""
  prefix = lambda **kw: flash._prefix_mask(**{"causal": False, "segment_ids": None,
                                              "block_ids": None, "q_len": 64, "kv_len": 64, **kw})
  assert prefix() == hopper.PrefixMask() and prefix(causal=True) == hopper.PrefixMask(causal=True)
  assert prefix(block_ids=VAR_IDS, q_len=55, kv_len=55).block_ends == (1, 5, 14, 30, 55)
  assert prefix(block_ids=VAR_IDS, causal=True, q_len=55, kv_len=55).causal
  for not_prefix in (dict(segment_ids=np.zeros(64)), dict(causal=True, kv_len=32),
                     dict(block_ids=VAR_IDS[::-1], q_len=55, kv_len=55),  # Falling ids.
                     dict(block_ids=(VAR_IDS, VAR_IDS), q_len=55, kv_len=55),
                     dict(block_ids=PACKED, q_len=50, kv_len=50)):  # Per example.
    assert prefix(**not_prefix) is None, not_prefix
  # Concrete ids (a jax array closed over) are read when tracing; traced ids are not.
  seen, concrete = [], jnp.asarray(VAR_IDS)
  jax.jit(lambda ids: seen.append((prefix(block_ids=concrete, q_len=55, kv_len=55),
                                   prefix(block_ids=ids, q_len=55, kv_len=55))))(VAR_IDS)
  assert seen == [(hopper.PrefixMask.from_block_ids(VAR_IDS), None)]


@pytest.mark.skipif(jax.default_backend() != "gpu" or not policy.is_hopper(),
                    reason="the Mosaic GPU kernel runs on an sm_90 GPU only")
@pytest.mark.parametrize("q_len,kv_len,head_dim,dtype,kv_heads", [
    (384, 384, 128, jnp.bfloat16, 2), (384, 384, 64, jnp.float16, 4),
    # Padded queries and head dim, one key tile (a ring of one slot), two key tiles.
    (200, 128, 96, jnp.bfloat16, 4), (128, 256, 64, jnp.bfloat16, 1)])
def test_hopper_kernels_match_reference(q_len, kv_len, head_dim, dtype, kv_heads, monkeypatch):
  """Unmasked attention on an H100/H200 takes the Hopper forward and backward by default
  (checked by spies; the backward's length threshold lowered for these short cases) and matches
  the reference: output, logsumexp and gradients."""
  monkeypatch.setattr(hopper, "BACKWARD_MIN_Q_LEN", 0)
  calls = _spy_on_hopper_kernels(monkeypatch)
  _check_attention("gpu", batch=2, q_len=q_len, kv_len=kv_len, heads=4, kv_heads=kv_heads,
                   head_dim=head_dim, dtype=dtype, blocks=flash.DEFAULT_BLOCK_SIZES["gpu"])
  assert "forward" in calls and "backward" in calls


@pytest.mark.skipif(jax.default_backend() != "gpu" or not policy.is_hopper(),
                    reason="the Mosaic GPU kernel runs on an sm_90 GPU only")
@pytest.mark.parametrize("q_len,kv_len,head_dim,dtype,kv_heads,mask", [
    (680, 680, 64, jnp.bfloat16, 2, dict(block_ids=VAR_680)),
    (384, 384, 128, jnp.bfloat16, 4, dict(causal=True)),
    (300, 300, 64, jnp.float16, 1, dict(causal=True)),  # Padded queries and keys.
    (300, 300, 128, jnp.bfloat16, 2, dict(causal=True)),
    # 55 tokens padded to 128: with skipping the backward walks one query tile (a ring of one).
    (55, 55, 64, jnp.bfloat16, 2, dict(block_ids=VAR_IDS)),
    (256, 200, 128, jnp.bfloat16, 2, {})], ids=["block_causal", "causal", "causal_padded",
                                               "causal_padded_d128", "block_causal_55",
                                               "key_padding"])
@pytest.mark.parametrize("skip_padded", [False, True], ids=["all_tiles", "skip_padded"])
def test_hopper_masked_kernels_match_reference(q_len, kv_len, head_dim, dtype, kv_heads, mask,
                                               skip_padded, monkeypatch):
  """Masks that show each query a prefix of the keys take the Hopper kernels by default
  (`policy.HOPPER_PREFIX_MASKS`; checked by spies; the backward's length threshold lowered for
  these short cases): output, logsumexp and gradients match the reference, also where the
  kernels skip the tiles of query padding alone (`policy.HOPPER_SKIP_PADDED_QUERIES`: the
  masks they get say so wherever the queries were padded to a multiple of 128). The arrays are
  padded to whole tiles here (`policy.HOPPER_UNPADDED` unset, so the keys' padding is the mask's
  kv_valid); `test_hopper_kernels_take_lengths_as_they_are` runs them unpadded."""
  if 12080 <= (hopper._cuda_runtime_version() or 0) < 12091:
    pytest.skip("the masked Hopper kernels refuse CUDA 12.8.0 – 12.9.0 (ptxas)")
  monkeypatch.setattr(hopper, "BACKWARD_MIN_Q_LEN", 0)
  monkeypatch.setattr(policy, "HOPPER_SKIP_PADDED_QUERIES", skip_padded)
  monkeypatch.setattr(policy, "HOPPER_UNPADDED", False)
  seen = _spy_on_hopper_kernels(monkeypatch, lambda name, a, kw: (name, kw["mask"].q_valid))
  _check_attention("gpu", batch=2, q_len=q_len, kv_len=kv_len, heads=4, kv_heads=kv_heads,
                   head_dim=head_dim, dtype=dtype, blocks=flash.DEFAULT_BLOCK_SIZES["gpu"], **mask)
  q_valid = q_len if skip_padded and q_len % 128 else None
  assert seen == [("forward", q_valid), ("backward", q_valid)]


@pytest.mark.skipif(jax.default_backend() != "gpu" or not policy.is_hopper(),
                    reason="the Mosaic GPU kernel runs on an sm_90 GPU only")
@pytest.mark.parametrize("q_len,kv_len,head_dim,kv_heads,mask,skip_padded", [
    (680, 680, 64, 2, dict(block_ids=VAR_680), False),
    (680, 680, 64, 2, dict(block_ids=VAR_680), True),
    (296, 296, 128, 4, dict(causal=True), False),
    # Cross-attention: one program of queries, one key tile, mostly past the end.
    (200, 136, 64, 1, {}, False),
    (1032, 1032, 128, 2, {}, False)], ids=["block_causal", "block_causal_skip_padded",
                                          "causal_d128", "cross_key_tail", "long_d128"])
def test_hopper_kernels_take_lengths_as_they_are(q_len, kv_len, head_dim, kv_heads, mask,
                                                 skip_padded, monkeypatch):
  """With `policy.HOPPER_UNPADDED` both Hopper kernels get the arrays at their lengths (checked by
  spies), reading the tiles past the end as zeros and writing nothing there: output, logsumexp
  and gradients match the reference."""
  if 12080 <= (hopper._cuda_runtime_version() or 0) < 12091:
    pytest.skip("the masked Hopper kernels refuse CUDA 12.8.0 – 12.9.0 (ptxas)")
  monkeypatch.setattr(hopper, "BACKWARD_MIN_Q_LEN", 0)
  monkeypatch.setattr(policy, "HOPPER_UNPADDED", True)
  monkeypatch.setattr(policy, "HOPPER_SKIP_PADDED_QUERIES", skip_padded)
  seen = _spy_on_hopper_kernels(monkeypatch, lambda name, a, kw: (name, a[0].shape[1],
                                                                  a[1].shape[1]))
  _check_attention("gpu", batch=2, q_len=q_len, kv_len=kv_len, heads=4, kv_heads=kv_heads,
                   head_dim=head_dim, dtype=jnp.bfloat16, blocks=flash.DEFAULT_BLOCK_SIZES["gpu"],
                   **mask)
  assert seen == [("forward", q_len, kv_len), ("backward", q_len, kv_len)]


@pytest.mark.skipif(jax.default_backend() != "gpu" or not policy.is_hopper(),
                    reason="the Mosaic GPU kernel runs on an sm_90 GPU only")
@pytest.mark.parametrize("q_len,head_dim,mask", [(384, 128, {}), (384, 64, {}),
                                                 (640, 128, dict(causal=True))])
def test_hopper_backward_with_descriptors_in_loop_matches_reference(q_len, head_dim, mask,
                                                                   monkeypatch):
  """With `DESCRIPTORS_IN_LOOP_HEAD_DIMS` naming the head dim (the resident tiles addressed anew
  each step) the gradients match the reference within bf16's tolerance."""
  if mask and 12080 <= (hopper._cuda_runtime_version() or 0) < 12091:
    pytest.skip("the masked Hopper kernels refuse CUDA 12.8.0 – 12.9.0 (ptxas)")
  monkeypatch.setattr(hopper, "BACKWARD_MIN_Q_LEN", 0)
  monkeypatch.setattr(hopper, "DESCRIPTORS_IN_LOOP_HEAD_DIMS", (head_dim,))
  calls = _spy_on_hopper_kernels(monkeypatch)
  _check_attention("gpu", batch=2, q_len=q_len, kv_len=q_len, heads=4, kv_heads=2,
                   head_dim=head_dim, dtype=jnp.bfloat16, blocks=flash.DEFAULT_BLOCK_SIZES["gpu"],
                   **mask)
  assert "backward" in calls


@pytest.mark.skipif(jax.default_backend() != "gpu" or not policy.is_hopper(),
                    reason="the Mosaic GPU kernel runs on an sm_90 GPU only")
def test_hopper_forward_gives_skipped_padding_rows_zero_output():
  """A warpgroup of padding rows alone (`PrefixMask.q_valid`) walks no key tile: its rows come
  out 0 with lse -inf, not NaN, and every row before it is bitwise what it is without q_valid."""
  if 12080 <= (hopper._cuda_runtime_version() or 0) < 12091:
    pytest.skip("the masked Hopper kernels refuse CUDA 12.8.0 – 12.9.0 (ptxas)")
  q, k, v = (jax.random.normal(key, (2, 384, 4, 64), jnp.bfloat16)
             for key in jax.random.split(jax.random.key(0), 3))
  mask = hopper.PrefixMask(causal=True, kv_valid=300)
  out, lse = hopper.forward(q, k, v, scale=0.125, mask=mask)
  skipped_out, skipped_lse = hopper.forward(q, k, v, scale=0.125,
                                            mask=dataclasses.replace(mask, q_valid=300))
  walked = 320  # Rows 320… are a warpgroup of padding alone.
  np.testing.assert_array_equal(np.asarray(skipped_out[:, :walked]), np.asarray(out[:, :walked]))
  np.testing.assert_array_equal(np.asarray(skipped_lse[:, :, :walked]),
                                np.asarray(lse[:, :, :walked]))
  assert (np.asarray(skipped_out[:, walked:]) == 0).all()
  assert np.isneginf(np.asarray(skipped_lse[:, :, walked:])).all()


def test_var_block_ids_lengths():
  assert len(masks.var_block_ids((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))) == 680
  assert len(masks.var_block_ids((1, 2, 3, 4, 6, 9, 13, 18, 24, 32))) == 2240


def test_dispatcher_pallas_matches_xla_with_id_masks():
  q, k, v, _ = _qkv(1, 55, 55, 2, 1, 32, jnp.float32)
  mask = dict(block_ids=VAR_IDS, segment_ids=np.repeat([0, 1], [30, 25]), is_causal=True)
  run = jax.jit(lambda impl: kernels.dot_product_attention(q, k, v, impl=impl, **mask),
                static_argnums=0)
  _assert_close(run("pallas"), run("xla"), TOLERANCE[jnp.float32], "pallas vs xla")


@pytest.mark.parametrize("causal", [False, True])
def test_dispatcher_gives_rows_that_see_no_key_zero_on_every_impl(causal):
  """Cross-attention whose last query segment has no key, alone or with a causal mask: those rows
  are 0 and pass no gradient on XLA too (jax's own gives them mean(v)), as in the kernels and the
  reference; the other rows are untouched."""
  q, k, v, do = _qkv(2, 6, 5, 2, 1, 16, jnp.float32)
  mask = dict(segment_ids=(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 1, 1])),
              is_causal=causal)
  grads = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * do), (0, 1, 2))(q, k, v)
  ref = lambda q, k, v: reference.attention(
      q, k, v, causal=causal, segment_ids=mask["segment_ids"])[0]
  want, want_grads = ref(q, k, v), grads(ref)
  assert not np.asarray(want[:, 4:]).any() and np.asarray(want[:, :4]).all()
  for impl in ("xla", "pallas"):
    attend = lambda q, k, v: kernels.dot_product_attention(q, k, v, impl=impl, **mask)
    _assert_close(attend(q, k, v), want, TOLERANCE[jnp.float32], impl)
    for got, expected, name in zip(grads(attend), want_grads, "qkv"):
      _assert_close(got, expected, TOLERANCE[jnp.float32], f"{impl} d{name}")


def test_ids_as_lists_are_arrays_and_only_a_tuple_is_a_pair():
  """A nested list of per-example ids is the [B, L] array (not a (q, kv) pair), a flat list one
  sequence's ids; concrete one-sequence block ids of any kind are static (`masks.static_ids`)."""
  q, k, v, _ = _qkv(2, 3, 3, 2, 1, 16, jnp.float32)
  for kind, ids in (("segment_ids", [[0, 0, 1], [0, 1, 1]]), ("block_ids", [0, 1, 1])):
    want = kernels.dot_product_attention(q, k, v, impl="xla", **{kind: np.array(ids)})
    for impl in ("xla", "pallas"):
      _assert_close(kernels.dot_product_attention(q, k, v, impl=impl, **{kind: ids}), want,
                    TOLERANCE[jnp.float32], f"{kind} as a list, {impl}")
  with pytest.raises(ConfigError, match="pair"):
    masks.make_ids(2, 3, 3, segment_ids=(np.zeros(3), np.zeros(3), np.zeros(3)))
  for ids in (VAR_IDS, list(VAR_IDS), jnp.asarray(VAR_IDS), VAR_IDS[None]):
    np.testing.assert_array_equal(masks.static_ids(ids), VAR_IDS)
  # Read as int32, as every impl reads them: 0.5 is block 0 here too.
  assert masks.static_ids([0, 0.5, 0.5, 1]).tolist() == [0, 0, 0, 1]
  for ids in ((VAR_IDS, VAR_IDS), np.stack([VAR_IDS, VAR_IDS]), None):
    assert masks.static_ids(ids) is None
  seen = []
  jax.jit(lambda ids: seen.append(masks.static_ids(ids)))(VAR_IDS)  # Traced.
  assert seen == [None]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU default path")
def test_dispatcher_default_path_is_unchanged_on_cpu():
  q, k, v, _ = _qkv(1, 20, 20, 2, 2, 16, jnp.float32)
  expected = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
  ours = jax.jit(lambda q, k, v: kernels.dot_product_attention(q, k, v, is_causal=True))
  np.testing.assert_array_equal(ours(q, k, v), expected(q, k, v))
  assert kernels.attention_impl("auto", jnp.float32) == "xla"
  assert kernels.quantize_impl("auto") == "xla"


def test_recorded_attention_lists_what_each_traced_call_runs_as():
  q, k, v, _ = _qkv(1, 55, 55, 2, 1, 16, jnp.bfloat16)
  with kernels.recorded_attention() as calls:
    jax.eval_shape(lambda q, k, v: kernels.dot_product_attention(q, k, v, is_causal=True), q, k, v)
    jax.eval_shape(lambda q: flash.flash_attention(q, q, q), q)  # Direct: not recorded.
    jax.eval_shape(lambda q, k, v: kernels.dot_product_attention(
        q, k, v, block_ids=VAR_IDS, impl="pallas"), q, k, v)
  kernels.dot_product_attention(q, k, v)  # Outside: not recorded.
  common = {"q_len": 55, "kv_len": 55, "head_dim": 16, "dtype": "bfloat16"}
  auto = attention.resolve_impl("auto", jnp.bfloat16, q_len=55, head_dim=16, mask="causal")
  assert auto == {"cpu": "xla", "gpu": "cudnn"}.get(jax.default_backend(), auto)
  # With the fields FLOP counts read: batch, heads and the pairs each mask lets attend.
  flop = {"batch": 1, "heads": 2}
  assert calls == [{"impl": auto, "mask": "causal", **common, **flop,
                    "visible_pairs": 55 * 56 // 2},
                   {"impl": "pallas_gpu", "mask": "block_causal", **common, **flop,
                    "visible_pairs": masks.visible_pairs(55, 55, block_ids=VAR_IDS),
                    "kernel": "triton", "hopper_mask": False}]


def test_visible_pairs_count_what_the_dense_masks_show():
  """Against the dense masks the XLA path builds: causal (also with L ≠ S, jax's top-left
  alignment), block-causal of VAR's static ids; None where tracing cannot know them."""
  for q_len, kv_len in ((7, 7), (5, 9), (9, 5)):
    dense = masks.dense_mask(masks.MaskIds(), q_len, kv_len, causal=True)
    assert masks.visible_pairs(q_len, kv_len, causal=True) == int(dense.sum())
    assert int(dense.sum()) == int(jnp.tril(jnp.ones((q_len, kv_len))).sum())
    assert masks.visible_pairs(q_len, kv_len) == q_len * kv_len
  ids = masks.make_ids(1, 55, 55, block_ids=VAR_IDS)
  dense = masks.dense_mask(ids, 55, 55, causal=False)
  assert masks.visible_pairs(55, 55, block_ids=VAR_IDS) == int(dense.sum()) < 55 * 55
  assert masks.visible_pairs(55, 55, causal=True, block_ids=VAR_IDS) is None
  assert jax.jit(lambda ids: jnp.zeros(()) if masks.visible_pairs(
      55, 55, block_ids=ids) is None else jnp.ones(()))(jnp.asarray(VAR_IDS)) == 0  # Traced.


def test_resolve_impl_policy(monkeypatch):
  resolve, bf16 = attention.resolve_impl, jnp.bfloat16
  assert resolve("pallas", backend="cpu") == "pallas_gpu"
  assert resolve("pallas", backend="tpu") == "pallas_tpu"
  # GPU (hardware-validated): cuDNN where the benchmark found it ahead, dense and causal masks in
  # half precision; ours for the id masks and where cuDNN does not apply.
  assert resolve("auto", bf16, q_len=8192, head_dim=128, backend="gpu") == "cudnn"
  assert resolve("auto", bf16, q_len=8192, head_dim=128, mask="causal", backend="gpu") == "cudnn"
  assert resolve("auto", bf16, q_len=680, head_dim=64, mask="block_causal",
                 backend="gpu") == "pallas_gpu"
  assert resolve("auto", bf16, q_len=512, head_dim=64, mask="segment",
                 backend="gpu") == "pallas_gpu"
  assert resolve("auto", jnp.float32, q_len=4096, head_dim=64, backend="gpu") == "pallas_gpu"
  assert resolve("auto", jnp.float32, q_len=256, head_dim=64, backend="gpu") == "xla"
  assert resolve("auto", bf16, q_len=8192, head_dim=82, backend="gpu") == "pallas_gpu"  # 8 ∤ 82.
  assert resolve("auto", bf16, q_len=256, head_dim=82, backend="gpu") == "xla"
  assert resolve("auto", bf16, q_len=8192, mask="dense", backend="gpu") == "cudnn"
  # On a Hopper GPU our kernels take short unmasked and causal sequences in whole 128-token
  # tiles, head dim 64 or 128 (where they beat cuDNN); cuDNN keeps the rest.
  monkeypatch.setattr(hopper, "_cuda_runtime_version", lambda: None)  # Not one masks refuse.
  hopper_gpu = lambda **kw: resolve("auto", bf16, backend="gpu", hopper=True, **kw)
  assert hopper_gpu(q_len=256, head_dim=64) == "pallas_gpu"
  assert hopper_gpu(q_len=policy.HOPPER_AHEAD_MAX_LEN["none"], head_dim=128) == "pallas_gpu"
  assert hopper_gpu(q_len=2048, head_dim=128) == "cudnn"
  assert hopper_gpu(q_len=256, kv_len=384, head_dim=64) == "pallas_gpu"
  assert hopper_gpu(q_len=4096, head_dim=128) == "cudnn"
  assert hopper_gpu(q_len=288, head_dim=64) == "cudnn"  # Padded keys are masked.
  assert hopper_gpu(q_len=256, kv_len=200, head_dim=64) == "cudnn"
  assert hopper_gpu(q_len=256, head_dim=96) == "cudnn"
  causal = lambda **kw: hopper_gpu(mask="causal", **kw)
  assert causal(q_len=256, head_dim=64) == "pallas_gpu"
  assert causal(q_len=policy.HOPPER_AHEAD_MAX_LEN["causal"], head_dim=128) == "pallas_gpu"
  assert causal(q_len=4096, head_dim=64) == "cudnn"
  assert causal(q_len=300, head_dim=64) == "cudnn"  # Not whole tiles: padded, not measured.
  assert causal(q_len=256, kv_len=512, head_dim=64) == "cudnn"  # Not self-attention.
  assert hopper_gpu(q_len=256, head_dim=64, mask="segment") == "pallas_gpu"  # Ours, on Triton.
  monkeypatch.setattr(policy, "HOPPER_PREFIX_MASKS", False)
  assert causal(q_len=256, head_dim=64) == "cudnn"  # Causal would run on Triton.
  monkeypatch.setattr(policy, "HOPPER_PREFIX_MASKS", True)
  assert resolve("auto", bf16, q_len=256, head_dim=64, backend="gpu", hopper=False) == "cudnn"
  assert resolve("auto", bf16, q_len=256, head_dim=64, backend="gpu") == (
      "pallas_gpu" if policy.is_hopper() else "cudnn")
  assert resolve("auto", q_len=1024, backend="cpu") == "xla"
  # TPU is not validated yet: XLA; once it is, its kernel.
  assert resolve("auto", q_len=8192, backend="tpu") == "xla"
  monkeypatch.setattr(policy, "HARDWARE_VALIDATED", frozenset({"tpu"}))
  assert resolve("auto", q_len=1024, backend="tpu") == "pallas_tpu"
  # A backend that is not validated keeps the vendor / XLA path for every mask.
  var = dict(q_len=680, head_dim=64, mask="block_causal", backend="gpu")
  assert resolve("auto", bf16, **var) == "cudnn"
  assert resolve("auto", jnp.float32, q_len=4096, head_dim=64, backend="gpu") == "xla"
  monkeypatch.setattr(policy, "HARDWARE_VALIDATED", frozenset({"gpu"}))
  assert quantize.resolve_impl("auto", backend="gpu") == "pallas"
  assert quantize.resolve_impl("auto", backend="cpu") == "xla"
  with pytest.raises(ConfigError, match="unknown"):
    resolve("flash")


SHARDED_KERNELS = """
import json
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from vitok_jax import kernels
from vitok_jax.kernels import bsq_pallas, flash_attention as flash, masks, vq_pallas
from vitok_jax.parallel import mesh as mesh_lib, sharding
cfg = mesh_lib.default_config()
cfg.update(dict(data=2, fsdp=2, tensor=2))
mesh = mesh_lib.make_mesh(cfg, jax.devices())
keys = jax.random.split(jax.random.key(0), 3)
shapes = ((4, 55, 4, 16), (4, 55, 2, 16), (4, 55, 2, 16))  # Grouped-query heads.
q, k, v = (jax.device_put(jax.random.normal(key, shape), NamedSharding(mesh, P(("data", "fsdp"))))
           for key, shape in zip(keys, shapes))
seen, kernel = [], flash.flash_attention
flash.flash_attention = lambda q, *a, **kw: seen.append(q.shape) or kernel(q, *a, **kw)
def step(impl):
  def loss(q, k, v):
    with sharding.rules(mesh):
      out = kernels.dot_product_attention(q, k, v, block_ids=masks.var_block_ids((1, 2, 3, 4, 5)),
                                          impl=impl)
    return (out ** 2).sum(), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
(_, out), grads = step("pallas")
(_, ref_out), ref_grads = step("xla")
result = {"shapes": seen, "out": float(jnp.abs(out - ref_out).max()),
          "grads": [float(jnp.abs(a - b).max()) for a, b in zip(grads, ref_grads)]}

# Quantisers: per shard of the batch; BSQ's entropies from the statistics of all shards.
z = jax.device_put(jax.random.normal(keys[0], (4, 37, 24)), NamedSharding(mesh, P(("data", "fsdp"))))
codebook = jax.random.normal(keys[1], (300, 24))
bsq_seen, vq_seen, bsq_sums, vq_kernel = [], [], bsq_pallas.bsq_sums, vq_pallas.vq_nearest
bsq_pallas.bsq_sums = lambda z, **kw: bsq_seen.append(z.shape) or bsq_sums(z, **kw)
vq_pallas.vq_nearest = lambda z, *a, **kw: vq_seen.append(z.shape) or vq_kernel(z, *a, **kw)
def quantise(impl):
  def loss(z):
    with sharding.rules(mesh):
      out = kernels.bsq(z, impl=impl)
      index, dist = kernels.vq_nearest(z, codebook, impl=impl)
    return (out.quantized.sum() * 0.1 + out.token_entropy - out.codebook_entropy), (out, index, dist)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(z)
(_, (out, index, dist)), grad = quantise("pallas")
(_, (ref, ref_index, ref_dist)), ref_grad = quantise("xla")
result.update(bsq_shapes=bsq_seen, vq_shapes=vq_seen,
              codes_equal=bool((out.codes == ref.codes).all()),
              bsq=max(float(jnp.abs(getattr(out, f) - getattr(ref, f)).max())
                      for f in ("quantized", "bit_prob", "token_entropy", "codebook_entropy",
                                "bit_usage")),
              bsq_grad=float(jnp.abs(grad - ref_grad).max()),
              index_equal=bool((index == ref_index).all()), dist=float(jnp.abs(dist - ref_dist).max()))
# A batch of 2 that data (2) divides but data x fsdp (4) does not: split over data alone.
bsq_seen.clear()
z2 = jax.device_put(jax.random.normal(keys[2], (2, 37, 24)), NamedSharding(mesh, P()))
def bsq2(impl):
  def fn(z):
    with sharding.rules(mesh):
      return kernels.bsq(z, impl=impl)
  return jax.jit(fn)(z2)
out2, ref2 = bsq2("pallas"), bsq2("xla")
result.update(bsq2_shapes=bsq_seen, bsq2=max(
    float(jnp.abs(getattr(out2, f) - getattr(ref2, f)).max()) for f in ("quantized", "bit_prob",
                                                                      "codebook_entropy")))
# Inputs left unplaced (on one device): the kernels' shard_map places them over the mesh, as XLA
# attention does (it failed to compile, a shard_map over the abstract mesh alone).
seen.clear()
q1 = jax.random.normal(keys[0], shapes[0])
def unplaced(impl):
  def fn(q):
    with sharding.rules(mesh):
      return kernels.dot_product_attention(q, q, q, is_causal=True, impl=impl)
  return jax.jit(fn)(q1)
result.update(unplaced_shapes=seen,
              unplaced=float(jnp.abs(unplaced("pallas") - unplaced("xla")).max()))
print(json.dumps(result))
"""


def test_pallas_kernels_run_per_shard_under_a_mesh():
  """On 8 devices (data 2 × fsdp 2 × tensor 2) each kernel sees its shard (attention: batch 4/4,
  heads 4/2; BSQ and VQ: batch 4/4) and outputs and gradients equal XLA's on the whole arrays:
  BSQ's codebook entropy is a function of the mean over all tokens, not of one shard's. A batch
  that only the first batch axis divides is split over that one (it was run whole everywhere);
  inputs left on one device are split too."""
  pytest.importorskip("ml_collections")  # The mesh config (absent where only jax is installed).
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
         + " --xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, "-c", SHARDED_KERNELS], env=env, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["shapes"] == [[1, 55, 2, 16]]
  assert result["out"] < 1e-5 and max(result["grads"]) < 1e-4
  assert result["bsq_shapes"] == [[1, 37, 24]] and result["vq_shapes"] == [[1, 37, 24]]
  assert result["codes_equal"] and result["index_equal"]
  assert result["bsq"] < 1e-5 and result["bsq_grad"] < 1e-5 and result["dist"] < 1e-5
  assert result["bsq2_shapes"] == [[1, 37, 24]] and result["bsq2"] < 1e-5
  assert result["unplaced_shapes"] == [[1, 55, 2, 16]] and result["unplaced"] < 1e-5


def test_pallas_rejects_a_dense_mask():
  q, k, v, _ = _qkv(1, 16, 16, 1, 1, 16, jnp.float32)
  with pytest.raises(ConfigError, match="mask_BHLS"):
    kernels.dot_product_attention(q, k, v, mask_BHLS=jnp.ones((16, 16), bool), impl="pallas")
  for impl in ("xla", "pallas"):  # Mixed dtypes: one clear error on every impl.
    with pytest.raises(ConfigError, match="bfloat16, float32, float32; cast them to one"):
      kernels.dot_product_attention(q.astype(jnp.bfloat16), k, v, impl=impl)


@pytest.mark.parametrize("impl", ["auto", "xla", "pallas"])
def test_inputs_no_impl_takes_are_one_config_error_on_every_impl(impl):
  """Shapes that do not pair up, integer or empty arrays and a non-boolean mask raise the same
  ConfigError on every impl (XLA gave its own ValueError, naming the wrong array, took int32 and
  computed in integers), before the call is written to the run record; a traced scale on the
  Pallas kernels says what to do."""
  q, k, v, _ = _qkv(2, 7, 7, 2, 2, 16, jnp.float32)
  cases = [((q, k[..., :8], v[..., :8]), "k and v of shape \\[2, S, kv_heads, 16\\]"),
           ((q, k[:1], v[:1]), "k and v of shape"),
           ((q[:, :, :1].repeat(3, 2), k, v), "kv_heads=2 must divide heads=3"),
           ((q[0], k[0], v[0]), "takes q \\[B, L, H, D\\]"),
           ((q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32)), "floating-point"),
           ((q, k[:, :0], v[:, :0]), "empty axis")]
  with kernels.recorded_attention() as calls:
    for args, says in cases:
      with pytest.raises(ConfigError, match=says):
        kernels.dot_product_attention(*args, impl=impl)
    if impl != "pallas":
      with pytest.raises(ConfigError, match="must be boolean"):
        kernels.dot_product_attention(q, k, v, mask_BHLS=jnp.ones((7, 7), jnp.int32), impl=impl)
  assert calls == []
  if impl == "pallas":
    with pytest.raises(ConfigError, match="scale as a Python number"):
      jax.jit(lambda s: kernels.dot_product_attention(q, k, v, scale=s, impl=impl))(0.3)


def test_block_sizes_are_checked():
  q, _, _, _ = _qkv(1, 64, 64, 1, 1, 16, jnp.float32)
  with pytest.raises(ConfigError, match="no separate dQ tiles"):
    flash.flash_attention(q, q, q, backend="tpu", block_sizes=flash.BlockSizes(
        block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=32, block_q_dq=64))
  with pytest.raises(ConfigError, match="powers of two.*block_k_dq"):
    flash.fit_block_sizes(flash.BlockSizes(64, 64, 32, 32, block_k_dq=48), 256, 256, 16)
  # Tiles shrink to short inputs; lengths pad to the largest tile of each side.
  blocks = flash.fit_block_sizes(flash.BlockSizes(64, 32, 16, 128, block_q_dq=128), 50, 300, 16)
  assert (blocks.block_q, blocks.block_q_dq, blocks.block_k_bwd) == (64, 64, 128)
  assert flash.padded_lengths(blocks, 50, 300) == (64, 384)


def _check_bsq(shape, dtype=jnp.float32, inv_temperature=100.0, integer_pack=None, steps=1,
               prefetch=0):
  z = jax.random.normal(jax.random.key(1), shape, dtype)
  z = z.reshape(-1, shape[-1]).at[0, 3].set(0.0).reshape(shape)  # sign(0) → bit 0.
  weights = jax.random.normal(jax.random.key(2), shape)

  def stats_and_grad(fn):
    def loss(z):
      out = fn(z)
      return ((out.quantized * weights).sum() + out.token_entropy - 0.5 * out.codebook_entropy
              + out.bit_prob[0]), out
    (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(z)
    return out, grad

  out, grad = stats_and_grad(lambda z: bsq_pallas.bsq(z, inv_temperature=inv_temperature,
                                                      block_tokens=16, steps=steps,
                                                      prefetch=prefetch,
                                                      integer_pack=integer_pack))
  ref, ref_grad = stats_and_grad(lambda z: reference.bsq(z, inv_temperature=inv_temperature))
  np.testing.assert_array_equal(out.codes, ref.codes)
  assert out.codes.dtype == jnp.uint32 and out.quantized.dtype == dtype
  for name in ("quantized", "bit_prob", "token_entropy", "codebook_entropy", "bit_usage"):
    _assert_close(getattr(out, name), getattr(ref, name), 1e-5, name)
  _assert_close(grad, ref_grad, 1e-4 if dtype == jnp.float32 else 2e-2, "grad")


# One word; two words, ragged tail; 32 bits (the first in the int32 sign bit) in whole tiles,
# where the kernel masks no padding.
@pytest.mark.parametrize("shape", [(3, 37, 16), (50, 40), (2, 32, 32)])
@pytest.mark.parametrize("integer_pack", [True, False], ids=["int_pack", "float_pack"])
def test_bsq_kernel_matches_reference(shape, integer_pack):
  _check_bsq(shape, integer_pack=integer_pack)


@pytest.mark.parametrize("shape", [(3, 37, 16), (2, 32, 32)])  # Ragged last program; whole ones.
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_bsq_kernel_walking_several_tiles_per_program(shape, prefetch):
  """Programs of 3 tiles of 16 tokens: statistics accumulated across the loop, each tile's math on
  that tile whether it was loaded in its step or `prefetch` steps before."""
  _check_bsq(shape, steps=3, prefetch=prefetch)


def test_bsq_gpu_launch_follows_the_input_size(monkeypatch):
  """On GPU inputs of LARGE_TOKENS or more take the large launch; all load two tiles ahead."""
  seen = []

  def launch_only(z, inv_temperature, launch):
    seen.append(dict(launch))
    return z, jnp.zeros((z.shape[0], 1), jnp.uint32), *(jnp.zeros(z.shape[1]),) * 3
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(bsq_pallas, "_bsq", launch_only)
  for tokens in (bsq_pallas.LARGE_TOKENS // 2, bsq_pallas.LARGE_TOKENS):
    jax.eval_shape(lambda z: bsq_pallas.bsq_sums(z, interpret=False),
                   jax.ShapeDtypeStruct((tokens // 4, 4, 32), jnp.bfloat16))
  assert [(s["block_tokens"], s["steps"], s["num_warps"]) for s in seen] == [
      bsq_pallas.DEFAULT_LAUNCH["gpu"], bsq_pallas.DEFAULT_LAUNCH["gpu_large"]]
  assert all(s["prefetch"] == 2 and s["triton"] for s in seen)


def test_bsq_fast_math_only_on_triton():
  """PTX approximations exist only on GPU: asking for them elsewhere is an early, clear error;
  so is a pipelining depth below 1."""
  with pytest.raises(ValueError, match="fast_math"):
    bsq_pallas.bsq(jnp.ones((4, 8)), interpret=True, fast_math=True)
  with pytest.raises(ValueError, match="num_stages=0"):
    bsq_pallas.bsq(jnp.ones((4, 8)), interpret=True, num_stages=0)
  with pytest.raises(ValueError, match="prefetch=-1"):
    bsq_pallas.bsq(jnp.ones((4, 8)), interpret=True, prefetch=-1)


def test_bsq_codes_pack_bit0_most_significant():
  z = jnp.array([[1.0, -1.0, -1.0, 1.0], [-1.0, 0.0, 1.0, 1.0]])
  np.testing.assert_array_equal(bsq_pallas.bsq(z).codes[:, 0], [0b1001, 0b0011])
  np.testing.assert_array_equal(jax.jit(reference.bsq)(z).codes[:, 0], [0b1001, 0b0011])


@pytest.mark.slow
@pytest.mark.parametrize("shape,dtype", [((4, 100, 32), jnp.float32), ((300, 64), jnp.bfloat16),
                                         ((77, 18), jnp.float32)])
def test_bsq_kernel_wide(shape, dtype):
  _check_bsq(shape, dtype, inv_temperature=10.0)


def _check_vq(num_tokens, num_codes, dim, normalize, block_codes=64, fma=None,
              sq_in_codebook=None):
  z = jax.random.normal(jax.random.key(1), (num_tokens, dim))
  codebook = jax.random.normal(jax.random.key(2), (num_codes, dim))
  # Exact ties: duplicated codes (first and last tile) and a token on one of them.
  codebook = codebook.at[5].set(codebook[3]).at[num_codes - 1].set(codebook[3])
  z = z.at[0].set(2.0 * codebook[3])
  index, dist = vq_pallas.vq_nearest(z, codebook, normalize=normalize, block_tokens=32,
                                     block_codes=block_codes, fma=fma,
                                     sq_in_codebook=sq_in_codebook)
  ref_index, ref_dist = jax.jit(reference.vq_nearest, static_argnames="normalize")(
      z, codebook, normalize=normalize)
  np.testing.assert_array_equal(index, ref_index)
  assert int(index[0]) == 3
  _assert_close(dist, ref_dist, 1e-5, "dist")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("fma", [True, False])  # Multiply-adds (small dims) or a tiled dot.
def test_vq_nearest_matches_reference(normalize, fma):
  _check_vq(100, 300, 8, normalize, fma=fma)


@pytest.mark.parametrize("sq_in_codebook", [True, False])
def test_vq_nearest_code_norms_in_the_dot_or_added(sq_in_codebook):
  # |e|² as one more coordinate of the dot (with padded codes' huge |e|² in it) or added per tile.
  _check_vq(100, 300, 8, False, sq_in_codebook=sq_in_codebook)
  with pytest.raises(ConfigError, match="tiled dot"):
    vq_pallas.vq_nearest(jnp.ones((4, 8)), jnp.ones((5, 8)), fma=True, sq_in_codebook=True)


def test_vq_code_norms_in_the_dot_keep_triton_tiles_powers_of_two():
  """Lowered for CUDA here: D + 1 coordinates pad to a power of two (Triton's tiles) at any D."""
  for dim, sq_in_codebook in ((8, None), (16, True), (32, True), (32, None)):
    nearest = functools.partial(vq_pallas._vq_nearest, normalize=True, block_tokens=128,
                                block_codes=64, num_warps=4, fma=False,
                                sq_in_codebook=sq_in_codebook, interpret=False, triton=True)
    jax.jit(nearest).trace(jnp.zeros((256, dim)), jnp.zeros((512, dim))).lower(
        lowering_platforms=("cuda",))


@pytest.mark.slow
def test_vq_nearest_llamagen_codebook():
  _check_vq(300, 16384, 8, True, block_codes=512)


def test_quantize_dispatcher():
  z = jax.random.normal(jax.random.key(0), (2, 8, 16))
  codebook = jax.random.normal(jax.random.key(1), (40, 16))
  vq_index = jax.jit(lambda impl: kernels.vq_nearest(z, codebook, impl=impl)[0],
                     static_argnums=0)
  np.testing.assert_array_equal(vq_index("pallas"), vq_index("xla"))
  codes = jax.jit(lambda impl: kernels.bsq(z, impl=impl).codes, static_argnums=0)
  np.testing.assert_array_equal(codes("pallas"), codes("auto"))
  with pytest.raises(ConfigError, match="cuDNN"):
    kernels.bsq(z, impl="cudnn")
  for impl in ("xla", "pallas"):  # An empty batch: one clear error (the kernels crashed).
    with pytest.raises(ConfigError, match=r"shape \(0, 8, 16\): no tokens"):
      kernels.bsq(z[:0], impl=impl)
    with pytest.raises(ConfigError, match="vq_nearest.*no tokens"):
      kernels.vq_nearest(z[:0], codebook, impl=impl)
