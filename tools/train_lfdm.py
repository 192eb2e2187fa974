r"""Trains a small LFDM (latent flow image-to-video) on bundled Moving MNIST: stage 1 then stage 2.

  PYTHONPATH=. python tools/train_lfdm.py --workdir runs/lfdm [--stage1_steps 600 --stage2_steps 600]

Stage 1 trains the latent flow auto-encoder (models/lfdm.LFAE) to rebuild every later frame of a
clip from frame 0 warped by a predicted 8×8 flow (32×32 frames). Stage 2 trains a FlowDiT (DiT +
rectified flow) on the stage-1 flows of the training clips, conditioned on frame 0's features and
the first digit's label, then samples flows for held-out first frames and warps them into clips.

Writes to --workdir: metrics.json, lfae.npz and flow_dit.npz (params, vitok_jax weights.save
format), samples.png (per clip: a real row and a generated row, frames left to right) and
samples.gif (the same, animated). Metrics, all on held-out clips, PSNR over [0, 1]:
  stage1.recon_psnr       driving frames rebuilt from frame 0 through the predicted flow;
  stage1.copy_first_psnr  the baseline that copies frame 0 to every later frame;
  stage2.gen_psnr / gen_l2  generated frames 1 … T−1 vs the real continuation (the motion of a
                          single frame is ambiguous, so this is not expected to approach stage 1);
  stage2.copy_first_*     the copy-frame-0 baseline on the same frames;
  stage2.motion_gen / motion_real  mean |frame_t − frame_0|, to show generated clips move.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from vitok_jax.data import video
from vitok_jax.models import lfdm
from vitok_jax.models import vit
from vitok_jax.models.perceptual import weights


def load_clips(split: str, num: int, res: int, frames: int, stride: int):
  """Moving MNIST clips as numpy: (float32 [N, T, res, res, 1] in [−1, 1], int32 labels [N])."""
  source = video.MovingMnist(split, num, res, frames, stride)
  items = [source[i] for i in range(num)]
  clips = np.stack([x["image"] for x in items]).astype(np.float32) / 127.5 - 1.0
  return clips, np.asarray([x["label"] for x in items], np.int32)


def _key(seed: int):
  """unsafe_rbg keys: much cheaper to compile on CPU than threefry; fine for init and noise."""
  return jax.random.key(seed, impl="unsafe_rbg")


def _psnr(mse: float) -> float:
  return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def _batches(rng: np.random.Generator, n: int, batch: int):
  while True:
    yield rng.choice(n, batch, replace=False)


def _optimizer(lr: float, steps: int):
  """Adam with global-norm clipping at 1 and warm-up + cosine decay (the LFAE diverges without)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 5), max(steps, 1), 0.1)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def train_stage1(args, clips):
  model = lfdm.LFAE(tuple(args.features), out_channels=1, num_res=args.num_res)
  variables = lfdm.init_lfae(model, _key(args.seed), clips.shape[2:])
  tx = _optimizer(args.lr, args.stage1_steps)
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state, clips_BTHWC):
    grad_fn = jax.value_and_grad(lambda v: lfdm.lfae_loss(model, v, clips_BTHWC, args.warp_weight),
                                 has_aux=True)
    (_, metrics), grads = grad_fn(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, metrics

  rng = np.random.default_rng(args.seed)
  batches = _batches(rng, len(clips), args.batch)
  history = []
  start = time.time()
  for i in range(args.stage1_steps):
    variables, opt_state, metrics = step(variables, opt_state, clips[next(batches)])
    if i % args.log_every == 0 or i == args.stage1_steps - 1:
      metrics = {k: float(v) for k, v in metrics.items()}
      history.append({"step": i, **metrics})
      print(f"stage1 step {i} loss {metrics['loss']:.4f} psnr {metrics['psnr']:.2f} "
            f"occ {metrics['occlusion']:.3f} ({time.time() - start:.0f}s)", flush=True)
  return model, variables, history


def eval_stage1(model, variables, clips):
  source, driving = lfdm.clip_pairs(jnp.asarray(clips))
  out = jax.jit(model.apply)(variables, source, driving)
  recon = float(jnp.mean(jnp.square(out["image"] - driving)))
  warped = float(jnp.mean(jnp.square(out["deformed"] - driving)))
  copy = float(jnp.mean(jnp.square(source - driving)))
  return {"recon_psnr": _psnr(recon), "recon_mse": recon, "copy_first_psnr": _psnr(copy),
          "copy_first_mse": copy, "pixel_warp_psnr": _psnr(warped),
          "mean_occlusion": float(jnp.mean(out["occlusion"]))}


def train_stage2(args, lfae, lfae_vars, clips, labels):
  encode = jax.jit(lambda c, s: lfdm.encode_clips(lfae, lfae_vars, c, s))
  flow_scale = lfdm.offset_scale(lfae, lfae_vars, jnp.asarray(clips[:64]))
  latents, conds = [], []
  for i in range(0, len(clips), 256):
    x, c = encode(jnp.asarray(clips[i:i + 256]), flow_scale)
    latents.append(np.asarray(x))
    conds.append(np.asarray(c))
  latents, conds = np.concatenate(latents), np.concatenate(conds)
  model = lfdm.FlowDiT(vit.decode_size(args.dit_size, "dit"), flow_channels=latents.shape[-1],
                       num_classes=10 if args.use_label else 0)
  variables = lfdm.init_flow_dit(model, _key(args.seed + 1), latents.shape[1:3],
                                 conds.shape[-1])
  tx = _optimizer(args.lr, args.stage2_steps)
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state, x1, cond, y, rng):
    grad_fn = jax.value_and_grad(lambda v: lfdm.flow_dit_loss(model, v, x1, cond, y, rng),
                                 has_aux=True)
    (_, metrics), grads = grad_fn(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, metrics

  rng = np.random.default_rng(args.seed + 1)
  batches = _batches(rng, len(latents), args.batch)
  key = _key(args.seed + 2)
  history = []
  start = time.time()
  for i in range(args.stage2_steps):
    idx = next(batches)
    y = labels[idx] if args.use_label else np.zeros_like(labels[idx])
    variables, opt_state, metrics = step(variables, opt_state, latents[idx], conds[idx], y,
                                         jax.random.fold_in(key, i))
    if i % args.log_every == 0 or i == args.stage2_steps - 1:
      metrics = {k: float(v) for k, v in metrics.items()}
      history.append({"step": i, **metrics})
      print(f"stage2 step {i} flow_loss {metrics['flow_loss']:.4f} ({time.time() - start:.0f}s)",
            flush=True)
  return model, variables, flow_scale, history


def eval_stage2(args, lfae, lfae_vars, flow_dit, dit_vars, flow_scale, clips, labels):
  y = labels if args.use_label else np.zeros_like(labels)
  gen_fn = jax.jit(lambda first, y, rng: lfdm.generate_video(
      lfae, lfae_vars, flow_dit, dit_vars, first, y, rng, flow_scale=flow_scale,
      num_steps=args.ode_steps, cfg_scale=args.cfg_scale))
  gen = np.asarray(gen_fn(jnp.asarray(clips[:, 0]), jnp.asarray(y), _key(args.seed + 3)))
  real_later, gen_later = clips[:, 1:], np.clip(gen[:, 1:], -1, 1)
  copy_later = np.broadcast_to(clips[:, :1], real_later.shape)
  gen_mse = float(np.mean(np.square(gen_later - real_later)))
  copy_mse = float(np.mean(np.square(copy_later - real_later)))
  metrics = {"gen_psnr": _psnr(gen_mse), "gen_l2": gen_mse, "copy_first_psnr": _psnr(copy_mse),
             "copy_first_l2": copy_mse,
             "motion_gen": float(np.mean(np.abs(gen_later - clips[:, :1]))),
             "motion_real": float(np.mean(np.abs(real_later - clips[:, :1]))),
             "flow_scale": flow_scale}
  return metrics, gen


def save_strips(path_png: str, path_gif: str, real, gen, num: int = 4, scale: int = 2):
  """Rows: real clip i, generated clip i, …; frames left to right. uint8 grayscale PNG and GIF."""
  to_u8 = lambda x: np.clip(np.rint((x[..., 0] + 1) * 127.5), 0, 255).astype(np.uint8)
  num = min(num, len(real))
  rows = []
  for i in range(num):
    rows += [np.concatenate(list(to_u8(real[i])), axis=1),
             np.concatenate(list(to_u8(gen[i])), axis=1)]
  img = Image.fromarray(np.concatenate(rows, axis=0))
  img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path_png)
  frames = []
  for t in range(real.shape[1]):
    panel = np.concatenate([np.concatenate([to_u8(real[i, t]), to_u8(gen[i, t])], axis=0)
                            for i in range(num)], axis=1)
    frame = Image.fromarray(panel)
    frames.append(frame.resize((frame.width * scale, frame.height * scale), Image.NEAREST))
  frames[0].save(path_gif, save_all=True, append_images=frames[1:], duration=200, loop=0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/lfdm")
  parser.add_argument("--stage1_steps", type=int, default=600)
  parser.add_argument("--stage2_steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=8, help="clips per step")
  parser.add_argument("--lr", type=float, default=3e-4)
  parser.add_argument("--res", type=int, default=32)
  parser.add_argument("--frames", type=int, default=4)
  parser.add_argument("--frame_stride", type=int, default=2)
  parser.add_argument("--train_clips", type=int, default=2048)
  parser.add_argument("--eval_clips", type=int, default=64)
  parser.add_argument("--features", type=int, nargs="+", default=[8, 16, 32],
                      help="LFAE widths per level; flow res = res / 2^(levels - 1)")
  parser.add_argument("--num_res", type=int, default=1)
  parser.add_argument("--warp_weight", type=float, default=1.0,
                      help="optional pixel-warp L1 term in stage 1 (not in LFDM)")
  parser.add_argument("--dit_size", default="Mu")
  parser.add_argument("--use_label", type=int, default=1)
  parser.add_argument("--ode_steps", type=int, default=16)
  parser.add_argument("--cfg_scale", type=float, default=1.0)
  parser.add_argument("--log_every", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  start = time.time()

  clips, labels = load_clips("train", args.train_clips, args.res, args.frames, args.frame_stride)
  eval_clips, eval_labels = load_clips("eval", args.eval_clips, args.res, args.frames,
                                       args.frame_stride)
  print(f"data: train {clips.shape}, eval {eval_clips.shape} ({time.time() - start:.0f}s)")

  lfae, lfae_vars, hist1 = train_stage1(args, clips)
  stage1 = eval_stage1(lfae, lfae_vars, eval_clips)
  print("stage1 eval", json.dumps(stage1))
  weights.save(os.path.join(args.workdir, "lfae.npz"), lfae_vars["params"])

  stage2, gen = {}, None
  hist2 = []
  if args.stage2_steps > 0:
    flow_dit, dit_vars, flow_scale, hist2 = train_stage2(args, lfae, lfae_vars, clips, labels)
    stage2, gen = eval_stage2(args, lfae, lfae_vars, flow_dit, dit_vars, flow_scale, eval_clips,
                              eval_labels)
    print("stage2 eval", json.dumps(stage2))
    weights.save(os.path.join(args.workdir, "flow_dit.npz"), dit_vars["params"])
    save_strips(os.path.join(args.workdir, "samples.png"),
                os.path.join(args.workdir, "samples.gif"), eval_clips, gen)

  result = {"args": vars(args), "stage1": stage1, "stage2": stage2,
            "stage1_history": hist1, "stage2_history": hist2,
            "lfae_params": vit.param_count(lfae_vars),
            "seconds": time.time() - start}
  with open(os.path.join(args.workdir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.workdir}/metrics.json ({result['seconds']:.0f}s)")
  return result


if __name__ == "__main__":
  main()
