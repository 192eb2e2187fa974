"""Video files read with PyAV: their frame counts, and clips decoded from a seek."""
from __future__ import annotations

import numpy as np

from vitok_jax.errors import DataError


def count_frames(path: str) -> int:
  """Frames in the first video stream, counted by demuxing (no decoding): a file cut short
  after its header (a broken copy) counts the frames it still holds, not the header's."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as container:
    if not container.streams.video:
      raise DataError(f"{path}: no video stream")
    return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)


def decode_clip(path: str, start: int, frames: int, stride: int) -> np.ndarray:
  """Frames start, start + stride, ... of a video file, in display order -> uint8 [frames, H, W, 3].

  Seeks to the keyframe before `start` and decodes forward, indexing frames by their presentation
  time at the stream's average rate, so the cost is one GOP + the clip. AVI stores no
  presentation times: the ones FFmpeg gives its frames count packets in decode order, which with
  B-frames run ahead of the frame shown (the first is 1; H.264's go 1, 2, 3, 4, 6, 5, ...). An
  AVI is therefore decoded from its first frame and indexed by the decoder's output order, and so
  is a video whose frame rate varies (a phone's 30 then 15 fps), found where two frames in a row
  are not one index apart at the average rate.
  """
  try:
    out = _decode(path, start, frames, stride, by_time=True)
    if out is None:  # A variable frame rate: the times do not give the indices.
      out = _decode(path, start, frames, stride, by_time=False)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{path}: cannot decode video ({e}); fix or remove the file") from None
  if len(out) < frames:
    raise DataError(f"{path}: decoded {len(out)} of the {frames} frames from frame {start} at "
                    f"stride {stride}; the file is shorter than its header says, re-encode it")
  return np.stack(out)


def _decode(path: str, start: int, frames: int, stride: int, by_time: bool):
  """`decode_clip`'s frames as a list, by presentation time where `by_time` and the container
  has times (None when consecutive frames are not one index apart: a variable rate), else by
  the decoder's output order from the first frame."""
  import av  # pylint: disable=g-import-not-at-top
  out, last = [], None
  with av.open(path) as container:
    stream = container.streams.video[0]
    rate, tb = stream.average_rate, stream.time_base
    by_time = by_time and bool(rate and tb) and "avi" not in container.format.name.split(",")
    t0 = stream.start_time or 0
    if start and by_time:
      container.seek(t0 + int(start / (rate * tb)), stream=stream, backward=True)
    for i, frame in enumerate(container.decode(stream)):
      if by_time and frame.pts is not None:
        idx = round(float((frame.pts - t0) * tb * rate))
        if last is not None and idx != last + 1:
          return None
        last = idx
      else:
        idx = i
      if idx >= start and (idx - start) % stride == 0:
        out.append(frame.to_ndarray(format="rgb24"))
        if len(out) == frames:
          break
  return out
