"""The CTR / rating-regression task: labels, row split, sampler, pointwise loss, metrics, pipeline.

A tiny kind "ctr" model (user and item embeddings, dot product + biases as the logit) stands in for
the feature-interaction models; it is registered for the end-to-end runs by monkeypatching.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
import sys
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_classification import ref_auc
from testutil import check_param_grads, host_devices_env, rbg_key

from recjax import config as config_lib
from recjax import experiment, models, tasks
from recjax.cli import main as cli_main
from recjax.data import datasets, labeled, preprocess
from recjax.data.interactions import from_columns
from recjax.data.samplers import LabeledSampler
from recjax.data.splits import ratio_counts
from recjax.data.synthetic import make_synthetic
from recjax.errors import ConfigError, DataError
from recjax.eval import classification as C
from recjax.eval import protocols
from recjax.train.fit import _fresh_book, _record_eval

# ----------------------------------------------------------------------------- a tiny kind "ctr" model

class DotCTR(nn.Module):
  """logit(u, i) = <p_u, q_i> + b_u + b_i + b."""
  num_users: int
  num_items: int
  dim: int = 8
  kind: ClassVar[str] = "ctr"
  factorized: ClassVar[bool] = False
  score_bytes_per_pair: ClassVar[int] = 64

  def setup(self):
    normal, zeros = nn.initializers.normal(0.1), nn.initializers.zeros
    self.user_emb = nn.Embed(self.num_users, self.dim, embedding_init=normal)
    self.item_emb = nn.Embed(self.num_items, self.dim, embedding_init=normal)
    self.user_bias = nn.Embed(self.num_users, 1, embedding_init=zeros)
    self.item_bias = nn.Embed(self.num_items, 1, embedding_init=zeros)
    self.bias = self.param("bias", zeros, ())

  def score_items(self, batch, items, train=False):
    """`batch["user"] [B]`, `items [B, C]` -> `[B, C]`."""
    user = batch["user"][:, None]
    dot = jnp.sum(self.user_emb(user) * self.item_emb(items), -1)
    return dot + self.user_bias(user)[..., 0] + self.item_bias(items)[..., 0] + self.bias

  def logits(self, batch, train=False):
    return self.score_items(batch, batch["item"][:, None], train)[:, 0]

  def __call__(self, batch, train=False):
    return self.logits(batch, train)


def dot_logits(params, user, item):
  """numpy reference of DotCTR's logits."""
  p = jax.tree.map(np.asarray, params["params"])
  return ((p["user_emb"]["embedding"][user] * p["item_emb"]["embedding"][item]).sum(-1)
          + p["user_bias"]["embedding"][user, 0] + p["item_bias"]["embedding"][item, 0] + p["bias"])


def tiny_rated(data_dir=None):
  return datasets.LoadedDataset(dataclasses.replace(
      make_synthetic(num_users=150, num_items=60, dim=4, mean_length=25, seed=3), name="tiny-rated"))


def tiny_unrated(data_dir=None):
  inter = tiny_rated().interactions
  return datasets.LoadedDataset(dataclasses.replace(inter, rating=None, name="tiny-unrated"))


@pytest.fixture
def registered(monkeypatch):
  """DotCTR as model "dot_ctr" (the shared context-aware run defaults) and two small datasets; "rbg"
  keys, whose initialisers compile several times faster than threefry's on CPU; no curves.png."""
  monkeypatch.setattr(experiment, "fit", functools.partial(experiment.fit, plot=False))
  impl = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  monkeypatch.setitem(models.MODELS, "dot_ctr", DotCTR)
  monkeypatch.setitem(config_lib.MODEL_DEFAULTS, "dot_ctr", config_lib._CONTEXT)
  for name, loader in (("tiny-rated", tiny_rated), ("tiny-unrated", tiny_unrated)):
    monkeypatch.setitem(datasets.DATASETS, name, datasets.DatasetSpec(name, "test data", loader))
  yield
  jax.config.update("jax_default_prng_impl", impl)


def small_config(*overrides, dataset="tiny-rated"):
  return config_lib.build_config("dot_ctr", dataset=dataset, overrides=[
      "epochs=4", "batch_size=128", "learning_rate=0.02", "model.dim=4", *overrides])


# ----------------------------------------------------------------------------- metrics

def ref_gauc(scores, labels, groups, weight, by="positives"):
  """Loop over users: the pairwise AUC of each user with both classes, weighted by its positive
  (or all) example weight."""
  total = norm = 0.0
  for g in np.unique(groups):
    m = groups == g
    w, y = weight[m], labels[m]
    if not (np.sum(w * y) > 0 and np.sum(w * (1 - y)) > 0):
      continue
    user_w = np.sum(w * y) if by == "positives" else np.sum(w)
    total += user_w * ref_auc(scores[m], y, w)
    norm += user_w
  return total / norm


def recbole_gauc(scores, labels, groups):
  """RecBole 1.2.1's GAUC.metric_info, transcribed: descending average ranks per user,
  pair_num = (n + 1) P - P (P + 1) / 2 - sum of the positives' ranks, auc = pair_num / (N P),
  weighted by P; users without positives or negatives removed."""
  aucs, pos_lens = [], []
  for g in np.unique(groups):
    s, y = scores[groups == g], labels[groups == g]
    n, p = len(s), int(y.sum())
    if p == 0 or p == n:
      continue
    desc = -s
    ranks = np.array([np.sum(desc < v) + (np.sum(desc == v) + 1) / 2 for v in desc])   # average ranks, 1-based
    pair_num = (n + 1) * p - p * (p + 1) / 2 - ranks[y == 1].sum()
    aucs.append(pair_num / ((n - p) * p))
    pos_lens.append(p)
  return float(np.sum(np.array(aucs) * pos_lens) / np.sum(pos_lens))


def grouped_case(seed, n=120, users=12):
  rng = np.random.default_rng(seed)
  scores = np.round(rng.normal(size=n) * 1.5)          # few distinct values: ties within and across users
  groups = rng.integers(0, users, n) * 7 + 3          # sparse, unsorted group ids
  labels = (rng.random(n) < 0.5).astype(np.int64)
  labels[groups == groups[0]] = 1                     # one all-positive user
  labels[groups == groups[1]] = 0 if groups[1] != groups[0] else 1
  weight = rng.uniform(0.2, 2.0, n) * (rng.random(n) > 0.15)
  return scores, labels, groups, weight


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_references(seed):
  scores, labels, groups, weight = grouped_case(seed)
  ones = np.ones_like(weight)
  assert len(np.unique(scores)) < 12
  assert C.gauc(scores, labels, groups) == pytest.approx(recbole_gauc(scores, labels, groups), abs=1e-12)
  for w in (weight, ones):
    for by in ("positives", "rows"):
      got = C.gauc(scores, labels, groups, weight=w, weight_by=by)
      assert got == pytest.approx(ref_gauc(scores, labels, groups, w, by), abs=1e-12)
  # one-class users are skipped, not counted as 0 or 1
  one_class = groups == groups[0]
  kept = ~one_class
  assert C.gauc(scores, labels, groups) == pytest.approx(C.gauc(scores[kept], labels[kept], groups[kept]), abs=1e-12)
  # a single user is plain AUC
  assert C.gauc(scores, labels, np.zeros(len(scores), int), weight) == pytest.approx(
      ref_auc(scores, labels, weight), abs=1e-12)


def test_gauc_bad_input():
  with pytest.raises(ValueError, match="no group has both classes"):
    C.gauc([0.1, 0.2, 0.3], [1, 1, 0], [1, 1, 2])
  with pytest.raises(ValueError, match="groups must be integers"):
    C.gauc([0.1, 0.2], [1, 0], [0.5, 1.5])
  with pytest.raises(ValueError, match="weight_by"):
    C.gauc([0.1, 0.2], [1, 0], [1, 1], weight_by="clicks")
  with pytest.raises(ValueError, match="NaN"):
    C.gauc([np.nan, 0.2], [1, 0], [1, 1])


@pytest.mark.parametrize("seed", [0, 1])
def test_regression_metrics_match_numpy(seed):
  rng = np.random.default_rng(seed)
  pred, target = rng.normal(size=50) * 2 + 3, rng.integers(1, 6, 50).astype(float)
  weight = rng.uniform(0, 2, 50) * (rng.random(50) > 0.2)
  for w in (None, weight):
    ww = np.ones(50) if w is None else w
    err = [p - t for p, t in zip(pred, target)]
    ref_mse = sum(wi * e * e for wi, e in zip(ww, err)) / sum(ww)
    assert C.mse(pred, target, w) == pytest.approx(ref_mse, rel=1e-12)
    assert C.rmse(pred, target, w) == pytest.approx(math.sqrt(ref_mse), rel=1e-12)
    assert C.mae(pred, target, w) == pytest.approx(sum(wi * abs(e) for wi, e in zip(ww, err)) / sum(ww), rel=1e-12)
  got = C.regression_metrics(("rmse", "mae"), pred, target)
  assert list(got) == ["rmse", "mae"] and got["rmse"] == C.rmse(pred, target)
  with pytest.raises(ValueError, match="same length"):
    C.mse(pred, target[:3])
  with pytest.raises(ValueError, match="finite"):
    C.mae(np.full(3, np.inf), np.zeros(3))
  with pytest.raises(ValueError, match="positive weight"):
    C.rmse(pred, target, np.zeros(50))


def test_binary_metrics_dict_with_ties():
  scores, labels, groups, _ = grouped_case(5)
  got = C.binary_metrics(("auc", "gauc", "logloss"), scores, labels, groups)
  assert got["auc"] == pytest.approx(ref_auc(scores, labels, np.ones(len(scores))), abs=1e-12)
  assert got["gauc"] == pytest.approx(recbole_gauc(scores, labels, groups), abs=1e-12)
  ref_ll = np.mean([-math.log(1 / (1 + math.exp(-s))) if y else -math.log(1 - 1 / (1 + math.exp(-s)))
                    for s, y in zip(scores, labels)])
  assert got["logloss"] == pytest.approx(ref_ll, rel=1e-10)


def test_score_rows_chunks_on_device_and_compiles_once():
  rng = np.random.default_rng(0)
  params = {"u": jnp.asarray(rng.normal(size=9)), "i": jnp.asarray(rng.normal(size=7))}
  f = jax.jit(lambda p, b: p["u"][b["user"]] * p["i"][b["item"]])
  for n in (1, 10, 11, 23):
    rows = {"user": rng.integers(0, 9, n).astype(np.int32), "item": rng.integers(0, 7, n).astype(np.int32)}
    got = C.score_rows(f, params, rows, chunk=5)
    np.testing.assert_allclose(got, np.asarray(params["u"])[rows["user"]] * np.asarray(params["i"])[rows["item"]],
                               rtol=1e-6)
    assert got.shape == (n,) and got.dtype == np.float64
  assert f._cache_size() == 1


SHARDED_SCORING = """
import jax, numpy as np
from recjax.eval.classification import score_rows
from recjax.train.mesh import batch_sharding, data_mesh
assert jax.device_count() == 2
params = jax.device_put({"u": np.arange(9.0), "i": np.arange(7.0) / 7}, jax.devices()[0])   # as restored
rows = {"user": np.arange(23) % 9, "item": np.arange(23) % 7}
got = score_rows(jax.jit(lambda p, b: p["u"][b["user"]] * p["i"][b["item"]]), params, rows, 6,
                 batch_sharding(data_mesh(2)))
np.testing.assert_allclose(got, rows["user"] * rows["item"] / 7, rtol=1e-6)
"""


def test_score_rows_over_two_host_devices():
  """Chunks split over a 2-device mesh; params restored on one device are replicated first."""
  env = host_devices_env(2)
  done = subprocess.run([sys.executable, "-c", SHARDED_SCORING], env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- labels, split, sampler

def test_random_rows_split_is_recboles_global_cut():
  inter = tiny_rated().interactions
  split = labeled.random_rows(inter, (0.8, 0.1, 0.1), seed=7)
  counts = ratio_counts(np.array([len(inter)]), (0.8, 0.1, 0.1))[0]
  assert [len(split.train), len(split.valid), len(split.test)] == list(counts)
  key = lambda part: part.user.astype(np.int64) * 10**6 + part.item * 10 + part.timestamp.astype(np.int64) % 10
  together = np.concatenate([key(split.train), key(split.valid), key(split.test)])
  np.testing.assert_array_equal(np.sort(together), np.sort(key(inter)))          # nothing lost or repeated
  assert np.all(np.diff(split.train.timestamp) >= 0)                               # original (time) order kept
  again, other = labeled.random_rows(inter, (0.8, 0.1, 0.1), seed=7), labeled.random_rows(inter, seed=8)
  np.testing.assert_array_equal(again.test.item, split.test.item)
  assert not np.array_equal(other.test.item, split.test.item)
  # not grouped by user: a user's rows are not cut 80/10/10 one by one
  per_user = np.bincount(split.test.user, minlength=inter.num_users)
  assert np.any(per_user[np.unique(inter.user)] == 0)


def test_labels_and_threshold_errors():
  inter = tiny_rated().interactions
  np.testing.assert_array_equal(labeled.ctr_labels(inter, 4), (inter.rating >= 4).astype(np.float32))
  assert labeled.ctr_labels(inter, 3.5).dtype == np.float32
  for bad in ("4", None, float("nan"), True, float("inf")):
    with pytest.raises(ConfigError, match="label_threshold"):
      labeled.ctr_labels(inter, bad)
  with pytest.raises(DataError, match="tiny-unrated.*needs ratings"):
    labeled.ctr_labels(tiny_unrated().interactions, 4)
  split = labeled.random_rows(inter, seed=0)
  data = labeled.labeled_data(split, "labeled", threshold=4)
  np.testing.assert_array_equal(data.valid.target, (split.valid.rating >= 4).astype(np.float32))
  np.testing.assert_array_equal(data.test.user, split.test.user)
  with pytest.raises(DataError, match="label_threshold 6 makes every train row negative"):
    labeled.labeled_data(split, "labeled", threshold=6)
  with pytest.raises(DataError, match="every train row positive"):
    labeled.labeled_data(split, "labeled", threshold=0.5)
  with pytest.raises(ConfigError, match="labelled task"):
    labeled.labeled_data(split, "ranking")
  no_valid = labeled.random_rows(inter, (0.9, 0.1), seed=0)
  assert len(no_valid.valid) == 0 and len(no_valid.test) == ratio_counts(np.array([len(inter)]), (0.9, 0.1))[0, 1]
  with pytest.raises(DataError, match="has no valid rows"):
    labeled.labeled_data(no_valid, "rating")


@pytest.mark.parametrize("method", ["zscore", "minmax", "user_mean"])
def test_rating_scale_matches_normalize_ratings_and_inverts(method):
  split = labeled.random_rows(tiny_rated().interactions, seed=1)
  scale = labeled.fit_rating_scale(split.train, method)
  train = split.train
  np.testing.assert_allclose(scale.normalize(train.rating, train.user),
                             preprocess.normalize_ratings(train, method).rating, rtol=1e-5, atol=1e-6)
  test = split.test
  np.testing.assert_allclose(scale.denormalize(scale.normalize(test.rating, test.user), test.user), test.rating,
                             rtol=1e-6)
  data = labeled.labeled_data(split, "rating", normalization=method)
  np.testing.assert_array_equal(data.test.target, test.rating)                      # evaluated on the rating scale
  np.testing.assert_allclose(data.train_targets(), scale.normalize(train.rating, train.user), rtol=1e-6)


def test_rating_scale_identity_unseen_users_and_errors():
  inter = from_columns(["a", "a", "b", "c"], ["x", "y", "x", "y"], rating=np.array([1, 3, 5, 4], np.float32))
  train = inter.subset(np.array([0, 1, 2]))                                        # user c unseen
  scale = labeled.fit_rating_scale(train, "user_mean")
  np.testing.assert_allclose(scale.shift[1:], [2.0, 5.0, 3.0])                      # c: the global mean
  ident = labeled.fit_rating_scale(train, None)
  np.testing.assert_array_equal(ident.normalize(inter.rating, inter.user), inter.rating)
  with pytest.raises(ConfigError, match="rating_normalization"):
    labeled.fit_rating_scale(train, "log")
  with pytest.raises(DataError, match="needs ratings"):
    labeled.fit_rating_scale(dataclasses.replace(train, rating=None), "zscore")


def test_labeled_sampler_shapes_padding_and_determinism():
  rng = np.random.default_rng(0)
  user, item = rng.integers(1, 20, 50), rng.integers(1, 30, 50)
  label = rng.integers(0, 2, 50).astype(np.float32)
  sampler = LabeledSampler(user, item, label, batch_size=16, seed=3)
  assert sampler.num_batches == 4
  batches = list(sampler.epoch(0))
  assert len(batches) == 4
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "user": ((16,), np.int32), "item": ((16,), np.int32), "label": ((16,), np.float32),
        "weight": ((16,), np.float32)}
  last = batches[-1]
  np.testing.assert_array_equal(last["weight"], [1] * 2 + [0] * 14)
  assert not last["user"][2:].any() and not last["item"][2:].any() and not last["label"][2:].any()
  real = np.concatenate([np.stack([b["user"], b["item"], b["label"]], 1)[b["weight"] > 0] for b in batches])
  expect = np.stack([user, item, label], 1)
  np.testing.assert_array_equal(real[np.lexsort(real.T)], expect[np.lexsort(expect.T)])   # each row once
  fresh = LabeledSampler(user, item, label, batch_size=16, seed=3)   # a resumed process: (seed, epoch) only
  for b, c in zip(fresh.epoch(0), batches):
    for k in b:
      np.testing.assert_array_equal(b[k], c[k])
  assert not np.array_equal(next(sampler.epoch(1))["user"], batches[0]["user"])
  assert not np.array_equal(next(LabeledSampler(user, item, label, 16, seed=4).epoch(0))["user"], batches[0]["user"])
  with pytest.raises(ValueError, match="one length"):
    LabeledSampler(user, item[:3], label, 16)
  with pytest.raises(DataError, match="no training rows"):
    LabeledSampler(user[:0], item[:0], label[:0], 16)


# ----------------------------------------------------------------------------- loss


def test_pointwise_losses_against_numpy_and_gradients():
  model, KEY = DotCTR(num_users=6, num_items=5, dim=3), rbg_key(0)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape).astype(np.float32),
                        models.init_params(model, rbg_key(0)))
  batch = {"user": rng.integers(0, 6, 8).astype(np.int32), "item": rng.integers(0, 5, 8).astype(np.int32),
           "label": rng.integers(0, 2, 8).astype(np.float32), "weight": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)}
  z = dot_logits(params, batch["user"], batch["item"]).astype(np.float64)
  y, w = batch["label"], batch["weight"]
  p = 1 / (1 + np.exp(-z))
  ref_bce = np.sum(w * -(y * np.log(p) + (1 - y) * np.log(1 - p))) / np.sum(w)
  bce = tasks.create_loss_fn("ctr", "bce", model=model)
  assert float(bce(params, batch, KEY)[0]) == pytest.approx(ref_bce, rel=1e-5)
  rating = dict(batch, label=rng.normal(size=8).astype(np.float32))
  ref_mse = np.sum(w * (z - rating["label"]) ** 2) / np.sum(w)
  mse = tasks.create_loss_fn("ctr", "mse", model=model)
  assert float(mse(params, rating, KEY)[0]) == pytest.approx(ref_mse, rel=1e-5)
  padded = dict(batch, user=batch["user"].copy(), label=batch["label"].copy())
  padded["user"][6:], padded["label"][6:] = 5, 1 - batch["label"][6:]                # weight-0 rows do not count
  assert float(bce(params, padded, KEY)[0]) == pytest.approx(ref_bce, rel=1e-5)
  for fn, b in ((bce, batch), (mse, rating)):
    check_param_grads(lambda q, fn=fn, b=b: fn(q, b, KEY)[0], params)
  with pytest.raises(ConfigError, match="unknown loss 'bpr' for ctr models"):
    tasks.create_loss_fn("ctr", "bpr", model=model)
  with pytest.raises(ConfigError, match="unknown option"):
    tasks.create_loss_fn("ctr", "bce", model=model, l2_weight=0.1)


# ----------------------------------------------------------------------------- protocol and selection

def test_protocol_presets():
  ctx, rating = protocols.get_protocol("recbole-context"), protocols.get_protocol("rating")
  assert (ctx.split, ctx.ratios, ctx.task, ctx.valid_metric) == ("random_rows", (0.8, 0.1, 0.1), "labeled", "auc")
  assert set(ctx.metrics) == {"auc", "gauc", "logloss"}
  assert (rating.task, rating.valid_metric, set(rating.metrics)) == ("rating", "rmse", {"rmse", "mae", "mse"})
  multi = protocols.get_protocol("multidomain")
  assert (multi.split, multi.task, multi.valid_metric, set(multi.metrics)) == (
      "domain_rows", "labeled", "auc", {"auc", "gauc", "logloss"})
  assert all(p.task == "ranking" for n, p in protocols.PRESETS.items()
             if n not in ("recbole-context", "rating", "multidomain"))
  assert protocols.higher_is_better("auc") and protocols.higher_is_better("ndcg@10")
  assert not any(protocols.higher_is_better(m) for m in ("rmse", "mae", "mse", "logloss"))
  # one task's or one domain's loss is a loss too
  assert not any(protocols.higher_is_better(m) for m in ("logloss/d2", "logloss:click", "mse:like/d1"))
  assert protocols.higher_is_better("auc:click/d2")
  with pytest.raises(ConfigError, match="computes"):
    protocols.Protocol("x", split="random_rows", task="labeled", metrics=("auc", "ndcg"), valid_metric="auc")
  with pytest.raises(ConfigError, match="computes"):
    protocols.Protocol("x", split="random_rows", task="rating", metrics=("rmse",), valid_metric="mae")
  with pytest.raises(ConfigError, match="unknown task"):
    protocols.Protocol("x", split="random_rows", task="regression")


def test_record_eval_lower_is_better():
  values = [3.0, 2.0, 2.0, 2.5, 2.6, 1.5]
  book = _fresh_book()
  improved = [_record_eval(book, e, {"rmse": v}, "rmse", patience=5, higher_is_better=False)
              for e, v in enumerate(values)]
  assert improved == [True, True, True, False, False, True] and book["best_epoch"] == 5   # ties improve, as RecBole
  book = _fresh_book()
  for e, v in enumerate([3.0, 2.0, 2.5, 2.6]):
    _record_eval(book, e, {"rmse": v}, "rmse", patience=1, higher_is_better=False)
  assert book["stopped_early"] and book["best_value"] == 2.0


# ----------------------------------------------------------------------------- the pipeline

def read(out, name):
  return json.loads((out / name).read_text())


def test_ctr_run_end_to_end_and_resume(registered, tmp_path, capsys):
  config = small_config()
  assert (config["protocol"], config["training"], config["loss"], config["label_threshold"]) == (
      "recbole-context", "labeled", "bce", 4.0)
  metrics = experiment.train(config, tmp_path / "full", log=lambda line: None)
  assert set(metrics["test"]) == set(metrics["valid"]) == {"auc", "gauc", "logloss"}
  assert metrics["valid_metric"] == "auc" and metrics["epochs_run"] == 4
  assert read(tmp_path / "full", "metrics.json")["test"] == metrics["test"]
  rows = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
  assert metrics["valid"]["auc"] == max(r["valid"]["auc"] for r in rows)
  assert metrics["test"]["auc"] > 0.7, metrics                                   # it learned the planted signal

  # the test metrics, recomputed without the pipeline: model logits on the test rows, numpy metrics
  exp = experiment.build(config)
  params = experiment.restore_best_params(exp, tmp_path / "full")
  test = exp.split.test
  z, y = dot_logits(params, test.user, test.item), (test.rating >= 4)
  assert metrics["test"]["auc"] == pytest.approx(ref_auc(z, y, np.ones(len(z))), abs=1e-6)
  assert metrics["test"]["gauc"] == pytest.approx(recbole_gauc(z, y.astype(int), test.user), abs=1e-6)
  assert metrics["test"]["logloss"] == pytest.approx(np.mean(np.logaddexp(0, -np.where(y, z, -z))), rel=1e-5)

  # `recjax evaluate --run` reproduces them
  capsys.readouterr()
  assert cli_main(["evaluate", "--run", str(tmp_path / "full")]) == 0
  assert json.loads(capsys.readouterr().out)["test"] == pytest.approx(metrics["test"], rel=1e-6)

  # interrupted after 2 epochs, then resumed: the same log rows and results
  experiment.train(small_config("epochs=2"), tmp_path / "cut", log=lambda line: None)
  resumed = experiment.train(config, tmp_path / "cut", resume=True, log=lambda line: None)
  strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]
  cut_rows = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
  assert strip(cut_rows) == strip(rows)
  assert resumed["test"] == metrics["test"] and resumed["valid"] == metrics["valid"]


def test_rating_regression_end_to_end(registered, tmp_path):
  config = small_config("protocol='rating'", "loss='mse'", "rating_normalization='zscore'", "epochs=5")
  metrics = experiment.train(config, tmp_path / "rating", log=lambda line: None)
  assert set(metrics["test"]) == {"rmse", "mae", "mse"} and metrics["valid_metric"] == "rmse"
  assert metrics["test"]["rmse"] == pytest.approx(math.sqrt(metrics["test"]["mse"]), rel=1e-9)
  rows = [json.loads(line) for line in (tmp_path / "rating" / "log.jsonl").read_text().splitlines()]
  values = [r["valid"]["rmse"] for r in rows]
  assert len(set(values)) > 1 and metrics["valid"]["rmse"] == min(values)          # lower is better
  exp = experiment.build(config)
  params = experiment.restore_best_params(exp, tmp_path / "rating")
  train, test = exp.split.train, exp.split.test
  mean, std = train.rating.astype(np.float64).mean(), train.rating.astype(np.float64).std()
  pred = dot_logits(params, test.user, test.item) * std + mean                     # back on the rating scale
  assert metrics["test"]["mae"] == pytest.approx(np.mean(np.abs(pred - test.rating)), rel=1e-5)
  assert metrics["test"]["rmse"] < np.sqrt(np.mean((mean - test.rating) ** 2))      # beats the global mean


@pytest.mark.parametrize("training, loss, sampler", [("labeled", "bce", "LabeledSampler"),
                                                     ("pairs", "bpr", "PairSampler")])
def test_ctr_model_under_a_ranking_protocol(registered, training, loss, sampler):
  """Trained on labelled rows (pointwise) or on pairs (general models' pairwise losses via score_items)."""
  exp = experiment.build(small_config("protocol='recbole-general'", f"training='{training}'", f"loss='{loss}'"))
  assert (exp.labeled_data is None) == (training == "pairs") and "positives" in exp.eval_sets["test"]
  batches = experiment.make_sampler(exp)
  assert type(batches).__name__ == sampler
  params = experiment.init_params(exp, rbg_key(0))
  value, _ = jax.jit(experiment.make_loss_fn(exp))(params, next(batches.epoch(0)), rbg_key(1))
  assert np.isfinite(float(value)) and float(value) > 0


@pytest.mark.parametrize("overrides, dataset, error, message", [
    ([], "tiny-unrated", DataError, "tiny-unrated: a CTR label .* needs ratings"),
    (["protocol='rating'", "loss='mse'"], "tiny-unrated", DataError, "rating regression needs ratings"),
    (["label_threshold=9"], "tiny-rated", DataError, "label_threshold 9 makes every train row negative"),
    (["label_threshold='high'"], "tiny-rated", ConfigError, "label_threshold expects float"),
    (["label_threshold=None"], "tiny-rated", ConfigError, "label_threshold expects float, got None"),
    (["protocol='rating'"], "tiny-rated", ConfigError, "loss 'bce' does not fit task 'rating'.*loss='mse'"),
    (["loss='mse'"], "tiny-rated", ConfigError, "loss 'mse' does not fit task 'labeled'"),
    (["protocol='rating'", "training='pairs'", "loss='bpr'"], "tiny-rated", ConfigError,
     "evaluates predicted ratings.*training='labeled'"),
    (["rating_normalization='log'", "protocol='rating'", "loss='mse'"], "tiny-rated", ConfigError,
     "rating_normalization"),
])
def test_bad_input_is_a_clear_error(registered, overrides, dataset, error, message):
  with pytest.raises(error, match=message):
    experiment.build(small_config(*overrides, dataset=dataset))


def test_ranking_models_refuse_labelled_protocols(registered):
  config = config_lib.build_config("bpr", dataset="tiny-rated", overrides=["protocol='recbole-context'"])
  with pytest.raises(ConfigError, match="needs a kind 'ctr' model.*'general'"):
    experiment.build(config)
  config = config_lib.build_config("bpr", dataset="tiny-rated", overrides=["training='labeled'"])
  with pytest.raises(ConfigError, match="training 'labeled'"):
    experiment.build(config)


def test_ml100k_context_split(registered, data_file):
  path = data_file("ml-100k/ml-100k.inter")
  config = config_lib.build_config("dot_ctr", dataset="ml-100k", overrides=[f"data_dir='{path.parent.parent}'"])
  exp = experiment.build(config)
  data, n = exp.labeled_data, len(exp.split.train) + len(exp.split.valid) + len(exp.split.test)
  assert [len(data.train), len(data.valid), len(data.test)] == list(ratio_counts(np.array([n]), (0.8, 0.1, 0.1))[0])
  ratings = np.loadtxt(path, skiprows=1, usecols=2)                                # the file's rating column
  assert n == len(ratings)
  positives = sum(float(part.target.sum()) for part in (data.train, data.valid, data.test))
  assert positives == np.sum(ratings >= 4)
