"""Preprocessing: pure functions Interactions -> Interactions.

Filters keep vocabularies as they are (ids may become unused); `remap_ids` then drops unused ids
and renumbers densely. Every filter raises `DataError` (via `check_nonempty`) when it leaves no
interactions, naming itself, so an over-strict config fails where it went wrong.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from recjax.data.interactions import Interactions, pair_keys
from recjax.errors import ConfigError, DataError


def check_nonempty(inter: Interactions, where: str) -> Interactions:
  """`inter` unchanged, or DataError saying that stage `where` left no interactions."""
  if len(inter) == 0:
    raise DataError(inter.name or "interactions", f"no interactions left after {where}")
  return inter


def _time(inter: Interactions) -> np.ndarray:
  """[n] time of each row; the row index when there are no timestamps."""
  return inter.timestamp if inter.timestamp is not None else np.arange(len(inter), dtype=np.float64)


def deduplicate(inter: Interactions, keep: str = "last") -> Interactions:
  """One row per (user, item) pair.

  Rule: among rows with the same user and item, keep the latest ("last") or earliest ("first")
  in time order (timestamp, ties broken by row order; row order alone without timestamps).
  Kept rows stay in their original order.
  """
  if keep not in ("first", "last"):
    raise ConfigError(f"keep must be 'first' or 'last', got {keep!r}")
  where = f"deduplicate(keep={keep!r})"
  if len(inter) == 0:
    return check_nonempty(inter, where)
  key = pair_keys(inter)
  order = np.lexsort((np.arange(len(inter)), _time(inter), key))   # by pair, then time, then row
  change = key[order][1:] != key[order][:-1]                         # [n-1] a new pair starts
  boundary = np.concatenate([[True], change]) if keep == "first" else np.concatenate([change, [True]])
  return check_nonempty(inter.subset(np.sort(order[boundary])), where)


def filter_rating(inter: Interactions, min_rating: float) -> Interactions:
  """Rows with rating >= min_rating (e.g. 4 to treat 4-5 stars as positive feedback)."""
  if inter.rating is None:
    raise DataError(inter.name or "interactions", "filter_rating needs ratings, and this dataset has none")
  return check_nonempty(inter.subset(inter.rating >= min_rating), f"filter_rating(min_rating={min_rating})")


def k_core(inter: Interactions, min_user: int = 0, min_item: int = 0) -> Interactions:
  """Rows whose user has >= min_user rows and whose item has >= min_item rows, iterated to a fixpoint.

  Rule: drop every user with fewer than `min_user` interactions and every item with fewer than
  `min_item` (counted as rows, so duplicates count, as in RecBole), recount, and repeat until
  nothing changes: removing users can push items below the threshold and vice versa.
  """
  keep = np.ones(len(inter), bool)
  while True:
    users, items = inter.user[keep], inter.item[keep]
    user_ok = np.bincount(users, minlength=inter.num_users) >= min_user
    item_ok = np.bincount(items, minlength=inter.num_items) >= min_item
    drop = keep & ~(user_ok[inter.user] & item_ok[inter.item])
    if not drop.any():
      break
    keep &= ~drop
  return check_nonempty(inter.subset(keep), f"k_core(min_user={min_user}, min_item={min_item})")


def _renumber(ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Dense renumbering by first appearance.

  Returns: (new ids [n] int32 in 1..m, kept [m+1] old id of each new id with kept[0] = 0).
  """
  used, first = np.unique(ids, return_index=True)
  kept = used[np.argsort(first, kind="stable")]
  new_of_old = np.zeros(size, np.int32)
  new_of_old[kept] = np.arange(1, len(kept) + 1)
  return new_of_old[ids], np.concatenate([[0], kept]).astype(np.int64)


def remap_ids(inter: Interactions) -> Interactions:
  """Drop user/item ids without interactions and renumber the rest densely 1.., in order of first
  appearance in the rows (as RecBole does after filtering). Vocabularies and feature tables are
  re-indexed with the same mapping, so feature row k still describes dense id k."""
  user, user_kept = _renumber(inter.user, inter.num_users)
  item, item_kept = _renumber(inter.item, inter.num_items)
  return dataclasses.replace(
      inter, user=user, item=item, user_vocab=inter.user_vocab[user_kept], item_vocab=inter.item_vocab[item_kept],
      user_features={k: v[user_kept] for k, v in inter.user_features.items()},
      item_features={k: v[item_kept] for k, v in inter.item_features.items()})


def normalize_ratings(inter: Interactions, method: str = "zscore") -> Interactions:
  """Ratings rescaled (float32); the rest unchanged.

  zscore: (r - mean) / std over all rows (std 0 -> divide by 1).
  minmax: (r - min) / (max - min) into [0, 1] (a constant rating -> 0).
  user_mean: r - mean rating of the row's user (centres each user's scale).
  """
  if inter.rating is None:
    raise DataError(inter.name or "interactions", "normalize_ratings needs ratings, and this dataset has none")
  if len(inter) == 0:
    return inter
  r = inter.rating.astype(np.float64)
  if method == "zscore":
    std = r.std()
    out = (r - r.mean()) / (std if std > 0 else 1.0)
  elif method == "minmax":
    span = r.max() - r.min()
    out = (r - r.min()) / (span if span > 0 else 1.0)
  elif method == "user_mean":
    sums = np.bincount(inter.user, weights=r, minlength=inter.num_users)
    counts = np.bincount(inter.user, minlength=inter.num_users)
    out = r - (sums / np.maximum(counts, 1))[inter.user]
  else:
    raise ConfigError(f"unknown normalisation {method!r}; use 'zscore', 'minmax' or 'user_mean'")
  return dataclasses.replace(inter, rating=out.astype(np.float32))
