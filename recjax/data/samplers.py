"""Seeded, vectorised batch makers: fixed-shape numpy dicts, last batch padded with weight 0.

The order (and negatives) of epoch e come from `np.random.default_rng([seed, e])` only, so a resumed
run replays exactly the batches an uninterrupted one would have seen. Padding rows are all zeros
(id 0 is the padding id everywhere) with weight 0.
"""
from __future__ import annotations

import collections
import itertools
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from recjax.data.interactions import Interactions, pair_keys, user_sequences
from recjax.errors import DataError

Batch = dict[str, np.ndarray]


PAIR_SAMPLING = ("rows", "users")


def _check_batch_size(sampler: str, batch_size: int) -> None:
  if batch_size < 1:
    raise ValueError(f"{sampler}: batch_size must be positive, got {batch_size}")


class PairSampler:
  """(user, positive, negatives) triples, as many per epoch as there are training rows.

  `sampling="rows"`: every training row once, reshuffled each epoch (RecBole). `sampling="users"`: each
  row draws a user uniformly among those with training items, then one of that user's items uniformly
  (the LightGCN authors' PyTorch sampler; NGCF's code draws users alike, without replacement within a
  batch), so every user weighs the same whatever their activity.

  Batches: `user [B] int32`, `pos [B] int32`, `neg [B, n] int32` (see `NegativeSampler`),
  `weight [B] float32`.
  """

  def __init__(self, train: Interactions, batch_size: int, num_negatives: int = 1, seed: int = 0,
               distribution: str = "uniform", exclude_items: np.ndarray | None = None, sampling: str = "rows"):
    if len(train) == 0:
      raise DataError(train.name or "train", "PairSampler got no training interactions")
    if sampling not in PAIR_SAMPLING:
      raise ValueError(f"pair sampling {sampling!r}: expected one of {PAIR_SAMPLING}")
    _check_batch_size("PairSampler", batch_size)
    self.user, self.item = train.user.astype(np.int32), train.item.astype(np.int32)
    if sampling == "users":   # row indices grouped by user; each user's first position and row count
      self.by_user = np.argsort(self.user, kind="stable")
      _, self.user_start, self.user_count = np.unique(self.user[self.by_user], return_index=True, return_counts=True)
    self.negatives = NegativeSampler(train, distribution, exclude_items)
    self.batch_size, self.num_negatives, self.seed, self.sampling = batch_size, num_negatives, seed, sampling

  @property
  def num_batches(self) -> int:
    return -(-len(self.user) // self.batch_size)

  def _epoch_rows(self, rng: np.random.Generator) -> np.ndarray:
    """This epoch's training-row indices `[len(train)]`, in order."""
    if self.sampling == "rows":
      return rng.permutation(len(self.user))
    which = rng.integers(0, len(self.user_count), len(self.user))           # a user, uniformly
    offset = rng.integers(0, self.user_count[which])                         # then one of their rows
    return self.by_user[self.user_start[which] + offset]

  def epoch(self, epoch: int) -> Iterator[Batch]:
    rng = np.random.default_rng([self.seed, epoch])
    perm = self._epoch_rows(rng)
    for start in range(0, len(perm), self.batch_size):
      rows = perm[start:start + self.batch_size]
      user = self.user[rows]
      batch = {"user": user, "pos": self.item[rows],
               "neg": self.negatives.sample(rng, user, self.num_negatives),
               "weight": np.ones(len(rows), np.float32)}
      yield pad_batch(batch, self.batch_size)


class LabeledSampler:
  """Labelled rows (pointwise training: CTR labels or rating targets), reshuffled each epoch.

  Batches: `user [B] int32`, `item [B] int32`, `label [B] float32` (the row's target; `[B, T]` with one
  label per task), `domain [B] int32` when domains are given, `weight [B] float32` (0 on the padding rows
  of the last batch). No negatives are drawn: every row is an example.
  """

  def __init__(self, user: np.ndarray, item: np.ndarray, label: np.ndarray, batch_size: int, seed: int = 0,
               domain: np.ndarray | None = None):
    user, item, label = np.asarray(user), np.asarray(item), np.asarray(label)
    if user.ndim != 1 or item.shape != user.shape or label.shape[:1] != user.shape or label.ndim > 2 or (
        domain is not None and np.shape(domain) != user.shape):
      raise ValueError(f"LabeledSampler: user, item, label (and domain) must have one length, got {user.shape}, "
                       f"{item.shape}, {label.shape}" + ("" if domain is None else f", {np.shape(domain)}"))
    if len(user) == 0:
      raise DataError("train", "LabeledSampler got no training rows")
    _check_batch_size("LabeledSampler", batch_size)
    self.columns = {"user": user.astype(np.int32), "item": item.astype(np.int32), "label": label.astype(np.float32)}
    if domain is not None:
      self.columns["domain"] = np.asarray(domain, np.int32)
    self.batch_size, self.seed = batch_size, seed

  @property
  def num_batches(self) -> int:
    return -(-len(self.columns["user"]) // self.batch_size)

  def epoch(self, epoch: int) -> Iterator[Batch]:
    perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.columns["user"]))
    for start in range(0, len(perm), self.batch_size):
      rows = perm[start:start + self.batch_size]
      batch = {name: column[rows] for name, column in self.columns.items()}
      yield pad_batch({**batch, "weight": np.ones(len(rows), np.float32)}, self.batch_size)


class SequenceSampler:
  """Next-item training rows from each user's time-ordered training items (L = max_len).

  mode "sequence" (SASRec paper, a loss at every position): windows of L+1 items cover each user's
    whole history, the newest window ending at the last item and each earlier one `stride` (default
    L // 2) items before the next. Row: `seq [B, L]` (window[:-1], left-padded, latest at L-1), `pos [B, L]`
    (window[1:], 0 = none), `neg [B, L, n]` (drawn where weight is 1, or with `negatives_for="items"`
    for every real item of window[1:], as masked-item models score any of them; 0 elsewhere),
    `user [B]`, `weight [B, L]`: 1 on the targets
    no later window scores (its newest `stride` ones; all of them in a user's earliest window, which
    ends within the user's first stride + 1 items), so every training transition is a target exactly
    once per epoch with at least L - stride items of context, scored from the window's newest `stride`
    positions as evaluation scores from the newest (a user with at most stride + 1 items is one row;
    fewer, longer windows scored SASRec 7-10% lower on ml-100k, `benchmarks/RESULTS.md`); with
    stride < L every item is in some window[1:], which a masked-item model reads.
  mode "prefix" (RecBole's augmentation, the same rows it trains on): one row per (user, position
    i >= 1): `seq [B, L]` (the up to L items before item i, left-padded), `pos [B]` (item i),
    `neg [B, n]`, `user [B]`, `weight [B]`; sum over users of (n_u - 1) rows.
  Negatives come from `NegativeSampler(train, distribution, exclude_items)`. Rows are kept
  as indices into the CSR item array and windows are gathered per batch, so memory is O(n).
  """

  def __init__(self, train: Interactions, max_len: int, batch_size: int, num_negatives: int = 1,
               seed: int = 0, mode: str = "sequence", stride: int | None = None, distribution: str = "uniform",
               negatives_for: str = "targets", exclude_items: np.ndarray | None = None):
    if mode not in ("sequence", "prefix"):
      raise ValueError(f"mode must be 'sequence' or 'prefix', got {mode!r}")
    if negatives_for not in ("targets", "items"):
      raise ValueError(f"negatives_for must be 'targets' or 'items', got {negatives_for!r}")
    _check_batch_size("SequenceSampler", batch_size)
    self.items, offsets = user_sequences(train)
    counts = np.diff(offsets)
    self.stride = max(1, max_len // 2) if stride is None else stride
    if not 1 <= self.stride <= max_len:
      raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    if mode == "sequence":
      users = np.flatnonzero(counts >= 2)
      per_user = (counts[users] - 2) // self.stride + 1             # windows with >= 1 target
      self.row_user = np.repeat(users, per_user).astype(np.int32)
      back = np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user)
      self.row_end = offsets[self.row_user + 1] - back * self.stride   # exclusive CSR end
      earliest = back == np.repeat(per_user, per_user) - 1
      # Targets at CSR positions >= row_fresh are this row's; earlier ones belong to an earlier window.
      self.row_fresh = np.where(earliest, 0, self.row_end - self.stride)
    else:
      user_of = np.repeat(np.arange(len(counts)), counts)        # user of each CSR position
      target = np.flatnonzero(np.arange(len(self.items)) > offsets[user_of])   # position >= 1
      self.row_user, self.row_end = user_of[target].astype(np.int32), target
    if len(self.row_user) == 0:
      raise DataError(train.name or "train", f"SequenceSampler({mode}) found no user with 2 or more training items")
    self.starts = offsets[:-1]
    self.negatives = NegativeSampler(train, distribution, exclude_items)
    self.max_len, self.batch_size, self.num_negatives = max_len, batch_size, num_negatives
    self.seed, self.mode, self.negatives_for = seed, mode, negatives_for

  @property
  def num_rows(self) -> int:
    return len(self.row_user)

  @property
  def num_batches(self) -> int:
    return -(-self.num_rows // self.batch_size)

  def epoch(self, epoch: int) -> Iterator[Batch]:
    rng = np.random.default_rng([self.seed, epoch])
    perm = rng.permutation(self.num_rows)
    for start in range(0, len(perm), self.batch_size):
      rows = perm[start:start + self.batch_size]
      yield pad_batch(self.rows(rows, rng), self.batch_size)

  def rows(self, rows: np.ndarray, rng: np.random.Generator) -> Batch:
    """Unpadded batch for row indices [m]."""
    user, end = self.row_user[rows], self.row_end[rows]
    starts = self.starts[user]
    n = self.num_negatives
    if self.mode == "prefix":
      seq = windows(self.items, starts, end, self.max_len)      # [m, L]
      neg = self.negatives.sample(rng, user, n)
      return {"seq": seq, "pos": self.items[end], "neg": neg, "user": user, "weight": np.ones(len(rows), np.float32)}
    full = windows(self.items, starts, end, self.max_len + 1)   # [m, L+1]
    seq = np.ascontiguousarray(full[:, :-1])
    pos = np.where(seq > 0, full[:, 1:], 0)                     # the first item is nobody's target
    target_at = end[:, None] - self.max_len + np.arange(self.max_len)   # CSR position of each pos
    has = (pos > 0) & (target_at >= self.row_fresh[rows][:, None])
    scored = has if self.negatives_for == "targets" else full[:, 1:] > 0
    neg = np.zeros(pos.shape + (n,), np.int32)                  # [m, L, n]
    neg[scored] = self.negatives.sample(rng, np.broadcast_to(user[:, None], pos.shape)[scored], n)
    return {"seq": seq, "pos": pos, "neg": neg, "user": user, "weight": has.astype(np.float32)}


DISTRIBUTIONS = ("uniform", "popularity")


def negative_probs(train: Interactions, distribution: str = "uniform",
                   exclude_items: np.ndarray | None = None) -> np.ndarray:
  """q [num_items] float64, the proposal a negative is drawn from (before rejecting positives).

  "uniform": 1 / (N - 1) on items 1..N-1; "popularity": count(i) / sum of counts over the training
  rows. q[0] = 0 (padding); `exclude_items` (e.g. the held-out items of a cold-start split) get 0
  and the rest is renormalised. Sampled-softmax losses correct scores by log q.
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"negative distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
  if distribution == "uniform":
    q = np.full(train.num_items, 1.0 / max(train.num_items - 1, 1))
  else:
    q = np.bincount(train.item, minlength=train.num_items).astype(np.float64)
    q /= max(q.sum(), 1.0)
  q[0] = 0.0
  if exclude_items is not None and len(exclude_items):
    q[exclude_items] = 0.0
    q /= max(q.sum(), np.finfo(np.float64).tiny)
  return q


class NegativeSampler:
  """Negatives drawn from `negative_probs(train, distribution)` that are not among the user's
  training items, nor among `exclude_items` (int [C], e.g. items held out for cold start).

  Vectorised rejection: draw all, look the (user, item) keys up in the sorted positive keys, redraw
  only the collisions (and excluded draws) until none is left.
  """

  def __init__(self, train: Interactions, distribution: str = "uniform", exclude_items: np.ndarray | None = None):
    self.num_items = train.num_items
    probs = negative_probs(train, distribution)                # checks the name
    self.cdf = None if distribution == "uniform" else np.cumsum(probs)
    self.excluded = np.zeros(train.num_items, bool)
    if exclude_items is not None:
      self.excluded[np.asarray(exclude_items, np.int64)] = True
    # The items a negative can be: q > 0 (popularity: items with training rows) and not excluded.
    drawable = (probs > 0) & ~self.excluded
    self.drawable = np.flatnonzero(drawable).astype(np.int32)
    self.keys = np.unique(pair_keys(train))
    per_user = np.bincount(self.keys // self.num_items, weights=drawable[self.keys % self.num_items],
                           minlength=train.num_users)
    full = np.flatnonzero(per_user >= len(self.drawable))
    if len(full):
      raise DataError(train.name or "train", f"user {int(full[0])} ({train.user_vocab[full[0]]}) has interacted "
                      f"with all {len(self.drawable)} items a negative can be ({distribution} proposal, exclusions "
                      "left out): no negative item can be sampled")

  def sample(self, rng: np.random.Generator, user: np.ndarray, num: int) -> np.ndarray:
    """`num` negatives for each of `user` (int [m]); int32 [m, num]."""
    flat_user = np.repeat(user, num)
    neg = self.draw(rng, len(flat_user))
    todo = np.flatnonzero(self.is_positive(flat_user, neg))
    rounds = 0
    while len(todo):                                            # only collisions are redrawn
      # A user holding nearly all popular items could stall popularity draws: after 50 rounds, draw uniformly
      # among the items the proposal can give (never one whose q is 0, which log-Q corrections would blow up).
      neg[todo] = self.draw(rng, len(todo), uniform=rounds >= 50)
      todo = todo[self.is_positive(flat_user[todo], neg[todo])]
      rounds += 1
    return neg.reshape(len(user), num)

  def draw(self, rng: np.random.Generator, size: int, uniform: bool = False) -> np.ndarray:
    """int32 [size] items from the proposal (or uniformly from its support), positives not yet rejected."""
    if self.cdf is None:
      return rng.integers(1, self.num_items, size=size).astype(np.int32)
    if uniform:
      return self.drawable[rng.integers(0, len(self.drawable), size=size)]
    at = np.searchsorted(self.cdf, rng.random(size) * self.cdf[-1], side="right")
    return np.clip(at, 1, self.num_items - 1).astype(np.int32)

  def is_positive(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """bool [m]: (user, item) is a training interaction, or `item` is excluded (both are redrawn)."""
    key = user.astype(np.int64) * self.num_items + item
    at = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
    return (self.keys[at] == key) | self.excluded[item]


def windows(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
  """The up to `width` items before each `end` and not before its `start`, left-padded with 0.

  Args:
    items: int [n] CSR items; starts, ends: int [m] positions in `items` (end exclusive).
  Returns:
    int32 [m, width]; row k ends with items[ends[k]-1] at column width-1.
  """
  index = ends[:, None] - width + np.arange(width)[None, :]      # [m, width]
  if len(items) == 0:
    return np.zeros(index.shape, np.int32)
  return np.where(index >= starts[:, None], items[np.clip(index, 0, len(items) - 1)], 0).astype(np.int32)


def eval_inputs(history: Interactions, users: np.ndarray, max_len: int) -> Batch:
  """Evaluation inputs: `user [U] int32` and `seq [U, L] int32`, the last L items of each user's
  history in time order, left-padded (latest at L-1)."""
  items, offsets = user_sequences(history)
  users = np.asarray(users, np.int64)
  return {"user": users.astype(np.int32), "seq": windows(items, offsets[users], offsets[users + 1], max_len)}


def csr_to_padded(items: np.ndarray, offsets: np.ndarray, users: np.ndarray, width: int | None = None) -> np.ndarray:
  """Rows `items[offsets[u]:offsets[u+1]]` for each u in `users`, left-aligned and padded with 0.

  Args:
    items: int [n]; offsets: int [num_users+1]; users: int [U].
    width: at least the longest selected row; defaults to it (and at least 1).
  Returns:
    int32 [U, W] (for positives / history masks in evaluation).
  """
  users = np.asarray(users, np.int64)
  start, length = offsets[users], offsets[users + 1] - offsets[users]
  longest = int(length.max(initial=0))
  if width is None:
    width = max(longest, 1)
  elif width < longest:
    raise ValueError(f"width {width} is shorter than the longest row ({longest})")
  if len(items) == 0:
    return np.zeros((len(users), width), np.int32)
  index = start[:, None] + np.arange(width)[None, :]             # [U, W]
  valid = np.arange(width)[None, :] < length[:, None]
  return np.where(valid, items[np.clip(index, 0, len(items) - 1)], 0).astype(np.int32)


def pad_batch(batch: Batch, size: int) -> Batch:
  """Pads every array along axis 0 to `size` rows of zeros (so padding weight is 0)."""
  missing = size - len(next(iter(batch.values())))
  if missing == 0:
    return batch
  return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def prefetch_to_device(iterator: Iterable[Batch], size: int = 2, put: Callable = jax.device_put) -> Iterator:
  """Yields the batches of `iterator` already on device, placed by `put(batch)` (default
  `jax.device_put`; a mesh run passes `recjax.train.mesh.put_global` bound to its batch sharding),
  keeping `size` transfers in flight so host batching overlaps device work."""
  queue = collections.deque()
  iterator = iter(iterator)

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(put(batch))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
