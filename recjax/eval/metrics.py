"""Top-K ranking metrics as pure jnp functions of a hit matrix.

Every metric reads `hits [U, K]` (1 where the item at 0-based rank r is relevant, 0 otherwise,
ranks beyond the list being non-hits) and `num_relevant [U]` (the number of relevant items of
each user, hits or not) and returns one value per user `[U]`. Definitions follow RecBole 1.2.1
(`recbole/evaluator/metrics.py`), with r the 0-based rank and n = num_relevant:

  recall@k    = sum_{r<k} hit_r / n
  precision@k = sum_{r<k} hit_r / k
  f1@k        = 2 P R / (P + R)                      (0 when P + R = 0)
  hit@k       = 1[sum_{r<k} hit_r > 0]               (hit ratio, HR)
  ndcg@k      = DCG / IDCG,  DCG = sum_{r<k} hit_r / log2(r + 2),
                IDCG = sum_{r<min(n, k)} 1 / log2(r + 2)
  mrr@k       = 1 / (r* + 1) for the first hit r* < k, else 0
  map@k       = 1 / min(n, k) * sum_{r<k} precision@(r+1) * hit_r

Users with n = 0 have no defined value: metrics return 0 for them and `metric_sums` gives them
weight 0, so averages run over users with at least one relevant item. Sums and counts (not
means) are returned so that chunks of users merge exactly by addition.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax.numpy as jnp

from recjax.errors import ConfigError

SAMPLED_PREFIX = "sampled_"   # keys of metrics over a sampled ranking (recjax.eval.ranking.evaluate_sampled)

Array = jnp.ndarray


def _safe_div(num: Array, den: Array) -> Array:
  """num / den where den > 0, else 0 (no NaN leaks through the unused branch)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0.0)


def _ranks(k: int) -> Array:
  """[k] 1-based ranks as float32."""
  return jnp.arange(1, k + 1, dtype=jnp.float32)


def recall(hits: Array, num_relevant: Array) -> Array:
  """[U, k], [U] -> [U]: share of the relevant items found in the top k."""
  return _safe_div(hits.sum(-1), num_relevant)


def precision(hits: Array, num_relevant: Array) -> Array:
  """[U, k], [U] -> [U]: share of the top k that is relevant (missing ranks count as misses)."""
  del num_relevant
  return hits.sum(-1) / hits.shape[-1]


def f1(hits: Array, num_relevant: Array) -> Array:
  """[U, k], [U] -> [U]: harmonic mean of precision and recall, 0 when both are 0."""
  p, r = precision(hits, num_relevant), recall(hits, num_relevant)
  return _safe_div(2 * p * r, p + r)


def hit(hits: Array, num_relevant: Array) -> Array:
  """[U, k], [U] -> [U]: 1 when any of the top k is relevant (hit ratio)."""
  del num_relevant
  return (hits.sum(-1) > 0).astype(jnp.float32)


def ndcg(hits: Array, num_relevant: Array) -> Array:
  """[U, k], [U] -> [U]: DCG / IDCG with gain 1 / log2(rank + 2); IDCG over min(n, k) hits."""
  k = hits.shape[-1]
  discount = 1.0 / jnp.log2(jnp.arange(k, dtype=jnp.float32) + 2)        # [k]
  dcg = (hits * discount).sum(-1)
  ideal_cum = jnp.concatenate([jnp.zeros(1), jnp.cumsum(discount)])      # [k+1], IDCG of j hits
  ideal_len = jnp.clip(num_relevant, 0, k).astype(jnp.int32)
  return _safe_div(dcg, ideal_cum[ideal_len])


def mrr(hits: Array, num_relevant: Array) -> Array:
  """[U, k], [U] -> [U]: reciprocal rank of the first hit (1/r is decreasing, so it is the max)."""
  del num_relevant
  return (hits / _ranks(hits.shape[-1])).max(-1)


def average_precision(hits: Array, num_relevant: Array) -> Array:
  """[U, k], [U] -> [U]: sum of precision@(r+1) at each hit, over min(n, k) (RecBole's MAP)."""
  k = hits.shape[-1]
  prec = jnp.cumsum(hits, -1) / _ranks(k)                                # [U, k]
  return _safe_div((prec * hits).sum(-1), jnp.minimum(num_relevant, k))


METRICS: Mapping[str, Callable[[Array, Array], Array]] = {
    "recall": recall, "precision": precision, "f1": f1, "hit": hit, "ndcg": ndcg, "mrr": mrr,
    "map": average_precision,
}
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)


def check_metrics(names: Sequence[str], ks: Sequence[int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Validated (names, ks) as tuples; ConfigError listing the valid names on an unknown one."""
  if isinstance(names, str) or isinstance(ks, int):
    raise ConfigError(f"metrics and ks must be sequences, got {names!r} and {ks!r}")
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise ConfigError(f"unknown metric(s) {unknown}; valid: {', '.join(METRIC_NAMES)}")
  bad_k = [k for k in ks if not isinstance(k, int) or isinstance(k, bool) or k < 1]
  if bad_k or not ks:
    raise ConfigError(f"ks must be positive integers, got {list(ks)}")
  return tuple(names), tuple(ks)


def parse_metric_key(key: str) -> tuple[str, int]:
  """'ndcg@10' -> ('ndcg', 10); ConfigError when malformed or unknown."""
  name, sep, k = key.partition("@")
  if not sep or not k.isdigit() or int(k) < 1:
    raise ConfigError(f"metric key {key!r} is not of the form name@k (e.g. 'ndcg@10')")
  check_metrics([name], [int(k)])
  return name, int(k)


def per_user_metrics(hits: Array, num_relevant: Array, ks: Sequence[int],
                     names: Sequence[str]) -> dict[str, Array]:
  """Per-user values of every metric at every cut-off.

  Args:
    hits: [U, K] bool/float, 1 where the item at rank r is relevant; K < max(ks) is padded with
      misses (a list shorter than k).
    num_relevant: [U] number of relevant items of each user.
    ks: cut-offs, e.g. (10, 20).
    names: metric names from METRIC_NAMES.
  Returns:
    {"name@k": [U] float32}.
  """
  names, ks = check_metrics(names, ks)
  hits = jnp.asarray(hits, jnp.float32)
  num_relevant = jnp.asarray(num_relevant, jnp.float32)
  if hits.shape[-1] < max(ks):
    hits = jnp.pad(hits, ((0, 0), (0, max(ks) - hits.shape[-1])))
  return {f"{name}@{k}": METRICS[name](hits[:, :k], num_relevant) for k in ks for name in names}


def metric_rows(hits: Array, num_relevant: Array, ks: Sequence[int], names: Sequence[str],
                weight: Array | None = None) -> tuple[dict[str, Array], Array]:
  """Weighted per-user metrics and weights: each user's figures depend on that user's row alone, so
  however the users are split over devices the values are the same, and a sum of them on the host
  (`math.fsum`) is exact and order-free.

  A user's weight is `weight` (default 1; 0 for padded rows) times 1[num_relevant > 0].

  Args:
    hits: [U, K]; num_relevant: [U]; weight: [U] or None.
  Returns:
    ({"name@k": [U] weight * value}, [U] weight).
  """
  values = per_user_metrics(hits, num_relevant, ks, names)
  w = (jnp.asarray(num_relevant) > 0).astype(jnp.float32)
  if weight is not None:
    w = w * jnp.asarray(weight, jnp.float32)
  keep = w > 0                                # padded rows may hold NaN: never multiply them in
  return {key: jnp.where(keep, v * w, 0.0) for key, v in values.items()}, w


def metric_sums(hits: Array, num_relevant: Array, ks: Sequence[int], names: Sequence[str],
                weight: Array | None = None) -> tuple[dict[str, Array], Array]:
  """Weighted sums of the per-user metrics and the total weight (`metric_rows` summed on device):
  mean = sums[key] / count.

  Returns:
    ({"name@k": scalar sum}, scalar count).
  """
  rows, w = metric_rows(hits, num_relevant, ks, names, weight)
  return {key: v.sum() for key, v in rows.items()}, w.sum()
