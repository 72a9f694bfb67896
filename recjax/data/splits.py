"""Train / valid / test splits of an `Interactions` (pure; seeded where random).

Every splitter keeps the vocabularies and features, and keeps rows in their original order inside
each part, so `len(train) + len(valid) + len(test) == len(inter)` with nothing lost or duplicated.
Without timestamps, "time order" is file order (as in `user_sequences`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Sequence

import numpy as np

from recjax.data.interactions import Interactions, user_sequences
from recjax.errors import DataError

PARTS = ("train", "valid", "test")   # the parts of a Split, in order


@dataclasses.dataclass(frozen=True)
class Split:
  """Three parts over the same vocabularies; `name` says how they were made. A cold-start split also
  has `cold`: every interaction with the held-out items, in none of the three parts."""
  train: Interactions
  valid: Interactions
  test: Interactions
  name: str
  cold: Interactions | None = None

  @functools.cached_property
  def cold_items(self) -> np.ndarray | None:
    """int32 [C] sorted: the held-out item ids (those of `cold`), or None without held-out items."""
    return None if self.cold is None else np.unique(self.cold.item).astype(np.int32)


def hold_out_items(inter: Interactions, share: float, seed: int = 0) -> tuple[Interactions, Interactions]:
  """Cold start: round(share * I) of the I items that have interactions, drawn uniformly (seeded),
  lose all their interactions to a separate part.

  Returns:
    (warm: the other items' rows, cold: the held-out items' rows; every held-out item has one or more).
  """
  present = np.flatnonzero(np.bincount(inter.item, minlength=inter.num_items)[1:]) + 1
  count = int(round(share * len(present)))
  if not 0 < count < len(present):
    raise DataError(inter.name or "dataset", f"holding out {share:.0%} of {len(present)} items leaves "
                    f"{count} cold items: need at least one cold and one warm item")
  cold_items = np.sort(np.random.default_rng([seed, 7]).choice(present, count, replace=False)).astype(np.int32)
  is_cold = np.isin(inter.item, cold_items)
  return inter.subset(~is_cold), inter.subset(is_cold)


def leave_one_out(inter: Interactions) -> Split:
  """Per user in time order (stable on ties): last -> test, second to last -> valid, rest -> train.

  Mirrors RecBole's `split: {LS: valid_and_test}` with `order: TO`, except for tiny users: a user
  with fewer than 3 interactions keeps them all in train (RecBole would give a 2-interaction user
  a test row and no valid row).
  """
  return _hold_out_last(inter, with_valid=True)


def leave_last_out(inter: Interactions) -> Split:
  """`leave_one_out` with the second-to-last item trained on, as the BERT4Rec authors' code does ("put
  validate into train"): per user in time order, last -> test, the rest -> train; valid is empty. The
  same users (3 or more interactions) get a test row."""
  return _hold_out_last(inter, with_valid=False)


def _hold_out_last(inter: Interactions, with_valid: bool) -> Split:
  order = np.lexsort((_time(inter), inter.user))
  counts = np.bincount(inter.user, minlength=inter.num_users)
  from_end = counts[inter.user[order]] - 1 - _group_rank(inter.user[order], counts)
  held_out = np.clip(2 - from_end, 0, 2) if with_valid else np.where(from_end == 0, 2, 0)
  part_sorted = np.where(counts[inter.user[order]] >= 3, held_out, 0)
  return _from_parts(inter, order, part_sorted, "leave_one_out" if with_valid else "leave_last_out")


def random_ratio(inter: Interactions, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
  """Per user, a random permutation of the user's rows cut by RecBole 1.2.1's counts.

  See `ratio_counts` for the rounding. `ratios` has 3 entries (train, valid, test) or 2 (train,
  test; valid empty).
  """
  key = np.random.default_rng(seed).random(len(inter))
  return _by_user_order(inter, np.lexsort((key, inter.user)), ratios, "random_ratio")


def temporal_ratio(inter: Interactions, ratios: Sequence[float] = (0.8, 0.1, 0.1)) -> Split:
  """Per user in time order (stable on ties), the earliest rows to train, then valid, then test;
  counts as in `random_ratio`."""
  return _by_user_order(inter, np.lexsort((_time(inter), inter.user)), ratios, "temporal_ratio")


def global_temporal(inter: Interactions, ratios: Sequence[float] = (0.8, 0.1, 0.1)) -> Split:
  """One global timeline cut at timestamp quantiles.

  The cut times are the timestamps found at the RecBole counts (`ratio_counts` over all rows) in
  the time-sorted rows; a row goes to train if its time is before the first cut, to valid if before
  the second, else to test. Rows sharing a timestamp thus never straddle a cut (ties go to the
  later part), so part sizes can differ slightly from the counts.
  """
  time = _time(inter)
  cnt = part_counts(np.array([len(inter)]), ratios)[0]
  sorted_time = np.append(np.sort(time, kind="stable"), np.inf)
  cuts = sorted_time[np.cumsum(cnt)[:-1]]                      # [2]
  part = (time[:, None] >= cuts[None, :]).sum(1)
  return _from_parts(inter, np.arange(len(inter)), part, "global_temporal")


def given(train: Interactions, test: Interactions, valid: Interactions | None = None) -> Split:
  """A split from pre-split parts (e.g. LightGCN's train.txt / test.txt) over one vocabulary.

  Raises DataError naming the part and the first bad id when an id is outside [1, table size) of
  train's vocabularies, or when a part has different vocabulary sizes. `valid=None` -> 0 rows.
  """
  if valid is None:
    valid = train.subset(np.zeros(0, np.int64))
  where = train.name or "given split"
  for part_name, part in (("train", train), ("valid", valid), ("test", test)):
    if (part.num_users, part.num_items) != (train.num_users, train.num_items):
      raise DataError(where, f"{part_name} has vocabulary sizes ({part.num_users}, {part.num_items}), "
                      f"train has ({train.num_users}, {train.num_items})")
    for kind, ids, size in (("user", part.user, train.num_users), ("item", part.item, train.num_items)):
      bad = np.flatnonzero((ids < 1) | (ids >= size))
      if len(bad):
        raise DataError(where, f"{part_name}: {kind} id {int(ids[bad[0]])} (row {int(bad[0])}) outside [1, {size})")
  return Split(train, valid, test, "given")


def history_csr(inter: Interactions) -> tuple[np.ndarray, np.ndarray]:
  """Each user's items in time order as CSR `(items [n] int32, offsets [num_users+1])`, e.g. the
  training history to mask in evaluation (an alias of `user_sequences`)."""
  return user_sequences(inter)


def check_split(split: Split) -> None:
  """DataError if the training part is empty; nothing else is checked."""
  if len(split.train) == 0:
    raise DataError(split.train.name or split.name, f"split {split.name!r} has an empty training part")


def ratio_counts(n: np.ndarray, ratios: Sequence[float]) -> np.ndarray:
  """Part sizes per group exactly as RecBole 1.2.1's `_calcu_split_ids`.

  With ratios normalised to sum 1: `cnt[k] = int(r[k] * n)` for k >= 1, `cnt[0] = n - sum(cnt[1:])`;
  then for i = 1.. (last part first) while `cnt[0] > 1`, a part with `0 < r[-i] * n < 1` takes one
  row from `cnt[0]` (so small users still get valid/test rows; a zero ratio stays empty).

  Args:
    n: int [G] group sizes.
    ratios: [P] non-negative part ratios.
  Returns:
    int64 [G, P] counts, each row summing to n.
  """
  if len(ratios) not in (2, 3) or not all(math.isfinite(r) and r >= 0 for r in ratios) or sum(ratios) <= 0:
    raise ValueError(f"ratios must be 2 or 3 non-negative numbers with a positive sum, got {list(ratios)}")
  total = sum(float(r) for r in ratios)                          # Python sum, as RecBole
  r = np.array([float(x) / total for x in ratios])
  n = np.asarray(n, np.int64)
  exact = r[None, :] * n[:, None]                                # [G, P]
  cnt = exact.astype(np.int64)                                   # truncation == int() here
  cnt[:, 0] = n - cnt[:, 1:].sum(1)
  for i in range(1, len(r)):                                     # over parts, not groups
    bump = (cnt[:, 0] > 1) & (exact[:, -i] > 0) & (exact[:, -i] < 1)
    cnt[bump, -i] += 1
    cnt[bump, 0] -= 1
  return cnt


def _time(inter: Interactions) -> np.ndarray:
  return inter.timestamp if inter.timestamp is not None else np.arange(len(inter), dtype=np.float64)


def _group_rank(sorted_groups: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Position of each row inside its group, for rows sorted by group. [n]"""
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
  return np.arange(len(sorted_groups)) - offsets[sorted_groups]


def part_counts(n: np.ndarray, ratios: Sequence[float]) -> np.ndarray:
  """`ratio_counts` as (train, valid, test) columns, int64 [G, 3]: 2 ratios are (train, test), valid empty."""
  cnt = ratio_counts(n, ratios)
  return cnt if cnt.shape[1] == 3 else np.insert(cnt, 1, 0, axis=1)


def _by_user_order(inter: Interactions, order: np.ndarray, ratios: Sequence[float], name: str) -> Split:
  """Cut each user's rows, taken in `order` (sorted by user), by `part_counts`."""
  counts = np.bincount(inter.user, minlength=inter.num_users)
  cnt = part_counts(counts, ratios)                              # [num_users, 3]
  user_sorted = inter.user[order]
  rank = _group_rank(user_sorted, counts)
  bounds = np.cumsum(cnt, axis=1)[user_sorted, :-1]              # [n, 2]
  part = (rank[:, None] >= bounds).sum(1)
  return _from_parts(inter, order, part, name)


def _from_parts(inter: Interactions, order: np.ndarray, part_sorted: np.ndarray, name: str) -> Split:
  """Split from a part id (0 train, 1 valid, 2 test) for each row of `inter[order]`."""
  part = np.empty(len(inter), np.int64)
  part[order] = part_sorted
  train, valid, test = (inter.subset(np.flatnonzero(part == p)) for p in range(3))
  return Split(train, valid, test, name)


def fingerprint(split: Split) -> str:
  """sha256 of each part's (user, item) pairs as raw tokens, sorted: equal for the same split of the same
  rows, whatever the data file's row order or the dense ids; different when any pair moves or changes."""
  digest = hashlib.sha256()
  for name in (*PARTS, "cold"):
    part = getattr(split, name)
    if part is None:
      continue
    users, items = part.user_vocab[part.user].astype(str), part.item_vocab[part.item].astype(str)
    pairs = np.char.add(np.char.add(users, "\t"), items)
    digest.update(f"{name}\n".encode())
    digest.update("\n".join(np.sort(pairs).tolist()).encode())
  return digest.hexdigest()


def _plain(value):
  """A feature value as Python values: a float_seq entry's array as a list (numpy's repr elides long arrays)."""
  return value.tolist() if isinstance(value, np.ndarray) else value


def features_fingerprint(split: Split) -> str:
  """sha256 of the users' and items' side features in dense-id order: what a feature model's inputs mean. A
  `.user` or `.item` file edited under a run changes it while the interactions, and so the split, stay."""
  digest = hashlib.sha256()
  for kind, table in (("user", split.train.user_features), ("item", split.train.item_features)):
    for name in sorted(table):
      digest.update(f"{kind}.{name}\n".encode())
      digest.update("\n".join(repr(_plain(v)) for v in np.asarray(table[name]).tolist()).encode())
  return digest.hexdigest()


def ids_fingerprint(split: Split) -> str:
  """sha256 of the user and item vocabularies in dense-id order: what a checkpoint's table rows mean. The same
  split read from a file in another row order numbers its ids otherwise (first appearance) and differs here."""
  digest = hashlib.sha256()
  for kind, vocab in (("user", split.train.user_vocab), ("item", split.train.item_vocab)):
    digest.update(f"{kind}\n".encode())
    digest.update("\n".join(np.asarray(vocab).astype(str).tolist()).encode())
  return digest.hexdigest()
