"""Codes as data: tokenize a dataset once with a trained tokenizer into an npz store.

  vitok tokenize --workdir runs/mnist_vq --out runs/mnist_vq/codes_eval.npz --split eval

The store holds `labels` [N] and what the tokenizer's bottleneck gives a generator:
  discrete single-scale (vq, bsq): `codes` [N, tokens(, words)];
  multi-scale (msvq(512), msbsq): `codes_0 … codes_{K−1}` per-scale maps [N, s, s(, words)];
  continuous (gaussian): `latents` [N, tokens, c], the posterior mean;
  msvq and msbsq also keep `latents`, the map before quantisation (Infinity's self-correction
  re-quantises it);
plus `grid`, `bottleneck` and the checkpoint `step`. `decode_codes` turns codes back into pixels.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np


from vitok_jax import config_lib, data
from vitok_jax.errors import DataError
from vitok_jax.models import bottlenecks, quantizers
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.train import checkpoint, train_tokenizer


def encode_fn(model):
  """(params, x) -> {"codes": array or per-scale tuple, "latents": [B, N, c]}, jitted (whichever
  the bottleneck has; see the module docstring)."""
  def encode(params, x):
    z_BNC, aux, _ = model.apply({"params": params}, x, method=model.encode)
    out = {"codes": aux["codes"]} if "codes" in aux else {"latents": z_BNC}
    if "latent" in aux:
      out["latents"] = aux["latent"]
    return out
  return jax.jit(encode)


def decode_fn(model, grid: Sequence[int]):
  """(params, codes) -> pixels; a multi-scale prefix of codes decodes too (coarser)."""
  def decode(module, codes):
    return module.decode(module.bottleneck_layer.decode_codes(codes, tuple(grid)), tuple(grid))
  return jax.jit(lambda params, codes: model.apply({"params": params}, codes, method=decode))


def tokenize(config, params, *, split: str = "eval", max_examples: int = 0,
             batch_size: int = 0) -> dict[str, np.ndarray]:
  """The store of a split (up to max_examples; 0 = all) as numpy arrays: codes and/or latents."""
  model = train_tokenizer.build_model(config)
  encode = encode_fn(model)
  batch_size = batch_size or config.batch_size
  # The whole split on this process (one pass, no augmentation): the store is written once.
  iterator = data.build_iterator(config.data, split=split, batch_size=batch_size, seed=config.seed,
                                 one_pass=True, process_index=0, process_count=1)
  codes, latents, labels, count = [], [], [], 0
  for batch in iterator:
    out = jax.device_get(encode(params, batch["image"]))
    if "codes" in out:
      codes.append(out["codes"] if isinstance(out["codes"], tuple) else (out["codes"],))
    if "latents" in out:
      latents.append(out["latents"])
    labels.append(batch["label"])
    count += len(batch["label"])
    if max_examples and count >= max_examples:
      break
  iterator.close()
  limit = max_examples or count
  store = {"labels": np.concatenate(labels)[:limit]}
  if latents:
    store["latents"] = np.concatenate(latents)[:limit].astype(np.float32)
  if codes:
    merged = [np.concatenate(scale)[:limit] for scale in zip(*codes)]
    if config.model.bottleneck in bottlenecks.MULTI_SCALE:
      store.update({f"codes_{k}": c for k, c in enumerate(merged)})
    else:
      store["codes"] = merged[0]
  return store


def load_codes(store) -> np.ndarray | tuple[np.ndarray, ...]:
  """The codes of an npz store: one array, or the tuple of per-scale maps."""
  if "codes" in store:
    return store["codes"]
  return tuple(store[f"codes_{k}"] for k in range(sum(n.startswith("codes_") for n in store)))


def codebook_stats(codes, codebook_size: int = 0, bits: int = 0) -> dict:
  """Run-level codebook health from stored codes: VQ usage/perplexity, or BSQ per-bit entropy."""
  flat = codes if not isinstance(codes, tuple) else None
  if bits:
    words = np.concatenate([c.reshape(-1, c.shape[-1]) for c in (codes if flat is None else (flat,))])
    usage_D = quantizers.unpack_bits(words, bits).mean(0)
    p = np.clip(usage_D, 1e-12, 1 - 1e-12)
    h_D = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return {"bit_entropy_min": float(h_D.min()), "bit_entropy_mean": float(h_D.mean()),
            "bit_p1": usage_D.round(3).tolist()}
  index = np.concatenate([c.reshape(-1) for c in (codes if flat is None else (flat,))])
  counts = np.bincount(index, minlength=codebook_size)
  p = counts[counts > 0] / counts.sum()
  return {"usage": float((counts > 0).mean()), "dead": int((counts == 0).sum()),
          "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def _whole_split_at(path: str, step: int) -> bool:
  """Whether the store at `path` holds its whole split tokenized at checkpoint `step` (not a
  `vitok tokenize --max_examples` part of it)."""
  with np.load(path) as store:
    partial = "max_examples" in store and int(store["max_examples"])
    return int(store["step"]) == step and not partial


def tokenize_workdir(workdir: str, out: str, *, split: str = "eval", max_examples: int = 0,
                     mesh=None) -> str:
  """Tokenizes a split with the latest checkpoint of `workdir` into the npz file `out` (the first
  `max_examples` examples, 0: all; a generator's own store is always the whole split), on `mesh`:
  by default this machine's devices, data-parallel (the mesh the tokenizer trained on, e.g. fsdp
  over 8 GPUs or two nodes, need not fit them)."""
  config = config_lib.read_config(workdir)
  config_lib.require_kind(config, workdir, "tokenizer")
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(mesh_lib.default_config())
  step, params, _ = train_tokenizer.restore_params(workdir, config, mesh)
  store = tokenize(config, params, split=split, max_examples=max_examples)
  grid = train_tokenizer.pixel_shape(config)[:-1]
  with config_lib.atomic_write(out, "wb") as f:  # Runs tokenizing one store never share a tmp.
    np.savez(f, **store, step=step, bottleneck=config.model.bottleneck,
             max_examples=max_examples,
             grid=np.array([s // p for s, p in zip(grid, config.model.patch)]))
  return out


def check_tokenizer_run(workdir: str) -> None:
  """DataError unless `workdir` holds a run's checkpoints/ (a tokenizer for a generator)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise DataError(f"{workdir} is not a tokenizer run (no checkpoints/); train one there first "
                    f"with the bottleneck the generator family reads (`vitok train --config "
                    f"vitok:VARIANT --workdir {workdir}`; generators.FAMILIES lists them)")


_WARNED_UNFINISHED = set()  # (tokenizer workdir, step): warned once per process.


def load_or_tokenize(workdir: str, split: str, mesh=None) -> dict[str, np.ndarray]:
  """The store of `split` cached as WORKDIR/store_SPLIT.npz, (re)made (on `mesh`, see
  `tokenize_workdir`) when missing or older than the tokenizer's latest checkpoint. A job of
  several processes reads it and cannot make it (tokenizing is a single-process job): a missing
  or stale store there is a DataError that gives the command making it."""
  path = os.path.join(workdir, f"store_{split}.npz")
  check_tokenizer_run(workdir)
  latest = checkpoint.latest_step(workdir)
  if not latest:  # None, or the initial state a run stopped during set-up saves.
    raise DataError(f"tokenizer {workdir} has no trained checkpoint; train it first with "
                    f"`vitok train --workdir {workdir}`")
  total = config_lib.read_config(workdir).total_steps
  if latest < total and (workdir, latest) not in _WARNED_UNFINISHED:
    _WARNED_UNFINISHED.add((workdir, latest))
    logging.warning("tokenizer %s is at step %d of its %d (unfinished): its codes are of step %d, "
                    "and once it trains on, a generator of these codes can no longer resume or "
                    "be evaluated", workdir, latest, total, latest)
  stale = not os.path.exists(path) or not _whole_split_at(path, latest)
  if stale and jax.process_count() > 1:
    raise DataError(
        f"the token store {path} is missing or older than the tokenizer's step {latest}, and a "
        f"job of {jax.process_count()} processes cannot make it; make it first on one process: "
        f"`vitok tokenize --workdir {workdir} --out {path} --split {split}`")
  if stale:
    logging.info("Tokenizing the %s split with %s into %s", split, workdir, path)
    tokenize_workdir(workdir, path, split=split, mesh=mesh)
  with np.load(path) as store:
    return dict(store)
