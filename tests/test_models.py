"""Models and attention layers: shapes, masks, causality, gradients, registry."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import check_param_grads
from testutil import rbg_key as _key

from recjax.errors import ConfigError
from recjax.models import (
  BPRMF,
  MODELS,
  SASRec,
  create_model,
  default_hparams,
  example_batch,
  init_params,
  model_kind,
  pop_params,
)
from recjax.models.pop import UNSEEN_SCORE
from recjax.nn.attention import MultiHeadSelfAttention, TransformerBlock, causal_padding_mask, padding_mask
from recjax.nn.embedding import EMBED_AXES, embedding_table
from recjax.tasks import pairwise_loss_fn

NUM_USERS, NUM_ITEMS, DIM, MAX_LEN = 7, 13, 8, 6
SMALL_SASREC = dict(max_len=MAX_LEN, dim=DIM, num_heads=2, ffn_dim=16)
SMALL_KWARGS = {"pop": {}, "sasrec": SMALL_SASREC, "bert4rec": SMALL_SASREC, "gru4rec": dict(max_len=MAX_LEN, dim=DIM),
                "caser": dict(max_len=MAX_LEN, dim=DIM)}
# Factorised models built from sizes alone; those that score pairs (`factorized = False`) or need the
# training graph or feature tables are tested in test_ncf, test_ctr_models and test_graph.
SELF_CONTAINED = sorted(
  name for name, cls in MODELS.items()
  if getattr(cls, "factorized", True) and not getattr(cls, "needs_graph", False)
  and not getattr(cls, "needs_features", False) and not getattr(cls, "needs_text", False)
)   # text_mlp: tests/test_text.py


def _seq() -> jnp.ndarray:
  """[3, L]: a left-padded row, a fully padded row, a full row."""
  return jnp.array([[0, 0, 0, 3, 4, 5], [0] * MAX_LEN, [1, 2, 3, 4, 5, 12]], jnp.int32)


@functools.lru_cache
def _sasrec(pre_norm: bool = False) -> tuple[SASRec, dict]:
  model = create_model("sasrec", num_users=NUM_USERS, num_items=NUM_ITEMS, pre_norm=pre_norm, **SMALL_SASREC)
  return model, init_params(model, _key(0))


@functools.lru_cache
def _jit_apply(model, method: str):
  """`f(params, x) -> model.apply(params, x, method=method)` (eval mode), jitted once per model."""
  return jax.jit(lambda params, x: model.apply(params, x, method=method))


def _seq_repr(model, params, seq):
  return _jit_apply(model, "sequence_repr")(params, seq)


def _user_repr(model, params, batch):
  return _jit_apply(model, "user_repr")(params, batch)


@pytest.mark.parametrize("name", SELF_CONTAINED)
def test_model_methods_shapes_and_finite(name):
  model = create_model(name, num_users=NUM_USERS, num_items=NUM_ITEMS, **SMALL_KWARGS.get(name, {"dim": DIM}))
  params = init_params(model, _key(0))
  batch = {"user": jnp.array([1, 2, 0], jnp.int32), "seq": _seq()}
  user, items, scores = jax.jit(
    lambda p, b: (model.apply(p, b, method="user_repr"), model.apply(p, method="item_repr"), model.apply(p, b))
  )(params, batch)
  d = {"pop": 1, "bert4rec": DIM + 1, "caser": 2 * DIM + 1, "gmf": DIM + 1}.get(name, DIM)  # + 1: item biases
  chex.assert_shape(user, (3, d))
  chex.assert_shape(items, (NUM_ITEMS, d))
  chex.assert_shape(scores, (3, NUM_ITEMS))
  chex.assert_type([user, items, scores], jnp.float32)
  chex.assert_tree_all_finite((user, items, scores))
  np.testing.assert_allclose(scores, user @ items.T, rtol=1e-6, atol=1e-6)
  assert model_kind(name) == model.kind


@pytest.mark.parametrize("pre_norm", [False, True])
def test_sasrec_sequence_repr_and_padding_rows(pre_norm):
  model, params = _sasrec(pre_norm=pre_norm)
  seq = _seq()

  @jax.jit
  def run(params):
    h = model.apply(params, seq, method="sequence_repr")
    user = model.apply(params, {"seq": seq}, method="user_repr")
    train_loss = lambda p: jnp.sum(model.apply(p, seq, True, method="sequence_repr", rngs={"dropout": _key(1)}) ** 2)  # noqa: E731
    return h, user, jax.value_and_grad(train_loss)(params)

  h, user, (train_loss, grads) = run(params)
  chex.assert_shape(h, (3, MAX_LEN, DIM))
  # train mode (dropout on) and gradients stay finite on the fully padded row
  chex.assert_tree_all_finite((h, user, train_loss, grads))
  # user_repr (last block computed for the last position only) equals the full encoder's last state
  np.testing.assert_allclose(user, h[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_sasrec_is_causal(pre_norm):
  model, params = _sasrec(pre_norm=pre_norm)
  seqs = np.repeat(np.asarray(_seq()[2:]), MAX_LEN, axis=0)  # [L, L]: row t changes the items from t on
  for t in range(1, MAX_LEN):
    seqs[t, t:] = 7
  h = _seq_repr(model, params, jnp.asarray(seqs))  # [L, L, d]
  for t in range(1, MAX_LEN):
    np.testing.assert_allclose(h[t, :t], h[0, :t], rtol=1e-5, atol=1e-6)
    assert not np.allclose(h[t, t], h[0, t])


def test_sasrec_padding_keys_are_ignored():
  """The same history padded to two lengths gives the same last state (positions count from the right)."""
  model, params = _sasrec()
  long = jnp.array([[0, 0, 0, 3, 4, 5]], jnp.int32)
  short = long[:, -4:]
  h_long = _user_repr(model, params, {"seq": long})
  h_short = _user_repr(model, params, {"seq": short})
  np.testing.assert_allclose(h_long, h_short, rtol=1e-5, atol=1e-6)


def test_sasrec_rejects_too_long_sequences():
  model, params = _sasrec()
  with pytest.raises(ValueError, match="max_len"):
    model.apply(params, jnp.ones((1, MAX_LEN + 1), jnp.int32), method="sequence_repr")


def test_masks():
  seq = jnp.array([[0, 2, 3]], jnp.int32)
  np.testing.assert_array_equal(padding_mask(seq)[0, 0, 0], [False, True, True])
  expected = np.array([[0, 0, 0], [0, 1, 0], [0, 1, 1]], bool)
  np.testing.assert_array_equal(causal_padding_mask(seq)[0, 0], expected)


def _numpy_attention(params, x, mask, num_heads, keys=None):
  """Reference multi-head attention in numpy (float64); `keys` (default `x`) feeds the keys and values."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  x = np.asarray(x, np.float64)
  keys = x if keys is None else np.asarray(keys, np.float64)
  proj = lambda name, h: np.einsum("bld,dhk->blhk", h, p[name]["kernel"]) + p[name]["bias"]  # noqa: E731
  q, k, v = proj("query", x), proj("key", keys), proj("value", keys)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.asarray(mask), scores, -1e30)
  scores = scores - scores.max(-1, keepdims=True)
  probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
  context = np.einsum("bhqk,bkhd->bqhd", probs, v)
  return np.einsum("bqhd,hdo->bqo", context, p["out"]["kernel"]) + p["out"]["bias"]


def test_attention_matches_numpy_reference_and_masks_padding_keys():
  seq = jnp.array([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]], jnp.int32)
  mask = causal_padding_mask(seq)
  x = jax.random.normal(_key(0), (2, 5, DIM))
  layer = MultiHeadSelfAttention(num_heads=2, dim=DIM, attn_dropout=0.5, init_std=0.5)
  params = jax.jit(layer.init)(_key(1), x, mask)
  apply = jax.jit(layer.apply)
  out = apply(params, x, mask)
  ref = _numpy_attention(params, x, mask, 2)
  real = np.asarray(seq != 0)
  np.testing.assert_allclose(np.asarray(out)[real], ref[real], rtol=1e-4, atol=1e-5)
  # values at padding positions never reach real positions
  x2 = x.at[0, :2].set(100.0)
  np.testing.assert_allclose(apply(params, x2, mask)[real], out[real], rtol=1e-5, atol=1e-5)
  # a 3-D [B, L, L] mask means the same as [B, 1, L, L]
  np.testing.assert_allclose(apply(params, x, mask[:, 0]), out, rtol=1e-6)


def _numpy_layer_norm(p, x, eps):
  x = np.asarray(x, np.float64)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def _numpy_block(params, x, mask, layout: str, eps: float = 1e-6):
  """Reference TransformerBlock (eval mode, ReLU) in numpy, for layout "post", "pre" or "queries" (the SASRec
  authors' code: only the queries normalised, residuals from the normalised input)."""
  p = params["params"]
  ln = lambda name, h: _numpy_layer_norm(p[name], h, eps)  # noqa: E731
  dense = lambda name, h: h @ np.asarray(p[name]["kernel"], np.float64) + np.asarray(p[name]["bias"], np.float64)  # noqa: E731
  ffn = lambda h: dense("ffn_out", np.maximum(dense("ffn_in", h), 0.0))  # noqa: E731
  attention = lambda q, kv: _numpy_attention({"params": p["attention"]}, q, mask, 2, keys=kv)  # noqa: E731
  x = np.asarray(x, np.float64)
  if layout == "post":
    h = ln("norm_attn", x + attention(x, x))
    return ln("norm_ffn", h + ffn(h))
  if layout == "pre":
    h = x + attention(ln("norm_attn", x), ln("norm_attn", x))
    return h + ffn(ln("norm_ffn", h))
  q = ln("norm_attn", x)
  h = ln("norm_ffn", q + attention(q, x))
  return h + ffn(h)


LAYOUTS = {"post": {}, "pre": {"pre_norm": True}, "queries": {"pre_norm": True, "norm_queries_only": True}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_transformer_block_matches_numpy_in_each_layout(layout):
  block = TransformerBlock(num_heads=2, dim=DIM, ffn_dim=16, activation="relu", layer_norm_eps=1e-6, init_std=0.3,
                           **LAYOUTS[layout])
  seq = jnp.array([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]], jnp.int32)
  mask = causal_padding_mask(seq)
  x = jax.random.normal(_key(0), (2, 5, DIM))
  params = jax.jit(block.init)(_key(1), x, mask)
  # random LayerNorm scales and biases, so a swapped norm cannot pass
  params = jax.tree_util.tree_map_with_path(
    lambda path, a: a + 0.3 * jax.random.normal(_key(len(str(path))), a.shape) if "norm" in str(path) else a, params)
  got = np.asarray(jax.jit(block.apply)(params, x, mask))
  real = np.asarray(seq != 0)
  np.testing.assert_allclose(got[real], _numpy_block(params, x, mask, layout)[real], rtol=1e-4, atol=1e-5)


def test_norm_queries_only_needs_pre_norm():
  model = create_model("sasrec", num_users=NUM_USERS, num_items=NUM_ITEMS, norm_queries_only=True, **SMALL_SASREC)
  with pytest.raises(ValueError, match="pre_norm=True"):
    init_params(model, _key(0))


def test_sasrec_authors_switches_scale_and_initialise():
  base = dict(num_users=NUM_USERS, num_items=2000, dim=50, max_len=50, num_heads=1, ffn_dim=50, num_blocks=1)
  model = create_model("sasrec", **base, weight_init="xavier_normal", embed_scale=True)
  params = init_params(model, _key(0))["params"]
  np.testing.assert_allclose(np.std(params["item_embedding"]["embedding"]), np.sqrt(2 / (2000 + 50)), rtol=0.03)
  np.testing.assert_allclose(np.std(params["position_embedding"]), np.sqrt(2 / 100), rtol=0.05)
  kernel = params["encoder"]["blocks_0"]["ffn_in"]["kernel"]
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / 100), rtol=0.1)
  # embed_scale: a table sqrt(d) times smaller, scaled up, encodes as the plain model with the table itself
  plain = create_model("sasrec", **base, weight_init="xavier_normal")
  seq = jnp.array([[0, 0, 3, 4, 5]], jnp.int32)
  table = params["item_embedding"]["embedding"]
  scaled_params = {"params": {**params, "item_embedding": {"embedding": table / 50**0.5}}}
  encoded = _seq_repr(plain, {"params": params}, seq)
  np.testing.assert_allclose(_seq_repr(model, scaled_params, seq), encoded, rtol=1e-5, atol=1e-5)
  assert not np.allclose(_seq_repr(model, {"params": params}, seq), encoded, atol=1e-3)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_transformer_block_shapes_last_only_and_dropout(layout):
  block = TransformerBlock(num_heads=2, dim=DIM, ffn_dim=16, dropout=0.3, attn_dropout=0.3, **LAYOUTS[layout])
  seq = _seq()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, MAX_LEN, DIM)), jnp.float32)
  mask = causal_padding_mask(seq)

  @jax.jit
  def run(x):
    params = block.init(_key(1), x, mask)
    y_train = block.apply(params, x, mask, train=True, rngs={"dropout": _key(2)})
    return block.apply(params, x, mask), block.apply(params, x, mask, last_only=True), y_train

  y, y_last, y_train = run(x)
  chex.assert_shape(y, (3, MAX_LEN, DIM))
  chex.assert_shape(y_last, (3, 1, DIM))
  np.testing.assert_allclose(y_last[:, 0], y[:, -1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y_train, y)
  chex.assert_tree_all_finite(y_train)




@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_transformer_block_grads(layout):
  block = TransformerBlock(num_heads=2, dim=4, ffn_dim=8, layer_norm_eps=1e-6, init_std=0.3, **LAYOUTS[layout])
  mask = causal_padding_mask(jnp.array([[0, 1, 2], [3, 4, 5]], jnp.int32))
  x = jax.random.normal(_key(0), (2, 3, 4))
  params = jax.jit(block.init)(_key(1), x, mask)
  check_param_grads(lambda px: block.apply(px[0], px[1], mask), (params, x))


def test_sasrec_sequence_repr_grads():
  model, params = _sasrec()
  params = jax.tree.map(lambda p: 10 * p, params)  # larger weights than init_std = 0.02: a non-trivial check
  check_param_grads(lambda p: model.apply(p, _seq(), method="sequence_repr"), params)


def test_bprmf_loss_grads():
  model = BPRMF(num_users=5, num_items=9, dim=4)
  batch = {
    "user": jnp.array([1, 2, 4]),
    "pos": jnp.array([1, 3, 8]),
    "neg": jnp.array([[2, 5], [6, 7], [1, 2]]),
    "weight": jnp.array([1.0, 1.0, 0.0]),
  }
  loss_fn = pairwise_loss_fn(model, loss="bpr", l2_weight=0.1)
  check_param_grads(lambda p: loss_fn(p, batch, _key(0))[0], init_params(model, _key(0)))


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_init_params_equals_a_default_compiled_init_bit_for_bit(name):
  # init_params compiles at a lower LLVM optimisation level on CPU; the values must not change
  model = create_model(name, num_users=NUM_USERS, num_items=NUM_ITEMS, **SMALL_KWARGS[name])
  key = jax.random.PRNGKey(3)   # the default (threefry) key that runs use
  # XLA's default level (3), whatever XLA_FLAGS say (the test suite's own is 1)
  default = jax.jit(lambda k: model.init({"params": k}, example_batch(model)),
                    compiler_options={"xla_backend_optimization_level": 3})(key)
  chex.assert_trees_all_equal(init_params(model, key), default)
  chex.assert_trees_all_equal(jax.jit(lambda k: init_params(model, k))(key), default)   # traced inside a jit


def test_bprmf_init_is_xavier_normal():
  model = BPRMF(num_users=2000, num_items=3000, dim=64)
  params = init_params(model, _key(0))["params"]
  for table, rows in [(params["user_embedding"]["embedding"], 2000), (params["item_embedding"]["embedding"], 3000)]:
    np.testing.assert_allclose(np.std(table), np.sqrt(2 / (rows + 64)), rtol=0.02)


def test_pop_params_and_ranking():
  counts = np.array([0, 5, 0, 1, 9])
  model = create_model("pop", num_users=3, num_items=5)
  params = pop_params(counts)
  items = model.apply(params, method="item_repr")
  chex.assert_shape(items, (5, 1))
  np.testing.assert_allclose(items[[1, 3, 4], 0], np.log([5, 1, 9]), rtol=1e-6)
  assert items[0, 0] == UNSEEN_SCORE and items[2, 0] == UNSEEN_SCORE
  scores = model.apply(params, {"user": jnp.array([1, 2])})
  np.testing.assert_array_equal(np.argsort(-scores[0])[:3], [4, 1, 3])
  np.testing.assert_array_equal(scores[0], scores[1])
  # the initialised tree has the same structure as pop_params'
  chex.assert_trees_all_equal_shapes(init_params(model, _key(0)), params)


def test_embedding_table_logical_axes():
  table = embedding_table(5, 3, init="xavier_uniform", logical_axes=EMBED_AXES)
  variables = table.init(_key(0), jnp.array([1, 2]))
  boxed = variables["params"]["embedding"]
  assert boxed.names == EMBED_AXES
  np.testing.assert_array_equal(table.apply(variables, jnp.array([1, 2])), boxed.value[1:3])   # applies boxed params
  with pytest.raises(ValueError, match="unknown embedding init"):
    embedding_table(5, 3, init="nope").init(_key(0), jnp.array([1]))


def test_registry():
  assert {"pop", "bpr", "sasrec", "bert4rec"} <= set(MODELS)
  assert model_kind("pop") == "popularity" and model_kind("bpr") == "general" and model_kind("sasrec") == "sequential"
  assert default_hparams("sasrec") == dict(
    max_len=50, dim=64, num_blocks=2, num_heads=2, ffn_dim=256, dropout=0.5, attn_dropout=0.5,
    activation="gelu", layer_norm_eps=1e-12, pre_norm=False, norm_queries_only=False, embed_scale=False,
    weight_init="normal", init_std=0.02,
  )
  assert default_hparams("bpr") == {"dim": 64, "embedding_init": "xavier_normal"}
  assert default_hparams("pop") == {"unseen_order": "tied", "unseen_seed": 0}
  model = create_model("bpr", num_users=4, num_items=6, dim=3)
  assert (model.num_users, model.num_items, model.dim) == (4, 6, 3)
  assert example_batch(create_model("sasrec", num_users=1, num_items=3))["seq"].shape == (2, 50)
  with pytest.raises(ConfigError, match="unknown model"):
    create_model("nope", num_users=4, num_items=6)
  with pytest.raises(ConfigError, match="unknown hyperparameter"):
    create_model("bpr", num_users=4, num_items=6, hidden=3)
  with pytest.raises(ConfigError, match="unknown hyperparameter"):
    create_model("sasrec", num_users=4, num_items=6, num_users_=3, name="x")
  with pytest.raises(ConfigError):
    default_hparams("nope")
  with pytest.raises(ConfigError):
    model_kind("nope")
