"""A pure content model: items are their text vector through an MLP, users an ID embedding.

  q_i = MLP(t_i)          t_i the item's sentence vector (a BERT-family encoder, recjax.nn.text)
  score(u, i) = <p_u, q_i>

Items never need an interaction to be scored, so items held out of training (cold start) are ranked
like any other. Trained like BPR-MF (pairs, BPR loss); the encoder's last layers can be fine-tuned
with `text.finetune_layers`.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from recjax.nn.embedding import embedding_table
from recjax.nn.text import ItemTextTable, TextItemTower


class TextMLP(nn.Module):
  """User table P `[U, dim]`; items `TextItemTower(use_id=False, hidden)` `[N, dim]`; scores = P_u Q^T."""

  num_users: int
  num_items: int
  item_text: ItemTextTable
  dim: int = 64
  hidden: tuple[int, ...] = (256,)
  embedding_init: str = "xavier_normal"
  kind: ClassVar[str] = "general"
  needs_text: ClassVar[bool] = True

  def setup(self):
    self.user_embedding = embedding_table(self.num_users, self.dim, init=self.embedding_init)
    self.item_tower = TextItemTower(self.num_items, self.dim, self.item_text, use_id=False, hidden=self.hidden)

  def user_repr(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """`batch["user"] [B]` -> `[B, d]`."""
    del train
    return self.user_embedding(batch["user"])

  def item_repr(self) -> jnp.ndarray:
    """The item table `[N, d]` from the items' texts (row 0 = padding = 0)."""
    return self.item_tower()

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Scores `[B, N]`."""
    return self.user_repr(batch, train=train) @ self.item_repr().T
