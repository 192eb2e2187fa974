"""The tokenizer trainer end to end on bundled data: outputs, exact resume after SIGKILL, divergence."""
import os
import re
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok_jax import ConfigError, DataError, config_lib, data
from vitok_jax.scaling import record as record_lib
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.train import checkpoint, loop, optimizer, train_tokenizer
from vitok_jax.train.metrics_writer import read_jsonl

TINY = "Mu-Mu/4,c=8,res=16,data=mnist,batch=16,lr=2e-3"


def tiny_config(steps=12, **overrides):
  config = config_lib.load_config(f"vitok:{TINY},steps={steps}")
  config.log_every, config.eval_every, config.ckpt_every = 4, 100, 100
  config.eval_examples = 64
  if overrides.get("data.name") in data.FOLDER_NAMES:  # As the variant's data=image_folder sets.
    config.data.folder_split = "hash"
  config.update_from_flattened_dict(overrides)
  return config


def final_params(workdir):
  """(step, params) of the newest checkpoint of a run, as numpy."""
  config = config_lib.read_config(workdir)
  step, params, _ = train_tokenizer.restore_params(workdir, config, mesh_lib.make_mesh(config.mesh))
  return step, jax.tree.map(np.asarray, params)


def test_training_writes_config_metrics_images_checkpoint_and_record(tmp_path):
  workdir = str(tmp_path / "run")
  record = train_tokenizer.train(tiny_config(steps=12), workdir)
  for name in ("config.json", "metrics.jsonl", "record.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "images"))
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [4, 8, 12]
  assert all(np.isfinite(r["loss"]) and r["examples_per_sec"] > 0 for r in train_rows)
  # The record: sizes, E = tokens x c, FLOPs cross-checked with XLA, held-out metrics.
  on_disk = record_lib.read(workdir)
  assert on_disk["E"] == record["E"] == 16 * 8 and on_disk["tokens_per_example"] == 16
  assert on_disk["params"]["total"] == sum(on_disk["params"][k] for k in ("encoder", "decoder", "bottleneck"))
  assert 0.9 < on_disk["flops_per_example"]["analytic_over_xla"] < 1.1
  assert on_disk["flops_per_example"]["train"] == 3 * on_disk["flops_per_example"]["forward"]
  # What "auto" ran as on CPU; no quantiser behind a Gaussian bottleneck.
  # Each distinct attention call of the forward: encoder and decoder, 16 tokens, head dim 32.
  assert on_disk["attention_impl"] == [{"impl": "xla", "mask": "none", "q_len": 16, "kv_len": 16,
                                        "head_dim": 32, "dtype": "float32"}]
  assert on_disk["quantizer_impl"] is None
  assert set(on_disk["metrics"]) == {"eval/psnr", "eval/ssim", "eval/l2"}
  assert final_params(workdir)[0] == 12


def test_loss_decreases_and_ema_tracks_params(tmp_path):
  """The loss falls; the EMA copy is checkpointed apart from the params, and it is what the run
  evaluates (the record's metrics) and what restore_params hands to eval / tokenize."""
  config = tiny_config(steps=40, ema_decay=0.9)
  workdir = str(tmp_path)
  record = train_tokenizer.train(config, workdir)
  rows = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r]
  assert rows[-1]["l2"] < 0.7 * rows[0]["l2"]
  mesh = mesh_lib.make_mesh(config.mesh)
  parts = train_tokenizer.build_components(config, with_losses=False)
  shardings = train_tokenizer.state_shardings(parts, config, mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  state = ckpt.restore(40, loop.with_shardings(train_tokenizer.abstract_state(parts, config),
                                               shardings))
  ckpt.close()
  gaps = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                      state.ema_params, state.params))
  assert max(gaps) > 1e-4  # A lagging average, not a copy of the params.
  step, restored = final_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(np.asarray, state.ema_params))
  eval_step = train_tokenizer.jit_eval_step(parts.model, mesh, shardings.params)
  for params, matches in ((state.ema_params, True), (state.params, False)):
    metrics = train_tokenizer.evaluate(eval_step, params, config, mesh)
    assert (metrics["eval/l2"] == pytest.approx(record["metrics"]["eval/l2"], rel=1e-6)) == matches


def _launch(workdir, steps):
  cmd = [sys.executable, "-m", "vitok_jax.cli", "train", f"--config=vitok:{TINY},steps={steps}",
         f"--workdir={workdir}", "--config.ckpt_every=5", "--config.log_every=5",
         "--config.eval_every=1000", "--config.eval_examples=32"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(ckpt_dir, at_least, proc, timeout=240):
  """Polls until a committed checkpoint step >= at_least exists (orbax renames it when complete)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.exists() else []
    if steps and max(steps) >= at_least:
      return max(steps)
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint >= {at_least}; the run ended: {proc.stdout.read()}")


def test_sigkill_then_sigterm_and_relaunches_equal_an_uninterrupted_run(tmp_path):
  """kill -9 mid-run, relaunch; SIGTERM (pre-emption) that run, relaunch: same final params."""
  steps = 60
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  proc_ref = _launch(reference, steps)
  proc = _launch(killed, steps)
  killed_at = _wait_for_checkpoint(killed / "checkpoints", 10, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert killed_at < steps

  relaunch = _launch(killed, steps)
  _wait_for_checkpoint(killed / "checkpoints", killed_at + 5, relaunch)
  relaunch.send_signal(signal.SIGTERM)
  out = relaunch.communicate(timeout=300)[0]
  assert relaunch.returncode == 0, out
  assert f"Resumed from step {killed_at}" in out
  preempted_at = int(out.split("Pre-empted at step ")[1].split(":")[0])
  assert killed_at < preempted_at < steps
  assert preempted_at in [int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit()]

  final = _launch(killed, steps)
  out = final.communicate(timeout=300)[0]
  assert final.returncode == 0 and f"Resumed from step {preempted_at}" in out, out
  assert proc_ref.wait(timeout=300) == 0, proc_ref.stdout.read()
  step_a, params_a = final_params(str(reference))
  step_b, params_b = final_params(str(killed))
  assert step_a == step_b == steps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_a, params_b)


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path, monkeypatch):
  train_tokenizer.train(tiny_config(steps=8, ckpt_every=4), str(tmp_path))
  # Relaunch the same run with an exploding learning rate: it resumes at step 8, then diverges.
  monkeypatch.setattr(loop, "config_changes", lambda saved, config: [])  # Allow the new lr.
  config = tiny_config(steps=40, ckpt_every=4)
  config.optim.base_lr = 1e12
  with pytest.raises(loop.TrainingDiverged,
                     match=r"(loss is (nan|inf) at step|the parameters after step) (9|1\d|2\d|3\d|40)"
                     r"( hold NaN/Inf)?; its last checkpoint \(step \d+, finite\) is in .*new "
                     r"--workdir"):
    train_tokenizer.train(config, str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated_metadata", "missing_data_files", "empty_step_dir"])
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path, damage):
  """A newest checkpoint whose files are damaged (a full disk, a broken copy) does not block the
  run: it resumes from the newest step that restores, the damaged one moved aside to corrupt_N,
  and trains to the same parameters as the run without that step. When no step restores, a
  DataError names them with the moves that start again from step 0, and nothing is moved."""
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  workdir, whole = tmp_path / "run", tmp_path / "whole"
  train_tokenizer.train(tiny_config(steps=8, ckpt_every=4), str(workdir))
  shutil.copytree(workdir, whole)
  harm = {"truncated_metadata": lambda step: open(workdir / "checkpoints" / step / "state" /
                                                  "_METADATA", "w").close(),
          "missing_data_files": lambda step: [os.remove(f) for f in glob.glob(
              str(workdir / "checkpoints" / step / "state" / "ocdbt.process_0" / "d" / "*"))],
          "empty_step_dir": lambda step: (shutil.rmtree(workdir / "checkpoints" / step),
                                          (workdir / "checkpoints" / step).mkdir())}[damage]
  harm("8")
  assert train_tokenizer.train(tiny_config(steps=12, ckpt_every=4), str(workdir))["steps"] == 12
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8", "corrupt_8"]
  shutil.rmtree(whole / "checkpoints" / "8")
  train_tokenizer.train(tiny_config(steps=12, ckpt_every=4), str(whole))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               final_params(str(workdir))[1], final_params(str(whole))[1])
  for step in ("12", "8", "4"):
    harm(step)
  with pytest.raises(DataError, match=r"checkpoint steps 12, 8, 4 in .* do not restore .* "
                     r"move them aside \(`mv \S+/12 \S+/corrupt_12; "
                     r"mv \S+/8 \S+/corrupt_8\.1; mv .*`\) .*"
                     r"with no older checkpoint it starts again from step 0"):
    train_tokenizer.train(tiny_config(steps=16, ckpt_every=4), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8", "corrupt_8"]


def test_the_echoes_of_a_failed_checkpoint_read_are_dropped_and_other_errors_kept(monkeypatch,
                                                                                 capsys):
  """The CLI drops what orbax's other reads print after one has failed (their error, and
  TensorStore's callbacks into the closed event loop: hundreds of lines after the one-line
  DataError), from `sys.unraisablehook` and asyncio's log; any other error is printed."""
  import logging  # pylint: disable=g-import-not-at-top
  from vitok_jax import cli  # pylint: disable=g-import-not-at-top
  printed = []
  monkeypatch.setattr(sys, "unraisablehook", printed.append)
  asyncio_log = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_log, "filters", [])
  cli._quiet_damaged_checkpoint_reads()

  def call_soon_threadsafe():  # As asyncio's, called back into a closed loop.
    try:
      raise RuntimeError("Event loop is closed")
    except RuntimeError as e:
      return e
  closed = call_soon_threadsafe()
  read = Exception("Encountered error while reading array index: (slice(0, 8, 1),). See full "
                   "TensorStore details: <bound method ...")
  other = RuntimeError("Event loop is closed")  # Raised elsewhere: not an echo.
  for exc in (read, closed, other, ValueError("something else")):
    sys.unraisablehook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                             exc_traceback=exc.__traceback__, err_msg=None,
                                             object=None))
  assert printed[0].exc_value is other and len(printed) == 2
  assert str(printed[1].exc_value) == "something else"
  hook = sys.unraisablehook
  records = [logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task exception was never "
                               "retrieved", None, (type(e), e, None)) for e in (read, other)]
  assert [asyncio_log.filter(r) for r in records] == [False, True]
  cli._quiet_damaged_checkpoint_reads()  # Twice: one filter, one hook.
  assert len(asyncio_log.filters) == 1 and sys.unraisablehook is hook


def test_a_failed_checkpoint_read_is_described_by_its_innermost_cause():
  """Orbax's error names an array index and dumps TensorStore's spec; the file is in its cause."""
  try:
    try:
      raise ValueError('FAILED_PRECONDITION: Error reading "params.w/0.0" in OCDBT database at '
                       'local file "/run/checkpoints/8/state/": Truncated stream\nmore')
    except ValueError as cause:
      raise Exception("Encountered error while reading array index: (slice(0, 8, 1),). See full "
                      "TensorStore details: <bound method spec of TensorStore({") from cause
  except Exception as e:  # pylint: disable=broad-except
    text = checkpoint.describe_error(e)
  assert text == ("Exception: Encountered error while reading array index: (slice(0, 8, 1),) "
                  '(from ValueError: FAILED_PRECONDITION: Error reading "params.w/0.0" in OCDBT '
                  'database at local file "/run/checkpoints/8/state/": Truncated stream)')
  assert checkpoint.describe_error(KeyError("x")) == "KeyError: 'x'"
  try:  # A context hidden with `from None` stays hidden.
    try:
      raise KeyError("params")
    except KeyError:
      raise FileNotFoundError("No checkpoint at /x") from None
  except FileNotFoundError as e:
    assert checkpoint.describe_error(e) == "FileNotFoundError: No checkpoint at /x"


def test_a_reader_of_a_damaged_newest_checkpoint_is_told_how_the_trainer_mends_it(tmp_path,
                                                                                 monkeypatch):
  """Eval, tokenize and a generator's tokenizer read the newest step without moving anything: a
  read that fails once is retried; a damaged step is a DataError that names it and how to mend it
  (and what the relaunch trains from), after which it reads."""
  workdir = tmp_path / "run"
  config = tiny_config(steps=8, ckpt_every=4)
  train_tokenizer.train(config, str(workdir))
  mesh = mesh_lib.make_mesh(config.mesh)
  restore, calls = checkpoint.Checkpointer._restore, []

  def fails_once(self, step, layout):
    calls.append(step)
    if len(calls) == 1:
      raise OSError(110, "timed out")
    return restore(self, step, layout)
  with monkeypatch.context() as patch:
    patch.setattr(checkpoint.Checkpointer, "_restore", fails_once)
    assert train_tokenizer.restore_params(str(workdir), config, mesh)[0] == 8 and calls == [8, 8]
  open(workdir / "checkpoints" / "8" / "state" / "_METADATA", "w").close()
  with pytest.raises(DataError, match=r"checkpoint step 8 in .*checkpoints does not restore \(.*"
                                      r"damaged.*move it aside \(`mv (\S+) (\S+)`\) and "
                                      rf"relaunch .*`vitok train --workdir {workdir}`\): it trains "
                                      r"on from the newest intact step \(the run holds steps \[4\]"
                                      ) as error:
    train_tokenizer.restore_params(str(workdir), config, mesh)
  # What the message says: the move, then the relaunch (from step 4, step 8 trained anew).
  source, target = re.search(r"`mv (\S+) (\S+)`", str(error.value)).groups()
  os.rename(source, target)
  train_tokenizer.train(config, str(workdir))
  assert train_tokenizer.restore_params(str(workdir), config, mesh)[0] == 8
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8", "corrupt_8"]


def test_restore_newest_intact_agrees_across_processes_retries_and_keeps_what_it_moves(
    tmp_path, monkeypatch):
  """A step another process cannot read is passed over on this one too (`all_ok`, which the
  trainer backs by an all-gather), and the barrier is met; a read that fails once is retried, not
  taken for damage; a step damaged again while corrupt_N exists goes to corrupt_N.1."""
  directory = str(tmp_path / "checkpoints")
  state = lambda v: {"w": jnp.full((4,), float(v))}
  ckpt = checkpoint.Checkpointer(directory, keep=5, async_save=False)
  for step in (4, 8):
    ckpt.save(step, state(step), force=True)
  layout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state(0))
  met = []
  other_process_fails_at_8 = iter([False, True])  # Step 8's outcome, then step 4's.
  step, restored = ckpt.restore_newest_intact(
      layout, all_ok=lambda ok: ok and next(other_process_fails_at_8), barrier=lambda: met.append(1))
  assert (step, float(restored["w"][0]), met) == (4, 4.0, [1])
  assert sorted(os.listdir(directory)) == ["4", "corrupt_8"]
  ckpt.save(8, state(8), force=True)  # Saved anew, then damaged again.
  ckpt.wait()
  restore, calls = checkpoint.Checkpointer._restore, []

  def flaky_restore(self, step, layout):
    calls.append(step)
    if step == 8 and len(calls) == 1:
      raise OSError(110, "timed out")  # Once: a retry reads it.
    return restore(self, step, layout)
  monkeypatch.setattr(checkpoint.Checkpointer, "_restore", flaky_restore)
  assert ckpt.restore_newest_intact(layout)[0] == 8 and calls == [8, 8]
  monkeypatch.setattr(checkpoint.Checkpointer, "_restore", lambda self, step, layout: (
      (_ for _ in ()).throw(OSError("truncated")) if step == 8 else restore(self, step, layout)))
  assert ckpt.restore_newest_intact(layout)[0] == 4
  assert sorted(os.listdir(directory)) == ["4", "corrupt_8", "corrupt_8.1"]
  ckpt.close()


def test_a_checkpoint_of_parameters_that_are_not_finite_is_refused(tmp_path):
  """The loss of a step is computed before its update: an update that makes the parameters NaN
  is caught when they would be saved, not saved as the run's last checkpoint."""
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  try:
    loop.check_finite(3, {"loss": 0.5}, ckpt, {"w": jnp.ones(4), "step": jnp.zeros((), jnp.int32)})
    with pytest.raises(loop.TrainingDiverged, match="the parameters after step 3 hold NaN/Inf; no "
                                                    "checkpoint was written yet: start a new"):
      loop.check_finite(3, {"loss": 0.5}, ckpt, {"w": jnp.array([1.0, jnp.inf])})
  finally:
    ckpt.close()


def test_divergence_is_a_one_line_error_a_sweep_books_as_diverged(tmp_path, capsys):
  from vitok_jax import cli  # pylint: disable=g-import-not-at-top
  from vitok_jax.scaling import sweep  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  code = cli.main(["vitok", "train", f"--config=vitok:{TINY.replace('lr=2e-3', 'lr=1e12')},steps=8",
                   f"--workdir={workdir}"])
  err = capsys.readouterr().err
  assert code == 3 and "Traceback" not in err, err
  assert "error: TrainingDiverged: loss is " in err and "lower optim.base_lr" in err, err
  log = tmp_path / "sweep.log"
  log.write_text(err)
  assert sweep.finish(workdir, code, max_attempts=3, log=str(log)) == sweep.DIVERGED


def test_train_without_config_takes_the_runs_own(tmp_path, monkeypatch):
  """`vitok train --workdir RUN` resumes the run in RUN with its saved config (also before its
  first checkpoint), not the default config into it; a new directory gets the default."""
  from vitok_jax import cli  # pylint: disable=g-import-not-at-top
  trained = []
  monkeypatch.setattr(train_tokenizer, "train", lambda config, workdir: trained.append(
      (config.variant, config.total_steps, workdir)))
  run = str(tmp_path / "run")
  config_lib.save_config(tiny_config(steps=7), run)
  argv = ["vitok", "train", f"--workdir={run}", "--config.total_steps=9"]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections finds --config.x overrides there.
  assert cli.main(argv) == 0
  assert trained == [(f"{TINY},steps=7", 9, run)]  # Overrides apply to the run's config.
  new = str(tmp_path / "new")
  argv = ["vitok", "train", f"--workdir={new}"]
  monkeypatch.setattr(sys, "argv", argv)
  assert cli.main(argv) == 0
  assert trained[-1] == (config_lib.load_config("vitok").variant,
                         config_lib.load_config("vitok").total_steps, new)
  other = tmp_path / "other"  # A config.json of something else: refused, not a traceback.
  other.mkdir()
  (other / "config.json").write_text('{"architectures": ["Bert"]}')
  argv = ["vitok", "train", f"--workdir={other}"]
  monkeypatch.setattr(sys, "argv", argv)
  assert cli.main(argv) == 2 and len(trained) == 2
  argv = ["vitok", "train", f"--config=vitok:{TINY}", f"--workdir={other}"]  # Named: taken.
  monkeypatch.setattr(sys, "argv", argv)
  assert cli.main(argv) == 0 and (trained[-1][0], trained[-1][2]) == (TINY, str(other))


def test_resuming_frees_the_initial_state_before_restoring_into_its_layout(tmp_path):
  """open_run restores into the initial state's shapes, dtypes and shardings and frees its arrays
  first, so a resume holds one state, not two (the initial one and the restored one)."""
  workdir = str(tmp_path / "run")
  config = tiny_config()
  state = lambda scale: loop.TrainState(
      step=jnp.array(scale, jnp.int32), params={"w": jnp.full((64, 32), scale, jnp.float32)},
      opt_state={"mu": jnp.full((64, 32), 2 * scale, jnp.float32)}, ema_params={})
  saved = state(3)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
  ckpt.save(3, saved, force=True)
  ckpt.close()
  initial = state(0)
  initial_ids = {id(x) for x in jax.tree.leaves(initial)}
  live_initial_during_restore = []
  restore = checkpoint.Checkpointer._restore

  def spying_restore(self, step, layout):
    live_initial_during_restore.append(
        [x.shape for x in jax.live_arrays() if id(x) in initial_ids and not x.is_deleted()])
    return restore(self, step, layout)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint.Checkpointer, "_restore", spying_restore)
    _, opened, resumed, _ = loop.open_run(config, workdir, initial)
  opened.close()
  assert int(resumed.step) == 3 and float(resumed.opt_state["mu"][0, 0]) == 6.0
  assert resumed.params["w"].sharding == saved.params["w"].sharding
  assert live_initial_during_restore == [[]]  # None of the initial arrays was alive then.
  assert all(x.is_deleted() for x in jax.tree.leaves(initial))
  # A relaunch whose total_steps stops before the checkpoint is refused: its record would give
  # total_steps steps for params trained more.
  with pytest.raises(ConfigError, match="holds a run at step 3, past total_steps=2; resume it "
                                        "with --config.total_steps >= 3"):
    loop.open_run(tiny_config(steps=2), workdir, state(0))


def test_a_stop_during_set_up_saves_step_0_and_a_sweep_resumes_it(tmp_path, monkeypatch):
  """SIGTERM while the run is being built (here as it opens its checkpoints) is kept: the loop
  saves the initial state before its first step and stops, which a sweep books as pre-empted
  (no attempt used), not as a failure; the relaunch resumes from step 0."""
  from vitok_jax.scaling import sweep  # pylint: disable=g-import-not-at-top
  open_run = loop.open_run

  def open_run_then_sigterm(*args):
    opened = open_run(*args)
    os.kill(os.getpid(), signal.SIGTERM)
    return opened

  monkeypatch.setattr(loop, "open_run", open_run_then_sigterm)
  workdir = str(tmp_path / "run")
  previous = signal.getsignal(signal.SIGTERM)
  assert train_tokenizer.train(tiny_config(steps=4), workdir) is None
  assert signal.getsignal(signal.SIGTERM) is previous
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 0
  assert sweep.finish(workdir, 0, max_attempts=1) == sweep.PENDING
  assert sweep.read_status(workdir)["preemptions"] == 1
  from vitok_jax.train import codes  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError, match="has no trained checkpoint"):  # Not a tokenizer yet.
    codes.load_or_tokenize(workdir, "eval")
  monkeypatch.setattr(loop, "open_run", open_run)
  assert train_tokenizer.train(tiny_config(steps=4), workdir)["steps"] == 4


def test_a_stop_between_checkpoint_and_evaluation_is_evaluated_on_resume(tmp_path, monkeypatch):
  """Pre-empted at step 4, an eval step: the checkpoint is saved, the evaluation skipped; the
  relaunch evaluates step 4 before it trains on. A resume whose eval step was evaluated does not
  evaluate it again. Stopped at the last step, the relaunch evaluates it and writes the record."""
  monkeypatch.setattr(loop.Preemption, "reached", lambda self, step: step == 4)
  workdir = str(tmp_path / "run")
  config = tiny_config(steps=8, eval_every=4, ckpt_every=4, log_every=4)
  assert train_tokenizer.train(config, workdir) is None
  eval_steps = lambda: [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                        if "eval/l2" in r]
  assert eval_steps() == []
  monkeypatch.setattr(loop.Preemption, "reached", lambda self, step: False)
  assert train_tokenizer.train(config, workdir)["steps"] == 8
  assert eval_steps() == [4, 8]
  config.total_steps = 12  # Extended: resumes at 8, evaluated before; stopped at its last step.
  monkeypatch.setattr(loop.Preemption, "reached", lambda self, step: step == 12)
  assert train_tokenizer.train(config, workdir) is None
  assert eval_steps() == [4, 8]
  record = train_tokenizer.train(config, workdir)
  assert eval_steps() == [4, 8, 12] and record["steps"] == 12
  assert record["metrics"]["eval/l2"] == read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1][
      "eval/l2"]


def test_ctrl_c_saves_a_checkpoint_then_interrupts_and_a_second_one_at_once(tmp_path,
                                                                            monkeypatch):
  """The first Ctrl-C (here during set-up) saves a checkpoint, then raises KeyboardInterrupt to
  the caller (an interrupt, not a pre-emption a script would requeue); a second one interrupts at
  once; where SIGINT is ignored (a background job) it stays ignored."""
  open_run = loop.open_run
  monkeypatch.setattr(loop, "open_run",
                      lambda *a: (open_run(*a), os.kill(os.getpid(), signal.SIGINT))[0])
  workdir = str(tmp_path / "run")
  with pytest.raises(KeyboardInterrupt):
    train_tokenizer.train(tiny_config(steps=4), workdir)
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 0
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  after_second = []
  with pytest.raises(KeyboardInterrupt):
    with loop.Preemption() as preemption:
      os.kill(os.getpid(), signal.SIGINT)
      assert preemption.requested and preemption.requested_before_start()
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
      after_second.append(True)
  assert not after_second
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with loop.Preemption() as preemption:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
    assert not preemption.requested
  finally:
    signal.signal(signal.SIGINT, previous)


def test_resuming_with_another_config_is_a_clear_error(tmp_path, monkeypatch):
  """A relaunch may change the run's length, when it logs, evaluates and checkpoints, and its
  mesh; anything else (here the decoder, then the batch and learning rate, whose arrays fit the
  checkpoint) would train the rest differently from its start: an error naming the changes,
  raised before the model is built. Without config.json, arrays that do not fit the checkpoint
  still raise."""
  train_tokenizer.train(tiny_config(steps=4, ckpt_every=4), str(tmp_path))
  config = tiny_config(steps=4)
  config.model.decoder = "Mi"
  setup_training = train_tokenizer.setup_training
  monkeypatch.setattr(train_tokenizer, "setup_training",
                      lambda *a: pytest.fail("built the model before refusing the config"))
  with pytest.raises(ConfigError, match=r"would change model\.decoder: 'Mu' → 'Mi'.*new --workdir"):
    train_tokenizer.train(config, str(tmp_path))
  same_shapes = tiny_config(steps=6, batch_size=32)
  same_shapes.optim.base_lr = 5e-3
  with pytest.raises(ConfigError, match=r"batch_size: 16 → 32; optim\.base_lr: 0\.002 → 0\.005"):
    train_tokenizer.train(same_shapes, str(tmp_path))
  monkeypatch.setattr(train_tokenizer, "setup_training", setup_training)
  # The run's record of what ran (which eval, tokenize and generators read) is left as it was.
  assert config_lib.read_config(str(tmp_path)).model.decoder == "Mu"
  # When to evaluate and log, and the variant string, may change. The run is finished: its
  # record and the config.json it was made with stand; extended, it trains on with the new ones.
  assert train_tokenizer.train(tiny_config(steps=4, eval_every=2, log_every=1,
                                           variant="renamed"), str(tmp_path)) is not None
  assert config_lib.read_config(str(tmp_path)).eval_every == 100
  assert train_tokenizer.train(tiny_config(steps=6, eval_every=2, variant="renamed"),
                               str(tmp_path))["steps"] == 6
  assert config_lib.read_config(str(tmp_path)).variant == "renamed"
  os.remove(tmp_path / "config.json")
  config.total_steps = 8  # Past the run's end: it would resume.
  with pytest.raises(ConfigError, match=r"does not match this config.*use a new --workdir"):
    train_tokenizer.train(config, str(tmp_path))


def test_config_changes_leave_out_resumable_fields_and_fields_the_code_added():
  saved = tiny_config(steps=4)
  config = tiny_config(steps=8, eval_every=2, **{"data.worker_count": 2, "optim.base_lr": 0.01})
  del saved["num_visualize"]  # As in a run begun before the field existed.
  assert loop.config_changes(saved, config) == ["optim.base_lr: 0.002 → 0.01"]
  # A generator run saved before its model.dropout / drop_path / reweight_by_scale fields trained
  # without them: a config that turns one on changes it; one that keeps it off does not.
  old = config_lib.load_config("generator:llamagen/Mu,tokenizer=x")
  del old.model["dropout"], old.model["drop_path"], old.objective["reweight_by_scale"]
  new = config_lib.load_config("generator:llamagen/Mu,tokenizer=x")
  assert loop.config_changes(old, new) == ["model.dropout: (absent: 0.0) → 0.1"]
  new.model.dropout = 0.0
  assert loop.config_changes(old, new) == []
  infinity = config_lib.load_config("generator:infinity/d2,tokenizer=x")
  old = infinity.copy_and_resolve_references()
  del old.model["dropout"], old.model["drop_path"], old.objective["reweight_by_scale"]
  assert loop.config_changes(old, infinity) == [
      "model.drop_path: (absent: 0.0) → None",
      "objective.reweight_by_scale: (absent: False) → True"]
  # A tokenizer saved before loss.bsq_commit trained BSQ's commitment at 0.25; only a BSQ run
  # reads the weight.
  for bottleneck, changed in (("gaussian", False), ("vq1k", False), ("bsq", True),
                              ("msbsq", True)):
    new = tiny_config(steps=4)
    new.model.bottleneck = bottleneck
    old = new.copy_and_resolve_references()
    del old.loss["bsq_commit"]
    assert loop.config_changes(old, new) == (
        ["loss.bsq_commit: (absent: 0.25) → 0.0"] if changed else []), bottleneck
  # A folder run saved before data.folder_split held out by position; only one folder is split.
  for path, changed in (("/d", True), ("/d/{split}", False)):
    new = config_lib.load_config(f"vitok:Mu-Mu/4,res=8,data=image_folder,path={path}")
    assert ("folder_split" in new.data) == changed  # Split folders do not carry it: same ids.
    new.data.folder_split = "hash"  # As an override would, on a config that has it.
    old = new.copy_and_resolve_references()
    del old.data["folder_split"]
    assert loop.config_changes(old, new) == (
        ["data.folder_split: (absent: 'position') → 'hash'"] if changed else []), path


def test_a_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match="gcsfuse.*/gcs/bucket/run"):
    train_tokenizer.train(tiny_config(steps=4), "gs://bucket/run")
  assert not os.listdir(tmp_path)


class _FakeCheckpointer:
  directory = "ckpt"

  def __init__(self):
    self.saved = []

  def save(self, step, state, force=False):
    del state, force
    self.saved.append(step)

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def wait(self):
    pass


def test_loop_rate_leaves_out_compilation_eval_and_checkpoints_and_the_clock_spans_launches(
    tmp_path, monkeypatch):
  """On a fake clock: a training step takes 1 s (the first of a launch 50 s more: compilation),
  an evaluation 100 s. The run's rate counts training steps only; its wall time spans launches,
  from the checkpoint each resumed at."""
  now = [1000.0]
  monkeypatch.setattr(loop.time, "time", lambda: now[0])
  config = tiny_config(steps=20, log_every=4, eval_every=6, ckpt_every=8)

  def launch(first_step, total_steps):
    config.total_steps = total_steps
    clock = loop.RunClock(str(tmp_path), first_step, is_main=True)
    calls = []

    def train_step(state, batch):
      del batch
      now[0] += 1.0 + (50.0 if not calls else 0.0)
      calls.append(1)
      return types.SimpleNamespace(step=state.step + 1, params={}), {"loss": 1.0, "l2": 1.0}

    def evaluate(state, step):
      del state, step
      now[0] += 100.0
      return {"eval/l2": 0.5}

    result = loop.run(types.SimpleNamespace(step=first_step, params={}), config=config,
                      train_step=train_step,
                      next_batch=lambda: None, ckpt=_FakeCheckpointer(), writer=None,
                      evaluate=evaluate, clock=clock)
    return result, clock

  result, clock = launch(0, 16)  # Checkpoints at 8 and 16.
  assert result.examples_per_sec == pytest.approx(config.batch_size / 1.0)
  wall_16 = clock.seconds()
  assert wall_16 == pytest.approx(16 + 50 + 3 * 100)  # Steps, compilation, evals at 6, 12, 16.
  now[0] += 5000.0  # Idle between launches: not part of the run.
  result, clock = launch(16, 20)
  assert result.examples_per_sec == pytest.approx(config.batch_size / 1.0)
  # It resumed from the time noted at the step-16 checkpoint, before that step's evaluation.
  assert clock.seconds() == pytest.approx(wall_16 - 100 + 4 + 50 + 2 * 100)  # Evals at 18, 20.
  assert [int(s) for s in loop.RunClock(str(tmp_path), 0, is_main=False).saved] == [8, 16, 20]


def test_run_and_optimizer_values_are_checked():
  bad = {"keep_ckpts": 0, "optim.warmup_steps": -5, "optim.min_lr_ratio": -1.0,
         "optim.clip_norm": -1.0, "optim.b2": 1.5, "eval_examples": -3}
  for field, value in bad.items():
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
      train_tokenizer.validate(tiny_config(**{field: value}))
  gan = {"gan.enabled": True, "gan.freeze_encoder": False}
  with pytest.raises(ConfigError, match=r"gan\.lr"):
    train_tokenizer.validate(tiny_config(**gan, **{"gan.lr": -1.0}))
  with pytest.raises(ConfigError, match="init_from"):
    train_tokenizer.validate(tiny_config(**{"gan.enabled": True}))
  train_tokenizer.validate(tiny_config(**gan))


def test_a_resumed_run_rewrites_the_metric_rows_past_its_checkpoint(tmp_path):
  """Rows the previous launch wrote after its last checkpoint (and a line a crash cut short) are
  dropped when the run resumes from that checkpoint: one row per step, in order."""
  from vitok_jax.train import metrics_writer  # pylint: disable=g-import-not-at-top
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(f'{{"step": {s}, "loss": {s / 10}}}\n' for s in (5, 10, 15, 20))
                  + '{"step": 25, "lo')
  writer = metrics_writer.MetricWriter(str(tmp_path), resume_step=10, tensorboard=False)
  writer.write(15, {"loss": 0.25})
  writer.close()
  rows = read_jsonl(str(path))
  assert [r["step"] for r in rows] == [5, 10, 15] and rows[-1]["loss"] == 0.25


def test_eval_scores_exactly_eval_examples_of_the_fixed_order_at_any_batch_size():
  """eval_examples=70 at batch 64 or 16: the first 70 examples of the eval order, not 128 or 80
  (whole batches), so runs of any batch size score the same examples."""
  from vitok_jax import data  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(mesh_lib.default_config(), jax.devices()[:1])

  def eval_step(params, x, valid):  # "psnr": the sum of each valid example's mean pixel.
    del params
    means = x.reshape(len(x), -1).mean(axis=1)
    return x, {"psnr": (means * valid).sum(), "ssim": valid.sum(), "l2": 0.0 * valid.sum()}

  config = tiny_config(**{"eval_examples": 70})
  images = next(data.build_iterator(config.data, "eval", batch_size=500, process_index=0,
                                    process_count=1))["image"]
  want = images[:70].reshape(70, -1).mean(axis=1).mean()
  for batch in (64, 16):
    config.batch_size = batch
    metrics = train_tokenizer.evaluate(eval_step, None, config, mesh)
    assert metrics["eval/ssim"] == 1.0  # Every counted example valid; none padded in.
    assert metrics["eval/psnr"] == pytest.approx(want, rel=1e-5)


def test_a_resumed_run_whose_train_split_changed_size_is_warned_about(tmp_path, caplog):
  """The data stream is a function of the split: images added to data.path between launches
  change it, which the resumed run says; the record keeps the split's size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  def add_images(start, count):
    for i in range(start, start + count):
      Image.fromarray(np.full((16, 16), 8 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
  os.makedirs(tmp_path / "images")
  add_images(0, 20)
  overrides = {"data.name": "image_folder", "data.path": str(tmp_path / "images"),
               "eval_examples": 2}
  workdir = str(tmp_path / "run")
  config = tiny_config(steps=2, **overrides)
  train_tokenizer.train(config, workdir)
  held_out = data.num_examples(config.data, "eval")
  assert 1 <= held_out < 20  # 20 less those held out.
  assert record_lib.read(workdir)["train_examples"] == 20 - held_out
  add_images(20, 10)
  grown = data.num_examples(config.data, "train")
  assert grown > 20 - held_out
  with caplog.at_level("WARNING"):
    train_tokenizer.train(tiny_config(steps=4, **overrides), workdir)
  assert (f"the train split had {20 - held_out} examples when" in caplog.text
          and f"has {grown} now" in caplog.text)


def test_data_and_metric_weights_are_checked_before_training(tmp_path):
  """A negative resolution, or a metric whose weight file is unset or missing, is an error before
  anything is built or written, not at the first evaluation (after hours of training)."""
  with pytest.raises(ConfigError, match="data.res=-16 must be a positive int"):
    train_tokenizer.validate(tiny_config(**{"data.res": -16}))
  with pytest.raises(ConfigError,
                     match=r"need the lpips network: set --config\.eval\.lpips_weights"):
    train_tokenizer.validate(tiny_config(**{"eval.metrics": ("lpips",)}))
  missing = tiny_config(**{"eval.metrics": ("lpips",), "eval.lpips_weights": "/no/lpips.npz"})
  train_tokenizer.validate(missing)  # Set is enough for a sweep to expand it elsewhere.
  with pytest.raises(ConfigError, match="needs frames of at least 16 pixels, got data.res=8"):
    train_tokenizer.validate(tiny_config(**{"eval.metrics": ("lpips",), "data.res": 8,
                                            "model.patch": (4, 4),
                                            "eval.lpips_weights": "/no/lpips.npz"}))
  with pytest.raises(ConfigError, match="eval.lpips_weights='/no/lpips.npz' does not exist"):
    train_tokenizer.train(missing, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  # A dataset that is not there stops the run before the model is built or a file is written.
  no_data = tiny_config(**{"data.name": "image_folder", "data.path": str(tmp_path / "none")})
  with pytest.raises(DataError, match="no such folder"):
    train_tokenizer.train(no_data, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  # A folder named by override alone would split by position: refused with the variant to use.
  del no_data.data["folder_split"]
  with pytest.raises(ConfigError, match=r"data.name='image_folder' set by override .* give the "
                     r"folder in the variant instead \(`--config vitok:...,data=image_folder"):
    train_tokenizer.train(no_data, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("quantizer", ["msvq", "msbsq"])
def test_multi_scale_quantizers_are_for_images(quantizer):
  """A tubelet config with a multi-scale bottleneck fails at validation, not at model init."""
  video = "vitok:Mu-Mu/2x4,c=8,frames=4,res=16,data=moving_mnist"
  with pytest.raises(ConfigError, match="square 2-D token map"):
    train_tokenizer.validate(config_lib.load_config(f"{video},quantizer={quantizer}"))
  train_tokenizer.validate(config_lib.load_config(f"{video},quantizer=bsq"))


def test_warmup_follows_the_run_length_unless_set():
  """Unset, the warm-up is a tenth of the run (at most 1000 steps) of whatever total_steps the
  run ends up with, e.g. after a --config.total_steps override; a set value is kept."""
  config = tiny_config(steps=12)
  config.total_steps = 500  # As the command-line override does, after get_config.
  assert optimizer.warmup_steps(config.optim, config.total_steps) == 50
  assert optimizer.warmup_steps(config.optim, 100_000) == optimizer.MAX_AUTO_WARMUP
  _, schedule = optimizer.make_optimizer(config.optim, config.batch_size, config.total_steps)
  peak = config.optim.base_lr * config.batch_size / 256
  assert float(schedule(50)) == pytest.approx(peak) and float(schedule(25)) == pytest.approx(peak / 2)
  config.optim.warmup_steps = 7
  assert optimizer.warmup_steps(config.optim, config.total_steps) == 7


def test_linear_schedule_is_vars_lin0():
  """VAR's lr_wd_annealing("lin0") after its warm-up: the peak while less than 5% of the rest
  has passed, then wpe + (1 − wpe)·(1 − passed)/0.95, down to wpe at the last step."""
  total, warmup, wpe = 200, 4, 0.01
  config = optimizer.default_config(schedule="linear", warmup_steps=warmup, min_lr_ratio=wpe)
  _, schedule = optimizer.make_optimizer(config, batch_size=256, total_steps=total)
  peak = config.base_lr
  for it in range(warmup, total):
    passed = (it - warmup) / (total - 1 - warmup)
    var = 1.0 if passed < 0.05 else wpe + (1 - wpe) * (1 - passed) / 0.95
    assert float(schedule(it)) == pytest.approx(peak * var, rel=1e-5), it
  assert float(schedule(warmup // 2)) == pytest.approx(peak / 2)
  assert float(schedule(total - 1)) == pytest.approx(peak * wpe)


def test_weight_decay_skips_vectors_and_vars_position_and_level_embeddings():
  """Decay on kernels and embedding tables; not on biases or norm scales, nor on VAR's learned
  position (pos, pos_start) and level embeddings: one AdamW step from zero gradients moves only
  the decayed leaves."""
  params = {"block0": {"ada": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}},
            "class_emb": {"embedding": jnp.ones((4, 2))}, "pos": jnp.ones((1, 5, 2)),
            "pos_start": jnp.ones((1, 1, 2)), "level_emb": {"embedding": jnp.ones((3, 2))},
            "norm": {"scale": jnp.ones((2,))}}
  assert optimizer.decay_mask(params) == {
      "block0": {"ada": {"kernel": True, "bias": False}}, "class_emb": {"embedding": True},
      "pos": False, "pos_start": False, "level_emb": {"embedding": False},
      "norm": {"scale": False}}
  config = optimizer.default_config(weight_decay=0.5, warmup_steps=0, schedule="constant",
                                    base_lr=1.0)
  tx, _ = optimizer.make_optimizer(config, batch_size=256, total_steps=10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved == optimizer.decay_mask(params)


def test_cli_help_and_config_errors():
  run = lambda *a: subprocess.run([sys.executable, "-m", "vitok_jax.cli", *a], capture_output=True,
                                  text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  out = run("--help")
  assert out.returncode == 0 and "train" in out.stdout and "eval" in out.stdout
  out = run("train", "--help")
  assert out.returncode == 0 and "--workdir" in out.stdout
  out = run("train", "--config=vitok:Mu-Mu/5,res=32,data=mnist")
  assert out.returncode == 2 and "patch size 5 does not divide data.res=32" in out.stderr


def test_video_tokenizer_trains_on_real_pixel_clips_and_writes_a_strip(tmp_path):
  config = config_lib.load_config(
      "vitok:Mu-Mu/2x4,c=8,frames=4,res=16,data=moving_mnist,batch=8,lr=2e-3,steps=16,rope=axial")
  config.log_every, config.eval_every, config.ckpt_every, config.eval_examples = 8, 16, 16, 16
  record = train_tokenizer.train(config, str(tmp_path))
  assert record["tokens_per_example"] == 2 * 4 * 4 and record["E"] == 32 * 8
  from PIL import Image
  strip = Image.open(tmp_path / "images" / "recon_0000016.png")
  gif = Image.open(tmp_path / "images" / "recon_0000016.gif")
  assert gif.n_frames == 4
  assert strip.size[1] == 4 * gif.size[1]  # One originals/reconstructions grid per frame.
  rows = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r]
  assert rows[-1]["l2"] < rows[0]["l2"]


def test_video_tokenizer_trains_with_the_trepa_loss(tmp_path):
  """TREPA (frozen VideoMAE features of recon vs real clips) in the loss; random small weights."""
  from vitok_jax.models.perceptual import videomae, weights  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "videomae_mu8.npz")
  weights.save(path, videomae.init_params(jax.random.key(0), videomae.SIZES["Mu/8"]))
  spec = "vitok:Mu-Mu/2x4,c=8,frames=4,res=16,data=moving_mnist,batch=8,lr=2e-3,steps=4"
  config = config_lib.load_config(spec)
  config.log_every, config.eval_every, config.ckpt_every, config.eval_examples = 2, 100, 100, 16
  config.loss.trepa = 10.0
  config.perceptual.update(trepa_weights=path, trepa_size="Mu/8", trepa_resolution=16)
  train_tokenizer.validate(config)
  train_tokenizer.train(config, str(tmp_path / "run"))
  rows = [r for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
  assert all(np.isfinite(r["trepa"]) and r["trepa"] > 0 for r in rows)
  for r in rows:  # The total includes 10 × TREPA.
    rest = r["loss"] - 10.0 * r["trepa"] - r["l2"] - 0.1 * r["l1"] - 1e-3 * r["kl"]
    assert abs(rest) < 1e-4 * max(1.0, r["loss"])
  image = config_lib.load_config("vitok:Mu-Mu/4,c=8,res=16,data=mnist")
  image.loss.trepa, image.perceptual.trepa_weights = 10.0, path
  with pytest.raises(ConfigError, match="temporal loss for video"):
    train_tokenizer.validate(image)
  config.perceptual.trepa_weights = ""
  with pytest.raises(ConfigError, match="needs perceptual.trepa_weights"):
    train_tokenizer.validate(config)


def test_trepa_clips_videomae_cannot_embed_are_config_errors():
  """VideoMAE embeds 2-frame tubelets of patch × patch pixels: clips it cannot cut are refused
  when the config is checked, not at the first step's trace (after the weights have loaded)."""
  config = config_lib.load_config("vitok:Mu-Mu/1x4,c=8,frames=3,res=16,data=moving_mnist")
  config.loss.trepa = 10.0
  config.perceptual.update(trepa_weights="videomae.npz", trepa_size="Mu/8", trepa_resolution=16)
  with pytest.raises(ConfigError, match="2-frame tubelets, which do not divide data.frames=3"):
    train_tokenizer.validate(config)
  config.data.frames = 4
  train_tokenizer.validate(config)
  config.perceptual.trepa_resolution = 20
  with pytest.raises(ConfigError, match="trepa_resolution=20 is not a multiple of VideoMAE "
                                        "Mu/8's patch 8"):
    train_tokenizer.validate(config)
  # The published weights' position table is their 16-frame, 224 px grid's (8 × 16 × 16 tokens
  # for g/14): other clips would get another table than the one they were trained with.
  config.perceptual.trepa_size = "g/14"
  for frames, resolution in ((4, 224), (16, 112)):
    config.data.frames, config.perceptual.trepa_resolution = frames, resolution
    with pytest.raises(ConfigError, match="position table is for 16-frame clips at 224 px"):
      train_tokenizer.validate(config)
  config.data.frames = 16
  config.perceptual.trepa_resolution = 224
  train_tokenizer.validate(config)


@pytest.fixture(scope="module")
def gan_stages(tmp_path_factory):
  """(stage-1 workdir, stage-2 workdir): 6 plain steps, then 4 GAN steps from them."""
  root = tmp_path_factory.mktemp("gan")
  stage1, stage2 = str(root / "stage1"), str(root / "stage2")
  train_tokenizer.train(tiny_config(steps=6), stage1)
  config = tiny_config(steps=4, **{"gan.enabled": True, "gan.channels": 8, "gan.max_channels": 16})
  config.init_from = stage1
  train_tokenizer.train(config, stage2)
  return stage1, stage2


def test_gan_stage_fine_tunes_the_decoder_from_stage_one_with_the_encoder_frozen(gan_stages):
  stage1, stage2 = gan_stages
  _, before = final_params(stage1)
  _, after = final_params(stage2)
  for frozen in ("patch_embed", "encoder", "bottleneck"):
    jax.tree.map(np.testing.assert_array_equal, before[frozen], after[frozen])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                         before["decoder"], after["decoder"]))
  assert all(changed)
  rows = [r for r in read_jsonl(os.path.join(stage2, "metrics.jsonl")) if "loss" in r]
  assert all(np.isfinite(r["d_loss"]) and r["gan_weight"] == pytest.approx(0.1) for r in rows)


def test_init_from_a_run_of_another_model_is_a_clear_error(gan_stages, tmp_path):
  config = tiny_config(steps=2, **{"model.channels": 4})
  config.init_from = gan_stages[0]
  with pytest.raises(ConfigError, match=r"init_from=.*stage1' \(variant .*\) holds params that do "
                     r"not fit this config.*3 differ, e.g. "
                     r"bottleneck/to_moments/bias: \(16,\) vs \(8,\)"):
    train_tokenizer.train(config, str(tmp_path / "run"))


def test_compare_tokenizers_pairs_runs_on_the_same_images(gan_stages, tmp_path):
  """tools/compare_tokenizers.py: its PSNR means equal each trainer's own final eval over the same
  64 images; a copy of a run differs from it by exactly 0 and is better on no image."""
  import shutil  # pylint: disable=g-import-not-at-top
  from tools import compare_tokenizers  # pylint: disable=g-import-not-at-top
  from vitok_jax.models.perceptual import lpips, weights  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lpips.init_params, jax.random.key(0))
  weights.save(str(tmp_path / "lpips.npz"),
               jax.tree.map(lambda s: np.abs(rng.normal(size=s.shape) * 0.05).astype(np.float32),
                            shapes))
  stage1, stage2 = gan_stages
  copy = shutil.copytree(stage1, str(tmp_path / "copy"))
  result = compare_tokenizers.main([f"--workdirs={stage1},{stage2},{copy}", "--examples=64",
                                    "--batch_size=16", f"--lpips_weights={tmp_path}/lpips.npz"])
  assert result["examples"] == 64
  runs = result["runs"]
  for workdir in (stage1, stage2):
    want = record_lib.read(workdir)["metrics"]["eval/psnr"]
    assert runs[workdir]["psnr"]["mean"] == pytest.approx(want, rel=1e-5)
  assert runs[copy]["minus_first"]["lpips"] == {"mean": 0.0, "sem": 0.0}
  assert runs[copy]["fraction_better"] == {"lpips": 0.0, "psnr": 0.0}
  delta = runs[stage2]["minus_first"]["lpips"]["mean"]
  assert delta != 0.0
  # Float32 means of ~0.04 agree to ~1e-9, a part in 1e-4 of a delta of ~3e-5.
  assert delta == pytest.approx(runs[stage2]["lpips"]["mean"] - runs[stage1]["lpips"]["mean"],
                                rel=1e-3)


def test_vitok_eval_adds_fid_mnist_to_the_record(tmp_path, capsys, monkeypatch):
  workdir = str(tmp_path)
  train_tokenizer.train(tiny_config(steps=4), workdir)
  # The classifier is cached in the workdir on first use; a short one keeps this test fast.
  from vitok_jax.models.perceptual import mnist_classifier
  classifier = os.path.join(workdir, "mnist_classifier.npz")
  mnist_classifier.load_or_train(classifier, steps=30)
  metrics = train_tokenizer.evaluate_workdir(workdir, metrics=("fid_mnist",))
  assert metrics["step"] == 4 and metrics["eval/fid_mnist"] > 0
  assert record_lib.read(workdir)["metrics"]["eval/fid_mnist"] == metrics["eval/fid_mnist"]
  # Relaunching the finished run leaves its record as it stands (it used to evaluate again and
  # write a record without the metric `vitok eval` added).
  assert train_tokenizer.train(tiny_config(steps=4), workdir)["metrics"]["eval/fid_mnist"] == (
      metrics["eval/fid_mnist"])
  assert record_lib.read(workdir)["metrics"]["eval/fid_mnist"] == metrics["eval/fid_mnist"]
  # `vitok eval` without --config takes the run's own, so --config.eval.x overrides apply to it.
  from vitok_jax import cli  # pylint: disable=g-import-not-at-top
  argv = ["vitok", "eval", f"--workdir={workdir}", "--metrics=lpips",
          "--config.eval.lpips_weights=/no/lpips.npz"]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections finds --config.x overrides there.
  assert cli.main(argv) == 2
  assert "eval.lpips_weights='/no/lpips.npz' does not exist" in capsys.readouterr().err
  # Other fields would score another model or data than the run's, into its record: refused.
  argv = ["vitok", "eval", f"--workdir={workdir}", "--config.data.name=digits"]
  monkeypatch.setattr(sys, "argv", argv)
  assert cli.main(argv) == 2
  assert "as it trained; it would change data.name: 'mnist' → 'digits'" in capsys.readouterr().err
  # On fewer held-out examples the metrics are tagged: the run's own stay as they were.
  own = record_lib.read(workdir)["metrics"]
  config = config_lib.read_config(workdir)
  config.eval_examples = 16
  fewer = train_tokenizer.evaluate_workdir(workdir, config)
  assert set(fewer) == {"step", *(f"eval/eval_examples=16/{k}" for k in ("psnr", "ssim", "l2"))}
  after = record_lib.read(workdir)["metrics"]
  assert {k: after[k] for k in own} == own
  assert after["eval/eval_examples=16/psnr"] == fewer["eval/eval_examples=16/psnr"]


def test_checkpoint_from_before_a_new_empty_state_field_restores(tmp_path):
  """A checkpoint written before TrainState.code_counts existed restores into today's state."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitok_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  old = dict(step=jnp.int32(7), params={"w": jnp.arange(3.0)}, opt_state=(jnp.zeros(3),),
             ema_params={}, disc={})
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(7, old)
  target = loop.TrainState(step=jnp.int32(0), params={"w": jnp.zeros(3)},
                           opt_state=(jnp.ones(3),), ema_params={})
  restored = ckpt.restore(7, target)
  assert int(restored.step) == 7 and restored.code_counts == {}
  np.testing.assert_array_equal(restored.params["w"], [0.0, 1.0, 2.0])
  # A real mismatch is still the clear error.
  with pytest.raises(ConfigError, match="does not match this config"):
    ckpt.restore(7, target.replace(params={"w": jnp.zeros(4)}))
  ckpt.close()
