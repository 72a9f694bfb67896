"""LightGCN (He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for
Recommendation", SIGIR 2020): linear propagation of ID embeddings on the user-item graph.

  E^(0) = [P; Q]                      ego embeddings of users then items  [U+I, d]
  E^(k+1) = Â E^(k)                   Â = D^-1/2 A D^-1/2 (recjax.nn.graph)
  E = sum_k alpha_k E^(k),            alpha_k = 1 / (K + 1)   (eq. 8)
  score(u, i) = <E_u, E_{U+i}>

No feature transform, no non-linearity, no self-loop. Trained with BPR; the paper's L2 term is on
the ego rows E^(0) of the batch's users, positives and negatives, which this model provides through
`ego_tables` (see `recjax.tasks.pairwise_loss_fn`).

Defaults are RecBole 1.2.1's (`embedding_size=64, n_layers=2`, xavier-uniform tables); RecBole's
`reg_weight` regulariser differs from the paper's (see `recjax.config.MODEL_DEFAULTS`).
"""
from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp

from recjax.nn.embedding import embedding_table
from recjax.nn.graph import Graph, GraphTowers, propagate, split_nodes


class LightGCN(GraphTowers):
  """User table P `[U, dim]`, item table Q `[N, dim]`, `num_layers` propagation steps over `graph`.

  Methods: `ranking_tables() -> (users [U, d], items [N, d])` (one propagation, shared by every
  user), `ego_tables() -> (P, Q)`, `user_repr(batch) -> [B, d]`, `item_repr() -> [N, d]`.
  """

  num_users: int
  num_items: int
  graph: Graph
  dim: int = 64
  num_layers: int = 2
  embedding_init: str = "xavier_uniform"
  embedding_std: float = 0.1           # the scale of init "normal" (the authors' code: N(0, 0.1^2))
  kind: ClassVar[str] = "general"
  needs_graph: ClassVar[bool] = True

  def setup(self):
    self.user_embedding = embedding_table(self.num_users, self.dim, init=self.embedding_init, std=self.embedding_std)
    self.item_embedding = embedding_table(self.num_items, self.dim, init=self.embedding_init, std=self.embedding_std)

  @property
  def propagation_widths(self) -> tuple[int, ...]:
    """The row width each propagation step reads, one per layer."""
    return (self.dim,) * self.num_layers

  def ego_tables(self) -> tuple[jnp.ndarray, jnp.ndarray]:
    """E^(0): the user table `[U, d]` and the item table `[N, d]`."""
    return self.user_embedding.embedding, self.item_embedding.embedding

  def ranking_tables(self, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The layer mean E of every user `[U, d]` and item `[N, d]`."""
    del train
    layer = jnp.concatenate(self.ego_tables(), axis=0)   # E^(0) [U+I, d]
    total = layer
    for _ in range(self.num_layers):
      layer = propagate(self.graph, layer)
      total = total + layer
    return split_nodes(self.graph, total / (self.num_layers + 1))
