"""Cold start: held-out items, training that never sees them, evaluation over them alone, and text-aware
models that rank them (ml-100k with MiniLM) where ID-only models and popularity cannot."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax import experiment, models, tasks
from recjax.config import apply_overrides, build_config
from recjax.data import samplers, splits, synthetic
from recjax.errors import ConfigError, DataError
from recjax.eval import protocols


@pytest.fixture(scope="module")
def inter():
  return synthetic.make_synthetic(num_users=60, num_items=40, mean_length=12, seed=0)


def test_hold_out_items_partitions_rows_by_item(inter):
  warm, cold = splits.hold_out_items(inter, 0.25, seed=1)
  cold_items = splits.Split(warm, warm, warm, "x", cold).cold_items
  present = np.unique(inter.item)
  assert len(cold_items) == round(0.25 * len(present)) and np.all(np.isin(cold_items, present))
  assert len(warm) + len(cold) == len(inter)
  assert np.all(np.isin(cold.item, cold_items)) and not np.any(np.isin(warm.item, cold_items))
  np.testing.assert_array_equal(np.unique(splits.hold_out_items(inter, 0.25, seed=1)[1].item), cold_items)   # seeded
  assert not np.array_equal(np.unique(splits.hold_out_items(inter, 0.25, seed=2)[1].item), cold_items)
  with pytest.raises(DataError, match="cold items"):
    splits.hold_out_items(inter, 0.999, seed=1)


def test_negative_sampler_never_draws_excluded_items(inter):
  excluded = np.arange(1, inter.num_items, 2)
  for distribution in samplers.DISTRIBUTIONS:
    sampler = samplers.NegativeSampler(inter, distribution, exclude_items=excluded)
    neg = sampler.sample(np.random.default_rng(0), np.repeat(np.unique(inter.user), 50), 4)
    assert not np.any(np.isin(neg, excluded)) and np.all(neg > 0)
  q = samplers.negative_probs(inter, "uniform", excluded)
  assert np.isclose(q.sum(), 1) and not np.any(q[excluded]) and np.allclose(q[2::2], q[2])


def test_full_softmax_leaves_masked_items_out():
  model = models.create_model("sasrec", num_users=3, num_items=6, max_len=3, dim=8, num_heads=2, ffn_dim=8,
                              dropout=0.0, attn_dropout=0.0)
  params = models.init_params(model, jax.random.PRNGKey(0))
  batch = {"seq": jnp.array([[0, 1, 2]]), "pos": jnp.array([[1, 2, 3]]), "neg": jnp.zeros((1, 3, 1), jnp.int32),
           "user": jnp.array([1]), "weight": jnp.array([[0.0, 1.0, 1.0]])}
  mask = np.array([True, True, True, True, False, False])
  masked = tasks.create_loss_fn("sequential", "ce", model=model, item_mask=mask)
  loss, grads = jax.jit(jax.value_and_grad(lambda p: masked(p, batch, jax.random.PRNGKey(1))[0]))(params)
  table = np.asarray(grads["params"]["item_embedding"]["embedding"])
  assert not np.any(table[4:]) and np.any(table[1:4])
  # equal to a softmax over the unmasked items only (items 1..3; padding is never a candidate)
  represent = jax.jit(lambda p: model.apply(p, batch["seq"], method=lambda m, s: (m.sequence_repr(s), m.item_repr())))
  h, items = represent(params)
  logits = np.asarray(h @ items.T)[0, 1:, 1:4]
  expected = np.mean([np.log(np.exp(row).sum()) - row[t - 1] for row, t in zip(logits, (2, 3))])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_cold_targets_rank_held_out_items_only(inter):
  warm, cold = splits.hold_out_items(inter, 0.25, seed=1)
  split = splits.leave_one_out(warm)
  split = splits.Split(split.train, split.valid, split.test, "loo+cold", cold)
  cold_items = split.cold_items
  users, positives, exclude, history = protocols.cold_targets(split)
  np.testing.assert_array_equal(users, np.unique(cold.user))
  assert np.all(np.isin(positives[positives > 0], cold_items))
  candidates = np.setdiff1d(np.arange(1, inter.num_items), exclude[0])
  np.testing.assert_array_equal(candidates, cold_items)
  assert len(history) == len(warm)


def test_cold_start_protocol_end_to_end_on_synthetic(tmp_path):
  config = apply_overrides(build_config("sasrec"), {"protocol": "cold-start", "epochs": 1, "batch_size": 64,
                                                    "model": {"dim": 16, "num_blocks": 1}})
  exp = experiment.build(config)
  assert exp.split.cold is not None and "cold" in exp.eval_sets
  for part in (exp.split.train, exp.split.valid, exp.split.test):
    assert not np.any(np.isin(part.item, exp.split.cold_items))
  batch = next(experiment.make_sampler(exp).epoch(0))
  assert not np.any(np.isin(batch["neg"][batch["neg"] > 0], exp.split.cold_items))
  metrics = experiment.train(config, tmp_path / "run", log=lambda _: None)
  assert set(metrics["cold"]) == set(metrics["test"])
  assert json.loads((tmp_path / "run" / "metrics.json").read_text())["cold"] == metrics["cold"]


def test_gbce_counts_only_the_items_a_negative_can_be(monkeypatch):
  config = apply_overrides(build_config("sasrec"), {"protocol": "cold-start", "loss": "gbce", "num_negatives": 4})
  exp = experiment.build(config)
  seen = []
  monkeypatch.setattr(experiment.losses, "gbce_beta", lambda k, items, t: seen.append(items) or 0.5)
  experiment.make_loss_fn(exp)
  assert seen == [exp.split.train.num_items - 1 - len(exp.split.cold_items)]   # real items, held-out ones not


def test_pop_orders_unseen_items_at_random_when_asked():
  counts = np.array([0, 5, 0, 0, 2, 0, 0, 5])
  tied = np.asarray(models.pop_params(counts)["params"]["log_count"])
  assert len(np.unique(tied[[2, 3, 5, 6]])) == 1
  shuffled = np.asarray(models.pop_params(counts, "random", seed=3)["params"]["log_count"])
  unseen = shuffled[[2, 3, 5, 6]]
  assert len(np.unique(unseen)) == 4 and unseen.max() < shuffled[4] < shuffled[1] == shuffled[7]
  np.testing.assert_array_equal(shuffled, models.pop_params(counts, "random", seed=3)["params"]["log_count"])
  with pytest.raises(ValueError, match="unseen_order"):
    models.pop_params(counts, "alphabetical")
  many = np.r_[np.zeros(9_000_000), 1]   # past what float32 keeps apart, said rather than ranked above seen items
  with pytest.raises(ValueError, match="cannot get distinct float32 scores"):
    models.pop_params(many, "random")


def test_text_options_are_checked():
  with pytest.raises(ConfigError, match="does not read item text"):
    experiment.build(apply_overrides(build_config("lightgcn"), {"text": {"model": "minilm"}}))
  with pytest.raises(ConfigError, match="cold_items"):
    protocols.Protocol("bad", split="given", cold_items=0.2)


def test_text_aware_models_rank_cold_items_on_ml100k(data_dir, minilm_dir, tmp_path):
  """BPR-MF with text-aware items ranks held-out items far better than ID-only BPR-MF and popularity
  (held-out items in a random order), at the same small budget."""
  def run(name, **overrides):
    config = build_config(name, dataset="ml-100k")
    config = apply_overrides(config, {"protocol": "cold-start", "data_dir": str(data_dir), "epochs": 6,
                                      "patience": 100, **overrides})
    return experiment.train(config, log=lambda _: None)["cold"]["ndcg@10"]

  text = run("bpr", text={"model": "minilm", "cache_dir": str(tmp_path)})
  ids = run("bpr")
  pop = np.mean([run("pop", model={"unseen_order": "random", "unseen_seed": s}) for s in range(5)])
  assert text > 1.5 * ids and text > 1.5 * pop, (text, ids, pop)
