"""Meshes, the sharding rule table, and sharded training equal to one device."""
import json
import math
import os
import pathlib
import subprocess
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from vitok_jax import ConfigError, config_lib
from vitok_jax.launch import jobspec
from vitok_jax.models import vit
from vitok_jax.parallel import distributed
from vitok_jax.parallel import mesh as mesh_lib
from vitok_jax.parallel import sharding
from vitok_jax.train import train_tokenizer

HERE = pathlib.Path(__file__).parent
GOLDEN = HERE / "golden" / "sharding_Mu-Mi.json"


def _shards(mesh, axes) -> int:
  """How many ways mesh `axes` (a name, a tuple of names or None) split a dimension."""
  names = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in names], dtype=int))


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


def test_a_job_mesh_fills_dcn_minus_one_with_its_nodes():
  """dcn_data=-1 for a 4-node job resolves to the job's 4 nodes, not the launching machine's one
  process (which made 32 GPUs 'need 8 devices exactly'); on one node with a process per GPU the
  DCN groups are its 8 processes; a fixed DCN size that is neither 1 nor the groups is refused
  before submission (make_mesh refused it on the nodes)."""
  assert mesh_lib.mesh_shapes(_mesh_cfg(data=1, fsdp=8, dcn_data=-1), 32, granules=4) == (
      (1, 8, 1), (4, 1, 1))
  jobspec.check_mesh(_mesh_cfg(data=1, fsdp=8, dcn_data=-1), nodes=4, gpus_per_node=8)
  with pytest.raises(ConfigError,
                     match=r"need 16 devices exactly, but there are 8; .* = 4 × 8 GPUs"):
    jobspec.check_mesh(_mesh_cfg(data=1, fsdp=16, dcn_data=-1), nodes=4, gpus_per_node=8)
  jobspec.check_mesh(_mesh_cfg(data=1, fsdp=-1, dcn_data=-1), nodes=1, gpus_per_node=8,
                     processes_per_node=8)
  with pytest.raises(ConfigError, match=r"need 8 devices exactly, but there are 1;"):
    jobspec.check_mesh(_mesh_cfg(data=1, fsdp=8, dcn_data=-1), nodes=1, gpus_per_node=8,
                       processes_per_node=8)
  with pytest.raises(ConfigError, match=r"ask for 2 DCN groups, but its GPUs are in 4 nodes; set "
                     r".* product is 4 .* \(the job has nodes × gpus_per_node = 4 × 8 GPUs\)"):
    jobspec.check_mesh(_mesh_cfg(data=1, fsdp=-1, dcn_data=2), nodes=4, gpus_per_node=8)


def test_dcn_sizes_must_match_the_slices_or_processes():
  """dcn_data=2 on one process: a ConfigError naming the fix, not mesh_utils' ValueError."""
  devices = [types.SimpleNamespace(id=i, process_index=0) for i in range(8)]
  with pytest.raises(ConfigError, match=r"ask for 2 DCN groups, but the 8 devices are in 1 "
                     r"processes; set .* product is 1"):
    mesh_lib.make_mesh(_mesh_cfg(dcn_data=2), devices)


@pytest.mark.parametrize("heads,spec", [(4, (("data", "fsdp"), None, "tensor", None)),
                                        (3, (("data", "fsdp"), None, None, None))])
def test_activation_constraints_skip_a_dimension_the_mesh_axes_do_not_divide(heads, spec):
  """3 heads on tensor=2 stay unsplit, as their parameters do (XLA otherwise pads and permutes
  them every layer); 4 heads split."""
  mesh = jax.sharding.AbstractMesh((1, 2, 2), mesh_lib.AXES)
  fn = lambda x: vit.constrain(x, ("batch", "length", "act_heads", "act_kv"))
  with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    jaxpr = jax.make_jaxpr(fn)(np.zeros((4, 5, heads, 8), np.float32))
  assert [tuple(e.params["sharding"].spec) for e in jaxpr.eqns] == [spec]


@pytest.mark.parametrize("mesh_shape", [(2, 1, 3), (1, 3, 1), (1, 4, 2)])
def test_rules_never_shard_a_dimension_the_mesh_axes_do_not_divide(mesh_shape):
  """Mu width 64 on tensor=3 or fsdp=3: each dimension keeps the mesh axes that divide it, the
  rest replicate (jit/device_put raised an IndivisibleError naming no parameter); where all
  divide (1, 4, 2) nothing changes."""
  config = config_lib.load_config("vitok:Mu-Mi/4,c=8,res=16,data=mnist,mlp=geglu,qk_norm=true")
  model = train_tokenizer.build_model(config)
  example = jax.ShapeDtypeStruct((1, *train_tokenizer.pixel_shape(config)), np.float32)
  rngs = {"params": jax.random.key(0), "sample": jax.random.key(1)}
  boxed = jax.eval_shape(lambda x: model.init(rngs, x, sample=False)["params"], example)
  specs, shapes = sharding.param_logical_specs(boxed), nn.meta.unbox(boxed)
  mesh = jax.sharding.AbstractMesh(mesh_shape, mesh_lib.AXES)
  plain = sharding.logical_to_mesh(specs, mesh)
  fitted = sharding.logical_to_mesh(specs, mesh, shapes=shapes)
  flat_plain, flat_fitted, flat_shapes = (jax.tree.leaves(t) for t in (plain, fitted, shapes))
  changed = 0
  for before, after, leaf in zip(flat_plain, flat_fitted, flat_shapes):
    for axes_before, axes_after, size in zip(tuple(before.spec) + (None,) * 4, after.spec,
                                             leaf.shape):
      assert size % _shards(mesh, axes_after) == 0, (leaf, after)
      changed += axes_after != axes_before
  if 3 in mesh_shape:
    assert changed > 0
  else:
    assert changed == 0 and flat_fitted == flat_plain
  # The trainer's shardings of its whole state (params, Adam moments, EMA) are fitted too.
  parts = train_tokenizer.build_components(config)
  state = train_tokenizer.state_shardings(parts, config, mesh)
  for sharded, leaf in zip(jax.tree.leaves(state), jax.tree.leaves(
      train_tokenizer.abstract_state(parts, config))):
    assert not any(size % _shards(mesh, axes)
                   for axes, size in zip(sharded.spec, leaf.shape)), (leaf, sharded)


def test_the_gan_discriminator_and_its_adam_state_are_split_over_fsdp():
  """The discriminator's kernels (and their Adam moments, like the params') are split over fsdp:
  replicated, a 256-px stage-2 run held all of them on every device, more than the sharded
  tokenizer state."""
  config = config_lib.load_config("vitok:Mu-Mi/4,c=8,res=32,data=mnist")
  config.gan.enabled = True
  parts = train_tokenizer.build_components(config)
  mesh = jax.sharding.AbstractMesh((1, 8, 1), mesh_lib.AXES)
  shardings = train_tokenizer.state_shardings(parts, config, mesh).disc
  abstract = train_tokenizer.abstract_state(parts, config).disc
  per_device = total = 0
  for sharded, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)):
    assert not any(size % _shards(mesh, axes) for axes, size in zip(sharded.spec, leaf.shape))
    per_device += leaf.size // math.prod(_shards(mesh, axes) for axes in sharded.spec)
    total += leaf.size
  kernels = {path: s.spec for path, s in jax.tree_util.tree_leaves_with_path(shardings.params)
             if path[-1].key == "kernel" and path[0].key != "logit"}
  assert kernels and all("fsdp" in jax.tree.leaves(tuple(spec)) for spec in kernels.values())
  assert per_device < total / 6  # The biases and the logit's kernel stay whole.
  mu = shardings.opt_state[0].mu
  assert jax.tree.leaves(mu) == jax.tree.leaves(shardings.params)


def _slurm_env(monkeypatch, **env):
  for name in list(os.environ):
    if name.startswith(("SLURM_", "TPU_", "MEGASCALE_", "VITOK_")):
      monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(distributed, "_initialized", False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  distributed.initialize()
  return calls


BATCH_SCRIPT = dict(SLURM_JOB_ID="7", SLURM_NTASKS="4", SLURM_PROCID="0", SLURM_LOCALID="0",
                    SLURM_JOB_NODELIST="n[1-2]")


def test_slurm_tasks_started_by_srun_join_one_job(monkeypatch):
  calls = _slurm_env(monkeypatch, SLURM_STEP_NODELIST="n[1-2]", SLURM_STEP_NUM_TASKS="4",
                     **BATCH_SCRIPT)
  assert calls == [((), {})] and distributed.detected_cluster() == "slurm"


@pytest.mark.parametrize("extra", [{}, dict(SLURM_STEP_NODELIST="n1", SLURM_STEP_NUM_TASKS="1")])
def test_a_lone_process_in_a_slurm_allocation_runs_alone(monkeypatch, extra):
  """`vitok train` typed in a batch script or salloc shell of a 4-task job (no srun step), or an
  srun step of one task: one process. jax.distributed.initialize() failed there with
  "coordinator_address should be defined" (or waited for 4 tasks)."""
  assert _slurm_env(monkeypatch, **BATCH_SCRIPT, **extra) == []
  assert distributed.detected_cluster() is None


def test_batch_must_split_over_batch_shards():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), mesh_lib.AXES)  # data x fsdp = 4 batch shards.
  assert mesh_lib.batch_shards(mesh) == 4 and mesh_lib.per_process_batch(12, mesh) == 12
  with pytest.raises(ConfigError, match=r"batch_size=10 must be divisible by the 4 batch shards"):
    mesh_lib.per_process_batch(10, mesh)


def test_a_batch_shard_across_processes_is_a_config_error(monkeypatch):
  """Each process loads its own rows, so a batch shard (data x fsdp) must sit in one process: a
  tensor axis across 2 processes would feed them different rows of one "replicated" shard."""
  class Device:  # 4 devices, 2 per process.
    def __init__(self, i):
      self.id, self.process_index = i, i // 2

  devices = lambda shape: np.array([Device(i) for i in range(4)]).reshape(shape)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  across = jax.sharding.Mesh(devices((1, 1, 4)), mesh_lib.AXES)
  with pytest.raises(ConfigError, match=r"a batch shard spans processes \(mesh.tensor=4"):
    mesh_lib.per_process_batch(8, across)
  within = jax.sharding.Mesh(devices((2, 1, 2)), mesh_lib.AXES)  # tensor=2 inside a process.
  assert mesh_lib.per_process_batch(8, within) == 4


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
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                      f"--xla_force_host_platform_device_count={n}"}
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
