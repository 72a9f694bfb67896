"""Most-popular baseline: every user gets the same ranking, items ordered by training count.

It fits the two-tower contract with d = 1: user vector 1, item vector log(count), so
score(u, i) = log count(i) ranks items by popularity (log is monotone and keeps the scores small).
The parameters are not learned: `pop_params(item_counts)` sets them from counts.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

# Score of items never seen in training and of the padding row: below log(1) = 0, finite so that
# score arithmetic (masking, top-k, metrics) never meets inf - inf.
UNSEEN_SCORE = -1e9


UNSEEN_ORDERS = ("tied", "random")


def pop_params(item_counts, unseen_order: str = "tied", seed: int = 0) -> dict:
  """Parameters of `Pop` from item counts.

  Args:
    item_counts: `[N]` number of training interactions of each item (row 0 = padding, ignored).
    unseen_order: how items without a count are ordered among themselves: "tied" (one score; the
      evaluation counts ties against the held-out items, so among them Pop is credited with nothing)
      or "random" (a seeded permutation: on items held out of training, cold start, the figure of a
      random order).
    seed: the permutation's seed ("random").

  Returns:
    `{"params": {"log_count": [N] float32}}` with log(count) where count > 0, else `UNSEEN_SCORE`
    (always for the padding row 0), minus 128 * (1 + the item's place in the permutation) for "random":
    below log(1) = 0 and distinct in float32 (whose spacing is 128 up to 2^31 in magnitude).
  """
  if unseen_order not in UNSEEN_ORDERS:
    raise ValueError(f"unseen_order must be one of {UNSEEN_ORDERS}, got {unseen_order!r}")
  counts = np.asarray(item_counts, dtype=np.float64)
  log_count = np.full(counts.shape, UNSEEN_SCORE, dtype=np.float64)
  seen = counts > 0
  log_count[seen] = np.log(counts[seen])
  if unseen_order == "random":
    unseen = np.flatnonzero(~seen)
    if -UNSEEN_SCORE + 128.0 * len(unseen) >= 2.0**31:
      raise ValueError(f"unseen_order 'random': {len(unseen):,} unseen items cannot get distinct float32 scores")
    log_count[unseen] -= 128.0 * (1 + np.random.default_rng(seed).permutation(len(unseen)))
  log_count[0] = UNSEEN_SCORE
  return {"params": {"log_count": jnp.asarray(log_count, dtype=jnp.float32)}}


class Pop(nn.Module):
  """Popularity model: `user_repr -> ones [B, 1]`, `item_repr -> log count [N, 1]`."""

  num_items: int
  unseen_order: str = "tied"    # see pop_params
  unseen_seed: int = 0          # the permutation of unseen_order "random"
  kind: ClassVar[str] = "popularity"

  def setup(self):
    self.log_count = self.param("log_count", nn.initializers.zeros, (self.num_items,), jnp.float32)

  def user_repr(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Reads `batch["user"] [B]` (or `batch["seq"] [B, L]`) only for B; returns ones `[B, 1]`."""
    del train
    ref = batch["user"] if "user" in batch else batch["seq"]
    return jnp.ones((ref.shape[0], 1), self.log_count.dtype)

  def item_repr(self) -> jnp.ndarray:
    """`[N, 1]` log popularity (`UNSEEN_SCORE` for unseen items and padding)."""
    return self.log_count[:, None]

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Scores `[B, N]`; `model.init(rng, batch)` creates every parameter through it."""
    return self.user_repr(batch, train=train) @ self.item_repr().T
