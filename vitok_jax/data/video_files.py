"""Video files read with PyAV: their frame counts, and clips decoded from a seek."""
from __future__ import annotations

import numpy as np

from vitok_jax.errors import DataError


def count_frames(path: str) -> int:
  """Frames in the first video stream: container metadata, else a demux count (no decoding)."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as container:
    if not container.streams.video:
      raise DataError(f"{path}: no video stream")
    stream = container.streams.video[0]
    if stream.frames:
      return stream.frames
    return sum(1 for packet in container.demux(stream) if packet.size)


def decode_clip(path: str, start: int, frames: int, stride: int) -> np.ndarray:
  """Frames start, start + stride, ... of a video file, in display order -> uint8 [frames, H, W, 3].

  Seeks to the keyframe before `start` and decodes forward, indexing frames by their presentation
  time, so the cost is one GOP + the clip. AVI stores no presentation times: the ones FFmpeg
  gives its frames count packets in decode order, which with B-frames run ahead of the frame
  shown (the first is 1; H.264's go 1, 2, 3, 4, 6, 5, ...). An AVI is therefore decoded from its
  first frame and indexed by the decoder's output order.
  """
  import av  # pylint: disable=g-import-not-at-top
  out = []
  try:
    with av.open(path) as container:
      stream = container.streams.video[0]
      rate, tb = stream.average_rate, stream.time_base
      by_time = bool(rate and tb) and "avi" not in container.format.name.split(",")
      t0 = stream.start_time or 0
      if start and by_time:
        container.seek(t0 + int(start / (rate * tb)), stream=stream, backward=True)
      for i, frame in enumerate(container.decode(stream)):
        idx = round(float((frame.pts - t0) * tb * rate)) if by_time and frame.pts is not None else i
        if idx >= start and (idx - start) % stride == 0:
          out.append(frame.to_ndarray(format="rgb24"))
          if len(out) == frames:
            break
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{path}: cannot decode video ({e}); fix or remove the file") from None
  if len(out) < frames:
    raise DataError(f"{path}: decoded {len(out)} of the {frames} frames from frame {start} at "
                    f"stride {stride}; the file is shorter than its header says, re-encode it")
  return np.stack(out)
