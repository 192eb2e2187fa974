"""Data: bundled real images/video, image/video folders and tfds, as checkpointable grain iterators.

  it = data.build_iterator(cfg, "train", batch_size=64, seed=0)
  batch = next(it)  # {"image": float32 [B, H, W, C] or [B, T, H, W, C] in [-1, 1],
                    #  "label": int32 [B]}
"""
from vitok_jax.data.config import (FOLDER_NAMES, IMAGE_NAMES, NAMES, PRESETS, default_config,
                                   single_folder, validate)
from vitok_jax.data.pipeline import build_dataset, build_iterator, held_out_images, num_examples
from vitok_jax.data.sources import make_source, scan_folder

__all__ = ["FOLDER_NAMES", "IMAGE_NAMES", "NAMES", "PRESETS", "build_dataset", "build_iterator",
           "default_config", "held_out_images", "make_source", "num_examples", "scan_folder",
           "single_folder", "validate"]
