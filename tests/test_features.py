"""Feature fields (recjax.data.features): kinds, vocabularies from the training split, padding,
unseen categories, multi-valued padding, numeric normalisation, zip prefixes, field selection."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recjax.data.features import RECBOLE_ML100K_FIELDS, UNK, build_feature_tables
from recjax.data.interactions import Interactions
from recjax.data.readers import read_atomic
from recjax.errors import ConfigError, DataError


def _objects(values: list) -> np.ndarray:
  out = np.empty(len(values), dtype=object)
  out[:] = values
  return out


def tiny_interactions() -> Interactions:
  """Users u1..u4, items i1..i4; u4 and i4 never appear in the rows (unseen in training).

  u3 has no gender and no age; i3 has no genres; u4's gender "X" and i4's genre "c" occur on
  unseen entities only.
  """
  return Interactions(
      user=np.array([1, 2, 3, 1], np.int32), item=np.array([1, 2, 3, 2], np.int32),
      user_vocab=_objects(["[PAD]", "u1", "u2", "u3", "u4"]), item_vocab=_objects(["[PAD]", "i1", "i2", "i3", "i4"]),
      user_features={
          "gender": _objects(["", "F", "M", "", "X"]),
          "zip_code": _objects(["", "85711", "94043", "T8H1N", "05201"]),
          "age": np.array([np.nan, 20.0, 40.0, np.nan, 60.0], np.float32),
      },
      item_features={
          "genres": _objects([(), ("a", "b"), ("b",), (), ("c", "a")]),
          "embedding": _objects([np.zeros(0, np.float32)] + [np.ones(2, np.float32)] * 4),   # float_seq: left out
      },
      name="tiny")


def test_tables_of_a_hand_made_dataset():
  tables = build_feature_tables(tiny_interactions())
  assert tables.names == ("user_id", "gender", "zip_code", "age", "item_id", "genres")
  assert (tables.num_users, tables.num_items) == (5, 5)
  assert [f.kind for f in tables.fields] == ["token", "token", "token", "float", "token", "token_seq"]
  assert [f.side for f in tables.fields] == ["user"] * 4 + ["item"] * 2

  user_id = tables.field("user_id")
  np.testing.assert_array_equal(user_id.values, [0, 2, 3, 4, UNK])            # u4 unseen -> [UNK]
  assert list(user_id.vocab) == ["[PAD]", "[UNK]", "u1", "u2", "u3"]
  gender = tables.field("gender")
  np.testing.assert_array_equal(gender.values, [0, 2, 3, 0, UNK])             # missing -> 0, "X" unseen -> 1
  assert list(gender.vocab) == ["[PAD]", "[UNK]", "F", "M"]
  zip_code = tables.field("zip_code")                                          # first character only
  np.testing.assert_array_equal(zip_code.values, [0, 2, 3, 4, UNK])
  assert list(zip_code.vocab) == ["[PAD]", "[UNK]", "8", "9", "T"]
  age = tables.field("age")                                                    # min-max over u1, u2
  np.testing.assert_allclose(age.values, [0.0, 0.0, 1.0, 0.0, 2.0])
  assert age.stats == (20.0, 40.0) and age.vocab is None and age.vocab_size == 0
  np.testing.assert_array_equal(tables.field("item_id").values, [0, 2, 3, 4, UNK])
  genres = tables.field("genres")
  np.testing.assert_array_equal(genres.values, [[0, 0], [2, 3], [3, 0], [0, 0], [UNK, 2]])
  assert list(genres.vocab) == ["[PAD]", "[UNK]", "a", "b"]
  assert genres.values.dtype == np.int32 and age.values.dtype == np.float32


def test_a_number_no_training_entity_has_is_a_constant_field():
  inter = tiny_interactions()
  only_unseen = np.array([np.nan, np.nan, np.nan, np.nan, 1990.0], np.float32)   # u4 never trains
  age = build_feature_tables(dataclasses.replace(inter, user_features={"age": only_unseen})).field("age")
  np.testing.assert_array_equal(age.values, np.zeros(5))


def test_prefixes_are_configurable():
  tables = build_feature_tables(tiny_interactions(), prefixes={"zip_code": 2})
  assert list(tables.field("zip_code").vocab) == ["[PAD]", "[UNK]", "85", "94", "T8"]
  whole = build_feature_tables(tiny_interactions(), prefixes={})
  assert "85711" in whole.field("zip_code").vocab


def test_select_keeps_table_order_and_rejects_unknown_names():
  tables = build_feature_tables(tiny_interactions())
  assert tables.select(["genres", "user_id"]).names == ("user_id", "genres")
  assert tables.select(()) is tables and tables.select(None) is tables
  assert tables.select(["age"]).side("item") == ()
  with pytest.raises(ConfigError, match="unknown feature field.*'height'.*available: user_id"):
    tables.select(["user_id", "height"])
  with pytest.raises(ConfigError, match="named twice"):
    tables.select(["age", "age"])
  with pytest.raises(ConfigError, match="unknown feature field 'x'"):
    tables.field("x")


def test_tables_hash_by_identity():
  inter = tiny_interactions()
  a, b = build_feature_tables(inter), build_feature_tables(inter)
  assert a != b and len({a, b, a}) == 2
  assert a.fields[0] != b.fields[0] and len({a.fields[0], b.fields[0], a.fields[0]}) == 2


def test_bad_feature_tables_raise_data_errors():
  inter = tiny_interactions()
  short = dataclasses.replace(inter, user_features={"gender": _objects(["", "F"])})
  with pytest.raises(DataError, match="tiny: user feature 'gender' has 2 rows, expected 5"):
    build_feature_tables(short)
  clash = dataclasses.replace(inter, item_features={"gender": _objects(["", "a", "b", "c", "d"])})
  with pytest.raises(DataError, match=r"\['gender'\] appear on both"):
    build_feature_tables(clash)


def test_datasets_without_features_get_the_id_fields():
  inter = dataclasses.replace(tiny_interactions(), user_features={}, item_features={})
  tables = build_feature_tables(inter)
  assert tables.names == ("user_id", "item_id")


def test_ml100k_fields_match_recbole_types(data_file):
  directory = data_file("ml-100k/ml-100k.inter").parent
  inter = read_atomic(directory, "ml-100k")
  tables = build_feature_tables(inter)
  kinds = {f.name: f.kind for f in tables.fields}
  assert kinds == {"user_id": "token", "age": "token", "gender": "token", "occupation": "token", "zip_code": "token",
                   "item_id": "token", "movie_title": "token_seq", "release_year": "token", "class": "token_seq"}
  assert set(RECBOLE_ML100K_FIELDS) <= set(kinds)
  assert tables.field("class").values.shape == (inter.num_items, 6)            # at most 6 genres per movie
  assert tables.field("gender").vocab_size == 4 and tables.field("occupation").vocab_size == 2 + 21
  assert all(len(t) == 1 for t in tables.field("zip_code").vocab[2:])
  assert tables.field("user_id").vocab_size == inter.num_users + 1            # every user trains here, plus [UNK]
  assert (tables.field("item_id").values[1:] >= 2).all()
