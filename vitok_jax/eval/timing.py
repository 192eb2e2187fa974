"""Wall-clock timing of jitted functions for the benchmarks in tools/ (compile excluded)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax


def time_jitted(fn: Callable, args: Sequence, warmup: int, iters: int):
  """(compile seconds, median run seconds, compiled) of jax.jit(fn)(*args).

  Compiled ahead of time from `args`; `warmup` untimed calls, then `iters` calls each ended by
  block_until_ready.
  """
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times), compiled
