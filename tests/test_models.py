"""ViT blocks and the ViTok auto-encoder: shapes, round trips, RoPE invariants, gradients, axes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok_jax import ConfigError
from vitok_jax.models import bottlenecks, tokenizer, vit


def _init(model, x):
  rngs = {"params": jax.random.key(0), "sample": jax.random.key(1)}
  return model.init(rngs, x, sample=False)


@pytest.mark.parametrize("shape,patch", [((2, 32, 32, 3), (8, 8)), ((2, 8, 16, 16, 1), (4, 4, 4))])
def test_patchify_round_trip_and_layout(shape, patch):
  x = jax.random.normal(jax.random.key(0), shape)
  tokens = tokenizer.patchify(x, patch)
  grid = tokenizer.token_grid(shape[1:-1], patch)
  assert tokens.shape == (shape[0], np.prod(grid), np.prod(patch) * shape[-1])
  np.testing.assert_array_equal(tokenizer.unpatchify(tokens, patch, grid), x)
  # Token 1 is the second patch along the last spatial axis (row-major grid).
  first = x[0, :patch[0], :patch[1]] if len(patch) == 2 else x[0, :patch[0], :patch[1], :patch[2]]
  np.testing.assert_array_equal(tokens[0, 0], first.reshape(-1))
  second = (x[0, :patch[0], patch[1]:2 * patch[1]] if len(patch) == 2
            else x[0, :patch[0], :patch[1], patch[2]:2 * patch[2]])
  np.testing.assert_array_equal(tokens[0, 1], second.reshape(-1))


def test_token_grid_rejects_non_dividing_patch():
  with pytest.raises(ConfigError, match="patch size 5 does not divide H=32"):
    tokenizer.token_grid((32, 32), (5, 5))


@pytest.mark.parametrize("kind,grid", [("1d", (4, 4)), ("axial", (4, 4)), ("axial", (2, 3, 4))])
def test_rope_is_a_relative_rotation(kind, grid):
  """q·k after RoPE depends only on the position offset: shifting both positions keeps the score."""
  head_dim = 12
  sin, cos = vit.rope_tables(grid, head_dim, kind)
  n = int(np.prod(grid))
  assert sin.shape == cos.shape == (n, head_dim // 2)
  q = jax.random.normal(jax.random.key(1), (1, 1, 1, head_dim))
  k = jax.random.normal(jax.random.key(2), (1, 1, 1, head_dim))
  rot = lambda v, i: vit.apply_rope(v, sin[i:i + 1], cos[i:i + 1])
  # Norm preserved.
  np.testing.assert_allclose(jnp.linalg.norm(rot(q, 3)), jnp.linalg.norm(q), rtol=1e-5)
  # Offset along the last grid axis: positions (0 -> 1) and (2 -> 3) in the same row.
  s01 = jnp.sum(rot(q, 0) * rot(k, 1))
  s23 = jnp.sum(rot(q, 2) * rot(k, 3))
  np.testing.assert_allclose(s01, s23, rtol=1e-4, atol=1e-5)


def test_axial_rope_splits_pairs_across_axes():
  sin, _ = vit.rope_tables((2, 3, 4), head_dim=16, kind="axial")  # 8 pairs -> 3, 3, 2.
  angles = np.arcsin(sin)
  # Token 1 differs from token 0 only along w: only the last share (pairs 6..7) rotates.
  assert np.allclose(angles[1, :6], 0) and not np.allclose(angles[1, 6:], 0)
  # Token 4 differs only along h: pairs 3..5.
  assert np.allclose(angles[4, :3], 0) and not np.allclose(angles[4, 3:6], 0)
  assert np.allclose(angles[4, 6:], 0)


def test_rope_1d_equals_axial_on_a_line():
  s1, c1 = vit.rope_tables((6,), 8, "1d")
  s2, c2 = vit.rope_tables((6,), 8, "axial")
  np.testing.assert_allclose(s1, s2)
  np.testing.assert_allclose(c1, c2)


@pytest.mark.parametrize("kind,expected_hidden", [("geglu", 176), ("swiglu", 176), ("gelu", 256)])
def test_mlp_kinds(kind, expected_hidden):
  mlp = vit.MLP(vit.mlp_dim(64, kind), kind)
  x = jnp.ones((1, 3, 64))
  params = nn.meta.unbox(mlp.init(jax.random.key(0), x))["params"]
  hidden = {k: v["kernel"].shape for k, v in params.items()}
  assert all(expected_hidden in shape for shape in hidden.values())
  assert len(hidden) == (2 if kind == "gelu" else 3)
  # Gated MLP equals act(x Wg) * (x Wu) Wo computed by hand.
  if kind != "gelu":
    act = nn.gelu if kind == "geglu" else nn.silu
    lin = lambda name, v: v @ params[name]["kernel"] + params[name]["bias"]
    ref = lin("wo", act(lin("wi_gate", x)) * lin("wi_up", x))
    np.testing.assert_allclose(mlp.apply({"params": params}, x), ref, rtol=1e-5, atol=1e-5)


def _tiny(patch=(4, 4), pixel_channels=1, c=8, **kw):
  return tokenizer.ViTok(vit.decode_size("Mu"), vit.decode_size("Mu"), patch, pixel_channels, c, **kw)


def test_vitok_shapes_and_every_param_has_logical_axes():
  model = _tiny(qk_norm=True)
  x = jnp.zeros((2, 16, 16, 1))
  variables = _init(model, x)
  specs = jax.tree.leaves(nn.get_partition_spec(variables)["params"],
                          is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  leaves = jax.tree.leaves(nn.meta.unbox(variables)["params"])
  assert len(specs) == len(leaves)
  for spec, leaf in zip(specs, leaves):
    assert len(spec) == leaf.ndim and all(isinstance(a, str) for a in spec), spec
  recon, aux = model.apply(variables, x, sample=True, rngs={"sample": jax.random.key(2)})
  assert recon.shape == x.shape and aux["mean"].shape == (2, 16, 8)


def test_video_tubelets_with_axial_rope():
  model = _tiny(patch=(2, 4, 4), pixel_channels=3, rope="axial")
  x = jax.random.uniform(jax.random.key(0), (1, 4, 8, 8, 3), minval=-1, maxval=1)
  variables = _init(model, x)
  z, _, grid = model.apply(variables, x, method=model.encode)
  assert grid == (2, 2, 2) and z.shape == (1, 8, 8)
  assert model.apply(variables, z, grid, method=model.decode).shape == x.shape


def test_gaussian_kl_matches_closed_form_and_sampling_uses_variance():
  layer = bottlenecks.GaussianBottleneck(channels=4)
  h = jax.random.normal(jax.random.key(0), (3, 5, 16))
  variables = layer.init({"params": jax.random.key(1)}, h, sample=False)
  z_mean, aux = layer.apply(variables, h, sample=False)
  mean, logvar = np.asarray(aux["mean"], np.float64), np.asarray(aux["logvar"], np.float64)
  kl_ref = np.mean(0.5 * (mean**2 + np.exp(logvar) - 1 - logvar))
  np.testing.assert_allclose(aux["loss_terms"]["kl"], kl_ref, rtol=1e-5)
  np.testing.assert_array_equal(z_mean, aux["mean"])
  z1, _ = layer.apply(variables, h, sample=True, rngs={"sample": jax.random.key(2)})
  z2, _ = layer.apply(variables, h, sample=True, rngs={"sample": jax.random.key(3)})
  noise = (np.asarray(z1) - mean) / np.exp(0.5 * logvar)
  assert abs(noise.std() - 1.0) < 0.2 and not np.allclose(z1, z2)


def test_gradients_reach_every_parameter():
  model = _tiny()
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1, maxval=1)
  params = nn.meta.unbox(_init(model, x))["params"]

  def loss(p):
    recon, aux = model.apply({"params": p}, x, sample=True, rngs={"sample": jax.random.key(1)})
    return jnp.mean((recon - x) ** 2) + aux["loss_terms"]["kl"]

  grads = jax.grad(loss)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_bf16_compute_is_close_to_f32():
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1, maxval=1)
  f32, bf16 = _tiny(), _tiny(dtype=jnp.bfloat16)
  params = nn.meta.unbox(_init(f32, x))
  r32, _ = f32.apply(params, x, sample=False)
  r16, _ = bf16.apply(params, x, sample=False)
  assert r16.dtype == jnp.float32
  np.testing.assert_allclose(r16, r32, atol=0.1)
  assert not np.array_equal(r16, r32)


def test_decode_size_rejects_unknown_names():
  with pytest.raises(ConfigError, match="unknown vitok size .XXL."):
    vit.decode_size("XXL")


def test_unknown_rope_mlp_and_bottleneck_kinds_are_config_errors():
  """They used to be taken silently: rope="2d" as axial, mlp="relu" as SwiGLU (a KeyError for an
  unknown bottleneck)."""
  with pytest.raises(ConfigError, match="rope='2d'"):
    vit.rope_tables((4, 4), 8, "2d")
  with pytest.raises(ConfigError, match="mlp='relu'"):
    jax.eval_shape(vit.MLP(16, "relu").init, jax.random.key(0), jnp.zeros((1, 2, 8)))
  with pytest.raises(ConfigError, match="bottleneck='vqq'"):
    bottlenecks.build("vqq", 4)
  for kind in ("1d", "axial"):
    assert vit.rope_tables((4, 4), 8, kind)[0].shape == (16, 4)
