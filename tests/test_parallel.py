"""Meshes, the sharding rule table, and sharded training equal to one device."""
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from vitok_jax import ConfigError, config_lib
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.parallel import sharding
from vitok_jax.train import train_tokenizer

HERE = pathlib.Path(__file__).parent
GOLDEN = HERE / "golden" / "sharding_Mu-Mi.json"


def _mesh_cfg(**sizes):
  cfg = mesh_lib.default_config()
  cfg.update(sizes)
  return cfg


@pytest.mark.parametrize("sizes,devices,ici,dcn", [
    (dict(), 8, (8, 1, 1), (1, 1, 1)),
    (dict(fsdp=4, tensor=2), 8, (1, 4, 2), (1, 1, 1)),
    (dict(data=2, fsdp=-1), 8, (2, 4, 1), (1, 1, 1)),
    (dict(data=1, fsdp=-1, dcn_data=4), 256, (1, 64, 1), (4, 1, 1)),
])
def test_mesh_shapes(sizes, devices, ici, dcn):
  assert mesh_lib.mesh_shapes(_mesh_cfg(**sizes), devices) == (ici, dcn)


@pytest.mark.parametrize("sizes,devices,match", [
    (dict(data=3), 8, r"need 3 devices exactly, but there are 8"),
    (dict(data=-1, fsdp=3), 8, r"need 3 devices, but there are 8; make their product divide 8"),
    (dict(data=-1, fsdp=-1), 8, r"at most one -1"),
    (dict(dcn_data=3), 8, r"8 devices do not split into 3 DCN groups"),
])
def test_mesh_that_does_not_fit_is_a_clear_error(sizes, devices, match):
  with pytest.raises(ConfigError, match=match):
    mesh_lib.mesh_shapes(_mesh_cfg(**sizes), devices)


def test_batch_must_split_over_batch_shards():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), mesh_lib.AXES)  # data x fsdp = 4 batch shards.
  assert mesh_lib.batch_shards(mesh) == 4 and mesh_lib.per_process_batch(12, mesh) == 12
  with pytest.raises(ConfigError, match=r"batch_size=10 must be divisible by the 4 batch shards"):
    mesh_lib.per_process_batch(10, mesh)


def _state_mesh_specs(config):
  """Mesh PartitionSpecs of every train-state leaf, from the logical names and the rule table."""
  parts = train_tokenizer.build_components(config)
  example = jax.ShapeDtypeStruct((1, *train_tokenizer.pixel_shape(config)), np.float32)
  boxed = jax.eval_shape(lambda x: parts.model.init(
      {"params": jax.random.key(0), "sample": jax.random.key(1)}, x, sample=False)["params"], example)
  param_specs = sharding.param_logical_specs(boxed)
  abstract = train_tokenizer.abstract_state(parts, config)
  opt_specs = sharding.opt_state_logical_specs(parts.tx, abstract.opt_state, param_specs)
  to_mesh = lambda specs: nn.logical_to_mesh(specs, sharding.LOGICAL_AXIS_RULES)
  return sharding.describe(to_mesh(param_specs)), sharding.describe(to_mesh(opt_specs)), abstract


def test_golden_parameter_sharding():
  """Pins the mesh PartitionSpec of every parameter; a sharding change shows up as a diff.

  Regenerate with VITOK_UPDATE_GOLDEN=1 after an intended change, and review the diff.
  """
  config = config_lib.load_config("vitok:Mu-Mi/4,c=8,res=16,data=mnist,mlp=geglu,qk_norm=true")
  params, opt, abstract = _state_mesh_specs(config)
  if os.environ.get("VITOK_UPDATE_GOLDEN"):
    GOLDEN.write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
  assert params == json.loads(GOLDEN.read_text())
  # Spot checks of the rules themselves: FSDP on embed, tensor parallel on mlp/heads.
  assert params["encoder/block0/mlp/wi_gate/kernel"] == "('fsdp', 'tensor')"
  assert params["encoder/block0/attn/out/kernel"] == "('tensor', 'fsdp')"
  assert params["encoder/block0/norm_attn/scale"] == "('fsdp',)"
  assert params["bottleneck/to_moments/kernel"] == "('fsdp', None)"
  # Adam moments follow their parameters; counters are replicated.
  moments = {k: v for k, v in opt.items() if k.endswith("encoder/block0/mlp/wi_gate/kernel")}
  assert moments and set(moments.values()) == {"('fsdp', 'tensor')"}
  assert len(opt) == len(jax.tree.leaves(abstract.opt_state))


def _run_with_devices(n, *args, timeout=900):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
  out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


def test_data_fsdp_and_tensor_parallel_match_one_device():
  """8 fake devices: DP, FSDP, FSDP x tensor and DP x FSDP x tensor give the single-device loss
  for the first 20 steps."""
  out = _run_with_devices(8, str(HERE / "mesh_equivalence.py"), "20")
  losses = json.loads(out.strip().splitlines()[-1])
  single = np.asarray(losses.pop("single"))
  assert len(single) == 20 and np.all(np.isfinite(single))
  for name, values in losses.items():
    np.testing.assert_allclose(values, single, rtol=2e-5, err_msg=name)
