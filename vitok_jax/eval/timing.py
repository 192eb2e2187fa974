"""Timing of jitted functions for the benchmarks in tools/ (compile excluded): wall clock, and each
GPU kernel's own time (CUPTI)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax
import numpy as np


def time_jitted(fn: Callable, args: Sequence, warmup: int, iters: int, back_to_back: int = 1):
  """(compile seconds, median run seconds, compiled) of jax.jit(fn)(*args).

  Compiled ahead of time from `args`; `warmup` untimed calls, then `iters` samples. A sample is
  `back_to_back` calls dispatched one after the other and ended by one block_until_ready, divided
  by `back_to_back`: with more than one, the host's dispatch of a call overlaps the device's work
  on the previous one, so a kernel of tens of microseconds is timed by the device, not by the
  launch round trip (what `triton.testing.do_bench` gets from device events).
  """
  if back_to_back < 1:
    raise ValueError(f"back_to_back={back_to_back} must be >= 1")
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    outputs = [compiled(*args) for _ in range(back_to_back)]
    jax.block_until_ready(outputs)
    times.append((time.perf_counter() - start) / back_to_back)
  return compile_s, statistics.median(times), compiled


def kernel_times(compiled, args, calls: int) -> dict:
  """Where one call of `compiled` spends the device's time: each GPU kernel it launches, in
  launch order, with its median duration over `calls` calls, and their sum (CUPTI, through Mosaic
  GPU's profiler; CUDA only). Kernels only: the sum leaves out memsets (XLA's zero fills may be
  one) and the gaps between kernels, which the timings of back-to-back calls include."""
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  _, timings = profiler.measure(compiled, aggregate=False, iterations=calls)(*args)
  return summarize_kernel_times(timings if calls > 1 else [timings])


def named_kernels_ms(summary: dict, name: str = "") -> float | None:
  """The summed time of the kernels in a `kernel_times` summary whose name holds `name` (all of
  them for ""), or None if none does."""
  own = [k["ms"] for k in summary.get("kernels", []) if name in k["name"]]
  return sum(own) if own else None


def error_summary(e: BaseException, limit: int = 200) -> str:
  """"Type: the message's first line" (at most `limit` characters of it; the type alone for an
  empty message): how the benchmarks record a measurement that failed."""
  first = (str(e).splitlines() or [""])[0][:limit]
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


def summarize_kernel_times(per_call) -> dict:
  """[[(kernel name, ms), ...] per call], the same launches in each → {"kernels": [{"name", "ms":
  median over calls}] per launch, "ms": their sum}."""
  launches = list(zip(*per_call)) if per_call and per_call[0] else []
  kernels = [{"name": times[0][0][:120], "ms": float(np.median([ms for _, ms in times]))}
             for times in launches]
  return {"kernels": kernels, "ms": sum(k["ms"] for k in kernels)}
