"""Codes as data: tokenize a dataset once with a trained discrete tokenizer into an npz store.

  python -m vitok_jax.train.codes --workdir runs/mnist_vq --out runs/mnist_vq/codes_eval.npz

The store holds `codes` [N, tokens(, words)] (single-scale) or `codes_0 … codes_{K−1}` (per-scale
maps [N, s, s(, words)]), `labels` [N], `grid` and `bottleneck`. `decode_codes` turns codes back
into pixels with the same checkpoint.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import jax
import numpy as np

from vitok_jax import config_lib, data
from vitok_jax.models import quantizers
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.train import train_tokenizer


def encode_fn(model):
  """(params, x) -> codes (array or tuple of per-scale arrays), jitted."""
  return jax.jit(lambda params, x: model.apply({"params": params}, x, method=model.encode)[1]["codes"])


def decode_fn(model, grid: Sequence[int]):
  """(params, codes) -> pixels; a multi-scale prefix of codes decodes too (coarser)."""
  def decode(module, codes):
    return module.decode(module.bottleneck_layer.decode_codes(codes, tuple(grid)), tuple(grid))
  return jax.jit(lambda params, codes: model.apply({"params": params}, codes, method=decode))


def tokenize(config, params, *, split: str = "eval", max_examples: int = 0,
             batch_size: int = 0) -> dict[str, np.ndarray]:
  """Codes of every example of a split (up to max_examples; 0 = all), as numpy arrays."""
  model = train_tokenizer.build_model(config)
  encode = encode_fn(model)
  batch_size = batch_size or config.batch_size
  iterator = data.build_iterator(config.data, split=split, batch_size=batch_size, seed=config.seed)
  parts, labels, count = [], [], 0
  for batch in iterator:
    codes = jax.device_get(encode(params, batch["image"]))
    parts.append(codes if isinstance(codes, tuple) else (codes,))
    labels.append(batch["label"])
    count += len(batch["label"])
    if max_examples and count >= max_examples:
      break
  merged = [np.concatenate(scale) for scale in zip(*parts)]
  limit = max_examples or count
  store = {"labels": np.concatenate(labels)[:limit]}
  if len(merged) == 1 and config.model.bottleneck not in ("msvq", "msbsq"):
    store["codes"] = merged[0][:limit]
  else:
    store.update({f"codes_{k}": c[:limit] for k, c in enumerate(merged)})
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


def tokenize_workdir(workdir: str, out: str, *, split: str = "eval", max_examples: int = 0) -> str:
  """Tokenizes a split with the latest checkpoint of `workdir` into the npz file `out`."""
  config = config_lib.read_config(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  step, params, _ = train_tokenizer.restore_params(workdir, config, mesh)
  store = tokenize(config, params, split=split, max_examples=max_examples)
  grid = train_tokenizer.pixel_shape(config)[:-1]
  np.savez_compressed(out, **store, step=step, bottleneck=config.model.bottleneck,
                      grid=np.array([s // p for s, p in zip(grid, config.model.patch)]))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--split", default="eval")
  parser.add_argument("--max_examples", type=int, default=0)
  args = parser.parse_args(argv)
  print(tokenize_workdir(args.workdir, args.out, split=args.split, max_examples=args.max_examples))


if __name__ == "__main__":
  main()
