"""Scenario data and plumbing: domain rules, per-domain splits, the multi-domain generator, multi-task
labelled rows, per-domain metrics against numpy, the step's write-back of running statistics, and
partial fine-tuning (frozen parameters, merged checkpoints)."""
from __future__ import annotations

import dataclasses

import numpy as np
import optax
import pytest

from recjax.data import domains
from recjax.data.interactions import Interactions, from_columns
from recjax.data.labeled import labeled_data
from recjax.data.samplers import LabeledSampler
from recjax.data.splits import ratio_counts
from recjax.errors import ConfigError, DataError
from recjax.eval import classification
from recjax.train import adapt


def _objects(values):
  out = np.empty(len(values), dtype=object)
  out[:] = values
  return out


def _rated(n: int = 60, seed: int = 0) -> Interactions:
  """n rows over 6 users and 6 items with genres, ages and a `domain` column."""
  rng = np.random.default_rng(seed)
  user, item = rng.integers(1, 7, n), rng.integers(1, 7, n)
  genres = {"i1": ("Animation", "Comedy"), "i2": ("Horror",), "i3": ("Drama", "Action"), "i4": ("unknown",),
            "i5": ("Comedy",), "i6": ("Fantasy", "Drama")}
  ages = {"u1": 19.0, "u2": 25.0, "u3": 34.0, "u4": 35.0, "u5": 44.0, "u6": 70.0}
  return from_columns(_objects([f"u{u}" for u in user]), _objects([f"i{i}" for i in item]),
                      rating=rng.integers(1, 6, n).astype(np.float32),
                      columns={"domain": _objects([f"s{k % 3}" for k in range(n)]), "click": (user % 2).astype(float)},
                      user_features={"age": ages, "gender": {f"u{u}": "FM"[u % 2] for u in range(1, 7)}},
                      item_features={"class": genres}, name="rated")


def test_rules_give_each_row_its_domain():
  inter = _rated()
  raw_item = inter.item_vocab[inter.item]
  expected_genre = {"i1": "children", "i2": "horror", "i3": "action", "i4": "drama", "i5": "comedy", "i6": "scifi"}
  assert list(domains.row_domains(inter, "item_genre_group")) == [expected_genre[i] for i in raw_item]
  expected_age = {"u1": "<25", "u2": "25-34", "u3": "25-34", "u4": "35-44", "u5": "35-44", "u6": "45+"}
  assert list(domains.row_domains(inter, "user_age_band")) == [expected_age[u] for u in inter.user_vocab[inter.user]]
  assert list(domains.row_domains(inter, "user_feature:gender")) == [
      "FM"[int(u[1:]) % 2] for u in inter.user_vocab[inter.user]]
  assert list(domains.row_domains(inter, "column")) == list(inter.columns["domain"])
  tagged = domains.assign_domains(inter, "item_genre_group")
  assert domains.domain_names(tagged) == tuple(sorted(set(expected_genre[i] for i in raw_item)))


def test_rules_fail_clearly():
  inter = _rated()
  with pytest.raises(ConfigError, match="unknown rule 'genre'"):
    domains.row_domains(inter, "genre")
  with pytest.raises(DataError, match="interaction column 'scenario'"):
    domains.row_domains(inter, "column", column="scenario")
  with pytest.raises(DataError, match="needs a user feature 'occupation'"):
    domains.row_domains(inter, "user_feature:occupation")
  with pytest.raises(DataError, match="no domain column"):
    domains.domain_names(dataclasses.replace(inter, columns={}))
  with pytest.raises(DataError, match=r"\['s2'\] not among"):
    domains.domain_ids(inter, ("s0", "s1"))


def test_split_by_domain_keeps_every_domain_in_every_part():
  inter = domains.assign_domains(_rated(200), "column")
  split = domains.split_by_domain(inter, seed=3)
  names = domains.domain_names(inter)
  total = domains.domain_sizes(inter, names)
  expected = ratio_counts(np.array([total[name] for name in names]), (0.8, 0.1, 0.1))   # [D, 3], RecBole's counts
  for p, part in enumerate(("train", "valid", "test")):
    sizes = domains.domain_sizes(getattr(split, part), names)
    assert [sizes[name] for name in names] == list(expected[:, p]) and min(sizes.values()) >= 1
  assert len(split.train) + len(split.valid) + len(split.test) == len(inter)
  again = domains.split_by_domain(inter, seed=3)
  assert np.array_equal(again.test.user, split.test.user) and np.array_equal(again.test.item, split.test.item)
  assert not np.array_equal(domains.split_by_domain(inter, seed=4).test.item, split.test.item)
  only = domains.only_domain(split, "s1")
  assert set(only.train.columns["domain"]) == set(only.test.columns["domain"]) == {"s1"}
  assert len(only.test) == domains.domain_sizes(split.test, names)["s1"]
  with pytest.raises(ConfigError, match="unknown domain 's7'"):
    domains.only_domain(split, "s7")


def test_split_by_domain_with_two_ratios_is_train_and_test():
  inter = domains.assign_domains(_rated(200), "column")
  names = domains.domain_names(inter)
  split = domains.split_by_domain(inter, (0.9, 0.1), seed=3)
  total = domains.domain_sizes(inter, names)
  expected = ratio_counts(np.array([total[name] for name in names]), (0.9, 0.1))   # [D, 2]: train, test
  assert len(split.valid) == 0
  for p, part in enumerate(("train", "test")):
    sizes = domains.domain_sizes(getattr(split, part), names)
    assert [sizes[name] for name in names] == list(expected[:, p])


def test_split_by_domain_rejects_a_domain_too_small_to_split():
  inter = _rated(30)
  column = inter.columns["domain"].copy()
  column[:2] = "tiny"
  column[2:][column[2:] == "tiny"] = "s0"
  with pytest.raises(DataError, match=r"tiny \(2 rows\)"):
    domains.split_by_domain(dataclasses.replace(inter, columns={**inter.columns, "domain": column}))


def test_multidomain_generator_follows_its_plan():
  inter, plan = domains.make_multidomain(domain_rows=(20000, 4000), num_users=300, num_items=200, seed=1)
  names = domains.domain_names(inter)
  assert names == ("d0", "d1") and domains.domain_sizes(inter, names) == {"d0": 20000, "d1": 4000}
  logits = plan.logits(inter.user, inter.item, domains.domain_ids(inter, names))             # [n, 2]
  prob = 1 / (1 + np.exp(-logits))
  for t, task in enumerate(domains.TASKS):
    label = inter.columns[task]
    assert set(np.unique(label)) == {0.0, 1.0}
    # the labels follow the plan: calibrated on average, and far better ranked by it than by chance
    assert abs(label.mean() - prob[:, t].mean()) < 0.01
    assert classification.auc(logits[:, t], label) > 0.75
  # the features carry the planted segments and categories of the dense ids
  assert np.array_equal([f"s{s}" for s in plan.user_segment[1:]], inter.user_features["segment"][1:])
  assert np.array_equal([f"c{c}" for c in plan.item_category[1:]], inter.item_features["category"][1:])
  _, no_specific = domains.make_multidomain(domain_rows=(50, 50), specific_weight=0.0, seed=2)
  rows = np.arange(1, 40)
  same = no_specific.logits(rows, rows, np.zeros(39, int)) - no_specific.bias[:, 0]
  other = no_specific.logits(rows, rows, np.ones(39, int)) - no_specific.bias[:, 1]
  np.testing.assert_allclose(same, other)


def test_labeled_rows_carry_domains_and_one_label_per_task():
  inter = domains.assign_domains(_rated(300), "column")
  split = domains.split_by_domain(inter, seed=0)
  names = domains.domain_names(inter)
  rows = labeled_data(split, "labeled", label_columns=["click"], domains=names)
  assert rows.tasks == ("click",) and rows.domains == names and rows.num_tasks == 1
  assert rows.test.target.shape == (len(split.test),)                 # one task: [n], as rating-rule labels
  np.testing.assert_array_equal(rows.test.target, split.test.columns["click"])
  assert np.array_equal(rows.test.domain, domains.domain_ids(split.test, names))
  assert set(rows.test.inputs()) == {"user", "item", "domain"}
  with pytest.raises(DataError, match="label column 'like' not found"):
    labeled_data(split, "labeled", label_columns=["like"])
  for values in (split.train.rating, np.where(split.train.columns["click"] > 0, "yes", "no").astype(object)):
    with pytest.raises(DataError, match="must hold 0/1 labels"):
      bad = dataclasses.replace(split.train, columns={**split.train.columns, "click": values})
      labeled_data(dataclasses.replace(split, train=bad), "labeled", label_columns=["click"])
  sampler = LabeledSampler(rows.train.user, rows.train.item, np.stack([rows.train.target] * 2, -1), 64, seed=0,
                           domain=rows.train.domain)
  batches = list(sampler.epoch(0))
  assert batches[0]["label"].shape == (64, 2) and batches[0]["domain"].shape == (64,)
  seen = np.concatenate([b["domain"][b["weight"] > 0] for b in batches])
  assert np.array_equal(np.sort(seen), np.sort(rows.train.domain))


def _auc_reference(scores, labels):
  pos, neg = scores[labels == 1], scores[labels == 0]
  return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


def test_labeled_report_per_task_and_domain_against_numpy():
  rng = np.random.default_rng(0)
  n = 400
  labels = (rng.random((n, 2)) < 0.4).astype(np.float32)
  logits = rng.normal(size=(n, 2)) + labels
  users, domain = rng.integers(1, 30, n), rng.integers(0, 3, n)
  labels[domain == 2, 1] = 1.0                                          # one class in domain 2 for task "like"
  report = classification.labeled_report(("auc", "logloss"), logits, labels, users, tasks=("click", "like"),
                                         domain=domain, domains=("a", "b", "c"))
  for t, task in enumerate(("click", "like")):
    assert report[f"auc:{task}"] == pytest.approx(_auc_reference(logits[:, t], labels[:, t]))
    for d, name in enumerate("abc"):
      rows = domain == d
      z, y = logits[rows, t], labels[rows, t]
      logloss = float(np.mean(y * np.log1p(np.exp(-z)) + (1 - y) * np.log1p(np.exp(z))))
      assert report[f"logloss:{task}/{name}"] == pytest.approx(logloss)
      if (task, name) != ("like", "c"):
        assert report[f"auc:{task}/{name}"] == pytest.approx(_auc_reference(z, y))
  assert "auc:like/c" not in report                                     # undefined there, not invented
  assert report["auc"] == pytest.approx((report["auc:click"] + report["auc:like"]) / 2)
  for name in "ab":   # per domain too: the mean over the tasks where the metric is defined
    assert report[f"auc/{name}"] == pytest.approx((report[f"auc:click/{name}"] + report[f"auc:like/{name}"]) / 2)
  assert report["auc/c"] == pytest.approx(report["auc:click/c"])
  single = classification.labeled_report(("auc",), logits[:, 0], labels[:, 0], users)
  assert single == {"auc": pytest.approx(report["auc:click"])}


def test_train_step_writes_back_running_statistics():
  import jax.numpy as jnp

  from recjax.train import create_train_state, make_train_step
  from recjax.train.step import MODEL_STATE

  def loss_fn(variables, batch, rng):
    w = variables["params"]["w"]
    mean = jnp.mean(batch["x"])
    new_stats = {"batch_stats": {"mean": 0.5 * variables["batch_stats"]["mean"] + 0.5 * mean}}
    return jnp.sum(jnp.square(w - batch["x"])) * jnp.mean(batch["weight"]), {MODEL_STATE: new_stats}

  def variables():   # fresh buffers each time: the step donates its input state
    return {"params": {"w": jnp.zeros(3)}, "batch_stats": {"mean": jnp.ones(())}}

  state = create_train_state(variables(), optax.sgd(0.1), np.zeros(2, np.uint32))
  step = make_train_step(loss_fn, optax.sgd(0.1))
  batch = {"x": jnp.full(3, 3.0), "weight": jnp.ones(3)}
  state, metrics = step(state, batch)
  assert MODEL_STATE not in metrics
  assert float(state.params["batch_stats"]["mean"]) == pytest.approx(2.0)     # 0.5 * 1 + 0.5 * 3
  np.testing.assert_allclose(state.params["params"]["w"], 0.6)                # 0 - 0.1 * 2 * (0 - 3)
  accumulated = make_train_step(loss_fn, optax.sgd(0.1), accum_steps=3)(
      create_train_state(variables(), optax.sgd(0.1), np.zeros(2, np.uint32)), batch)[0]
  assert float(accumulated.params["batch_stats"]["mean"]) == pytest.approx(2.0)


def _group(path):
  return "adapter" if path[0].startswith("adapter_") else "domain" if path[0].startswith("domain_") else "shared"


def test_partial_optimizer_updates_only_the_trainable_groups():
  import jax
  import jax.numpy as jnp

  variables = {"params": {"body": {"kernel": jnp.ones(2)}, "domain_tower": {"kernel": jnp.ones(2)},
                          "adapter_0": {"up": jnp.ones(2)}}, "batch_stats": {"mean": jnp.ones(2)}}
  grads = jax.tree.map(jnp.ones_like, variables)
  for trainable, moved in (("all", {"body", "domain_tower", "adapter_0"}), ("domain", {"domain_tower", "adapter_0"}),
                           ("adapters", {"adapter_0"})):
    opt = adapt.partial_optimizer(optax.adam(0.1), variables, trainable, _group)
    updates, _ = opt.update(grads, opt.init(variables), variables)
    for name, update in updates["params"].items():
      assert bool(jnp.any(update["kernel" if "kernel" in update else "up"] != 0)) == (name in moved), (trainable, name)
    if trainable != "all":
      assert not jnp.any(updates["batch_stats"]["mean"])
  with pytest.raises(ConfigError, match="leaves nothing to train"):
    adapt.partial_optimizer(optax.adam(0.1), {"params": {"body": {"k": jnp.ones(1)}}}, "adapters", _group)
  with pytest.raises(ConfigError, match="finetune.trainable"):
    adapt.partial_optimizer(optax.adam(0.1), variables, "heads", _group)


def test_merge_pretrained_keeps_new_parameters_and_checks_shapes():
  fresh = {"params": {"body": {"k": np.zeros(2)}, "adapter_0": {"up": np.zeros(2)}}}
  merged = adapt.merge_pretrained(fresh, {"params": {"body": {"k": np.ones(2)}}}, "run")
  np.testing.assert_array_equal(merged["params"]["body"]["k"], 1)
  np.testing.assert_array_equal(merged["params"]["adapter_0"]["up"], 0)
  with pytest.raises(ConfigError, match="shape"):
    adapt.merge_pretrained(fresh, {"params": {"body": {"k": np.ones(3)}}}, "run")
  with pytest.raises(ConfigError, match="lacks"):
    adapt.merge_pretrained(fresh, {"params": {"other": {"k": np.ones(2)}}}, "run")
  # an embedding table stored with another number of zero padding rows (another device layout) is re-padded
  table = np.arange(6.0).reshape(3, 2)
  padded = np.concatenate([table, np.zeros((1, 2))])
  fresh = {"params": {"items": {"embedding": np.zeros((3, 2))}}}
  np.testing.assert_array_equal(adapt.merge_pretrained(fresh, {"params": {"items": {"embedding": padded}}}, "run")
                                ["params"]["items"]["embedding"], table)
  fresh_padded = {"params": {"items": {"embedding": np.zeros((6, 2))}}}
  np.testing.assert_array_equal(adapt.merge_pretrained(fresh_padded, {"params": {"items": {"embedding": table}}},
                                                       "run")["params"]["items"]["embedding"],
                                np.concatenate([table, np.zeros((3, 2))]))
  with pytest.raises(ConfigError, match="shape"):   # real rows, not padding, beyond this model's table
    adapt.merge_pretrained(fresh, {"params": {"items": {"embedding": np.ones((4, 2))}}}, "run")


def test_ml100k_genre_groups_as_documented(data_file):
  from recjax.data.datasets import load_dataset

  data_file("ml-100k/ml-100k.inter")
  inter = domains.assign_domains(load_dataset("ml-100k", data_file("ml-100k").parent).interactions, "item_genre_group")
  sizes = domains.domain_sizes(inter, domains.domain_names(inter))
  assert sizes == {"action": 36462, "children": 7855, "comedy": 19896, "drama": 18991, "horror": 5244, "scifi": 11552}
  ages = domains.assign_domains(load_dataset("ml-100k", data_file("ml-100k").parent).interactions, "user_age_band")
  assert domains.domain_names(ages) == ("25-34", "35-44", "45+", "<25")
