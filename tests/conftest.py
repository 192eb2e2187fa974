"""Shared test set-up: CPU only, quiet logs, a `slow` marker (run with `pytest -m slow`).

On CPU, XLA compiles at optimisation level 0 (LLVM's), here and in the subprocesses the tests
start (they add to XLA_FLAGS): the tests' programs are tiny, so compiling them is most of the
suite's time, and -O0 halves it (the DiT shortcut test: 99 s of compiling at the default, 42 s at
0, of 142 / 98 s in all). The programs, and so what the tests check, are the same. A GPU run
(JAX_PLATFORMS=cuda, tools/check_*_gpu.sh) keeps the default.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if (os.environ["JAX_PLATFORMS"] == "cpu"
    and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long tests (minutes); run with `pytest -m slow`")


def pytest_collection_modifyitems(config, items):
  if config.getoption("-m"):
    return  # An explicit -m expression decides.
  skip = pytest.mark.skip(reason="slow: run with `pytest -m slow`")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
