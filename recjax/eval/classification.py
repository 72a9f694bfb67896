"""Labelled-row metrics: binary classification (CTR) and rating regression.

Each metric reads `scores [n]` (logits: higher = more likely positive) or predictions, `labels [n]`
(bool or 0/1) or regression targets, and optional example weights `weight [n]` (default 1; 0 drops
an example), and returns a Python float. With P / N the positive / negative examples and w the weights:

  auc      = sum_{i in P, j in N} w_i w_j (1[s_i > s_j] + 1/2 1[s_i = s_j]) / (sum_P w * sum_N w)
  gauc     = sum_u W_u auc_u / sum_u W_u over the users u with both classes, auc_u the AUC of u's rows
             and W_u = sum_{i in P_u} w_i (RecBole 1.2.1) or sum_{i of u} w_i (the DIN paper)
  accuracy = sum_i w_i 1[(s_i > threshold) = y_i] / sum_i w_i
  log_loss = sum_i w_i (y_i softplus(-s_i) + (1 - y_i) softplus(s_i)) / sum_i w_i
           = -mean_w [y log sigmoid(s) + (1 - y) log(1 - sigmoid(s))]
  mse      = sum_i w_i (p_i - t_i)^2 / sum_i w_i,  rmse = sqrt(mse),  mae = sum_i w_i |p_i - t_i| / sum_i w_i

AUC is the (weighted) Mann-Whitney U statistic divided by |P| |N|: the probability that a random
positive outscores a random negative, ties counting 1/2 (the same as ranking with average ranks;
what `sklearn.metrics.roc_auc_score` and RecBole's AUC compute). It is computed in O(n log n) by
sorting, as is GAUC (one sort by (user, score)).
Everything runs in float64 numpy on the host: these are evaluation metrics, not traced code.
`score_rows` computes the scores of many rows on device, in fixed-shape chunks.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from recjax.eval.ranking import _chunk_inputs, _sharded
from recjax.train.mesh import fetch

# Metric names of labelled evaluation (see `binary_metrics`, `regression_metrics`).
BINARY_METRICS = ("auc", "gauc", "logloss", "accuracy")
REGRESSION_METRICS = ("rmse", "mae", "mse")
LOWER_IS_BETTER = frozenset({"logloss", "rmse", "mae", "mse"})
GAUC_WEIGHTS = ("positives", "rows")


def _prepare(scores, labels, weight, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validated float64 (scores [n], labels [n] in {0, 1}, weight [n] >= 0 with a positive sum)."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(f"{name}: scores and labels must be 1-D of the same length, got {scores.shape} and {labels.shape}")
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError(f"{name}: labels must be bool or 0/1")
  return scores, labels.astype(np.float64), _checked_weight(weight, scores.shape, name)


def _checked_weight(weight, shape: tuple[int, ...], name: str) -> np.ndarray:
  """float64 weights of `shape` (ones when None), finite, >= 0, with a positive sum."""
  weight = np.ones(shape) if weight is None else np.asarray(weight, np.float64)
  if weight.shape != shape:
    raise ValueError(f"{name}: weight must have the shape of the scores {shape}, got {weight.shape}")
  if not np.all(np.isfinite(weight) & (weight >= 0)):
    raise ValueError(f"{name}: weights must be finite and >= 0")
  if not np.sum(weight) > 0:
    raise ValueError(f"{name}: no examples with positive weight")
  return weight


def auc(scores, labels, weight=None) -> float:
  """ROC AUC with ties counted 1/2 (the Mann-Whitney statistic); see the module docstring.

  For every example, the weighted count of negatives scoring strictly below it and equal to it is
  read off the cumulative negative weight along the sorted scores.

  Args:
    scores: `[n]` scores or logits (NaN not allowed; +-inf allowed).
    labels: `[n]` bool or 0/1.
    weight: `[n]` non-negative example weights, or None for 1.

  Returns:
    AUC in [0, 1].

  Raises:
    ValueError: when only one class has positive total weight, or on malformed input.
  """
  scores, labels, weight = _prepare(scores, labels, weight, "auc")
  if np.any(np.isnan(scores)):
    raise ValueError("auc: scores contain NaN")
  pos_w, neg_w = weight * labels, weight * (1 - labels)  # [n], [n]
  num_pos, num_neg = np.sum(pos_w), np.sum(neg_w)
  if not (num_pos > 0 and num_neg > 0):
    raise ValueError(f"auc: needs both classes with positive weight, got {num_pos:g} positive and {num_neg:g} negative")
  order = np.argsort(scores, kind="stable")
  sorted_scores = scores[order]  # [n]
  cum_neg = np.concatenate([[0.0], np.cumsum(neg_w[order])])  # [n+1], negative weight of the first r sorted
  below = cum_neg[np.searchsorted(sorted_scores, scores, side="left")]  # [n] negatives with s_j < s_i
  up_to = cum_neg[np.searchsorted(sorted_scores, scores, side="right")]  # [n] negatives with s_j <= s_i
  wins = np.sum(pos_w * (below + 0.5 * (up_to - below)))
  return float(wins / (num_pos * num_neg))


def accuracy(scores, labels, threshold: float = 0.0, weight=None) -> float:
  """Weighted share of correct predictions, predicting positive iff score > threshold.

  Scores are logits, so the default threshold 0 is probability 1/2 (ties go to the negative class).

  Args:
    scores: `[n]` logits; labels: `[n]` bool or 0/1; threshold: a scalar; weight: `[n]` or None.

  Returns:
    sum_i w_i 1[(s_i > threshold) = y_i] / sum_i w_i, in [0, 1].
  """
  scores, labels, weight = _prepare(scores, labels, weight, "accuracy")
  if np.ndim(threshold) != 0:
    raise ValueError(f"accuracy: threshold must be a scalar, got shape {np.shape(threshold)} (pass weights as weight=)")
  correct = (scores > threshold) == (labels == 1)  # [n]
  return float(np.sum(weight * correct) / np.sum(weight))


def log_loss(logits, labels, weight=None) -> float:
  """Weighted mean binary cross-entropy from logits, in nats.

  l_i = y_i softplus(-z_i) + (1 - y_i) softplus(z_i), softplus(x) = log(1 + e^x) = logaddexp(0, x),
  which equals -y log sigmoid(z) - (1 - y) log(1 - sigmoid(z)) without overflow or log(0) for large |z|.
  Exact, not clipped: RecBole 1.2.1 clips float32 sigmoid outputs to [1e-15, 1 - 1e-15], so the two
  agree while |z| stays below about 16 (calibrated CTR models' logits do); past it RecBole's per-row
  loss saturates at 34.5 and float32 rounding, this one keeps growing.

  Args:
    logits: `[n]`; labels: `[n]` bool or 0/1; weight: `[n]` or None.

  Returns:
    sum_i w_i l_i / sum_i w_i (inf if a weighted example has an infinite logit on the wrong side).
  """
  logits, labels, weight = _prepare(logits, labels, weight, "log_loss")
  per_example = np.where(labels == 1, np.logaddexp(0.0, -logits), np.logaddexp(0.0, logits))  # [n]
  keep = weight > 0  # a dropped example never gives 0 * inf
  return float(np.sum(weight[keep] * per_example[keep]) / np.sum(weight))


def _group_runs(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """For rows sorted by `keys` (each `[n]`), the index of the first and one past the last row of
  each row's run of equal keys: `(start [n], end [n])`."""
  n = len(keys[0])
  change = np.zeros(max(n - 1, 0), bool)
  for key in keys:
    change |= key[1:] != key[:-1]
  run = np.concatenate([[0], np.cumsum(change)])                     # [n] run id of each row
  starts = np.flatnonzero(np.concatenate([[True], change]))           # [runs]
  ends = np.append(starts[1:], n)
  return starts[run], ends[run]


def gauc(scores, labels, groups, weight=None, weight_by: str = "positives") -> float:
  """Group (user) AUC: the AUC of each group's rows, averaged with group weights.

  `weight_by="positives"` is RecBole 1.2.1's GAUC (`recbole.evaluator.metrics.GAUC`): user u's AUC
  (ties 1/2, from average ranks) weighted by |R(u)|, u's number of positive rows; users with no
  positive or no negative row are dropped (RecBole logs a warning and removes them). RecBole
  computes it over a full ranking of all items (a ranking metric, which it cannot mix with AUC /
  LogLoss); here the same formula runs over each user's labelled rows. `weight_by="rows"` weights
  by all of u's rows (impressions), as in the DIN paper (Zhou et al., KDD 2018, Eq. 1). With
  example weights w, auc_u is the weighted AUC and the counts become weight sums.

  Args:
    scores: `[n]` scores or logits (no NaN); labels: `[n]` bool or 0/1.
    groups: `[n]` int group id of each row (e.g. the user).
    weight: `[n]` non-negative example weights, or None for 1.
    weight_by: "positives" (RecBole) or "rows" (DIN).

  Returns:
    GAUC in [0, 1].

  Raises:
    ValueError: no group has both classes with positive weight, or malformed input.
  """
  scores, labels, weight = _prepare(scores, labels, weight, "gauc")
  groups = np.asarray(groups)
  if groups.shape != scores.shape or not np.issubdtype(groups.dtype, np.integer):
    raise ValueError(f"gauc: groups must be integers of the shape of scores {scores.shape}, got {groups.dtype} "
                     f"{groups.shape}")
  if weight_by not in GAUC_WEIGHTS:
    raise ValueError(f"gauc: weight_by must be one of {GAUC_WEIGHTS}, got {weight_by!r}")
  if np.any(np.isnan(scores)):
    raise ValueError("gauc: scores contain NaN")
  _, group = np.unique(groups, return_inverse=True)                  # dense group index [n]
  order = np.lexsort((scores, group))                                # by group, then score
  g, s = group[order], scores[order]
  pos_w, neg_w = (weight * labels)[order], (weight * (1 - labels))[order]
  cum_neg = np.concatenate([[0.0], np.cumsum(neg_w)])                # [n+1]
  group_start, _ = _group_runs([g])
  tie_start, tie_end = _group_runs([g, s])
  below = cum_neg[tie_start] - cum_neg[group_start]                  # [n] u's negatives with s_j < s_i
  up_to = cum_neg[tie_end] - cum_neg[group_start]                    # [n] ... with s_j <= s_i
  size = g.max(initial=-1) + 1
  wins = np.bincount(g, pos_w * (below + 0.5 * (up_to - below)), minlength=size)
  num_pos, num_neg = np.bincount(g, pos_w, minlength=size), np.bincount(g, neg_w, minlength=size)
  both = (num_pos > 0) & (num_neg > 0)
  if not both.any():
    raise ValueError("gauc: no group has both classes with positive weight")
  group_auc = wins[both] / (num_pos[both] * num_neg[both])
  group_w = num_pos[both] if weight_by == "positives" else (num_pos + num_neg)[both]
  return float(np.sum(group_w * group_auc) / np.sum(group_w))


def _prepare_regression(pred, target, weight, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validated float64 (pred [n], target [n], weight [n] >= 0 with a positive sum)."""
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  if pred.ndim != 1 or target.shape != pred.shape:
    raise ValueError(f"{name}: predictions and targets must be 1-D of the same length, got {pred.shape} and "
                     f"{target.shape}")
  if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(target))):
    raise ValueError(f"{name}: predictions and targets must be finite")
  return pred, target, _checked_weight(weight, pred.shape, name)


def mse(pred, target, weight=None) -> float:
  """Weighted mean squared error sum_i w_i (p_i - t_i)^2 / sum_i w_i; `pred`, `target`, `weight` `[n]`."""
  pred, target, weight = _prepare_regression(pred, target, weight, "mse")
  return float(np.sum(weight * np.square(pred - target)) / np.sum(weight))


def rmse(pred, target, weight=None) -> float:
  """sqrt(mse): root mean squared error (RecBole's RMSE without weights)."""
  pred, target, weight = _prepare_regression(pred, target, weight, "rmse")
  return float(np.sqrt(np.sum(weight * np.square(pred - target)) / np.sum(weight)))


def mae(pred, target, weight=None) -> float:
  """Weighted mean absolute error sum_i w_i |p_i - t_i| / sum_i w_i (RecBole's MAE without weights)."""
  pred, target, weight = _prepare_regression(pred, target, weight, "mae")
  return float(np.sum(weight * np.abs(pred - target)) / np.sum(weight))


def binary_metrics(names, logits, labels, groups) -> dict[str, float]:
  """`{name: value}` for names in BINARY_METRICS over rows `logits [n]`, `labels [n]`, `groups [n]` (users)."""
  fns = {"auc": lambda: auc(logits, labels), "gauc": lambda: gauc(logits, labels, groups),
         "logloss": lambda: log_loss(logits, labels), "accuracy": lambda: accuracy(logits, labels)}
  return {name: fns[name]() for name in names}


def regression_metrics(names, pred, target) -> dict[str, float]:
  """`{name: value}` for names in REGRESSION_METRICS over `pred [n]`, `target [n]`."""
  fns = {"rmse": rmse, "mae": mae, "mse": mse}
  return {name: fns[name](pred, target) for name in names}


def labeled_report(names, outputs: np.ndarray, targets: np.ndarray, users: np.ndarray, *, task: str = "labeled",
                   tasks: tuple[str, ...] | None = None, domain: np.ndarray | None = None,
                   domains: tuple[str, ...] | None = None) -> dict[str, float]:
  """Metrics of labelled rows overall, per task and per domain, in one flat dict.

  Args:
    names: metric names (BINARY_METRICS for task "labeled", REGRESSION_METRICS for "rating").
    outputs: `[n]` logits (or rating predictions), or `[n, T]` with one logit per task.
    targets: labels / ratings of the same shape.
    users: `[n]` user ids (GAUC's groups).
    tasks: the T task names when outputs are `[n, T]`.
    domain, domains: each row's domain id `[n]` and the domain names, to report every domain too.

  Returns:
    `{name}` overall, `{name}:{task}` per task (T > 1), and `{name}/{domain}` / `{name}:{task}/{domain}`
    per domain; with T tasks `{name}` and `{name}/{domain}` are the means over the tasks. Where AUC or GAUC
    is undefined (the rows, or every user's rows, of a domain hold one class) the key is left out; the other
    metrics are reported.
  """
  outputs, targets = np.asarray(outputs), np.asarray(targets)
  columns = [(None, outputs, targets)] if outputs.ndim == 1 else [
      (tasks[t] if tasks else f"task{t}", outputs[:, t], targets[:, t]) for t in range(outputs.shape[1])]

  def metrics(rows, out, target) -> dict[str, float]:
    if task != "labeled":
      return regression_metrics(names, out[rows], target[rows])
    report, diverged = {}, bool(np.isnan(out[rows]).any())
    for name in names:
      if name in ("auc", "gauc") and diverged:   # a diverged model's scores: no order to measure
        report[name] = float("nan")
        continue
      try:
        report.update(binary_metrics((name,), out[rows], target[rows], users[rows]))
      except ValueError:   # AUC / GAUC of rows (or of every user's rows) holding one class: undefined
        if name not in ("auc", "gauc"):
          raise
    return report

  report: dict[str, float] = {}
  everything = np.arange(len(outputs))
  for name, out, target in columns:
    suffix = "" if name is None else f":{name}"
    report.update({f"{m}{suffix}": v for m, v in metrics(everything, out, target).items()})
    for d, domain_name in enumerate(domains or ()):
      rows = np.flatnonzero(domain == d)
      if len(rows):
        report.update({f"{m}{suffix}/{domain_name}": v for m, v in metrics(rows, out, target).items()})
  if len(columns) > 1:   # the mean over the tasks where the metric is defined, overall and per domain
    for m in names:
      for where in ("", *(f"/{d}" for d in domains or ())):
        values = [report[key] for key in (f"{m}:{name}{where}" for name, _, _ in columns) if key in report]
        if values:
          report[f"{m}{where}"] = float(np.mean(values))
  return report


def score_rows(logits_fn: Callable, params, rows: dict[str, np.ndarray], chunk: int, sharding=None) -> np.ndarray:
  """Logits of every row, computed on device in chunks of `chunk` rows (the last one padded with
  row 0s), copied to the host once at the end.

  Args:
    logits_fn: jitted `f(params, batch) -> [C]` for a batch of `[C]` arrays (each chunk has the
      same shape, so it compiles once).
    params: the model variables.
    rows: per-row arrays of length n (e.g. `user [n]`, `item [n]`); only these are passed.
    chunk: rows per call (rounded up to a multiple of the devices of `sharding`).
    sharding: a `NamedSharding` splitting each chunk over its mesh, as full ranking does
      (`recjax.eval.ranking.evaluate_full`); None: the default device.

  Returns:
    float64 `[n]`, or `[n, T]` for a model with one logit per task.
  """
  n = len(next(iter(rows.values())))
  step = logits_fn
  if sharding is not None:
    chunk, step, params = _sharded(logits_fn, chunk, params, sharding)
  outputs = []
  for start in range(0, n, chunk):
    batch = _chunk_inputs(rows, start, min(start + chunk, n), chunk)
    outputs.append(step(params, batch))                               # dispatched; no host sync yet
  host = fetch(outputs)
  return np.concatenate([np.asarray(o, np.float64) for o in host])[:n] if host else np.zeros(0)

