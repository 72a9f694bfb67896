from __future__ import annotations

import time

import numpy as np

from recjax.data.interactions import user_sequences
from recjax.data.splits import leave_one_out
from recjax.data.synthetic import make_synthetic, planted_structure


def test_defaults_are_fast_and_well_formed():
  start = time.perf_counter()
  inter = make_synthetic()
  assert time.perf_counter() - start < 2.0                       # < 1 s unloaded; slack for shared CPUs
  assert inter.num_users == 1001 and inter.num_items == 501 and inter.name == "synthetic"
  assert inter.user.dtype == np.int32 and inter.item.dtype == np.int32
  assert inter.timestamp.dtype == np.float64 and inter.rating.dtype == np.float32
  assert 35 < len(inter) / 1000 < 45
  assert inter.user.min() >= 1 and inter.item.min() >= 1 and inter.item.max() <= 500
  assert set(np.unique(inter.rating).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
  assert (np.diff(inter.timestamp) >= 0).all()                   # rows in time order
  assert inter.user_vocab[7] == "7" and inter.item_vocab[0] == "[PAD]"
  keys = inter.user.astype(np.int64) * inter.num_items + inter.item
  assert len(np.unique(keys)) == len(inter)                      # no repeats within a user
  counts = np.bincount(inter.item, minlength=inter.num_items)[1:]
  assert np.sort(counts)[-50:].sum() > 0.2 * len(inter)          # popularity skew: top 10% > twice its share


def test_seeded():
  a, b, c = make_synthetic(200, 100, seed=4), make_synthetic(200, 100, seed=4), make_synthetic(200, 100, seed=5)
  np.testing.assert_array_equal(a.item, b.item)
  np.testing.assert_array_equal(a.timestamp, b.timestamp)
  assert len(a) != len(c) or not np.array_equal(a.item, c.item)


def test_transitions_are_planted():
  truth = planted_structure(300, 200, seed=0)
  for weight, low, high in ((0.5, 0.4, 0.7), (0.0, 0.0, 0.1)):
    items, offsets = user_sequences(make_synthetic(300, 200, markov_weight=weight))
    same_user = np.ones(len(items) - 1, bool)
    cross = offsets[1:-1]
    same_user[cross[(cross > 0) & (cross < len(items))] - 1] = False   # pairs that cross users
    prev, nxt = items[:-1][same_user], items[1:][same_user]
    share = (truth.successors[prev] == nxt[:, None]).any(1).mean()
    assert low < share < high, (weight, share)


def ndcg_at_10(scores, seen, target):
  """Mean NDCG@10 of one target per row; seen items excluded."""
  scores = np.where(seen, -np.inf, scores)
  rank = (scores > scores[np.arange(len(target)), target][:, None]).sum(1)
  return float(np.where(rank < 10, 1.0 / np.log2(rank + 2), 0.0).mean())


def test_oracle_beats_popularity_by_a_wide_margin():
  inter, truth = make_synthetic(), planted_structure()
  split = leave_one_out(inter)
  history = split.train.concat(split.valid)
  items, offsets = user_sequences(history)
  users, target = split.test.user.astype(np.int64), split.test.item
  seen = np.zeros((len(users), inter.num_items), bool)
  rows = np.repeat(np.arange(len(users)), offsets[users + 1] - offsets[users])
  seen[rows, np.concatenate([items[offsets[u]:offsets[u + 1]] for u in users])] = True
  seen[:, 0] = True
  last = items[offsets[users + 1] - 1]
  pop = np.bincount(history.item, minlength=inter.num_items).astype(float)
  pop_ndcg = ndcg_at_10(np.broadcast_to(pop, seen.shape), seen, target)
  oracle_ndcg = ndcg_at_10(truth.next_probs(truth.affinity(users), last, seen, 0.5), seen, target)
  affinity_ndcg = ndcg_at_10(truth.affinity(users), seen, target)
  assert oracle_ndcg > 5 * pop_ndcg and oracle_ndcg > 0.3, (oracle_ndcg, pop_ndcg)
  assert affinity_ndcg > 2.5 * pop_ndcg, (affinity_ndcg, pop_ndcg)
  # a fitted (not oracle) factor model already beats popularity: PureSVD, rank 8
  matrix = np.zeros((inter.num_users, inter.num_items))
  matrix[history.user, history.item] = 1.0
  basis = np.random.default_rng(0).normal(size=(inter.num_items, 8))
  for _ in range(20):                                            # subspace iteration: top right singular vectors
    basis = np.linalg.qr(matrix.T @ (matrix @ basis))[0]
  basis = basis.T                                                # [8, N]
  svd_ndcg = ndcg_at_10(matrix[users] @ basis.T @ basis, seen, target)
  assert svd_ndcg > 1.4 * pop_ndcg, (svd_ndcg, pop_ndcg)
