"""A synthetic dataset with planted structure that real models can find and popularity cannot.

Each user u has a latent vector p_u and each item i a vector q_i and a popularity bias b_i
(Zipf-like: b_i = -zipf * log(rank_i)); each item also has a few likely successors. A user's
sequence is drawn step by step, never repeating an item:

  P(next = i | prev) = (1 - w) * softmax_i(p_u . q_i + b_i) + w * T[prev, i]     (seen items removed,
                                                                                  each term renormalised)

with w = markov_weight and T the successor distribution (w acts as 0 at the first step or once
every successor of prev is seen). Ratings 1-5 grow with p_u . q_i; timestamps increase per user.
Dense ids equal raw tokens ("1", "2", ...), so the planted tables index directly by dense id.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from recjax.data.interactions import PAD_TOKEN, Interactions

SUCCESSOR_PROBS = np.array([0.6, 0.3, 0.1])
AFFINITY_SCALE = 3.0                                             # std of p_u . q_i


class Planted(NamedTuple):
  """The ground truth behind `make_synthetic`, indexed by dense id (row 0 = padding).

  Attributes:
    user_factors: float64 [num_users+1, dim].
    item_factors: float64 [num_items+1, dim].
    bias: float64 [num_items+1] (bias[0] = -inf).
    successors: int64 [num_items+1, k] distinct successors of each item (row 0 unused).
    successor_probs: float64 [k] transition probability of each successor slot.
  """
  user_factors: np.ndarray
  item_factors: np.ndarray
  bias: np.ndarray
  successors: np.ndarray
  successor_probs: np.ndarray

  def affinity(self, users: np.ndarray) -> np.ndarray:
    """softmax(p_u . q + b) over items, padding excluded. float64 [U, num_items+1]."""
    logits = self.user_factors[users] @ self.item_factors.T + self.bias[None, :]
    logits -= logits.max(1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(1, keepdims=True)

  def next_probs(self, affinity: np.ndarray, prev: np.ndarray, seen: np.ndarray, markov_weight: float) -> np.ndarray:
    """Next-item distribution with seen items removed (the generating process).

    Args:
      affinity: [m, N] rows of `affinity(users)`; prev: int [m] previous item (0 = none);
      seen: bool [m, N] items already taken (column 0 must be True).
    Returns:
      float64 [m, N], rows summing to 1.
    """
    rows = np.arange(len(prev))[:, None]
    own = np.where(seen, 0.0, affinity)
    succ = self.successors[prev]                                   # [m, k]
    markov = np.where(seen[rows, succ] | (prev[:, None] == 0), 0.0, self.successor_probs[None, :])
    mass = markov.sum(1, keepdims=True)
    w = np.where(mass > 0, markov_weight, 0.0)                     # [m, 1]
    probs = own * ((1.0 - w) / own.sum(1, keepdims=True))
    probs[rows, succ] += w * markov / np.maximum(mass, 1e-12)
    return probs


def planted_structure(num_users: int = 1000, num_items: int = 500, dim: int = 8, zipf: float = 1.0,
                      seed: int = 0) -> Planted:
  """Draws the ground truth (see the module docstring); the same seed gives the same truth."""
  rng = np.random.default_rng([seed, 0])
  users = np.vstack([np.zeros((1, dim)), rng.normal(size=(num_users, dim))])
  items = np.vstack([np.zeros((1, dim)), rng.normal(size=(num_items, dim))]) * (AFFINITY_SCALE / np.sqrt(dim))
  rank = rng.permutation(num_items) + 1
  bias = np.concatenate([[-np.inf], -zipf * np.log(rank)])
  k = min(len(SUCCESSOR_PROBS), num_items - 1)
  # k distinct successors per item, uniform over the other items (so transitions carry no popularity).
  succ = rng.integers(1, num_items + 1, (num_items, k))
  while (bad := _bad_successors(succ)).any():
    succ[bad] = rng.integers(1, num_items + 1, (int(bad.sum()), k))
  successors = np.vstack([np.ones((1, k), np.int64), succ])
  probs = SUCCESSOR_PROBS[:k] / SUCCESSOR_PROBS[:k].sum()
  return Planted(users, items, bias, successors, probs)


def make_synthetic(num_users: int = 1000, num_items: int = 500, dim: int = 8, mean_length: int = 40,
                   markov_weight: float = 0.5, seed: int = 0, name: str = "synthetic") -> Interactions:
  """Interactions drawn from `planted_structure(num_users, num_items, dim, seed=seed)`.

  Args:
    num_users, num_items: real users / items (tables get one more row, for padding).
    dim: latent dimension.
    mean_length: mean interactions per user (each user has at least min(5, mean_length) and never fewer
      than 3, so leave-one-out gives everyone a valid and a test item; at most num_items).
    markov_weight: weight of the successor transition in the next-item mixture.
    seed: the same seed gives the same data.
  Returns:
    Interactions with timestamps (float64 seconds) and ratings (float32 in 1..5), rows in time order.
  """
  if num_items < 3:
    raise ValueError(f"make_synthetic needs at least 3 items (a train, a valid and a test one), got {num_items}")
  truth = planted_structure(num_users, num_items, dim, seed=seed)
  rng = np.random.default_rng([seed, 1])
  low = max(3, min(5, mean_length))
  lengths = np.minimum(low + rng.poisson(max(mean_length - low, 0), num_users), num_items)
  users = np.argsort(-lengths, kind="stable") + 1                # longest first: active users are a prefix
  lengths = lengths[users - 1]
  affinity = truth.affinity(users)                               # [U, N]
  seen = np.zeros((num_users, num_items + 1), bool)
  seen[:, 0] = True
  prev = np.zeros(num_users, np.int64)
  chosen = np.zeros((num_users, int(lengths.max())), np.int64)   # [U, T]
  for t in range(chosen.shape[1]):                               # vectorised across users
    m = int((lengths > t).sum())
    cdf = np.cumsum(truth.next_probs(affinity[:m], prev[:m], seen[:m], markov_weight), axis=1)
    draw = (1.0 - rng.random(m)) * cdf[:, -1]                    # in (0, total]
    item = np.minimum((cdf < draw[:, None]).sum(1), num_items)
    chosen[:m, t], prev[:m] = item, item
    seen[np.arange(m), item] = True

  step = np.arange(chosen.shape[1])[None, :] < lengths[:, None]
  user = np.broadcast_to(users[:, None], chosen.shape)[step]
  item = chosen[step]
  gaps = 1.0 + np.floor(rng.exponential(86400.0, chosen.shape))
  time = (np.floor(rng.uniform(0, 3e7, num_users))[:, None] + np.cumsum(gaps, axis=1))[step]
  score = (truth.user_factors[user] * truth.item_factors[item]).sum(1)
  score = (score - score.mean()) / max(score.std(), 1e-12)
  rating = np.clip(np.rint(3.0 + score + 0.5 * rng.normal(size=len(score))), 1, 5)
  order = np.argsort(time, kind="stable")
  return Interactions(
      user=user[order].astype(np.int32), item=item[order].astype(np.int32),
      user_vocab=_vocab(num_users), item_vocab=_vocab(num_items),
      timestamp=time[order].astype(np.float64), rating=rating[order].astype(np.float32), name=name)


def _bad_successors(succ: np.ndarray) -> np.ndarray:
  """bool [N]: row i (item i+1) repeats a successor or lists itself."""
  own = np.arange(1, len(succ) + 1)[:, None]
  return (np.diff(np.sort(succ, 1), axis=1) == 0).any(1) | (succ == own).any(1)


def _vocab(n: int) -> np.ndarray:
  return np.array([PAD_TOKEN] + [str(i) for i in range(1, n + 1)], dtype=object)
