"""Full and sampled ranking against numpy references; protocols and evaluation targets."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax.data.interactions import Interactions
from recjax.errors import ConfigError
from recjax.eval import metrics as M
from recjax.eval import protocols as P
from recjax.eval import ranking as R

METRICS = ("recall", "mrr", "ndcg", "hit", "precision", "map", "f1")
per_user = jax.jit(M.per_user_metrics, static_argnums=(2, 3))


def ref_hits(scores: np.ndarray, exclude: np.ndarray, positives: np.ndarray, k: int) -> np.ndarray:
  """[U, k]: whether the item at each rank is held out, the unmasked items sorted by (-score, held out,
  id), so a tie counts against the held-out items; a non-finite score ties at the bottom."""
  lowest = np.finfo(np.float32).min
  out = np.zeros((len(scores), k))
  for u, row in enumerate(np.where(np.isfinite(scores), scores, lowest)):
    masked, held_out = {0} | set(exclude[u].tolist()), set(positives[u].tolist()) - {0}
    ranked = sorted((i for i in range(len(row)) if i not in masked), key=lambda i: (-row[i], i in held_out, i))
    out[u, :min(k, len(ranked))] = [i in held_out for i in ranked[:k]]
  return out


def ref_means(scores, positives, exclude, ks, names=METRICS):
  keep = (positives > 0).any(1)
  hits = ref_hits(scores[keep], exclude[keep], positives[keep], max(ks))
  values = per_user(hits, (positives[keep] > 0).sum(1), tuple(ks), tuple(names))
  return {key: float(np.mean(v)) for key, v in values.items()}


def random_problem(seed, users=30, items=40, ties=True):
  """Integer scores (many ties), random distinct positives and exclusions (0-padded)."""
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 4, (users, items)).astype(np.float32) if ties else rng.random((users, items), np.float32)
  positives = np.zeros((users, 6), np.int32)
  exclude = np.zeros((users, 9), np.int32)
  for u in range(users):
    perm = rng.permutation(np.arange(1, items))
    npos = rng.integers(0, 7)
    nex = rng.integers(0, min(10, items - npos))
    positives[u, :npos] = perm[:npos]
    exclude[u, :nex] = perm[npos:npos + nex]
  positives[[2, 5]] = 0                                         # users with nothing held out
  return scores, positives, exclude


def score_rows(params, inputs):
  return params[inputs["user"]]


full_hits = jax.jit(R.full_ranking_hits, static_argnums=3)


@pytest.mark.parametrize("k", [1, 5, 39, 60])
def test_full_ranking_hits_match_reference_with_ties_and_masking(k):
  scores, positives, exclude = random_problem(0)
  exclude[0, 0] = positives[0, 0]                               # an excluded held-out item never hits
  got = np.asarray(full_hits(scores, exclude, positives, k))
  assert got.shape == (len(scores), k)
  np.testing.assert_array_equal(got, ref_hits(scores, exclude, positives, k))


def test_nan_and_minus_inf_scores_rank_last_never_behind_masked_items():
  scores, positives, exclude = random_problem(4, ties=False)
  rng = np.random.default_rng(4)
  scores[rng.random(scores.shape) < 0.2] = np.nan
  scores[rng.random(scores.shape) < 0.2] = -np.inf
  got = np.asarray(full_hits(scores, exclude, positives, 39))
  np.testing.assert_array_equal(got, ref_hits(scores, exclude, positives, 39))
  assert got[:, 30:].sum() > 0                                  # held-out items ranked among the non-finite


def test_a_scorer_without_information_hits_nothing():
  """Equal scores, or all NaN, rank every held-out item after every other item, whatever their ids: a
  lower-id-first order would credit a constant scorer with the held-out items that have low ids."""
  users, items = 6, 30
  positives = np.tile(np.array([[1, 2, 3, 0]], np.int32), (users, 1))   # the lowest ids
  exclude = np.zeros((users, 2), np.int32)
  for scores in (np.zeros((users, items), np.float32), np.full((users, items), np.nan, np.float32)):
    np.testing.assert_array_equal(full_hits(scores, exclude, positives, 10), 0)
    got = R.evaluate_full(lambda p, inputs: p[inputs["user"]], jnp.asarray(scores), {"user": np.arange(users)},
                          positives, exclude, ks=(10, 28), metrics=("recall", "hit"))
    assert got == pytest.approx({"recall@10": 0, "hit@10": 0, "recall@28": 2 / 3, "hit@28": 1})   # ranks 26-28 of 29
  sampled = R.sampled_rank(jnp.zeros((users, 101)))
  np.testing.assert_array_equal(sampled, 100)                   # the sampled ranking: last as well


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_evaluate_full_matches_reference_for_any_chunking(chunk_size):
  scores, positives, exclude = random_problem(1)
  ks = (3, 10)
  got = R.evaluate_full(score_rows, jnp.asarray(scores), {"user": np.arange(len(scores))}, positives, exclude,
                        ks=ks, metrics=METRICS, chunk_size=chunk_size)
  want = ref_means(scores, positives, exclude, ks)
  assert list(got) == [f"{n}@{k}" for k in ks for n in METRICS]
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_budget_chunking_padding_and_no_recompile():
  scores, positives, exclude = random_problem(2, users=33)
  inputs = {"user": np.arange(len(scores))}
  budget = 17 * scores.shape[1] * 8                             # at most 8 users per chunk
  assert 1 <= R.chunk_users(scores.shape[1], budget) <= 8
  whole = R.evaluate_full(score_rows, jnp.asarray(scores), inputs, positives, exclude, chunk_size=10_000)
  step = R.make_full_ranking_eval(score_rows)
  before = step._cache_size()
  chunked = R.evaluate_full(score_rows, jnp.asarray(scores), inputs, positives, exclude, budget_bytes=budget)
  assert step._cache_size() == before + 1                       # last chunk padded: one shape only
  for key in whole:
    assert chunked[key] == whole[key]                           # per-user rows, summed exactly


def test_csr_exclusion_equals_padded_and_k_beyond_items():
  scores, positives, exclude = random_problem(3, items=8)
  rows = [sorted(set(r[r > 0].tolist())) for r in exclude]
  offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
  csr = (np.array([i for r in rows for i in r], np.int32), offsets)
  inputs = {"user": np.arange(len(scores))}
  ks = (5, 10)                                                  # 10 > 7 real items
  padded = R.evaluate_full(score_rows, jnp.asarray(scores), inputs, positives, exclude, ks=ks, chunk_size=4)
  as_csr = R.evaluate_full(score_rows, jnp.asarray(scores), inputs, positives, csr, ks=ks, chunk_size=4)
  want = ref_means(scores, positives, exclude, ks, R.DEFAULT_METRICS)
  for key in want:
    assert padded[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7)
    assert as_csr[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7)
  # A list far longer than the items: the ranks past the last item are empty, not ranked (the tie counts
  # over a [U, k, k] array of ranks would need 10^12 entries a user here).
  huge = R.evaluate_full(score_rows, jnp.asarray(scores), inputs, positives, exclude, ks=(10, 10**6),
                         metrics=("recall", "precision", "ndcg"))
  assert huge["recall@1000000"] == pytest.approx(huge["recall@10"])
  assert huge["ndcg@1000000"] == pytest.approx(huge["ndcg@10"])
  assert huge["precision@1000000"] == pytest.approx(huge["precision@10"] * 10 / 10**6)


# ----------------------------------------------------------------------------- sampled protocol

def test_sample_negatives_avoid_user_items_and_are_distinct():
  rng = np.random.default_rng(0)
  num_items, users = 60, 25
  exclude = np.zeros((users, 30), np.int32)
  for u in range(users):
    exclude[u, :u + 5] = rng.choice(np.arange(1, num_items), u + 5, replace=False)
  targets = exclude[:, 0].copy()
  neg = R.sample_negatives(targets, exclude, num_items, 20, seed=1)
  assert neg.shape == (users, 20)
  for u in range(users):
    assert len(set(neg[u].tolist())) == 20
    assert not set(neg[u].tolist()) & (set(exclude[u].tolist()) | {0, int(targets[u])})
  np.testing.assert_array_equal(neg, R.sample_negatives(targets, exclude, num_items, 20, seed=1))
  # almost every item taken: the exact fallback finishes the rows rejection cannot
  full = np.tile(np.arange(1, num_items - 3), (2, 1))
  tight = R.sample_negatives(np.array([1, 2]), full, num_items, 3, seed=0, max_rounds=0)
  np.testing.assert_array_equal(np.sort(tight, 1), [[57, 58, 59]] * 2)
  with pytest.raises(ValueError, match="only 3 items"):
    R.sample_negatives(np.array([1, 2]), full, num_items, 4)


def test_popularity_sampling_follows_counts():
  counts = np.array([0, 1, 2, 4, 8, 16, 0, 32], np.float64)
  users, n = 4000, 2
  neg = R.sample_negatives(np.full(users, 7), np.zeros((users, 1), np.int32), len(counts), n, counts, seed=3)
  assert not np.isin(neg, [0, 6, 7]).any()
  # first draw of each row follows counts restricted to items 1..5 (item 7 is the target)
  freq = np.bincount(neg[:, 0], minlength=len(counts))[1:6] / users
  want = counts[1:6] / counts[1:6].sum()
  assert (np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / users)).all(), (freq, want)


def test_sampled_metrics_labels_reference_and_perfect_scorer():
  rng = np.random.default_rng(5)
  users, num_items = 20, 50
  scores = rng.integers(0, 5, (users, num_items)).astype(np.float32)          # ties on purpose
  targets = rng.integers(1, num_items, users)
  targets[3] = 0                                                              # dropped
  exclude = rng.integers(0, num_items, (users, 4)).astype(np.int32)
  inputs = {"user": np.arange(users)}
  ks = (1, 5, 10)
  got = R.evaluate_sampled(R.gather_scorer(score_rows), jnp.asarray(scores), inputs, targets, exclude,
                           num_negatives=15, num_items=num_items, seed=2, ks=ks, chunk_size=6)
  assert all(key.startswith("sampled_") for key in got) and "sampled_ndcg@10" in got
  keep = targets > 0
  neg = R.sample_negatives(targets[keep], exclude[keep], num_items, 15, seed=2)
  rank = np.array([(scores[keep][u, neg[u]] >= scores[keep][u, t]).sum()          # pessimistic ties
                   for u, t in enumerate(targets[keep])])
  for k in ks:
    assert got[f"sampled_hit@{k}"] == pytest.approx(np.mean(rank < k))
    assert got[f"sampled_mrr@{k}"] == pytest.approx(np.mean(np.where(rank < k, 1 / (rank + 1), 0)), rel=1e-6)
    assert got[f"sampled_ndcg@{k}"] == pytest.approx(np.mean(np.where(rank < k, 1 / np.log2(rank + 2), 0)), rel=1e-6)
  perfect = np.zeros((users, num_items), np.float32)
  perfect[np.arange(users), targets] = 1.0
  counts = np.arange(num_items, dtype=np.float64)
  best = R.evaluate_sampled(R.gather_scorer(score_rows), jnp.asarray(perfect), inputs, targets, exclude,
                            num_negatives=15, distribution="popularity", item_counts=counts, ks=(1,))
  assert best["sampled_hit@1"] == 1.0 and best["sampled_ndcg@1"] == 1.0
  constant = R.evaluate_sampled(R.gather_scorer(score_rows), jnp.zeros((users, num_items)), inputs, targets,
                                exclude, num_negatives=15, num_items=num_items, ks=(10,))
  assert constant["sampled_hit@10"] == 0.0                       # ties go against the target
  np.testing.assert_array_equal(R.sampled_rank(jnp.array([[np.nan, 0.0, 1.0], [1.0, np.nan, 0.0]])), [2, 1])


# ----------------------------------------------------------------------------- protocols

def make_inter(pairs, num_users=5, num_items=8):
  user, item = np.array(pairs, np.int32).T
  vocab = lambda n: np.array(["[PAD]"] + [str(i) for i in range(1, n)], object)
  return Interactions(user=user, item=item, user_vocab=vocab(num_users), item_vocab=vocab(num_items))


def test_eval_targets_valid_and_test():
  split = types.SimpleNamespace(
      train=make_inter([(1, 1), (1, 2), (2, 3), (3, 4), (3, 4)]),
      valid=make_inter([(1, 5), (3, 6), (3, 6)]),
      test=make_inter([(1, 7), (2, 1), (4, 2), (2, 6)]))
  users, pos, ex, hist = P.eval_targets(split, "valid", mask_history=True)
  np.testing.assert_array_equal(users, [1, 3])
  np.testing.assert_array_equal(pos, [[5], [6]])                 # duplicates collapse
  np.testing.assert_array_equal(ex, [[1, 2], [4, 0]])
  assert len(hist) == 5
  users, pos, ex, hist = P.eval_targets(split, "test", mask_history=True)
  np.testing.assert_array_equal(users, [1, 2, 4])
  np.testing.assert_array_equal(pos, [[7, 0], [1, 6], [2, 0]])
  np.testing.assert_array_equal(ex, [[1, 2, 5], [3, 0, 0], [0, 0, 0]])
  assert len(hist) == 8
  items, offsets = P.eval_targets(split, "test", mask_history=True, csr=True)[2]
  np.testing.assert_array_equal(items, [1, 2, 5, 3])
  np.testing.assert_array_equal(offsets, [0, 3, 4, 4])
  _, _, ex, _ = P.eval_targets(split, "test", mask_history=False)
  np.testing.assert_array_equal(ex, np.zeros((3, 1)))
  with pytest.raises(ConfigError):
    P.eval_targets(split, "train", mask_history=True)


def test_repeated_item_among_positives_is_not_masked():
  # User 1 consumes item 3 again at test time: RecBole masks used - positives, so 3 stays rankable and
  # a scorer that puts 3 and 4 on top is perfect (masking 3 capped recall@2 at 0.5).
  split = types.SimpleNamespace(train=make_inter([(1, 1), (1, 2), (1, 3)]), valid=make_inter([(1, 5)]),
                                test=make_inter([(1, 3), (1, 4)]))
  users, pos, ex, _ = P.eval_targets(split, "test", mask_history=True)
  np.testing.assert_array_equal(pos, [[3, 4]])
  np.testing.assert_array_equal(ex, [[1, 2, 5]])
  np.testing.assert_array_equal(P.eval_targets(split, "test", mask_history=True, csr=True)[2][0], [1, 2, 5])
  scores = np.zeros((5, 8), np.float32)
  scores[1, [3, 4]] = [2.0, 1.0]
  got = R.evaluate_full(lambda p, x: p[x["user"]], jnp.asarray(scores), {"user": users}, pos, ex,
                        ks=(2,), metrics=("recall", "ndcg", "precision"), num_items=8)
  assert got == {"recall@2": 1.0, "ndcg@2": 1.0, "precision@2": 1.0}


def test_presets_and_validation():
  general, seq = P.get_protocol("recbole-general"), P.get_protocol("recbole-sequential")
  assert (general.split, general.ratios, general.mask_history, general.valid_metric) == (
      "random_ratio", (0.8, 0.1, 0.1), True, "mrr@10")
  assert (seq.split, seq.mask_history, seq.max_len) == ("leave_one_out", False, 50)
  assert P.get_protocol("lightgcn").valid_metric == "ndcg@20"
  sampled = P.get_protocol("bert4rec-sampled")
  assert (sampled.sampled, sampled.valid_metric) == (100, "sampled_ndcg@10")   # selects on the paper's ranking
  with pytest.raises(ConfigError, match="recbole-general"):
    P.get_protocol("recbole")
  with pytest.raises(ConfigError):
    P.Protocol("x", split="leave_one_out", valid_metric="ndcg@20")  # k not computed
  with pytest.raises(ConfigError, match="sampled_ndcg@10"):   # no sampled ranking to select on
    P.Protocol("x", split="leave_one_out", valid_metric="sampled_ndcg@10")
  with pytest.raises(ConfigError, match="sampled_ndcg@20"):
    P.Protocol("x", split="leave_one_out", valid_metric="sampled_ndcg@20", sampled=100)
  with pytest.raises(ConfigError):
    P.Protocol("x", split="kfold")


def test_a_runs_sampled_evaluation_draws_its_negatives_once(monkeypatch):
  """The sampled protocol's negatives depend only on the seed: a run draws each evaluation set's once, and
  its metrics equal a direct `evaluate_sampled` that draws them itself."""
  from recjax import experiment
  from recjax.config import apply_overrides, default_config

  config = apply_overrides(default_config("bpr"), ["model.dim=8", "protocol='bert4rec-sampled'"])
  config.update(dataset="synthetic")
  exp = experiment.build(config)
  params = experiment.init_params(exp, jax.random.PRNGKey(0))
  draws = []
  draw = R.draw_negatives
  monkeypatch.setattr(R, "draw_negatives", lambda *a, **k: draws.append(1) or draw(*a, **k))
  evaluate = experiment.make_evaluator(exp, "valid")
  first, again = evaluate(params), evaluate(params)
  assert first == again and len(draws) == 1
  assert exp.valid_metric == "sampled_ndcg@10" and exp.valid_metric in first   # what early stopping reads
  data = exp.eval_sets["valid"]
  split = exp.split
  counts = np.bincount(np.concatenate([split.train.item, split.valid.item, split.test.item]),
                       minlength=split.train.num_items)
  direct = R.evaluate_sampled(exp.item_score_fn, params, data["inputs"], data["positives"][:, 0],
                              data["interacted"], num_negatives=100, distribution="popularity", ks=exp.protocol.ks,
                              metrics=exp.protocol.metrics, seed=config["seed"], item_counts=counts)
  assert direct == pytest.approx({k: v for k, v in first.items() if k.startswith("sampled_")}, rel=1e-6)
  assert len(draws) == 2


def test_sampled_protocol_refuses_several_held_out_items_per_user(monkeypatch):
  """The sampled protocol ranks one target against its negatives; with a ratio split a user's other held-out
  items could be drawn as negatives, so such a protocol is refused by name rather than half evaluated."""
  import dataclasses

  from recjax import experiment
  from recjax.config import apply_overrides, default_config

  ratio_sampled = dataclasses.replace(P.get_protocol("bert4rec-sampled"), name="ratio-sampled", split="random_ratio",
                                      ratios=(0.8, 0.1, 0.1))
  monkeypatch.setitem(P.PRESETS, "ratio-sampled", ratio_sampled)
  config = apply_overrides(default_config("pop"), ["protocol='ratio-sampled'"])
  config.update(dataset="synthetic")
  exp = experiment.build(config)
  with pytest.raises(ConfigError, match="'ratio-sampled'.*one held-out item per user.*'valid'"):
    experiment.make_evaluator(exp, "valid")


def test_sampled_negatives_are_never_history_items_nor_unseen_items():
  """As in the BERT4Rec and SASRec authors' evaluation: a user's negatives are never items of the history
  the model reads (train at valid time, train + valid at test time), though full ranking does not mask
  them under `bert4rec-sampled`; popularity counts every part of the split, so an item seen only in
  valid or test can be drawn, and one seen nowhere cannot."""
  from recjax import experiment
  from recjax.config import apply_overrides, default_config

  config = apply_overrides(default_config("pop"), ["protocol='bert4rec-sampled'"])
  config.update(dataset="synthetic")
  exp = experiment.build(config)
  assert not exp.protocol.mask_history
  split = exp.split
  counts = experiment.sampling_counts(split)
  np.testing.assert_array_equal(counts, np.bincount(np.concatenate([split.train.item, split.valid.item,
                                                                     split.test.item]), minlength=len(counts)))
  drawn = []
  draw = R.draw_negatives
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(R, "draw_negatives", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    for phase in ("valid", "test"):
      experiment.make_evaluator(exp, phase)(experiment.init_params(exp, jax.random.PRNGKey(0)))
  for phase, negatives in zip(("valid", "test"), drawn):
    history = split.train if phase == "valid" else split.train.concat(split.valid)
    users = np.unique(getattr(split, phase).user)
    seen = {(u, i) for u, i in zip(history.user.tolist(), history.item.tolist())}
    hits = sum((u, i) in seen for u, row in zip(users.tolist(), negatives.tolist()) for i in row)
    assert hits == 0, f"{phase}: {hits} negatives are items of the user's history"
    assert (counts[negatives] > 0).all()


def test_bert4rec_code_protocol_trains_on_the_valid_item_and_evaluates_test():
  """`bert4rec-code`: no valid part, so the run evaluates (and selects on) test; the test input ends with
  the item that leave_one_out would have held out for validation, now a training row."""
  from recjax import experiment
  from recjax.config import apply_overrides, default_config
  from recjax.data.splits import leave_one_out

  config = apply_overrides(default_config("pop"), ["protocol='bert4rec-code'"])
  config.update(dataset="synthetic")
  exp = experiment.build(config)
  assert exp.split.name == "leave_last_out" and len(exp.split.valid) == 0
  assert exp.eval_sets["valid"] is exp.eval_sets["test"]
  loo = leave_one_out(experiment.preprocess_interactions(experiment.load_dataset("synthetic").interactions,
                                                         config["preprocess"]))
  assert len(exp.split.train) == len(loo.train) + len(loo.valid)
  np.testing.assert_array_equal(exp.split.test.item, loo.test.item)
  test = exp.eval_sets["test"]
  held_for_valid = dict(zip(loo.valid.user.tolist(), loo.valid.item.tolist()))
  last_input = {int(u): int(row[-1]) for u, row in zip(test["inputs"]["user"], test["inputs"]["seq"])}
  assert len(last_input) == len(exp.split.test) and last_input == {u: held_for_valid[u] for u in last_input}
  metrics = experiment.make_evaluator(exp, "valid")(experiment.init_params(exp, jax.random.PRNGKey(0)))
  assert "sampled_ndcg@10" in metrics
