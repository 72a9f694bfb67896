"""BPR matrix factorisation (Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit
Feedback", UAI 2009): score(u, i) = <p_u, q_i> with user and item tables trained on a pairwise loss.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from recjax.nn.embedding import embedding_table


class BPRMF(nn.Module):
  """User table P `[num_users, dim]` and item table Q `[num_items, dim]`; scores = P_u Q^T.

  Tables are initialised xavier-normal, N(0, 2 / (rows + dim)), as RecBole's BPR.
  """

  num_users: int
  num_items: int
  dim: int = 64
  embedding_init: str = "xavier_normal"
  kind: ClassVar[str] = "general"

  def setup(self):
    self.user_embedding = embedding_table(self.num_users, self.dim, init=self.embedding_init)
    self.item_embedding = embedding_table(self.num_items, self.dim, init=self.embedding_init)

  def user_repr(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """`batch["user"] [B]` -> `[B, d]`."""
    del train
    return self.user_embedding(batch["user"])

  def item_repr(self) -> jnp.ndarray:
    """The item table `[N, d]` (row 0 = padding)."""
    return self.item_embedding.embedding

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Scores `[B, N]`; `model.init(rng, batch)` creates every parameter through it."""
    return self.user_repr(batch, train=train) @ self.item_repr().T
