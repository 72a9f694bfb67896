"""Binary-classification metrics for "will the user like the next item" classifiers.

Each metric reads `scores [n]` (logits: higher = more likely positive), `labels [n]` (bool or 0/1)
and optional example weights `weight [n]` (default 1; 0 drops an example), and returns a Python
float. With P / N the positive / negative examples and w the weights:

  auc      = sum_{i in P, j in N} w_i w_j (1[s_i > s_j] + 1/2 1[s_i = s_j]) / (sum_P w * sum_N w)
  accuracy = sum_i w_i 1[(s_i > threshold) = y_i] / sum_i w_i
  log_loss = sum_i w_i (y_i softplus(-s_i) + (1 - y_i) softplus(s_i)) / sum_i w_i
           = -mean_w [y log sigmoid(s) + (1 - y) log(1 - sigmoid(s))]

AUC is the (weighted) Mann-Whitney U statistic divided by |P| |N|: the probability that a random
positive outscores a random negative, ties counting 1/2 (the same as ranking with average ranks;
what `sklearn.metrics.roc_auc_score` computes). It is computed in O(n log n) by sorting.
Everything runs in float64 numpy on the host: these are evaluation metrics, not traced code.
"""
from __future__ import annotations

import numpy as np


def _prepare(scores, labels, weight, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validated float64 (scores [n], labels [n] in {0, 1}, weight [n] >= 0 with a positive sum)."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(f"{name}: scores and labels must be 1-D of the same length, got {scores.shape} and {labels.shape}")
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError(f"{name}: labels must be bool or 0/1")
  labels = labels.astype(np.float64)
  weight = np.ones_like(scores) if weight is None else np.asarray(weight, np.float64)
  if weight.shape != scores.shape:
    raise ValueError(f"{name}: weight must have the shape of scores {scores.shape}, got {weight.shape}")
  if not np.all(np.isfinite(weight) & (weight >= 0)):
    raise ValueError(f"{name}: weights must be finite and >= 0")
  if not np.sum(weight) > 0:
    raise ValueError(f"{name}: no examples with positive weight")
  return scores, labels, weight


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

  Args:
    logits: `[n]`; labels: `[n]` bool or 0/1; weight: `[n]` or None.

  Returns:
    sum_i w_i l_i / sum_i w_i (inf if a weighted example has an infinite logit on the wrong side).
  """
  logits, labels, weight = _prepare(logits, labels, weight, "log_loss")
  per_example = np.where(labels == 1, np.logaddexp(0.0, -logits), np.logaddexp(0.0, logits))  # [n]
  keep = weight > 0  # a dropped example never gives 0 * inf
  return float(np.sum(weight[keep] * per_example[keep]) / np.sum(weight))
