"""tools/bench_kernels.py end to end at CPU size (Pallas interpreted): JSON, ratios, plot."""
import importlib.util
import json
import pathlib

BENCH_PATH = pathlib.Path(__file__).resolve().parent.parent / "tools" / "bench_kernels.py"


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_kernels", BENCH_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_kernels_writes_json_and_plot(tmp_path):
  bench = _load_bench()
  out, png = tmp_path / "kernels.json", tmp_path / "kernels.png"
  returned = bench.main(["--tiny", "--lengths", "64", "--head_dims", "32", "--impls", "pallas,xla",
                         "--bsq", "256,32", "--vq", "128,256,8", "--warmup", "0", "--iters", "1",
                         "--out", str(out), "--plot", str(png)])
  report = json.loads(out.read_text())
  assert report == json.loads(json.dumps(returned))
  assert report["backend"] == "cpu" and report["interpret"] and report["tiny"]
  var, dense = report["attention"]  # Block-causal rows come before the dense sweep.
  assert (dense["mask"], var["mask"], var["q_len"]) == ("none", "block_causal", 55)
  for row in (dense, var):
    assert row["impls"]["pallas"]["fwd_bwd_tflops"] > 0
    assert row["speedup_vs_xla"]["fwd_bwd"] > 0
  # Block-causal counts only visible pairs: 55 tokens in scales of 1, 4, 9, 16, 25 tokens.
  assert var["fwd_flops"] == 4 * var["batch"] * 2 * 32 * (1 + 4 * 5 + 9 * 14 + 16 * 30 + 25 * 55)
  assert isinstance(report["vq"]["no_tokens_x_codes_buffer"], bool)  # Meaningful off-CPU only.
  assert report["bsq"]["speedup_vs_jnp"] > 0
  assert all(str(v).startswith("pending") for v in report["targets"].values())
  assert png.stat().st_size > 10_000
