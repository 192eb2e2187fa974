"""Slow: what the tokenizer must achieve on bundled data (run with `python -m pytest -m slow`)."""
import os
import subprocess
import sys
import time

import pytest

from vitok_jax import config_lib
from vitok_jax.scaling import record as record_lib
from vitok_jax.train import train_tokenizer


@pytest.mark.slow
def test_embedded_default_reaches_22db_within_10_minutes(tmp_path):
  """The README's main command: the default config on bundled MNIST, 2 CPU cores."""
  start = time.time()
  out = subprocess.run([sys.executable, "-m", "vitok_jax.cli", "train", f"--workdir={tmp_path}"],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  minutes = (time.time() - start) / 60
  assert out.returncode == 0, out.stderr[-3000:]
  psnr = record_lib.read(str(tmp_path))["metrics"]["eval/psnr"]
  print(f"embedded default: held-out PSNR {psnr:.2f} dB in {minutes:.1f} min")
  assert psnr >= 22.0 and minutes <= 10.0


@pytest.mark.slow
def test_larger_bottleneck_E_reconstructs_better(tmp_path):
  """ViTok's central finding in miniature: with all else fixed, PSNR rises with E = tokens x c."""
  psnrs = {}
  for c in (2, 8, 32):
    config = config_lib.load_config(f"vitok:Mu-Mu/4,c={c},res=32,data=mnist,batch=32,steps=300,lr=2e-3")
    config.log_every, config.eval_every, config.ckpt_every, config.eval_examples = 100, 300, 300, 500
    record = train_tokenizer.train(config, str(tmp_path / f"c{c}"))
    psnrs[record["E"]] = record["metrics"]["eval/psnr"]
  print("held-out PSNR by E:", psnrs)
  values = [psnrs[e] for e in sorted(psnrs)]
  assert values == sorted(values) and values[-1] - values[0] > 1.0, psnrs
