"""NGCF (Wang et al., "Neural Graph Collaborative Filtering", SIGIR 2019), as RecBole 1.2.1 builds it.

  E^(0) = [P; Q]                                                       [U+I, d_0]
  for each layer l (W1, b1, W2, b2: d_{l-1} -> d_l):
    S     = Â' E^(l-1)                                                 (Â' = Â after node dropout)
    H     = (E^(l-1) + S) W1 + b1 + (S ⊙ E^(l-1)) W2 + b2               sum and bi-interaction messages
    E^(l) = normalize(MessageDropout(LeakyReLU_0.2(H)))                row-wise L2 normalisation
  E = concat(E^(0), E^(1), ..., E^(L))                                 [U+I, d_0 + sum_l d_l]
  score(u, i) = <E_u, E_{U+i}>

RecBole's `BiGNNLayer` uses (L + I) E in the sum term and passes the *normalised* E^(l) on to the
next layer (the authors' code passes the unnormalised one; both concatenate the normalised ones).
Node dropout is RecBole's `SparseDropout`: each non-zero of Â is kept with probability 1 - p and
rescaled by 1 / (1 - p), one draw per forward pass shared by all layers. The L2 term of the BPR
loss is on the final (concatenated) rows, as RecBole and the authors' code do, so the model
provides no `ego_tables`.

Defaults are RecBole 1.2.1's: `embedding_size=64, hidden_size_list=[64, 64, 64],
message_dropout=0.1, node_dropout=0.0`, xavier-normal tables and weights, zero biases.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from recjax.nn.dropout import Dropout, dropout
from recjax.nn.embedding import embedding_table, l2_normalize
from recjax.nn.graph import Graph, GraphTowers, propagate, split_nodes
from recjax.nn.init import xavier_normal


class BiInteraction(nn.Module):
  """One NGCF propagation: `emb [U+I, d_in] -> [U+I, features]` (before activation).

  H = (E + S) W1 + b1 + (S ⊙ E) W2 + b2 with S = Â E (edge weights `weight [E]` when given).
  """

  graph: Graph
  features: int

  @nn.compact
  def __call__(self, emb: jnp.ndarray, weight: jnp.ndarray | None = None) -> jnp.ndarray:
    side = propagate(self.graph, emb, weight)                          # [U+I, d_in]
    dense = lambda name: nn.Dense(self.features, kernel_init=xavier_normal, bias_init=initializers.zeros, name=name)
    return dense("sum")(emb + side) + dense("bi")(side * emb)


class NGCF(GraphTowers):
  """Ego tables and `len(hidden_sizes)` bi-interaction layers over `graph`; representations of width
  `dim + sum(hidden_sizes)`.

  Methods: `ranking_tables(train) -> (users [U, D], items [N, D])`, `user_repr`, `item_repr`.
  """

  num_users: int
  num_items: int
  graph: Graph
  dim: int = 64
  hidden_sizes: tuple[int, ...] = (64, 64, 64)
  message_dropout: float = 0.1
  node_dropout: float = 0.0
  kind: ClassVar[str] = "general"
  needs_graph: ClassVar[bool] = True

  def setup(self):
    self.user_embedding = embedding_table(self.num_users, self.dim, init="xavier_normal")
    self.item_embedding = embedding_table(self.num_items, self.dim, init="xavier_normal")
    self.layers = [BiInteraction(self.graph, size) for size in self.hidden_sizes]
    self.dropouts = [Dropout(self.message_dropout) for _ in self.hidden_sizes]

  @property
  def propagation_widths(self) -> tuple[int, ...]:
    """The row width each propagation step reads, one per layer (layer l propagates E^(l-1))."""
    return (self.dim, *self.hidden_sizes[:-1])

  def ranking_tables(self, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Every user's `[U, D]` and item's `[N, D]` concatenated layer outputs (dropout when `train`)."""
    weight = None
    if train and self.node_dropout > 0:
      keep = dropout(jnp.ones(self.graph.num_edges), self.node_dropout, self.make_rng("dropout"))   # 0 or 1/(1-p)
      weight = keep * self.graph.weight                                                             # [E]
    emb = jnp.concatenate([self.user_embedding.embedding, self.item_embedding.embedding], axis=0)
    outputs = [emb]
    for layer, drop in zip(self.layers, self.dropouts):
      emb = l2_normalize(drop(jax.nn.leaky_relu(layer(emb, weight), 0.2), deterministic=not train))
      outputs.append(emb)
    return split_nodes(self.graph, jnp.concatenate(outputs, axis=-1))   # [U+I, D]
