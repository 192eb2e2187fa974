"""When impl="auto" picks a Pallas kernel: the one place to tune after tools/bench_kernels.py.

A Pallas kernel is chosen only on a backend where it has run on the real hardware (its tests pass
outside interpret mode and the benchmark shows it ahead): until then "auto" keeps the vendor/XLA
path, so a kernel that does not yet lower on some toolchain never breaks a training run. The kernels
are always available explicitly (impl="pallas").
"""
from __future__ import annotations

import jax

# Backends where the Pallas kernels have been validated on hardware. Empty so far: this code was
# written and tested in interpret mode on CPU only. Add "gpu" / "tpu" once
# `pytest tests/test_kernels.py -m "slow or not slow"` passes there (compiled, not interpreted)
# and tools/bench_kernels.py shows the targets.
HARDWARE_VALIDATED: frozenset = frozenset()

# Shortest sequence for which flash attention beats materialising the scores (XLA/cuDNN). A guess
# until measured: below ~1k tokens the [L, L] scores fit comfortably and XLA's fusion is fast.
MIN_FLASH_LEN = {"gpu": 1024, "tpu": 512}


def backend() -> str:
  return jax.default_backend()


def pallas_allowed(on_backend: str) -> bool:
  return on_backend in HARDWARE_VALIDATED
