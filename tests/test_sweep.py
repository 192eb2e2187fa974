"""Sweeps: expansion, stable ids, skip/resume/retry with a fake trainer, results, CLI, launchers."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import pytest

from vitok_jax import cli, config_lib
from vitok_jax.errors import ConfigError
from vitok_jax.launch import JobSpec, launch_args, local, tpu
from vitok_jax.scaling import results, sweep

BASE = "vitok:Mu-Mu/4,res=16,data=mnist,batch=8,steps=2"

# Stands in for `vitok train`: counts launches and notes its CUDA_VISIBLE_DEVICES, honours SIGTERM
# like the trainer (saves a checkpoint, exits 0, no record), is pre-empted (SIGTERM) while
# WORKDIR/preempt_N files remain, fails while WORKDIR/fail_N files remain, else writes a record
# whose PSNR rises with E.
FAKE_TRAINER = textwrap.dedent("""
    import glob, json, math, os, signal, sys, time
    workdir, calls, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])

    def preempted(*_):  # Saves a step past its last one (it trained in between).
      steps = os.path.join(workdir, "checkpoints")
      os.makedirs(steps, exist_ok=True)
      os.makedirs(os.path.join(steps, str(len(os.listdir(steps)) + 1)))
      sys.exit(0)
    signal.signal(signal.SIGTERM, preempted)
    with open(calls, "a") as f:
      f.write(os.path.basename(workdir) + "\\n")
    with open(os.path.join(workdir, "gpus.txt"), "a") as f:
      f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "-") + "\\n")
    time.sleep(sleep)
    preempts = sorted(glob.glob(os.path.join(workdir, "preempt_*")))
    if preempts:
      os.remove(preempts[0])
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(60)
    fails = sorted(glob.glob(os.path.join(workdir, "fail_*")))
    if fails:
      os.remove(fails[0])
      sys.exit("TrainingDiverged: loss is nan" if "diverge" in fails[0] else "boom")
    config = json.load(open(os.path.join(workdir, "config.json")))
    c = config["model"]["channels"]
    e = 16 * c
    record = dict(config=config, variant=config["variant"], E=e, c=c, tokens_per_example=16,
                  params=dict(encoder=100, decoder=200, bottleneck=10, total=310),
                  flops_per_example=dict(forward=1000, train=3000), examples_seen=16,
                  wall_time_s=0.1, metrics={"eval/psnr": 10 * e ** 0.1, "eval/l2": 0.5 * e ** -0.3,
                                            "eval/ssim": 0.5})
    json.dump(record, open(os.path.join(workdir, "record.json"), "w"))
""")


def _sweep(channels=(1, 2, 4, 8)):
  config = ml_collections.ConfigDict()
  config.name = "test"
  config.base = BASE
  config.axes = [("product", {"c": list(channels)})]
  config.fits = [dict(x="E", y="eval/psnr"), dict(x="E", y="eval/l2")]
  config.frontier = dict(y="eval/l2")
  return config


@pytest.fixture
def fake(tmp_path):
  script = tmp_path / "fake_train.py"
  script.write_text(FAKE_TRAINER)
  calls = tmp_path / "calls.txt"

  def command(sleep=0.0):
    return lambda run: [sys.executable, str(script), run.workdir, str(calls), str(sleep)]

  def launched():
    return calls.read_text().split() if calls.exists() else []
  return command, launched


def test_points_product_and_zip():
  axes = [("product", {"a": [1, 2], "b": ["x", "y"]}), ("zip", {"c": [3, 4], "d": [5, 6]})]
  got = sweep.points(axes)
  assert len(got) == 8
  assert got[0] == {"a": 1, "b": "x", "c": 3, "d": 5}
  assert got[1] == {"a": 1, "b": "x", "c": 4, "d": 6}
  with pytest.raises(ConfigError, match="equal lengths"):
    sweep.points([("zip", {"c": [1], "d": [1, 2]})])
  with pytest.raises(ConfigError, match="product"):
    sweep.points([("grid", {"c": [1]})])


def test_expand_ids_filters_overrides(tmp_path):
  config = _sweep()
  config.axes = [("product", {"c": [2, 4], "model.patch": [(4, 4), (8, 8)]})]
  config.filters = [lambda p: p["c"] * (16 // p["model.patch"][0]) ** 2 >= 16]
  config.overrides = [lambda p, cfg: {"total_steps": 3 * p["c"]}]
  runs = sweep.expand(config, str(tmp_path))
  assert [r.label for r in runs] == ["c2-patch4x4", "c4-patch4x4", "c4-patch8x8"]
  assert [r.config.total_steps for r in runs] == [6, 12, 12]
  assert runs[2].config.model.patch == (8, 8) and runs[2].config.model.channels == 4
  # Ids are a function of the resolved config: stable across expansions, distinct across points.
  assert [r.id for r in sweep.expand(config, str(tmp_path))] == [r.id for r in runs]
  assert len({r.id.split("-")[-1] for r in runs}) == 3
  assert runs[0].workdir == os.path.join(tmp_path, "runs", runs[0].id)
  with pytest.raises(ConfigError, match="no field"):
    sweep.resolve(BASE, {"model.nope": 1})
  bare = _sweep((2,))
  bare.base = "vitok"  # The config file's default variant, the points' options added to it.
  assert sweep.expand(bare)[0].config.model.channels == 2


@pytest.mark.parametrize("axes, says", [
    ([("product", {"model.patch": [(4, 4), (3, 3)]})], "patch size 3 does not divide data.res"),
    ([("product", {"model.encoder": ["Zz"]})], "model.encoder='Zz' is not allowed"),
    ([("product", {"modl.channels": [1]})], "config has no field 'modl'"),
    ([("product", {"c": 4})], r"write each axis as \(kind, \{key: \[values\]\}\)"),
    ([("product", {"c": "124"})], "write each axis as"),
    ([{"c": [1, 2]}], "write each axis as"),
    ([("product", {"batch": [16, 32]})], "sets \\['batch'\\], which its axes sweep"),
    ([("product", {"batch_size": [16, 32]})], "sets \\['batch'\\], which its axes sweep"),
    ([("product", {"c": [1], "model.channels": [2]})],
     r"set one field under two keys: \[\['c', 'model.channels'\]\]")])
def test_a_bad_sweep_is_refused_when_it_expands(axes, says):
  """Every run's resolved config is checked as `vitok train` would check it, and a malformed axis
  or a base option the axes also set is named, before any run directory exists."""
  config = _sweep()
  config.base = config.base.replace("batch=8", "batch=16")
  config.axes = axes
  with pytest.raises(ConfigError, match=says):
    sweep.expand(config)


def test_canonical_sweeps_expand():
  quick = sweep.expand(sweep.load("quickstart"))
  assert [r.config.model.channels for r in quick] == [1, 2, 4, 8, 16]
  assert len({r.id for r in quick}) == 5
  assert all(r.config.data.name == "mnist" for r in quick)
  bottleneck = sweep.expand(sweep.load("bottleneck"))
  assert len({r.config.model.patch for r in bottleneck}) == 3
  enc_dec = sweep.expand(sweep.load("encoder_decoder"))
  assert len(enc_dec) == 9
  steps = {(r.config.model.encoder, r.config.model.decoder): r.config.total_steps for r in enc_dec}
  assert steps[("Mu", "Mu")] > steps[("Ti", "Ti")]  # Same compute: smaller models train longer.
  kinds = sweep.expand(sweep.load("tokenizer_kinds"))
  assert [r.config.model.bottleneck for r in kinds] == [
      "gaussian", "vq1k", "bsq", "msvq", "msbsq", "larp"]
  assert {r.config.model.bottleneck: r.config.codebook_restart_every for r in kinds}["msvq"] == 50
  # generator_size's argument is the tokenizer's workdir, bare or as in a generator variant.
  for arg in ("/runs/tok", "tokenizer=/runs/tok"):
    assert {r.config.tokenizer for r in sweep.expand(sweep.load(f"generator_size:{arg}"))} == {
        "/runs/tok"}


def test_run_local_skips_finished_runs(tmp_path, fake):
  command, launched = fake
  runs = sweep.prepare(_sweep(), str(tmp_path / "s"))
  lines = []
  status = sweep.run_local(runs, str(tmp_path / "s"), parallel=2, command=command(),
                           log=lines.append, poll_s=0.05)
  assert set(status.values()) == {sweep.DONE}
  assert sorted(launched()) == sorted(r.id for r in runs)
  assert "4/4 done" in lines[-1] and "finished" in lines[-1]
  # The same sweep again: every run is done, nothing is launched.
  runs = sweep.prepare(_sweep(), str(tmp_path / "s"))
  sweep.run_local(runs, str(tmp_path / "s"), command=command(), log=lines.append, poll_s=0.05)
  assert len(launched()) == 4
  # Adding a point runs only the new one.
  runs = sweep.prepare(_sweep((1, 2, 4, 8, 16)), str(tmp_path / "s"))
  sweep.run_local(runs, str(tmp_path / "s"), command=command(), log=lines.append, poll_s=0.05)
  assert len(launched()) == 5 and launched()[-1].startswith("c16-")


TWO_SWEEPS = textwrap.dedent("""
    import os, sys, time
    from vitok_jax.scaling import sweep
    sweep_dir, delay = sys.argv[1], float(sys.argv[2])
    runs = sweep.expand(sweep.load("{sweeps}/two.py"), sweep_dir)
    time.sleep(delay)
    command = lambda run: ["bash", "-c", f"echo x >> {{run.workdir}}/starts; sleep 1; "
                           f"echo {{{{}}}} > {{run.workdir}}/record.json"]
    status = sweep.run_local(runs, sweep_dir, command=command, log=lambda m: None, poll_s=0.05)
    print(sorted(status.values()))
""")


def test_two_sweeps_on_one_directory_start_each_run_once(tmp_path):
  """A second `vitok sweep` on the same directory leaves the runs the first one started alone
  (each run's pid file is taken atomically before its trainer starts) and both end cleanly."""
  (tmp_path / "two.py").write_text(textwrap.dedent("""
      import ml_collections
      def get_config(arg=""):
        sweep = ml_collections.ConfigDict()
        sweep.base = "vitok:Mu-Mu/4,res=16,data=mnist,batch=8,steps=2"
        sweep.axes = [("product", {"c": [1, 2, 4]})]
        return sweep
  """))
  sweep_dir = str(tmp_path / "s")
  runs = sweep.prepare(sweep.load(f"{tmp_path}/two.py"), sweep_dir)
  script = TWO_SWEEPS.format(sweeps=tmp_path)
  procs = [subprocess.Popen([sys.executable, "-c", script, sweep_dir, str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for delay in (0.0, 0.5)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert [open(os.path.join(r.workdir, "starts")).read().count("x") for r in runs] == [1, 1, 1]
  assert not any(os.path.exists(os.path.join(r.workdir, sweep.PID)) for r in runs)


def test_retries_are_bounded_and_divergence_is_final(tmp_path, fake):
  command, launched = fake
  runs = sweep.prepare(_sweep((1, 2, 4)), str(tmp_path))
  (tmp_path / "runs" / runs[0].id / "fail_1").touch()   # Fails once, then succeeds.
  for i in range(2):                                     # Fails both attempts.
    (tmp_path / "runs" / runs[1].id / f"fail_{i}").touch()
  (tmp_path / "runs" / runs[2].id / "fail_diverge").touch()
  status = sweep.run_local(runs, str(tmp_path), max_attempts=2, command=command(),
                           log=lambda _: None, poll_s=0.05)
  assert status == {runs[0].id: sweep.DONE, runs[1].id: sweep.FAILED,
                    runs[2].id: sweep.DIVERGED}
  counts = {r.id: launched().count(r.id) for r in runs}
  assert counts == {runs[0].id: 2, runs[1].id: 2, runs[2].id: 1}
  assert sweep.read_status(runs[1].workdir)["attempts"] == 2
  # Re-running does not touch them; a larger budget retries only the failed run, which succeeds.
  sweep.run_local(runs, str(tmp_path), max_attempts=2, command=command(), log=lambda _: None)
  assert len(launched()) == 5
  status = sweep.run_local(runs, str(tmp_path), max_attempts=3, command=command(),
                           log=lambda _: None, poll_s=0.05)
  assert status[runs[1].id] == sweep.DONE and len(launched()) == 6
  rows = results.gather(str(tmp_path))
  assert [r["status"] for r in rows] == [sweep.DONE, sweep.DONE, sweep.DIVERGED]
  assert results.flags(rows) == [f"{runs[2].id}: diverged (TrainingDiverged: loss is nan)"]


def test_interrupted_sweep_finishes_only_missing_runs(tmp_path, fake):
  """SIGINT a running sweep, then the same command: finished runs are not launched again."""
  command, launched = fake
  sweep_dir = str(tmp_path / "s")
  script = tmp_path / "run_sweep.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import test_sweep
      from vitok_jax.scaling import sweep
      command = [sys.executable, {str(tmp_path / 'fake_train.py')!r}]
      runs = sweep.prepare(test_sweep._sweep(), {sweep_dir!r})
      sweep.run_local(runs, {sweep_dir!r}, poll_s=0.05,
                      command=lambda r: command + [r.workdir, {str(tmp_path / 'calls.txt')!r},
                                                   "0.4"])
  """))
  first = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while len(launched()) < 2 and time.time() < deadline:  # One run done, the second one running.
    time.sleep(0.05)
  first.send_signal(signal.SIGINT)
  output = first.communicate(timeout=60)[0]
  assert first.returncode != 0 and "interrupted" in output
  rows = results.gather(sweep_dir)
  done = {r["id"] for r in rows if r["status"] == sweep.DONE}
  assert 1 <= len(done) < 4
  before = len(launched())
  second = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
  assert second.returncode == 0, second.stderr
  relaunched = launched()[before:]
  assert not done & set(relaunched)
  assert sorted(relaunched) == sorted({r["id"] for r in rows} - done)
  assert all(r["status"] == sweep.DONE for r in results.gather(sweep_dir))


def test_results_fit_and_plots_via_cli(tmp_path, fake, capsys):
  command, _ = fake
  sweep_dir = str(tmp_path / "s")
  runs = sweep.prepare(_sweep((1, 2, 4, 8, 16)), sweep_dir)
  sweep.run_local(runs, sweep_dir, command=command(), log=lambda _: None, poll_s=0.05)
  assert cli.main(["vitok", "results", sweep_dir]) == 0
  out = capsys.readouterr().out
  assert "| id | status | c | params_encoder" in out and out.count("| done |") == 5
  rows = list(open(os.path.join(sweep_dir, "results.csv")))
  assert len(rows) == 6 and "compute" in rows[0] and "tokens_seen" in rows[0]
  assert cli.main(["vitok", "fit", sweep_dir, "--n_boot=200"]) == 0
  out = capsys.readouterr().out
  assert "fit: eval/psnr" in out
  fits = json.load(open(os.path.join(sweep_dir, "fits.json")))
  psnr, l2 = fits
  assert psnr["b"] == pytest.approx(0.1, rel=1e-3) and l2["b"] == pytest.approx(-0.3, rel=1e-3)
  plots = sorted(os.listdir(os.path.join(sweep_dir, "plots")))
  assert plots == sorted(f"{name}.{ext}" for ext in ("png", "svg") for name in (
      "fit_eval_psnr_vs_E", "fit_eval_l2_vs_E", "frontier_eval_l2"))
  assert cli.main(["vitok", "fit", sweep_dir, "--x=E", "--y=eval/l2", "--n_boot=50"]) == 0
  assert "eval/l2 = " in capsys.readouterr().out
  # Each `vitok fit` adds its fit to fits.json (same spec replaced, the plain law E→l2 named again
  # with its default offset included), it does not overwrite the rest.
  for _ in range(2):
    assert cli.main(["vitok", "fit", sweep_dir, "--x=E", "--y=eval/psnr", "--offset",
                     "--n_boot=50"]) == 0
  specs = [f["spec"] for f in json.load(open(os.path.join(sweep_dir, "fits.json")))]
  assert specs[:2] == [dict(x="E", y="eval/psnr"), dict(x="E", y="eval/l2")]
  assert specs[2:] == [dict(x="E", y="eval/psnr", offset=True)]
  # More runs: every stored fit is refitted on all of them, none stays over the old five.
  runs = sweep.prepare(_sweep((1, 2, 4, 8, 16, 32)), sweep_dir)
  sweep.run_local(runs, sweep_dir, command=command(), log=lambda _: None, poll_s=0.05)
  assert cli.main(["vitok", "fit", sweep_dir, "--n_boot=20"]) == 0
  fits = json.load(open(os.path.join(sweep_dir, "fits.json")))
  assert [f["spec"] for f in fits] == specs and [f["n"] for f in fits] == [6] * 3


def test_results_keep_swept_values_and_the_sweeps_max_attempts(tmp_path, fake):
  """Rows without a record keep their swept c; `vitok results` uses the sweep's max_attempts."""
  command, _ = fake
  config = _sweep((1, 2, 4))
  config.max_attempts = 1
  runs = sweep.prepare(config, str(tmp_path))
  (tmp_path / "runs" / runs[0].id / "fail_0").touch()
  sweep.run_local(runs[:2], str(tmp_path), max_attempts=1, command=command(), log=lambda _: None,
                  poll_s=0.05)
  rows = results.gather(str(tmp_path))
  assert [(r["status"], r["c"]) for r in rows] == [
      (sweep.FAILED, 1), (sweep.DONE, 2), (sweep.PENDING, 4)]
  assert [r["status"] for r in results.gather(str(tmp_path), max_attempts=3)][0] == sweep.PENDING
  assert cli.main(["vitok", "results", str(tmp_path)]) == 0
  assert "| failed | 1 |" in open(tmp_path / "results.md").read()


def test_results_name_finished_runs_a_re_expanded_manifest_left_out(tmp_path, fake, capsys):
  """Expanded again with other axes, the manifest lists the new runs only; `vitok results` says
  which finished runs that leaves out of its table."""
  command, _ = fake
  runs = sweep.prepare(_sweep((1, 2)), str(tmp_path))
  sweep.run_local(runs, str(tmp_path), command=command(), log=lambda _: None, poll_s=0.05)
  assert results.unlisted_runs(str(tmp_path)) == []
  sweep.prepare(_sweep((4,)), str(tmp_path))
  assert results.unlisted_runs(str(tmp_path)) == sorted(run.id for run in runs)
  assert cli.main(["vitok", "results", str(tmp_path)]) == 0
  assert "NOTE 2 finished run(s) in" in capsys.readouterr().out
  # Tabled as plain run dirs, every run is a row, the new one still pending.
  assert [(row["model.channels"], row["status"]) for row in results.gather(
      str(tmp_path / "runs"))] == [(1, sweep.DONE), (2, sweep.DONE), (4, sweep.PENDING)]


def test_generator_rows_name_their_tokenizer(tmp_path):
  """A generator record's E and c are its frozen tokenizer's; empty columns are dropped."""
  for size, loss in (("Mu", 0.8), ("Mi", 0.6)):
    workdir = tmp_path / "g" / size
    workdir.mkdir(parents=True)
    record = dict(kind="generator", family="dit", config=dict(model=dict(size=size)),
                  params=dict(total=1000 if size == "Mu" else 8000),
                  tokenizer=dict(workdir="/runs/tok_g", bottleneck="vq", c=4, E=256,
                                 grid=[8, 8], step=800, code_bits=896.0),
                  flops_per_example=dict(forward_xla=10.0, train=30.0), examples_seen=64,
                  metrics={"eval/loss": loss})
    (workdir / "record.json").write_text(json.dumps(record))
  rows = results.gather(str(tmp_path / "g"))
  assert [(r["tokenizer"], r["bottleneck"], r["E"], r["c"], r["code_bits"], r["flops_forward"])
          for r in rows] == [("tok_g", "vq", 256, 4, 896.0, 10.0)] * 2
  names = results.columns(rows)
  assert "model.size" in names and "eval/loss" in names
  assert not {"params_encoder", "eval/psnr", "tokens_seen"} & set(names)


def test_plain_dirs_of_tokenizers_and_generators_table_fields_not_sections(tmp_path):
  """A section only generators have (sample) is tabled field by field, not as a dict cell."""
  for name, config in (("tok", dict(model=dict(channels=4))),
                       ("gen", dict(model=dict(channels=8), sample=dict(cfg_scale=3.0)))):
    (tmp_path / name).mkdir()
    (tmp_path / name / "record.json").write_text(json.dumps(dict(
        config=config, metrics={"eval/loss": 0.5}, examples_seen=64)))
  rows = {r["id"]: r for r in results.gather(str(tmp_path))}
  assert (rows["tok"]["model.channels"], rows["gen"]["model.channels"]) == (4, 8)
  assert (rows["tok"]["sample.cfg_scale"], rows["gen"]["sample.cfg_scale"]) == (None, 3.0)
  assert not any(isinstance(v, dict) for r in rows.values() for v in r.values())


def test_older_masked_generator_records_have_no_flops_until_recounted(tmp_path):
  """A LlamaGen / VAR / Infinity record written before `masked_attention` counts the pairs its
  mask hides: its FLOP columns are empty (left out of compute fits) and flagged with the command
  that recounts them; a DiT's (no mask) and a recounted record keep theirs."""
  old = dict(forward_xla=10.0, train=30.0)
  new = dict(forward_xla=10.0, masked_attention=4.0, forward=6.0, train=18.0)
  for name, family, flop in (("dit_old", "dit", old), ("var_old", "var", old),
                             ("var_new", "var", new)):
    (tmp_path / name).mkdir()
    record = dict(kind="generator", family=family, workdir=f"/runs/{name}",
                  config=dict(model=dict(family=family)), params=dict(total=1000),
                  tokenizer=dict(workdir="/runs/tok", bottleneck="msvq", c=4, E=256, grid=[8, 8]),
                  flops_per_example=flop, examples_seen=64, metrics={"eval/loss": 0.5})
    (tmp_path / name / "record.json").write_text(json.dumps(record))
  rows = {r["id"]: r for r in results.gather(str(tmp_path))}
  assert [(rows[n]["flops_forward"], rows[n]["compute"]) for n in ("dit_old", "var_old", "var_new")
          ] == [(10.0, 30.0 * 64), (None, None), (6.0, 18.0 * 64)]
  assert results.flags(list(rows.values())) == [
      "var_old: done (FLOPs of an older record count the attention pairs its masks hide; "
      "`vitok eval --workdir /runs/var_old` recounts them)"]


def test_results_of_plain_run_dirs_and_running_status(tmp_path, fake):
  """Without a manifest the swept columns are the config fields that differ across records."""
  command, _ = fake
  runs = sweep.prepare(_sweep((2, 4)), str(tmp_path / "s"))
  sweep.run_local(runs, str(tmp_path / "s"), command=command(), log=lambda _: None, poll_s=0.05)
  os.remove(tmp_path / "s" / sweep.MANIFEST)
  rows = results.gather(str(tmp_path / "s"))
  assert [r["model.channels"] for r in rows] == [2, 4]
  assert "| runs/" in results.to_markdown(rows)
  # A live pid file marks a run as running (for a second sweep process or --dry_run).
  (tmp_path / "s" / "runs" / runs[0].id / "record.json").unlink()
  (tmp_path / "s" / "runs" / runs[0].id / sweep.PID).write_text(str(os.getpid()))
  assert sweep.run_status(runs[0].workdir, 2) == sweep.RUNNING
  # Runs without a record are rows of a plain directory too: running, and failed with its flag.
  (tmp_path / "s" / "runs" / runs[1].id / "record.json").unlink()
  config_lib.write_json(os.path.join(runs[1].workdir, sweep.STATUS),
                        {"status": sweep.FAILED, "attempts": 2, "error": "ValueError: boom"})
  rows = results.gather(str(tmp_path / "s"))
  assert [(r["model.channels"], r["status"]) for r in rows] == [(2, sweep.RUNNING),
                                                                 (4, sweep.FAILED)]
  assert any("failed (ValueError: boom)" in line for line in results.flags(rows))


def test_a_pid_file_marks_its_own_process_not_a_later_one_of_that_number(tmp_path):
  """A sweep's pid file names the process (host, boot, start time): after a reboot or a container
  restart a process given the same number does not hold the run for ever. A file of another host
  holds it (that host's sweep trains it); one written before identities (a bare pid) still
  works."""
  path = str(tmp_path / sweep.PID)
  sweep._write_pid(str(tmp_path), os.getpid())
  assert sweep._alive(path)
  recorded = json.loads(open(path).read())
  assert recorded["pid"] == os.getpid() and recorded["start"] and recorded["boot"]
  for key, value in (("start", "1"), ("boot", "another-boot")):  # The number, reused.
    config_lib.write_json(path, {**recorded, key: value})
    assert not sweep._alive(path)
  config_lib.write_json(path, {**recorded, "pid": 2 ** 22 + 1, "host": "another-host"})
  assert sweep._alive(path)
  open(path, "w").write(str(os.getpid()))
  assert sweep._alive(path)
  dead = subprocess.Popen([sys.executable, "-c", ""])
  dead.wait()
  sweep._write_pid(str(tmp_path), dead.pid)
  assert not sweep._alive(path)


def test_heatmap(tmp_path):
  from vitok_jax.scaling import plots
  rows = [{"status": "done", "enc": e, "dec": d, "eval/psnr": 20 + i + 2 * j}
          for i, e in enumerate(["Mu", "Mi"]) for j, d in enumerate(["Mu", "Mi", "Ti"])]
  paths = plots.plot_heatmap(rows, "dec", "enc", "eval/psnr", str(tmp_path))
  assert all(os.path.getsize(p) > 1000 for p in paths)


def test_preempted_run_resumes_without_using_an_attempt(tmp_path, fake):
  """SIGTERM from outside: the trainer checkpoints and exits 0 without record.json. The sweep
  resumes the run and counts no attempt (max_attempts=1 would otherwise fail it at once)."""
  command, launched = fake
  runs = sweep.prepare(_sweep((1, 2)), str(tmp_path))
  for i in range(2):
    (tmp_path / "runs" / runs[0].id / f"preempt_{i}").touch()
  (tmp_path / "runs" / runs[1].id / "fail_0").touch()
  status = sweep.run_local(runs, str(tmp_path), max_attempts=1, command=command(),
                           log=lambda _: None, poll_s=0.05)
  assert status == {runs[0].id: sweep.DONE, runs[1].id: sweep.FAILED}
  assert launched().count(runs[0].id) == 3
  state = sweep.read_status(runs[0].workdir)
  assert state["attempts"] == 0 and state["preemptions"] == 2
  assert sweep.read_status(runs[1].workdir)["attempts"] == 1
  # Exit 0 with neither a record nor a checkpoint is a failed attempt, not a pre-emption.
  workdir = tmp_path / "runs" / runs[0].id
  (workdir / "record.json").unlink()
  os.rename(workdir / "checkpoints", workdir / "old_checkpoints")
  status = sweep.run_local(runs[:1], str(tmp_path), max_attempts=1, log=lambda _: None,
                           poll_s=0.05, command=lambda run: [sys.executable, "-c", "pass"])
  assert status == {runs[0].id: sweep.FAILED}
  assert "without record.json or a checkpoint" in sweep.read_status(runs[0].workdir)["error"]


def test_parallel_runs_get_their_own_gpus(tmp_path, fake):
  command, _ = fake
  runs = sweep.prepare(_sweep((1, 2, 4, 8)), str(tmp_path))
  sweep.run_local(runs, str(tmp_path), parallel=2, command=command(0.3), log=lambda _: None,
                  poll_s=0.05, gpus=["0", "1", "2", "3"])
  used = [(tmp_path / "runs" / r.id / "gpus.txt").read_text().split() for r in runs]
  assert used[:2] == [["0,1"], ["2,3"]]  # The first two run at once, on different GPUs.
  assert all(u in (["0,1"], ["2,3"]) for u in used)
  with pytest.raises(ConfigError, match="3 GPUs .* do not split evenly among 2 parallel runs"):
    sweep.run_local(runs, str(tmp_path / "again"), parallel=2, command=command(),
                    log=lambda _: None, gpus=["0", "1", "2"])
  # On CPU (JAX_PLATFORMS=cpu in the tests) nothing is pinned: the environment is inherited.
  runs = sweep.prepare(_sweep((16, 32)), str(tmp_path / "cpu"))
  sweep.run_local(runs, str(tmp_path / "cpu"), parallel=2, command=command(),
                  log=lambda _: None, poll_s=0.05)
  inherited = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
  assert [open(os.path.join(r.workdir, "gpus.txt")).read().split() for r in runs] == [
      [inherited]] * 2


def test_local_launch_gives_each_process_its_gpus(tmp_path, monkeypatch, capsys):
  spec = JobSpec(config="vitok", workdir="/w", processes_per_node=2)
  gpus = [env.get("CUDA_VISIBLE_DEVICES") for _, env in local.local_commands(spec, 1, ["0", "1",
                                                                                       "2", "3"])]
  assert gpus == ["0,1", "2,3"]
  assert all("CUDA_VISIBLE_DEVICES" not in env for _, env in local.local_commands(spec, 1))
  with pytest.raises(ConfigError, match="do not split evenly among 2 processes"):
    local.local_commands(spec, 1, ["0", "1", "2"])
  # Detection: CPU-only JAX pins nothing; CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`.
  assert local.visible_gpus({"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "0,1"}) == []
  assert local.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _script(bin_dir / "nvidia-smi", "#!/bin/bash\necho 'GPU 0: H100 (UUID: GPU-a)'\n"
          "echo 'GPU 1: H100 (UUID: GPU-b)'\n")
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  assert local.visible_gpus({}) == ["0", "1"]
  assert local.visible_gpus({"JAX_PLATFORMS": "cuda"}) == ["0", "1"]
  # A GPU split into MIG instances is their UUIDs, one per process (CUDA uses a single one).
  _script(bin_dir / "nvidia-smi", "#!/bin/bash\necho 'GPU 0: A100 (UUID: GPU-a)'\n"
          "echo '  MIG 3g.20gb     Device  0: (UUID: MIG-a0)'\n"
          "echo '  MIG 3g.20gb     Device  1: (UUID: MIG-a1)'\n"
          "echo 'GPU 1: A100 (UUID: GPU-b)'\n")
  mig = local.visible_gpus({})
  assert mig == ["MIG-a0", "MIG-a1", "1"]
  assert local.split_gpus(mig, 3) == mig
  with pytest.raises(ConfigError, match="MIG instances, and a process can use only one: run 4 parallel runs"):
    local.split_gpus(["MIG-a0", "MIG-a1", "1", "2"], 2, "parallel runs (--parallel)")
  assert launch_args.main(["local", "--processes=2", "--config=vitok", "--workdir=/w",
                           "--dry_run", "--gpus=4,5"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2
  assert "CUDA_VISIBLE_DEVICES=4 " in lines[0] and "CUDA_VISIBLE_DEVICES=5 " in lines[1]


def _script(path, text):
  path.write_text(text)
  path.chmod(0o755)


def test_slurm_array_and_log_dirs(tmp_path):
  runs = sweep.prepare(_sweep((1, 2, 4)), str(tmp_path))
  script = sweep.render_slurm_array(runs[1:], str(tmp_path), max_parallel=2, partition="gpu",
                                    gpus_per_node=1)
  assert "#SBATCH --array=0-1%2" in script and "#SBATCH --partition=gpu" in script
  assert f"#SBATCH --output={tmp_path}/logs/slurm-%A_%a.out" in script
  assert runs[1].workdir in script and runs[2].workdir in script and runs[0].workdir not in script
  assert "__VITOK_RUN_DIR__" not in script and 'workdir="${VITOK_RUN_DIR}"\n' in script
  # Each task its own port: array tasks and other jobs on a node have distinct SLURM_JOB_IDs.
  assert '"$head_node:$((12355 + SLURM_JOB_ID % 20000))"' in script
  assert f"export VITOK_COMPILATION_CACHE={tmp_path}/compilation_cache" in script
  assert "--config=" + sweep.RUN_CONFIG + ':"${VITOK_RUN_DIR}"' in script
  result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
  assert result.returncode == 0, result.stderr
  # SLURM opens --output before the script runs: the logs directory is made with the script.
  assert not (tmp_path / "logs").exists()
  with pytest.raises(ConfigError):  # A bad job field: nothing is written.
    sweep.write_slurm_array(runs, str(tmp_path), nodes=0)
  assert not (tmp_path / "logs").exists() and not (tmp_path / "sweep.sbatch").exists()
  path = sweep.write_slurm_array(runs, str(tmp_path))
  assert (tmp_path / "logs").is_dir() and open(path).read().count("#SBATCH --array=0-2") == 1
  assert launch_args.main(["slurm", "--config=vitok", f"--workdir={tmp_path}/dry",
                           "--dry_run"]) == 0
  assert not (tmp_path / "dry").exists()
  assert launch_args.main(["slurm", "--config=vitok", f"--workdir={tmp_path}/w"]) == 0
  assert (tmp_path / "w" / "logs").is_dir() and (tmp_path / "w" / "launch.sbatch").exists()


def test_slurm_script_survives_a_node_list_longer_than_a_pipe_and_gives_srun_the_cpus(tmp_path):
  """`set -o pipefail` ends the script when a command of a pipe fails: the coordinator's host is
  read from `scontrol show hostnames` without closing the pipe before scontrol has written every
  node (a long list would die of SIGPIPE); srun gets --cpus-per-task itself (SLURM >= 22.05 no
  longer passes sbatch's on, and each task would have one CPU)."""
  bin_dir, workdir = tmp_path / "bin", tmp_path / "w"
  bin_dir.mkdir()
  _script(bin_dir / "scontrol", '#!/bin/bash\n[ "$1" = show ] && for i in $(seq 1 40000); '
          'do echo "node-$i.a-rather-long-cluster-domain.example.org"; done\nexit 0\n')
  _script(bin_dir / "srun", f'#!/bin/bash\necho "$VITOK_COORDINATOR $1 $2" > {tmp_path}/srun\n')
  assert launch_args.main(["slurm", "--config=vitok", f"--workdir={workdir}",
                           "--cpus_per_task=6"]) == 0
  (workdir / "record.json").write_text("{}")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7",
             SLURM_JOB_NODELIST="node-[1-40000]", SLURM_NTASKS="1")
  result = subprocess.run(["bash", str(workdir / "launch.sbatch")], env=env, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "srun").read_text().split() == [
      "node-1.a-rather-long-cluster-domain.example.org:12362", "--kill-on-bad-exit=1",
      "--cpus-per-task=6"]


@pytest.mark.parametrize("srun_exit, record_steps, requeued", [
    (0, None, True), (0, 5, False), (0, 3, True), (1, None, False), (0, "no steps", False)])
def test_slurm_script_requeues_a_stopped_run(tmp_path, srun_exit, record_steps, requeued):
  """After the time-limit SIGTERM the trainer exits 0 without record.json, or with the record of a
  shorter run it extends (its steps before the newest checkpoint's): the job requeues itself (the
  job would end COMPLETED, which --requeue does not relaunch); finished or failed: not."""
  bin_dir, workdir = tmp_path / "bin", tmp_path / "w"
  bin_dir.mkdir()
  # The trainer stand-in saves checkpoint step 5 when it stops (as SIGTERM makes it).
  _script(bin_dir / "srun", f"#!/bin/bash\nmkdir -p {workdir}/checkpoints/5\nexit {srun_exit}\n")
  _script(bin_dir / "scontrol", f'#!/bin/bash\n[ "$1" = show ] && echo node1\n'
          f'[ "$1" = requeue ] && echo "$@" >> {tmp_path}/requeued\nexit 0\n')
  assert launch_args.main(["slurm", "--config=vitok", f"--workdir={workdir}"]) == 0
  if record_steps is not None:  # As the trainer writes it (indented); one without steps: done.
    record = ({"config": {"total_steps": 9}, "steps": record_steps}
              if record_steps != "no steps" else {})
    (workdir / "record.json").write_text(json.dumps(record, indent=1))
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42",
             SLURM_JOB_NODELIST="node1", SLURM_NTASKS="1")
  run = lambda: subprocess.run(["bash", str(workdir / "launch.sbatch")], env=env,
                               capture_output=True, text=True)
  result = run()
  assert result.returncode == srun_exit, result.stderr
  assert (tmp_path / "requeued").exists() == requeued
  if requeued:
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "42"]
    assert "requeueing job 42" in result.stderr
    # The requeued job stops again at step 5, no step trained: it ends instead of looping.
    os.remove(tmp_path / "requeued")
    result = run()
    assert result.returncode == 1 and not (tmp_path / "requeued").exists()
    assert "stopped again at checkpoint step 5 without training a step" in result.stderr


def test_a_slurm_task_claims_its_run_so_no_other_sweep_trains_it_at_once(tmp_path, fake,
                                                                          monkeypatch):
  """A task's lease makes its run "running" to every other sweep (another array, a local sweep)
  until it books the exit or the job's time is up; its own job, requeued, takes it again."""
  runs = sweep.prepare(_sweep((1, 2)), str(tmp_path))
  workdir = runs[0].workdir
  assert sweep.claim_for_job(workdir, 2, "7", 3600) == "claimed"
  assert sweep.run_status(workdir, 2) == sweep.RUNNING
  assert sweep.claim_for_job(workdir, 2, "8", 3600) == sweep.RUNNING  # Another job's task.
  assert sweep.claim_for_job(workdir, 2, "7", 3600) == "claimed"  # Job 7 requeued.
  command, launched = fake
  status = sweep.run_local(runs, str(tmp_path), command=command(), log=lambda _: None,
                           poll_s=0.05)
  assert status == {runs[0].id: sweep.RUNNING, runs[1].id: sweep.DONE}
  assert runs[0].id not in launched()
  assert sweep.claim_for_job(runs[1].workdir, 2, "9", 3600) == sweep.DONE
  config_lib.write_json(os.path.join(runs[1].workdir, sweep.LEASE), dict(job="9", until=1e12))
  assert sweep.claim_for_job(runs[1].workdir, 2, "9", 3600) == sweep.DONE  # Even its own.
  assert sweep.book(workdir, 1, 2) == sweep.PENDING  # Booking ends the lease.
  assert not os.path.exists(os.path.join(workdir, sweep.LEASE))
  assert sweep.claim_for_job(workdir, 2, "9", 0) == "claimed"  # A lease whose time is up ...
  assert sweep.run_status(workdir, 2) == sweep.PENDING  # ... holds nothing.
  assert cli.main(["vitok", "sweep_claim", workdir, "10", "60"]) == 0
  assert sweep.run_status(workdir, 2) == sweep.RUNNING
  # Where squeue can tell, a lease of a job no longer queued (scancel'ed) holds nothing.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _script(bin_dir / "squeue", '#!/bin/bash\n[ "$3" = 10 ] && [ -n "$FAKE_QUEUED" ] && '
          'echo RUNNING\nexit 0\n')
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_QUEUED", "1")
  assert sweep.run_status(workdir, 2) == sweep.RUNNING
  monkeypatch.delenv("FAKE_QUEUED")
  assert sweep.run_status(workdir, 2) == sweep.PENDING


def test_a_file_system_without_flock_books_without_the_lock(tmp_path, monkeypatch, capsys):
  """Lustre mounted noflock or NFS with nolock refuse flock: claims and bookings go on (before,
  SLURM bookings took no lock at all), saying so."""
  import errno  # pylint: disable=g-import-not-at-top
  import fcntl  # pylint: disable=g-import-not-at-top
  def no_flock(*_):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_flock)
  runs = sweep.prepare(_sweep((1,)), str(tmp_path))
  assert sweep.claim_for_job(runs[0].workdir, 2, "7", 3600) == "claimed"
  assert sweep.book(runs[0].workdir, 1, 2) == sweep.PENDING
  assert "going on without the lock" in capsys.readouterr().err


def test_slurm_array_task_books_its_run_like_a_local_sweep(tmp_path):
  """An array task records each trainer exit in the run's sweep_status.json (as `vitok results`
  reads it) and requeues itself while the run is pending: a pre-emption, or a failure with an
  attempt left; the second failure is final (the task exits with it), a finished run is done."""
  runs = sweep.prepare(_sweep((1,)), str(tmp_path), max_attempts=2)
  workdir = runs[0].workdir
  path = sweep.write_slurm_array(runs, str(tmp_path))
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _script(bin_dir / "srun", '#!/bin/bash\necho "trainer output: $FAKE_SAYS"\nexit $FAKE_EXIT\n')
  _script(bin_dir / "scontrol", f'#!/bin/bash\n[ "$1" = show ] && echo node1\n'
          f'[ "$1" = requeue ] && echo "$@" >> {tmp_path}/requeued\nexit 0\n')
  vitok_bin = os.path.dirname(shutil.which("vitok") or sys.executable)

  def task(exit_code, says):
    log = tmp_path / "logs" / "slurm-7_0.out"
    env = dict(os.environ, PATH=f"{bin_dir}:{vitok_bin}:{os.environ['PATH']}", SLURM_JOB_ID="8",
               SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID="0", SLURM_JOB_NODELIST="node1",
               SLURM_NTASKS="1", FAKE_EXIT=str(exit_code), FAKE_SAYS=says)
    with open(log, "a") as out:  # SLURM writes the task's output there.
      result = subprocess.run(["bash", path], env=env, stdout=out, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    requeued = (tmp_path / "requeued").exists()
    if requeued:
      os.remove(tmp_path / "requeued")
    return result.returncode, requeued, sweep.read_status(workdir)

  code, requeued, status = task(1, "CUDA error 1")
  assert (code, requeued, status["attempts"], status["status"]) == (0, True, 1, "failed")
  assert "CUDA error 1" in status["error"]
  assert sweep.run_status(workdir, 2) == sweep.PENDING
  os.makedirs(os.path.join(workdir, "checkpoints", "100"))  # Pre-empted: exit 0, a checkpoint.
  code, requeued, status = task(0, "saved")
  assert (code, requeued, status["attempts"], status["status"]) == (0, True, 1, "preempted")
  os.makedirs(os.path.join(workdir, "checkpoints", "200"))  # Trained on, pre-empted again.
  code, requeued, status = task(0, "saved")
  assert (code, requeued, status["attempts"], status["preemptions"]) == (0, True, 1, 2)
  # Pre-empted again at the same step (nothing trained since): an attempt, not a requeue for ever.
  code, requeued, status = task(0, "saved again")
  assert (code, requeued, status["attempts"], status["status"]) == (0, False, 2, "failed")
  assert "pre-empted again at checkpoint step 200" in status["error"]
  status["attempts"], status["status"] = 1, "preempted"  # Back to one attempt left.
  config_lib.write_json(os.path.join(workdir, sweep.STATUS), status)
  code, requeued, status = task(3, "CUDA error 2")
  assert (code, requeued, status["attempts"]) == (3, False, 2)
  assert sweep.run_status(workdir, 2) == sweep.FAILED and "CUDA error 2" in status["error"]
  with open(os.path.join(workdir, "record.json"), "w") as f:
    f.write("{}")
  assert task(0, "done")[:2] == (0, False)


def test_a_slurm_array_task_in_a_directory_with_spaces_gets_its_run_dir_whole(tmp_path):
  """The run dir reaches the trainer as one argument, and #SBATCH --output is quoted (sbatch ends
  an argument at unquoted whitespace)."""
  sweep_dir = tmp_path / "my sweep #1"
  runs = sweep.prepare(_sweep((1, 2)), str(sweep_dir))
  path = sweep.write_slurm_array(runs, str(sweep_dir))
  script = open(path).read()
  assert f'#SBATCH --output="{sweep_dir}/logs/slurm-%A_%a.out"' in script.splitlines()
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _script(bin_dir / "srun", '#!/bin/bash\nshift 2\nexec "$@"\n')  # Runs `bash -c ...` itself.
  _script(bin_dir / "scontrol", '#!/bin/bash\n[ "$1" = show ] && echo node1\nexit 0\n')
  # The trainer notes its arguments and fails; sweep_claim claims, sweep_book books a failure.
  _script(bin_dir / "vitok", f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/$1.args\n'
          'case "$1" in sweep_claim) echo claimed;; sweep_book) echo failed;; *) exit 1;; esac\n')
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="8",
             SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID="1", SLURM_JOB_NODELIST="node1",
             SLURM_NTASKS="1")
  result = subprocess.run(["bash", path], env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1, result.stderr
  train = (tmp_path / "train.args").read_text().splitlines()
  assert train == ["train", f"--config={sweep.RUN_CONFIG}:{runs[1].workdir}",
                   f"--workdir={runs[1].workdir}"]
  assert (tmp_path / "sweep_book.args").read_text().splitlines()[:3] == [
      "sweep_book", runs[1].workdir, "1"]
  assert (tmp_path / "sweep_claim.args").read_text().splitlines() == [
      "sweep_claim", runs[1].workdir, "8", str(24 * 3600)]  # The lease lasts the job's time.
  with pytest.raises(ConfigError, match="cannot hold a double quote"):
    sweep.render_slurm_array(runs, str(tmp_path / 'a"b'))


# Stands in for gcloud: logs each call (argv as JSON); `queued-resources describe` prints the
# states of FAKE_TPU_STATES one call at a time (the last repeats); `tpu-vm ssh` exits 3 when its
# argv contains FAKE_SSH_FAIL.
FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
      f.write(json.dumps(args) + "\\n")
    if args[2:4] == ["queued-resources", "describe"]:
      if "--format=value(name)" in args:
        sys.exit(0 if os.environ.get("FAKE_TPU_EXISTS") else 1)
      path = os.environ["FAKE_TPU_STATES"]
      states = open(path).read().split()
      print(states[0])
      open(path, "w").write(" ".join(states[1:] or states))
    elif args[2:4] == ["queued-resources", "create"] and os.environ.get("FAKE_TPU_EXISTS"):
      sys.exit("ERROR: already exists")
    elif args[2:4] == ["tpu-vm", "ssh"] and os.environ.get("FAKE_SSH_FAIL"):
      failed = os.environ["FAKE_SSH_FAIL"] in " ".join(args)
      sys.exit(int(os.environ.get("FAKE_SSH_EXIT", 3)) if failed else 0)
""")


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
  """A fake gcloud first on PATH; returns (set the queued-resource states, the calls so far)."""
  bin_dir = tmp_path / "gcloud_bin"
  bin_dir.mkdir()
  _script(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
  log, states = tmp_path / "gcloud.log", tmp_path / "tpu_states"
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
  monkeypatch.setenv("FAKE_TPU_STATES", str(states))
  monkeypatch.setenv("VITOK_TPU_POLL_S", "0")

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return states.write_text, calls


def _ssh_command(call):
  """The --command of a logged `gcloud compute tpus tpu-vm ssh` call."""
  return next(a.split("=", 1)[1] for a in call if a.startswith("--command="))


TPU = ["tpu", "--tpu_name=pod", "--zone=z", "--accelerator_type=v5litepod-8", "--config=vitok",
       "--workdir=/shared/w"]


def test_tpu_launch_waits_for_active_then_installs_and_runs(gcloud):
  set_states, calls = gcloud
  set_states("WAITING_FOR_RESOURCES PROVISIONING ACTIVE")
  assert launch_args.main([*TPU, "--repo_url=https://example.com/vitok_jax.git"]) == 0
  verbs = [" ".join(call[2:4]) for call in calls()]
  assert verbs == ["queued-resources create"] + ["queued-resources describe"] * 3 + [
      "tpu-vm ssh"] * 2
  assert "--runtime-version=v2-alpha-tpuv5-lite" in calls()[0]
  setup, job = calls()[4], calls()[5]
  assert "--worker=all" in setup and "--worker=all" in job
  assert "git clone -q https://example.com/vitok_jax.git ~/vitok_jax" in _ssh_command(setup)
  assert "python3 -m pip install -q -e ." in _ssh_command(setup)
  assert "python3 -m vitok_jax.cli train --config=vitok --workdir=/shared/w --distributed=auto" in (
      _ssh_command(job))


def test_tpu_launch_reuses_an_existing_pod_and_stops_on_a_failed_one(gcloud, monkeypatch, capfd):
  set_states, calls = gcloud
  monkeypatch.setenv("FAKE_TPU_EXISTS", "1")
  set_states("ACTIVE")
  assert launch_args.main([*TPU, "--runtime_version=custom-rt"]) == 0
  assert "--runtime-version=custom-rt" in calls()[0]
  assert [c[3] for c in calls()] == ["create", "describe", "describe", "ssh"]
  assert "queued resource pod exists: using it" in capfd.readouterr().err
  monkeypatch.delenv("FAKE_TPU_EXISTS")
  set_states("WAITING_FOR_RESOURCES SUSPENDED")
  before = len(calls())
  assert launch_args.main(TPU) == 1
  assert [c[3] for c in calls()[before:]] == ["create", "describe", "describe"]  # No ssh.
  err = capfd.readouterr().err
  assert "queued resource pod is WAITING_FOR_RESOURCES; waiting for ACTIVE" in err
  assert "queued resource pod is SUSPENDED and will not become ACTIVE" in err


def test_tpu_layout_is_checked_before_a_pod_is_provisioned(gcloud, tmp_path, capsys):
  """The slice's devices and hosts follow from its accelerator type (v4/v5p count TensorCores, two
  per chip; v5e/v6e count chips; four chips per host beyond one host's 8); a mesh or batch the
  trainer would refuse on them is refused before anything is created, as is a sweep's."""
  assert [tpu.slice_devices(a) for a in ("v4-32", "v5p-128", "v5litepod-8", "v5litepod-16",
                                         "v6e-64", "v3-8")] == [
      (16, 4), (64, 16), (8, 1), (16, 4), (64, 16), None]
  set_states, calls = gcloud
  set_states("ACTIVE")
  pod = [*TPU[:3], "--accelerator_type=v5litepod-16", *TPU[4:]]
  for override, says in (
      ("--config.mesh.fsdp=32", "16 devices"),
      ("--config.mesh.dcn_data=2", "one TPU slice is one DCN group"),
      ("--config.batch_size=12", "divisible by the 16 batch shards (mesh data x fsdp) and 4 "
                                 "processes (a v5litepod-16 slice has 16 devices on 4 host(s))")):
    assert launch_args.main([*pod, override]) == 2
    assert says in capsys.readouterr().err
  assert calls() == []  # Nothing provisioned.
  assert launch_args.main([*pod, "--config.batch_size=32"]) == 0 and calls()
  sweep_dir = str(tmp_path / "q")
  assert cli.main(["vitok", "sweep", "quickstart", f"--sweep_dir={sweep_dir}", "--target=tpu",
                   "--job=tpu_name=pod,zone=z,accelerator_type=v5p-128"]) == 2
  assert "batch_size=32 must be divisible by the 64 batch shards" in capsys.readouterr().err
  assert not os.path.exists(sweep_dir)


def test_tpu_runtime_version_follows_the_accelerator():
  def version(accelerator, **kw):
    return tpu.runtime_version(JobSpec(config="vitok", workdir="/w", accelerator_type=accelerator,
                                       **kw))
  assert [version(a) for a in ("v5litepod-64", "v5p-128", "v4-32", "v6e-8")] == [
      "v2-alpha-tpuv5-lite", "v2-alpha-tpuv5", "tpu-ubuntu2204-base", "v2-alpha-tpuv6e"]
  with pytest.raises(ConfigError, match="no default TPU runtime version .* --runtime_version="
                     "tpu-ubuntu2204-base to `vitok launch tpu`"):
    version("v3-8")
  assert version("v3-8", runtime_version="tpu-vm-base") == "tpu-vm-base"


def _git(*args, cwd):
  return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                        check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_tpu_install_checks_out_the_pinned_ref_on_every_worker(tmp_path):
  """The provisioning step's install command, run here as a worker would, with a local repository
  as repo_url: it clones and checks out repo_ref (a commit; then, in the existing clone, a branch
  moved on since), installs that checkout, and names the fix for a ref the remote lacks."""
  origin, home, bin_dir = tmp_path / "origin", tmp_path / "home", tmp_path / "bin"
  for folder in (origin, home, bin_dir):
    folder.mkdir()
  _script(bin_dir / "python3", f'#!/bin/bash\necho "$PWD $*" >> {tmp_path}/installed\n')
  _git("init", "-q", "-b", "main", cwd=origin)

  def commit(text):
    (origin / "f").write_text(text)
    _git("add", "f", cwd=origin)
    _git("commit", "-qm", text, cwd=origin)
    return _git("rev-parse", "HEAD", cwd=origin)

  def worker(ref):
    spec = JobSpec(config="vitok", workdir="/w", tpu_name="pod", zone="z",
                   accelerator_type="v5litepod-8", repo_url=str(origin), repo_ref=ref)
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", tpu.install_command(spec)], env=env,
                          capture_output=True, text=True)

  first, checkout = commit("one"), home / "vitok_jax"
  commit("two")
  assert worker(first).returncode == 0 and _git("rev-parse", "HEAD", cwd=checkout) == first
  third = commit("three")
  assert worker("main").returncode == 0 and _git("rev-parse", "HEAD", cwd=checkout) == third
  result = worker("no-such-ref")
  assert result.returncode == 1
  assert "repo_ref no-such-ref could not be checked out on TPU worker" in result.stderr
  assert (tmp_path / "installed").read_text().splitlines() == [
      f"{checkout} -m pip install -q -e . jax[tpu]"] * 2
  with pytest.raises(ConfigError, match="pass --repo_url too"):
    JobSpec(config="vitok", workdir="/w", repo_ref=first)
  for bad in ("main; rm -rf /", "--orphan"):
    with pytest.raises(ConfigError, match="a commit, tag or branch"):
      JobSpec(config="vitok", workdir="/w", repo_url=str(origin), repo_ref=bad)


def test_tpu_job_checks_the_checkout_and_shared_files_on_the_worker(tmp_path):
  """The job's remote command, run here as a worker would: a missing repo_dir or config fails
  with a message naming the fix; with both it runs the trainer from the checkout."""
  home, bin_dir, config = tmp_path / "home", tmp_path / "bin", tmp_path / "shared" / "config.json"
  bin_dir.mkdir()
  _script(bin_dir / "python3", f'#!/bin/bash\necho "$PWD $*" > {tmp_path}/ran\n')
  spec = JobSpec(config="cfg.py:x", workdir="/shared/w", tpu_name="pod", zone="z",
                 accelerator_type="v5litepod-8", compilation_cache="/shared/xla")
  remote = _ssh_command(shlex.split(tpu.job_command(spec, require=[str(config)])))
  env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")

  def worker():
    return subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True)
  result = worker()
  assert result.returncode == 1 and "~/vitok_jax not found on TPU worker" in result.stderr
  assert "pass --repo_url" in result.stderr
  (home / "vitok_jax").mkdir(parents=True)
  result = worker()
  assert result.returncode == 1 and f"{config} not found on TPU worker" in result.stderr
  assert "a file system every worker mounts at the same path" in result.stderr
  config.parent.mkdir()
  config.write_text("{}")
  assert worker().returncode == 0
  assert (tmp_path / "ran").read_text().split() == [
      str(home / "vitok_jax"), "-m", "vitok_jax.cli", "train", "--config=cfg.py:x",
      "--workdir=/shared/w", "--distributed=auto"]


def test_tpu_job_prints_paths_with_shell_characters_and_needs_an_absolute_workdir(tmp_path):
  """A quote, $(...) or backtick in a path the worker checks is printed in its message, not run
  by the worker's shell (the whole command would not parse); a relative workdir, which each
  worker would resolve in its own checkout, is refused."""
  odd = tmp_path / 'sweep "x" $(touch ran) `touch ran2`' / "config.json"
  spec = JobSpec(config="cfg.py:x", workdir="/shared/w", tpu_name="pod", zone="z",
                 accelerator_type="v5litepod-8", repo_dir=str(tmp_path))
  remote = _ssh_command(shlex.split(tpu.job_command(spec, require=[str(odd)])))
  result = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, cwd=tmp_path)
  assert result.returncode == 1 and f"vitok: {odd} not found on TPU worker" in result.stderr
  assert not (tmp_path / "ran").exists() and not (tmp_path / "ran2").exists()
  relative = JobSpec(config="cfg.py:x", workdir="runs/w", tpu_name="pod", zone="z",
                     accelerator_type="v5litepod-8")
  with pytest.raises(ConfigError, match="a TPU job needs an absolute path"):
    tpu.job_command(relative)


def test_tpu_sweep_creates_the_pod_once_then_runs_each_run_on_it(tmp_path, gcloud, monkeypatch):
  set_states, calls = gcloud
  set_states("PROVISIONING ACTIVE")
  runs = sweep.prepare(_sweep((1, 2, 4)), str(tmp_path))
  path = sweep.write_tpu_script(runs, str(tmp_path), tpu_name="pod", zone="z",
                                accelerator_type="v5litepod-8")
  monkeypatch.setenv("FAKE_SSH_FAIL", runs[1].id)  # A failed run does not stop the others.
  result = subprocess.run(["bash", path], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  # Each exit is booked as a local sweep books it (the fake trainer writes no record: 1 attempt).
  assert f"run {runs[1].id}: pending (exit 3)" in result.stderr
  assert sweep.read_status(runs[1].workdir)["attempts"] == 1
  assert sweep.read_status(runs[1].workdir)["returncode"] == 3
  verbs = [" ".join(call[2:4]) for call in calls()]
  assert verbs == ["queued-resources create"] + ["queued-resources describe"] * 2 + [
      "tpu-vm ssh"] * 3
  for run, call in zip(runs, calls()[3:]):
    remote = _ssh_command(call)
    assert f"--config=configs/sweeps/_run.py:{run.workdir} --workdir={run.workdir}" in remote
    assert f"test -f {run.workdir}/config.json" in remote
    assert f"VITOK_COMPILATION_CACHE={tmp_path}/compilation_cache" in remote
  # Run again: a finished run is skipped; an unreachable pod (ssh 255) stops the script and is
  # no attempt of the run it was to train.
  (tmp_path / "runs" / runs[0].id / "record.json").write_text("{}")
  monkeypatch.setenv("FAKE_SSH_EXIT", "255")
  result = subprocess.run(["bash", path], capture_output=True, text=True)
  assert result.returncode == 255 and "the pod is unreachable" in result.stderr
  assert f"run {runs[0].id}: done already" in result.stderr
  assert sweep.read_status(runs[1].workdir)["attempts"] == 1  # Unchanged.
  assert [" ".join(call[2:4]) for call in calls()].count("tpu-vm ssh") == 3 + 1


def test_cli_sweep_dry_run_slurm_and_tpu(tmp_path, capsys):
  sweep_dir = str(tmp_path / "q")
  assert cli.main(["vitok", "sweep", "quickstart", f"--sweep_dir={sweep_dir}", "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert out.count("pending") == 5
  assert not os.path.exists(sweep_dir)  # A dry run writes nothing (no manifest, no run dirs).
  assert cli.main(["vitok", "sweep", "quickstart", f"--sweep_dir={sweep_dir}", "--target=slurm",
                   "--job=partition=cpu,cpus_per_task=2,time=UNLIMITED"]) == 0
  assert "5 of 5 runs to do" in capsys.readouterr().out
  script = open(os.path.join(sweep_dir, "sweep.sbatch")).read()
  assert "--array=0-4\n" in script and "#SBATCH --time=UNLIMITED\n" in script
  # The array's limit on tasks at once.
  assert cli.main(["vitok", "sweep", "quickstart", f"--sweep_dir={sweep_dir}", "--target=slurm",
                   "--job=max_parallel=2"]) == 0
  assert "--array=0-4%2\n" in open(os.path.join(sweep_dir, "sweep.sbatch")).read()
  assert os.path.isdir(os.path.join(sweep_dir, "logs"))
  assert cli.main(["vitok", "sweep", "quickstart", f"--sweep_dir={sweep_dir}", "--target=tpu",
                   "--job=tpu_name=pod,zone=z,accelerator_type=v5p-8"]) == 0
  assert f"bash {sweep_dir}/sweep_tpu.sh" in capsys.readouterr().out
  script = open(os.path.join(sweep_dir, "sweep_tpu.sh")).read()
  assert script.count("queued-resources create") == 1 and script.count("--worker=all") == 5
  manifest = open(os.path.join(sweep_dir, "sweep.json")).read()
  assert cli.main(["vitok", "sweep", "quickstart", f"--sweep_dir={sweep_dir}", "--target=tpu",
                   "--job=tpu_name=pod,zone=z,accelerator_type=v3-8"]) == 2
  assert "--job=runtime_version=tpu-ubuntu2204-base to `vitok sweep" in capsys.readouterr().err
  assert open(os.path.join(sweep_dir, "sweep.json")).read() == manifest  # Refused before writing.
  # A bucket URL would become a local directory named gs:, on any target.
  assert cli.main(["vitok", "sweep", "quickstart", "--sweep_dir=gs://bucket/q"]) == 2
  assert "--sweep_dir='gs://bucket/q' is a URL" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["sweep"], "'quickstart', 'tokenizer_kinds'] in configs/sweeps/"),
    (["sweep", "nosuch"], "no sweep 'nosuch' in configs/sweeps/: use one of ['bottleneck'"),
    (["sweep", "bottleneck:res=abc"], "res='abc' in bottleneck:'res=abc' must be an integer"),
    (["sweep", "encoder_decoder:gpu"], "the argument is one of ['cpu', 'imagenet']"),
    (["sweep", "quickstart", "--target=slurm", "--job=gpus_per_node=abc"], "takes an integer"),
    (["sweep", "quickstart", "--target=slurm", "--job=workdir=x"],
     "'workdir' is no job field; use one from ['nodes'"),
    (["sweep", "quickstart", "--target=slurm", "--job=compilation_cache=x"], "is no job field"),
    (["sweep", "quickstart", "--target=slurm", "--job=command=eval"], "'command' is no job field"),
    (["sweep", "quickstart", "--target=slurm", "--job=nodes=0"], "nodes=0"),
    (["sweep", "quickstart", "--target=slurm", "--job=max_parallel=-1"], "must be >= 0"),
    (["sweep", "quickstart", "--target=slurm", "--job=time=00:01:30"],
     "time='00:01:30': the trainer is told to save 120 s before the limit"),
    (["sweep", "quickstart", "--target=slurm", "--job=time=banana"], "is no SLURM time limit"),
    (["sweep", "quickstart", "--target=slurm", "--job=coordinator_port=99999"],
     "coordinator_port=99999: use 1024..45535"),
    (["sweep", "quickstart", "--target=slurm", "--job=cpus_per_task=0"], "cpus_per_task=0 >= 1"),
    (["sweep", "SLURM_TYPO", "--target=slurm"],
     "sweep.slurm gpu_per_node=1: 'gpu_per_node' is no job field"),
    (["sweep", "SLURM_STR", "--target=slurm"], "sweep.slurm gpus_per_node='two': gpus_per_node "
     "takes an integer"),
    (["sweep", "quickstart", "--target=tpu", "--job=max_parallel=2"], "is no job field"),
    (["sweep", "quickstart", "--target=tpu", "--job=tpu_name=p"],
     "needs --job=tpu_name=NAME,zone=ZONE,accelerator_type=TYPE; missing ['zone', "),
    (["sweep", "quickstart", "--job=partition=gpu", "--dry_run"],
     "pass it with --target=slurm or --target=tpu"),
    (["results", "NOPE"], "NOPE is not a directory: pass a sweep directory"),
    (["fit", "NOPE"], "NOPE is not a directory: pass a sweep directory"),
    (["compile", "--devices=abc"], "--devices=abc: pass a number of devices"),
    (["compile", "--devices=-4"], "--devices=-4: pass a number of devices >= 0"),
    (["compile", "--device_memory_gb=-1"], "--device_memory_gb=-1: pass the memory of one device"),
    (["compile", "--config=generator:dit/Mi,tokenizer=NOPE"], "compile takes tokenizer configs"),
    (["tokenize", "--workdir=NOPE", "--max_examples=-5"], "--max_examples=-5 must be >= 0"),
    (["train", "--config", "vitok:Mu-Mi/4,c=8,foo=1"], "error: unknown variant option 'foo'"),
    (["train", "--config", "vitok:Mu-Mi/4,c=8", "--config.optim.warmup_stepz=1"],
     "--config.optim.warmup_stepz: config.optim has no field 'warmup_stepz'; its fields are"),
    (["train", "--config", "vitok:Mu-Mi/4,c=8", "--config.nope=1"], "config has no field 'nope'"),
    # A launch checks the config its processes will load before it writes or submits anything.
    (["launch", "slurm", "--config=vitok:Mu-Mu/4,c=abc", "--workdir=NOPE"], "c=abc: expected"),
    (["launch", "slurm", "--config=vitok:Mu-Mu/4", "--workdir=NOPE", "--dry-run"],
     "--dry-run: did you mean --dry_run?"),
    (["launch", "slurm", "--config=vitok:Mu-Mu/4", "--config.model.patch=(3, 3)",
      "--workdir=NOPE"], "model.patch size 3 does not divide data.res=256"),
    (["launch", "tpu", "--config=vitok:Mu-Mu/4", "--config.model.patc=4", "--workdir=NOPE",
      "--tpu_name=p", "--zone=z", "--accelerator_type=v5p-8"], "config.model has no field 'patc'"),
    (["launch", "slurm", "--config=vitok:Mu-Mu/4", "--config.mesh.data=3", "--gpus_per_node=4",
      "--workdir=NOPE"], "need 3 devices exactly, but there are 4; make their product equal 4"),
    (["launch", "slurm", "--config=vitok:Mu-Mu/4", "--config.mesh.tensor=2", "--processes=8",
      "--gpus_per_node=8", "--workdir=NOPE"], "mesh.tensor=2 spans processes (1 GPU(s) each)"),
    (["launch", "slurm", "--config=vitok:Mu-Mu/4,batch=12", "--nodes=2", "--gpus_per_node=8",
      "--workdir=NOPE"], "batch_size=12 must be divisible by the 16 batch shards (mesh data x "
     "fsdp) and 2 processes (the job has nodes × gpus_per_node = 2 × 8 GPUs)"),
    (["sweep", "quickstart", "--parallel=0"], "--parallel=0: run at least one run at a time"),
    # A local sweep's generators read their tokenizer here: one missing fails no run.
    (["sweep", "generator_size:NOPE"], "NOPE is not a tokenizer run (no checkpoints/); train one "
     "there first with the bottleneck the generator family reads (`vitok train --config "
     "vitok:VARIANT --workdir NOPE`"),
    (["sweep", "quickstart", "--target=slurm", "--job=gpus_per_node=3"],
     "batch_size=32 must be divisible by the 3 batch shards"),
    (["sweep", "MESH3", "--target=slurm", "--job=gpus_per_node=4"],
     "need 3 devices exactly, but there are 4; make their product equal 4 (or use -1 for one axis)"
     " (the job has nodes × gpus_per_node = 1 × 4 GPUs)"),
])
def test_cli_bad_arguments_say_what_to_change(tmp_path, capsys, args, says):
  """Exit 2 with one line naming the argument and what to pass; no traceback, nothing written."""
  nope, sweep_dir = str(tmp_path / "NOPE"), str(tmp_path / "s")
  (tmp_path / "mesh3.py").write_text(textwrap.dedent("""
      import ml_collections
      def get_config(arg=""):
        sweep = ml_collections.ConfigDict()
        sweep.base = "vitok:Mu-Mu/4,res=16,data=mnist,batch=6,steps=2"
        sweep.axes = [("product", {"mesh.data": [3]})]
        return sweep
  """))
  for name, slurm in (("slurm_typo", "dict(gpu_per_node=1)"),
                      ("slurm_str", "{'gpus_per_node': 'two'}")):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import ml_collections
        def get_config(arg=""):
          return ml_collections.ConfigDict(dict(
              base="vitok:Mu-Mu/4,res=16,data=mnist,batch=6,steps=2",
              axes=[("product", {{"model.channels": [2]}})], slurm={slurm}))
    """))
  files = {"MESH3": "mesh3.py", "SLURM_TYPO": "slurm_typo.py", "SLURM_STR": "slurm_str.py"}
  args = [nope if arg == "NOPE" else str(tmp_path / files[arg]) if arg in files else
          arg.replace(":NOPE", f":{nope}") for arg in args]
  says = says.replace("NOPE", nope)
  if args[0] == "sweep":
    args.append(f"--sweep_dir={sweep_dir}")
  assert cli.main(["vitok", *args]) == 2
  err = capsys.readouterr().err
  assert says in err and "Traceback" not in err, err
  assert not os.path.exists(sweep_dir)  # A bad --job is refused before the runs are written.
  assert not os.path.exists(nope)


def test_a_sweep_dir_of_another_sweep_is_refused_before_anything_is_written(tmp_path, capsys):
  """`vitok sweep tokenizer_kinds --sweep_dir` a quickstart sweep's directory would replace its
  manifest (its runs then left out of the table and fits): refused, also for --dry_run; the same
  sweep with other axes is its documented re-expansion."""
  sweep_dir = str(tmp_path / "s")
  sweep.prepare(_sweep((1, 2)), sweep_dir)
  manifest = open(os.path.join(sweep_dir, sweep.MANIFEST)).read()
  other = _sweep((1, 2))
  other.name = "other"
  with pytest.raises(ConfigError, match=r"holds the sweep 'test', not 'other'.*another --sweep_dir"
                     ):
    sweep.prepare(other, sweep_dir)
  for extra in ([], ["--dry_run"]):
    assert cli.main(["vitok", "sweep", "quickstart:steps=5", f"--sweep_dir={sweep_dir}",
                     *extra]) == 2
    assert "holds the sweep 'test', not 'quickstart'" in capsys.readouterr().err
  assert open(os.path.join(sweep_dir, sweep.MANIFEST)).read() == manifest
  assert len(sweep.prepare(_sweep((1, 2, 4)), sweep_dir)) == 3


def test_cli_results_and_fit_need_runs(tmp_path, fake, capsys):
  """results and fit of a directory without runs, and fit of a sweep none of whose runs has
  finished, are errors (exit 2) that say so, not an empty table or a failed fit (exit 0)."""
  empty = tmp_path / "empty"
  empty.mkdir()
  for command in ("results", "fit"):
    assert cli.main(["vitok", command, str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"{empty} holds no runs" in err and "Traceback" not in err, err
  sweep_dir = str(tmp_path / "s")
  sweep.prepare(_sweep((1, 2, 4)), sweep_dir)  # Runs written, none trained.
  assert cli.main(["vitok", "results", sweep_dir]) == 0  # A table of pending runs.
  assert cli.main(["vitok", "fit", sweep_dir]) == 2
  assert "none of the 3 runs of" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(sweep_dir, "fits.json"))


def test_cli_fit_refuses_unknown_columns(tmp_path, fake, capsys):
  """A mistyped fit column is an error, not a failed fit stored in fits.json for good."""
  command, _ = fake
  sweep_dir = str(tmp_path / "s")
  runs = sweep.prepare(_sweep((1, 2, 4)), sweep_dir)
  sweep.run_local(runs, sweep_dir, command=command(), log=lambda _: None, poll_s=0.05)
  for args, says in ((["--x=nope"], "--x 'nope' is not a column"),
                     (["--y=eval/psnrr"], "--y 'eval/psnrr' is not a column"),
                     (["--two_variable=params_total"], "pass two columns N,D"),
                     (["--two_variable=params_total,nope"], "--two_variable 'nope' is not a")):
    assert cli.main(["vitok", "fit", sweep_dir, "--n_boot=10", *args]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
  assert not os.path.exists(os.path.join(sweep_dir, "fits.json"))
  assert cli.main(["vitok", "fit", sweep_dir, "--x=E", "--y=eval/psnr", "--n_boot=10"]) == 0
  # A fit asked for that fails (L(N, D) on 3 runs) exits 1 and is not stored, so the next
  # `vitok fit` (and sweep report) does not fail it again.
  fits_json = os.path.join(sweep_dir, "fits.json")
  stored = open(fits_json).read()
  capsys.readouterr()
  assert cli.main(["vitok", "fit", sweep_dir, "--two_variable=params_total,tokens_seen",
                   "--n_boot=10"]) == 1
  assert "needs >= 6 runs" in capsys.readouterr().out and open(fits_json).read() == stored
  assert cli.main(["vitok", "fit", sweep_dir, "--n_boot=10"]) == 0
  assert "fit failed" not in capsys.readouterr().out


def test_cli_fit_drop_removes_a_stored_fit(tmp_path, fake, capsys):
  """`vitok fit --drop` with the flags that added a fit removes it from fits.json, and its plot; a
  stored fit whose column has gone can be dropped too. A fit not stored, one of the sweep's own
  (every report adds it back; without a manifest, the default fit) or --drop without a fit is an
  error that writes nothing."""
  command, _ = fake
  sweep_dir = str(tmp_path / "s")
  runs = sweep.prepare(_sweep(), sweep_dir)  # 4 runs: an offset fit takes 4.
  sweep.run_local(runs, sweep_dir, command=command(), log=lambda _: None, poll_s=0.05)
  fits_json = os.path.join(sweep_dir, "fits.json")
  added = ["--x=E", "--y=eval/psnr", "--offset"]
  assert cli.main(["vitok", "fit", sweep_dir, "--n_boot=10"]) == 0  # The sweep's own two.
  assert cli.main(["vitok", "fit", sweep_dir, "--n_boot=10", *added]) == 0
  specs = lambda: [r["spec"] for r in json.load(open(fits_json))]
  assert dict(x="E", y="eval/psnr", offset=True) in specs() and len(specs()) == 3
  plot = os.path.join(sweep_dir, "plots", "fit_eval_psnr_vs_E_offset.png")
  assert os.path.exists(plot)
  capsys.readouterr()
  assert cli.main(["vitok", "fit", sweep_dir, "--n_boot=10", "--drop", *added]) == 0
  assert "dropped from fits.json: --x E --y eval/psnr --offset" in capsys.readouterr().out
  assert specs() == [dict(x="E", y="eval/psnr"), dict(x="E", y="eval/l2")]  # The manifest's.
  assert not os.path.exists(plot) and os.path.exists(plot.replace("_offset", ""))
  stored = open(fits_json).read()
  for args, says in ((added, "no such fit in"),
                     (added, "stored: --x E --y eval/psnr; --x E --y eval/l2"),
                     (["--x=E", "--y=eval/l2"], "the sweep's own"),
                     ([], "--drop removes one stored fit: name it")):
    assert cli.main(["vitok", "fit", sweep_dir, "--n_boot=10", "--drop", *args]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
  assert open(fits_json).read() == stored
  gone = dict(x="E", y="eval/gone", offset=False)  # Kept, failing, once its column has gone.
  with_gone = [*json.load(open(fits_json)), {"spec": gone, "error": "KeyError"}]
  json.dump(with_gone, open(fits_json, "w"))
  assert cli.main(["vitok", "fit", sweep_dir, "--n_boot=10", "--drop", "--x=E",
                   "--y=eval/gone"]) == 0
  assert open(fits_json).read() == stored
  runs_dir = os.path.join(sweep_dir, "runs")  # No manifest: its own fit is the default one.
  assert cli.main(["vitok", "fit", runs_dir, "--n_boot=10"]) == 0
  assert cli.main(["vitok", "fit", runs_dir, "--n_boot=10", "--drop", "--x=E",
                   "--y=eval/l2"]) == 2
  assert "the sweep's own fits (its manifest's, or --x E --y eval/l2 without one)" in (
      capsys.readouterr().err)
  assert results.describe_spec(dict(x="E", y="l2", offset=True, note="hi")) == (
      "--x E --y l2 --offset (note='hi')")


@pytest.mark.parametrize("argv,says", [
    (["train", "--config=vitok:Mu-Mi/4,c=4,res=32,data=mnist,steps=5", "--dry_run"],
     "--dry_run does not apply to `vitok train` (it is for sweep)"),
    (["sweep", "quickstart:steps=5", "--dry_run"],
     "--workdir does not apply to `vitok sweep` (it is for train, eval, sample, tokenize); "
     "`vitok sweep` takes --sweep_dir"),
    (["fit", "runs/quickstart", "--sweep_dir=x"], "--sweep_dir does not apply to `vitok fit`"),
    (["tokenize", "--sample=cfg_scale=3"], "--sample does not apply to `vitok tokenize` (it is "
     "for eval, sample)"),
])
def test_a_flag_of_another_subcommand_is_an_error_not_ignored(tmp_path, capsys, argv, says):
  """`vitok train --dry_run` trained; `vitok sweep --workdir` swept into runs/NAME. A sweep reads
  the fit flags (its last step is `vitok fit`)."""
  workdir = str(tmp_path / "w")
  if argv[0] in ("train", "tokenize", "sweep"):
    argv = [*argv, f"--workdir={workdir}"]
  assert cli.main(["vitok", *argv]) == 2
  err = capsys.readouterr().err
  assert says in err and "Traceback" not in err, err
  assert not os.path.exists(workdir)
  assert cli.main(["vitok", "sweep", "quickstart:steps=5", f"--sweep_dir={tmp_path / 's'}",
                   "--dry_run", "--n_boot=10", "--x=E", "--y=eval/l2", "--offset"]) == 0


def test_a_sweeps_new_runs_get_the_new_run_checks(tmp_path):
  """A folder named by override (position split) or a family set by override is refused when the
  sweep expands, as `vitok train` refuses such a new run; a run already written keeps its config."""
  images = tmp_path / "images"
  images.mkdir()
  for base, point, says in (
      ("vitok:Mu-Mu/4,res=16,batch=6,steps=2",
       {"data.name": "image_folder", "data.path": str(images)}, "data.name='image_folder' set by "
       "override"),
      ("generator:dit/Mi,tokenizer=/no/tok,batch=6,steps=2",
       {"model.family": "var", "model.size": "d2"}, "model.family='var', but the variant")):
    config = ml_collections.ConfigDict(dict(name="t", base=base, axes=[("product", {
        k: [v] for k, v in point.items()})]))
    with pytest.raises(ConfigError, match=says):
      sweep.expand(config, str(tmp_path / "s"))
  resolved = sweep.resolve(base, point)  # A run written before the check: it expands as it was.
  run_id = f"{sweep.label(point)}-{sweep.config_hash(resolved)[:10]}"
  config_lib.save_config(resolved, str(tmp_path / "s" / "runs" / run_id))
  assert [r.id for r in sweep.expand(config, str(tmp_path / "s"))] == [run_id]


@pytest.mark.parametrize("argv", [["--devices", "4"], ["--devices=4"]])
def test_cli_devices_takes_both_flag_forms(monkeypatch, argv):
  """`vitok compile --devices 64` (as the usage shows it) fakes the devices like --devices=64."""
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  cli._fake_devices_first(["--config=x", *argv])
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


def test_cli_usage_lists_every_subcommand(capsys):
  assert cli.main(["vitok", "--help"]) == 0
  out = capsys.readouterr().out
  for name, fn in cli.COMMANDS.items():
    assert f"\n  {name} " in out and fn.__doc__.splitlines()[0] in out, name


@pytest.mark.slow  # ~20 s alone, about a minute on a loaded 2-core machine.
def test_real_tiny_run_resumes_from_sweep_config(tmp_path):
  """The real trainer through `vitok train --config=_run.py:WORKDIR`: 2 steps into record.json."""
  config = _sweep((2,))
  config.base = BASE + ",res=16"
  sweep_dir = str(tmp_path)
  runs = sweep.prepare(config, sweep_dir)
  for path, value in (("eval_examples", 16), ("log_every", 1)):
    sweep.set_path(runs[0].config, path, value)
  from vitok_jax import config_lib
  config_lib.save_config(runs[0].config, runs[0].workdir)
  status = sweep.run_local(runs, sweep_dir, log=lambda _: None)
  assert status == {runs[0].id: sweep.DONE}, open(os.path.join(runs[0].workdir, "sweep.log")).read()
  row, = results.gather(sweep_dir)
  assert row["E"] == 2 * 16 and row["examples_seen"] == 16 and row["eval/psnr"] > 0
  assert os.path.isdir(os.path.join(sweep_dir, "compilation_cache"))


@pytest.mark.slow
def test_quickstart_sweep(tmp_path):
  """The embedded default: ≥ 4 tokenizers over E on CPU; PSNR rises and L2 falls with E."""
  sweep_dir = str(tmp_path / "quickstart")
  start = time.time()
  assert cli.main(["vitok", "sweep", "quickstart", f"--sweep_dir={sweep_dir}", "--n_boot=200"]) == 0
  assert time.time() - start < 15 * 60
  rows = results.gather(sweep_dir)
  assert sum(r["status"] == sweep.DONE for r in rows) >= 4
  psnr, l2 = json.load(open(os.path.join(sweep_dir, "fits.json")))
  assert psnr["b"] > 0 and l2["b"] < 0
  assert os.path.exists(os.path.join(sweep_dir, "plots", "fit_eval_psnr_vs_E.png"))


def test_checkpoint_step_reads_the_step_orbax_reads(tmp_path):
  """sweep.checkpoint_step (no orbax import) agrees with checkpoint.latest_step (orbax's own),
  an unfinished save's tmp folder included."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitok_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  assert sweep.checkpoint_step(workdir) is None and checkpoint.latest_step(workdir) is None
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  for step in (0, 5):
    ckpt.save(step, {"w": jnp.arange(3.0)}, force=True)
  ckpt.close()
  os.mkdir(os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-1700000000"))
  assert sweep.checkpoint_step(workdir) == checkpoint.latest_step(workdir) == 5
