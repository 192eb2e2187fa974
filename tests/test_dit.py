"""DiT: shapes, adaLN-zero at init, DiT's position/timestep/patch layouts, label dropout, gradients, axes."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitok_jax import ConfigError
from vitok_jax.models import dit, flow, vit

NUM_CLASSES = 10
STEP = jnp.array([0.0, 0.5])  # Shortcut step sizes of the two examples.


@functools.cache
def _setup(patch):
  """(model, params at init, jitted eval apply) for a Mu-size DiT with step-size input.

  Shared across tests (XLA compiles are the slow part on CPU): the init rng is the cheap-to-compile
  unsafe_rbg, and every class label is dropped in training (class_dropout=1) so that test is exact.
  """
  model = dit.DiT(vit.decode_size("Mu", "dit"), patch=patch, in_channels=4,
                  num_classes=NUM_CLASSES, class_dropout=1.0, use_step_size=True)
  x, t, labels = _inputs()
  init = jax.jit(lambda: model.init({"params": jax.random.key(1, impl="unsafe_rbg")}, x, t, labels,
                                    train=False, step_size_B=STEP))
  apply = jax.jit(lambda params, x, t, labels, d: model.apply(params, x, t, labels, train=False,
                                                              step_size_B=d))
  return model, nn.unbox(init()), apply


def _inputs(batch=2, size=8):
  x = jax.random.normal(jax.random.key(0), (batch, size, size, 4))
  return x, jnp.linspace(0.2, 0.8, batch), jnp.arange(batch) % NUM_CLASSES


def _perturb(params, scale=0.2):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return treedef.unflatten([p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _reference_pos_embed(embed_dim, grid_size):
  """facebookresearch/DiT's get_2d_sincos_pos_embed, transcribed."""
  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000 ** omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("patch", [1, 2])
def test_output_shape_and_zero_at_init(patch):
  _, params, apply = _setup(patch)
  x, t, labels = _inputs()
  v = apply(params, x, t, labels, STEP)
  assert v.shape == x.shape and v.dtype == x.dtype
  np.testing.assert_array_equal(v, 0.0)  # adaLN-zero: final projection and modulations start at 0.


def test_output_depends_on_t_label_step_and_x_and_labels_drop_only_in_training():
  model, params, apply = _setup(2)
  params = _perturb(params)
  x, t, labels = _inputs()
  null = jnp.full_like(labels, NUM_CLASSES)
  # One batch of variants (one compile): base, then t, label, step size, x of example 1 changed,
  # null label.
  variants = [(x, t, labels, STEP), (x, t + 0.3, labels, STEP),
              (x, t, (labels + 1) % NUM_CLASSES, STEP), (x, t, labels, STEP + 0.25),
              (x.at[1].add(1.0), t, labels, STEP), (x, t, null, STEP)]
  batched = [jnp.concatenate(parts) for parts in zip(*variants)]
  v_eval = apply(params, *batched).reshape(len(variants), *x.shape)
  assert float(jnp.abs(v_eval[0]).mean()) > 1e-3
  for i, what in enumerate(["t", "label", "step size", "x", "null label"], start=1):
    assert float(jnp.abs(v_eval[i] - v_eval[0]).max()) > 1e-3, what
  # Examples do not mix: changing example 1's x leaves example 0's output alone.
  np.testing.assert_allclose(v_eval[4, 0], v_eval[0, 0], rtol=1e-4, atol=1e-4)
  # train=True drops every label (class_dropout=1) to the null class; eval keeps them (above).
  v_train = jax.jit(lambda *a: model.apply(params, *a[:3], train=True, step_size_B=a[3],
                                           rngs={"dropout": jax.random.key(3)}))(*batched)
  v_train = v_train.reshape(len(variants), *x.shape)
  np.testing.assert_allclose(v_train[0], v_eval[-1], rtol=1e-3, atol=1e-3)


def test_step_size_argument_is_checked():
  model, params, _ = _setup(2)
  x, t, labels = _inputs()
  assert "step_embed" in params["params"]
  with pytest.raises(ConfigError, match="needs step_size_B"):
    model.apply(params, x, t, labels, train=False)
  plain = dit.DiT(vit.decode_size("Mu", "dit"), patch=2, in_channels=4, num_classes=NUM_CLASSES)
  with pytest.raises(ConfigError, match="set use_step_size=True"):
    plain.init({"params": jax.random.key(0)}, x, t, labels, train=False, step_size_B=STEP)


def test_the_step_size_is_embedded_by_its_level_as_the_papers_code():
  """step_input "level" feeds the step embedder log2(1/d) (log2(128) for d = 0), "d" (runs saved
  before the choice) d itself: the same parameters give the same output when the "d" model is
  handed the levels."""
  model, params, apply = _setup(2)
  assert model.step_input == "level"
  np.testing.assert_array_equal(flow.step_level(jnp.array([1.0, 0.5, 1 / 64, 0.0])),
                                [0.0, 1.0, 6.0, 7.0])
  x, t, labels = _inputs()
  by_d = dit.DiT(vit.decode_size("Mu", "dit"), patch=2, in_channels=4, num_classes=NUM_CLASSES,
                 class_dropout=1.0, use_step_size=True, step_input="d")
  params = _perturb(params)  # The step embedding reaches the output only off the zero init.
  level_out = apply(params, x, t, labels, STEP)
  np.testing.assert_allclose(level_out, by_d.apply(params, x, t, labels, train=False,
                                                   step_size_B=flow.step_level(STEP)),
                             rtol=1e-5, atol=1e-4)
  assert not np.allclose(level_out, by_d.apply(params, x, t, labels, train=False,
                                               step_size_B=STEP), atol=1e-3)
  with pytest.raises(ConfigError, match="step_input='log' must be one of"):
    dit.DiT(vit.decode_size("Mu", "dit"), patch=2, in_channels=4, num_classes=NUM_CLASSES,
            use_step_size=True, step_input="log").init({"params": jax.random.key(0)}, x, t, labels,
                                                       train=False, step_size_B=STEP)


def test_position_table_matches_dit():
  for width, grid in ((64, 4), (128, 3)):
    np.testing.assert_allclose(dit.pos_embed_2d(width, (grid, grid)),
                               _reference_pos_embed(width, grid), rtol=1e-6, atol=1e-6)
  table = dit.pos_embed_2d(8, (2, 3))
  # Token 1 is (row 0, column 1): the first half encodes the column as [sin, cos].
  np.testing.assert_allclose(table[1, :4], [math.sin(1), math.sin(1 / 100), math.cos(1),
                                            math.cos(1 / 100)], rtol=1e-6)
  np.testing.assert_allclose(table[1, 4:], [0, 0, 1, 1])
  np.testing.assert_allclose(table[3, 4:], table[1, :4], rtol=1e-6)  # Token 3 is (row 1, col 0).
  with pytest.raises(ConfigError, match="divisible by 4"):
    dit.pos_embed_2d(66, (2, 2))


def test_timestep_embedding_is_cos_then_sin_of_t_as_given():
  t = jnp.array([0.0, 0.5, 1.0])
  emb = np.asarray(dit.timestep_embedding(t))
  freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
  args = np.asarray(t)[:, None] * freqs
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1), atol=1e-6)


def test_patchify_orders_and_round_trip():
  p, c = 2, 3
  x = np.arange(2 * 4 * 6 * c, dtype=np.float32).reshape(2, 4, 6, c)
  tokens = np.asarray(dit.patchify(jnp.asarray(x), p))
  assert tokens.shape == (2, 2 * 3, c * p * p)
  # Token 1 = patch (row 0, col 1), flattened (c, i, j) like DiT's Conv2d weight.
  np.testing.assert_array_equal(tokens[0, 1], x[0, 0:2, 2:4, :].transpose(2, 0, 1).reshape(-1))
  # unpatchify reads each token as (i, j, c).
  out = np.asarray(dit.unpatchify(jnp.asarray(tokens), p, (2, 3)))
  np.testing.assert_array_equal(out[0, 0:2, 2:4, :], tokens[0, 1].reshape(p, p, c))
  # Round trip once the token features are reordered from (c, i, j) to (i, j, c).
  cij_to_ijc = tokens.reshape(2, 6, c, p, p).transpose(0, 1, 3, 4, 2).reshape(2, 6, -1)
  np.testing.assert_array_equal(dit.unpatchify(jnp.asarray(cij_to_ijc), p, (2, 3)), x)
  np.testing.assert_array_equal(dit.unpatchify(dit.patchify(x[..., :1], p), p, (2, 3)), x[..., :1])


def test_drop_labels():
  labels = jnp.arange(4000) % NUM_CLASSES
  dropped = dit.drop_labels(jax.random.key(0), labels, NUM_CLASSES, 0.25)
  changed = np.asarray(dropped != labels)
  assert set(np.asarray(dropped)[changed]) == {NUM_CLASSES}
  assert abs(changed.mean() - 0.25) < 0.03


def test_gradients_reach_every_parameter():
  """At init only the output layer gets gradient (gates are 0); a few steps later every one does."""
  model, params, _ = _setup(2)
  x, t, labels = _inputs()
  target = jax.random.normal(jax.random.key(9), x.shape)
  loss_fn = lambda p: jnp.mean(
      (model.apply(p, x, t, labels, train=False, step_size_B=STEP) - target) ** 2)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads

  opt_state = tx.init(params)
  for _ in range(4):  # The grads of the 4th call are taken 3 Adam steps away from init.
    params, opt_state, grads = step(params, opt_state)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) > 20
  for path, g in flat:
    name = jax.tree_util.keystr(path)
    assert np.isfinite(g).all(), name
    if "class_embed" in name:  # Only the rows of the labels used move.
      g = g[np.asarray(labels)]
    assert float(jnp.abs(g).max()) > 0, name


def test_every_parameter_has_logical_axes():
  model, _, _ = _setup(2)
  x, t, labels = _inputs()
  boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(1)}, x, t, labels,
                                             train=False, step_size_B=STEP))
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, leaf
  specs = nn.get_partition_spec(boxed)["params"]
  assert tuple(specs["block0"]["adaln"]["kernel"]) == ("embed", "mlp")
  assert tuple(specs["block0"]["attn"]["query"]["kernel"]) == ("embed", "heads")
  assert tuple(specs["class_embed"]) == ("classes", "embed")


def test_bad_arguments_raise_config_errors():
  x, t, labels = _inputs()
  with pytest.raises(ConfigError, match="set in_channels=4"):
    dit.DiT(vit.decode_size("Mu", "dit"), patch=1, in_channels=3, num_classes=NUM_CLASSES).init(
        {"params": jax.random.key(0)}, x, t, labels, train=False)
  with pytest.raises(ConfigError, match="does not divide latent H=6"):
    dit.DiT(vit.decode_size("Mu", "dit"), patch=4, in_channels=4, num_classes=NUM_CLASSES).init(
        {"params": jax.random.key(0)}, x[:, :6, :6], t, labels, train=False)
