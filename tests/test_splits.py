from __future__ import annotations

import numpy as np
import pytest

from recjax.data.interactions import Interactions, from_columns
from recjax.data.splits import (
  Split,
  check_split,
  given,
  global_temporal,
  history_csr,
  leave_last_out,
  leave_one_out,
  random_ratio,
  ratio_counts,
  temporal_ratio,
)
from recjax.errors import DataError


def recbole_counts(tot, ratios):
  """RecBole 1.2.1 `_calcu_split_ids`, transcribed as plain Python (counts instead of cut ids)."""
  ratios = [r / sum(ratios) for r in ratios]
  cnt = [int(ratios[i] * tot) for i in range(len(ratios))]
  cnt[0] = tot - sum(cnt[1:])
  for i in range(1, len(ratios)):
    if cnt[0] <= 1:
      break
    if 0 < ratios[-i] * tot < 1:
      cnt[-i] += 1
      cnt[0] -= 1
  return cnt


def staircase(max_n=12, seed=0):
  """User k (raw "uk") has k interactions, shuffled rows, random timestamps with some ties."""
  rng = np.random.default_rng(seed)
  users = np.repeat(np.arange(1, max_n + 1), np.arange(1, max_n + 1))
  items = rng.integers(0, 30, len(users))
  time = rng.integers(0, 5, len(users)).astype(float)
  perm = rng.permutation(len(users))
  return from_columns([f"u{u}" for u in users[perm]], items[perm], timestamp=time[perm], name="stairs")


def part_counts(split, inter):
  return np.stack([np.bincount(p.user, minlength=inter.num_users) for p in (split.train, split.valid, split.test)], 1)


def assert_partition(split, inter):
  """Every row lands in exactly one part, unchanged."""
  rows = lambda x: sorted(zip(x.user.tolist(), x.item.tolist(), x.timestamp.tolist()))
  merged = split.train.concat(split.valid).concat(split.test)
  assert rows(merged) == rows(inter)
  for part in (split.train, split.valid, split.test):
    assert part.num_users == inter.num_users and part.num_items == inter.num_items


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.7, 0.2, 0.1), (8, 1, 1), (0.6, 0.4), (0.9, 0.0, 0.1)])
def test_ratio_counts_match_recbole(ratios):
  n = np.arange(0, 40)
  expected = np.array([recbole_counts(int(k), list(ratios)) for k in n])
  np.testing.assert_array_equal(ratio_counts(n, ratios), expected)


@pytest.mark.parametrize("splitter", [lambda x: random_ratio(x, (0.8, 0.1, 0.1), seed=3),
                                      lambda x: temporal_ratio(x, (0.8, 0.1, 0.1))])
def test_per_user_counts_follow_recbole_rule(splitter):
  inter = staircase()
  split = splitter(inter)
  assert_partition(split, inter)
  counts = part_counts(split, inter)
  for k in range(1, 13):
    uid = inter.user_id(f"u{k}")
    assert counts[uid].tolist() == recbole_counts(k, [0.8, 0.1, 0.1]), k


def test_two_ratios_leave_valid_empty():
  inter = staircase()
  split = temporal_ratio(inter, (0.8, 0.2))
  assert len(split.valid) == 0
  counts = part_counts(split, inter)
  for k in range(1, 13):
    assert counts[inter.user_id(f"u{k}")].tolist() == [recbole_counts(k, [0.8, 0.2])[0], 0,
                                                        recbole_counts(k, [0.8, 0.2])[1]]


def test_ratios_must_be_finite_non_negative_numbers():
  from recjax.errors import ConfigError
  from recjax.eval.protocols import Protocol

  for ratios in [(float("nan"), 0.5, 0.5), (-0.1, 0.6, 0.5), (0.8, float("inf"), 0.1)]:
    with pytest.raises(ValueError, match="non-negative"):
      ratio_counts(np.array([10]), ratios)
    with pytest.raises(ConfigError, match="ratios must be 3 non-negative shares"):
      Protocol("x", split="random_ratio", ratios=ratios)


def test_temporal_ratio_takes_earliest_for_train():
  inter = staircase()
  split = temporal_ratio(inter)
  for u in range(1, inter.num_users):
    tr, va, te = (p.timestamp[p.user == u] for p in (split.train, split.valid, split.test))
    later = np.concatenate([va, te])
    if len(tr) and len(later):
      assert tr.max() <= later.min()
    if len(va) and len(te):
      assert va.max() <= te.min()


def test_random_ratio_is_seeded():
  inter = staircase()
  a, b, c = random_ratio(inter, seed=1), random_ratio(inter, seed=1), random_ratio(inter, seed=2)
  np.testing.assert_array_equal(a.test.item, b.test.item)
  np.testing.assert_array_equal(part_counts(a, inter), part_counts(c, inter))
  assert not np.array_equal(a.train.item, c.train.item)


def test_leave_one_out_latest_by_time_with_stable_ties():
  # user a: times 3,1,2,2 (rows 0..3); latest = row0 (t3); second = row3 (tie with row2, later in file)
  inter = from_columns(["a", "a", "a", "a", "b", "b", "c", "c", "c"],
                       ["i1", "i2", "i3", "i4", "i1", "i2", "i5", "i6", "i7"],
                       timestamp=[3, 1, 2, 2, 5, 6, 1, 1, 1])
  split = leave_one_out(inter)
  assert_partition(split, inter)
  item = lambda raw: inter.item_id(raw)
  user = lambda raw: inter.user_id(raw)
  test = dict(zip(split.test.user.tolist(), split.test.item.tolist()))
  valid = dict(zip(split.valid.user.tolist(), split.valid.item.tolist()))
  assert test[user("a")] == item("i1") and valid[user("a")] == item("i4")
  assert user("b") not in test and user("b") not in valid       # fewer than 3: all in train
  assert test[user("c")] == item("i7") and valid[user("c")] == item("i6")   # all tied: file order
  assert split.name == "leave_one_out"


def test_sequence_export_rows_follow_the_split():
  from recjax.data.export import sequence_frames

  inter = from_columns(["a", "a", "a", "a", "b", "b", "c", "c", "c"],
                       ["i1", "i2", "i3", "i4", "i1", "i2", "i5", "i6", "i7"],
                       timestamp=[3, 1, 2, 2, 5, 6, 1, 1, 1])
  frames = sequence_frames(leave_one_out(inter), max_len=2)
  rows = {part: sorted(map(tuple, frame.to_numpy().tolist())) for part, frame in frames.items()}
  assert rows["train"] == [("a", "i2", "i3"), ("b", "i1", "i2")]
  assert rows["valid"] == [("a", "i2 i3", "i4"), ("c", "i5", "i6")]          # history: the train items
  assert rows["test"] == [("a", "i3 i4", "i1"), ("c", "i5 i6", "i7")]         # train + valid, the last max_len


@pytest.mark.parametrize("user, item, fmt", [("NA", "i1", "plain"), ("a", "i\t1", "plain"), ("a", "i 1", "sequence")])
def test_export_refuses_ids_recbole_would_read_otherwise(tmp_path, user, item, fmt):
  from recjax.data.export import export_recbole_split

  inter = from_columns([user, user, user, "b", "b", "b"], [item, "i2", "i3", "i2", "i3", "i4"],
                       timestamp=[1, 2, 3, 1, 2, 3])
  with pytest.raises(DataError, match="would not survive RecBole's reader"):
    export_recbole_split(leave_one_out(inter), tmp_path, "x", fmt)
  if fmt == "sequence":   # a space is fine in a plain token column
    export_recbole_split(leave_one_out(inter), tmp_path, "x", "plain")


def test_fingerprint_follows_the_pairs_not_the_file_order():
  from recjax.data.splits import fingerprint

  users, items, times = ["a", "a", "a", "b", "b", "b"], ["i1", "i2", "i3", "i2", "i3", "i4"], [1, 2, 3, 1, 2, 3]
  base = fingerprint(leave_one_out(from_columns(users, items, timestamp=times)))
  order = [5, 3, 1, 0, 4, 2]   # the same rows in another order: other dense ids, the same split
  shuffled = from_columns([users[i] for i in order], [items[i] for i in order], timestamp=[times[i] for i in order])
  assert fingerprint(leave_one_out(shuffled)) == base
  assert fingerprint(leave_one_out(from_columns(users, items, timestamp=[1, 3, 2, 1, 2, 3]))) != base   # test moved
  assert fingerprint(leave_last_out(from_columns(users, items, timestamp=times))) != base               # valid moved


def test_ids_fingerprint_follows_the_dense_ids():
  from recjax.data.splits import ids_fingerprint

  users, items, times = ["a", "a", "a", "b", "b", "b"], ["i1", "i2", "i3", "i2", "i3", "i4"], [1, 2, 3, 1, 2, 3]
  base = ids_fingerprint(leave_one_out(from_columns(users, items, timestamp=times)))
  assert ids_fingerprint(leave_one_out(from_columns(users, items, timestamp=times))) == base
  order = [5, 3, 1, 0, 4, 2]   # the same split, its ids numbered in another order of first appearance
  shuffled = from_columns([users[i] for i in order], [items[i] for i in order], timestamp=[times[i] for i in order])
  assert ids_fingerprint(leave_one_out(shuffled)) != base


def test_leave_one_out_counts():
  inter = staircase()
  counts = part_counts(leave_one_out(inter), inter)
  for k in range(1, 13):
    expected = [k, 0, 0] if k < 3 else [k - 2, 1, 1]
    assert counts[inter.user_id(f"u{k}")].tolist() == expected


def test_leave_last_out_trains_on_the_valid_item():
  """The BERT4Rec authors' split: the same test rows as leave_one_out, its valid rows moved to train."""
  inter = staircase()
  loo, llo = leave_one_out(inter), leave_last_out(inter)
  assert_partition(llo, inter)
  assert llo.name == "leave_last_out" and len(llo.valid) == 0
  np.testing.assert_array_equal(llo.test.user, loo.test.user)
  np.testing.assert_array_equal(llo.test.item, loo.test.item)
  trained = lambda s: sorted(zip(s.user.tolist(), s.item.tolist()))
  assert trained(llo.train) == trained(loo.train.concat(loo.valid))
  for k in range(1, 13):
    assert part_counts(llo, inter)[inter.user_id(f"u{k}")].tolist() == ([k, 0, 0] if k < 3 else [k - 1, 0, 1])


def test_global_temporal_cuts_by_time():
  rng = np.random.default_rng(0)
  n = 200
  inter = from_columns(rng.integers(0, 20, n), rng.integers(0, 50, n), timestamp=rng.integers(0, 1000, n))
  split = global_temporal(inter, (0.8, 0.1, 0.1))
  assert_partition(split, inter)
  assert split.train.timestamp.max() < split.valid.timestamp.min()
  assert split.valid.timestamp.max() < split.test.timestamp.min()
  assert abs(len(split.train) - 160) <= 3 and abs(len(split.test) - 20) <= 3


def test_global_temporal_without_ties_matches_counts():
  n = 101
  inter = from_columns(np.arange(n) % 7, np.arange(n) % 13, timestamp=np.random.default_rng(1).permutation(n))
  split = global_temporal(inter)
  assert [len(split.train), len(split.valid), len(split.test)] == recbole_counts(n, [0.8, 0.1, 0.1])


def test_given_checks_ids():
  inter = from_columns(["a", "b", "c", "a"], ["x", "y", "z", "z"])
  train, test = inter.subset(np.array([0, 1, 2])), inter.subset(np.array([3]))
  split = given(train, test)
  assert isinstance(split, Split) and len(split.valid) == 0 and split.valid.num_items == inter.num_items
  bad = Interactions(user=np.array([1], np.int32), item=np.array([9], np.int32), user_vocab=inter.user_vocab,
                     item_vocab=inter.item_vocab)
  with pytest.raises(DataError, match=r"test: item id 9"):
    given(train, bad)
  with pytest.raises(DataError, match=r"valid: item id 9"):
    given(train, test, valid=bad)
  zero = Interactions(user=np.array([0], np.int32), item=np.array([1], np.int32), user_vocab=inter.user_vocab,
                      item_vocab=inter.item_vocab)
  with pytest.raises(DataError, match=r"train: user id 0"):
    given(zero, test)


def test_check_split_and_history():
  inter = staircase()
  check_split(leave_one_out(inter))
  empty = inter.subset(np.zeros(0, np.int64))
  with pytest.raises(DataError, match="empty training"):
    check_split(Split(empty, empty, inter, "x"))
  items, offsets = history_csr(inter)
  assert len(items) == len(inter) and offsets[-1] == len(inter)
  assert np.diff(offsets)[inter.user_id("u5")] == 5


def test_ml100k_split_sizes(data_dir):
  from recjax.data.readers import read_atomic
  inter = read_atomic(data_dir / "ml-100k", "ml-100k")
  loo = leave_one_out(inter)
  assert (len(loo.train), len(loo.valid), len(loo.test)) == (98114, 943, 943)
  rs = random_ratio(inter, (0.8, 0.1, 0.1), seed=0)              # per-user RecBole counts: seed-independent sizes
  assert (len(rs.train), len(rs.valid), len(rs.test)) == (80808, 9596, 9596)
  assert_partition(rs, inter)


def test_features_fingerprint_sees_every_value_of_a_long_vector_feature():
  """numpy prints a long array with "..." in the middle; the fingerprint must not rest on that."""
  from recjax.data.splits import features_fingerprint

  def split_with(vector):
    inter = from_columns(["a", "a", "a", "b", "b", "b"], ["i1", "i2", "i3", "i1", "i2", "i3"],
                         timestamp=[1, 2, 3, 1, 2, 3], item_features={"emb": {"i1": vector}})
    return leave_one_out(inter)

  vector = np.zeros(5000, np.float32)
  changed = vector.copy()
  changed[2500] = 1.0
  assert repr(vector) == repr(changed)   # what a repr-based fingerprint would compare
  assert features_fingerprint(split_with(vector)) != features_fingerprint(split_with(changed))
  assert features_fingerprint(split_with(vector)) == features_fingerprint(split_with(vector.copy()))
