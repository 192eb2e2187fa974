"""Shared test set-up: CPU only, quiet logs, a `slow` marker (run with `pytest -m slow`)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
