"""Metrics against a plain-numpy reference (loops) and hand-computed values."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from recjax.errors import ConfigError
from recjax.eval import metrics as M

per_user = jax.jit(M.per_user_metrics, static_argnums=(2, 3))   # one compile instead of many eager ops
sums_of = jax.jit(M.metric_sums, static_argnums=(2, 3))


def reference(hits: np.ndarray, num_relevant: np.ndarray, name: str, k: int) -> np.ndarray:
  """Textbook / RecBole definitions, one user at a time."""
  out = np.zeros(len(hits))
  for u, (row, n) in enumerate(zip(hits, num_relevant)):
    row = [float(row[r]) if r < len(row) else 0.0 for r in range(k)]
    found = sum(row)
    if n == 0:
      continue
    p, rec = found / k, found / n
    if name == "recall":
      out[u] = rec
    elif name == "precision":
      out[u] = p
    elif name == "f1":
      out[u] = 0.0 if p + rec == 0 else 2 * p * rec / (p + rec)
    elif name == "hit":
      out[u] = float(found > 0)
    elif name == "ndcg":
      dcg = sum(row[r] / math.log2(r + 2) for r in range(k))
      idcg = sum(1 / math.log2(r + 2) for r in range(min(int(n), k)))
      out[u] = dcg / idcg
    elif name == "mrr":
      first = next((r for r in range(k) if row[r]), None)
      out[u] = 0.0 if first is None else 1 / (first + 1)
    elif name == "map":
      total, seen = 0.0, 0
      for r in range(k):
        if row[r]:
          seen += 1
          total += seen / (r + 1)
      out[u] = total / min(n, k)
  return out


def random_case(seed: int, users: int = 40, width: int = 12):
  rng = np.random.default_rng(seed)
  hits = rng.random((users, width)) < rng.uniform(0.05, 0.5)
  num_relevant = hits.sum(1) + rng.integers(0, 4, users)        # relevant items may lie outside K
  num_relevant[:3] = 0                                           # users without relevant items
  hits[:3] = False
  return hits, num_relevant


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_matches_reference(seed):
  hits, num_relevant = random_case(seed)
  ks = (1, 5, 12, 20)                                            # 20 > K: missing ranks are misses
  values = per_user(hits, num_relevant, ks, M.METRIC_NAMES)
  assert set(values) == {f"{n}@{k}" for n in M.METRIC_NAMES for k in ks}
  for name in M.METRIC_NAMES:
    for k in ks:
      np.testing.assert_allclose(values[f"{name}@{k}"], reference(hits, num_relevant, name, k),
                                 rtol=1e-5, atol=1e-6, err_msg=f"{name}@{k}")


def test_hand_computed_example():
  # relevant at ranks 1 and 3 of K=5, 2 relevant items in total
  hits = np.array([[1, 0, 1, 0, 0]], np.float32)
  v = {key: float(x[0]) for key, x in per_user(hits, np.array([2]), (5,), M.METRIC_NAMES).items()}
  assert v["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), abs=1e-6)
  assert v["map@5"] == pytest.approx((1 / 1 + 2 / 3) / 2, abs=1e-6)
  assert v["mrr@5"] == pytest.approx(1.0, abs=1e-6)
  assert v["recall@5"] == pytest.approx(1.0, abs=1e-6)
  assert v["precision@5"] == pytest.approx(0.4, abs=1e-6)
  assert v["f1@5"] == pytest.approx(2 * 0.4 / 1.4, abs=1e-6)
  assert v["hit@5"] == 1.0
  # first hit at rank 3, 4 relevant: idcg over min(4, 5) = 4 positions
  hits = np.array([[0, 0, 1, 0, 1]], np.float32)
  v = {key: float(x[0]) for key, x in per_user(hits, np.array([4]), (5,), M.METRIC_NAMES).items()}
  assert v["mrr@5"] == pytest.approx(1 / 3, abs=1e-6)
  assert v["ndcg@5"] == pytest.approx((1 / 2 + 1 / math.log2(6)) / sum(1 / math.log2(r + 2) for r in range(4)),
                                      abs=1e-6)
  assert v["map@5"] == pytest.approx((1 / 3 + 2 / 5) / 4, abs=1e-6)
  assert v["recall@5"] == pytest.approx(0.5, abs=1e-6)


def test_sums_exclude_users_without_relevant_items_and_merge_exactly():
  hits, num_relevant = random_case(3)
  ks, names = (5, 10), ("ndcg", "recall", "map")
  sums, count = sums_of(hits, num_relevant, ks, names)
  assert float(count) == (num_relevant > 0).sum()
  for key in sums:
    name, k = M.parse_metric_key(key)
    ref = reference(hits, num_relevant, name, k)[num_relevant > 0].mean()
    assert float(sums[key]) / float(count) == pytest.approx(ref, rel=1e-5)
  # two chunks, each padded with NaN rows of weight 0, add up to the whole
  def chunk(rows):
    pad = 25 - len(rows)
    return (np.concatenate([hits[rows], np.full((pad, hits.shape[1]), np.nan)]),
            np.concatenate([num_relevant[rows], np.ones(pad)]), ks, names,
            np.concatenate([np.ones(len(rows)), np.zeros(pad)]))
  a, b = sums_of(*chunk(np.arange(20))), sums_of(*chunk(np.arange(20, 40)))
  assert float(a[1] + b[1]) == float(count)
  for key in sums:
    assert float(a[0][key] + b[0][key]) == pytest.approx(float(sums[key]), rel=1e-6)


def test_unknown_names_are_config_errors():
  with pytest.raises(ConfigError, match="valid: recall"):
    M.per_user_metrics(np.zeros((1, 3)), np.ones(1), (3,), ("ndgc",))
  with pytest.raises(ConfigError):
    M.check_metrics(("ndcg",), (0,))
  with pytest.raises(ConfigError):
    M.parse_metric_key("ndcg10")
  assert M.parse_metric_key("map@20") == ("map", 20)
