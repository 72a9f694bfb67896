"""NCF (GMF, NCF-MLP, NeuMF) and the plumbing of models that score (user, item) pairs: forward passes
against numpy, gradients, pairwise losses, full and sampled ranking (chunked to a memory budget)
against numpy metrics, NeuMF pretraining, and an end-to-end run."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import check_param_grads
from testutil import rbg_key as _key

from recjax import experiment, tasks
from recjax.config import build_config
from recjax.errors import ConfigError
from recjax.eval import ranking as R
from recjax.models import create_model, default_hparams, init_params, neumf_from_pretrained
from recjax.train import Checkpointer, create_train_state

USERS, ITEMS = 13, 31
SMALL = {"gmf": dict(dim=4), "ncf_mlp": dict(dim=4, hidden=(6, 3)),
         "neumf": dict(mf_dim=4, mlp_dim=3, hidden=(6, 3))}
NAMES = sorted(SMALL)
METRICS = ("recall", "mrr", "ndcg", "hit", "precision")


def param_shapes(model) -> dict:
  """The model's parameter tree as shapes (traced, nothing compiled)."""
  return jax.eval_shape(functools.partial(init_params, model), _key(0))


def random_params(model, seed: int = 0, integer: bool = False) -> dict:
  """Random normal params (std 0.5, so ReLUs switch), or small integers, whose forward passes are
  exact in float32 (every tie is a true tie, equal on any path)."""
  leaves, tree = jax.tree.flatten(param_shapes(model))
  rng = np.random.default_rng(seed)
  draw = (lambda s: rng.integers(-1, 2, s)) if integer else (lambda s: 0.5 * rng.standard_normal(s))
  return jax.tree.unflatten(tree, [jnp.asarray(draw(x.shape), jnp.float32) for x in leaves])


def make(name: str, seed: int = 0, integer: bool = False, **kwargs):
  """(model, random_params) of a small `name` model."""
  model = create_model(name, num_users=USERS, num_items=ITEMS, **{**SMALL[name], **kwargs})
  return model, random_params(model, seed, integer)


def np_logits(params: dict, users: np.ndarray, items: np.ndarray) -> np.ndarray:
  """The NCF forward in float64 numpy (eval mode): users [B], items [B, C] -> [B, C]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  features = []
  if "gmf" in p:
    features.append(p["gmf"]["user"]["embedding"][users][:, None, :] * p["gmf"]["item"]["embedding"][items])
  if "mlp" in p:
    m = p["mlp"]
    item = m["item"]["embedding"][items]                                    # [B, C, d]
    user = np.broadcast_to(m["user"]["embedding"][users][:, None, :], item.shape)
    z = np.concatenate([user, item], -1)
    for layer in range(sum(key.startswith("layers_") for key in m)):
      z = np.maximum(z @ m[f"layers_{layer}"]["kernel"] + m[f"layers_{layer}"]["bias"], 0.0)
    features.append(z)
  return (np.concatenate(features, -1) @ p["output"]["kernel"] + p["output"]["bias"])[..., 0]


def dense_logits(params: dict) -> np.ndarray:
  """[USERS, ITEMS] numpy logits of every (user, item) pair."""
  return np_logits(params, np.arange(USERS), np.broadcast_to(np.arange(ITEMS), (USERS, ITEMS)))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score_items(model, params, users, items, train, rng):
  rngs = {"dropout": rng} if train else None
  return model.apply(params, {"user": users}, items, train, method="score_items", rngs=rngs)


def score_items(model, params, users, items, train=False, rng=None):
  """`model.score_items` of `users [B]`, `items [B, C]` -> `[B, C]`, jitted (dropout with `rng` when `train`)."""
  return _score_items(model, params, jnp.asarray(users), jnp.asarray(items), train, rng if train else _key(0))


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("name", NAMES)
def test_scores_match_numpy_forward(name):
  model, params = make(name, seed=1)
  rng = np.random.default_rng(0)
  users, items = rng.integers(0, USERS, 5), rng.integers(0, ITEMS, (5, 7))
  np.testing.assert_allclose(score_items(model, params, users, items), np_logits(params, users, items),
                             rtol=1e-5, atol=1e-5)
  batch = {"user": jnp.asarray(users), "item": jnp.asarray(items[:, 0])}
  if name == "gmf":   # factorised: <[p_u * w ; b], [q_i ; 1]> over the whole table
    full = model.apply(params, batch, method="user_repr") @ model.apply(params, method="item_repr").T
    np.testing.assert_allclose(full, dense_logits(params)[users], rtol=1e-5, atol=1e-5)
  else:               # __call__ (init) scores the batch's (user, item) pairs
    np.testing.assert_allclose(model.apply(params, batch), np_logits(params, users, items[:, :1])[:, 0],
                               rtol=1e-5, atol=1e-5)


def test_defaults_are_recboles_and_lists_become_tuples():
  assert default_hparams("neumf") == dict(mf_dim=64, mlp_dim=64, hidden=(128, 64), dropout=0.1, embedding_std=0.01)
  assert default_hparams("ncf_mlp") == dict(dim=64, hidden=(128, 64), dropout=0.1, embedding_std=0.01)
  assert default_hparams("gmf") == dict(dim=64, embedding_std=0.01)
  model = create_model("neumf", num_users=3, num_items=4, hidden=[5, 2])   # as read back from config.json
  assert model.hidden == (5, 2)
  params = init_params(model, _key(0))["params"]
  assert params["mlp"]["layers_0"]["kernel"].shape == (2 * 64, 5) and params["output"]["kernel"].shape == (64 + 2, 1)
  bound = 1 / np.sqrt(2 * 64)                                   # PyTorch's nn.Linear init: U(-1/sqrt(fan_in), ...)
  assert 0.9 * bound < np.abs(params["mlp"]["layers_0"]["kernel"]).max() <= bound
  assert abs(float(np.std(params["gmf"]["item"]["embedding"])) - 0.01) < 0.002
  with pytest.raises(ConfigError, match="hidden"):
    init_params(create_model("ncf_mlp", num_users=3, num_items=4, hidden=()), _key(0))


def test_dropout_masks_each_pair_and_is_off_in_eval():
  model, params = make("neumf", seed=2, dropout=0.5)
  users, items = np.array([1, 2]), np.array([[3, 3, 3, 3], [5, 5, 5, 5]])     # the same pair four times
  trained = np.asarray(score_items(model, params, users, items, True, _key(0)))
  assert (np.ptp(trained, axis=1) > 0).all()                    # every pair draws its own mask
  np.testing.assert_array_equal(trained, score_items(model, params, users, items, True, _key(0)))
  np.testing.assert_allclose(score_items(model, params, users, items), np_logits(params, users, items), rtol=1e-5)


def test_tower_and_pairwise_loss_grads():
  """NeuMF holds both towers: its eval scores and its training loss (a fixed dropout mask) together."""
  model, params = make("neumf", seed=3, dropout=0.3)
  users, items = np.array([1, 4, 7]), np.array([[2, 5], [9, 1], [3, 3]])
  loss_fn = tasks.pairwise_loss_fn(model, loss="bpr")
  batch = {"user": jnp.asarray(users), "pos": jnp.asarray(items[:, 0]), "neg": jnp.asarray(items[:, 1:]),
           "weight": jnp.array([1.0, 1.0, 0.0])}
  check_param_grads(lambda p: jnp.concatenate([
      model.apply(p, {"user": users}, items, method="score_items").ravel(), loss_fn(p, batch, _key(2))[0][None]]),
      params)


def test_gmf_l2_regularises_its_embedding_rows():
  # With l2_weight, the term is on P and Q's rows of the batch (not [p*w ; b] and [q ; 1]).
  model, params = make("gmf", seed=5)
  batch = {"user": jnp.array([1, 2]), "pos": jnp.array([3, 4]), "neg": jnp.array([[5], [6]]),
           "weight": jnp.array([1.0, 1.0])}
  _, parts = tasks.pairwise_loss_fn(model, loss="bpr", l2_weight=0.5)(params, batch, _key(0))
  tables = params["params"]["gmf"]
  p, q = np.asarray(tables["user"]["embedding"]), np.asarray(tables["item"]["embedding"])
  rows = [0.5 * (np.sum(p[u] ** 2) + np.sum(q[i] ** 2) + np.sum(q[j] ** 2)) for u, i, j in ((1, 3, 5), (2, 4, 6))]
  np.testing.assert_allclose(parts["l2"], np.mean(rows), rtol=1e-5)


def test_pairwise_loss_scores_positive_and_negatives_through_score_items():
  model, params = make("neumf", seed=4, dropout=0.0)
  users, pos, neg = np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8]), np.array([[9, 10], [11, 12], [1, 2], [3, 4]])
  weight = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
  batch = {"user": users, "pos": pos, "neg": neg, "weight": weight}
  s = np_logits(params, users, np.concatenate([pos[:, None], neg], 1))
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  per_row = {"bce": -log_sigmoid(s[:, 0]) - log_sigmoid(-s[:, 1:]).sum(1),
             "bpr": -log_sigmoid(s[:, :1] - s[:, 1:]).mean(1)}
  for loss in ("bce", "bpr"):
    got, _ = jax.jit(tasks.pairwise_loss_fn(model, loss=loss))(params, batch, _key(0))
    assert float(got) == pytest.approx(np.sum(per_row[loss] * weight) / weight.sum(), rel=1e-5), loss
  with pytest.raises(ConfigError, match="l2_weight"):
    tasks.pairwise_loss_fn(model, loss="bce", l2_weight=1e-3)


# ----------------------------------------------------------------------------- ranking

def np_ranking_metrics(scores, positives, exclude, ks) -> dict[str, float]:
  """Full-ranking metrics in numpy: items sorted by (-score, held out, id), so ties count against the
  held-out items; item 0 and the excluded items skipped, users without positives dropped."""
  values = {f"{name}@{k}": [] for k in ks for name in METRICS}
  for row, pos, ex in zip(scores, positives, exclude):
    relevant = set(pos[pos > 0].tolist())
    if not relevant:
      continue
    masked = {0} | set(ex.tolist())
    ranked = sorted((i for i in range(len(row)) if i not in masked), key=lambda i: (-row[i], i in relevant, i))
    for k in ks:
      hits = np.array([i in relevant for i in ranked[:k]], float)
      discount = 1 / np.log2(np.arange(len(hits)) + 2)
      ideal = (1 / np.log2(np.arange(min(len(relevant), k)) + 2)).sum()
      first = np.flatnonzero(hits)
      values[f"recall@{k}"].append(hits.sum() / len(relevant))
      values[f"precision@{k}"].append(hits.sum() / k)
      values[f"hit@{k}"].append(float(hits.any()))
      values[f"mrr@{k}"].append(1 / (first[0] + 1) if len(first) else 0.0)
      values[f"ndcg@{k}"].append((hits * discount).sum() / ideal)
  return {key: float(np.mean(v)) for key, v in values.items()}


def eval_problem(seed: int):
  """Positives [U, 4] and exclusions [U, 6], distinct per user, 0-padded; two users hold nothing out."""
  rng = np.random.default_rng(seed)
  positives, exclude = np.zeros((USERS, 4), np.int32), np.zeros((USERS, 6), np.int32)
  for u in range(USERS):
    perm = rng.permutation(np.arange(1, ITEMS))
    npos, nex = rng.integers(1, 5), rng.integers(0, 7)
    positives[u, :npos], exclude[u, :nex] = perm[:npos], perm[npos:npos + nex]
  positives[[3, 8]] = 0
  return positives, exclude


def spy(fn, shapes: list):
  """`fn` recording the `items`-or-chunk shape it is traced with."""
  def wrapped(params, inputs, *items):
    shapes.append(items[0].shape if items else inputs["user"].shape)
    return fn(params, inputs, *items)
  return wrapped


def test_full_ranking_of_a_pair_scorer_equals_numpy_metrics_within_budget():
  model, params = make("neumf", seed=5, integer=True)
  dense = dense_logits(params)
  assert min(len(np.unique(row)) for row in dense) < ITEMS - 5   # many ties, exact in float32
  positives, exclude = eval_problem(0)
  ks, pair_bytes = (3, 10), model.score_bytes_per_pair
  budget = 4 * (17 + pair_bytes) * ITEMS + 1000                  # about 4 users per chunk
  shapes = []
  got = R.evaluate_full(spy(tasks.score_fn(model), shapes), params, {"user": np.arange(USERS)}, positives, exclude,
                        ks=ks, metrics=METRICS, budget_bytes=budget, num_items=ITEMS, bytes_per_pair=pair_bytes)
  ((chunk,),), kept = set(shapes), USERS - 2
  assert 2 <= chunk < kept and chunk * (17 + pair_bytes) * ITEMS <= budget, (chunk, budget)
  want = np_ranking_metrics(dense, positives, exclude, ks)
  assert list(got) == list(want)
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("name, sizes", [("neumf", {}), ("ncf_mlp", dict(dim=8, hidden=(512, 8)))])
def test_full_ranking_chunk_fits_the_budget_after_compilation(name, sizes):
  """XLA's own temporary-buffer count (CPU) for one chunk stays within the budget that sized it."""
  num_items, budget, width, num_pos = 3000, 48 << 20, 20, 5
  model = create_model(name, num_users=50, num_items=num_items, **sizes)
  params = param_shapes(model)
  extra = 4 * (width + num_pos) + 10 * (num_pos + 8)
  chunk = R.chunk_users(num_items, budget, extra, model.score_bytes_per_pair)
  assert chunk >= 2
  rows = lambda *shape: jax.ShapeDtypeStruct((chunk, *shape), jnp.int32)
  step = R.make_full_ranking_eval(tasks.score_fn(model), (10,), METRICS)
  compiled = step.lower(params, {"user": rows()}, rows(width), rows(num_pos),
                        jax.ShapeDtypeStruct((chunk,), jnp.float32)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes <= budget


def test_sampled_ranking_scores_only_the_candidates_and_equals_dense():
  model, params = make("ncf_mlp", seed=6, integer=True)
  dense = dense_logits(params)
  positives, exclude = eval_problem(1)
  targets, n, ks = positives[:, 0], 8, (1, 5, 10)
  shapes = []
  got = R.evaluate_sampled(spy(tasks.item_score_fn(model), shapes), params, {"user": np.arange(USERS)}, targets,
                           exclude, num_negatives=n, num_items=ITEMS, seed=3, ks=ks, metrics=("hit", "mrr", "ndcg"),
                           budget_bytes=3 * (17 + model.score_bytes_per_pair) * (1 + n),
                           bytes_per_pair=model.score_bytes_per_pair)
  assert set(shapes) == {(3, 1 + n)}                            # 3-user chunks of the 1+n candidates, never N
  keep = targets > 0
  negatives = R.sample_negatives(targets[keep], exclude[keep], ITEMS, n, seed=3)
  kept = dense[keep]
  rank = np.array([(kept[u, negatives[u]] >= kept[u, t]).sum() for u, t in enumerate(targets[keep])])   # ties lose
  for k in ks:
    assert got[f"sampled_hit@{k}"] == pytest.approx(np.mean(rank < k))
    assert got[f"sampled_mrr@{k}"] == pytest.approx(np.mean(np.where(rank < k, 1 / (rank + 1), 0)), rel=1e-6)
    assert got[f"sampled_ndcg@{k}"] == pytest.approx(np.mean(np.where(rank < k, 1 / np.log2(rank + 2), 0)), rel=1e-6)


def test_a_factorised_model_scores_its_candidates_as_its_full_scores_say():
  model, params = make("gmf", seed=2, integer=True)
  inputs = {"user": np.arange(USERS)}
  items = np.random.default_rng(0).integers(0, ITEMS, (USERS, 6))
  full = np.asarray(tasks.score_fn(model)(params, inputs))
  np.testing.assert_allclose(tasks.item_score_fn(model)(params, inputs, items), np.take_along_axis(full, items, 1),
                             rtol=1e-6)


# ----------------------------------------------------------------------------- pretraining

def test_neumf_from_pretrained_is_alpha_gmf_plus_one_minus_alpha_mlp():
  (gmf, gmf_params), (mlp, mlp_params) = make("gmf", seed=7, integer=True), make("ncf_mlp", seed=8, integer=True)
  neumf = create_model("neumf", num_users=USERS, num_items=ITEMS, mf_dim=4, mlp_dim=4, hidden=(6, 3))
  users, items = np.arange(USERS), np.random.default_rng(0).integers(0, ITEMS, (USERS, 9))
  parts = score_items(gmf, gmf_params, users, items), score_items(mlp, mlp_params, users, items)
  expected_tree = jax.tree.map(lambda x: (x.shape, x.dtype), param_shapes(neumf))
  for alpha in (0.5, 0.25):
    params = neumf_from_pretrained(gmf_params, mlp_params, alpha)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == expected_tree
    got = score_items(neumf, params, users, items)
    np.testing.assert_array_equal(got, alpha * parts[0] + (1 - alpha) * parts[1])   # integer params: exact
  with pytest.raises(ConfigError, match="alpha"):
    neumf_from_pretrained(gmf_params, mlp_params, 1.5)


def small_config(name: str, /, **overrides) -> dict:
  """Model `name`'s config on the synthetic data, shrunk, evaluated once at the end; then `overrides`
  (a dict value is merged into the key's dict)."""
  sizes = {"gmf": dict(dim=8), "ncf_mlp": dict(dim=8, hidden=[16, 8]),
           "neumf": dict(mf_dim=8, mlp_dim=8, hidden=[16, 8])}[name]
  config = build_config(name)
  for update in ({"batch_size": 1024, "learning_rate": 0.01, "eval_every": 100, "model": sizes}, overrides):
    for key, value in update.items():
      config[key] = {**config[key], **value} if isinstance(value, dict) else value
  return config


def saved_run(path, exp, name: str, checkpoint: bool = True, num_items: int | None = None, **overrides):
  """A run folder of model `name`: config.json and (with `checkpoint`) a best checkpoint of random
  params for `exp`'s data (`num_items` other than the data's: a checkpoint that does not fit).
  Returns (folder, params)."""
  config = small_config(name, **overrides)
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  if not checkpoint:
    return str(path), None
  hparams = {k: v for k, v in config["model"].items() if k != "name"}
  model = create_model(name, num_users=exp.split.train.num_users, num_items=num_items or exp.split.train.num_items,
                       **hparams)
  params = random_params(model, seed=len(str(path)))
  state = create_train_state(params, experiment.make_optimizer(config), jax.random.PRNGKey(0))
  with Checkpointer(path / "checkpoints") as checkpoints:
    checkpoints.save_best(0, state, {"epoch": 0})
  return str(path), params


def _with_split_record(run: str, exp, **changes) -> str:
  """`run` with the split record of `exp`'s split, `changes` applied (as if the run had other data)."""
  experiment.write_json(Path(run) / "split.json", {**experiment.split_record(exp.split), **changes})
  return run


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # orbax, after a failed restore
def test_pretraining_route_restores_runs_and_rejects_bad_ones(tmp_path):
  exp = experiment.build(small_config("neumf"))
  gmf, gmf_params = saved_run(tmp_path / "gmf", exp, "gmf")
  mlp, mlp_params = saved_run(tmp_path / "mlp", exp, "ncf_mlp")
  exp.config["pretrain"] = {"gmf_run": gmf, "mlp_run": mlp, "alpha": 0.25}
  fresh = experiment.init_params(exp, jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, experiment.pretrained_init(exp, fresh),
               neumf_from_pretrained(gmf_params, mlp_params, 0.25))
  cases = [
      ({"gmf_run": gmf}, "needs both"),
      ({"gmf_run": gmf, "mlp_run": str(tmp_path / "missing")}, "pretrain.mlp_run: no recjax run at"),
      ({"gmf_run": mlp, "mlp_run": mlp}, "is a 'ncf_mlp' run, expected 'gmf'"),
      ({"gmf_run": saved_run(tmp_path / "wide", exp, "gmf", False, model={"dim": 16})[0]}, "model.mf_dim=8"),
      ({"mlp_run": saved_run(tmp_path / "deep", exp, "ncf_mlp", False, model={"hidden": [16, 4]})[0]},
       "model.hidden"),
      ({"gmf_run": saved_run(tmp_path / "seed", exp, "gmf", False, seed=1)[0]}, "same data and split"),
      ({"gmf_run": saved_run(tmp_path / "one-domain", exp, "gmf", False, domain={"rule": "column", "only": "d0"})[0]},
       "domain.rule='column'.*same data and split"),
      ({"gmf_run": saved_run(tmp_path / "untrained", exp, "gmf", False, epochs=0)[0]}, "never trained"),
      ({"mlp_run": saved_run(tmp_path / "other", exp, "ncf_mlp", num_items=7)[0]}, "does not fit"),
      ({"mlp_run": str(tmp_path / "empty")}, "no recjax run"),
      ({"gmf_run": _with_split_record(saved_run(tmp_path / "resplit", exp, "gmf")[0], exp, fingerprint="0" * 64)},
       "pretrain.gmf_run: .*trained on another split"),
  ]
  for runs, message in cases:
    exp.config["pretrain"] = {"gmf_run": gmf, "mlp_run": mlp, "alpha": 0.5, **runs}
    if message == "needs both":
      exp.config["pretrain"]["mlp_run"] = None
    with pytest.raises(ConfigError, match=message):
      experiment.pretrained_init(exp, fresh)
  exp.config["pretrain"] = {"gmf_run": None, "mlp_run": None, "alpha": 0.5}
  assert experiment.pretrained_init(exp, "unchanged") == "unchanged"


def test_neumf_trains_end_to_end_and_beats_popularity():
  log = lambda line: None
  neumf = experiment.train(small_config("neumf", epochs=15), None, log=log)["test"]
  pop = experiment.train(build_config("pop"), None, log=log)["test"]
  assert neumf["ndcg@10"] > 1.5 * pop["ndcg@10"], (neumf, pop)
