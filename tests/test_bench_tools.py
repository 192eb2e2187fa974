"""tools/bench_train_step.py end to end on the tiniest variant (one compile, 2 + 2 steps, CPU), and
the timer every benchmark in tools/ uses."""
import importlib.util
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok_jax.errors import ConfigError
from vitok_jax.eval import timing

BENCH_PATH = pathlib.Path(__file__).resolve().parent.parent / "tools" / "bench_train_step.py"
FIELDS = ("variant", "batch", "dtype", "attn_impl", "device_kind", "backend", "device_count",
          "compile_s", "step_ms_median", "step_ms_p90", "examples_per_sec",
          "train_flops_per_example_analytic", "train_flops_per_example_xla", "xla_over_analytic",
          "achieved_tflops", "peak_tflops", "peak_source", "mfu", "final_loss")


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_train_step", BENCH_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_train_step_writes_sane_json(tmp_path):
  bench = _load_bench()
  out = tmp_path / "results.json"
  returned = bench.main(["--variants", "Mu-Mu/4,c=16,res=32,data=mnist", "--batch", "8",
                         "--warmup", "2", "--steps", "2", "--matmul_size", "1024",
                         "--out", str(out)])
  report = json.loads(out.read_text())
  assert report == json.loads(json.dumps(returned))
  assert report["backend"] == "cpu"
  assert report["peak"]["source"].startswith("measured matmul peak")
  (row,) = report["results"]
  missing = [field for field in FIELDS if field not in row]
  assert not missing, f"missing fields {missing}"
  assert row["batch"] == 8 and row["dtype"] == "float32" and row["timed_steps"] == 2
  assert row["examples_per_sec"] > 0
  assert row["step_ms_p90"] >= row["step_ms_median"] > 0
  assert 0.9 <= row["xla_over_analytic"] <= 1.2, row["xla_over_analytic"]
  assert 0 < row["mfu"] < 1.5, row["mfu"]
  assert row["mfu"] == row["achieved_tflops"] / row["peak_tflops"]


def test_bench_train_step_json_keeps_the_variants_measured_before_a_failure(tmp_path):
  """--out is written after each variant, so a run stopped part-way (a time limit, a bad variant)
  keeps the rows it measured."""
  bench = _load_bench()
  out = tmp_path / "results.json"
  with pytest.raises(ConfigError, match="model.decoder='Nope'"):
    bench.main(["--variants", "Mu-Mu/4,c=16,res=32,data=mnist", "Mu-Nope/4,c=16,res=32",
                "--batch", "4", "--warmup", "0", "--steps", "1", "--peak_tflops", "1",
                "--out", str(out)])
  (row,) = json.loads(out.read_text())["results"]
  assert row["variant"] == "Mu-Mu/4,c=16,res=32,data=mnist" and row["timed_steps"] == 1


def test_time_jitted_back_to_back_times_one_call():
  """A sample of several calls dispatched together is divided by their number, and waits for all
  of them: a call that sleeps 20 ms times at 20 ms, never at a third or three times that."""
  def slow(x):
    def sleep(x):
      time.sleep(0.02)
      return x
    return jax.pure_callback(sleep, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1

  x = jnp.ones(4)
  _, seconds, compiled = timing.time_jitted(slow, (x,), warmup=1, iters=3, back_to_back=3)
  assert 0.02 <= seconds < 0.04
  np.testing.assert_array_equal(compiled(x), x + 1)
  with pytest.raises(ValueError, match="back_to_back"):
    timing.time_jitted(slow, (x,), warmup=0, iters=1, back_to_back=0)
