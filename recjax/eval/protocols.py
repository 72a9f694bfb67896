"""Evaluation protocols: how a dataset is split and ranked, with presets from the literature.

`recbole-general` and `recbole-sequential` mirror RecBole 1.2.1's defaults (`overall.yaml`):
general models split each user's interactions at random 80/10/10 and rank all items with the
training items masked; sequential models split leave-one-out in time order and mask only the
padding item (RecBole's `FullSortEvalDataLoader` passes no history for sequential models).
`recbole-context` mirrors its context-aware preset (`quick_start_config/context-aware.yaml`): all
rows split at random 80/10/10 (`group_by: ~`), each part's rows evaluated as labelled
(`mode: labeled`, label = rating >= threshold) with AUC and LogLoss (+ GAUC), AUC selecting;
`rating` is the same split with the rating as a regression target (RMSE selecting, lower is better).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from recjax.data.interactions import Interactions, pair_keys
from recjax.errors import ConfigError
from recjax.eval.classification import BINARY_METRICS, LOWER_IS_BETTER, REGRESSION_METRICS
from recjax.eval.metrics import SAMPLED_PREFIX, check_metrics, parse_metric_key

SPLITS = ("random_ratio", "leave_one_out", "leave_last_out", "temporal_ratio", "global_temporal", "given",
          "random_rows", "domain_rows")
# What is evaluated: a ranking of items per user, or labelled rows (0/1 labels | ratings).
TASKS = {"ranking": None, "labeled": BINARY_METRICS, "rating": REGRESSION_METRICS}
DISTRIBUTIONS = ("uniform", "popularity")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A split and a ranking protocol.

  Attributes:
    name: preset or user name, for logs.
    split: one of SPLITS.
    ratios: train/valid/test shares for the ratio splits.
    mask_history: mask the user's earlier items (train, + valid at test time) before top-k.
    max_len: history length fed to sequential models.
    ks, metrics: cut-offs and metric names (recjax.eval.metrics.METRIC_NAMES; for labelled tasks
      names from recjax.eval.classification, without cut-offs).
    valid_metric: the "name@k" (ranking) or "name" (labelled) key used for early stopping and model
      selection; see `higher_is_better`. With `sampled`, "sampled_name@k" selects on the sampled ranking.
    sampled: number of sampled negatives, or None for full ranking.
    sampled_distribution: "uniform" or "popularity".
    task: "ranking", or labelled rows: "labeled" (0/1 labels, binary metrics) or "rating" (regression).
    cold_items: share of the items held out of training entirely (cold start, `recjax.data.splits.
      hold_out_items`); their interactions form the "cold" phase, ranked over the held-out items only.
    evaluate_once: evaluate only after the last epoch, whatever `eval_every` says (no early stopping, no
      choice among epochs): for a split without a valid part whose authors never selected on test.
  """
  name: str
  split: str
  ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
  mask_history: bool = True
  max_len: int = 50
  ks: tuple[int, ...] = (10,)
  metrics: tuple[str, ...] = ("recall", "mrr", "ndcg", "hit", "precision")
  valid_metric: str = "mrr@10"
  sampled: int | None = None
  sampled_distribution: str = "uniform"
  task: str = "ranking"
  cold_items: float = 0.0
  evaluate_once: bool = False

  def __post_init__(self):
    if not 0 <= self.cold_items < 1 or (self.cold_items and (self.task != "ranking" or self.split == "given")):
      raise ConfigError(f"protocol {self.name!r}: cold_items must be in [0, 1), on a ranking task with a split made "
                        "here (not given)")
    if self.split not in SPLITS:
      raise ConfigError(f"protocol {self.name!r}: unknown split {self.split!r}; valid: {', '.join(SPLITS)}")
    if len(self.ratios) != 3 or not all(math.isfinite(r) and r >= 0 for r in self.ratios) \
        or abs(sum(self.ratios) - 1) > 1e-6:
      raise ConfigError(f"protocol {self.name!r}: ratios must be 3 non-negative shares summing to 1")
    if self.task not in TASKS:
      raise ConfigError(f"protocol {self.name!r}: unknown task {self.task!r}; valid: {', '.join(TASKS)}")
    if self.task != "ranking":
      unknown = sorted(set(self.metrics) - set(TASKS[self.task]))
      if unknown or self.valid_metric not in self.metrics:
        raise ConfigError(f"protocol {self.name!r}: task {self.task!r} computes {list(TASKS[self.task])}; "
                          f"got metrics {list(self.metrics)}, valid_metric {self.valid_metric!r}")
      return
    check_metrics(self.metrics, self.ks)
    key = self.valid_metric
    if self.sampled is not None and key.startswith(SAMPLED_PREFIX):   # a metric of the sampled ranking
      key = key[len(SAMPLED_PREFIX):]
    try:
      name, k = parse_metric_key(key)
    except ConfigError as err:
      raise ConfigError(f"protocol {self.name!r}: valid_metric {self.valid_metric!r}: {err}") from None
    if name not in self.metrics or k not in self.ks:
      raise ConfigError(f"protocol {self.name!r}: valid_metric {self.valid_metric!r} is not computed "
                        f"(metrics {list(self.metrics)}, ks {list(self.ks)})")
    if self.sampled is not None and self.sampled < 1:
      raise ConfigError(f"protocol {self.name!r}: sampled must be a positive count or None")
    if self.sampled_distribution not in DISTRIBUTIONS:
      raise ConfigError(f"protocol {self.name!r}: sampled_distribution must be one of {DISTRIBUTIONS}")


_BERT4REC_SAMPLED = Protocol("bert4rec-sampled", split="leave_one_out", mask_history=False, max_len=50, ks=(1, 5, 10),
                             metrics=("hit", "ndcg", "mrr"), valid_metric="sampled_ndcg@10", sampled=100,
                             sampled_distribution="popularity")

PRESETS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("recbole-general", split="random_ratio", ratios=(0.8, 0.1, 0.1), mask_history=True),
    Protocol("recbole-sequential", split="leave_one_out", mask_history=False, max_len=50),
    Protocol("lightgcn", split="given", mask_history=True, ks=(20,), valid_metric="ndcg@20"),
    _BERT4REC_SAMPLED,
    # The same ranking on the BERT4Rec authors' code's data: each user's second-to-last item is trained on,
    # not held out, so there is no valid part; test is evaluated once, after the last epoch, as their code does.
    dataclasses.replace(_BERT4REC_SAMPLED, name="bert4rec-code", split="leave_last_out", evaluate_once=True),
    # Cold start: 20% of the items (at random) never seen in training; the rest split as recbole-sequential.
    Protocol("cold-start", split="leave_one_out", mask_history=False, max_len=50, ks=(10, 20), cold_items=0.2,
             valid_metric="ndcg@10"),
    Protocol("recbole-context", split="random_rows", ratios=(0.8, 0.1, 0.1), task="labeled",
             metrics=("auc", "gauc", "logloss"), valid_metric="auc"),
    # Multi-scenario: as recbole-context, but the rows of each domain are split 80/10/10 on their own, so
    # every domain is in train, valid and test (recjax.data.domains.split_by_domain).
    Protocol("multidomain", split="domain_rows", ratios=(0.8, 0.1, 0.1), task="labeled",
             metrics=("auc", "gauc", "logloss"), valid_metric="auc"),
    Protocol("rating", split="random_rows", ratios=(0.8, 0.1, 0.1), task="rating",
             metrics=("rmse", "mae", "mse"), valid_metric="rmse"),
)}


def metric_parts(key: str) -> tuple[str, str, str]:
  """`metric[:task][/domain]` -> (metric, task, domain), "" for a part the key leaves out."""
  head, _, domain = key.partition("/")
  metric, _, task = head.partition(":")
  return metric, task, domain


def higher_is_better(metric: str) -> bool:
  """Whether a larger value of `metric` (a ranking "name@k" or a labelled metric name, maybe of one task
  or domain: "logloss:click/d2") is better: False for losses and errors (logloss, rmse, mae, mse), as
  RecBole's `smaller` metrics."""
  return metric_parts(metric)[0] not in LOWER_IS_BETTER


def get_protocol(name: str) -> Protocol:
  """The preset called `name`; ConfigError listing the presets when unknown."""
  if name not in PRESETS:
    raise ConfigError(f"unknown protocol {name!r}; valid: {', '.join(PRESETS)}")
  return PRESETS[name]


def item_sets(inter: Interactions, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distinct items of each listed user, sorted, as CSR.

  Args:
    inter: interactions; users: [U] distinct dense user ids.
  Returns:
    (items [nnz] int32, offsets [U+1] int64): row r is items[offsets[r]:offsets[r+1]].
  """
  n = inter.num_items
  keys = np.unique(pair_keys(inter))                                  # sorted by (user, item)
  row_of = np.full(inter.num_users, -1, np.int64)
  row_of[users] = np.arange(len(users))
  rows = row_of[keys // n]
  order = np.argsort(rows[rows >= 0], kind="stable")                  # rows follow `users` order
  items = (keys[rows >= 0] % n).astype(np.int32)[order]
  counts = np.bincount(rows[rows >= 0], minlength=len(users))
  return items, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def padded_item_sets(inter: Interactions, users: np.ndarray) -> np.ndarray:
  """item_sets as [U, W] int32, 0-padded, W = max(1, largest set)."""
  items, offsets = item_sets(inter, users)
  lengths = np.diff(offsets)
  out = np.zeros((len(users), max(1, int(lengths.max(initial=0)))), np.int32)
  rows = np.repeat(np.arange(len(users)), lengths)
  out[rows, np.arange(len(items)) - offsets[rows]] = items
  return out


def cold_targets(split: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, Interactions]:
  """The cold phase of a split with held-out items (`split.cold`): every user with a held-out
  interaction, ranked over the held-out items only.

  Returns:
    users [U] (sorted), positives [U, P] (the user's held-out items), exclude [U, W] (every item
    that is not held out, so only held-out items are ranked), history (train + valid + test: all
    the user's warm interactions, the input of sequential models).
  """
  cold = split.cold
  users = np.unique(cold.user).astype(np.int32)
  warm_items = np.setdiff1d(np.arange(1, cold.num_items), split.cold_items).astype(np.int32)
  exclude = np.broadcast_to(warm_items, (len(users), max(len(warm_items), 1)))
  history = split.train.concat(split.valid).concat(split.test)
  return users, padded_item_sets(cold, users), exclude, history


def eval_targets(split: Any, phase: str, mask_history: bool, csr: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, Any, Interactions]:
  """Who is evaluated on what, for one phase of a split.

  valid: positives = the valid items, history = train.
  test:  positives = the test items, history = train + valid.

  Args:
    split: anything with `train`, `valid`, `test` Interactions (a recjax.data.splits.Split).
    phase: "valid" or "test".
    mask_history: whether the history items are excluded from the ranking.
    csr: return exclude as CSR (items, offsets [U+1]) instead of padded; evaluate_full takes
      both, and CSR keeps host memory linear when a few users have huge histories.
  Returns:
    users [U] (sorted, each with >= 1 positive), positives [U, P] (distinct, 0-padded),
    exclude [U, H] (the history items that are not among the user's positives, as RecBole's
    `used - positive`: a repeat of a history item stays rankable; [U, 1] zeros without masking),
    history Interactions.
  """
  if phase == "valid":
    held_out, history = split.valid, split.train
  elif phase == "test":
    held_out, history = split.test, split.train.concat(split.valid)
  else:
    raise ConfigError(f"phase must be 'valid' or 'test', got {phase!r}")
  users = np.unique(held_out.user).astype(np.int32)
  positives = padded_item_sets(held_out, users)
  if mask_history:
    masked = history.subset(~np.isin(pair_keys(history), pair_keys(held_out)))
    exclude = item_sets(masked, users) if csr else padded_item_sets(masked, users)
  elif csr:
    exclude = np.zeros(0, np.int32), np.zeros(len(users) + 1, np.int64)
  else:
    exclude = np.zeros((len(users), 1), np.int32)
  return users, positives, exclude, history
