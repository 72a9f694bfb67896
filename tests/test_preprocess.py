from __future__ import annotations

import numpy as np
import pytest

from recjax.data import preprocess as pp
from recjax.data.interactions import PAD_TOKEN, from_columns
from recjax.errors import ConfigError, DataError


def make(pairs, timestamp=None, rating=None, **kwargs):
  users, items = zip(*pairs)
  return from_columns(np.array(users), np.array(items), timestamp=timestamp, rating=rating, name="toy", **kwargs)


def raw_pairs(inter):
  return [(inter.user_vocab[u], inter.item_vocab[i]) for u, i in zip(inter.user, inter.item)]


def test_deduplicate_keeps_last_or_first_in_time():
  inter = make([("a", "x"), ("a", "y"), ("a", "x"), ("b", "x")], timestamp=[5, 1, 2, 3], rating=[1, 2, 3, 4])
  last = pp.deduplicate(inter, keep="last")
  assert raw_pairs(last) == [("a", "x"), ("a", "y"), ("b", "x")]   # original row order kept
  np.testing.assert_array_equal(last.rating, [1, 2, 4])               # (a, x) at t=5 is the latest
  first = pp.deduplicate(inter, keep="first")
  np.testing.assert_array_equal(first.rating, [2, 3, 4])              # (a, x) at t=2 is the earliest
  no_time = make([("a", "x"), ("a", "x")], rating=[1, 2])
  np.testing.assert_array_equal(pp.deduplicate(no_time).rating, [2])  # row order without timestamps
  with pytest.raises(ConfigError):
    pp.deduplicate(inter, keep="middle")


def test_filter_rating():
  inter = make([("a", "x"), ("a", "y"), ("b", "x")], rating=[5, 3, 4])
  assert raw_pairs(pp.filter_rating(inter, 4)) == [("a", "x"), ("b", "x")]
  with pytest.raises(DataError, match=r"toy: no interactions left after filter_rating\(min_rating=6\)"):
    pp.filter_rating(inter, 6)
  with pytest.raises(DataError, match="needs ratings"):
    pp.filter_rating(make([("a", "x")]), 4)


def test_k_core_needs_several_passes():
  # Pass 1 drops d (1 row); then z has 1 row, so (c, z) goes; then c has 1 row, so (c, y) goes.
  inter = make([("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("c", "y"), ("c", "z"), ("d", "z")])
  core = pp.k_core(inter, min_user=2, min_item=2)
  assert raw_pairs(core) == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
  counts = lambda ids, n: np.bincount(ids, minlength=n)
  assert counts(core.user, core.num_users)[np.unique(core.user)].min() >= 2
  assert counts(core.item, core.num_items)[np.unique(core.item)].min() >= 2
  assert core.num_users == inter.num_users                            # vocabularies untouched
  assert raw_pairs(pp.k_core(inter)) == raw_pairs(inter)              # 0 thresholds: no-op


def test_k_core_user_and_item_thresholds_differ():
  inter = make([("a", "x"), ("a", "y"), ("a", "z"), ("b", "x")])
  assert raw_pairs(pp.k_core(inter, min_user=2)) == [("a", "x"), ("a", "y"), ("a", "z")]
  assert raw_pairs(pp.k_core(inter, min_item=2)) == [("a", "x"), ("b", "x")]


def test_k_core_that_empties_names_itself():
  inter = make([("a", "x"), ("b", "y")])
  with pytest.raises(DataError, match=r"no interactions left after k_core\(min_user=2, min_item=0\)"):
    pp.k_core(inter, min_user=2)


def test_remap_ids_drops_unused_and_keeps_features_aligned():
  inter = make([("a", "x"), ("b", "y"), ("c", "z"), ("b", "x")], rating=[1, 2, 3, 4],
               item_features={"title": {"x": "X", "y": "Y", "z": "Z"}, "price": {"x": 1.0, "y": 2.0, "z": 3.0}},
               user_features={"age": {"a": "10", "b": "20", "c": "30"}})
  kept = pp.remap_ids(inter.subset(np.array([2, 3])))      # rows (c, z), (b, x): a and y unused
  assert list(kept.user_vocab) == [PAD_TOKEN, "c", "b"]     # first appearance in the remaining rows
  assert list(kept.item_vocab) == [PAD_TOKEN, "z", "x"]
  np.testing.assert_array_equal(kept.user, [1, 2])
  np.testing.assert_array_equal(kept.item, [1, 2])
  assert list(kept.item_features["title"]) == ["", "Z", "X"]
  np.testing.assert_array_equal(kept.item_features["price"][1:], [3.0, 1.0])
  assert list(kept.user_features["age"]) == ["", "30", "20"]
  np.testing.assert_array_equal(kept.rating, [3, 4])
  for u, i in zip(kept.user, kept.item):                    # every row still reads the right features
    assert kept.item_features["title"][i] == kept.item_vocab[i].upper()
    assert kept.user_features["age"][u] == inter.user_features["age"][inter.user_id(kept.user_vocab[u])]


def test_normalize_ratings():
  inter = make([("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")], rating=[1, 3, 4, 4])
  z = pp.normalize_ratings(inter, "zscore").rating
  assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
  np.testing.assert_allclose(pp.normalize_ratings(inter, "minmax").rating, [0, 2 / 3, 1, 1], rtol=1e-6)
  np.testing.assert_allclose(pp.normalize_ratings(inter, "user_mean").rating, [-1, 1, 0, 0])
  assert pp.normalize_ratings(inter, "minmax").rating.dtype == np.float32
  with pytest.raises(ConfigError, match="unknown normalisation"):
    pp.normalize_ratings(inter, "log")


def test_check_nonempty():
  inter = make([("a", "x")])
  assert pp.check_nonempty(inter, "load") is inter
  with pytest.raises(DataError, match="toy: no interactions left after my filter"):
    pp.check_nonempty(inter.subset(np.zeros(1, bool)), "my filter")
