"""VAR: block-causal forward vs KV-cached decoding, teacher inputs, CFG ramp, losses, a toy fit."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitok_jax.errors import ConfigError
from vitok_jax.models import multiscale, sampling, var, vit

SIZE = 3                                          # Latent side: VAR schedule (1, 2, 3), 14 tokens.
SCALES = multiscale.scale_schedule("var", SIZE)
CHANNELS, CLASSES, VOCAB = 4, 5, 16


def _model(**kw):
  return var.VAR(vit.ViTSize(32, 2, 2), SCALES, CHANNELS, CLASSES, vocab_size=VOCAB,
                 attn_impl="xla", **kw)


def random_variables(module, seed, *args, check_axes=True):
  """Variables of `module.init(*args)` drawn with numpy (no init compile; every gate non-zero).

  With check_axes, also checks that every parameter carries logical axis names.
  """
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert not check_axes or all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim
                               for x in leaves)
  rng = np.random.default_rng(seed)

  def draw(x):
    fan_in = int(np.prod(x.shape[:-1])) if x.ndim >= 2 else 10
    return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(fan_in), x.dtype)
  return jax.tree.map(draw, nn.meta.unbox(boxed))


@pytest.fixture(scope="module")
def setup():
  """A tiny VAR, a tiny φ-refined VQ tokenizer, its codes of random latents and teacher inputs."""
  model = _model()
  residual = multiscale.ResidualQuantizer(CHANNELS, "vq", "var", codebook_size=VOCAB)
  f = jax.random.normal(jax.random.key(0), (3, SIZE, SIZE, CHANNELS))
  # Initialised at 16 × 16 (all four φ; a 3-scale schedule uses only three of them).
  rq_vars = random_variables(residual, 1, jnp.zeros((1, 16, 16, CHANNELS)), check_axes=False)
  _, codes, _, _ = jax.jit(residual.apply)(rq_vars, f)
  inputs = jax.jit(lambda v, c: residual.apply(v, c, SIZE, method=residual.teacher_inputs))(
      rq_vars, codes)
  labels = jnp.array([0, 3, 4])
  params = random_variables(model, 2, inputs, labels)["params"]
  forward = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y))
  next_input = var.residual_next_input(residual, rq_vars, SIZE)
  return {"model": model, "residual": residual, "rq_vars": rq_vars, "codes": codes,
          "inputs": inputs, "labels": labels, "params": params, "forward": forward,
          "next_input": next_input}


def _cached_logits(model, params, inputs, labels):
  offsets = var.scale_offsets(model.scales)
  first = model.scales[0] ** 2
  decode = jax.jit(lambda p, k, x, y, c: model.apply({"params": p}, k, x, y, c,
                                                      method=var.VAR.decode_scale),
                   static_argnums=1)
  cache, out = var.init_cache(model, labels.shape[0]), []
  for k in range(len(model.scales)):
    x = None if k == 0 else inputs[:, offsets[k] - first:offsets[k + 1] - first]
    logits, cache = decode(params, k, x, labels, cache)
    out.append(logits)
  return jnp.concatenate(out, axis=1)


def test_init_is_vars():
  """VAR's init_weights: kernels and embeddings of std √(1/(3·width)), the head's × 0.02, the
  AdaLN Linears' × 0.5 with the blocks' gate columns × 1e-3 (VAR's alng up to d20; 1e-5 at d30),
  attention output and fc2 ÷ √(2·depth), biases zero."""
  assert [var.adaln_gate_init(d) for d in (2, 16, 20, 24, 30)] == [1e-3, 1e-3, 1e-3, 1e-4, 1e-5]
  width, depth = 96, 3
  model = var.VAR(vit.ViTSize(width, depth, 2), SCALES, CHANNELS, CLASSES, vocab_size=512,
                  attn_impl="xla")
  inputs = jnp.zeros((1, multiscale.token_count(SCALES) - 1, CHANNELS))
  params = nn.meta.unbox(model.init(jax.random.key(0), inputs, jnp.zeros((1,), jnp.int32)))[
      "params"]
  std = np.sqrt(1 / width / 3)
  block = params["block1"]
  expected = [(block["query"]["kernel"], std), (block["fc1"]["kernel"], std),
              (block["out"]["kernel"], std / np.sqrt(2 * depth)),
              (block["fc2"]["kernel"], std / np.sqrt(2 * depth)),
              (block["ada"]["kernel"][:, :2 * width], 1e-3 * std),   # Gates g1, g2 (d3).
              (block["ada"]["kernel"][:, 2 * width:], 0.5 * std),    # Scales and shifts.
              (params["head"]["kernel"], 0.02 * std), (params["head_ada"]["kernel"], 0.5 * std),
              (params["word_embed"]["kernel"], std), (params["class_emb"]["embedding"], std),
              (params["pos"], std)]
  for kernel, want in expected:
    np.testing.assert_allclose(np.std(np.asarray(kernel)), want, rtol=0.1)
  biases = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
            if getattr(path[-1], "key", None) == "bias"]
  assert biases and not any(np.any(np.asarray(b)) for b in biases)


def test_drop_path_only_in_train(setup):
  """Stochastic depth: off without train (the logits of a model without it); with it on (the
  last of the two blocks at rate 0.5, the first at 0), other keys drop other branches."""
  inputs, labels, params = setup["inputs"], setup["labels"], setup["params"]
  plain, dropped = _model(class_dropout=0.0), _model(class_dropout=0.0, drop_path=0.5)
  assert var.var_drop_path(24) == pytest.approx(0.1) and var.var_drop_path(16) == pytest.approx(
      1 / 15)
  apply = lambda model, train, seed: np.asarray(model.apply(
      {"params": params}, inputs, labels, train=train, rngs={"dropout": jax.random.key(seed)}))
  np.testing.assert_allclose(apply(dropped, False, 0), apply(plain, False, 0), atol=1e-6)
  outs = [apply(dropped, True, seed) for seed in range(4)]
  assert any(not np.allclose(outs[0], o, atol=1e-4) for o in outs[1:])
  assert not np.allclose(outs[0], apply(plain, True, 0), atol=1e-4)


def test_schedule_and_teacher_inputs(setup):
  assert multiscale.token_count(multiscale.scale_schedule("var", 16)) == 680
  residual, rq_vars, codes = setup["residual"], setup["rq_vars"], setup["codes"]
  assert setup["inputs"].shape == (3, multiscale.token_count(SCALES) - 1, CHANNELS)
  # At 256p (16 × 16 latents): 680 − 1 inputs.
  codes16 = tuple(jnp.zeros((1, s, s), jnp.int32) for s in multiscale.scale_schedule("var", 16))
  shape = jax.eval_shape(lambda c: residual.apply(rq_vars, c, 16, method=residual.teacher_inputs),
                         codes16).shape
  assert shape == (1, 679, CHANNELS)
  # The same as a loop over next_scale_input; the last step's f_hat is the decoded f_hat.
  step = jax.jit(lambda f, c, k: residual.apply(rq_vars, f, c, k, SIZE,
                                                method=residual.next_scale_input), static_argnums=2)
  f_hat, pieces = jnp.zeros((3, SIZE, SIZE, CHANNELS)), []
  for k in range(len(SCALES)):
    f_hat, nxt = step(f_hat, codes[k], k)
    assert nxt.shape == (3, (SCALES[k + 1] if k + 1 < len(SCALES) else SIZE) ** 2, CHANNELS)
    pieces.append(nxt)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces[:-1], 1)),
                             np.asarray(setup["inputs"]), atol=1e-6)
  decoded = residual.apply(rq_vars, codes, SIZE, method=residual.decode_codes)
  np.testing.assert_allclose(np.asarray(f_hat), np.asarray(decoded), atol=1e-5)
  with pytest.raises(ConfigError, match="all 3 scales"):
    residual.apply(rq_vars, codes[:2], SIZE, method=residual.teacher_inputs)


def test_kv_cache_matches_block_causal_forward(setup):
  full = setup["forward"](setup["params"], setup["inputs"], setup["labels"])
  assert full.shape == (3, 14, VOCAB) and full.dtype == jnp.float32
  cached = _cached_logits(setup["model"], setup["params"], setup["inputs"], setup["labels"])
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_block_causal_mask(setup):
  forward, params, inputs, labels = (setup[k] for k in ("forward", "params", "inputs", "labels"))
  offsets = var.scale_offsets(SCALES)   # (0, 1, 5, 14).
  base = np.asarray(forward(params, inputs, labels))
  j = 1                                  # Perturb a token of scale 1 (input offsets[1] − 1 + 2).
  perturbed = inputs.at[:, offsets[j] - 1 + 2].add(1.0)
  out = np.asarray(forward(params, perturbed, labels))
  diff_L = np.abs(out - base).max(axis=(0, 2))
  assert diff_L[:offsets[j]].max() == 0.0           # Scales < j never see it.
  for k in range(j, len(SCALES)):        # Every token of scales ≥ j does (both ways within j).
    assert diff_L[offsets[k]:offsets[k + 1]].min() > 1e-6, (k, diff_L)


def test_class_dropout_and_errors(setup):
  model, params, inputs = setup["model"], setup["params"], setup["inputs"]
  labels = jnp.array([0, 1, 2])
  null = setup["forward"](params, inputs, jnp.full((3,), CLASSES))
  # With dropout 1 every label becomes the null class.
  always = jax.jit(lambda p: _model(class_dropout=1.0).apply(
      {"params": p}, inputs, labels, train=True, rngs={"dropout": jax.random.key(0)}))(params)
  np.testing.assert_allclose(np.asarray(always), np.asarray(null), atol=1e-6)
  check = lambda m, x: jax.eval_shape(lambda: m.apply({"params": params}, x, labels))
  with pytest.raises(ConfigError, match="teacher inputs"):
    check(model, inputs[:, :-1])
  with pytest.raises(ConfigError, match="head"):
    check(_model(head="mixture"), inputs)


def test_cfg_ramp_and_scale_zero_is_conditional(setup):
  w = var.cfg_weights(1.5, 10)
  assert w[0] == 1.0 and w[-1] == 2.5 and np.allclose(np.diff(w), 1.5 / 9)
  assert var.cfg_weights(2.0, 4, "constant") == (2.0,) * 4
  model, params, fn = setup["model"], setup["params"], setup["next_input"]
  labels, rng = jnp.array([1, 2]), jax.random.key(7, impl="rbg")  # rbg: compiles fast.
  plain = var.sample_var(model, params, labels, rng, fn, cfg_scale=None)
  assert [c.shape for c in plain] == [(2, s, s) for s in SCALES]
  assert all(c.dtype == jnp.int32 for c in plain)
  # VAR's convention: cfg 0 is the conditional model (one doubled batch, same draws).
  zero = var.sample_var(model, params, labels, rng, fn, cfg_scale=0.0)
  for a, b in zip(plain, zero):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Infinity's constant schedule: cfg 1 is the conditional model.
  one = var.sample_var(model, params, labels, rng, fn, cfg_scale=1.0, cfg_schedule="constant")
  for a, b in zip(plain, one):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The ramp leaves the first stage unguided whatever the cfg; later stages do change.
  strong = var.sample_var(model, params, labels, rng, fn, cfg_scale=50.0)
  np.testing.assert_array_equal(np.asarray(strong[0]), np.asarray(plain[0]))
  assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(plain[1:], strong[1:]))


def test_greedy_token_sampling_on_softmax_and_bitwise_logits():
  logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
  greedy = sampling.sample_token(jax.random.key(0), jnp.tile(logits, (50, 1)), top_k=1)
  assert (np.asarray(greedy) == 1).all()
  bits_LD2 = jnp.array([[[0.0, 3.0], [2.0, -1.0]]])      # Bit 0 -> 1, bit 1 -> 0.
  assert np.asarray(sampling.sample_token(jax.random.key(1), bits_LD2, top_k=1)).tolist() == [[1, 0]]


def test_var_loss_matches_numpy():
  rng = np.random.default_rng(0)
  codes = (rng.integers(0, 6, (2, 1, 1)), rng.integers(0, 6, (2, 2, 2)))
  logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
  loss, metrics = var.var_loss(jnp.asarray(logits), tuple(jnp.asarray(c) for c in codes))
  targets = np.concatenate([c.reshape(2, -1) for c in codes], 1)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ce_last"]), ce[:, 1:].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), (logits.argmax(-1) == targets).mean())


def test_losses_reweighted_by_scale_match_numpy():
  """Infinity's reweight_loss_by_scale: a scale-k token weighs s_K/s_k, normalised; both losses
  take the weights (uniform weights give the plain mean), their ce metric stays the plain mean."""
  weights = var.scale_loss_weights((1, 2, 3))
  np.testing.assert_allclose(weights, np.repeat([3, 1.5, 1], [1, 4, 9]) / 18, rtol=1e-6)
  rng = np.random.default_rng(1)
  codes = (rng.integers(0, 6, (2, 1, 1)), rng.integers(0, 6, (2, 2, 2)))
  logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
  two = var.scale_loss_weights((1, 2))  # The first scale's token weighs 2, the next four 1.
  np.testing.assert_allclose(two, np.array([2, 1, 1, 1, 1]) / 6, rtol=1e-6)
  targets = np.concatenate([c.reshape(2, -1) for c in codes], 1)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  loss, metrics = var.var_loss(jnp.asarray(logits), codes, two)
  np.testing.assert_allclose(float(loss), (ce * two).sum(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ce"]), ce.mean(), rtol=1e-5)
  uniform, _ = var.var_loss(jnp.asarray(logits), codes, np.full(5, 0.2, np.float32))
  np.testing.assert_allclose(float(uniform), ce.mean(), rtol=1e-5)
  bit_logits = rng.normal(size=(2, 5, 3, 2)).astype(np.float32)
  bits = rng.integers(0, 2, (2, 5, 3))
  bit_logp = bit_logits - np.log(np.exp(bit_logits).sum(-1, keepdims=True))
  bit_ce = -np.take_along_axis(bit_logp, bits[..., None], -1)[..., 0].mean(-1)  # [B, L]
  loss, metrics = var.bitwise_loss(jnp.asarray(bit_logits), jnp.asarray(bits), two)
  np.testing.assert_allclose(float(loss), (bit_ce * two).sum(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ce"]), bit_ce.mean(), rtol=1e-5)


def test_tiny_var_learns_class_patterns_and_sample_reproduces(setup):
  """Each class has a fixed multi-scale code pattern; after fitting, sampling returns it."""
  model, residual, rq_vars, fn = (setup[k] for k in ("model", "residual", "rq_vars", "next_input"))
  labels = jnp.arange(CLASSES)
  codes = tuple(jnp.asarray((np.arange(CLASSES)[:, None] * 5 + 3 * np.arange(s * s)[None] + k)
                            % VOCAB, jnp.int32).reshape(CLASSES, s, s)
                for k, s in enumerate(SCALES))
  inputs = residual.apply(rq_vars, codes, SIZE, method=residual.teacher_inputs)
  tx = optax.adam(3e-3)

  @jax.jit
  def fit(params):
    def step(carry, _):
      params, opt_state = carry
      loss_fn = lambda p: var.var_loss(model.apply({"params": p}, inputs, labels), codes)
      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), metrics["accuracy"]
    (params, _), accuracy = jax.lax.scan(step, (params, tx.init(params)), None, length=300)
    return params, accuracy[-1]

  params, accuracy = fit(setup["params"])
  assert float(accuracy) == 1.0
  sampled = var.sample_var(model, params, labels, jax.random.key(3, impl="rbg"), fn, cfg_scale=None,
                           temperature=0.05)
  for k, (a, b) in enumerate(zip(sampled, codes)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"scale {k}")
