"""Feature-field layers (FM term, cross network, field encoder, split MLP) against numpy, their
gradients, and the kind "ctr" models: logits = score_items, registry, defaults, a planted rule."""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads
from test_features import tiny_interactions
from testutil import check_param_grads, random_variables
from testutil import rbg_key as _key

from recjax import models
from recjax.config import default_config
from recjax.data.features import build_feature_tables
from recjax.data.interactions import Interactions
from recjax.errors import ConfigError
from recjax.nn.features import MLP, CrossNetwork, FieldEncoder, fm_interaction
from recjax.tasks import pairwise_loss_fn, pointwise_loss_fn

SMALL = {"deepfm": dict(dim=4, mlp_dims=(8, 6)), "widedeep": dict(dim=4, mlp_dims=(8, 6)),
         "feature_mlp": dict(dim=4, mlp_dims=(8, 6)), "dcnv2": dict(dim=4, mlp_dims=(8, 6), cross_layers=2),
         "dcnv2_parallel": dict(dim=4, mlp_dims=(8, 6), cross_layers=2, structure="parallel")}


@functools.lru_cache
def _tables():
  return build_feature_tables(tiny_interactions())


def _random_params(model, seed: int = 0, std: float = 0.3, batch=None):
  """Parameters of the model's shapes drawn N(0, std^2) by numpy (`testutil.random_variables`)."""
  batch = batch or ({"user": jnp.zeros(2, jnp.int32), "item": jnp.zeros(2, jnp.int32)},)
  return random_variables(model.init, *batch, std=std, seed=seed)


def _model(name: str, tables=None, **kwargs):
  registry_name = name.removesuffix("_parallel")
  tables = tables or _tables()
  return models.create_model(registry_name, num_users=tables.num_users, num_items=tables.num_items,
                             features=tables, **{**SMALL[name], **kwargs})


# ----------------------------------------------------------------------------- layers

def test_fm_interaction_is_the_pairwise_sum():
  v = np.random.default_rng(0).normal(size=(3, 5, 4))
  pairwise = sum(np.sum(v[:, i] * v[:, j], -1) for i, j in itertools.combinations(range(5), 2))
  np.testing.assert_allclose(fm_interaction(jnp.asarray(v, jnp.float32)), pairwise, rtol=1e-5, atol=1e-5)
  with jax.enable_x64(True):
    check_grads(fm_interaction, (jnp.asarray(v[:2]),), order=1, modes=["rev"])


@pytest.mark.parametrize("init", ["normal", "xavier_normal"])
def test_cross_network_against_numpy(init):
  x0 = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
  cross = CrossNetwork(6, 3, weight_init=init)
  params = jax.jit(cross.init)(_key(0), x0)
  params = jax.tree.map(lambda a: a + 0.1, params)                          # nonzero biases too
  p = params["params"]
  x = x0.astype(np.float64)
  for i in range(3):
    x = x0 * (x @ np.asarray(p[f"kernel_{i}"]) + np.asarray(p[f"bias_{i}"])) + x
  got, norms = jax.jit(lambda p: (cross.apply(p, x0), cross.apply(p, method="kernel_norms")))(params)
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(norms, [np.linalg.norm(p[f"kernel_{i}"]) for i in range(3)], rtol=1e-5)
  scale = 1.0 if init == "normal" else np.sqrt(2 / 12)
  assert 0.5 * scale < np.std(p["kernel_0"]) < 1.5 * scale
  check_param_grads(lambda tree: jnp.sum(jnp.sin(cross.apply(tree, x0.astype(np.float64)))), params)


def test_mlp_parts_add_up_to_the_whole():
  x = np.random.default_rng(2).normal(size=(3, 7)).astype(np.float32)
  mlp = MLP(7, (5, 4), dropout=0.5)
  params = jax.jit(mlp.init)(_key(0), x)

  @jax.jit
  def run(params, key):
    split = mlp.apply(params, mlp.apply(params, x[:, :3], 0, method="project")
                      + mlp.apply(params, x[:, 3:], 3, method="project"), method="rest")
    return mlp.apply(params, x), split, mlp.apply(params, x, True, rngs={"dropout": key})

  whole, split, dropped = run(params, _key(1))
  np.testing.assert_allclose(whole, split, rtol=1e-5, atol=1e-6)
  p = params["params"]                                                         # biases start at zero
  reference = np.maximum(np.maximum(x @ p["kernel_0"], 0) @ p["kernel_1"], 0)
  np.testing.assert_allclose(whole, reference, rtol=1e-5, atol=1e-6)
  assert not np.allclose(dropped, whole)
  with pytest.raises(ValueError, match="outside the input width 7"):
    mlp.apply(params, x[:, :5], 3, method="project")


def _encoder_reference(tables, params, user: np.ndarray, item: np.ndarray):
  """numpy: [B, F, d] embeddings and [B, F] first-order weights, field by field."""
  p = {k: np.asarray(v) for k, v in params["params"].items()}
  tokens = [f for f in tables.fields if f.kind == "token"]
  offsets = dict(zip([f.name for f in tokens], np.cumsum([0] + [f.vocab_size for f in tokens])))
  numeric = [f.name for f in tables.fields if f.kind == "float"]
  embs, weights = [], []
  for side in ("user", "item"):
    ids = user if side == "user" else item
    order = [f for kind in ("token", "token_seq", "float") for f in tables.side(side) if f.kind == kind]
    for f in order:
      if f.kind == "token":
        v = f.values[ids]
        e = p["token_embedding"][offsets[f.name] + v] * (v != 0)[:, None]
        w = p["token_weight"][offsets[f.name] + v, 0] * (v != 0)
      elif f.kind == "token_seq":
        v = f.values[ids]
        mask = (v != 0).astype(np.float64)
        e = (p[f"seq_{f.name}_embedding"][v] * mask[..., None]).sum(1) / np.maximum(mask.sum(1), 1)[:, None]
        w = (p[f"seq_{f.name}_weight"][v, 0] * mask).sum(1)
      else:
        x = f.values[ids]
        e = x[:, None] * p["numeric_embedding"][numeric.index(f.name)]
        w = x * p["numeric_weight"][numeric.index(f.name), 0]
      embs.append(e)
      weights.append(w)
  return np.stack(embs, 1), np.stack(weights, 1)


def test_field_encoder_against_numpy_and_its_gradients():
  tables = _tables()
  encoder = FieldEncoder(tables, 3)
  user, item = np.array([0, 1, 2, 3, 4, 1]), np.array([0, 1, 2, 3, 4, 4])   # padding, missing, empty, unseen rows
  params = jax.jit(encoder.init)(_key(0), user, item)
  emb, weight = jax.jit(encoder.apply)(params, user, item)
  assert emb.shape == (6, 6, 3) and weight.shape == (6, 6)
  ref_emb, ref_weight = _encoder_reference(tables, params, user, item)
  np.testing.assert_allclose(emb, ref_emb, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(weight, ref_weight, rtol=1e-5, atol=1e-6)
  # u3 has no gender and no age, i3 no genres: zero vectors, zero weights
  names = [f.name for f in tables.fields]
  assert not np.any(emb[3, names.index("gender")]) and not np.any(emb[3, names.index("genres")])
  assert weight[3, names.index("gender")] == 0 and not np.any(emb[0])        # the padding row
  assert np.any(emb[4, names.index("gender")])                                # [UNK] has a vector
  table = params["params"]["token_embedding"]                                  # xavier-normal: std sqrt(2 / (T + d))
  assert table.shape == (5 + 4 + 5 + 5, 3) and 0.5 < np.std(table) / np.sqrt(2 / 22) < 1.5
  probe = np.random.default_rng(3).normal(size=(6, 6, 3))

  def f(tree):
    emb, weight = encoder.apply(tree, user, item)
    return jnp.sum(emb * probe) + jnp.sum(jnp.cos(weight))

  check_param_grads(f, params)
  bare = FieldEncoder(tables, 3, first_order=False)
  bare_params = _random_params(bare, batch=(user, item))
  assert "token_weight" not in bare_params["params"]
  assert not np.any(jax.jit(bare.apply)(bare_params, user, item)[1])


def _reversed_rows(tables):
  """The same fields and shapes with each table's non-padding rows in reverse order (other data)."""
  flip = lambda v: np.concatenate([v[:1], v[:0:-1]])  # noqa: E731
  return dataclasses.replace(tables, fields=tuple(dataclasses.replace(f, values=flip(f.values)) for f in tables.fields))


def test_feature_tables_as_arguments_equal_the_embedded_tables_and_share_one_program():
  tables = _tables()
  model = _model("deepfm", tables=tables)
  params = _random_params(model)
  constants = models.model_constants(model)
  assert set(constants["constants"]["encoder"]) == {"user", "item"}
  rows = {"user": jnp.array([0, 1, 2, 3, 4, 1], jnp.int32), "item": jnp.array([0, 1, 2, 3, 4, 4], jnp.int32)}
  loss = lambda variables: jnp.sum(jnp.sin(model.apply(variables, rows)))  # noqa: E731
  embedded = jax.jit(jax.value_and_grad(loss))
  passed = jax.jit(lambda p, c: jax.value_and_grad(lambda p: loss({**p, **c}))(p))
  for got, want in zip(jax.tree.leaves(passed(params, constants)), jax.tree.leaves(embedded(params))):
    np.testing.assert_array_equal(got, want)
  # the models over other tables of the same shapes: one program with the tables as arguments, two without
  other = _model("deepfm", tables=_reversed_rows(tables))
  lowered = lambda m, f: f.lower(params, models.model_constants(m)).as_text()  # noqa: E731
  apply = lambda m: jax.jit(lambda p, c: m.apply({**p, **c}, rows))  # noqa: E731
  assert lowered(model, apply(model)) == lowered(other, apply(other))
  inline = lambda m: jax.jit(lambda p, c: m.apply(p, rows)).lower(params, {}).as_text()  # noqa: E731
  assert inline(model) != inline(other)
  assert not np.array_equal(*(jax.jit(m.apply)(params, rows) for m in (model, other)))


def test_multi_value_fields_keep_one_order_whether_the_tables_are_embedded_or_passed():
  # Two item token_seq fields whose table order is not alphabetical: a dict of tables passed through
  # jit comes back with sorted keys, so the encoder's column order must not follow the dict's.
  inter = tiny_interactions()
  tags = np.empty(5, object)
  tags[:] = [(), ("x",), ("y", "x"), ("z",), ()]
  inter = dataclasses.replace(inter, item_features={"tags": tags, **inter.item_features})
  tables = build_feature_tables(inter)
  assert [f.name for f in tables.fields if f.kind == "token_seq"] == ["tags", "genres"]
  model = _model("feature_mlp", tables=tables)
  params = _random_params(model)
  rows = {"user": jnp.array([1, 2, 3, 4], jnp.int32), "item": jnp.array([1, 2, 3, 4], jnp.int32)}
  passed = jax.jit(lambda p, c: model.apply({**p, **c}, rows))(params, models.model_constants(model))
  np.testing.assert_allclose(model.apply(params, rows), passed, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- models

NAMES = sorted(SMALL)
TRAINED = ["dcnv2", "deepfm", "feature_mlp", "widedeep"]   # parallel DCN-v2 shares every layer with these


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_score_items_and_are_finite(name):
  model = _model(name)
  params = _random_params(model)
  users = jnp.array([1, 2, 3, 4, 1], jnp.int32)
  items = jnp.array([[1, 2], [3, 4], [4, 4], [1, 3], [2, 0]], jnp.int32)      # B * C = 10 > N = 5: all-items route
  few = items[:2, :1]                                                          # B * C = 2: per-pair route

  @jax.jit
  def run(params):
    rows = {"user": jnp.repeat(users, 2), "item": items.reshape(-1)}
    return (model.apply(params, {"user": users}, items, method="score_items"),
            model.apply(params, {"user": users[:2]}, few, method="score_items"),
            model.apply(params, rows, method="logits"), model.apply(params, rows),
            model.apply(params, method="penalty"))

  scores, few_scores, logits, called, penalty = run(params)
  assert scores.shape == (5, 2) and logits.shape == (10,) and penalty.shape == ()
  assert np.isfinite(scores).all()
  np.testing.assert_allclose(scores.reshape(-1), logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(few_scores, scores[:2, :1], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(logits, called)
  assert np.std(np.asarray(logits)) > 0
  assert isinstance(model.score_bytes_per_pair, int) and model.score_bytes_per_pair >= 4 * model.num_fields * 4


def test_deepfm_is_first_order_plus_fm_plus_deep():
  model = _model("deepfm")
  params = _random_params(model)
  batch = {"user": jnp.array([1, 2, 3]), "item": jnp.array([2, 3, 1])}
  encoder, mlp = FieldEncoder(model.tables, 4), MLP(model.num_fields * 4, (8, 6))

  @jax.jit
  def both(params):
    p = params["params"]
    emb, weight = encoder.apply({"params": p["encoder"]}, batch["user"], batch["item"])
    deep = mlp.apply({"params": p["mlp"]}, emb.reshape(3, -1)) @ p["predict"]["kernel"][:, 0] + p["predict"]["bias"][0]
    return model.apply(params, batch), p["bias"] + weight.sum(1) + fm_interaction(emb) + deep

  got, expected = both(params)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_dcnv2_penalty_and_structures():
  model = _model("dcnv2", reg_weight=0.5)
  params = _random_params(model)
  kernels = [np.asarray(params["params"]["cross"][f"kernel_{i}"]) for i in range(2)]
  np.testing.assert_allclose(model.apply(params, method="penalty"), 0.5 * sum(np.linalg.norm(k) for k in kernels),
                             rtol=1e-5)
  # the pointwise training loss adds the model's penalty to the BCE
  batch = {"user": jnp.array([1, 2, 0]), "item": jnp.array([1, 3, 0]), "label": jnp.array([1.0, 0.0, 0.0]),
           "weight": jnp.array([1.0, 1.0, 0.0])}
  loss, parts = jax.jit(pointwise_loss_fn(model))(params, batch, _key(1))
  logits = jax.jit(lambda p: model.apply(p, batch, True, method="logits", rngs={"dropout": _key(1)}))(params)[:2]
  bce = optax.sigmoid_binary_cross_entropy(logits, batch["label"][:2]).mean()
  np.testing.assert_allclose(parts["data_loss"], bce, rtol=1e-5)
  np.testing.assert_allclose(loss, bce + model.apply(params, method="penalty"), rtol=1e-5)
  # and so does the pairwise (BPR) loss when it is ranked on pair batches
  pairs = {"user": jnp.array([1, 2]), "pos": jnp.array([1, 3]), "neg": jnp.array([[2, 4], [1, 2]]),
           "weight": jnp.array([1.0, 1.0])}
  loss, parts = jax.jit(pairwise_loss_fn(model, loss="bpr"))(params, pairs, _key(1))
  np.testing.assert_allclose(loss, parts["rec_loss"] + model.apply(params, method="penalty"), rtol=1e-5)
  assert parts["penalty"] > 1.0
  assert _random_params(_model("dcnv2_parallel"))["params"]["predict"]["kernel"].shape == (6 * 4 + 6, 1)
  with pytest.raises(ConfigError, match="structure must be one of"):
    _model("dcnv2", structure="sideways")


def test_registry_defaults_follow_recbole():
  assert models.default_hparams("deepfm") == dict(fields=(), dim=10, mlp_dims=(128, 128, 128), dropout=0.2,
                                                  embedding_init="xavier_normal")
  assert models.default_hparams("widedeep") == dict(fields=(), dim=10, mlp_dims=(32, 16, 8), dropout=0.1,
                                                    embedding_init="xavier_normal")
  assert models.default_hparams("dcnv2") == dict(fields=(), dim=16, structure="stacked", cross_layers=3,
                                                 mlp_dims=(768, 768), dropout=0.2, reg_weight=2.0, cross_init="normal",
                                                 embedding_init="xavier_normal")
  for name in ("deepfm", "dcnv2", "widedeep", "feature_mlp"):
    assert models.model_kind(name) == "ctr" and models.MODELS[name].needs_features
    assert "features" not in default_config(name)["model"]


def test_field_selection_and_bad_features():
  model = _model("deepfm", fields=["item_id", "user_id"])                       # a list (JSON) is made a tuple
  assert model.fields == ("item_id", "user_id") and model.tables.names == ("user_id", "item_id")
  assert set(models.init_params(model, _key(0))["params"]["encoder"]) == {"token_embedding", "token_weight"}
  with pytest.raises(ConfigError, match="unknown feature field.*'height'"):
    _model("widedeep", fields=("height",))
  with pytest.raises(ConfigError, match="features must be a recjax.data.features.FeatureTables"):
    models.create_model("deepfm", num_users=5, num_items=5, features={"user_id": np.zeros(5)})
  a, b = _model("deepfm"), _model("deepfm", tables=build_feature_tables(tiny_interactions()))
  assert a != b and hash(a) == hash(_model("deepfm"))                          # equal only with the same tables


def _planted_rule_data():
  """24 users (group a|b), 30 items (tags from x, y, z; some none; a price); label = (group a) XOR (tag x)."""
  rng = np.random.default_rng(0)
  groups = rng.choice(["a", "b"], size=24)
  tags = [tuple(t for t in "xyz" if rng.random() < 0.5) for _ in range(30)]
  users, items = np.meshgrid(np.arange(1, 25), np.arange(1, 31), indexing="ij")
  users, items = users.reshape(-1).astype(np.int32), items.reshape(-1).astype(np.int32)
  label = np.array([(groups[u - 1] == "a") != ("x" in tags[i - 1]) for u, i in zip(users, items)], np.float32)
  objects = lambda values: np.array([None, *values], dtype=object)[:, None][:, 0]  # noqa: E731
  inter = Interactions(
      user=users, item=items, user_vocab=objects([f"u{u}" for u in range(1, 25)]),
      item_vocab=objects([f"i{i}" for i in range(1, 31)]),
      user_features={"group": objects(list(groups))},
      item_features={"tags": objects(tags), "price": np.concatenate([[np.nan], rng.random(30)]).astype(np.float32)})
  return inter, label


@pytest.mark.parametrize("name", TRAINED)
def test_models_learn_a_planted_feature_interaction(name):
  inter, label = _planted_rule_data()
  tables = build_feature_tables(inter)
  model = _model(name, tables=tables, dropout=0.0, dim=8)   # dropout: see the MLP test (it compiles slowly)
  train = np.random.default_rng(1).random(len(label)) < 0.75
  batch = {"user": jnp.asarray(inter.user[train]), "item": jnp.asarray(inter.item[train])}
  test = {"user": jnp.asarray(inter.user[~train]), "item": jnp.asarray(inter.item[~train])}
  target = jnp.asarray(label[train])
  optimizer = optax.adam(3e-2)

  def loss_fn(params, key):
    logits = model.apply(params, batch, True, rngs={"dropout": key})
    return optax.sigmoid_binary_cross_entropy(logits, target).mean() + 1e-3 * model.apply(params, method="penalty")

  @jax.jit
  def fit_and_predict(params, key):
    def step(carry, key):
      params, state = carry
      grads = jax.grad(loss_fn)(params, key)
      updates, state = optimizer.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, 150))
    return model.apply(params, test)

  predicted = np.asarray(fit_and_predict(_random_params(model, std=0.1), _key(1))) > 0
  accuracy = np.mean(predicted == label[~train].astype(bool))
  assert accuracy > 0.9, accuracy                                              # held-out pairs: the rule, not the ids
