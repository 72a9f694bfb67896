from __future__ import annotations

import numpy as np
import pytest

from recjax.data.interactions import Interactions, from_columns, user_sequences
from recjax.data.samplers import (
  NegativeSampler,
  PairSampler,
  SequenceSampler,
  csr_to_padded,
  eval_inputs,
  negative_probs,
  pad_batch,
  prefetch_to_device,
)
from recjax.errors import DataError


def random_inter(num_users=300, num_items=80, per_user=30, seed=0):
  """Dense random data: ~40% of each user's items are positives, so rejection really works."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, per_user + 1, num_users)
  users = np.repeat(np.arange(num_users), lengths)
  items = np.concatenate([rng.choice(num_items, k, replace=False) for k in lengths])
  time = rng.integers(0, 1000, len(users))
  return from_columns(users, items, timestamp=time, name="random")


def tiny():
  # u1: 5 items, u2: 2 items, u3: 1 item (tied times in u1 resolved by file order)
  return from_columns(["u1", "u2", "u1", "u1", "u3", "u2", "u1", "u1"],
                      ["a", "b", "c", "d", "e", "f", "g", "h"],
                      timestamp=[1, 2, 2, 5, 1, 3, 2, 9])


def collect(sampler, epoch=0):
  batches = list(sampler.epoch(epoch))
  assert len(batches) == sampler.num_batches
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def naive_sequences(inter):
  order = sorted(range(len(inter)), key=lambda r: (inter.user[r], inter.timestamp[r], r))
  seqs = {}
  for r in order:
    seqs.setdefault(int(inter.user[r]), []).append(int(inter.item[r]))
  return seqs


def left_pad(values, width):
  values = list(values)[-width:] if width else []
  return [0] * (width - len(values)) + values


def test_pair_sampler_shapes_padding_and_coverage():
  inter = random_inter()
  sampler = PairSampler(inter, batch_size=128, num_negatives=3, seed=1)
  batches = list(sampler.epoch(0))
  assert sampler.num_batches == -(-len(inter) // 128) == len(batches)
  for b in batches:
    assert b["user"].shape == (128,) and b["user"].dtype == np.int32
    assert b["pos"].shape == (128,) and b["pos"].dtype == np.int32
    assert b["neg"].shape == (128, 3) and b["neg"].dtype == np.int32
    assert b["weight"].shape == (128,) and b["weight"].dtype == np.float32
  last, pad = batches[-1], sampler.num_batches * 128 - len(inter)
  assert pad > 0 and (last["weight"][-pad:] == 0).all() and (last["weight"][:-pad] == 1).all()
  assert (last["user"][-pad:] == 0).all() and (last["neg"][-pad:] == 0).all()
  got = collect(sampler)
  real = got["weight"] > 0
  assert sorted(zip(got["user"][real], got["pos"][real])) == sorted(zip(inter.user, inter.item))


def test_pair_sampler_determinism():
  inter = random_inter()
  a, b = PairSampler(inter, 64, seed=5), PairSampler(inter, 64, seed=5)
  for x, y in zip(a.epoch(2), b.epoch(2)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(collect(a, 0)["user"], collect(a, 1)["user"])
  assert not np.array_equal(collect(a, 0)["user"], collect(PairSampler(inter, 64, seed=6), 0)["user"])


def test_pair_sampler_draws_users_uniformly_when_asked():
  # user 1: 200 items, users 2..10: 2 items each (218 rows): by rows user 1 is 92% of the pairs
  users = np.concatenate([np.ones(200, int), np.repeat(np.arange(2, 11), 2)])
  items = np.concatenate([np.arange(1, 201), np.tile([201, 202], 9)])
  inter = from_columns(users, items, timestamp=np.zeros(len(users), int))
  sampler = PairSampler(inter, 64, num_negatives=1, seed=3, sampling="users")
  got = [collect(sampler, e) for e in range(40)]
  real = np.concatenate([g["weight"] for g in got]) > 0
  user, pos = np.concatenate([g["user"] for g in got])[real], np.concatenate([g["pos"] for g in got])[real]
  assert len(user) == 40 * len(inter) and sampler.num_batches == PairSampler(inter, 64).num_batches
  assert set(zip(user.tolist(), pos.tolist())) <= set(zip(inter.user.tolist(), inter.item.tolist()))
  share = np.bincount(user, minlength=inter.num_users)[1:] / len(user)      # 10 users, 8,720 draws
  np.testing.assert_allclose(share, 0.1, atol=0.015)                         # 5 sd of a binomial share
  heavy = pos[user == user.min()]                                             # user 1's items: uniform too
  counts = np.bincount(heavy, minlength=inter.num_items)[np.unique(inter.item[inter.user == user.min()])]
  expected = len(heavy) / 200
  assert np.sum((counts - expected) ** 2 / expected) < 199 + 5 * np.sqrt(2 * 199)   # chi-square, 199 df
  again = collect(PairSampler(inter, 64, num_negatives=1, seed=3, sampling="users"), 5)
  np.testing.assert_array_equal(again["pos"], got[5]["pos"])
  with pytest.raises(ValueError, match="pair sampling 'items'"):
    PairSampler(inter, 64, sampling="items")


def test_negatives_never_positive():
  inter = random_inter(num_users=2000, num_items=60, per_user=40)
  positives = set(zip(inter.user.tolist(), inter.item.tolist()))
  got = collect(PairSampler(inter, 4096, num_negatives=4))
  real = got["weight"] > 0
  users, negs = np.repeat(got["user"][real], 4), got["neg"][real].ravel()
  assert negs.min() >= 1 and negs.max() < inter.num_items
  assert not any((u, n) in positives for u, n in zip(users.tolist(), negs.tolist()))
  # max_len covers whole histories, so seq + pos of a row are all of its user's training items
  seq = collect(SequenceSampler(inter, max_len=40, batch_size=512, num_negatives=2))
  for row_items, ns in zip(np.concatenate([seq["seq"], seq["pos"]], 1)[:500], seq["neg"][:500]):
    ns = ns[(ns > 0).all(1)]
    assert len(ns) and not set(row_items.tolist()) & set(ns.ravel().tolist())
  prefix = SequenceSampler(inter, max_len=5, batch_size=512, num_negatives=3, mode="prefix")
  rows = prefix.rows(np.arange(prefix.num_rows), np.random.default_rng(0))
  users = np.repeat(prefix.row_user, 3)
  assert not any((u, n) in positives for u, n in zip(users.tolist(), rows["neg"].ravel().tolist()))


def test_popularity_negatives_follow_counts_and_skip_positives():
  # items 1..3 popular (counts 400, 200, 100 from other users), item 4 rare; user "x" holds item 1
  users = ["x"] + [f"u{k}" for k in range(699)] + ["r"]
  items = ["i1"] + ["i1"] * 399 + ["i2"] * 200 + ["i3"] * 100 + ["i4"]
  inter = from_columns(users, items)
  q = negative_probs(inter, "popularity")
  assert q[0] == 0 and np.isclose(q.sum(), 1) and np.allclose(q[1:], np.array([400, 200, 100, 1]) / 701)
  assert np.allclose(negative_probs(inter, "uniform")[1:], 0.25)
  sampler = NegativeSampler(inter, "popularity")
  rng = np.random.default_rng(0)
  other = sampler.sample(rng, np.full(20000, inter.user_id("r")), 1).ravel()
  freq = np.bincount(other, minlength=5)[1:4] / 20000            # "r" holds i4: drawn from i1..i3 only
  assert np.allclose(freq, np.array([400, 200, 100]) / 700, atol=0.015)
  x = sampler.sample(rng, np.full(5000, inter.user_id("x")), 2)
  assert not (x == inter.item_id("i1")).any()                    # x's own item is rejected
  with pytest.raises(ValueError, match="distribution"):
    negative_probs(inter, "zipf")


def test_popularity_negatives_are_never_items_the_proposal_cannot_give():
  # "x" holds the popular i1..i3, and "z" is in the vocabulary with no training row (q = 0, log q = -inf):
  # x's draws are rejected until the uniform fallback, which must still draw only where q > 0, i.e. i4.
  users = ["x"] * 3 + [f"u{k}" for k in range(999)] + ["w", "w"]
  items = ["i1", "i2", "i3"] + ["i1"] * 500 + ["i2"] * 300 + ["i3"] * 199 + ["i4", "z"]
  inter = from_columns(users, items)
  train = inter.subset(inter.item != inter.item_id("z"))
  assert negative_probs(train, "popularity")[inter.item_id("z")] == 0
  neg = NegativeSampler(train, "popularity").sample(np.random.default_rng(0), np.full(200, inter.user_id("x")), 2)
  assert (neg == inter.item_id("i4")).all()
  w_only = train.subset(train.user == inter.user_id("w"))    # w holds i4, the only item with q > 0 there
  with pytest.raises(DataError, match="all 1 items a negative can be"):
    NegativeSampler(w_only, "popularity")


def test_sequence_batches_carry_the_user():
  inter = random_inter(num_users=40, per_user=12)
  items, offsets = user_sequences(inter)
  for mode in ("sequence", "prefix"):
    got = collect(SequenceSampler(inter, max_len=6, batch_size=16, mode=mode))
    real = got["weight"].reshape(len(got["user"]), -1).sum(1) > 0
    for user, seq in zip(got["user"][real], got["seq"][real]):
      assert set(seq[seq > 0].tolist()) <= set(items[offsets[user]:offsets[user + 1]].tolist())


def test_almost_full_user_and_full_user_guard():
  # user "x" has every item but one: every negative must be that item
  items = [f"i{k}" for k in range(10)]
  inter = from_columns(["x"] * 9 + ["y"], items[:9] + ["i9"])
  neg = collect(PairSampler(inter, 8, num_negatives=5))
  x = neg["user"] == inter.user_id("x")
  assert (neg["neg"][x] == inter.item_id("i9")).all()
  full = from_columns(["x"] * 10 + ["y"], items + ["i0"])
  with pytest.raises(DataError, match="all 10 items"):
    PairSampler(full, 8)


def test_prefix_mode_matches_naive_reference():
  inter, L = tiny(), 3
  sampler = SequenceSampler(inter, max_len=L, batch_size=4, num_negatives=2, mode="prefix")
  seqs = naive_sequences(inter)
  expected = sorted((tuple(left_pad(s[:i], L)), s[i]) for s in seqs.values() for i in range(1, len(s)))
  assert sampler.num_rows == len(expected) == sum(len(s) - 1 for s in seqs.values()) == 5
  got = collect(sampler)
  assert got["seq"].shape == (8, L) and got["pos"].shape == (8,) and got["neg"].shape == (8, 2)
  assert got["weight"].tolist().count(1.0) == 5 and got["weight"][-3:].tolist() == [0, 0, 0]
  real = got["weight"] > 0
  assert sorted((tuple(s), p) for s, p in zip(got["seq"][real].tolist(), got["pos"][real].tolist())) == expected


def test_prefix_mode_on_bigger_data():
  inter, L = random_inter(num_users=60, per_user=25, seed=3), 7
  seqs = naive_sequences(inter)
  expected = sorted((tuple(left_pad(s[:i], L)), s[i]) for s in seqs.values() for i in range(1, len(s)))
  got = collect(SequenceSampler(inter, max_len=L, batch_size=50, mode="prefix", seed=2), epoch=4)
  real = got["weight"] > 0
  assert sorted((tuple(s), p) for s, p in zip(got["seq"][real].tolist(), got["pos"][real].tolist())) == expected


def naive_windows(seq, L):
  """(seq, pos, weight) rows of one user: windows of L+1 items every L//2 from the end; a target
  is weighted in the newest window holding it with >= L//2 context (all in the earliest window)."""
  stride, rows, end = max(1, L // 2), [], len(seq)
  while end >= 2:
    window = seq[max(0, end - L - 1):end]
    earliest = end - stride < 2
    targets = list(range(max(1, end - L), end))           # indices in seq of the window's targets
    weight = [1.0 if earliest or t >= end - stride else 0.0 for t in targets]
    rows.append((tuple(left_pad(window[:-1], L)), tuple(left_pad(window[1:], L)), tuple(left_pad(weight, L))))
    end -= stride
  return rows


@pytest.mark.parametrize("L", [2, 4, 6])
def test_sequence_mode_matches_naive_reference(L):
  inter = tiny()
  sampler = SequenceSampler(inter, max_len=L, batch_size=4, num_negatives=3, mode="sequence")
  expected = [row for s in naive_sequences(inter).values() for row in naive_windows(s, L)]
  got = collect(sampler)
  rows = -(-len(expected) // 4) * 4
  assert got["seq"].shape == (rows, L) and got["pos"].shape == (rows, L) and got["neg"].shape == (rows, L, 3)
  assert got["weight"].shape == (rows, L) and got["weight"].dtype == np.float32
  real = got["weight"].sum(1) > 0
  assert real.sum() == len(expected)
  triples = zip(*(map(tuple, got[k][real].tolist()) for k in ("seq", "pos", "weight")))
  assert sorted(triples) == sorted(expected)
  assert ((got["neg"] > 0) == (got["weight"] > 0)[..., None]).all()   # negatives for the scored targets only
  # negatives_for="items": wherever window[1:] holds a real item (every target, the user's first item too)
  items = collect(SequenceSampler(inter, max_len=L, batch_size=4, num_negatives=3, negatives_for="items"))
  window_tail = np.concatenate([items["seq"][:, 1:], items["pos"][:, -1:]], axis=1)
  assert ((items["neg"] > 0) == (window_tail > 0)[..., None]).all()
  assert (items["weight"] > 0).sum() < (window_tail > 0).sum()
  for key in ("seq", "pos", "weight"):
    np.testing.assert_array_equal(items[key], got[key])


def test_sequence_mode_scores_every_transition_once():
  inter = random_inter(num_users=50, num_items=300, per_user=120)
  got = collect(SequenceSampler(inter, max_len=10, batch_size=64, mode="sequence"))
  items, offsets = user_sequences(inter)
  counts = np.diff(offsets)
  assert got["weight"].sum() == np.maximum(counts - 1, 0).sum()
  targets = sorted(got["pos"][got["weight"] > 0].tolist())
  expected = sorted(np.concatenate([items[a + 1:b] for a, b in zip(offsets[:-1], offsets[1:]) if b - a >= 2]).tolist())
  assert targets == expected


@pytest.mark.parametrize("L, stride", [(10, None), (10, 3), (10, 9), (50, None)])
def test_every_item_is_in_some_window_tail(L, stride):
  inter = random_inter(num_users=60, num_items=400, per_user=130, seed=2)
  items, offsets = user_sequences(inter)
  counts = np.diff(offsets)
  sampler = SequenceSampler(inter, max_len=L, batch_size=16, mode="sequence", stride=stride)
  got = collect(sampler)
  tail = np.concatenate([got["seq"][:, 1:], got["pos"][:, -1:]], axis=1)   # window[1:], a masked-item model's input
  for user in np.flatnonzero(counts >= 2):
    seen = np.unique(tail[got["user"] == user])
    assert set(items[offsets[user]:offsets[user + 1]].tolist()) <= set(seen.tolist())   # the first item too


def test_sequence_sampler_determinism_and_errors():
  inter = random_inter(num_users=100)
  for mode in ("sequence", "prefix"):
    a = SequenceSampler(inter, 10, 32, seed=1, mode=mode)
    b = SequenceSampler(inter, 10, 32, seed=1, mode=mode)
    x, y, z = collect(a, 3), collect(b, 3), collect(a, 4)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(x["seq"], z["seq"])
  with pytest.raises(ValueError):
    SequenceSampler(inter, 10, 32, mode="bogus")
  with pytest.raises(ValueError, match="negatives_for"):
    SequenceSampler(inter, 10, 32, negatives_for="everything")
  with pytest.raises(ValueError, match="distribution"):
    SequenceSampler(inter, 10, 32, distribution="zipf")
  with pytest.raises(DataError):
    SequenceSampler(from_columns(["a", "b"], ["x", "y"]), 10, 32)
  with pytest.raises(ValueError, match=r"stride must be in \[1, max_len=10\], got 0"):   # not the default
    SequenceSampler(inter, 10, 32, stride=0)
  for make in (lambda b: SequenceSampler(inter, 10, b), lambda b: PairSampler(inter, b)):
    for size in (0, -2):   # 0 divided by zero, -2 gave an empty epoch
      with pytest.raises(ValueError, match=f"batch_size must be positive, got {size}"):
        make(size)


def test_eval_inputs_and_csr_to_padded():
  inter = random_inter(num_users=50, seed=7)
  seqs = naive_sequences(inter)
  users = np.array([3, 1, 50, 7, 0])                             # 0 = padding user, no history
  out = eval_inputs(inter, users, max_len=12)
  assert out["user"].dtype == np.int32 and out["seq"].shape == (5, 12) and out["seq"].dtype == np.int32
  for row, u in zip(out["seq"].tolist(), users):
    assert row == left_pad(seqs.get(int(u), []), 12)
  items, offsets = user_sequences(inter)
  padded = csr_to_padded(items, offsets, users)
  width = max(len(seqs.get(int(u), [])) for u in users)
  assert padded.shape == (5, width) and padded.dtype == np.int32
  for row, u in zip(padded.tolist(), users):
    s = seqs.get(int(u), [])
    assert row == s + [0] * (width - len(s))
  assert csr_to_padded(items, offsets, users, width=width + 3).shape == (5, width + 3)
  with pytest.raises(ValueError):
    csr_to_padded(items, offsets, users, width=1)


def test_pad_batch():
  batch = {"a": np.ones((3, 2), np.int32), "w": np.ones(3, np.float32)}
  out = pad_batch(batch, 5)
  assert out["a"].shape == (5, 2) and out["w"].tolist() == [1, 1, 1, 0, 0]


def test_prefetch_yields_same_values():
  import jax
  sampler = PairSampler(random_inter(num_users=40), 16, num_negatives=2)
  host = list(sampler.epoch(0))
  for size in (1, 2, 5):
    device = list(prefetch_to_device(sampler.epoch(0), size=size))
    assert len(device) == len(host)
    for h, d in zip(host, device):
      assert isinstance(d["neg"], jax.Array)
      for k in h:
        np.testing.assert_array_equal(np.asarray(d[k]), h[k])
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  first = next(iter(prefetch_to_device(sampler.epoch(0), put=lambda b: jax.device_put(b, sharding))))
  assert first["user"].sharding == sharding


def test_interactions_without_timestamps_use_file_order():
  vocab = lambda *tokens: np.array(["[PAD]", *tokens], object)
  inter = Interactions(user=np.array([1, 1, 1], np.int32), item=np.array([3, 1, 2], np.int32),
                       user_vocab=vocab("u"), item_vocab=vocab("a", "b", "c", "d"))
  out = collect(SequenceSampler(inter, 4, 2, mode="sequence"))
  assert out["seq"][0].tolist() == [0, 0, 3, 1] and out["pos"][0].tolist() == [0, 0, 1, 2]


def test_ml100k_prefix_rows_and_negatives(data_dir):
  from recjax.data.readers import read_atomic
  from recjax.data.splits import leave_one_out
  train = leave_one_out(read_atomic(data_dir / "ml-100k", "ml-100k")).train
  sampler = SequenceSampler(train, max_len=50, batch_size=2048, mode="prefix")
  assert sampler.num_rows == len(train) - 943 == 97171
  pairs = PairSampler(train, 4096, num_negatives=2)
  got = collect(pairs)
  real = got["weight"] > 0
  keys = np.unique(train.user.astype(np.int64) * train.num_items + train.item)
  neg_keys = np.repeat(got["user"][real], 2).astype(np.int64) * train.num_items + got["neg"][real].ravel()
  assert not np.isin(neg_keys, keys).any()


def test_a_sequential_models_max_len_sets_the_history_fed_to_it():
  """`--set model.max_len=20`: training batches and evaluation inputs hold the latest 20 items, not the
  protocol's 50."""
  from recjax import experiment
  from recjax.config import apply_overrides, default_config

  config = apply_overrides(default_config("sasrec"), ["model.max_len=20", "batch_size=8"])
  config.update(dataset="synthetic")
  exp = experiment.build(config)
  assert exp.max_len == 20 and exp.protocol.max_len == 50
  assert exp.eval_sets["test"]["inputs"]["seq"].shape[1] == 20
  batch = next(iter(experiment.make_sampler(exp).epoch(0)))
  assert batch["seq"].shape == (8, 20)
