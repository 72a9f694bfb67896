"""Labelled rows for pointwise (context-aware) models: CTR labels and rating-regression targets.

RecBole's context-aware setting (`quick_start_config/context-aware.yaml`, 1.2.1) turns each
interaction into one labelled row: `label = 1[rating >= threshold]` (`threshold: {rating: 4}` for
ml-100k; the rating column is then dropped), splits the rows at random over the whole dataset
(`split: {RS: [0.8, 0.1, 0.1]}`, `order: RO`, `group_by: ~`; see `random_rows`) and evaluates each
part's rows as they are (`mode: labeled`): no negative sampling anywhere. Rating regression keeps
the rating as the target, optionally normalised with statistics of the training rows
(`RatingScale`); predictions are mapped back to the rating scale before MSE / RMSE / MAE.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from recjax.data.interactions import Interactions
from recjax.data.splits import Split, ratio_counts
from recjax.errors import ConfigError, DataError

TASKS = ("labeled", "rating")                   # binary labels from a threshold | the rating itself
NORMALIZATIONS = (None, "none", "zscore", "minmax", "user_mean")


def random_rows(inter: Interactions, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
  """One random permutation of all rows cut by RecBole 1.2.1's counts (`group_by: ~`).

  RecBole shuffles the interactions (`order: RO`) and cuts the whole list by
  `_calcu_split_ids(tot=len, ratios)` (see `ratio_counts`), so a user may land in one part only.
  Rows keep their original order inside each part.
  """
  counts = ratio_counts(np.array([len(inter)]), ratios)[0]           # [parts]
  if len(counts) == 2:
    counts = np.array([counts[0], 0, counts[1]])                      # (train, test): valid stays empty
  perm = np.random.default_rng(seed).permutation(len(inter))
  bounds = np.concatenate([[0], np.cumsum(counts)])
  train, valid, test = (inter.subset(np.sort(perm[bounds[p]:bounds[p + 1]])) for p in range(3))
  return Split(train, valid, test, "random_rows")


def check_threshold(threshold) -> float:
  """`threshold` as a float, or ConfigError when it is not a finite number."""
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
    raise ConfigError(f"label_threshold: expected a finite number (label = rating >= threshold), got {threshold!r}")
  return float(threshold)


def ratings(inter: Interactions, why: str) -> np.ndarray:
  """The rating column `[n]`, or DataError naming the dataset and `why` it is needed."""
  if inter.rating is None:
    raise DataError(inter.name or "interactions", f"{why} needs ratings, and this dataset has none")
  return inter.rating


def ctr_labels(inter: Interactions, threshold: float) -> np.ndarray:
  """float32 `[n]`: 1 where rating >= threshold, else 0 (RecBole's `_set_label_by_threshold`)."""
  return (ratings(inter, "a CTR label (rating >= label_threshold)") >= check_threshold(threshold)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RatingScale:
  """An affine map between ratings and regression targets, fitted on the training rows.

  target = (rating - shift[user]) / scale;  rating = target * scale + shift[user].

  Attributes:
    method: the normalisation ("none", "zscore", "minmax", "user_mean").
    shift: float64 `[num_users]` (the same value for every user except with "user_mean").
    scale: a positive float.
  """
  method: str
  shift: np.ndarray
  scale: float

  def normalize(self, rating: np.ndarray, user: np.ndarray) -> np.ndarray:
    """float32 targets `[n]` of `rating [n]` given by users `user [n]`."""
    return ((np.asarray(rating, np.float64) - self.shift[user]) / self.scale).astype(np.float32)

  def denormalize(self, target: np.ndarray, user: np.ndarray) -> np.ndarray:
    """float64 ratings `[n]` of model outputs `target [n]`."""
    return np.asarray(target, np.float64) * self.scale + self.shift[user]


def fit_rating_scale(train: Interactions, method: str | None = None) -> RatingScale:
  """The normalisation `method` with statistics of `train`'s ratings (as `preprocess.normalize_ratings`
  applied to train: zscore, minmax, user_mean; None or "none" = identity). With "user_mean", a user
  without training rows gets the global training mean.

  Raises:
    ConfigError: unknown method.  DataError: no ratings or no training rows.
  """
  if method not in NORMALIZATIONS:
    raise ConfigError(f"rating_normalization: expected one of {list(NORMALIZATIONS)}, got {method!r}")
  r = ratings(train, "rating regression").astype(np.float64)
  if len(r) == 0:
    raise DataError(train.name or "train", "rating regression needs training rows")
  shift, scale = np.zeros(train.num_users), 1.0
  if method == "zscore":
    shift += r.mean()
    scale = float(r.std()) or 1.0
  elif method == "minmax":
    shift += r.min()
    scale = float(r.max() - r.min()) or 1.0
  elif method == "user_mean":
    counts = np.bincount(train.user, minlength=train.num_users)
    sums = np.bincount(train.user, weights=r, minlength=train.num_users)
    shift = np.where(counts > 0, sums / np.maximum(counts, 1), r.mean())
  return RatingScale(method or "none", shift, scale)


@dataclasses.dataclass(frozen=True)
class LabeledRows:
  """One part's labelled rows: `user [n] int32`, `item [n] int32`, `target [n] float32` (the 0/1
  label, or the rating on its own scale)."""
  user: np.ndarray
  item: np.ndarray
  target: np.ndarray

  def __len__(self) -> int:
    return len(self.user)


@dataclasses.dataclass(frozen=True)
class LabeledData:
  """Labelled train / valid / test rows of a split for one task.

  Attributes:
    task: "labeled" (0/1 labels, binary metrics) or "rating" (ratings, regression metrics).
    train, valid, test: the rows of each part.
    scale: how ratings map to training targets (identity for "labeled").
  """
  task: str
  train: LabeledRows
  valid: LabeledRows
  test: LabeledRows
  scale: RatingScale

  def train_targets(self) -> np.ndarray:
    """float32 `[n]`: what the model is trained to output on the training rows."""
    return self.scale.normalize(self.train.target, self.train.user)


def labeled_data(split: Split, task: str, threshold: float = 4.0, normalization: str | None = None) -> LabeledData:
  """The split's rows labelled for `task` ("labeled": rating >= threshold; "rating": the rating,
  trained on as normalised by `normalization` with the training part's statistics).

  Raises:
    DataError: the data has no ratings; a part is empty (nothing to train on or evaluate); with "labeled", a part whose
      rows are all one class (AUC is undefined, training learns a constant).
    ConfigError: unknown task or normalisation; a threshold that is not a finite number.
  """
  if task not in TASKS:
    raise ConfigError(f"labelled task must be one of {TASKS}, got {task!r}")
  parts = {"train": split.train, "valid": split.valid, "test": split.test}
  for phase, inter in parts.items():
    if len(inter) == 0:
      raise DataError(split.train.name or split.name, f"split {split.name!r} has no {phase} rows")
  if task == "labeled":
    threshold = check_threshold(threshold)
    targets = {phase: ctr_labels(inter, threshold) for phase, inter in parts.items()}
    for phase, label in targets.items():
      if label.min() == label.max():
        lo, hi = parts[phase].rating.min(), parts[phase].rating.max()
        raise DataError(parts[phase].name or "interactions",
                        f"label_threshold {threshold:g} makes every {phase} row "
                        f"{'positive' if label[0] else 'negative'} (ratings there span {lo:g}..{hi:g})")
    scale = RatingScale("none", np.zeros(split.train.num_users), 1.0)
  else:
    targets = {phase: ratings(inter, "rating regression").astype(np.float32) for phase, inter in parts.items()}
    scale = fit_rating_scale(split.train, normalization)
  rows = {phase: LabeledRows(inter.user.astype(np.int32), inter.item.astype(np.int32), targets[phase])
          for phase, inter in parts.items()}
  return LabeledData(task, rows["train"], rows["valid"], rows["test"], scale)
