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

from recjax.data.domains import domain_ids
from recjax.data.interactions import Interactions
from recjax.data.splits import Split, part_counts
from recjax.errors import ConfigError, DataError

TASKS = ("labeled", "rating")                   # binary labels from a threshold | the rating itself
NORMALIZATIONS = (None, "none", "zscore", "minmax", "user_mean")


def random_rows(inter: Interactions, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
  """One random permutation of all rows cut by RecBole 1.2.1's counts (`group_by: ~`).

  RecBole shuffles the interactions (`order: RO`) and cuts the whole list by
  `_calcu_split_ids(tot=len, ratios)` (see `ratio_counts`), so a user may land in one part only.
  Rows keep their original order inside each part.
  """
  counts = part_counts(np.array([len(inter)]), ratios)[0]            # [3]
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
  label, or the rating on its own scale) or `[n, T]` (one 0/1 label per task, T > 1), and `domain [n] int32`
  (the row's domain id, with domains) or None."""
  user: np.ndarray
  item: np.ndarray
  target: np.ndarray
  domain: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.user)

  def inputs(self) -> dict[str, np.ndarray]:
    """What a model reads of these rows: `user`, `item` and, with domains, `domain`."""
    return {"user": self.user, "item": self.item, **({} if self.domain is None else {"domain": self.domain})}


@dataclasses.dataclass(frozen=True)
class LabeledData:
  """Labelled train / valid / test rows of a split for one task.

  Attributes:
    task: "labeled" (0/1 labels, binary metrics) or "rating" (ratings, regression metrics).
    train, valid, test: the rows of each part.
    scale: how ratings map to training targets (identity for "labeled").
    tasks: names of the label columns (targets `[n, T]` for T > 1), else None.
    domains: the domain names (id k = `domains[k]`) when rows carry domains, else None.
  """
  task: str
  train: LabeledRows
  valid: LabeledRows
  test: LabeledRows
  scale: RatingScale
  tasks: tuple[str, ...] | None = None
  domains: tuple[str, ...] | None = None

  @property
  def num_tasks(self) -> int:
    return len(self.tasks) if self.tasks else 1

  def train_targets(self) -> np.ndarray:
    """float32 `[n]` or `[n, T]`: what the model is trained to output on the training rows."""
    if self.task == "labeled":
      return self.train.target
    return self.scale.normalize(self.train.target, self.train.user)


def _column_labels(inter: Interactions, columns: Sequence[str]) -> np.ndarray:
  """float32 `[n, T]` (`[n]` for one column: one task is `[n]` throughout): the 0/1 label columns `columns`
  of `inter`, or DataError naming a missing or non-binary one."""
  out = []
  for name in columns:
    if name not in inter.columns:
      raise DataError(inter.name or "interactions", f"label column {name!r} not found (columns: "
                      f"{sorted(inter.columns) or 'none'})")
    values = np.asarray(inter.columns[name])
    if values.dtype.kind not in "biuf" or not np.all((values == 0) | (values == 1)):   # text values too
      raise DataError(inter.name or "interactions", f"label column {name!r} must hold 0/1 labels")
    out.append(values.astype(np.float32))
  return out[0] if len(out) == 1 else np.stack(out, -1)


def labeled_data(split: Split, task: str, threshold: float = 4.0, normalization: str | None = None,
                 label_columns: Sequence[str] | None = None, domains: Sequence[str] | None = None) -> LabeledData:
  """The split's rows labelled for `task` ("labeled": rating >= threshold, or with `label_columns` one 0/1
  label per named interaction column, i.e. one task each; "rating": the rating, trained on as normalised by
  `normalization` with the training part's statistics). With `domains` (names), each row also gets its
  domain id (`recjax.data.domains.domain_ids`).

  Raises:
    DataError: the data has no ratings (or lacks a label column); a part is empty (nothing to train on or
      evaluate); with "labeled", a part whose rows are all one class for a task (AUC is undefined,
      training learns a constant).
    ConfigError: unknown task or normalisation; a threshold that is not a finite number; label columns
      with the rating task.
  """
  if task not in TASKS:
    raise ConfigError(f"labelled task must be one of {TASKS}, got {task!r}")
  if label_columns and task != "labeled":
    raise ConfigError(f"label_columns give 0/1 labels; task {task!r} regresses the rating")
  parts = {"train": split.train, "valid": split.valid, "test": split.test}
  for phase, inter in parts.items():
    if len(inter) == 0:
      raise DataError(split.train.name or split.name, f"split {split.name!r} has no {phase} rows")
  if task == "labeled":
    if label_columns:
      targets = {phase: _column_labels(inter, label_columns) for phase, inter in parts.items()}
    else:
      threshold = check_threshold(threshold)
      targets = {phase: ctr_labels(inter, threshold) for phase, inter in parts.items()}
    for phase, label in targets.items():
      for t, column in enumerate(label.reshape(len(label), -1).T):
        if column.min() == column.max():
          what = (f"label column {label_columns[t]!r} is {'1' if column[0] else '0'} on every {phase} row"
                  if label_columns else _one_class(parts[phase], threshold, phase, column[0]))
          raise DataError(parts[phase].name or "interactions", what)
    scale = RatingScale("none", np.zeros(split.train.num_users), 1.0)
  else:
    targets = {phase: ratings(inter, "rating regression").astype(np.float32) for phase, inter in parts.items()}
    scale = fit_rating_scale(split.train, normalization)
  rows = {phase: LabeledRows(inter.user.astype(np.int32), inter.item.astype(np.int32), targets[phase],
                             None if domains is None else domain_ids(inter, domains))
          for phase, inter in parts.items()}
  return LabeledData(task, rows["train"], rows["valid"], rows["test"], scale,
                     tasks=tuple(label_columns) if label_columns else None,
                     domains=None if domains is None else tuple(domains))


def _one_class(inter: Interactions, threshold: float, phase: str, positive: float) -> str:
  lo, hi = inter.rating.min(), inter.rating.max()
  return (f"label_threshold {threshold:g} makes every {phase} row {'positive' if positive else 'negative'} "
          f"(ratings there span {lo:g}..{hi:g})")
