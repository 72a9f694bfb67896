"""The one container every reader produces and every splitter, sampler and model consumes.

Dense ids: users and items are numbered 1..num_users-1 and 1..num_items-1; id 0 is reserved for
padding, so `num_users` and `num_items` count the padding row (they are table sizes).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from recjax.errors import UnknownIdError

PAD = 0
PAD_TOKEN = "[PAD]"


@dataclasses.dataclass(frozen=True)
class Interactions:
  """Columnar user-item interactions with vocabularies and side features.

  Attributes:
    user: int32 [n] dense user ids in [1, num_users).
    item: int32 [n] dense item ids in [1, num_items).
    timestamp: float64 [n] or None.
    rating: float32 [n] or None.
    user_vocab: object [num_users] raw token (str) of each dense user id; entry 0 is PAD_TOKEN.
    item_vocab: object [num_items] raw token of each dense item id; entry 0 is PAD_TOKEN.
    user_features: name -> array indexed by dense user id (row 0 = padding). Typed as read:
      token -> object str, token_seq -> object tuple[str, ...], float -> float32,
      float_seq -> object float32 arrays.
    item_features: the same, indexed by dense item id.
    columns: extra per-interaction columns, name -> array [n] (e.g. "domain").
    name: dataset name, for messages and logs.
  """
  user: np.ndarray
  item: np.ndarray
  user_vocab: np.ndarray
  item_vocab: np.ndarray
  timestamp: np.ndarray | None = None
  rating: np.ndarray | None = None
  user_features: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  item_features: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  columns: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  name: str = ""

  def __post_init__(self):
    n = len(self.user)
    for field in ("item", "timestamp", "rating"):
      column = getattr(self, field)
      if column is not None and len(column) != n:
        raise ValueError(f"{self.name or 'interactions'}: column {field!r} has {len(column)} rows, user has {n}")
    for key, column in self.columns.items():
      if len(column) != n:
        raise ValueError(f"{self.name or 'interactions'}: column {key!r} has {len(column)} rows, user has {n}")

  @property
  def num_users(self) -> int:
    """Size of the user table, padding row included."""
    return len(self.user_vocab)

  @property
  def num_items(self) -> int:
    """Size of the item table, padding row included."""
    return len(self.item_vocab)

  def __len__(self) -> int:
    return len(self.user)

  def subset(self, index: np.ndarray) -> "Interactions":
    """Rows selected by a boolean mask [n] or an integer index; vocabularies and features kept."""
    take = lambda a: None if a is None else a[index]
    return dataclasses.replace(
        self, user=self.user[index], item=self.item[index], timestamp=take(self.timestamp),
        rating=take(self.rating), columns={k: v[index] for k, v in self.columns.items()})

  def concat(self, other: "Interactions") -> "Interactions":
    """Rows of self then other; both must share vocabularies (e.g. train and valid of a Split)."""
    if other.num_users != self.num_users or other.num_items != self.num_items:
      raise ValueError("concat needs interactions over the same vocabularies")
    cat = lambda a, b: None if a is None or b is None else np.concatenate([a, b])
    return dataclasses.replace(
        self, user=np.concatenate([self.user, other.user]), item=np.concatenate([self.item, other.item]),
        timestamp=cat(self.timestamp, other.timestamp), rating=cat(self.rating, other.rating),
        columns={k: np.concatenate([v, other.columns[k]]) for k, v in self.columns.items() if k in other.columns})

  def user_id(self, raw: str) -> int:
    """Dense id of a raw user token; KeyError naming the token when unknown."""
    return _lookup(self.user_vocab, raw, "user", self.name)

  def item_id(self, raw: str) -> int:
    """Dense id of a raw item token; KeyError naming the token when unknown."""
    return _lookup(self.item_vocab, raw, "item", self.name)


def _lookup(vocab: np.ndarray, raw: str, kind: str, name: str) -> int:
  hits = np.flatnonzero(vocab[PAD + 1:] == str(raw))   # a raw id may spell the padding token
  if len(hits) == 0:
    raise UnknownIdError(f"unknown {kind} id {raw!r} in dataset {name or '?'}")
  return int(hits[0]) + PAD + 1


def build_vocab(raw_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Dense ids for raw tokens, numbered 1.. in order of first appearance (as RecBole does).

  Args:
    raw_tokens: [n] raw ids (any dtype; compared as str).
  Returns:
    (dense [n] int32, vocab [num+1] object with vocab[0] = PAD_TOKEN).
  """
  as_str = np.asarray(raw_tokens).astype(str)
  uniques, first, inverse = np.unique(as_str, return_index=True, return_inverse=True)
  order = np.argsort(first, kind="stable")          # unique index -> rank by first appearance
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  vocab = np.concatenate([[PAD_TOKEN], uniques[order]]).astype(object)
  return (rank[inverse] + 1).astype(np.int32), vocab


def from_columns(user_raw, item_raw, *, timestamp=None, rating=None, columns=None,
                 user_features=None, item_features=None, name="") -> Interactions:
  """Interactions from raw id columns; features given as {name: {raw_token: value}} are aligned
  to the dense ids (missing rows get the padding value of their type)."""
  user, user_vocab = build_vocab(user_raw)
  item, item_vocab = build_vocab(item_raw)
  return Interactions(
      user=user, item=item, user_vocab=user_vocab, item_vocab=item_vocab,
      timestamp=None if timestamp is None else np.asarray(timestamp, np.float64),
      rating=None if rating is None else _float32(rating, "rating", name),
      user_features=align_features(user_features or {}, user_vocab),
      item_features=align_features(item_features or {}, item_vocab),
      columns={k: np.asarray(v) for k, v in (columns or {}).items()}, name=name)


def float32_overflow(values: np.ndarray) -> np.ndarray:
  """bool [n]: which finite float64 values become inf as float32 (beyond its range, about 3.4e38)."""
  values = np.asarray(values, np.float64)
  with np.errstate(over="ignore"):
    return np.isinf(values.astype(np.float32)) & np.isfinite(values)


def _float32(values, column: str, name: str) -> np.ndarray:
  """float32 copy of `values`; a value beyond the float32 range is a ValueError rather than a silent inf."""
  values = np.asarray(values, np.float64)
  bad = float32_overflow(values)
  if bad.any():
    raise ValueError(f"{name or 'interactions'}: column {column!r}: {float(values[bad][0])!r} is out of float32 range")
  return values.astype(np.float32)


def align_features(features: Mapping[str, Mapping[str, object]], vocab: np.ndarray) -> dict[str, np.ndarray]:
  """{feature: {raw_token: value}} -> {feature: array indexed by dense id}; unknown rows padded."""
  out = {}
  for feature, by_token in features.items():
    values = [by_token.get(tok) for tok in vocab]
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, (float, np.floating)):
      out[feature] = _float32([np.nan if v is None else v for v in values], feature, "features")
    elif isinstance(sample, tuple):
      out[feature] = _object_array([() if v is None else v for v in values])
    elif isinstance(sample, np.ndarray):
      out[feature] = _object_array([np.zeros(0, np.float32) if v is None else v for v in values])
    else:
      out[feature] = _object_array(["" if v is None else v for v in values])
  return out


def _object_array(values: list) -> np.ndarray:
  array = np.empty(len(values), dtype=object)
  array[:] = values
  return array


def pair_keys(inter: Interactions) -> np.ndarray:
  """int64 `[n]` key of each row's (user, item) pair, `user * num_items + item`: ordered by user, then item."""
  return inter.user.astype(np.int64) * inter.num_items + inter.item


def time_order(inter: Interactions) -> np.ndarray:
  """Row indices `[n]` sorted by (user, time), stable on ties (file order when no timestamps)."""
  time = inter.timestamp if inter.timestamp is not None else np.arange(len(inter), dtype=np.float64)
  return np.lexsort((time, inter.user))


def user_sequences(inter: Interactions) -> tuple[np.ndarray, np.ndarray]:
  """Items of each user in time order (`time_order`).

  Returns:
    (items [n] int32 sorted by (user, time), offsets [num_users+1]) so that user u's sequence is
    items[offsets[u]:offsets[u+1]] (CSR layout; users without rows have empty slices).
  """
  order = time_order(inter)
  counts = np.bincount(inter.user, minlength=inter.num_users)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return inter.item[order].astype(np.int32), offsets
