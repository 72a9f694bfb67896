"""Graph propagation, LightGCN and NGCF: against dense numpy references, gradients, the ego-L2 term,
evaluation from propagated tables, and short end-to-end runs that beat popularity."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from testutil import check_param_grads

from recjax import experiment, models, tasks
from recjax.config import build_config
from recjax.data.interactions import Interactions
from recjax.errors import ConfigError, DataError
from recjax.eval import ranking
from recjax.models.ngcf import NGCF
from recjax.nn import graph as graph_module
from recjax.nn.graph import normalized_adjacency, propagate
from recjax.optim import create_optimizer
from recjax.train import create_train_state, make_train_step


def small_train() -> Interactions:
  """5 users (4 real; user 4 has no interaction), 6 items (5 real; item 5 unseen); pair (1, 2) twice."""
  user = np.array([1, 1, 1, 2, 2, 3, 3, 3, 1], np.int32)
  item = np.array([1, 2, 3, 2, 4, 1, 3, 4, 2], np.int32)
  vocab = lambda n: np.array(["[PAD]"] + [str(i) for i in range(1, n)], object)  # noqa: E731
  return Interactions(user=user, item=item, user_vocab=vocab(5), item_vocab=vocab(6), name="small")


def dense_adjacency(train: Interactions) -> np.ndarray:
  """D^-1/2 A D^-1/2 built densely: the plain-numpy reference."""
  u, n = train.num_users, train.num_items
  a = np.zeros((u + n, u + n))
  a[train.user, u + train.item] = 1.0     # duplicates set the same entry
  a[u + train.item, train.user] = 1.0
  degree = a.sum(1)
  inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-30)), 0.0)
  return inv_sqrt[:, None] * a * inv_sqrt[None, :]


def test_adjacency_matches_dense_numpy():
  train = small_train()
  graph = normalized_adjacency(train)
  reference = dense_adjacency(train)
  np.testing.assert_allclose(graph.dense(), reference, rtol=1e-6, atol=0)
  assert graph.num_edges == 2 * 8                                   # the duplicate pair is one edge
  assert np.all(np.diff(graph.dst.astype(np.int64) * graph.num_nodes + graph.src) > 0)   # sorted by (dst, src)
  assert np.array_equal(graph.indptr, np.searchsorted(graph.dst, np.arange(graph.num_nodes + 1)))
  assert np.array_equal(graph.dst[graph.reverse], graph.src) and np.array_equal(graph.src[graph.reverse], graph.dst)
  for isolated in (0, 4, train.num_users + 0, train.num_users + 5):  # padding rows, user 4, item 5
    assert not graph.dense()[isolated].any() and not graph.dense()[:, isolated].any()
  assert graph != normalized_adjacency(train) and hash(graph) == hash(graph)   # identity semantics


def test_adjacency_rejects_bad_ids():
  train = small_train()
  bad = Interactions(user=np.array([1, 7], np.int32), item=np.array([1, 1], np.int32),
                     user_vocab=train.user_vocab, item_vocab=train.item_vocab, name="bad")
  with pytest.raises(DataError, match="user id 7"):
    normalized_adjacency(bad)


def test_propagate_matches_dense_product_and_has_checked_gradients():
  graph = normalized_adjacency(small_train())
  emb = np.random.default_rng(0).normal(size=(graph.num_nodes, 3)).astype(np.float32)
  np.testing.assert_allclose(propagate(graph, jnp.asarray(emb)), graph.dense() @ emb, rtol=1e-5, atol=1e-6)
  weight = np.random.default_rng(1).random(graph.num_edges).astype(np.float32)   # replaced edge weights
  dense = np.zeros((graph.num_nodes, graph.num_nodes))
  np.add.at(dense, (graph.dst, graph.src), weight)
  np.testing.assert_allclose(propagate(graph, jnp.asarray(emb), jnp.asarray(weight)), dense @ emb, rtol=1e-5,
                             atol=1e-6)
  # the kernel GPUs and TPUs use (CPUs use the CSR one above)
  np.testing.assert_allclose(graph_module._gather_scatter_product(graph, jnp.asarray(weight), jnp.asarray(emb)),
                             dense @ emb, rtol=1e-5, atol=1e-6)
  with jax.enable_x64(True):
    check_grads(lambda e: jnp.sin(propagate(graph, e)), (emb.astype(np.float64),), order=1, modes=["rev"], eps=1e-5)
    # replaced weights are not symmetric: the custom VJP must use each edge's reverse, and give d/dweight
    check_grads(lambda w, e: jnp.sin(propagate(graph, e, w)), (weight.astype(np.float64), emb.astype(np.float64)),
                order=1, modes=["rev"], eps=1e-5)
  with pytest.raises(ValueError, match="users \\+ items"):
    propagate(graph, jnp.zeros((3, 2)))


def make(name: str, train: Interactions, **hparams):
  model = models.create_model(name, num_users=train.num_users, num_items=train.num_items,
                              graph=normalized_adjacency(train), **hparams)
  return model, models.init_params(model, jax.random.key(0))


@pytest.mark.parametrize("name", ["lightgcn", "ngcf"])
def test_graph_of_other_sizes_is_rejected(name):
  train = small_train()
  with pytest.raises(ValueError, match="graph has"):
    models.create_model(name, num_users=train.num_users + 1, num_items=train.num_items,
                        graph=normalized_adjacency(train))


def test_lightgcn_matches_dense_numpy():
  train = small_train()
  model, params = make("lightgcn", train, dim=4, num_layers=3)
  p = {k: np.asarray(v["embedding"], np.float64) for k, v in params["params"].items()}
  layer = np.concatenate([p["user_embedding"], p["item_embedding"]])
  total, adjacency = layer.copy(), dense_adjacency(train)
  for _ in range(3):
    layer = adjacency @ layer
    total += layer
  final = total / 4
  users, items = model.apply(params, method="ranking_tables")
  np.testing.assert_allclose(users, final[:train.num_users], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(items, final[train.num_users:], rtol=1e-5, atol=1e-6)
  batch = {"user": jnp.array([1, 3])}
  np.testing.assert_allclose(model.apply(params, batch), final[[1, 3]] @ final[train.num_users:].T, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(model.apply(params, batch, method="user_repr"), final[[1, 3]], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.apply(params, method="item_repr"), final[train.num_users:], rtol=1e-5, atol=1e-6)
  check_param_grads(lambda q: jnp.sum(jnp.sin(model.apply(q, batch))), params)


def leaky_relu(x):
  return np.where(x >= 0, x, 0.2 * x)


def ngcf_numpy(params: dict, adjacency: np.ndarray, num_layers: int) -> np.ndarray:
  """RecBole's NGCF forward without dropout, in float64: [U+I, d0 + sum d_l]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  emb = np.concatenate([p["user_embedding"]["embedding"], p["item_embedding"]["embedding"]])
  outputs = [emb]
  for layer in range(num_layers):
    w = p[f"layers_{layer}"]
    side = adjacency @ emb
    h = (emb + side) @ w["sum"]["kernel"] + w["sum"]["bias"] + (side * emb) @ w["bi"]["kernel"] + w["bi"]["bias"]
    h = leaky_relu(h)
    emb = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    outputs.append(emb)
  return np.concatenate(outputs, axis=1)


def test_ngcf_matches_numpy_forward_and_has_checked_gradients():
  train = small_train()
  model, params = make("ngcf", train, dim=4, hidden_sizes=(3, 5), message_dropout=0.3, node_dropout=0.2)
  # Random biases, so the bias terms are tested too (RecBole initialises them to 0).
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: jax.random.normal(jax.random.key(len(path)), a.shape) if "bias" in str(path[-1]) else a, params)
  reference = ngcf_numpy(params, dense_adjacency(train), 2)
  users, items = model.apply(params, method="ranking_tables")                     # dropout off
  assert users.shape == (train.num_users, 4 + 3 + 5)
  np.testing.assert_allclose(np.concatenate([users, items]), reference, rtol=1e-5, atol=1e-6)
  # Gradients of every parameter of both bi-interaction layers and the tables, through the normalisation.
  check_param_grads(lambda q: jnp.sum(jnp.sin(jnp.concatenate(model.apply(q, method="ranking_tables")))), params)


def test_ngcf_gradients_stay_finite_when_a_row_is_all_zero():
  # An edgeless node (padding, user 4, item 5) whose whole row message dropout removed, with the biases at
  # their initial 0, gives an all-zero row to normalise: its gradient must be finite (0), as torch's.
  model, params = make("ngcf", small_train(), dim=4, hidden_sizes=(2, 2), message_dropout=0.5)
  loss = jax.jit(jax.grad(lambda p, key: jnp.sum(jnp.concatenate(
      model.apply(p, True, method="ranking_tables", rngs={"dropout": key})))))
  for seed in range(20):
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(loss(params, jax.random.key(seed)))), seed


def test_ngcf_dropout_only_in_training():
  train = small_train()
  model, params = make("ngcf", train, dim=4, hidden_sizes=(4,), message_dropout=0.5, node_dropout=0.5)
  tables = lambda key: jnp.concatenate(model.apply(params, True, method="ranking_tables",  # noqa: E731
                                                   rngs={"dropout": key}))
  eval_tables = jnp.concatenate(model.apply(params, method="ranking_tables"))
  assert not np.allclose(tables(jax.random.key(0)), eval_tables)
  np.testing.assert_array_equal(tables(jax.random.key(0)), tables(jax.random.key(0)))
  # Node dropout alone: the layer sees weights w / (1 - p) on kept edges, 0 on dropped ones.
  no_message = NGCF(train.num_users, train.num_items, normalized_adjacency(train), dim=4, hidden_sizes=(4,),
                    message_dropout=0.0, node_dropout=0.5)
  dropped = no_message.apply(params, True, method="ranking_tables", rngs={"dropout": jax.random.key(3)})
  assert np.isfinite(np.concatenate(dropped)).all() and not np.allclose(np.concatenate(dropped), eval_tables)


def test_l2_is_on_ego_rows_for_lightgcn_and_final_rows_for_ngcf():
  train = small_train()
  batch = {"user": jnp.array([1, 2, 3]), "pos": jnp.array([2, 4, 1]), "neg": jnp.array([[5, 3], [1, 3], [2, 5]]),
           "weight": jnp.array([1.0, 1.0, 0.0])}
  rng = jax.random.key(0)

  def penalty(model, params, rows):
    users, items = (np.asarray(t, np.float64) for t in rows)
    u, pos, neg = users[batch["user"]], items[batch["pos"]], items[batch["neg"]]
    per_row = 0.5 * ((u ** 2).sum(-1) + (pos ** 2).sum(-1) + (neg ** 2).sum((-2, -1)))
    w = np.asarray(batch["weight"])
    expected = (per_row * w).sum() / w.sum()
    loss, metrics = jax.jit(tasks.pairwise_loss_fn(model, l2_weight=0.5))(params, batch, rng)
    np.testing.assert_allclose(float(metrics["l2"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(metrics["rec_loss"]) + 0.5 * expected, rtol=1e-5)

  model, params = make("lightgcn", train, dim=4)
  penalty(model, params, (params["params"]["user_embedding"]["embedding"],
                          params["params"]["item_embedding"]["embedding"]))
  model, params = make("ngcf", train, dim=4, hidden_sizes=(4,), message_dropout=0.0)
  penalty(model, params, model.apply(params, method="ranking_tables"))


@pytest.mark.parametrize("name, hparams", [
    ("lightgcn", {"dim": 4}),
    ("ngcf", {"dim": 4, "hidden_sizes": (4,), "message_dropout": 0.2, "node_dropout": 0.2}),
])
def test_train_step_is_finite_learns_and_compiles_once(name, hparams):
  model, params = make(name, small_train(), **hparams)
  optimizer = create_optimizer("adam", 0.05)
  state = create_train_state(params, optimizer, jax.random.key(1))
  step = make_train_step(tasks.pairwise_loss_fn(model, l2_weight=1e-4), optimizer)
  batch = {"user": jnp.array([1, 2, 3, 1]), "pos": jnp.array([1, 4, 3, 3]), "neg": jnp.array([[5], [3], [2], [4]]),
           "weight": jnp.ones(4)}
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert step.jitted._cache_size() == 1 and np.isfinite(losses).all() and losses[-1] < losses[0]
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_models_need_their_graph():
  with pytest.raises(ConfigError, match="needs \\['graph'\\]"):
    models.create_model("lightgcn", num_users=3, num_items=3)
  assert "graph" not in models.default_hparams("lightgcn") and "graph" not in models.default_hparams("ngcf")


def test_evaluation_propagates_once_and_matches_per_chunk_scoring():
  config = build_config("lightgcn", overrides=["model.dim=8", "eval_budget_mb=1"])
  exp = experiment.build(config)
  assert exp.model.graph.num_edges == 2 * len(np.unique(exp.split.train.user * exp.split.train.num_items
                                                        + exp.split.train.item.astype(np.int64)))
  params = experiment.init_params(exp, jax.random.key(0))
  data = exp.eval_sets["valid"]
  direct = ranking.evaluate_full(tasks.score_fn(exp.model), params, data["inputs"], data["positives"],
                                 data["exclude"], ks=exp.protocol.ks, chunk_size=128)
  calls = []
  eval_params = exp.eval_params
  exp.eval_params = lambda p: calls.append(1) or eval_params(p)
  assert experiment.make_evaluator(exp, "valid")(params) == pytest.approx(direct, rel=1e-5)
  assert len(calls) == 1
  # sampled ranking scores the candidates from the same tables
  tables, inputs = eval_params(params), {"user": data["inputs"]["user"][:16]}
  items = np.random.default_rng(0).integers(0, exp.split.train.num_items, (16, 5))
  full = np.asarray(tasks.tables_score(tables, inputs))
  np.testing.assert_allclose(exp.item_score_fn(tables, inputs, items), np.take_along_axis(full, items, 1),
                             rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def pop_ndcg() -> float:
  return experiment.train(build_config("pop"), log=lambda line: None)["test"]["ndcg@10"]


@pytest.mark.parametrize("name, overrides", [
    ("lightgcn", ["model.dim=32"]),
    ("ngcf", ["model.dim=32", "model.hidden_sizes=[32]"]),
])
def test_trains_and_beats_popularity_on_synthetic(pop_ndcg, name, overrides):
  config = build_config(name, overrides=["epochs=6", "learning_rate=0.02", "eval_every=6", *overrides])
  metrics = experiment.train(config, log=lambda line: None)
  assert metrics["epochs_run"] == 6
  assert metrics["test"]["ndcg@10"] > 1.4 * pop_ndcg, (metrics["test"], pop_ndcg)


def test_gowalla_builds_the_paper_graph(data_dir):
  config = build_config("lightgcn", dataset="gowalla", overrides=["protocol='lightgcn'"])
  config["data_dir"] = str(data_dir)
  exp = experiment.build(config)
  assert exp.model.graph.num_nodes == 29859 + 40982
  assert exp.model.graph.num_edges == 2 * 810128
  assert exp.eval_sets["valid"] is exp.eval_sets["test"]   # no valid part: selection on test, as the paper
