"""What the kernels run as, written down while a model is traced (for the run record).

  with recording.recorded_calls() as calls:
    jax.eval_shape(model_forward, ...)  # Each attention call appends a dict to `calls`.

`kernels.dot_product_attention` notes each call (impl, mask, lengths, head dim, dtype; for FLOP
counts `FLOP_FIELDS`: batch, heads and the (query, key) pairs its mask lets attend per sequence
and head, None where not known when tracing) and
`flash_attention` adds which kernel took it ("kernel": triton / mosaic_gpu / mosaic_gpu_fwd /
mosaic_tpu; "hopper_mask" for the masked Hopper kernels).
"""
from __future__ import annotations

import contextlib

FLOP_FIELDS = ("batch", "heads", "visible_pairs")
_OPEN: list[list[dict]] = []  # The lists of the `recorded_calls` contexts now open.


@contextlib.contextmanager
def recorded_calls():
  """Yields a list to which every attention call traced within appends a dict."""
  calls: list[dict] = []
  _OPEN.append(calls)
  try:
    yield calls
  finally:
    _OPEN.remove(calls)


def note(**fields) -> None:
  """Appends a call to every open list."""
  for calls in _OPEN:
    calls.append(dict(fields))


def annotate(**fields) -> None:
  """Adds fields to the latest call of every open list if it awaits them (noted with
  kernel=None: the dispatcher's call into `flash_attention` being traced); a direct
  `flash_attention` call is not recorded."""
  for calls in _OPEN:
    if calls and "kernel" in calls[-1] and calls[-1]["kernel"] is None:
      calls[-1].update(fields)
