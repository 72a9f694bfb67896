"""BPR matrix factorisation (Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit
Feedback", UAI 2009): score(u, i) = <p_u, q_i> with user and item tables trained on a pairwise loss.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from recjax.nn.embedding import embedding_table
from recjax.nn.text import ItemTextTable, TextItemTower


class BPRMF(nn.Module):
  """User table P `[num_users, dim]` and item table Q `[num_items, dim]`; scores = P_u Q^T.

  Tables are initialised xavier-normal, N(0, 2 / (rows + dim)), as RecBole's BPR. With `item_text`
  (config `text.model`) the item tower is `recjax.nn.text.TextItemTower`: a two-tower model whose item
  side mixes the ID embedding with a projection of the item's text vector.
  """

  num_users: int
  num_items: int
  dim: int = 64
  embedding_init: str = "xavier_normal"
  item_text: ItemTextTable | None = None
  kind: ClassVar[str] = "general"

  def setup(self):
    self.user_embedding = embedding_table(self.num_users, self.dim, init=self.embedding_init)
    if self.item_text is None:
      self.item_embedding = embedding_table(self.num_items, self.dim, init=self.embedding_init)
    else:
      self.item_tower = TextItemTower(self.num_items, self.dim, self.item_text, use_id=self.item_text.use_id,
                                      embedding_init=self.embedding_init)

  def user_repr(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """`batch["user"] [B]` -> `[B, d]`."""
    del train
    return self.user_embedding(batch["user"])

  def item_repr(self) -> jnp.ndarray:
    """The item table `[N, d]` (row 0 = padding)."""
    return self.item_embedding.embedding if self.item_text is None else self.item_tower()

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Scores `[B, N]`; `model.init(rng, batch)` creates every parameter through it."""
    return self.user_repr(batch, train=train) @ self.item_repr().T
