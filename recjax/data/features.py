"""Feature fields for context-aware (CTR) models: side features as integer / float id tables.

`build_feature_tables(train)` turns an `Interactions`' `user_features` / `item_features` into one
`Field` per feature, plus the user id and the item id themselves as fields (as RecBole's
context-aware models do). Each field is a table indexed by dense user or item id:

- "token" (categorical, atomic type `token`): `values` int32 `[rows]`;
- "token_seq" (multi-valued, atomic type `token_seq`, e.g. genres): `values` int32 `[rows, M]`,
  right-padded with 0 (M = the most tokens any row has);
- "float" (numeric, atomic type `float`): `values` float32 `[rows]`, min-max normalised.

Rules:
- Vocabularies come from the users / items that occur in the training split only, so nothing
  about validation or test entities shapes the id space; the tables still cover every dense id.
- Id 0 = padding / missing (row 0, an empty token, a missing number); the encoder maps it to the
  zero vector and a zero first-order weight. Id 1 = "[UNK]": a category that no training user or
  item has (its embedding stays at its initial value: no training row reaches it). Known categories
  are numbered 2.. in order of first appearance over dense ids (so the user id field maps a
  training user u to id u + 1 when every user trains).
- An empty multi-valued field pools to the zero vector (its ids are all 0).
- Numbers: x -> (x - lo) / (hi - lo) with lo, hi the min and max over training entities (RecBole
  does min-max too where its dataset config sets `normalize_all`, as for ml-100k); missing (NaN) -> 0
  (RecBole fills the column mean); a constant field, or one that no training entity has a number
  for, -> 0 (RecBole: 1).
- Zip codes: a field named in `prefixes` keeps its first characters only (default: `zip_code`,
  one character, the US postal region; Canadian codes keep their first letter).
- `float_seq` features are not supported and left out.

RecBole 1.2.1's context-aware preset on ml-100k (`properties/quick_start_config/
context-aware_ml-100k.yaml`) loads `user_id, age, gender, occupation` and `item_id, release_year,
class` (`class`, the genres, as `token_seq`, the rest as `token`: age and release_year are typed
`token` in the atomic files, so they are categories here too), leaves `zip_code` and `movie_title`
out, and uses no interaction-level field (the rating becomes the label; timestamp is a float not
listed in `numerical_features`). `RECBOLE_ML100K_FIELDS` names that selection; by default every
field is built and models use all of them unless given a `fields` selection.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from recjax.data.interactions import PAD_TOKEN, Interactions
from recjax.errors import ConfigError, DataError

PAD = 0
UNK = 1
UNK_TOKEN = "[UNK]"
FIELD_KINDS = ("token", "token_seq", "float")
SIDES = ("user", "item")
DEFAULT_PREFIXES = {"zip_code": 1}
RECBOLE_ML100K_FIELDS = ("user_id", "age", "gender", "occupation", "item_id", "release_year", "class")


@dataclasses.dataclass(frozen=True, eq=False)
class Field:
  """One feature field, indexed by dense user or item id (row 0 = padding).

  Attributes:
    name: field name (`user_id`, `item_id` or the feature's column name).
    side: "user" or "item": which id indexes `values`.
    kind: "token", "token_seq" or "float".
    values: int32 `[rows]` (token), int32 `[rows, M]` (token_seq), float32 `[rows]` (float).
    vocab: object `[V]` raw token of each id (entry 0 "[PAD]", entry 1 "[UNK]"); None for float.
    stats: (lo, hi) of the min-max normalisation (float fields), else None.
  """
  name: str
  side: str
  kind: str
  values: np.ndarray
  vocab: np.ndarray | None = None
  stats: tuple[float, float] | None = None

  @property
  def vocab_size(self) -> int:
    """Rows of the field's embedding table (padding and unknown included); 0 for float fields."""
    return 0 if self.vocab is None else len(self.vocab)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureTables:
  """The fields of a dataset; hashed and compared by identity, so a module holding it stays a
  valid jit static argument.

  Attributes:
    fields: user-side fields first (user_id, then the features), then item-side ones.
    num_users: rows of every user-side table (padding row included).
    num_items: rows of every item-side table.
  """
  fields: tuple[Field, ...]
  num_users: int
  num_items: int

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(f.name for f in self.fields)

  def side(self, side: str) -> tuple[Field, ...]:
    """The fields of one side, in table order."""
    if side not in SIDES:
      raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return tuple(f for f in self.fields if f.side == side)

  def field(self, name: str) -> Field:
    for f in self.fields:
      if f.name == name:
        return f
    raise ConfigError(f"unknown feature field {name!r}; available: {', '.join(self.names)}")

  def select(self, names: Sequence[str] | None) -> FeatureTables:
    """The named fields only (kept in table order); None or empty: all of them (self).

    Raises:
      ConfigError: an unknown or repeated name.
    """
    if not names:
      return self
    names = list(names)
    unknown = [n for n in names if n not in self.names]
    if unknown:
      raise ConfigError(f"fields: unknown feature field(s) {unknown}; available: {', '.join(self.names)}")
    if len(set(names)) != len(names):
      raise ConfigError(f"fields: a field is named twice in {names}")
    return FeatureTables(tuple(f for f in self.fields if f.name in names), self.num_users, self.num_items)


def build_feature_tables(train: Interactions, *, prefixes: Mapping[str, int] | None = None) -> FeatureTables:
  """Feature fields of a training split (see the module docstring for the rules).

  Args:
    train: the training interactions; their vocabularies size the tables, their rows decide which
      users / items (and so which categories and value ranges) count as seen.
    prefixes: field name -> characters kept of its tokens (default `DEFAULT_PREFIXES`).
  Returns:
    FeatureTables with fields user_id, user features, item_id, item features (in the order the
    Interactions lists them; `float_seq` features left out).
  Raises:
    DataError: a feature table of the wrong length, a name used on both sides, an unknown type.
  """
  prefixes = DEFAULT_PREFIXES if prefixes is None else prefixes
  where = train.name or "interactions"
  fields = []
  for side, vocab, features, ids in (("user", train.user_vocab, train.user_features, train.user),
                                     ("item", train.item_vocab, train.item_features, train.item)):
    rows = len(vocab)
    seen = np.zeros(rows, bool)
    seen[ids] = True
    seen[PAD] = False
    id_tokens = np.asarray(vocab, dtype=object).copy()
    id_tokens[PAD] = ""
    fields.append(_token_field(f"{side}_id", side, id_tokens, seen))
    for name, column in features.items():
      if len(column) != rows:
        raise DataError(where, f"{side} feature {name!r} has {len(column)} rows, expected {rows} (one per {side} id)")
      kind = _kind(column)
      if kind is None:
        raise DataError(where, f"{side} feature {name!r}: unsupported values of type {type(column[1]).__name__}")
      if kind == "float_seq":
        continue
      if kind == "token" and name in prefixes:
        column = _object([str(v)[:prefixes[name]] for v in column])
      if kind == "token":
        fields.append(_token_field(name, side, column, seen))
      elif kind == "token_seq":
        fields.append(_token_seq_field(name, side, column, seen))
      else:
        fields.append(_float_field(name, side, column, seen))
  names = [f.name for f in fields]
  clash = sorted({n for n in names if names.count(n) > 1})
  if clash:
    raise DataError(where, f"feature name(s) {clash} appear on both the user and the item side")
  return FeatureTables(tuple(fields), num_users=train.num_users, num_items=train.num_items)


def _object(values: list) -> np.ndarray:
  out = np.empty(len(values), dtype=object)
  out[:] = values
  return out


def _kind(column: np.ndarray) -> str | None:
  """Field kind from the array's type and its values (rows without a value do not decide)."""
  if np.issubdtype(column.dtype, np.floating):
    return "float"
  if np.issubdtype(column.dtype, np.integer) or np.issubdtype(column.dtype, np.str_):
    return "token"
  for value in column[1:]:
    if isinstance(value, tuple):
      return "token_seq"
    if isinstance(value, np.ndarray):
      return "float_seq"
    if isinstance(value, (str, np.str_, int, np.integer)):
      return "token"
  return "token" if len(column) else None


def _vocab(tokens_by_row: Sequence[Sequence[str]], seen: np.ndarray) -> dict[str, int]:
  """token -> id (2.., first appearance over the seen rows in dense-id order)."""
  index: dict[str, int] = {}
  for row in np.flatnonzero(seen):
    for token in tokens_by_row[row]:
      if token not in index:
        index[token] = len(index) + UNK + 1
  return index


def _vocab_array(index: dict[str, int]) -> np.ndarray:
  return _object([PAD_TOKEN, UNK_TOKEN, *index])


def _token_field(name: str, side: str, column: np.ndarray, seen: np.ndarray) -> Field:
  tokens = [[] if v is None or str(v) == "" else [str(v)] for v in column]
  tokens[PAD] = []
  index = _vocab(tokens, seen)
  values = np.array([index.get(t[0], UNK) if t else PAD for t in tokens], np.int32)
  return Field(name, side, "token", values, _vocab_array(index))


def _token_seq_field(name: str, side: str, column: np.ndarray, seen: np.ndarray) -> Field:
  tokens = [[str(t) for t in v if str(t) != ""] if isinstance(v, tuple) else [] for v in column]
  tokens[PAD] = []
  index = _vocab(tokens, seen)
  width = max(1, max(len(t) for t in tokens))
  values = np.zeros((len(tokens), width), np.int32)
  for row, row_tokens in enumerate(tokens):
    values[row, :len(row_tokens)] = [index.get(t, UNK) for t in row_tokens]
  return Field(name, side, "token_seq", values, _vocab_array(index))


def _float_field(name: str, side: str, column: np.ndarray, seen: np.ndarray) -> Field:
  x = np.asarray(column, np.float64)
  known = x[seen & np.isfinite(x)]
  lo, hi = (float(known.min()), float(known.max())) if len(known) else (0.0, 0.0)   # none: as a constant field
  span = hi - lo if hi > lo else 1.0
  values = np.where(np.isfinite(x), (x - lo) / span, 0.0).astype(np.float32)
  if hi <= lo:
    values[:] = 0.0
  values[PAD] = 0.0
  return Field(name, side, "float", values, stats=(lo, hi))
