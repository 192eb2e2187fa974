"""tools/bench_kernels.py end to end at CPU size (Pallas interpreted): JSON, ratios, plot."""
import importlib.util
import json
import pathlib

import pytest

from vitok_jax.eval import timing
from vitok_jax.kernels import masks

BENCH_PATH = pathlib.Path(__file__).resolve().parent.parent / "tools" / "bench_kernels.py"


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_kernels", BENCH_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_kernels_writes_json_and_plot(tmp_path):
  bench = _load_bench()
  out, png = tmp_path / "kernels.json", tmp_path / "kernels.png"
  impls = ("pallas,pallas_dense,xla,pallas_triton,pallas_padded,pallas_padded_skip_padded,"
           "pallas_bwd_in_order,pallas_bwd_descriptors_before_loop")
  returned = bench.main(["--tiny", "--lengths", "64", "--head_dims", "32", "--impls", impls,
                         "--bsq", "256,32", "--bsq_more_tokens", "512", "--vq", "128,256,8",
                         "--warmup", "0", "--iters", "1", "--out", str(out), "--plot", str(png)])
  report = json.loads(out.read_text())
  assert report == json.loads(json.dumps(returned))
  assert report["backend"] == "cpu" and report["interpret"] and report["tiny"]
  var, dense = report["attention"]  # Block-causal rows come before the dense sweep.
  assert (dense["mask"], var["mask"], var["q_len"]) == ("none", "block_causal", 55)
  for row in (dense, var):
    assert row["impls"]["pallas"]["fwd_bwd_tflops"] > 0
    assert row["speedup_vs_xla"]["fwd_bwd"] > 0
  # Our kernel with every tile visited is a baseline of the block-causal rows alone.
  assert var["speedup_vs_pallas_dense"]["fwd"] > 0 and "pallas_dense" not in dense["impls"]
  # Triton alone is timed on every row (on CPU it is what "pallas" runs too).
  assert "fwd_bwd_ms" in dense["impls"]["pallas_triton"] and "fwd_bwd_ms" in var["impls"][
      "pallas_triton"]
  with pytest.raises(ValueError, match="unknown.*pallas\\+swizzled"):
    bench.main(["--tiny", "--impls", "pallas,pallas+swizzled"])
  # Block-causal counts only visible pairs: 55 tokens in scales of 1, 4, 9, 16, 25 tokens.
  pairs = 1 + 4 * 5 + 9 * 14 + 16 * 30 + 25 * 55
  assert var["fwd_flops"] == 4 * var["batch"] * 2 * 32 * pairs
  assert var["visible_fraction"] == pytest.approx(pairs / 55**2) and dense["visible_fraction"] == 1
  # The policy flags are set otherwise while "pallas_padded*" are traced, and only then.
  assert "fwd_bwd_ms" in var["impls"]["pallas_padded"]
  assert "fwd_bwd_ms" in var["impls"]["pallas_padded_skip_padded"]
  assert "fwd_bwd_ms" in var["impls"]["pallas_bwd_in_order"]
  assert "fwd_bwd_ms" in var["impls"]["pallas_bwd_descriptors_before_loop"]
  flags = lambda: (bench.policy.HOPPER_SKIP_PADDED_QUERIES, bench.policy.HOPPER_UNPADDED)
  defaults, seen = flags(), []
  traced = bench._with_settings(lambda: seen.append(flags()),
                                *bench._settings("pallas_padded_skip_padded"))
  traced()
  assert seen == [(True, False)] and flags() == defaults
  # The Hopper kernels' own constants: set for the whole step (the backward reads them).
  module, settings = bench._settings("pallas_bwd_in_order")
  assert settings == {"DS_DURING_DV_HEAD_DIMS": ()} and module.DS_DURING_DV_HEAD_DIMS == (64, 128)
  bench._with_settings(lambda: seen.append(module.DS_DURING_DV_HEAD_DIMS), module, settings)()
  assert seen[-1] == () and module.DS_DURING_DV_HEAD_DIMS == (64, 128)
  assert bench._settings("pallas_bwd_descriptors_before_loop")[1] == {
      "DESCRIPTORS_IN_LOOP_HEAD_DIMS": ()}
  assert isinstance(report["vq"]["no_tokens_x_codes_buffer"], bool)  # Meaningful off-CPU only.
  assert report["bsq"]["speedup_vs_jnp"] > 0
  assert set(report["bsq"]["copy"]) == {"pallas", "xla"}  # The bandwidth ceilings of the shape.
  [larger] = report["bsq_more_tokens"]  # The same measurements at another token count.
  assert (larger["tokens"], larger["dim"], set(larger["copy"])) == (512, 32, {"pallas", "xla"})
  assert larger["bytes"] == 2 * report["bsq"]["bytes"]
  assert all(str(v).startswith("pending") for v in report["targets"].values())
  assert png.stat().st_size > 10_000
  # On a GPU, a run without the rows of a target (e.g. VAR lengths only) says so, not False.
  gpu_run = {"backend": "gpu", "attention": [var],
             "bsq": {"tokens": 1 << 20, "pallas": {"fraction_of_peak": 0.5}},
             "vq": {"speedup_vs_jnp": 3.5, "no_tokens_x_codes_buffer": True}}
  targets = bench.check_targets(gpu_run)
  unmeasured = "not measured (no such rows or baseline)"
  assert targets["fwd_bwd_vs_cudnn>=1.0"] == targets["fwd_bwd_vs_xla>=2.0"] == unmeasured
  assert targets["block_causal_vs_dense>=1.5"] in (True, False)
  assert (targets["bsq_bandwidth>=0.7"], targets["vq_vs_jnp>=3_and_no_buffer"]) == (False, True)
  assert targets["bsq_kernel_bandwidth>=0.7"] == "not measured (needs --breakdown)"
  # A row of the shape without a baseline is not measured against it, not False.
  big = {"q_len": 4096, "head_dim": 128, "dtype": "bfloat16", "mask": "none",
         "speedup_vs_cudnn": {"fwd_bwd": 0.96}}
  gpu_run["attention"] = [big, {**var, "speedup_vs_xla": {"fwd_bwd": 4.0},
                                "speedup_vs_cudnn": {"fwd_bwd": 1.8}}]
  gpu_run["bsq"]["pallas"]["bsq_kernel_fraction_of_peak"] = 0.72
  # The largest of --bsq_more_tokens is checked on its own: here 0.69 at 16M tokens.
  gpu_run["bsq_more_tokens"] = [{"tokens": n, "pallas": {"bsq_kernel_fraction_of_peak": f}}
                                for n, f in ((1 << 24, 0.69), (1 << 22, 0.75))]
  targets = bench.check_targets(gpu_run)
  assert targets["bsq_kernel_bandwidth>=0.7_largest_tokens"] is False
  assert (targets["fwd_bwd_vs_cudnn>=1.0"], targets["fwd_bwd_vs_xla>=2.0"]) == (False, unmeasured)
  assert targets["block_causal_vs_dense>=1.5"] is True  # The faster baseline: 1.8.
  assert targets["bsq_kernel_bandwidth>=0.7"] is True


def _load_tool(name):
  path = BENCH_PATH.parent / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tune_kernels_keeps_the_fastest_correct_tiles_and_bench_uses_them(tmp_path):
  tune = _load_tool("tune_kernels")
  tuned = tmp_path / "tuned.json"
  report = tune.main(["--tiny", "--length", "64", "--head_dims", "32", "--warmup", "0",
                      "--iters", "1", "--out", str(tuned)])
  for kernel in ("bsq", "vq"):
    candidates = report[kernel]["candidates"]
    assert len(candidates) == 2 and all(c["correct"] for c in candidates)
    assert report[kernel]["best"]["ms"] == min(c["ms"] for c in candidates)
  attention = report["attention"]["32"]
  assert [len(attention[s]) for s in ("forward", "dkdv", "dq")] == [2, 2, 2]
  assert attention["best"] in attention["dq"] and attention["best"]["correct"]
  # The dQ stage kept the dK/dV stage's winner.
  best_dkdv = min(attention["dkdv"], key=lambda c: c["ms"])
  assert attention["best"]["block_k_bwd"] == best_dkdv["block_k_bwd"]

  bench = _load_bench()
  out = tmp_path / "bench.json"
  result = bench.main(["--tiny", "--lengths", "64", "--head_dims", "32", "--var_lengths", "",
                       "--impls", "pallas", "--bsq", "256,32", "--vq", "128,256,8", "--warmup",
                       "0", "--iters", "1", "--tiles", str(tuned), "--out", str(out)])
  assert result["tiles"]["vq"] == {k: report["vq"]["best"][k]
                                   for k in ("block_tokens", "block_codes", "num_warps", "fma")}
  assert result["tiles"]["attention"][32]["block_q_dq"] == attention["best"]["block_q_dq"]
  assert [r["mask"] for r in result["attention"]] == ["none"]


def test_tune_block_causal_tiles_reach_the_var_rows(tmp_path):
  """Block-causal tuning checks each candidate against the masked reference; bench_kernels.py
  takes the tiles of key block_causal_<L> for that VAR row. Unknown VAR lengths are refused."""
  tune = _load_tool("tune_kernels")
  ids = masks.var_block_ids((1, 2, 3, 4, 5))  # 55 tokens, VAR's first five scales.
  candidates = ([(32, 16, 4, 1)], [(16, 16, 4)], [(16, 16)])
  result = tune.tune_attention(32, 55, tune.Runs(0, 1), candidates, tokens=55,
                               block_ids=ids)
  assert result["problem"]["mask"] == "block_causal"
  assert result["best"]["correct"] and (result["best"]["block_q"], result["best"]["block_k"]) == (
      32, 16)
  tuned = tmp_path / "tuned.json"
  tuned.write_text(json.dumps({"attention": {"block_causal_55": result}}))
  bench = _load_bench()
  report = bench.main(["--tiny", "--lengths", "", "--impls", "pallas", "--bsq", "256,32",
                       "--vq", "128,256,8", "--warmup", "0", "--iters", "1", "--tiles",
                       str(tuned), "--out", str(tmp_path / "bench.json")])
  assert report["tiles"]["attention"]["block_causal_55"]["block_q"] == 32
  assert [r["mask"] for r in report["attention"]] == ["block_causal"]
  with pytest.raises(SystemExit):
    tune.main(["--tiny", "--kernels", "attention", "--var_lengths", "100", "--out",
               str(tmp_path / "x.json")])


def test_kernel_times_are_medians_per_launch_and_breakdown_needs_cuda():
  """`--breakdown`'s summary of CUPTI's per-call kernel lists, and its refusal off CUDA."""
  bench = _load_bench()
  per_call = [[("pad", 0.2), ("fwd", 1.0), ("bwd", 2.0)],
              [("pad", 0.4), ("fwd", 3.0), ("bwd", 2.5)],
              [("pad", 0.3), ("fwd", 2.0), ("bwd", 9.0)]]
  summary = timing.summarize_kernel_times(per_call)
  assert summary["kernels"] == [{"name": "pad", "ms": pytest.approx(0.3)},
                                {"name": "fwd", "ms": 2.0}, {"name": "bwd", "ms": 2.5}]
  assert summary["ms"] == pytest.approx(4.8)
  assert timing.summarize_kernel_times([[]]) == {"kernels": [], "ms": 0}
  if bench.jax.default_backend() != "gpu":
    with pytest.raises(SystemExit):
      bench.parse_args(["--tiny", "--breakdown"])


def test_bsq_breakdown_gives_the_kernels_own_bandwidth(monkeypatch):
  """With --breakdown, BSQ's and the copies' bandwidth also from their kernels' own time (CUPTI's,
  here a stand-in), beside the time of the whole call; BSQ's also from its Pallas kernel alone."""
  bench = _load_bench()
  monkeypatch.setattr(bench.timing, "kernel_times", lambda compiled, args, calls: {
      "kernels": [{"name": "bsq", "ms": 0.5}, {"name": "reduce_fusion", "ms": 0.1}], "ms": 0.6})
  result = bench.bench_bsq(tokens=256, dim=32, dtype=bench.jnp.float32, warmup=0, iters=1,
                           interpret=True, peak=1e9, breakdown=True)
  assert result["pallas"]["kernels"]["ms"] == 0.6
  assert result["pallas"]["bsq_kernel_fraction_of_peak"] == pytest.approx(
      result["bytes"] / 0.5e-3 / 1e9)
  assert result["pallas"]["kernels_fraction_of_peak"] == pytest.approx(
      result["bytes"] / 0.6e-3 / 1e9)
  copied = 2 * 256 * 32 * 4  # The copies' ceilings, from their kernels' own time too.
  assert result["copy"]["xla"]["kernels_fraction_of_peak"] == pytest.approx(copied / 0.6e-3 / 1e9)


def test_tune_times_the_bsq_kernel_alone_and_keeps_wall_clock_without_it(monkeypatch):
  """On CUDA each BSQ candidate also gets its Pallas kernel's own time (CUPTI, here a stand-in);
  a breakdown that fails or finds no such kernel is reported beside the wall-clock time, which
  stays."""
  tune = _load_tool("tune_kernels")
  monkeypatch.setattr(tune.jax, "default_backend", lambda: "gpu")
  runs, x = tune.Runs(0, 1), tune.jnp.ones((8,))
  launches = [{"name": "bsq", "ms": 0.06}, {"name": "input_reduce_fusion", "ms": 0.01}]
  monkeypatch.setattr(timing, "kernel_times", lambda *a: {"kernels": launches, "ms": 0.07})
  timed = tune._time(lambda x: x * 2, (x,), runs, kernel="bsq")
  assert timed["kernel_ms"] == 0.06 and timed["ms"] > 0
  launches.pop(0)  # No kernel of that name.
  timed = tune._time(lambda x: x * 2, (x,), runs, kernel="bsq")
  assert "no GPU kernel named like 'bsq'" in timed["kernel_ms_error"] and timed["ms"] > 0

  def fail(*args):
    raise RuntimeError("CUPTI unavailable\nand more lines")
  monkeypatch.setattr(timing, "kernel_times", fail)
  timed = tune._time(lambda x: x * 2, (x,), runs, kernel="bsq")
  assert timed["kernel_ms_error"] == "RuntimeError: CUPTI unavailable" and "kernel_ms" not in timed

  def fail_silently(*args):  # An exception with no message is recorded by its type.
    raise RuntimeError()
  monkeypatch.setattr(timing, "kernel_times", fail_silently)
  timed = tune._time(lambda x: x * 2, (x,), runs, kernel="bsq")
  assert timed["kernel_ms_error"] == "RuntimeError" and timed["ms"] > 0
  # The best: by the kernel's own time where every correct timed candidate has one.
  a = {"correct": True, "ms": 0.09, "kernel_ms": 0.058}
  b = {"correct": True, "ms": 0.08, "kernel_ms": 0.061}
  wrong = {"correct": False, "ms": 0.01, "kernel_ms": 0.01}
  assert tune._best([a, b, wrong]) is a
  per_call_only = {"correct": True, "ms": 0.08}
  assert tune._best([a, per_call_only]) is per_call_only  # Else per call.
  assert tune._best([wrong]) is None


def test_bsq_ablation_edits_apply_and_change_what_they_name(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(BENCH_PATH.parent))  # It reuses bench_kernels' copy kernel.
  ablate = _load_tool("ablate_bsq")
  for name in ablate.EDITS:  # Every edit still finds its line in the kernel, exactly once.
    ablate.variant(name)
  report = ablate.main(["--tokens", "64", "--variants", "base,no_pack,no_stats,ys",
                        "--launches", "16,2,1", "--iters", "1", "--out", str(tmp_path / "a.json")])
  rows = {row["variant"]: row for row in report["rows"]}
  assert json.loads((tmp_path / "a.json").read_text())["rows"] == json.loads(
      json.dumps(report["rows"]))
  assert rows["base"]["codes_equal"] and rows["ys"]["codes_equal"]
  assert not rows["no_pack"]["codes_equal"]
  assert rows["base"]["token_entropy_error"] < 1e-5 and rows["ys"]["token_entropy_error"] < 1e-5
  assert rows["no_stats"]["token_entropy_error"] > 1e-2  # The entropy is gone, not approximated.
  with pytest.raises(ValueError, match="not once"):
    monkeypatch.setitem(ablate.EDITS, "stale", (("no such line", ""),))
    ablate.variant("stale")


def test_tune_bsq_launches_from_the_command_line(tmp_path, capsys):
  """--bsq_launches replaces the BSQ candidates (each still checked against the reference); a
  malformed entry is a usage error naming it."""
  tune = _load_tool("tune_kernels")
  report = tune.main(["--tiny", "--kernels", "bsq", "--bsq_launches", "16,2,1,1;32,1,1",
                      "--warmup", "0", "--iters", "1", "--out", str(tmp_path / "t.json")])
  candidates = report["bsq"]["candidates"]
  assert [(c["block_tokens"], c["steps"], c["num_warps"], c.get("prefetch")) for c in candidates
          ] == [(16, 2, 1, 1), (32, 1, 1, None)]
  assert all(c["correct"] for c in candidates)
  for bad in ("32,16", "32,0,2", "32,a,2", "32,16,2,-1"):
    with pytest.raises(SystemExit):
      tune.main(["--tiny", "--kernels", "bsq", "--bsq_launches", bad])
    assert f"--bsq_launches entry {bad!r}" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    tune.main(["--tiny", "--kernels", "vq", "--bsq_launches", "32,1,1"])
  assert "--bsq_launches needs bsq in --kernels" in capsys.readouterr().err
