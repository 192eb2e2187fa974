"""LlamaGen AR generator and token sampling: KV cache = full forward, causality, 2-D RoPE table,
SwiGLU sizing, logical axes, top-k/top-p against numpy, CFG, greedy decoding, a toy fit."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitok_jax import ConfigError
from vitok_jax.models import ar, sampling, vit

TINY = vit.ViTSize(32, 2, 2)   # head_dim 16: 8 rotary pairs, 4 per grid axis.
NULL = 3                       # The null class of `_model` (num_classes = 3).


def _model(grid=(3, 3), **kw):
  """Tiny LlamaGen; parameter shapes do not depend on `grid`, so one `params` serves all grids."""
  return ar.LlamaGen(TINY, vocab_size=11, num_classes=3, grid=grid, mlp_multiple_of=8, **kw)


def _numpy_params(model, std, seed=0):
  """Parameters with the model's tree and shapes (no init compile): N(0, std²) weights, RMSNorm
  scales 1 + N(0, std²)."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, model.seq_len),
                                                                         jnp.int32),
                                            jnp.zeros((1,), jnp.int32), train=False))
  rng = np.random.default_rng(seed)
  leaf = lambda path, x: jnp.asarray(
      ("scale" in jax.tree_util.keystr(path)) + std * rng.normal(size=x.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, nn.unbox(boxed))


@pytest.fixture(scope="module")
def params():
  return _numpy_params(_model(), std=0.5)


def _codes(model, batch=2, seed=2):
  return jax.random.randint(jax.random.key(seed), (batch, model.seq_len), 0, model.vocab_size)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_kv_cache_decoding_matches_full_forward(params, grid):
  model = _model(grid)
  codes_BL, labels_B = _codes(model), jnp.array([0, NULL])

  @jax.jit
  def full_and_cached(params, codes_BL, labels_B):
    full_BLV = model.apply(params, codes_BL, labels_B, train=False)
    cache = model.init_cache(codes_BL.shape[0])
    first_BV, cache = model.apply(params, labels_B, cache, method=model.prefill)

    def step(cache, pos):   # Teacher-forced: the input at position pos is codes[:, pos - 1].
      logits_BV, cache = model.apply(params, codes_BL[:, pos - 1], pos, cache,
                                     method=model.decode_step)
      return cache, logits_BV

    _, rest_LBV = jax.lax.scan(step, cache, jnp.arange(1, model.seq_len))
    return full_BLV, jnp.concatenate([first_BV[:, None], rest_LBV.transpose(1, 0, 2)], axis=1)

  full_BLV, cached_BLV = full_and_cached(params, codes_BL, labels_B)
  assert full_BLV.shape == cached_BLV.shape == (2, model.seq_len, model.vocab_size)
  assert float(jnp.abs(full_BLV).max()) > 0.1   # Non-trivial logits.
  np.testing.assert_allclose(cached_BLV, full_BLV, atol=1e-5, rtol=1e-5)


def test_causality(params):
  model = _model((3, 4))
  codes_BL, labels_B = _codes(model), jnp.array([1, 2])
  changed = (0, 5, model.seq_len - 2)
  variants_NBL = jnp.stack([codes_BL] + [
      codes_BL.at[:, j].set((codes_BL[:, j] + 1) % model.vocab_size) for j in changed])
  out_NBLV = jax.jit(jax.vmap(lambda c: model.apply(params, c, labels_B, train=False)))(
      variants_NBL)
  for n, j in enumerate(changed, 1):
    np.testing.assert_allclose(out_NBLV[n, :, :j + 1], out_NBLV[0, :, :j + 1], atol=1e-6)
    assert float(jnp.abs(out_NBLV[n, :, j + 1] - out_NBLV[0, :, j + 1]).max()) > 1e-4


def _llamagen_rope_reference(h, w, head_dim, base=10_000.0):
  """numpy port of LlamaGen's precompute_freqs_cis_2d (one class token), extended to h ≠ w,
  cut to the training sequence length L = h·w: [L, P, 2] holding (cos, sin)."""
  half_dim = head_dim // 2
  freqs = 1.0 / (base ** (np.arange(0, half_dim, 2)[: half_dim // 2] / half_dim))
  freqs_h, freqs_w = np.outer(np.arange(h), freqs), np.outer(np.arange(w), freqs)
  grid = np.concatenate([np.broadcast_to(freqs_h[:, None], (h, w, len(freqs))),
                         np.broadcast_to(freqs_w[None, :], (h, w, len(freqs)))], axis=-1)
  cache = np.stack([np.cos(grid), np.sin(grid)], -1).reshape(h * w, half_dim, 2)
  return np.concatenate([np.zeros((1, half_dim, 2)), cache])[: h * w]


def _llamagen_apply_rotary(x_LHK, table_LP2):
  """numpy port of LlamaGen's apply_rotary_emb (interleaved pairs)."""
  xs = x_LHK.reshape(*x_LHK.shape[:-1], -1, 2)
  cos, sin = table_LP2[:, None, :, 0], table_LP2[:, None, :, 1]
  out = np.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
  return out.reshape(x_LHK.shape)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_rope_table_matches_llamagen(grid):
  head_dim = 16
  sin_LP, cos_LP = ar.rope_table(grid, head_dim)
  ref_LP2 = _llamagen_rope_reference(*grid, head_dim)
  assert sin_LP.shape == cos_LP.shape == (grid[0] * grid[1], head_dim // 2)
  # The class-token row is all zero (LlamaGen's cos = sin = 0 prefix).
  np.testing.assert_array_equal(sin_LP[0], 0)
  np.testing.assert_array_equal(cos_LP[0], 0)
  np.testing.assert_allclose(cos_LP, ref_LP2[..., 0], atol=1e-6)
  np.testing.assert_allclose(sin_LP, ref_LP2[..., 1], atol=1e-6)
  # Row 1 + w is the token at grid (1, 0): only the first half of the pairs (the row's) rotate.
  w = grid[1]
  np.testing.assert_array_equal(sin_LP[1 + w, head_dim // 4:], 0)
  assert np.all(sin_LP[1 + w, :head_dim // 4] != 0)
  # Applied to q/k the way the model does, it equals LlamaGen's interleaved rotation.
  x_LHK = np.random.default_rng(0).normal(size=(grid[0] * grid[1], 2, head_dim))
  ours = vit.apply_rope(jnp.asarray(x_LHK, jnp.float32)[None], sin_LP, cos_LP)[0]
  np.testing.assert_allclose(ours, _llamagen_apply_rotary(x_LHK, ref_LP2), atol=1e-5)


def test_swiglu_hidden_rounding_and_param_axes():
  # LlamaGen: find_multiple(int(2 · 4·dim / 3), 256) for B / L / XL / XXL / 3B.
  for width, hidden in [(768, 2048), (1024, 2816), (1280, 3584), (1536, 4096), (3200, 8704)]:
    assert ar.swiglu_hidden(width) == hidden == -(-int(2 * 4 * width / 3) // 256) * 256
  assert ar.swiglu_hidden(32, 8) == 88 and ar.swiglu_hidden(32, 1) == 85
  with pytest.raises(ConfigError, match="mlp_multiple_of"):
    ar.swiglu_hidden(32, 0)
  model = _model()
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32),
                                            jnp.zeros((1,), jnp.int32), train=False))
  p = boxed["params"]
  assert p["blocks_0"]["mlp"]["w1"]["kernel"].value.shape == (32, 88)
  assert p["head"]["kernel"].value.shape == (32, model.vocab_size)
  assert p["class_embeddings"]["embedding"].value.shape == (model.num_classes + 1, 32)  # + null.
  specs = jax.tree_util.tree_leaves(nn.get_partition_spec(boxed),
                                    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.tree_util.tree_leaves(nn.unbox(boxed))
  assert len(specs) == len(shapes) > 0
  for spec, leaf in zip(specs, shapes):
    assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == len(leaf.shape)
    assert all(isinstance(name, str) for name in spec), spec
  assert nn.get_partition_spec(boxed)["params"]["head"]["kernel"] == jax.sharding.PartitionSpec(
      "embed", "vocab")
  # No biases anywhere (Llama).
  assert not any("bias" in jax.tree_util.keystr(path)
                 for path, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)))


def test_bad_arguments_raise_config_error():
  init = lambda model, length: jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, length), jnp.int32), jnp.zeros((1,), jnp.int32),
      train=False))
  with pytest.raises(ConfigError, match="head_dim"):
    init(ar.LlamaGen(vit.ViTSize(24, 1, 4), 8, 2, (2, 2)), 4)
  with pytest.raises(ConfigError, match="length"):
    init(_model((2, 2)), 5)
  with pytest.raises(ConfigError, match="cfg_schedule"):
    sampling.sample_ar(_model(), {}, jnp.zeros((1,), jnp.int32), jax.random.key(0),
                       cfg_schedule="cosine")
  with pytest.raises(ConfigError, match="top_k"):
    sampling.filter_logits(jnp.zeros(4), top_k=-1)


def test_label_dropout_only_in_train(params):
  model = _model((2, 2), class_dropout=0.5)
  codes_BL = jnp.tile(_codes(model, 1), (16, 1))
  labels_B = jnp.ones((16,), jnp.int32)

  @jax.jit
  def run(params):
    apply = lambda labels, train: model.apply(params, codes_BL, labels, train=train,
                                              rngs={"dropout": jax.random.key(0)})
    return apply(labels_B, False), apply(jnp.full((16,), NULL), False), apply(labels_B, True)

  cond, null, train = run(params)
  is_cond = np.all(np.isclose(train, cond, atol=1e-6), axis=(1, 2))
  is_null = np.all(np.isclose(train, null, atol=1e-6), axis=(1, 2))
  assert np.all(is_cond ^ is_null) and is_cond.any() and is_null.any()


def test_dropout_only_in_train_and_as_llamagen_places_it(params):
  """`dropout`: off without train (the same logits as a model without it), on with it: each key
  drops other units. Its rate-1 limit zeroes the input embeddings and every block's outputs,
  leaving the head on the final norm of zeros."""
  codes_BL = jnp.tile(_codes(_model((2, 2)), 1), (4, 1))
  labels_B = jnp.ones((4,), jnp.int32)
  plain = _model((2, 2), class_dropout=0.0)
  dropped = _model((2, 2), class_dropout=0.0, dropout=0.5)
  apply = lambda model, train, seed: model.apply(params, codes_BL, labels_B, train=train,
                                                 rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_allclose(apply(dropped, False, 0), apply(plain, False, 0), atol=1e-6)
  one, other = apply(dropped, True, 0), apply(dropped, True, 1)
  assert not np.allclose(one, other, atol=1e-3) and not np.allclose(one, apply(plain, True, 0))
  everything = apply(_model((2, 2), class_dropout=0.0, dropout=1.0), True, 0)
  head_of_zeros = plain.apply(params, jnp.zeros((4, 4, TINY.width)), method=lambda m, x: m.head(
      m.norm(x)))
  np.testing.assert_allclose(everything, head_of_zeros, atol=1e-6)


def _filter_reference(logits, top_k, top_p):
  """Independent numpy reference: stable descending rank, keep k, then the shortest prefix of the
  renormalised survivors with mass ≥ top_p."""
  out = np.full_like(logits, -np.inf)
  for row, x in enumerate(logits.reshape(-1, logits.shape[-1])):
    order = np.argsort(-x, kind="stable")
    kept = order[:top_k] if top_k else order
    if top_p < 1.0:
      probs = np.exp(x[kept] - x[kept].max())
      probs /= probs.sum()
      n = int(np.searchsorted(np.cumsum(probs), top_p) + 1)   # Smallest n: mass(n) ≥ top_p.
      kept = kept[:min(n, len(kept))]
    out.reshape(-1, logits.shape[-1])[row, kept] = x[kept]
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.7), (5, 0.5), (1, 0.3),
                                         (20, 0.95), (0, 0.01)])
def test_filter_logits_matches_numpy(top_k, top_p):
  logits = np.random.default_rng(top_k).normal(size=(4, 16)).astype(np.float32) * 2
  logits[0, [2, 5, 9, 11]] = logits[0].max() + 1.0   # A four-way tie at the top.
  got = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k, top_p))
  want = _filter_reference(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_array_equal(got[np.isfinite(got)], want[np.isfinite(want)])
  if 0 < top_k and top_p == 1.0:
    assert np.all(np.isfinite(got).sum(-1) == top_k)   # Exactly k, ties included.


def test_filter_logits_ties_prefer_lower_index():
  logits = jnp.array([1.0, 3.0, 3.0, 0.0, 3.0])
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_k=2)))
  np.testing.assert_array_equal(kept, [False, True, True, False, False])
  # Equal probabilities 1/3 each: mass before the 2nd is 1/3 < 0.5, before the 3rd 2/3 ≥ 0.5.
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.5)))
  np.testing.assert_array_equal(kept, [False, True, True, False, False])


def test_sample_token_and_cfg_helpers():
  logits = jax.random.normal(jax.random.key(0), (8, 10))

  @jax.jit
  def draws(key):
    return (sampling.sample_token(key, logits, 0.0), sampling.sample_token(key, logits, 1e-6),
            sampling.sample_token(key, logits, 5.0, top_k=1))   # top_k=1: greedy at any temp.

  for tokens in draws(jax.random.key(1)):
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
  cond, uncond = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0])
  np.testing.assert_allclose(sampling.cfg_logits(cond, uncond, 3.0), [4.0, -2.0])
  np.testing.assert_allclose(sampling.cfg_logits(cond, uncond, 1.0), cond)
  np.testing.assert_allclose(sampling.cfg_scale_at(jnp.arange(5), 5, 3.0, "linear"),
                             [1.0, 1.5, 2.0, 2.5, 3.0])
  assert float(sampling.cfg_scale_at(3, 5, 3.0, "constant")) == 3.0


@functools.partial(jax.jit, static_argnames=("model",))
def _greedy_by_full_forwards(model, params, labels_B, scales_L):
  """Reference greedy decoding without a cache: per position, full teacher-forced forwards of the
  codes so far; returns (conditional argmax codes, CFG argmax codes with scale scales_L[i])."""
  null_B = jnp.full_like(labels_B, model.num_classes)
  apply = lambda codes_BL, labels: model.apply(params, codes_BL, labels, train=False)

  def body(i, carry):
    cond_BL, guided_BL = carry
    cond_BL = cond_BL.at[:, i].set(jnp.argmax(apply(cond_BL, labels_B)[:, i], -1))
    logits_BV = sampling.cfg_logits(apply(guided_BL, labels_B)[:, i],
                                    apply(guided_BL, null_B)[:, i], scales_L[i])
    return cond_BL, guided_BL.at[:, i].set(jnp.argmax(logits_BV, -1))

  zeros_BL = jnp.zeros((labels_B.shape[0], model.seq_len), jnp.int32)
  return jax.lax.fori_loop(0, model.seq_len, body, (zeros_BL, zeros_BL))


# The sampling settings below are shared by the two sampling tests so that they share compiles.
SAMPLED = {"temperature": 1.0, "top_k": 4, "top_p": 0.9}


def test_sample_ar_greedy_deterministic_and_cfg(params):
  model = _model()
  labels_B = jnp.array([0, 1, 2])
  rng = jax.random.key(7)
  greedy_BL = sampling.sample_ar(model, params, labels_B, rng, temperature=0.0)
  assert greedy_BL.dtype == jnp.int32 and greedy_BL.shape == (3, model.seq_len)
  scales_L = sampling.cfg_scale_at(jnp.arange(model.seq_len), model.seq_len, 4.0, "linear")
  ref_greedy_BL, ref_guided_BL = _greedy_by_full_forwards(model, params, labels_B, scales_L)
  np.testing.assert_array_equal(greedy_BL, ref_greedy_BL)
  # Guided greedy decoding (doubled batch, linear ramp) = full forwards of cond and null rows.
  guided_BL = sampling.sample_ar(model, params, labels_B, rng, temperature=0.0, cfg_scale=4.0,
                                 cfg_schedule="linear")
  np.testing.assert_array_equal(guided_BL, ref_guided_BL)
  assert not np.array_equal(guided_BL, greedy_BL)
  # Deterministic given rng; another rng gives other samples.
  a = sampling.sample_ar(model, params, labels_B, rng, **SAMPLED)
  np.testing.assert_array_equal(a, sampling.sample_ar(model, params, labels_B, rng, **SAMPLED))
  assert not np.array_equal(a, sampling.sample_ar(model, params, labels_B, jax.random.key(8),
                                                  **SAMPLED))
  # A vanishing temperature is greedy.
  np.testing.assert_array_equal(
      sampling.sample_ar(model, params, labels_B, rng, **{**SAMPLED, "temperature": 1e-6}),
      greedy_BL)
  # CFG scale 1 through the doubled batch (an array scale always doubles) = conditional sampling.
  np.testing.assert_array_equal(
      sampling.sample_ar(model, params, labels_B, rng, cfg_scale=jnp.float32(1.0), **SAMPLED), a)


def test_tiny_model_learns_toy_sequences():
  """Class c's sequence is fixed; after a short fit, sampling reproduces it."""
  model = _model()
  targets_CL = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 10, 0, 0, 10, 10, 0, 0, 10],
                          [3, 1, 4, 1, 5, 9, 2, 6, 5]])
  labels_B = jnp.tile(jnp.arange(3), 4)
  codes_BL = targets_CL[labels_B]
  tx = optax.adam(3e-3)

  @jax.jit
  def fit(params, rng):
    def train_step(carry, rng):
      params, opt_state = carry
      def loss_fn(p):
        logits = model.apply(p, codes_BL, labels_B, train=True, rngs={"dropout": rng})
        return ar.next_token_loss(logits, codes_BL)[0]
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(train_step, (params, tx.init(params)),
                                  jax.random.split(rng, 300))
    logits = model.apply(params, codes_BL, labels_B, train=False)
    return params, ar.next_token_loss(logits, codes_BL)

  params, (loss, metrics) = fit(_numpy_params(model, std=0.02), jax.random.key(1))
  assert float(metrics["accuracy"]) == 1.0 and float(loss) < 0.1, (loss, metrics)
  labels = jnp.arange(3)
  np.testing.assert_array_equal(   # Bare params (no {"params": ...} wrapper) are accepted too.
      sampling.sample_ar(model, params["params"], labels, jax.random.key(2), temperature=0.0),
      targets_CL)
  np.testing.assert_array_equal(
      sampling.sample_ar(model, params, labels, jax.random.key(3), cfg_scale=2.0, **SAMPLED),
      targets_CL)


def test_next_token_loss():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  loss, metrics = ar.next_token_loss(logits, jnp.array([[0, 2]]))
  np.testing.assert_allclose(loss, -(np.log(0.5) + np.log(0.1)) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], 0.5)
