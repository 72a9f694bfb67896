"""Binary-classification metrics against plain O(n^2) / loop references and hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from recjax.eval import classification as C


def ref_auc(scores, labels, weight):
  """Every (positive, negative) pair: a win counts 1, a tie 1/2."""
  num = den = 0.0
  for i in range(len(scores)):
    for j in range(len(scores)):
      if labels[i] and not labels[j]:
        pair = weight[i] * weight[j]
        den += pair
        num += pair * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
  return num / den


def ref_accuracy(scores, labels, threshold, weight):
  hits = [w * float((s > threshold) == bool(y)) for s, y, w in zip(scores, labels, weight)]
  return sum(hits) / sum(weight)


def ref_log_loss(logits, labels, weight):
  total = 0.0
  for z, y, w in zip(logits, labels, weight):
    p = 1 / (1 + math.exp(-z))
    total += -w * (math.log(p) if y else math.log(1 - p))
  return total / sum(weight)


def random_case(seed: int, n: int = 60, ties: bool = False):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=n) * 2
  if ties:
    scores = np.round(scores)  # a handful of distinct values: many ties, within and across classes
  labels = rng.random(n) < 0.4
  labels[:2] = [True, False]  # both classes present
  weight = rng.uniform(0.1, 3.0, n) * (rng.random(n) > 0.2)  # some zero weights
  weight[:2] = 1.0
  return scores, labels, weight


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_reference(seed, ties):
  scores, labels, weight = random_case(seed, ties=ties)
  if ties:
    assert len(np.unique(scores)) < len(scores) // 3
  ones = np.ones_like(weight)
  for w in (weight, ones):
    assert C.auc(scores, labels, w) == pytest.approx(ref_auc(scores, labels, w), abs=1e-12)
    for threshold in (0.0, 0.5, -1.0):
      got = C.accuracy(scores, labels, threshold=threshold, weight=w)
      assert got == pytest.approx(ref_accuracy(scores, labels, threshold, w), abs=1e-12)
    assert C.log_loss(scores, labels, w) == pytest.approx(ref_log_loss(scores, labels, w), rel=1e-10)
  assert C.auc(scores, labels) == pytest.approx(ref_auc(scores, labels, ones), abs=1e-12)
  assert C.accuracy(scores, labels) == pytest.approx(ref_accuracy(scores, labels, 0.0, ones), abs=1e-12)
  assert C.log_loss(scores, labels) == pytest.approx(ref_log_loss(scores, labels, ones), rel=1e-10)


def test_auc_matches_average_ranks():
  """Mann-Whitney form: (sum of the positives' average ranks - P (P + 1) / 2) / (P N)."""
  scores, labels, _ = random_case(3, n=80, ties=True)
  order = np.argsort(scores, kind="stable")
  ranks = np.empty(len(scores))
  ranks[order] = np.arange(1, len(scores) + 1)
  for value in np.unique(scores):  # average the ranks within each tie group
    ranks[scores == value] = ranks[scores == value].mean()
  p, n = labels.sum(), (~labels).sum()
  assert C.auc(scores, labels) == pytest.approx((ranks[labels].sum() - p * (p + 1) / 2) / (p * n), abs=1e-12)


def test_integer_weights_equal_repetition():
  scores, labels, _ = random_case(4, n=30, ties=True)
  counts = np.random.default_rng(4).integers(0, 4, 30)
  counts[:2] = 1
  rep = lambda a: np.repeat(a, counts)  # noqa: E731
  assert C.auc(scores, labels, counts) == pytest.approx(C.auc(rep(scores), rep(labels)), abs=1e-12)
  assert C.accuracy(scores, labels, 0.3, counts) == pytest.approx(C.accuracy(rep(scores), rep(labels), 0.3))
  assert C.log_loss(scores, labels, counts) == pytest.approx(C.log_loss(rep(scores), rep(labels)), rel=1e-12)


def test_perfect_inverted_and_constant_rankings():
  labels = np.array([0, 1, 0, 1, 1, 0])
  scores = np.where(labels == 1, 2.0, -2.0) + np.arange(6) * 0.1
  assert C.auc(scores, labels) == 1.0
  assert C.auc(-scores, labels) == 0.0
  assert C.auc(np.zeros(6), labels) == 0.5  # all tied
  assert C.accuracy(scores, labels) == 1.0
  assert C.accuracy(-scores, labels) == 0.0
  assert C.auc(np.array([np.inf, -np.inf, 0.0]), np.array([1, 0, 1])) == 1.0


def test_hand_computed_example():
  # positives score 0.8 and 0.4, negatives 0.4 and 0.1: pairs (0.8>0.4) 1, (0.8>0.1) 1, (0.4=0.4) 1/2, (0.4>0.1) 1
  scores = np.array([0.8, 0.4, 0.4, 0.1])
  labels = np.array([True, True, False, False])
  assert C.auc(scores, labels) == pytest.approx(3.5 / 4)
  # weight 2 on the tied negative: (2 + 1 + 2 * 0.5 + 1) / (2 * 3)
  assert C.auc(scores, labels, np.array([1.0, 1.0, 2.0, 1.0])) == pytest.approx(5 / 6)
  assert C.accuracy(scores, labels, threshold=0.3) == pytest.approx(3 / 4)  # 0.4 negative predicted positive
  assert C.accuracy(scores, labels, threshold=0.4) == pytest.approx(3 / 4)  # 0.4 positive predicted negative
  logits, y = np.array([0.0, math.log(3.0)]), np.array([1, 0])  # p = 1/2 and 3/4
  assert C.log_loss(logits, y) == pytest.approx((math.log(2) + math.log(4)) / 2)
  assert C.log_loss(logits, y, np.array([3.0, 1.0])) == pytest.approx((3 * math.log(2) + math.log(4)) / 4)


def test_log_loss_is_stable():
  logits = np.array([800.0, -800.0, 800.0, -800.0])
  labels = np.array([1, 0, 0, 1])
  assert C.log_loss(logits[:2], labels[:2]) == 0.0
  assert C.log_loss(logits, labels) == pytest.approx(400.0)  # two right (0), two wrong by 800
  assert C.log_loss([np.inf, -np.inf], [0, 1], [0.0, 1.0]) == np.inf
  assert C.log_loss([np.inf, 3.0], [0, 1], [0.0, 1.0]) == pytest.approx(math.log1p(math.exp(-3.0)))


def test_errors():
  with pytest.raises(ValueError, match="both classes"):
    C.auc([0.1, 0.2, 0.3], [1, 1, 1])
  with pytest.raises(ValueError, match="both classes"):
    C.auc([0.1, 0.2, 0.3], [False, False, False])
  with pytest.raises(ValueError, match="both classes"):  # the only negative has weight 0
    C.auc([0.1, 0.2, 0.3], [1, 0, 1], [1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="NaN"):
    C.auc([0.1, np.nan], [1, 0])
  for fn in (C.auc, C.accuracy, C.log_loss):
    with pytest.raises(ValueError, match="same length"):
      fn([0.1, 0.2], [1, 0, 1])
    with pytest.raises(ValueError, match="1-D"):
      fn(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="0/1"):
      fn([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="shape"):
      fn([0.1, 0.2], [1, 0], weight=[1.0])
    with pytest.raises(ValueError, match=">= 0"):
      fn([0.1, 0.2], [1, 0], weight=[1.0, -1.0])
    with pytest.raises(ValueError, match="positive weight"):
      fn([0.1, 0.2], [1, 0], weight=[0.0, 0.0])
    with pytest.raises(ValueError, match="positive weight"):
      fn([], [])
  with pytest.raises(ValueError, match="threshold"):
    C.accuracy([0.1, 0.2], [1, 0], [0.0, 1.0])  # a weight passed where the threshold goes
