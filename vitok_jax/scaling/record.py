"""record.json: everything a sweep needs about one run, measured rather than asserted."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from vitok_jax import config_lib, kernels
from vitok_jax.kernels import recording
from vitok_jax.models import vit
from vitok_jax.scaling import flops


def tokenizer_record(config: ml_collections.ConfigDict, model, params, pixel_shape,
                     *, wall_time: float, metrics: dict, workdir: str,
                     examples_per_sec: float | None = None,
                     train_examples: int | None = None) -> dict:
  """Run record of a tokenizer: sizes, E = tokens × c, FLOPs (analytic and XLA), timing, the size
  of its train split, metrics.

  `params` may be abstract (jax.ShapeDtypeStruct leaves): only shapes are read.
  """
  forward = flops.tokenizer_forward_flops(model, pixel_shape)
  example = jax.ShapeDtypeStruct((1, *pixel_shape), jnp.float32)
  apply = lambda m: lambda p, x: m.apply({"params": p}, x, sample=False)
  with kernels.recorded_attention() as attention_calls:  # Each call as traced here.
    jax.eval_shape(apply(model), params, example)
  # Counted with XLA attention: a cuDNN or Pallas attention is a custom call XLA counts as 0.
  xla_forward = flops.xla_flops(apply(model.clone(attn_impl="xla")), params, example)
  tokens = flops.tokens_per_example(model, pixel_shape)
  return {
      "workdir": os.path.abspath(workdir),
      "variant": config.get("variant", ""),
      "config": config.to_dict(),
      "params": {
          "encoder": vit.param_count(params["encoder"]) + vit.param_count(params["patch_embed"]),
          "decoder": vit.param_count(params["decoder"]) + vit.param_count(params["latent_embed"])
                     + vit.param_count(params["to_pixels"]),
          "bottleneck": vit.param_count(params["bottleneck"]),
          "total": vit.param_count(params),
      },
      "attention_impl": distinct_calls(attention_calls),
      "quantizer_impl": quantizer_impl(model),
      "tokens_per_example": tokens,
      "train_examples": train_examples,
      "c": model.latent_channels,
      "E": tokens * model.latent_channels,
      "code_bits": flops.code_bits_per_example(model, pixel_shape),  # None when continuous.
      "flops_per_example": {
          "forward": forward["total"],
          "forward_parts": forward,
          "train": flops.train_flops_per_example(model, pixel_shape),
          "forward_xla": xla_forward,
          "analytic_over_xla": forward["total"] / xla_forward if xla_forward else None,
      },
      **run_fields(config, wall_time=wall_time, examples_per_sec=examples_per_sec,
                   metrics=metrics),
  }


def run_fields(config, *, wall_time: float, examples_per_sec: float | None, metrics: dict) -> dict:
  """The fields every run record has: steps, examples seen, timing, devices and metrics."""
  return {
      "steps": config.total_steps,
      "examples_seen": config.total_steps * config.batch_size,
      "wall_time_s": wall_time,
      "examples_per_sec": examples_per_sec,
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "metrics": metrics,
  }


def distinct_calls(calls: list[dict]) -> list[dict]:
  """The distinct entries of a `kernels.recorded_attention` list, in first-seen order, without
  the fields kept for FLOP counts (`recording.FLOP_FIELDS`)."""
  seen = {}
  for call in calls:
    call = {k: v for k, v in call.items() if k not in recording.FLOP_FIELDS}
    seen.setdefault(tuple(sorted(call.items())), call)
  return list(seen.values())


def quantizer_impl(model) -> str | None:
  """What the tokenizer's quantiser (impl="auto") runs as here; None for a continuous bottleneck."""
  if getattr(model, "bottleneck", "gaussian") == "gaussian":
    return None
  return kernels.quantize_impl("auto")


def write(record: dict, workdir: str) -> str:
  path = os.path.join(workdir, "record.json")
  config_lib.write_json(path, record)
  return path


def add_metrics(workdir: str, metrics: dict, fields: dict | None = None) -> None:
  """Merges `metrics` into workdir/record.json and sets its top-level `fields` (from process 0;
  nothing when there is no record)."""
  if jax.process_index() == 0 and os.path.exists(os.path.join(workdir, "record.json")):
    record = read(workdir)
    record["metrics"].update(metrics)
    record.update(fields or {})
    write(record, workdir)


def read(workdir: str) -> dict:
  with open(os.path.join(workdir, "record.json")) as f:
    return json.load(f)
