"""Wall-clock timing of jitted functions for the benchmarks in tools/ (compile excluded)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax


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
